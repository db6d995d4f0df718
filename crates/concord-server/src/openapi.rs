//! `/openapi.json`, generated from the handlers' `#[utoipa::path]` annotations.
//! Every operation also documents the error responses every route can give, in the
//! project's one error shape, so a fuzzer can check responses against the schema.

use crate::routes::{
    breakers, dispatch, entities, events, instances, leases, memory, messages, state, system,
    tasks, tokens,
};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

/// `{"error": {"code", "message", "details"}}`
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ErrorDetail {
    code: concord_core::ErrorCode,
    message: String,
    details: Option<serde_json::Value>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Concord", description = "Coordination hub for fleets of AI agents."),
    paths(
        tokens::create, tokens::list, tokens::revoke,
        instances::register, instances::list, instances::get, instances::patch, instances::close,
        instances::heartbeat, instances::ghosts,
        entities::list, entities::get, entities::campaign, entities::resign, entities::transfer, entities::route,
        state::list, state::get, state::put, state::delete,
        events::publish, events::read, events::stream, messages::send, messages::inbox, messages::ack,
        tasks::enqueue, tasks::enqueue_batch, tasks::claim, tasks::heartbeat, tasks::complete, tasks::complete_batch,
        tasks::fail, tasks::cancel, tasks::get, tasks::list, tasks::queues, tasks::put_schedule, tasks::list_schedules,
        tasks::delete_schedule, dispatch::create, dispatch::get,
        memory::write, memory::write_batch, memory::get, memory::update, memory::forget, memory::search,
        memory::put_trust, memory::get_trust, memory::put_circle, memory::list_circles,
        memory::fork_diff, memory::promote,
        breakers::observe, breakers::list, breakers::get, breakers::probe,
        leases::acquire, leases::renew, leases::release, leases::list,
        system::status, system::healthz, system::readyz, system::metrics, system::openapi,
        system::whoami,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&Conventions),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct Conventions;

const ERRORS: &[(&str, &str)] = &[
    ("400", "bad_request: the field at fault is in details.field"),
    ("401", "unauthorized: missing, unknown or revoked token"),
    ("403", "forbidden"),
    ("404", "not_found / unknown_instance"),
    (
        "409",
        "conflict, primary_held, fenced, stale_claim, lease_conflict, no_peers",
    ),
    ("413", "payload_too_large"),
    ("429", "rate_limited (Retry-After)"),
    ("503", "unavailable: the store cannot be reached"),
];

impl Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        let error_response = |desc: &str| {
            ResponseBuilder::new()
                .description(desc)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for item in doc.paths.paths.values_mut() {
            let ops: [&mut Option<Operation>; 5] = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in ops.into_iter().flatten() {
                for (code, desc) in ERRORS {
                    op.responses
                        .responses
                        .entry(code.to_string())
                        .or_insert_with(|| RefOr::T(error_response(desc)));
                }
            }
        }
    }
}

pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

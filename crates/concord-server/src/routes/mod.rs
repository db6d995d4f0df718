//! HTTP routes. Each handler extracts, authorizes, calls the store once and shapes
//! the response; the rules themselves live in concord-core and the store.

pub(crate) mod breakers;
pub(crate) mod dispatch;
pub(crate) mod entities;
pub(crate) mod events;
pub(crate) mod instances;
pub(crate) mod leases;
pub(crate) mod memory;
pub(crate) mod messages;
pub(crate) mod state;
pub(crate) mod system;
pub mod table;
pub(crate) mod tasks;
pub(crate) mod tokens;

use crate::AppState;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/tokens", post(tokens::create).get(tokens::list))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route(
            "/v1/instances",
            post(instances::register).get(instances::list),
        )
        .route(
            "/v1/instances/{id}",
            get(instances::get)
                .patch(instances::patch)
                .delete(instances::close),
        )
        .route("/v1/instances/{id}/heartbeat", post(instances::heartbeat))
        .route("/v1/ghosts", get(instances::ghosts))
        .route("/v1/entities", get(entities::list))
        .route("/v1/entities/{entity}", get(entities::get))
        .route("/v1/entities/{entity}/primary", post(entities::campaign))
        .route(
            "/v1/entities/{entity}/primary/resign",
            post(entities::resign),
        )
        .route(
            "/v1/entities/{entity}/primary/transfer",
            post(entities::transfer),
        )
        .route("/v1/route/{target}", get(entities::route))
        .route("/v1/entities/{entity}/state", get(state::list))
        .route(
            "/v1/entities/{entity}/state/{*key}",
            get(state::get).put(state::put).delete(state::delete),
        )
        .route("/v1/events", post(events::publish).get(events::read))
        .route("/v1/events/stream", get(events::stream))
        .route("/v1/messages", post(messages::send))
        .route("/v1/inbox", get(messages::inbox))
        .route("/v1/inbox/{id}/ack", post(messages::ack))
        .route("/v1/tasks", post(tasks::enqueue).get(tasks::list))
        .route("/v1/tasks/batch", post(tasks::enqueue_batch))
        .route("/v1/tasks/claim", post(tasks::claim))
        .route("/v1/tasks/complete", post(tasks::complete_batch))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/tasks/{id}/heartbeat", post(tasks::heartbeat))
        .route("/v1/tasks/{id}/complete", post(tasks::complete))
        .route("/v1/tasks/{id}/fail", post(tasks::fail))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/queues", get(tasks::queues))
        .route("/v1/schedules", get(tasks::list_schedules))
        .route(
            "/v1/schedules/{name}",
            axum::routing::put(tasks::put_schedule).delete(tasks::delete_schedule),
        )
        .route("/v1/dispatch", post(dispatch::create))
        .route("/v1/dispatch/{id}", get(dispatch::get))
        .route("/v1/memories", post(memory::write))
        .route("/v1/memories/batch", post(memory::write_batch))
        .route("/v1/memories/search", post(memory::search))
        .route(
            "/v1/memories/{id}",
            get(memory::get).put(memory::update).delete(memory::forget),
        )
        .route(
            "/v1/trust/{entity}",
            get(memory::get_trust).put(memory::put_trust),
        )
        .route("/v1/circles", get(memory::list_circles))
        .route("/v1/circles/{name}", axum::routing::put(memory::put_circle))
        .route("/v1/forks/{id}/diff", get(memory::fork_diff))
        .route("/v1/forks/{id}/promote", post(memory::promote))
        .route("/v1/observations", post(breakers::observe))
        .route("/v1/breakers", get(breakers::list))
        .route(
            "/v1/breakers/{*rest}",
            get(breakers::get_any)
                .post(breakers::post_any)
                .fallback(breakers::method_not_allowed),
        )
        .route("/v1/leases", post(leases::acquire).get(leases::list))
        .route("/v1/leases/{id}", axum::routing::delete(leases::release))
        .route("/v1/leases/{id}/renew", post(leases::renew))
        .route("/v1/status", get(system::status))
        .route("/v1/whoami", get(system::whoami))
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
}

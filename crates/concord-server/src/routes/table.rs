//! Every route with the action it authorizes and an example request, in one list.
//!
//! The authorization matrix test walks this list for every kind of caller and
//! checks each answer against `concord_core::authz` (the one rule table); it also
//! checks that this list and `/openapi.json` name the same routes, so a new route
//! without a rule here fails the build's tests.

use concord_core::authz::Action;

/// What the route's action is applied to, as the matrix test reconstructs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    /// No authentication at all (health, metrics, the OpenAPI document).
    Public,
    /// Nothing in particular.
    None,
    /// The fixture entity (`{entity}`).
    Entity,
    /// The fixture entity's primary instance (`{instance}`).
    Instance,
    /// A throwaway instance of the fixture entity (`{victim}`).
    Victim,
    /// Whatever the caller itself is.
    Caller,
}

#[derive(Debug, Clone, Copy)]
pub struct RouteRule {
    pub method: &'static str,
    pub path: &'static str,
    pub action: Option<Action>,
    pub subject: Subject,
    /// An example body; `{placeholders}` as in the path.
    pub body: &'static str,
    /// The example is a write outside the caller's own instance, which the store
    /// refuses to a ghost even where the action itself does not say so (memories:
    /// the space decides).
    pub ghost_denied: bool,
    /// Only the entity's primary (or admin) passes; the store says `forbidden` to
    /// other instances of the entity.
    pub primary_only: bool,
}

const fn r(
    method: &'static str,
    path: &'static str,
    action: Action,
    subject: Subject,
    body: &'static str,
) -> RouteRule {
    RouteRule {
        method,
        path,
        action: Some(action),
        subject,
        body,
        ghost_denied: false,
        primary_only: false,
    }
}

const fn public(method: &'static str, path: &'static str) -> RouteRule {
    RouteRule {
        method,
        path,
        action: None,
        subject: Subject::Public,
        body: "",
        ghost_denied: false,
        primary_only: false,
    }
}

use Action::*;
use Subject::{Caller, Entity, Instance, None as Nothing, Victim};

pub const ROUTES: &[RouteRule] = &[
    r(
        "POST",
        "/v1/tokens",
        TokenCreate,
        Nothing,
        r#"{"kind":"reader","name":"matrix"}"#,
    ),
    r("GET", "/v1/tokens", TokenList, Nothing, ""),
    r("DELETE", "/v1/tokens/{id}", TokenRevoke, Nothing, ""),
    r(
        "POST",
        "/v1/instances",
        InstanceRegister,
        Entity,
        r#"{"entity":"{entity}","label":"matrix","ttl_ms":60000}"#,
    ),
    r("GET", "/v1/instances", InstanceRead, Nothing, ""),
    r("GET", "/v1/instances/{id}", InstanceRead, Instance, ""),
    r(
        "PATCH",
        "/v1/instances/{id}",
        InstanceUpdate,
        Victim,
        r#"{"meta":{"matrix":true}}"#,
    ),
    r("DELETE", "/v1/instances/{id}", InstanceClose, Victim, ""),
    r(
        "POST",
        "/v1/instances/{id}/heartbeat",
        InstanceHeartbeat,
        Instance,
        "{}",
    ),
    r("GET", "/v1/ghosts", GhostRead, Nothing, ""),
    r("GET", "/v1/entities", EntityRead, Nothing, ""),
    r("GET", "/v1/entities/{entity}", EntityRead, Entity, ""),
    r(
        "POST",
        "/v1/entities/{entity}/primary",
        PrimaryCampaign,
        Instance,
        r#"{"instance":"{instance}"}"#,
    ),
    r(
        "POST",
        "/v1/entities/{entity}/primary/resign",
        PrimaryResign,
        Entity,
        r#"{}"#,
    ),
    r(
        "POST",
        "/v1/entities/{entity}/primary/transfer",
        PrimaryTransfer,
        Entity,
        r#"{"to":"{instance}"}"#,
    ),
    r("GET", "/v1/route/{target}", Route, Entity, ""),
    r("GET", "/v1/entities/{entity}/state", StateRead, Entity, ""),
    r(
        "GET",
        "/v1/entities/{entity}/state/{key}",
        StateRead,
        Entity,
        "",
    ),
    r(
        "PUT",
        "/v1/entities/{entity}/state/{key}",
        StateWrite,
        Entity,
        r#"{"value":1,"fence":1}"#,
    ),
    r(
        "DELETE",
        "/v1/entities/{entity}/state/{key}",
        StateWrite,
        Entity,
        "",
    ),
    r(
        "POST",
        "/v1/events",
        EventPublish,
        Caller,
        r#"{"topic":"matrix.test","data":1}"#,
    ),
    r("GET", "/v1/events", EventRead, Nothing, ""),
    r("GET", "/v1/events/stream", EventRead, Nothing, ""),
    r(
        "POST",
        "/v1/messages",
        MessageSend,
        Caller,
        r#"{"to":"entity:{entity}","subject":"matrix","body":1}"#,
    ),
    r("GET", "/v1/inbox", InboxRead, Caller, ""),
    r("POST", "/v1/inbox/{id}/ack", InboxRead, Caller, "{}"),
    r(
        "POST",
        "/v1/tasks",
        TaskEnqueue,
        Caller,
        r#"{"queue":"matrix","payload":1}"#,
    ),
    r("GET", "/v1/tasks", TaskRead, Nothing, ""),
    r(
        "POST",
        "/v1/tasks/batch",
        TaskEnqueue,
        Caller,
        r#"{"tasks":[{"queue":"matrix","payload":1}]}"#,
    ),
    r(
        "POST",
        "/v1/tasks/claim",
        TaskClaim,
        Caller,
        r#"{"queues":["matrix-empty"],"max":1}"#,
    ),
    r(
        "POST",
        "/v1/tasks/complete",
        TaskWork,
        Caller,
        r#"{"items":[{"id":"{task}","claim":"clm_01ARZ3NDEKTSV4RRFFQ69G5FAV","result":1}]}"#,
    ),
    r("GET", "/v1/tasks/{id}", TaskRead, Nothing, ""),
    r(
        "POST",
        "/v1/tasks/{id}/heartbeat",
        TaskWork,
        Caller,
        r#"{"claim":"clm_01ARZ3NDEKTSV4RRFFQ69G5FAV"}"#,
    ),
    r(
        "POST",
        "/v1/tasks/{id}/complete",
        TaskWork,
        Caller,
        r#"{"claim":"clm_01ARZ3NDEKTSV4RRFFQ69G5FAV","result":1}"#,
    ),
    r(
        "POST",
        "/v1/tasks/{id}/fail",
        TaskWork,
        Caller,
        r#"{"claim":"clm_01ARZ3NDEKTSV4RRFFQ69G5FAV","error":"x"}"#,
    ),
    r("POST", "/v1/tasks/{id}/cancel", TaskCancel, Caller, "{}"),
    r("GET", "/v1/queues", TaskRead, Nothing, ""),
    r("GET", "/v1/schedules", TaskRead, Nothing, ""),
    r(
        "PUT",
        "/v1/schedules/{name}",
        ScheduleWrite,
        Nothing,
        r#"{"queue":"matrix","every_ms":3600000}"#,
    ),
    r("DELETE", "/v1/schedules/{name}", ScheduleWrite, Nothing, ""),
    r(
        "POST",
        "/v1/dispatch",
        Dispatch,
        Caller,
        r#"{"command":"matrix","quorum":"any","if_under_min":"degraded","timeout_ms":100}"#,
    ),
    r("GET", "/v1/dispatch/{id}", TaskRead, Nothing, ""),
    r("GET", "/v1/status", StatusRead, Nothing, ""),
    r("GET", "/v1/whoami", WhoAmI, Nothing, ""),
    RouteRule {
        ghost_denied: true,
        ..r(
            "POST",
            "/v1/memories",
            MemoryWrite,
            Nothing,
            r#"{"space":"shared:matrix","kind":"note","text":"matrix {caller}","visibility":"public"}"#,
        )
    },
    RouteRule {
        ghost_denied: true,
        ..r(
            "POST",
            "/v1/memories/batch",
            MemoryWrite,
            Nothing,
            r#"{"memories":[{"space":"shared:matrix","kind":"note","text":"batch {caller}","visibility":"public"}]}"#,
        )
    },
    r(
        "POST",
        "/v1/memories/search",
        MemoryRead,
        Nothing,
        r#"{"query":"matrix"}"#,
    ),
    r("GET", "/v1/memories/{id}", MemoryRead, Nothing, ""),
    r(
        "PUT",
        "/v1/memories/{id}",
        MemoryWrite,
        Nothing,
        r#"{"text":"changed"}"#,
    ),
    r("DELETE", "/v1/memories/{id}", MemoryWrite, Nothing, ""),
    r("GET", "/v1/trust/{entity}", TrustRead, Entity, ""),
    RouteRule {
        primary_only: true,
        ..r(
            "PUT",
            "/v1/trust/{entity}",
            TrustWrite,
            Entity,
            r#"{"trusts":["entity:anvil"]}"#,
        )
    },
    r("GET", "/v1/circles", CircleRead, Nothing, ""),
    r(
        "PUT",
        "/v1/circles/{name}",
        CircleWrite,
        Nothing,
        r#"{"members":["sisters","anvil"]}"#,
    ),
    r("GET", "/v1/forks/{id}/diff", ForkRead, Nothing, ""),
    r(
        "POST",
        "/v1/forks/{id}/promote",
        ForkPromote,
        Entity,
        r#"{"memory_ids":["mem_01ARZ3NDEKTSV4RRFFQ69G5FAV"]}"#,
    ),
    r(
        "POST",
        "/v1/observations",
        Observe,
        Caller,
        r#"{"subject":"provider:matrix","outcome":"ok","latency_ms":5}"#,
    ),
    r("GET", "/v1/breakers", BreakerRead, Nothing, ""),
    r("GET", "/v1/breakers/{subject}", BreakerRead, Nothing, ""),
    r(
        "POST",
        "/v1/breakers/{subject}/probe",
        BreakerProbe,
        Caller,
        "{}",
    ),
    r(
        "POST",
        "/v1/leases",
        LeaseAcquire,
        Caller,
        r#"{"resource":"matrix:shared","mode":"shared","ttl_ms":60000}"#,
    ),
    r("GET", "/v1/leases", LeaseRead, Nothing, ""),
    r(
        "POST",
        "/v1/leases/{id}/renew",
        LeaseAcquire,
        Caller,
        r#"{"ttl_ms":60000}"#,
    ),
    r("DELETE", "/v1/leases/{id}", LeaseRelease, Caller, ""),
    public("GET", "/healthz"),
    public("GET", "/readyz"),
    public("GET", "/metrics"),
    public("GET", "/openapi.json"),
];

//! The tool table: every MCP tool Concord offers, in one place.
//!
//! A tool is one [`tool`] entry in [`table`]: its name, whether it only reads, a
//! description written for a model, an argument struct (its JSON schema is the
//! tool's `inputSchema`; unknown arguments are refused) and an async body that
//! calls the hub through [`Ctx`]. Argument names are those of the REST bodies, so
//! what a model learns from one carries over to the other. To add a tool (say
//! `dispatch`), write its argument struct below and add one entry to the table.

use crate::Ctx;
use concord_client::{pct, Method, SpoolKind};
use concord_core::api::{ClaimRequest, Role, SendMessageRequest};
use concord_core::{Error, ErrorCode, Result};
use futures::future::BoxFuture;
use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

/// Whether a tool changes anything (clients may ask before running a write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    Read,
    Write,
}

/// A call whose arguments parsed, waiting for the instance to act as.
pub type Prepared = Box<dyn FnOnce(Ctx) -> BoxFuture<'static, Result<Value>> + Send>;

type Prepare = Box<dyn Fn(Value) -> Result<Prepared> + Send + Sync>;

/// One entry of the table.
pub struct ToolDef {
    pub name: &'static str,
    pub kind: ToolKind,
    pub description: &'static str,
    schema: Arc<JsonObject>,
    prepare: Prepare,
}

impl ToolDef {
    /// The tool as `tools/list` shows it.
    pub fn tool(&self) -> Tool {
        let annotations = match self.kind {
            ToolKind::Read => ToolAnnotations::new().read_only(true),
            ToolKind::Write => ToolAnnotations::new().read_only(false).destructive(false),
        };
        Tool::new(self.name, self.description, self.schema.clone()).with_annotations(annotations)
    }

    pub fn input_schema(&self) -> &JsonObject {
        &self.schema
    }

    /// Checks the arguments; a bad one is a `bad_request` naming it.
    pub fn prepare(&self, args: Value) -> Result<Prepared> {
        (self.prepare)(args)
    }
}

/// Parses tool arguments strictly; the error names the argument at fault.
pub fn parse_args<A: DeserializeOwned>(args: Value) -> Result<A> {
    serde_path_to_error::deserialize::<_, A>(args).map_err(|err| {
        let path = err.path().to_string();
        let msg = err.into_inner().to_string();
        let field = if path == "." || path.is_empty() {
            // serde names unknown and missing fields in the message, against the parent.
            msg.split('`').nth(1).unwrap_or("").to_string()
        } else {
            path
        };
        if field.is_empty() {
            Error::bad_request(format!("invalid arguments: {msg}"))
        } else {
            Error::new(
                ErrorCode::BadRequest,
                format!("invalid argument `{field}`: {msg}"),
            )
            .with_details(json!({ "field": field }))
        }
    })
}

/// The argument struct's JSON schema, as MCP wants it: an object at the root,
/// without the struct's own name and doc (noise to a model).
fn input_schema<A: JsonSchema>() -> Arc<JsonObject> {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<A>();
    let mut object = match serde_json::to_value(schema) {
        Ok(Value::Object(o)) => o,
        _ => JsonObject::new(),
    };
    object.remove("title");
    object.remove("description");
    object.remove("$schema");
    object
        .entry("type")
        .or_insert_with(|| Value::String("object".into()));
    Arc::new(object)
}

fn tool<A, F, Fut>(name: &'static str, kind: ToolKind, description: &'static str, f: F) -> ToolDef
where
    A: DeserializeOwned + JsonSchema + Send + 'static,
    F: Fn(Ctx, A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Value>> + Send + 'static,
{
    let f = Arc::new(f);
    ToolDef {
        name,
        kind,
        description,
        schema: input_schema::<A>(),
        prepare: Box::new(move |args| {
            let a: A = parse_args(args)?;
            let f = f.clone();
            Ok(
                Box::new(move |ctx: Ctx| -> BoxFuture<'static, Result<Value>> {
                    Box::pin(f(ctx, a))
                }) as Prepared,
            )
        }),
    }
}

fn to_value<T: Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::internal(format!("encoding the answer: {e}")))
}

/// Long-polls get the hub's own bound plus a margin, never an unbounded wait.
fn poll_timeout(wait_ms: Option<u64>) -> Duration {
    Duration::from_millis(wait_ms.unwrap_or(0).min(60_000) + 30_000)
}

use ToolKind::{Read, Write};

/// Every tool, in the order `tools/list` shows them.
pub fn table() -> &'static [ToolDef] {
    static TABLE: LazyLock<Vec<ToolDef>> = LazyLock::new(build);
    &TABLE
}

pub fn find(name: &str) -> Option<&'static ToolDef> {
    table().iter().find(|t| t.name == name)
}

fn build() -> Vec<ToolDef> {
    vec![
        // ----- identity and presence -----
        tool(
            "whoami",
            Read,
            "Who you are on the hub: your instance id, entity, label, role, whether you \
             are the primary and your current fence (the epoch to send with fenced writes). \
             Also heartbeats your instance.",
            |cx: Ctx, _: NoArgs| async move {
                let beat = cx.beat().await?;
                let instance = cx.client().get_instance(cx.instance()).await?;
                let mut out = json!({
                    "instance": instance.id,
                    "entity": instance.entity,
                    "label": instance.label,
                    "role": beat.role,
                    "is_primary": beat.role == Role::Primary,
                    "fence": beat.fence,
                    "epoch": beat.epoch,
                    "lease_until": beat.lease_until,
                    "capabilities": instance.capabilities,
                });
                if let (Value::Object(o), Value::Object(extra)) = (&mut out, cx.agent().describe())
                {
                    o.extend(extra);
                }
                Ok(out)
            },
        ),
        tool(
            "list_instances",
            Read,
            "List running instances (live ones unless `state` says otherwise), optionally of \
             one entity or one role.",
            |cx: Ctx, a: ListInstances| async move {
                let role = a.role.map(Role::from);
                to_value(
                    cx.client()
                        .list_instances(a.entity.as_deref(), role, a.state.as_deref())
                        .await?,
                )
            },
        ),
        tool(
            "get_primary",
            Read,
            "The current primary of an entity (default: yours) and its epoch; \
             `you_are_primary` says whether it is you.",
            |cx: Ctx, a: EntityArg| async move {
                let entity = a.entity.unwrap_or_else(|| cx.entity().to_string());
                let e = cx.client().entity(&entity).await?;
                let you = e.primary.as_ref().is_some_and(|p| p.id == cx.instance());
                Ok(json!({
                    "entity": e.name,
                    "epoch": e.epoch,
                    "primary": e.primary,
                    "you_are_primary": you,
                }))
            },
        ),
        tool(
            "campaign_primary",
            Write,
            "Become your entity's primary. Fails with primary_held while another live \
             instance holds the role, unless `wait_ms` lets you wait for it to be released. \
             On success the answer's `fence` is what fenced writes carry (filled in for you).",
            |cx: Ctx, a: Campaign| async move {
                let grant = cx
                    .client()
                    .campaign(cx.entity(), cx.instance(), a.wait_ms)
                    .await?;
                // Refresh the cached role and fence at once (the bridge keeps them).
                let _ = cx.beat().await;
                to_value(grant)
            },
        ),
        // ----- entity state -----
        tool(
            "get_state",
            Read,
            "Read an entity's production state (default: your entity): one key, or every \
             key when `key` is omitted.",
            |cx: Ctx, a: GetState| async move {
                let entity = a.entity.unwrap_or_else(|| cx.entity().to_string());
                match a.key {
                    Some(key) => to_value(cx.client().get_state(&entity, &key).await?),
                    None => to_value(cx.client().list_state(&entity).await?),
                }
            },
        ),
        tool(
            "set_state",
            Write,
            "Write a key of your entity's production state. Only the primary may, with its \
             current fence; omit `fence` to send yours. A stale fence fails with `fenced`.",
            |cx: Ctx, a: SetState| async move {
                let fence = cx.fence(a.fence).await?;
                to_value(
                    cx.client()
                        .put_state(cx.entity(), &a.key, a.value, fence, a.if_revision)
                        .await?,
                )
            },
        ),
        // ----- events and messages -----
        tool(
            "publish",
            Write,
            "Publish an event on a topic (dot-separated words, e.g. `crew.deploys`; `sys.` \
             is reserved for the hub). The same `idempotency_key` again publishes nothing new. \
             While the hub is unreachable the event is spooled and delivered when it returns.",
            |cx: Ctx, a: Publish| async move {
                cx.client().write(SpoolKind::Event, to_value(&a)?).await
            },
        ),
        tool(
            "read_events",
            Read,
            "Read events after position `from` on topics matching `topics` (comma-separated \
             patterns: `*` one word, `>` the rest, e.g. `crew.>,sys.primary.*`). Pass the \
             answer's `next` as `from` to read on; `wait_ms` waits for the first match.",
            |cx: Ctx, a: ReadEvents| async move {
                to_value(
                    cx.client()
                        .read_events(
                            &a.topics,
                            a.from,
                            a.limit.unwrap_or(100),
                            a.wait_ms.unwrap_or(0),
                        )
                        .await?,
                )
            },
        ),
        tool(
            "send_message",
            Write,
            "Send a message to `instance:ins_…`, `entity:NAME` (every live instance of it), \
             `primary:NAME` or `cap:CAPABILITY` (every live instance offering it).",
            |cx: Ctx, a: SendMessage| async move {
                let req = SendMessageRequest {
                    to: a.to,
                    subject: a.subject.unwrap_or_default(),
                    body: a.body,
                    thread_id: a.thread_id,
                    ack_required: a.ack_required.unwrap_or(false),
                };
                to_value(cx.client().send_message(&req).await?)
            },
        ),
        tool(
            "read_inbox",
            Read,
            "Read messages sent to you, after cursor `after` (0: from the start). Pass the \
             answer's `next` as `after` to read on; `wait_ms` waits for a message; \
             `unacked_only` shows only messages not acknowledged yet.",
            |cx: Ctx, a: ReadInbox| async move {
                to_value(
                    cx.client()
                        .inbox(
                            a.after.unwrap_or(0),
                            a.limit.unwrap_or(100),
                            a.wait_ms.unwrap_or(0),
                            a.unacked_only.unwrap_or(false),
                        )
                        .await?,
                )
            },
        ),
        tool(
            "ack_message",
            Write,
            "Acknowledge a message of your inbox by its id (`msg_…`).",
            |cx: Ctx, a: IdArg| async move { to_value(cx.client().ack(&a.id).await?) },
        ),
        // ----- work queue -----
        tool(
            "submit_task",
            Write,
            "Put a task on a work queue. `requires` lists capabilities a worker must offer, \
             `target` an instance that alone may take it; the same `idempotency_key` again \
             returns the first task instead of a new one. While the hub is unreachable the \
             task is spooled and enqueued (once) when it returns.",
            |cx: Ctx, a: SubmitTask| async move {
                cx.client().write(SpoolKind::Task, to_value(&a)?).await
            },
        ),
        tool(
            "claim_task",
            Write,
            "Take up to `max` tasks (default 1) from `queues`, waiting up to `wait_ms` for \
             one. Each comes with a `claim`: send it with heartbeat_task, complete_task or \
             fail_task. The claim lapses after `lease_ms` without a heartbeat, and the task \
             goes to another worker.",
            |cx: Ctx, a: ClaimTask| async move {
                let timeout = poll_timeout(a.wait_ms);
                cx.client()
                    .call_timeout::<_, Value>(Method::POST, "/v1/tasks/claim", Some(&a), timeout)
                    .await
            },
        ),
        tool(
            "heartbeat_task",
            Write,
            "Keep the claim on a task you are working on (extends its lease) and optionally \
             record `progress`. Fails with stale_claim if the claim was lost.",
            |cx: Ctx, a: HeartbeatTask| async move {
                to_value(
                    cx.client()
                        .heartbeat_task(&a.id, &a.claim, a.progress)
                        .await?,
                )
            },
        ),
        tool(
            "complete_task",
            Write,
            "Finish a task you claimed, with its `result`. Fails with stale_claim if your \
             claim lapsed and the task went elsewhere. With `claim_next`, take your next \
             task in the same step (both or neither): it comes back in `next`, with its claim.",
            |cx: Ctx, a: CompleteTask| async move {
                let Some(next) = a.claim_next else {
                    return to_value(cx.client().complete_task(&a.id, &a.claim, a.result).await?);
                };
                let next = ClaimRequest {
                    queues: next.queues,
                    max: next.max,
                    lease_ms: next.lease_ms,
                    wait_ms: next.wait_ms,
                };
                let (task, claimed) = cx
                    .client()
                    .complete_and_claim(&a.id, &a.claim, a.result, next)
                    .await?;
                let mut out = to_value(task)?;
                out["next"] = to_value(claimed)?;
                Ok(out)
            },
        ),
        tool(
            "fail_task",
            Write,
            "Report that a task you claimed failed, with an `error` text. It is retried after \
             a backoff while attempts remain, unless `retry` is false.",
            |cx: Ctx, a: FailTask| async move {
                to_value(
                    cx.client()
                        .fail_task(
                            &a.id,
                            &a.claim,
                            a.error.as_deref().unwrap_or(""),
                            a.retry.unwrap_or(true),
                        )
                        .await?,
                )
            },
        ),
        // ----- shared memory -----
        tool(
            "remember",
            Write,
            "Store a memory. `space`: `entity` (your entity's canonical memory: the primary \
             only, fenced; the default for the primary), `instance` (your private scratch; \
             the default otherwise), `shared:NAME` (a commons any labelled instance may write) \
             or a full `entity:NAME` / `instance:ins_…`. An exact duplicate returns the \
             existing memory. While the hub is unreachable, writes to `shared:…` and your \
             own instance space are spooled and delivered when it returns.",
            |cx: Ctx, mut a: Remember| async move {
                // The heartbeat says the role and fence now; while the hub is away
                // the last role seen decides the default space (a spoolable write
                // must not wait on the hub).
                let beat = match cx.beat().await {
                    Ok(b) => Some(b),
                    Err(e) if e.code == ErrorCode::Unavailable => None,
                    Err(e) => return Err(e),
                };
                let role = beat
                    .as_ref()
                    .map(|b| b.role)
                    .or_else(|| cx.agent().last_role());
                let space = match (a.space.take(), role) {
                    (Some(s), _) => cx.space(&s),
                    (None, Some(Role::Primary)) => cx.space("entity"),
                    (None, Some(_)) => cx.space("instance"),
                    (None, None) => {
                        return Err(Error::unavailable(
                            "hub unreachable and this instance's role is not known yet: \
                             give `space` (`instance` or `shared:NAME`); not spooled",
                        ))
                    }
                };
                if a.fence.is_none() && space == format!("entity:{}", cx.entity()) {
                    a.fence = beat.and_then(|b| b.fence);
                }
                let mut body = to_value(&a)?;
                body["space"] = Value::String(space);
                cx.client().write(SpoolKind::Memory, body).await
            },
        ),
        tool(
            "recall",
            Read,
            "Search shared memory: full-text (and by meaning where the hub has embeddings), \
             newest knowledge weighted up. `spaces` narrows where to look (`entity` and \
             `instance` mean your own); `trusted_only` keeps writers your entity trusts. Each \
             hit says who wrote it and why it scored.",
            |cx: Ctx, mut a: Recall| async move {
                a.spaces = a.spaces.iter().map(|s| cx.space(s)).collect();
                cx.client()
                    .call::<_, Value>(Method::POST, "/v1/memories/search", Some(&a))
                    .await
            },
        ),
        tool(
            "forget",
            Write,
            "Forget a memory by id (`mem_…`): it is closed, not erased (history keeps it). \
             Canonical memories need the primary's fence, filled in for you.",
            |cx: Ctx, a: Forget| async move {
                let fence = match a.fence {
                    Some(f) => Some(f),
                    None => cx.beat().await?.fence,
                };
                let q = fence.map(|f| format!("?fence={f}")).unwrap_or_default();
                cx.client()
                    .call::<(), Value>(
                        Method::DELETE,
                        &format!("/v1/memories/{}{q}", pct(&a.id)),
                        None,
                    )
                    .await
            },
        ),
        // ----- dispatch, breakers, leases -----
        tool(
            "dispatch",
            Write,
            "Ask several agents one question and get one answer back: the command goes to the \
             live instances matching `select` (entity, capabilities, roles) as targeted tasks, \
             and their answers are reduced (`first`, `all`, `majority`, `weighted_mean`, \
             `fedavg`, `best_of`, `union`) under a quorum (`single`, `multi` with min/max, `any`) \
             and a deadline. Returns the reduced result and who said what.",
            |cx: Ctx, a: DispatchArgs| async move {
                cx.client()
                    .call::<_, Value>(Method::POST, "/v1/dispatch", Some(&a))
                    .await
            },
        ),
        tool(
            "report_observation",
            Write,
            "Report how a call to an outside dependency went (`subject` such as \
             `provider:kimi/k2p5`; outcome ok, error or timeout; latency), so the whole fleet \
             shares one circuit breaker for it. Send `probe_id` when reporting a granted probe.",
            |cx: Ctx, a: Observation| async move {
                cx.client()
                    .write(SpoolKind::Observation, to_value(&a)?)
                    .await
            },
        ),
        tool(
            "breaker_status",
            Read,
            "The shared circuit breaker of a subject (closed, open or half_open, error rate, \
             latency, who tripped it and when to retry), or every breaker (optionally only \
             those in one `state`) when no subject is given.",
            |cx: Ctx, a: BreakerStatus| async move {
                let path = match (&a.subject, &a.state) {
                    (Some(sub), _) => format!("/v1/breakers/{}", path_of(sub)),
                    (None, Some(st)) => format!("/v1/breakers?state={}", pct(st)),
                    (None, None) => "/v1/breakers".to_string(),
                };
                cx.client()
                    .call::<(), Value>(Method::GET, &path, None)
                    .await
            },
        ),
        tool(
            "request_probe",
            Write,
            "Ask to be the one instance of the fleet that tries a half-open breaker's subject \
             again. If granted, make one call and report its outcome with the `probe_id`; if \
             not, the answer says when to ask again.",
            |cx: Ctx, a: Probe| async move {
                cx.client()
                    .call::<_, Value>(
                        Method::POST,
                        &format!("/v1/breakers/{}/probe", path_of(&a.subject)),
                        Some(&json!({})),
                    )
                    .await
            },
        ),
        tool(
            "acquire_lease",
            Write,
            "Reserve a resource (a name, or a path glob such as `repo:/src/**`) exclusively or \
             shared, for `ttl_ms`, with a reason others can read. Fails with lease_conflict \
             naming the holders when an overlapping exclusive lease exists. The lease's fence \
             grows with every grant.",
            |cx: Ctx, a: AcquireLease| async move {
                cx.client()
                    .call::<_, Value>(Method::POST, "/v1/leases", Some(&a))
                    .await
            },
        ),
        tool(
            "renew_lease",
            Write,
            "Extend one of your leases by `ttl_ms` from now.",
            |cx: Ctx, a: RenewLease| async move {
                let body = json!({"ttl_ms": a.ttl_ms});
                cx.client()
                    .call::<_, Value>(
                        Method::POST,
                        &format!("/v1/leases/{}/renew", pct(&a.id)),
                        Some(&body),
                    )
                    .await
            },
        ),
        tool(
            "release_lease",
            Write,
            "Release one of your leases (`lse_…`) so others may take the resource.",
            |cx: Ctx, a: LeaseId| async move {
                cx.client()
                    .call::<(), Value>(Method::DELETE, &format!("/v1/leases/{}", pct(&a.id)), None)
                    .await
            },
        ),
        tool(
            "list_leases",
            Read,
            "Live leases, optionally only those on a `resource` or held by a `holder` instance.",
            |cx: Ctx, a: ListLeases| async move {
                let mut q = Vec::new();
                if let Some(r) = &a.resource {
                    q.push(format!("resource={}", pct(r)));
                }
                if let Some(h) = &a.holder {
                    q.push(format!("holder={}", pct(h)));
                }
                let qs = if q.is_empty() {
                    String::new()
                } else {
                    format!("?{}", q.join("&"))
                };
                cx.client()
                    .call::<(), Value>(Method::GET, &format!("/v1/leases{qs}"), None)
                    .await
            },
        ),
    ]
}

// ---------- arguments ----------
//
// Doc comments become the schema's descriptions: they are written for a model.

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoleArg {
    Primary,
    Secondary,
    Fork,
}

impl From<RoleArg> for Role {
    fn from(r: RoleArg) -> Role {
        match r {
            RoleArg::Primary => Role::Primary,
            RoleArg::Secondary => Role::Secondary,
            RoleArg::Fork => Role::Fork,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListInstances {
    /// Only instances of this entity.
    #[serde(default)]
    pub entity: Option<String>,
    /// Only instances with this role.
    #[serde(default)]
    pub role: Option<RoleArg>,
    /// `live` (default), `expired`, `closed` or `all`.
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EntityArg {
    /// The entity (default: yours).
    #[serde(default)]
    pub entity: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Campaign {
    /// Wait up to this many milliseconds for the role to be released (at most 60000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetState {
    /// The entity (default: yours).
    #[serde(default)]
    pub entity: Option<String>,
    /// The key, e.g. `config/model`; omit for every key.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetState {
    /// The key, e.g. `config/model` (slash-separated words).
    pub key: String,
    /// Any JSON value.
    pub value: Value,
    /// The epoch of your primary grant; omit to send your current one.
    #[serde(default)]
    pub fence: Option<u64>,
    /// Write only if the key is at this revision (0: only if absent).
    #[serde(default)]
    pub if_revision: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// Dot-separated words, e.g. `crew.deploys`.
    pub topic: String,
    /// Any JSON value.
    #[serde(default)]
    pub data: Value,
    /// Publishing again with the same key publishes nothing new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadEvents {
    /// Comma-separated patterns: `*` matches one word, `>` the rest (`>` alone: everything).
    pub topics: String,
    /// Read events after this position (default: from now on).
    #[serde(default)]
    pub from: Option<i64>,
    /// At most this many events (1..=1000, default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Wait up to this many milliseconds for a matching event (at most 60000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMessage {
    /// `instance:ins_…`, `entity:NAME`, `primary:NAME` or `cap:CAPABILITY`.
    pub to: String,
    #[serde(default)]
    pub subject: Option<String>,
    /// Any JSON value.
    #[serde(default)]
    pub body: Value,
    /// Reply in this thread (the `thread_id` of the message you answer).
    #[serde(default)]
    pub thread_id: Option<String>,
    /// Ask the receivers to acknowledge it (ack_message).
    #[serde(default)]
    pub ack_required: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadInbox {
    /// Messages after this cursor (default 0: the whole inbox).
    #[serde(default)]
    pub after: Option<i64>,
    /// At most this many (1..=1000, default 100).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Wait up to this many milliseconds for a message (at most 60000).
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// Only messages not acknowledged yet.
    #[serde(default)]
    pub unacked_only: Option<bool>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdArg {
    /// The id.
    pub id: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    /// The queue, e.g. `builds`.
    pub queue: String,
    /// Any JSON value: what the worker needs to do the work.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub payload: Value,
    /// Higher runs first (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Capabilities the claiming instance must offer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    /// Only this instance (`ins_…`) may claim it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Submitting the same key again returns the first task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Attempts before the task is dead (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// First retry delay in milliseconds; doubles each attempt (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<i64>,
    /// Not claimable before this time (RFC 3339, e.g. `2030-01-01T00:00:00Z`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// Task ids that must complete first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Default claim lease for this task, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimTask {
    /// Queues to take work from.
    pub queues: Vec<String>,
    /// At most this many tasks (1..=1000, default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// How long the claim holds without a heartbeat, in milliseconds (default: the
    /// task's timeout_ms, else 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<i64>,
    /// Wait up to this many milliseconds for a task (at most 60000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatTask {
    /// The task id (`tsk_…`).
    pub id: String,
    /// The claim you got from claim_task (`clm_…`).
    pub claim: String,
    /// Any JSON value describing how far you got.
    #[serde(default)]
    pub progress: Option<Value>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteTask {
    /// The task id (`tsk_…`).
    pub id: String,
    /// The claim you got from claim_task (`clm_…`).
    pub claim: String,
    /// Any JSON value: the task's result.
    #[serde(default)]
    pub result: Value,
    /// Also claim your next task from these queues, as claim_task would.
    #[serde(default)]
    pub claim_next: Option<ClaimTask>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailTask {
    /// The task id (`tsk_…`).
    pub id: String,
    /// The claim you got from claim_task (`clm_…`).
    pub claim: String,
    /// What went wrong.
    #[serde(default)]
    pub error: Option<String>,
    /// Retry after a backoff while attempts remain (default true).
    #[serde(default)]
    pub retry: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Remember {
    /// What to remember.
    pub text: String,
    /// `entity`, `instance`, `shared:NAME`, `entity:NAME` or `instance:ins_…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<String>,
    /// A short word: fact, learning, anti_pattern, note (default), observation…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Any JSON object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    /// `private`, `entity`, `circle:NAME` or `public` (default depends on the space).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub visibility: Option<String>,
    /// For your entity's space: the epoch of your primary grant; omit to send yours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// When the knowledge became true (RFC 3339; default now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_at: Option<String>,
    /// A retry with the same key returns the first write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recall {
    /// What to look for, in words.
    pub query: String,
    /// Where to look (default: everywhere you may read).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spaces: Vec<String>,
    /// Only these kinds (fact, learning, anti_pattern…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    /// Only memories carrying every one of these tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Only memories by writers your entity trusts (itself always).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted_only: bool,
    /// At most this many hits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The view at a past time (RFC 3339): what was recorded and valid then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_of: Option<String>,
    /// Also superseded and forgotten versions.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub include_closed: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Forget {
    /// The memory id (`mem_…`).
    pub id: String,
    /// For your entity's space: the epoch of your primary grant; omit to send yours.
    #[serde(default)]
    pub fence: Option<u64>,
}

/// A path of slash-separated words, each percent-encoded (breaker subjects keep
/// their slashes: `provider:kimi/k2p5`).
fn path_of(s: &str) -> String {
    s.split('/').map(pct).collect::<Vec<_>>().join("/")
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchArgs {
    /// A word naming the command; peers serve it from queue `dispatch.<command>`.
    pub command: String,
    /// What the peers receive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Which peers: `{"entity": …, "capabilities": [...], "roles": ["primary", "secondary"]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub select: Option<Value>,
    /// `single`, `multi` or `any`.
    pub quorum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Deadline in ms (default 30000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    /// `{"kind": "majority", "path": "/verdict"}` and the like (default `all`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reducer: Option<Value>,
    /// `fail`, `degraded` or `wait`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_under_min: Option<String>,
    /// Only idempotent commands are retried on another peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotent: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Observation {
    /// What was called, e.g. `provider:kimi/k2p5`.
    pub subject: String,
    /// `ok`, `error` or `timeout`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The probe this outcome answers, if it was a granted probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_id: Option<String>,
    /// Reporting again with the same key does not count the outcome twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BreakerStatus {
    #[serde(default)]
    pub subject: Option<String>,
    /// `closed`, `open` or `half_open` (with no subject).
    #[serde(default)]
    pub state: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub subject: String,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireLease {
    /// A name or a path glob, e.g. `repo:/src/**`.
    pub resource: String,
    /// `exclusive` (default) or `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<i64>,
    /// Why you hold it (others see it in conflicts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewLease {
    /// The lease id (`lse_…`).
    pub id: String,
    pub ttl_ms: i64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseId {
    /// The lease id (`lse_…`).
    pub id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListLeases {
    #[serde(default)]
    pub resource: Option<String>,
    /// An instance id.
    #[serde(default)]
    pub holder: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn the_table_is_well_formed() {
        let mut names = HashSet::new();
        for t in table() {
            assert!(names.insert(t.name), "{} twice", t.name);
            assert!(
                t.name.chars().all(|c| c.is_ascii_lowercase() || c == '_'),
                "{}",
                t.name
            );
            assert!(t.description.len() > 20, "{} needs a description", t.name);
            assert_eq!(t.input_schema()["type"], "object", "{}", t.name);
            // Strict arguments: a misspelt `fence` must not be silently dropped.
            assert_eq!(
                t.input_schema().get("additionalProperties"),
                Some(&Value::Bool(false)),
                "{}",
                t.name
            );
        }
        for required in [
            "whoami",
            "list_instances",
            "get_primary",
            "campaign_primary",
            "get_state",
            "set_state",
            "publish",
            "read_events",
            "send_message",
            "read_inbox",
            "ack_message",
            "submit_task",
            "claim_task",
            "heartbeat_task",
            "complete_task",
            "fail_task",
            "remember",
            "recall",
            "forget",
            "dispatch",
            "report_observation",
            "breaker_status",
            "request_probe",
            "acquire_lease",
            "renew_lease",
            "release_lease",
            "list_leases",
        ] {
            assert!(find(required).is_some(), "{required} is missing");
        }
    }

    #[test]
    fn bad_arguments_name_the_argument() {
        let set_state = find("set_state").unwrap();
        let err = set_state
            .prepare(json!({"key": "a", "value": 1, "fence": "x"}))
            .err()
            .unwrap();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.details["field"], "fence");
        assert!(err.message.contains("`fence`"), "{}", err.message);

        let err = set_state.prepare(json!({"value": 1})).err().unwrap();
        assert_eq!(err.details["field"], "key");

        let err = set_state
            .prepare(json!({"key": "a", "value": 1, "fenc": 3}))
            .err()
            .unwrap();
        assert_eq!(err.details["field"], "fenc");

        assert!(set_state.prepare(json!({"key": "a", "value": 1})).is_ok());
        assert!(find("whoami").unwrap().prepare(json!({})).is_ok());
    }

    #[test]
    fn pass_through_bodies_keep_the_rest_field_names() {
        let a: ClaimTask = parse_args(json!({"queues": ["q"], "wait_ms": 5})).unwrap();
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"queues": ["q"], "wait_ms": 5})
        );
        let a: SubmitTask = parse_args(json!({"queue": "q", "payload": {"x": 1}})).unwrap();
        assert_eq!(
            serde_json::to_value(&a).unwrap(),
            json!({"queue": "q", "payload": {"x": 1}})
        );
    }
}

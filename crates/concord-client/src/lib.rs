//! Typed client for the Concord HTTP API, used by the CLI, the MCP bridge and tests.
//!
//! It takes a list of hub URLs (replicas of one cluster) and fails over between
//! them when a hub cannot be reached; an answer from a hub, even an error, is final.
//! Errors come back as [`concord_core::Error`] with the hub's code, so callers match
//! on `ErrorCode::Fenced` rather than on status numbers. A hub that cannot be
//! reached at all is `ErrorCode::Unavailable` with a message saying so.
//!
//! With a [`Spool`] attached ([`Client::with_spool`]) the client runs in degraded
//! mode when no hub answers: writes that are safe to replay (memory writes to
//! shared spaces or the caller's own instance space, events, observations,
//! enqueues) are kept on disk and sent again in order, each exactly once, when a
//! hub answers; see [`spool`].

mod coordination;
mod memory;
pub mod spool;
mod tasks;
pub use memory::memory;
pub use spool::record::SpoolKind;
pub use spool::{ReplayReport, Spool, SpoolStatus};

use concord_core::api::*;
use concord_core::{Error, ErrorCode, Result};
/// The method type of [`Client::call`], so callers of the generic call need no
/// reqwest dependency of their own.
pub use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a write waits for its answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    urls: Arc<Vec<String>>,
    /// `urls` parsed once (`None` where one does not parse: its requests then
    /// fail with the parser's message). Every request used to parse its whole
    /// URL, host and IDNA processing included: a tenth of a load generator's
    /// CPU at a few thousand calls a second.
    bases: Arc<Vec<Option<reqwest::Url>>>,
    /// Index of the hub that answered last; tried first next time.
    current: Arc<AtomicUsize>,
    token: Option<String>,
    /// The instance the token is a session of, when the caller said so
    /// ([`Client::for_instance`]): its own `instance:` space is spoolable.
    instance: Option<Arc<str>>,
    /// Degraded mode: where spoolable writes wait while no hub answers. Shared by
    /// clones and kept by [`Client::with_token`], so a re-registered session
    /// replays what the earlier one spooled.
    spool: Option<Arc<Spool>>,
}

/// True if `e` is the answer to a write that was spooled for later delivery
/// (`unavailable` with `details.spooled`): not lost, not yet applied.
pub fn spooled(e: &Error) -> bool {
    e.code == ErrorCode::Unavailable && e.details.get("spooled") == Some(&Value::Bool(true))
}

/// Percent-encodes one path segment (an id or a name) for [`Client::call`].
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Client {
    /// `urls`: one or more hub base URLs (`http://127.0.0.1:7717`).
    pub fn new(urls: Vec<String>, token: Option<String>) -> Result<Client> {
        if urls.is_empty() {
            return Err(Error::bad_request("no hub URL given"));
        }
        // The hub never redirects; following one would only cost every call a
        // redirect layer (and could carry the caller to another host).
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(64)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::internal(format!("http client: {e}")))?;
        let urls: Vec<String> = urls
            .into_iter()
            .map(|u| u.trim_end_matches('/').to_string())
            .collect();
        let bases = urls.iter().map(|u| reqwest::Url::parse(u).ok()).collect();
        Ok(Client {
            http,
            urls: Arc::new(urls),
            bases: Arc::new(bases),
            current: Arc::new(AtomicUsize::new(0)),
            token,
            instance: None,
            spool: None,
        })
    }

    /// The same hubs with another credential (e.g. an instance's session token).
    /// The spool stays; the instance is forgotten until [`Client::for_instance`].
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client {
            token: Some(token.into()),
            instance: None,
            ..self.clone()
        }
    }

    /// Says which instance the token is a session of.
    pub fn for_instance(&self, instance: impl Into<String>) -> Client {
        Client {
            instance: Some(Arc::from(instance.into())),
            ..self.clone()
        }
    }

    pub fn instance(&self) -> Option<&str> {
        self.instance.as_deref()
    }

    /// Degraded mode: spoolable writes that find no hub wait in `spool`.
    pub fn with_spool(&self, spool: Arc<Spool>) -> Client {
        Client {
            spool: Some(spool),
            ..self.clone()
        }
    }

    pub fn spool(&self) -> Option<&Arc<Spool>> {
        self.spool.as_ref()
    }

    /// Pending count, age of the oldest, rejected count; `None` without a spool.
    pub async fn spool_status(&self) -> Option<SpoolStatus> {
        match &self.spool {
            Some(s) => Some(s.status().await),
            None => None,
        }
    }

    /// Sends what the spool holds, in order, with this client's credentials, until
    /// it is empty or the hub cannot take a write now (then `stopped` says why).
    /// Spoolable writes do this by themselves before going out; a process calls it
    /// when it learns that the hub answers again (after a heartbeat, say).
    pub async fn replay_spool(&self) -> ReplayReport {
        match &self.spool {
            Some(s) => s.replay(self).await,
            None => ReplayReport::default(),
        }
    }

    /// A write that may be spooled: `body` is the JSON body of `kind`'s route.
    /// Without a spool, or for a write that is not spoolable (see
    /// [`spool::record::spoolable`]), it is an ordinary call. With one, every item
    /// gets an idempotency key first (the caller's, or a fresh ULID), the write
    /// waits behind anything already spooled, and if no hub takes it, it is
    /// spooled: the answer is then an `unavailable` error for which [`spooled`]
    /// is true.
    pub async fn write(&self, kind: SpoolKind, mut body: Value) -> Result<Value> {
        let Some(spool) = &self.spool else {
            return self.send_write(kind, &body).await;
        };
        if let Err(why) = spool::record::spoolable(kind, &body, self.instance()) {
            return self
                .send_write(kind, &body)
                .await
                .map_err(|e| not_spooled(e, &why));
        }
        spool::record::ensure_keys(kind, &mut body, || format!("spool_{}", ulid::Ulid::new()));
        spool.write(self, kind, body).await
    }

    /// [`Client::write`] with typed bodies. Without a spool the body and the
    /// answer go straight between their types and the wire, not through a
    /// `Value` each.
    async fn write_typed<B: Serialize, T: DeserializeOwned>(
        &self,
        kind: SpoolKind,
        body: &B,
    ) -> Result<T> {
        if self.spool.is_none() {
            return self
                .send(Method::POST, kind.path(), Some(body), WRITE_TIMEOUT)
                .await;
        }
        let body = serde_json::to_value(body)
            .map_err(|e| Error::internal(format!("encoding the request: {e}")))?;
        let answer = self.write(kind, body).await?;
        serde_json::from_value(answer)
            .map_err(|e| Error::internal(format!("cannot decode the hub's answer: {e}")))
    }

    /// The write itself, never spooled (the spool's replay sends with this).
    pub(crate) async fn send_write(&self, kind: SpoolKind, body: &Value) -> Result<Value> {
        self.send(Method::POST, kind.path(), Some(body), WRITE_TIMEOUT)
            .await
    }

    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Hub `idx`'s URL for `path` (which may carry a query): its parsed base
    /// with the path and query set, so only they are parsed per call.
    fn url(&self, idx: usize, path: &str) -> std::result::Result<reqwest::Url, String> {
        let Some(base) = &self.bases[idx] else {
            let full = format!("{}{}", self.urls[idx], path);
            return reqwest::Url::parse(&full).map_err(|e| format!("{full}: {e}"));
        };
        let (p, q) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let mut url = base.clone();
        let prefix = base.path().trim_end_matches('/');
        if prefix.is_empty() {
            url.set_path(p);
        } else {
            url.set_path(&format!("{prefix}{p}"));
        }
        url.set_query(q);
        Ok(url)
    }

    /// Sends a request, failing over to the next hub when one cannot be reached
    /// (see [`Client::call_timeout`]).
    pub async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        self.call_timeout(method, path, body, Duration::from_secs(60))
            .await
    }

    /// Sends a request to the hub that answered last, then to the others in
    /// turn when a hub cannot be reached. With a spool attached, an `unavailable`
    /// answer says that this request was not spooled (only [`Client::write`]
    /// spools).
    pub async fn call_timeout<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T> {
        let answer = self.send(method.clone(), path, body, timeout).await;
        if self.spool.is_none() {
            return answer;
        }
        answer.map_err(|e| {
            if method == Method::GET {
                not_spooled(e, "reads are answered by a hub only")
            } else {
                not_spooled(
                    e,
                    "only memory writes to shared or the caller's own instance space, events, \
                     observations and enqueues are kept for replay",
                )
            }
        })
    }

    /// Sends a request to the hub that answered last, then to the others in
    /// turn when a hub cannot be reached.
    ///
    /// Which failures move on to the next hub depends on whether the request may
    /// have been carried out: a refused connection never reached a hub, so any
    /// request moves on; a connection that broke after the request went out (a
    /// hub killed mid-request, a pooled keep-alive connection to a hub that has
    /// died) may have been served, so only idempotent methods (GET, PUT, DELETE)
    /// move on, and a POST answers `unavailable` for its caller to decide.
    async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let idempotent = matches!(
            method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
        );
        let mut tried = Vec::new();
        // The URL as errors name it, built only for an error.
        let shown = |idx: usize| format!("{}{path}", self.urls[idx]);
        for k in 0..n {
            let idx = (start + k) % n;
            let url = match self.url(idx, path) {
                Ok(url) => url,
                Err(e) => {
                    tried.push(e);
                    continue;
                }
            };
            let mut req = self.http.request(method.clone(), url).timeout(timeout);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return decode(resp).await;
                }
                Err(e) if e.is_connect() || idempotent => {
                    tried.push(format!("{}: {}", shown(idx), error_chain(&e)));
                    continue;
                }
                Err(e) => {
                    return Err(Error::unavailable(format!(
                    "hub unreachable: {}: {} (the request may or may not have been carried out)",
                    shown(idx),
                    error_chain(&e)
                )));
                }
            }
        }
        Err(Error::unavailable(format!(
            "hub unreachable: {}",
            if tried.is_empty() {
                "no hub answered".to_string()
            } else {
                tried.join("; ")
            }
        )))
    }

    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }
    pub(crate) async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    // ----- tokens -----
    pub async fn create_token(&self, req: &CreateTokenRequest) -> Result<CreatedToken> {
        self.post("/v1/tokens", req).await
    }
    pub async fn list_tokens(&self) -> Result<TokenList> {
        self.get("/v1/tokens").await
    }
    pub async fn revoke_token(&self, id: &str) -> Result<Deleted> {
        self.call::<(), _>(Method::DELETE, &format!("/v1/tokens/{}", pct(id)), None)
            .await
    }

    // ----- instances -----
    pub async fn register(&self, req: &RegisterInstanceRequest) -> Result<Registered> {
        self.post("/v1/instances", req).await
    }
    pub async fn heartbeat(&self, id: &str) -> Result<HeartbeatResponse> {
        self.post(
            &format!("/v1/instances/{}/heartbeat", pct(id)),
            &serde_json::json!({}),
        )
        .await
    }
    pub async fn list_instances(
        &self,
        entity: Option<&str>,
        role: Option<Role>,
        state: Option<&str>,
    ) -> Result<InstanceList> {
        let mut q = Vec::new();
        if let Some(e) = entity {
            q.push(format!("entity={}", pct(e)));
        }
        if let Some(r) = role {
            q.push(format!("role={}", r.as_str()));
        }
        if let Some(s) = state {
            q.push(format!("state={}", pct(s)));
        }
        let qs = if q.is_empty() {
            String::new()
        } else {
            format!("?{}", q.join("&"))
        };
        self.get(&format!("/v1/instances{qs}")).await
    }
    pub async fn get_instance(&self, id: &str) -> Result<Instance> {
        self.get::<InstanceEnvelope>(&format!("/v1/instances/{}", pct(id)))
            .await
            .map(|e| e.instance)
    }
    pub async fn patch_instance(&self, id: &str, req: &PatchInstanceRequest) -> Result<Instance> {
        self.call::<_, InstanceEnvelope>(
            Method::PATCH,
            &format!("/v1/instances/{}", pct(id)),
            Some(req),
        )
        .await
        .map(|e| e.instance)
    }
    pub async fn close_instance(&self, id: &str) -> Result<Instance> {
        self.call::<(), InstanceEnvelope>(
            Method::DELETE,
            &format!("/v1/instances/{}", pct(id)),
            None,
        )
        .await
        .map(|e| e.instance)
    }
    pub async fn ghosts(&self) -> Result<GhostList> {
        self.get("/v1/ghosts").await
    }

    // ----- entities -----
    pub async fn entities(&self) -> Result<EntityList> {
        self.get("/v1/entities").await
    }
    pub async fn entity(&self, name: &str) -> Result<EntityDetail> {
        self.get(&format!("/v1/entities/{}", pct(name))).await
    }
    pub async fn campaign(
        &self,
        entity: &str,
        instance: &str,
        wait_ms: Option<u64>,
    ) -> Result<PrimaryGrant> {
        let req = CampaignRequest {
            instance: instance.into(),
            wait_ms,
        };
        let timeout = Duration::from_millis(wait_ms.unwrap_or(0) + 30_000);
        self.call_timeout(
            Method::POST,
            &format!("/v1/entities/{}/primary", pct(entity)),
            Some(&req),
            timeout,
        )
        .await
    }
    pub async fn resign(&self, entity: &str) -> Result<Resigned> {
        self.post(
            &format!("/v1/entities/{}/primary/resign", pct(entity)),
            &serde_json::json!({}),
        )
        .await
    }
    pub async fn transfer(&self, entity: &str, to: &str) -> Result<PrimaryGrant> {
        self.post(
            &format!("/v1/entities/{}/primary/transfer", pct(entity)),
            &TransferRequest { to: to.into() },
        )
        .await
    }
    /// `target` is `entity` or `entity:version`.
    pub async fn route(&self, target: &str) -> Result<Instance> {
        self.get::<RouteResponse>(&format!("/v1/route/{}", pct(target)))
            .await
            .map(|r| r.instance)
    }

    // ----- state -----
    fn state_path(entity: &str, key: &str) -> String {
        let key: Vec<String> = key.split('/').map(pct).collect();
        format!("/v1/entities/{}/state/{}", pct(entity), key.join("/"))
    }
    pub async fn put_state(
        &self,
        entity: &str,
        key: &str,
        value: Value,
        fence: Option<u64>,
        if_revision: Option<i64>,
    ) -> Result<StateEntry> {
        let req = PutStateRequest {
            value,
            fence,
            if_revision,
        };
        self.call(Method::PUT, &Self::state_path(entity, key), Some(&req))
            .await
    }
    pub async fn get_state(&self, entity: &str, key: &str) -> Result<StateEntry> {
        self.get(&Self::state_path(entity, key)).await
    }
    pub async fn list_state(&self, entity: &str) -> Result<StateList> {
        self.get(&format!("/v1/entities/{}/state", pct(entity)))
            .await
    }
    pub async fn delete_state(
        &self,
        entity: &str,
        key: &str,
        fence: Option<u64>,
    ) -> Result<Deleted> {
        let q = fence.map(|f| format!("?fence={f}")).unwrap_or_default();
        self.call::<(), _>(
            Method::DELETE,
            &format!("{}{q}", Self::state_path(entity, key)),
            None,
        )
        .await
    }

    // ----- events and messages -----
    /// Publishes an event (spooled in degraded mode, see [`Client::write`]).
    pub async fn publish(&self, topic: &str, data: Value) -> Result<Published> {
        self.publish_with(&PublishRequest {
            topic: topic.into(),
            data,
            idempotency_key: None,
        })
        .await
    }
    /// Publishes with every field of the request (an idempotency key…).
    pub async fn publish_with(&self, req: &PublishRequest) -> Result<Published> {
        self.write_typed(SpoolKind::Event, req).await
    }
    /// Long-poll read: `topics` comma-separated patterns.
    pub async fn read_events(
        &self,
        topics: &str,
        from: Option<i64>,
        limit: usize,
        wait_ms: u64,
    ) -> Result<EventsPage> {
        let mut q = format!(
            "/v1/events?topics={}&limit={limit}&wait_ms={wait_ms}",
            pct(topics)
        );
        if let Some(f) = from {
            q.push_str(&format!("&from={f}"));
        }
        self.call_timeout::<(), _>(
            Method::GET,
            &q,
            None,
            Duration::from_millis(wait_ms + 30_000),
        )
        .await
    }
    /// Opens an SSE stream; read it with [`EventStream::next`].
    pub async fn stream_events(
        &self,
        topics: &str,
        from: Option<i64>,
        last_event_id: Option<i64>,
    ) -> Result<EventStream> {
        let n = self.urls.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last_err = String::from("no hub answered");
        for k in 0..n {
            let idx = (start + k) % n;
            let mut url = format!("{}/v1/events/stream?topics={}", self.urls[idx], pct(topics));
            if let Some(f) = from {
                url.push_str(&format!("&from={f}"));
            }
            let mut req = self.http.get(&url);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            if let Some(id) = last_event_id {
                req = req.header("last-event-id", id.to_string());
            }
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(EventStream::new(resp));
                }
                Ok(resp) => {
                    return decode::<Value>(resp)
                        .await
                        .and(Err(Error::internal("stream refused")))
                }
                Err(e) => last_err = format!("{url}: {}", error_chain(&e)),
            }
        }
        Err(Error::unavailable(format!("hub unreachable: {last_err}")))
    }
    pub async fn send_message(&self, req: &SendMessageRequest) -> Result<SentMessage> {
        self.post("/v1/messages", req).await
    }
    pub async fn inbox(
        &self,
        after: i64,
        limit: usize,
        wait_ms: u64,
        unacked_only: bool,
    ) -> Result<InboxPage> {
        let q = format!(
            "/v1/inbox?after={after}&limit={limit}&wait_ms={wait_ms}&unacked_only={unacked_only}"
        );
        self.call_timeout::<(), _>(
            Method::GET,
            &q,
            None,
            Duration::from_millis(wait_ms + 30_000),
        )
        .await
    }
    pub async fn ack(&self, message: &str) -> Result<Acked> {
        self.post(
            &format!("/v1/inbox/{}/ack", pct(message)),
            &serde_json::json!({}),
        )
        .await
    }

    // ----- system -----
    pub async fn status(&self) -> Result<HubStatus> {
        self.get("/v1/status").await
    }
    pub async fn whoami(&self) -> Result<WhoAmI> {
        self.get("/v1/whoami").await
    }
    pub async fn healthz(&self) -> Result<Value> {
        self.get("/healthz").await
    }
}

/// An error with its causes: reqwest's own message ("error sending request")
/// does not say whether the connection was refused, reset or timed out.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// An `unavailable` error of a client in degraded mode that did not spool the
/// request: says so, and why, so nobody waits for a replay that will not come.
fn not_spooled(e: Error, why: &str) -> Error {
    if e.code != ErrorCode::Unavailable || e.details.get("spooled").is_some() {
        return e;
    }
    let mut details = match e.details {
        Value::Object(m) => Value::Object(m),
        _ => serde_json::json!({}),
    };
    details["spooled"] = Value::Bool(false);
    Error::new(
        ErrorCode::Unavailable,
        format!("{}; not spooled: {why}", e.message),
    )
    .with_details(details)
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T> {
    let status = resp.status();
    let bytes = resp.bytes().await.map_err(|e| {
        Error::unavailable(format!("hub connection lost while reading the answer: {e}"))
    })?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            Error::internal(format!("cannot decode the hub's answer ({status}): {e}"))
        });
    }
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Err(Error::from_body(&body).unwrap_or_else(|| {
        let code = match status.as_u16() {
            401 => ErrorCode::Unauthorized,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::RateLimited,
            503 => ErrorCode::Unavailable,
            s if s < 500 => ErrorCode::BadRequest,
            _ => ErrorCode::Internal,
        };
        Error::new(
            code,
            format!("hub answered {status}: {}", String::from_utf8_lossy(&bytes)),
        )
    }))
}

/// One item of an SSE stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Event(Event),
    /// The hub ended the stream with an error event (`cursor_expired`, …).
    Error(Error),
}

/// An open `GET /v1/events/stream`, parsed frame by frame.
pub struct EventStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// Where the unread part of `buf` begins. Frames are consumed by moving this,
    /// and the buffer is compacted only when more bytes arrive, so a chunk holding
    /// hundreds of frames is not shifted once per frame.
    read: usize,
}

impl EventStream {
    fn new(resp: reqwest::Response) -> EventStream {
        EventStream {
            resp,
            buf: Vec::new(),
            read: 0,
        }
    }

    /// The next event; `None` when the hub closed the stream.
    pub async fn next(&mut self) -> Result<Option<StreamItem>> {
        loop {
            let unread = &self.buf[self.read..];
            if let Some(pos) = memchr::memmem::find(unread, b"\n\n") {
                let frame = &unread[..pos];
                self.read += pos + 2;
                let text = match std::str::from_utf8(frame) {
                    Ok(t) => std::borrow::Cow::Borrowed(t),
                    Err(_) => String::from_utf8_lossy(frame),
                };
                let mut event = None;
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Ok(Some(match event.as_deref() {
                    Some("cursor_expired") | Some("error") => {
                        let value: Value = serde_json::from_str(&data).map_err(|e| {
                            Error::internal(format!("bad event data from the hub: {e}"))
                        })?;
                        StreamItem::Error(
                            Error::from_body(&value)
                                .unwrap_or_else(|| Error::internal("stream error")),
                        )
                    }
                    _ => StreamItem::Event(
                        serde_json::from_str(&data)
                            .map_err(|e| Error::internal(format!("bad event: {e}")))?,
                    ),
                }));
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => {
                    self.buf.drain(..self.read);
                    self.read = 0;
                    self.buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(None),
                Err(e) => return Err(Error::unavailable(format!("event stream broke: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url_of(base: &str, path: &str) -> String {
        let c = Client::new(vec![base.to_string()], None).unwrap();
        match c.url(0, path) {
            Ok(u) => u.to_string(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn request_urls_join_the_base_the_path_and_the_query() {
        assert_eq!(
            url_of("http://127.0.0.1:7717", "/v1/tasks/claim"),
            "http://127.0.0.1:7717/v1/tasks/claim"
        );
        assert_eq!(
            url_of("http://127.0.0.1:7717/", "/v1/events?after=3&limit=10"),
            "http://127.0.0.1:7717/v1/events?after=3&limit=10"
        );
        // A hub behind a proxy under a prefix keeps it.
        assert_eq!(
            url_of("https://proxy.example/concord/", "/v1/tasks/a%2Fb/complete"),
            "https://proxy.example/concord/v1/tasks/a%2Fb/complete"
        );
        assert_eq!(
            url_of("http://h:1", &format!("/v1/memory/{}", pct("a b/c"))),
            "http://h:1/v1/memory/a%20b%2Fc"
        );
        assert!(url_of("not a url", "/v1/tasks").starts_with("error: not a url/v1/tasks"));
    }
}

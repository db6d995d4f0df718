//! Concord's MCP tool set: one [`ServerHandler`] whose tools act as one registered
//! instance, through a [`concord_client::Client`] carrying that instance's session
//! token.
//!
//! Two transports serve it: the stdio bridge (`concord mcp`, which registers and
//! heartbeats the instance itself) and the hub's `/mcp` route (Streamable HTTP,
//! where the caller's bearer token names the instance). Each says who the tools act
//! as through an [`Agent`]; everything else is shared. Every tool is a call to the
//! hub's own HTTP API, so MCP gets exactly the validation, authorization and fencing
//! of REST and cannot drift from it.
//!
//! Tools live in one table ([`tools::table`]); resources in `resources.rs`. Hub
//! errors come back as tool results with `isError` and the hub's code, so a model
//! reads "fenced: …" and can react, where a protocol error would be shown to it as
//! an opaque failure.

mod resources;
pub mod tools;

use async_trait::async_trait;
use concord_client::Client;
use concord_core::api::HeartbeatResponse;
use concord_core::{Error, ErrorCode, Result};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    ReadResourceRequestParams, ReadResourceResponse, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};
use std::sync::Arc;

pub use tools::{ToolDef, ToolKind};

/// Who the tools act as. The stdio bridge owns a registration it keeps alive and
/// renews; the HTTP route reads the instance from the request's bearer token.
#[async_trait]
pub trait Agent: Send + Sync + 'static {
    /// The instance to act as for this request, or why there is none right now
    /// (`unavailable` while the hub cannot be reached, `unauthorized`, …).
    async fn session(&self, request: &RequestContext<RoleServer>) -> Result<Session>;

    /// A fresh heartbeat answer seen by a tool: the instance's current role and fence.
    fn observed(&self, _instance: &str, _beat: &HeartbeatResponse) {}

    /// A hub error a tool ran into. The bridge uses it to notice at once that the
    /// hub forgot its instance. Returns a hint appended to the tool error.
    fn failed(&self, _error: &Error) -> Option<String> {
        None
    }

    /// Transport facts merged into `whoami` (transport, hub URLs, earlier instance ids).
    fn describe(&self) -> Value {
        Value::Null
    }

    /// The instance's role as last seen, for tools that need it while the hub
    /// cannot be asked (the default space of a spooled `remember`).
    fn last_role(&self) -> Option<concord_core::api::Role> {
        None
    }
}

/// One instance the tools act as: its id, entity, and a client with its session token.
#[derive(Clone)]
pub struct Session {
    pub client: Client,
    pub instance: String,
    pub entity: String,
}

/// What a tool gets: the session and the agent behind it.
#[derive(Clone)]
pub struct Ctx {
    pub session: Session,
    agent: Arc<dyn Agent>,
}

impl Ctx {
    pub fn client(&self) -> &Client {
        &self.session.client
    }

    pub fn instance(&self) -> &str {
        &self.session.instance
    }

    pub fn entity(&self) -> &str {
        &self.session.entity
    }

    pub fn agent(&self) -> &dyn Agent {
        self.agent.as_ref()
    }

    /// Heartbeats now: the answer is the instance's role and fence at this moment,
    /// and it tells the agent (the bridge caches it).
    pub async fn beat(&self) -> Result<HeartbeatResponse> {
        let beat = self.client().heartbeat(self.instance()).await?;
        self.agent.observed(self.instance(), &beat);
        Ok(beat)
    }

    /// The fence to send: the caller's if given, else this instance's current one
    /// (none unless it is the primary, and then the hub says why the write is refused).
    pub async fn fence(&self, given: Option<u64>) -> Result<Option<u64>> {
        match given {
            Some(f) => Ok(Some(f)),
            None => Ok(self.beat().await?.fence),
        }
    }

    /// `entity` and `instance` are shorthands for this instance's own spaces.
    pub fn space(&self, space: &str) -> String {
        match space {
            "entity" => format!("entity:{}", self.entity()),
            "instance" => format!("instance:{}", self.instance()),
            other => other.to_string(),
        }
    }
}

/// The MCP server: the tool table and resources over an [`Agent`].
#[derive(Clone)]
pub struct ConcordMcp {
    agent: Arc<dyn Agent>,
}

impl ConcordMcp {
    pub fn new(agent: Arc<dyn Agent>) -> ConcordMcp {
        ConcordMcp { agent }
    }

    async fn ctx(&self, request: &RequestContext<RoleServer>) -> Result<Ctx> {
        let session = self.agent.session(request).await?;
        Ok(Ctx {
            session,
            agent: self.agent.clone(),
        })
    }

    /// A hub error as the model should see it: the code first, then the hub's
    /// message, details and any hint from the transport.
    fn error_text(&self, e: &Error) -> String {
        let mut text = format!("{}: {}", e.code.as_str(), e.message);
        if !e.details.is_null() {
            text.push_str(&format!(" (details: {})", e.details));
        }
        if e.code == ErrorCode::NotFound && e.message == "no such route" {
            text.push_str(" (this hub does not offer that API yet)");
        }
        if let Some(hint) = self.agent.failed(e) {
            text.push_str(&format!(" ({hint})"));
        }
        text
    }

    fn tool_error(&self, e: &Error) -> CallToolResult {
        let text = self.error_text(e);
        let mut result = CallToolResult::structured_error(e.to_body());
        result.content = vec![ContentBlock::text(text)];
        result
    }
}

const INSTRUCTIONS: &str = "Concord coordination hub. Every tool acts as your registered \
instance of an entity (an agent identity). Call whoami first: it says your instance id, \
entity, whether you are the primary and your fence. Only the entity's primary writes its \
production state (set_state) and canonical memory (remember in the entity space); its \
fence is filled in for you. Messages to you arrive in read_inbox; work arrives through \
claim_task, and you finish it with complete_task or fail_task using the claim you were \
given. Failures come back as tool errors starting with the hub's error code (fenced, \
stale_claim, forbidden, not_found, unavailable...).";

impl ServerHandler for ConcordMcp {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_instructions(INSTRUCTIONS);
        info.server_info = Implementation::new("concord", env!("CARGO_PKG_VERSION"))
            .with_title("Concord coordination hub");
        info
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> std::result::Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(
            tools::table().iter().map(ToolDef::tool).collect(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        tools::find(name).map(ToolDef::tool)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> std::result::Result<CallToolResponse, ErrorData> {
        let Some(def) = tools::find(&request.name) else {
            return Err(ErrorData::invalid_params(
                format!("unknown tool {:?}", request.name),
                None,
            ));
        };
        let args = Value::Object(request.arguments.unwrap_or_default());
        // Arguments are checked before the session is resolved, so a bad call says
        // what is wrong with it even while the hub is away.
        let call = match def.prepare(args) {
            Ok(call) => call,
            Err(e) => return Ok(self.tool_error(&e).into()),
        };
        let result = match self.ctx(&context).await {
            Ok(ctx) => call(ctx).await,
            Err(e) => Err(e),
        };
        Ok(match result {
            // Degraded mode: the write waits in the spool and will be delivered;
            // for the model that is a result to note, not a failure to handle.
            Err(e) if concord_client::spooled(&e) => CallToolResult::structured(json!({
                "spooled": true,
                "message": "hub unreachable; spooled, will be delivered when it returns",
                "pending": e.details["pending"],
                "idempotency_keys": e.details["idempotency_keys"],
            })),
            Ok(value) => {
                // structuredContent must be an object.
                let value = match value {
                    Value::Object(_) => value,
                    other => json!({ "result": other }),
                };
                CallToolResult::structured(value)
            }
            Err(e) => self.tool_error(&e),
        }
        .into())
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> std::result::Result<ListResourcesResult, ErrorData> {
        Ok(ListResourcesResult::with_all_items(resources::fixed()))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> std::result::Result<ListResourceTemplatesResult, ErrorData> {
        Ok(ListResourceTemplatesResult::with_all_items(
            resources::templates(),
        ))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> std::result::Result<ReadResourceResponse, ErrorData> {
        let target = resources::parse(&request.uri)?;
        let ctx = self
            .ctx(&context)
            .await
            .map_err(|e| resources::to_mcp(&e, self.error_text(&e)))?;
        match resources::read(&ctx, &request.uri, target).await {
            Ok(r) => Ok(r.into()),
            Err(e) => Err(resources::to_mcp(&e, self.error_text(&e))),
        }
    }
}

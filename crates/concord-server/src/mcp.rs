//! `/mcp`: the MCP tool set over Streamable HTTP, for MCP clients that connect to a
//! URL instead of launching `concord mcp`.
//!
//! The caller's bearer token must be an instance's session token: the tools act as
//! that instance. The gate below authenticates it exactly like a REST route (401,
//! rate limit, 403 for other kinds of token) before the MCP SDK sees the request.
//! Each tool then calls this hub's own HTTP API on its listen address with the
//! caller's token, so a tool gets the same validation, authorization and fencing as
//! the REST route it wraps, and nothing in MCP can bypass them.
//!
//! The transport is stateless (no `Mcp-Session-Id`): every request is served on its
//! own, by whichever replica receives it, and nothing is kept between requests that
//! a bad or vanished client could leak. Every tool call over `/mcp` also heartbeats
//! the instance (answered from memory), so an MCP client that uses its tools stays
//! live without a heartbeat loop of its own.

use crate::error::ApiError;
use crate::extract::Caller;
use crate::AppState;
use async_trait::async_trait;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use concord_core::authz::Principal;
use concord_core::token::TokenKind;
use concord_core::{Error, Result};
use concord_mcp::{Agent, ConcordMcp, Session};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::RoleServer;
use serde_json::{json, Value};
use std::sync::Arc;

/// `Host` values `/mcp` accepts when nothing else is configured: loopback only, the
/// SDK's guard against DNS rebinding. A hub reached by name or from other hosts
/// lists those deliberately (`concord serve --mcp-allowed-hosts`).
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1"];
/// Browser origins accepted by default (any port): a page elsewhere cannot drive it.
pub const DEFAULT_ALLOWED_ORIGINS: &[&str] =
    &["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"];

fn config(state: &AppState) -> StreamableHttpServerConfig {
    let c = &state.config;
    let mut config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_max_request_body_bytes(c.max_body_bytes);
    config = if c.mcp_allowed_hosts.iter().any(|h| h == "*") {
        config.disable_allowed_hosts()
    } else {
        config.with_allowed_hosts(c.mcp_allowed_hosts.clone())
    };
    if c.mcp_allowed_origins.iter().any(|o| o == "*") {
        config.disable_allowed_origins()
    } else {
        config
            .with_allowed_origins(c.mcp_allowed_origins.clone())
            .enforce_origin_validation()
    }
}

pub(crate) fn routes(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let agent: Arc<dyn Agent> = Arc::new(HttpAgent {
        state: state.clone(),
    });
    let service = StreamableHttpService::new(
        move || Ok(ConcordMcp::new(agent.clone())),
        Arc::new(NeverSessionManager::default()),
        config(&state),
    );
    Router::new()
        .route_service("/mcp", service)
        .route_layer(axum::middleware::from_fn_with_state(state, gate))
}

/// Authenticates like every /v1 route and admits only instance sessions; the
/// principal rides along in the request's extensions for [`HttpAgent`].
async fn gate(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let principal = match Caller::from_request_parts(&mut parts, &state).await {
        Ok(Caller(p)) => p,
        Err(e) => return e.into_response(),
    };
    if principal.kind != TokenKind::Session || principal.instance.is_none() {
        return ApiError(Error::forbidden(format!(
            "/mcp acts as one instance: use an instance's session token (the session_token \
             of POST /v1/instances), not a {} token; or run `concord mcp`, which registers one",
            principal.kind.as_str()
        )))
        .into_response();
    }
    parts.extensions.insert(principal);
    next.run(Request::from_parts(parts, body)).await
}

/// The instance of the request's session token, acting through the hub's own API.
struct HttpAgent {
    state: Arc<AppState>,
}

fn bearer(parts: &Parts) -> Option<&str> {
    let h = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
}

#[async_trait]
impl Agent for HttpAgent {
    async fn session(&self, request: &RequestContext<RoleServer>) -> Result<Session> {
        let parts = request
            .extensions
            .get::<Parts>()
            .ok_or_else(|| Error::internal("MCP request without its HTTP request"))?;
        let (Some(principal), Some(token)) = (parts.extensions.get::<Principal>(), bearer(parts))
        else {
            return Err(Error::unauthorized("missing bearer token"));
        };
        let (Some(instance), Some(entity)) = (&principal.instance, &principal.entity) else {
            return Err(Error::forbidden("/mcp needs an instance's session token"));
        };
        let base = self.state.self_client.get().ok_or_else(|| {
            Error::unavailable("the hub is still starting: its listen address is not known yet")
        })?;
        let client = base.with_token(token);
        // Using the tools is presence: an expired instance's tools still get the
        // hub's own answer (unknown_instance) from the call they make.
        let _ = client.heartbeat(instance).await;
        Ok(Session {
            client,
            instance: instance.clone(),
            entity: entity.clone(),
        })
    }

    fn describe(&self) -> Value {
        json!({ "transport": "streamable-http" })
    }
}

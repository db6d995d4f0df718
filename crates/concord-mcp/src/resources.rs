//! Resources: read-only views a client can attach to a conversation without a
//! tool call. Two fixed (`concord://instances`, `concord://inbox`) and two
//! templates (`concord://entity/{name}/state`, `concord://memory/{id}`).

use crate::Ctx;
use concord_client::{pct, Method};
use concord_core::{Error, ErrorCode, Result};
use rmcp::model::{ReadResourceResult, Resource, ResourceContents, ResourceTemplate};
use rmcp::ErrorData;
use serde_json::Value;

pub(crate) enum Target {
    Instances,
    Inbox,
    EntityState(String),
    Memory(String),
}

pub(crate) fn fixed() -> Vec<Resource> {
    vec![
        Resource::new("concord://instances", "instances")
            .with_title("Live instances")
            .with_description("Every live instance on the hub: entity, role, label, capabilities.")
            .with_mime_type("application/json"),
        Resource::new("concord://inbox", "inbox")
            .with_title("Your inbox")
            .with_description("Messages sent to you that you have not acknowledged.")
            .with_mime_type("application/json"),
    ]
}

pub(crate) fn templates() -> Vec<ResourceTemplate> {
    vec![
        ResourceTemplate::new("concord://entity/{name}/state", "entity-state")
            .with_title("An entity's production state")
            .with_description("Every state key of the entity, with its revision and writer.")
            .with_mime_type("application/json"),
        ResourceTemplate::new("concord://memory/{id}", "memory")
            .with_title("One memory")
            .with_description("A memory by id, with its provenance.")
            .with_mime_type("application/json"),
    ]
}

/// One path segment: non-empty, no further slash.
fn segment(s: &str) -> Option<String> {
    (!s.is_empty() && !s.contains('/')).then(|| s.to_string())
}

pub(crate) fn parse(uri: &str) -> std::result::Result<Target, ErrorData> {
    let rest = uri.strip_prefix("concord://").unwrap_or("");
    let target = match rest {
        "instances" => Some(Target::Instances),
        "inbox" => Some(Target::Inbox),
        _ => {
            if let Some(name) = rest
                .strip_prefix("entity/")
                .and_then(|r| r.strip_suffix("/state"))
            {
                segment(name).map(Target::EntityState)
            } else if let Some(id) = rest.strip_prefix("memory/") {
                segment(id).map(Target::Memory)
            } else {
                None
            }
        }
    };
    target.ok_or_else(|| {
        ErrorData::resource_not_found(
            format!(
                "no resource {uri:?}: known are concord://instances, concord://inbox, \
                 concord://entity/{{name}}/state, concord://memory/{{id}}"
            ),
            None,
        )
    })
}

pub(crate) async fn read(ctx: &Ctx, uri: &str, target: Target) -> Result<ReadResourceResult> {
    let c = ctx.client();
    let value: Value = match target {
        Target::Instances => to_value(c.list_instances(None, None, None).await?)?,
        Target::Inbox => to_value(c.inbox(0, 1000, 0, true).await?)?,
        Target::EntityState(name) => to_value(c.list_state(&name).await?)?,
        Target::Memory(id) => {
            c.call::<(), Value>(Method::GET, &format!("/v1/memories/{}", pct(&id)), None)
                .await?
        }
    };
    let text = serde_json::to_string_pretty(&value)
        .map_err(|e| Error::internal(format!("encoding the resource: {e}")))?;
    Ok(ReadResourceResult::new(vec![ResourceContents::text(
        text, uri,
    )
    .with_mime_type("application/json")]))
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value> {
    serde_json::to_value(v).map_err(|e| Error::internal(format!("encoding the resource: {e}")))
}

/// Resource reads have no `isError` result: a hub error becomes a protocol error
/// that still carries the hub's code in its data.
pub(crate) fn to_mcp(e: &Error, text: String) -> ErrorData {
    let data = Some(e.to_body());
    match e.code {
        ErrorCode::NotFound | ErrorCode::UnknownInstance => {
            ErrorData::resource_not_found(text, data)
        }
        ErrorCode::BadRequest => ErrorData::invalid_params(text, data),
        _ => ErrorData::internal_error(text, data),
    }
}

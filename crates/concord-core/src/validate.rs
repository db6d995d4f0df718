//! Input validation shared by every entry point (HTTP, MCP, CLI).
//! Each check names the field it rejects so the client can fix its request.

use crate::error::Error;
use crate::presence::{MAX_TTL_MS, MIN_TTL_MS};
use serde_json::Value;

pub const MAX_NAME_LEN: usize = 64;
pub const MAX_LABEL_LEN: usize = 200;
pub const MAX_STATE_KEY_LEN: usize = 256;
pub const MAX_CAPABILITIES: usize = 64;
pub const MAX_META_BYTES: usize = 16 * 1024;
pub const MAX_STATE_VALUE_BYTES: usize = 64 * 1024;
pub const MAX_ENDPOINT_LEN: usize = 2048;

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Entity names, capabilities, versions, hosts: `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub fn name(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::bad_field(field, "must not be empty"));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be at most {MAX_NAME_LEN} bytes"),
        ));
    }
    let first = value.chars().next().unwrap_or(' ');
    if !first.is_ascii_alphanumeric() || !value.chars().all(is_name_char) {
        return Err(Error::bad_field(
            field,
            format!("{value:?} must start with a letter or digit and contain only letters, digits, '.', '_' or '-'"),
        ));
    }
    Ok(())
}

pub fn label(field: &str, value: &str) -> Result<(), Error> {
    if value.trim().is_empty() {
        return Err(Error::bad_field(field, "must not be blank"));
    }
    if value.len() > MAX_LABEL_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be at most {MAX_LABEL_LEN} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::bad_field(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

pub fn ttl_ms(field: &str, value: i64) -> Result<(), Error> {
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&value) {
        return Err(Error::bad_field(
            field,
            format!("{value} is out of range: must be between {MIN_TTL_MS} (1 s) and {MAX_TTL_MS} (1 day)"),
        ));
    }
    Ok(())
}

pub fn capabilities(field: &str, caps: &[String]) -> Result<(), Error> {
    if caps.len() > MAX_CAPABILITIES {
        return Err(Error::bad_field(
            field,
            format!("at most {MAX_CAPABILITIES} entries"),
        ));
    }
    for (i, c) in caps.iter().enumerate() {
        name(&format!("{field}[{i}]"), c)?;
    }
    Ok(())
}

/// State keys are path-like: `config`, `status/deploy`, `pointers.current`.
pub fn state_key(field: &str, key: &str) -> Result<(), Error> {
    if key.is_empty() {
        return Err(Error::bad_field(field, "must not be empty"));
    }
    if key.len() > MAX_STATE_KEY_LEN {
        return Err(Error::bad_field(
            field,
            format!("must be at most {MAX_STATE_KEY_LEN} bytes"),
        ));
    }
    if !key.chars().all(|c| is_name_char(c) || c == '/' || c == ':') {
        return Err(Error::bad_field(
            field,
            "may contain only letters, digits, '.', '_', '-', ':' and '/'",
        ));
    }
    Ok(())
}

pub fn json_size(field: &str, value: &Value, max: usize) -> Result<(), Error> {
    let size = serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > max {
        return Err(Error::new(
            crate::ErrorCode::PayloadTooLarge,
            format!("{field}: {size} bytes is over the limit of {max}"),
        )
        .with_details(serde_json::json!({ "field": field, "limit": max })));
    }
    Ok(())
}

pub fn object(field: &str, value: &Value) -> Result<(), Error> {
    if !value.is_object() {
        return Err(Error::bad_field(field, "must be a JSON object"));
    }
    Ok(())
}

pub fn endpoint(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_ENDPOINT_LEN || value.chars().any(char::is_whitespace)
    {
        return Err(Error::bad_field(
            field,
            "must be a non-empty URL without spaces",
        ));
    }
    Ok(())
}

/// Checks a registration; returns the TTL to use.
pub fn registration(req: &crate::api::RegisterInstanceRequest) -> Result<i64, Error> {
    name("entity", &req.entity)?;
    if let Some(l) = &req.label {
        label("label", l)?;
    }
    let ttl = req.ttl_ms.unwrap_or(crate::presence::DEFAULT_TTL_MS);
    ttl_ms("ttl_ms", ttl)?;
    capabilities("capabilities", &req.capabilities)?;
    if let Some(e) = &req.endpoint {
        endpoint("endpoint", e)?;
    }
    if let Some(h) = &req.host {
        name("host", h)?;
    }
    if let Some(v) = &req.version {
        name("version", v)?;
    }
    if let Some(f) = &req.forked_from {
        if !crate::ids::has_prefix(f, crate::ids::INSTANCE) {
            return Err(Error::bad_field(
                "forked_from",
                "must be an instance id (ins_…)",
            ));
        }
    }
    object("meta", &req.meta)?;
    json_size("meta", &req.meta, MAX_META_BYTES)?;
    Ok(ttl)
}

/// Checks an instance update.
pub fn patch(req: &crate::api::PatchInstanceRequest) -> Result<(), Error> {
    if let Some(l) = &req.label {
        label("label", l)?;
    }
    if let Some(c) = &req.capabilities {
        capabilities("capabilities", c)?;
    }
    if let Some(e) = &req.endpoint {
        endpoint("endpoint", e)?;
    }
    if let Some(m) = &req.meta {
        object("meta", m)?;
        json_size("meta", m, MAX_META_BYTES)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("entity", "sisters").is_ok());
        assert!(name("entity", "anvil-2.v3_x").is_ok());
        assert!(name("entity", "").is_err());
        assert!(name("entity", "-x").is_err());
        assert!(name("entity", "a b").is_err());
        assert!(name("entity", &"a".repeat(65)).is_err());
        assert_eq!(name("entity", "").unwrap_err().details["field"], "entity");
    }

    #[test]
    fn ttls() {
        assert!(ttl_ms("ttl_ms", 999).is_err());
        assert!(ttl_ms("ttl_ms", 1_000).is_ok());
        assert!(ttl_ms("ttl_ms", 86_400_000).is_ok());
        assert!(ttl_ms("ttl_ms", 86_400_001).is_err());
    }

    #[test]
    fn labels_and_keys() {
        assert!(label("label", "test pane").is_ok());
        assert!(label("label", "  ").is_err());
        assert!(label("label", "a\nb").is_err());
        assert!(state_key("key", "status/deploy").is_ok());
        assert!(state_key("key", "a b").is_err());
    }
}

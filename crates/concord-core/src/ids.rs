//! Prefixed ULIDs (`ins_01J…`): sortable by creation time, unique without coordination
//! between hub replicas, and self-describing in logs.

pub const INSTANCE: &str = "ins";
pub const TOKEN: &str = "tok";
pub const MEMORY: &str = "mem";
pub const TASK: &str = "tsk";
pub const CLAIM: &str = "clm";
pub const MESSAGE: &str = "msg";
pub const DISPATCH: &str = "dsp";
pub const LEASE: &str = "lse";

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", ulid::Ulid::new())
}

/// True if `id` looks like `<prefix>_<26 Crockford base32 chars>`.
pub fn has_prefix(id: &str, prefix: &str) -> bool {
    id.len() == prefix.len() + 27
        && id.starts_with(prefix)
        && id.as_bytes()[prefix.len()] == b'_'
        && ulid::Ulid::from_string(&id[prefix.len() + 1..]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_prefixed_and_parse() {
        let id = new_id(INSTANCE);
        assert!(has_prefix(&id, INSTANCE));
        assert!(!has_prefix(&id, TOKEN));
        assert!(!has_prefix("ins_nope", INSTANCE));
    }
}

//! The pure half of the spool: which writes may be spooled, the record format and
//! its parsing, the replay cursor, and what a hub's refusal means for an entry.
//! No I/O here, so every rule is unit-tested on its own.

use concord_core::{Error, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The writes that are safe to replay later: each carries an idempotency key the
/// hub honours, and none depends on a fence or a claim that may be stale by then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolKind {
    /// `POST /v1/memories` to `shared:…` or the caller's own `instance:…` space.
    Memory,
    /// `POST /v1/events`.
    Event,
    /// `POST /v1/observations` (one or a batch).
    Observation,
    /// `POST /v1/tasks` (an enqueue; the key makes a replay return the same task).
    Task,
}

impl SpoolKind {
    pub fn path(self) -> &'static str {
        match self {
            SpoolKind::Memory => "/v1/memories",
            SpoolKind::Event => "/v1/events",
            SpoolKind::Observation => "/v1/observations",
            SpoolKind::Task => "/v1/tasks",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SpoolKind::Memory => "memory",
            SpoolKind::Event => "event",
            SpoolKind::Observation => "observation",
            SpoolKind::Task => "task",
        }
    }
}

/// Why a write may not wait in the spool, or `Ok` if it may.
///
/// Memory writes to `entity:…` are the canonical memory, fenced by the primary's
/// epoch: a fence that is current now may be stale at replay, and a canonical
/// write the primary believes done must not land minutes later. Another
/// instance's space is not the caller's to write. Everything else in
/// [`SpoolKind`] is spoolable.
pub fn spoolable(kind: SpoolKind, body: &Value, own_instance: Option<&str>) -> Result<(), String> {
    if kind != SpoolKind::Memory {
        return Ok(());
    }
    let space = body.get("space").and_then(Value::as_str).unwrap_or("");
    if space.starts_with("shared:") {
        return Ok(());
    }
    if let Some(id) = space.strip_prefix("instance:") {
        return match own_instance {
            Some(me) if me == id => Ok(()),
            _ => Err(format!(
                "memory writes to {space:?} are spooled only by that instance itself"
            )),
        };
    }
    Err(format!(
        "memory writes to {space:?} are not spooled: only shared:… and the caller's own \
         instance:… space are (canonical entity memory is fenced and must not land late)"
    ))
}

/// Gives every item of the write an idempotency key, minting one where the caller
/// gave none; returns the keys in item order. A key is assigned before the first
/// attempt, so a write whose reply was lost is recognized when it is sent again.
pub fn ensure_keys(
    kind: SpoolKind,
    body: &mut Value,
    mut mint: impl FnMut() -> String,
) -> Vec<String> {
    fn one(item: &mut Value, mint: &mut dyn FnMut() -> String) -> Option<String> {
        let obj = item.as_object_mut()?;
        match obj.get("idempotency_key").and_then(Value::as_str) {
            Some(k) => Some(k.to_string()),
            None => {
                let k = mint();
                obj.insert("idempotency_key".into(), Value::String(k.clone()));
                Some(k)
            }
        }
    }
    if kind == SpoolKind::Observation {
        if let Some(items) = body.get_mut("observations").and_then(Value::as_array_mut) {
            return items.iter_mut().filter_map(|i| one(i, &mut mint)).collect();
        }
    }
    one(body, &mut mint).into_iter().collect()
}

/// The idempotency keys a write carries, in item order.
pub fn keys(kind: SpoolKind, body: &Value) -> Vec<String> {
    let key = |v: &Value| {
        v.get("idempotency_key")
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    match body.get("observations").and_then(Value::as_array) {
        Some(items) if kind == SpoolKind::Observation => items.iter().filter_map(key).collect(),
        _ => key(body).into_iter().collect(),
    }
}

/// One line of a spool file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in this spool, from 1, never reused (the cursor counts these).
    pub n: u64,
    /// When it was spooled (ms since the epoch).
    pub at: i64,
    pub kind: SpoolKind,
    /// The request body, idempotency keys included.
    pub body: Value,
}

impl Record {
    /// The line written to the file, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"));
        s.push('\n');
        s
    }
}

/// A spool file's content as read back.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    /// Every whole, well-formed record, in file order.
    pub records: Vec<Record>,
    /// Bytes up to the end of the last whole line: anything after it is a line
    /// whose append did not finish (the process died mid-write) and is cut off.
    pub valid_len: u64,
    /// Whole lines that are not records (damaged on disk): kept aside, not replayed.
    pub damaged: Vec<String>,
}

/// Reads a spool file's bytes. Only a line ended by `\n` counts: a write is
/// acknowledged as spooled after its whole line (newline last) reached the disk,
/// so a torn last line belongs to a write that was never acknowledged.
pub fn parse(bytes: &[u8]) -> Parsed {
    let mut out = Parsed::default();
    let mut start = 0usize;
    while let Some(off) = bytes[start..].iter().position(|&b| b == b'\n') {
        let line = &bytes[start..start + off];
        start += off + 1;
        out.valid_len = start as u64;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(line) {
            Ok(r) => out.records.push(r),
            Err(_) => out.damaged.push(String::from_utf8_lossy(line).into_owned()),
        }
    }
    out
}

/// The replay cursor: the `n` of the last record finished (delivered, or moved to
/// `.rejected`). Stored as a decimal number; an unreadable cursor counts as 0,
/// which re-sends finished records, harmless because every record has its keys.
pub fn parse_cursor(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// The records still to send, in order.
pub fn pending(records: Vec<Record>, cursor: u64) -> Vec<Record> {
    records.into_iter().filter(|r| r.n > cursor).collect()
}

/// The `n` of the next record: after everything in the file and the cursor (the
/// file is emptied once fully replayed, but numbers are never reused).
pub fn next_n(records: &[Record], cursor: u64) -> u64 {
    records.iter().map(|r| r.n).max().unwrap_or(0).max(cursor) + 1
}

/// What replay does with an entry the hub did not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The hub cannot take it now (unreachable, 5xx, rate limited, the session
    /// being renewed): stop, keep it and everything after it, try again later.
    Retry,
    /// The hub refused this entry for what it is (4xx): set it aside in
    /// `.rejected` with the error and go on, so one poisoned entry never blocks
    /// the rest.
    Reject,
}

/// Judges a replay error. `unauthorized` and `unknown_instance` about the
/// caller's own instance mean the credentials are being renewed (the bridge
/// re-registers), not that the entry is bad.
pub fn verdict(e: &Error, own_instance: Option<&str>) -> Verdict {
    match e.code {
        ErrorCode::Unavailable
        | ErrorCode::Internal
        | ErrorCode::RateLimited
        | ErrorCode::Unauthorized => Verdict::Retry,
        ErrorCode::UnknownInstance => {
            let about = e.details.get("instance").and_then(Value::as_str);
            match (about, own_instance) {
                (Some(a), Some(me)) if a != me => Verdict::Reject,
                _ => Verdict::Retry,
            }
        }
        _ => Verdict::Reject,
    }
}

/// A file-name-safe form of an entity or label: lowercase ASCII letters, digits,
/// `-` and `_`, other runs folded to one `-`, at most 64 bytes.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let mut out: String = out.chars().take(64).collect();
    if out.is_empty() {
        out.push('_');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rec(n: u64) -> Record {
        Record {
            n,
            at: 1_000 + n as i64,
            kind: SpoolKind::Event,
            body: json!({"topic": "a.b", "data": {"i": n}, "idempotency_key": format!("k{n}")}),
        }
    }

    #[test]
    fn which_writes_are_spoolable() {
        let me = Some("ins_me");
        let mem = |space: &str| json!({"space": space, "text": "t"});
        assert!(spoolable(SpoolKind::Memory, &mem("shared:providers"), me).is_ok());
        assert!(spoolable(SpoolKind::Memory, &mem("instance:ins_me"), me).is_ok());
        assert!(spoolable(SpoolKind::Memory, &mem("instance:ins_other"), me).is_err());
        assert!(spoolable(SpoolKind::Memory, &mem("instance:ins_me"), None).is_err());
        assert!(spoolable(SpoolKind::Memory, &mem("entity:sisters"), me).is_err());
        assert!(spoolable(SpoolKind::Memory, &json!({}), me).is_err());
        for k in [SpoolKind::Event, SpoolKind::Observation, SpoolKind::Task] {
            assert!(spoolable(k, &json!({}), None).is_ok());
        }
    }

    #[test]
    fn keys_are_kept_or_minted_per_item() {
        let mut i = 0;
        let mut mint = || {
            i += 1;
            format!("m{i}")
        };
        let mut given = json!({"topic": "a", "idempotency_key": "mine"});
        assert_eq!(
            ensure_keys(SpoolKind::Event, &mut given, &mut mint),
            vec!["mine"]
        );
        let mut none = json!({"queue": "q"});
        assert_eq!(
            ensure_keys(SpoolKind::Task, &mut none, &mut mint),
            vec!["m1"]
        );
        assert_eq!(none["idempotency_key"], "m1");
        let mut batch =
            json!({"observations": [{"subject": "s"}, {"subject": "t", "idempotency_key": "x"}]});
        assert_eq!(
            ensure_keys(SpoolKind::Observation, &mut batch, &mut mint),
            vec!["m2", "x"]
        );
        assert_eq!(batch["observations"][0]["idempotency_key"], "m2");
        assert_eq!(keys(SpoolKind::Observation, &batch), vec!["m2", "x"]);
        assert_eq!(keys(SpoolKind::Task, &none), vec!["m1"]);
    }

    #[test]
    fn records_round_trip_through_lines() {
        let text: String = (1..=3).map(|n| rec(n).to_line()).collect();
        let p = parse(text.as_bytes());
        assert_eq!(p.records, vec![rec(1), rec(2), rec(3)]);
        assert_eq!(p.valid_len, text.len() as u64);
        assert!(p.damaged.is_empty());
    }

    #[test]
    fn a_crash_at_any_byte_keeps_exactly_the_whole_lines_before_it() {
        let lines: Vec<String> = (1..=4).map(|n| rec(n).to_line()).collect();
        let text: String = lines.concat();
        let ends: Vec<usize> = lines
            .iter()
            .scan(0, |acc, l| {
                *acc += l.len();
                Some(*acc)
            })
            .collect();
        for cut in 0..=text.len() {
            let p = parse(&text.as_bytes()[..cut]);
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            assert_eq!(p.records.len(), whole, "cut at {cut}");
            assert_eq!(
                p.valid_len,
                if whole == 0 {
                    0
                } else {
                    ends[whole - 1] as u64
                }
            );
            assert!(
                p.damaged.is_empty(),
                "a torn line is not damage: cut at {cut}"
            );
        }
    }

    #[test]
    fn damaged_whole_lines_are_set_aside_and_the_rest_read() {
        let text = format!("{}not json\n\n{}", rec(1).to_line(), rec(2).to_line());
        let p = parse(text.as_bytes());
        assert_eq!(p.records, vec![rec(1), rec(2)]);
        assert_eq!(p.damaged, vec!["not json".to_string()]);
    }

    #[test]
    fn cursor_arithmetic() {
        assert_eq!(parse_cursor("7\n"), 7);
        assert_eq!(parse_cursor("garbage"), 0);
        assert_eq!(parse_cursor(""), 0);
        let all = vec![rec(3), rec(4), rec(5)];
        assert_eq!(
            pending(all.clone(), 4)
                .iter()
                .map(|r| r.n)
                .collect::<Vec<_>>(),
            vec![5]
        );
        assert_eq!(pending(all.clone(), 0).len(), 3);
        assert_eq!(next_n(&all, 4), 6);
        // An emptied file resumes numbering after the cursor.
        assert_eq!(next_n(&[], 9), 10);
        assert_eq!(next_n(&[], 0), 1);
    }

    #[test]
    fn verdicts() {
        let me = Some("ins_me");
        for code in [
            ErrorCode::Unavailable,
            ErrorCode::Internal,
            ErrorCode::RateLimited,
            ErrorCode::Unauthorized,
        ] {
            assert_eq!(
                verdict(&Error::new(code, "x"), me),
                Verdict::Retry,
                "{code:?}"
            );
        }
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::Forbidden,
            ErrorCode::NotFound,
            ErrorCode::Conflict,
            ErrorCode::Fenced,
            ErrorCode::PayloadTooLarge,
        ] {
            assert_eq!(
                verdict(&Error::new(code, "x"), me),
                Verdict::Reject,
                "{code:?}"
            );
        }
        assert_eq!(
            verdict(&Error::unknown_instance("ins_me"), me),
            Verdict::Retry
        );
        assert_eq!(
            verdict(&Error::unknown_instance("ins_gone"), me),
            Verdict::Reject
        );
        assert_eq!(
            verdict(&Error::unknown_instance("ins_gone"), None),
            Verdict::Retry
        );
    }

    #[test]
    fn slugs_are_file_name_safe() {
        assert_eq!(slug("Build Box #2"), "build-box-2");
        assert_eq!(slug("tab-2"), "tab-2");
        assert_eq!(slug("../../etc"), "etc");
        assert_eq!(slug("///"), "_");
        assert_eq!(slug(&"x".repeat(100)).len(), 64);
    }
}

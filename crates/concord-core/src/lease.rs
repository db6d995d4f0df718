//! Resource leases (DESIGN §8): names and path globs, and whether two of them can
//! name a common resource.
//!
//! Globs are compared segment by segment (`/` separates segments): `**` is a whole
//! segment and matches any number of segments, zero included; inside a segment `*`
//! matches any run of characters, `?` one character and `[…]` / `[!…]` a class.
//! A trailing slash means the whole directory: `dir/` is `dir/**`. Repeated
//! slashes collapse. Brace alternation (`{a,b}`) is refused rather than read
//! literally, because a literal reading would miss overlaps.
//!
//! The rule errs one way only: a false "overlap" costs a holder a wait, a missed
//! one costs two writers the same file. So wherever exactness would need more
//! than simple reasoning (negated classes, say), the answer is "overlaps".

use crate::error::Error;
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use utoipa::ToSchema;

pub const MAX_RESOURCE_LEN: usize = 1024;
pub const MAX_REASON_LEN: usize = 500;
pub const DEFAULT_TTL_MS: i64 = 600_000;
pub const MIN_TTL_MS: i64 = 1_000;
pub const MAX_TTL_MS: i64 = 86_400_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LeaseMode {
    #[default]
    Exclusive,
    Shared,
}

impl LeaseMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseMode::Exclusive => "exclusive",
            LeaseMode::Shared => "shared",
        }
    }
    pub fn parse(s: &str) -> Option<LeaseMode> {
        match s {
            "exclusive" => Some(LeaseMode::Exclusive),
            "shared" => Some(LeaseMode::Shared),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Lit(char),
    Any,
    Star,
    /// (negated, ranges)
    Class(bool, Vec<(char, char)>),
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    DoubleStar,
    Pat(Vec<Tok>),
}

fn bad(field: &str, m: impl Into<String>) -> Error {
    Error::bad_field(field, m)
}

/// Canonical form of a resource: repeated slashes collapsed, `dir/` as `dir/**`.
pub fn normalize(resource: &str) -> String {
    let mut out = String::with_capacity(resource.len() + 2);
    let mut prev_slash = false;
    for c in resource.chars() {
        if c == '/' && prev_slash {
            continue;
        }
        prev_slash = c == '/';
        out.push(c);
    }
    if out.len() > 1 && out.ends_with('/') {
        out.push_str("**");
    }
    out
}

fn parse_segment(field: &str, seg: &str) -> Result<Seg, Error> {
    if seg == "**" {
        return Ok(Seg::DoubleStar);
    }
    if seg.contains("**") {
        return Err(bad(
            field,
            format!("'**' must be a whole path segment (in {seg:?})"),
        ));
    }
    let mut toks = Vec::new();
    let mut chars = seg.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => toks.push(Tok::Star),
            '?' => toks.push(Tok::Any),
            '{' | '}' => {
                return Err(bad(
                    field,
                    "brace alternation {a,b} is not supported: take one lease per alternative",
                ))
            }
            ']' => return Err(bad(field, "unmatched ']'")),
            '[' => {
                let negated = matches!(chars.peek(), Some('!') | Some('^'));
                if negated {
                    chars.next();
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                let mut first = true;
                while let Some(c) = chars.next() {
                    if c == ']' && !first {
                        closed = true;
                        break;
                    }
                    first = false;
                    if chars.peek() == Some(&'-') {
                        chars.next();
                        match chars.next() {
                            Some(']') => {
                                ranges.push((c, c));
                                ranges.push(('-', '-'));
                                closed = true;
                                break;
                            }
                            Some(hi) if hi >= c => ranges.push((c, hi)),
                            Some(hi) => {
                                return Err(bad(field, format!("empty range {c}-{hi} in a class")))
                            }
                            None => break,
                        }
                    } else {
                        ranges.push((c, c));
                    }
                }
                if !closed {
                    return Err(bad(field, "unterminated character class '['"));
                }
                toks.push(Tok::Class(negated, ranges));
            }
            c => toks.push(Tok::Lit(c)),
        }
    }
    Ok(Seg::Pat(toks))
}

fn parse(field: &str, resource: &str) -> Result<Vec<Seg>, Error> {
    normalize(resource)
        .split('/')
        .map(|s| parse_segment(field, s))
        .collect()
}

/// Checks a resource (name or glob); returns its canonical form.
pub fn validate_resource(field: &str, resource: &str) -> Result<String, Error> {
    if resource.is_empty() || resource.len() > MAX_RESOURCE_LEN {
        return Err(bad(field, format!("must be 1..={MAX_RESOURCE_LEN} bytes")));
    }
    if resource.chars().any(char::is_control) {
        return Err(bad(field, "must not contain control characters"));
    }
    parse(field, resource)?;
    Ok(normalize(resource))
}

fn class_has(neg: bool, ranges: &[(char, char)], c: char) -> bool {
    ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c)) != neg
}

/// Can one character match both tokens (neither is `*`)?
fn chars_meet(a: &Tok, b: &Tok) -> bool {
    match (a, b) {
        (Tok::Lit(x), Tok::Lit(y)) => x == y,
        (Tok::Any, _) | (_, Tok::Any) => true,
        (Tok::Lit(x), Tok::Class(n, r)) | (Tok::Class(n, r), Tok::Lit(x)) => class_has(*n, r, *x),
        (Tok::Class(false, r1), Tok::Class(false, r2)) => r1
            .iter()
            .any(|(a1, b1)| r2.iter().any(|(a2, b2)| a1 <= b2 && a2 <= b1)),
        // Negated classes leave almost every character: assume they meet.
        _ => true,
    }
}

/// Is there a string (without '/') that both segment patterns match? A search over
/// pairs of positions in the two patterns.
fn segments_meet(a: &[Tok], b: &[Tok]) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        if !seen.insert((i, j)) {
            continue;
        }
        if i == a.len() && j == b.len() {
            return true;
        }
        let ta = a.get(i);
        let tb = b.get(j);
        if ta == Some(&Tok::Star) {
            stack.push((i + 1, j)); // the star matches nothing more
            if let Some(t) = tb {
                if t != &Tok::Star {
                    stack.push((i, j + 1)); // the star eats b's character
                }
            }
        }
        if tb == Some(&Tok::Star) {
            stack.push((i, j + 1));
            if let Some(t) = ta {
                if t != &Tok::Star {
                    stack.push((i + 1, j));
                }
            }
        }
        if let (Some(x), Some(y)) = (ta, tb) {
            if x != &Tok::Star && y != &Tok::Star && chars_meet(x, y) {
                stack.push((i + 1, j + 1));
            }
        }
    }
    false
}

fn paths_meet(a: &[Seg], b: &[Seg]) -> bool {
    let mut seen = HashSet::new();
    let mut stack = vec![(0usize, 0usize)];
    while let Some((i, j)) = stack.pop() {
        if !seen.insert((i, j)) {
            continue;
        }
        if i == a.len() && j == b.len() {
            return true;
        }
        let sa = a.get(i);
        let sb = b.get(j);
        if sa == Some(&Seg::DoubleStar) {
            stack.push((i + 1, j));
            if j < b.len() {
                stack.push((i, j + 1));
            }
        }
        if sb == Some(&Seg::DoubleStar) {
            stack.push((i, j + 1));
            if i < a.len() {
                stack.push((i + 1, j));
            }
        }
        if let (Some(Seg::Pat(x)), Some(Seg::Pat(y))) = (sa, sb) {
            if segments_meet(x, y) {
                stack.push((i + 1, j + 1));
            }
        }
    }
    false
}

/// Whether two resources (names or globs) can name a common resource. Symmetric.
/// A resource that does not parse overlaps everything (never a missed conflict).
pub fn overlaps(a: &str, b: &str) -> bool {
    match (parse("a", a), parse("b", b)) {
        (Ok(x), Ok(y)) => paths_meet(&x, &y),
        _ => true,
    }
}

/// Whether a lease in `mode_a` on `a` excludes one in `mode_b` on `b`.
pub fn conflicts(mode_a: LeaseMode, a: &str, mode_b: LeaseMode, b: &str) -> bool {
    !(mode_a == LeaseMode::Shared && mode_b == LeaseMode::Shared) && overlaps(a, b)
}

pub fn validate_ttl(field: &str, ttl: i64) -> Result<(), Error> {
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl) {
        return Err(bad(
            field,
            format!("{ttl} is out of range: must be between {MIN_TTL_MS} (1 s) and {MAX_TTL_MS} (1 day)"),
        ));
    }
    Ok(())
}

// ---------- wire types ----------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireLeaseRequest {
    /// A name (`db:prod`) or a path glob (`repo:/src/**`; `dir/` means `dir/**`).
    pub resource: String,
    #[serde(default)]
    pub mode: LeaseMode,
    /// Default 600000 (10 min); 1000..=86400000.
    #[serde(default)]
    pub ttl_ms: Option<i64>,
    #[serde(default)]
    pub reason: Option<String>,
    /// A repeated acquire with the same key by the same holder returns its live lease.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewLeaseRequest {
    #[serde(default)]
    pub ttl_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Lease {
    pub id: String,
    pub resource: String,
    pub mode: LeaseMode,
    /// The holder instance.
    pub holder: String,
    pub entity: Option<String>,
    /// Grows with every grant: a holder's writes elsewhere can carry it as a fence.
    pub fence: u64,
    pub acquired_at: Timestamp,
    pub expires_at: Timestamp,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseEnvelope {
    pub lease: Lease,
    /// True when an idempotent retry returned the lease it had already acquired.
    #[serde(default)]
    pub deduplicated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseList {
    pub leases: Vec<Lease>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_table() {
        let table: &[(&str, &str, bool)] = &[
            ("src/a.rs", "src/a.rs", true),
            ("src/a.rs", "src/b.rs", false),
            ("src/a.rs", "src/**", true),
            ("src/**", "src/a.rs", true),
            ("src/**", "src", true),
            ("src/**", "srcx/a.rs", false),
            ("src/**/mod.rs", "src/a/b/mod.rs", true),
            ("src/**/mod.rs", "src/a/b/lib.rs", false),
            ("**", "anything/at/all", true),
            ("**/*.rs", "docs/readme.md", false),
            ("**/*.rs", "src/x/y.rs", true),
            ("src/*.rs", "src/a/b.rs", false),
            ("src/*.rs", "src/*", true),
            ("src/*.rs", "src/*.md", false),
            ("src/a*", "src/*b", true),
            ("src/a?c", "src/abc", true),
            ("src/a?c", "src/ac", false),
            ("src/[ab].rs", "src/a.rs", true),
            ("src/[ab].rs", "src/c.rs", false),
            ("src/[a-c].rs", "src/[x-z].rs", false),
            ("src/[a-c].rs", "src/[c-z].rs", true),
            ("src/[!a].rs", "src/a.rs", false),
            ("src/[!a].rs", "src/b.rs", true),
            ("src/", "src/a/b.rs", true),
            ("src/", "lib/a.rs", false),
            ("src//a.rs", "src/a.rs", true),
            ("repo:/src/**", "repo:/src/parser.rs", true),
            ("repo:/src/**", "src/parser.rs", false),
            ("db:prod", "db:prod", true),
            ("db:prod", "db:staging", false),
            ("db:*", "db:staging", true),
        ];
        for (a, b, want) in table {
            assert_eq!(overlaps(a, b), *want, "{a} vs {b}");
            assert_eq!(overlaps(b, a), *want, "{b} vs {a} (symmetry)");
        }
    }

    #[test]
    fn modes() {
        use LeaseMode::*;
        assert!(!conflicts(Shared, "a", Shared, "a"));
        assert!(conflicts(Shared, "a", Exclusive, "a/**"));
        assert!(conflicts(Exclusive, "a", Exclusive, "a"));
        assert!(!conflicts(Exclusive, "a", Exclusive, "b"));
    }

    #[test]
    fn bad_globs_name_the_field() {
        for g in ["src/a**", "src/[ab", "src/{a,b}", "", "src/]", "src/[z-a]"] {
            let e = validate_resource("resource", g).unwrap_err();
            assert_eq!(e.details["field"], "resource", "{g}");
        }
        assert_eq!(validate_resource("resource", "dir/").unwrap(), "dir/**");
        assert!(validate_ttl("ttl_ms", 999).is_err());
        assert!(validate_ttl("ttl_ms", 600_000).is_ok());
    }

    use proptest::prelude::*;

    fn seg() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("**".to_string()),
            Just("*".to_string()),
            Just("a".to_string()),
            Just("b".to_string()),
            Just("a*".to_string()),
            Just("?".to_string()),
            Just("[ab]".to_string()),
            Just("[!a]".to_string()),
        ]
    }

    fn concrete() -> impl Strategy<Value = String> {
        prop_oneof![Just("a"), Just("b"), Just("ab"), Just("c")].prop_map(String::from)
    }

    fn matches(glob: &str, path: &str) -> bool {
        overlaps(glob, path)
    }

    proptest! {
        /// Whatever a caller sends as a resource: it is refused naming the field, or
        /// it normalizes to a fixed point that overlaps itself (a lease always
        /// conflicts with an identical one).
        #[test]
        fn any_resource_text_is_refused_or_overlaps_itself(s in "[a-z/*?\\[\\]!{},.:-]{0,24}|.{0,16}") {
            match validate_resource("resource", &s) {
                Err(e) => prop_assert!(e.details.to_string().contains("resource")),
                Ok(n) => {
                    prop_assert_eq!(validate_resource("resource", &n).ok(), Some(n.clone()));
                    prop_assert!(overlaps(&n, &n), "{} does not overlap itself", n);
                }
            }
        }

        /// Symmetric, and never misses: when a concrete path matches both globs
        /// (checked with the one-sided matcher), the globs overlap.
        #[test]
        fn never_misses_a_common_path(
            a in proptest::collection::vec(seg(), 1..4),
            b in proptest::collection::vec(seg(), 1..4),
            p in proptest::collection::vec(concrete(), 1..4),
        ) {
            let (a, b, p) = (a.join("/"), b.join("/"), p.join("/"));
            prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
            if matches(&a, &p) && matches(&b, &p) {
                prop_assert!(overlaps(&a, &b), "{} and {} both match {}", a, b, p);
            }
        }
    }
}

//! Topics and subscription patterns (DESIGN §6), NATS style: dot-separated words;
//! in a pattern `*` matches one word and `>` (last only) matches one or more words.

use crate::error::Error;

pub const MAX_TOPIC_LEN: usize = 256;
const RESERVED: &str = "sys";

fn check_word(field: &str, word: &str, whole: &str) -> Result<(), Error> {
    if word.is_empty() {
        return Err(Error::bad_field(
            field,
            format!("{whole:?} has an empty word (leading, trailing or double dot)"),
        ));
    }
    if !word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(Error::bad_field(
            field,
            format!("{whole:?}: word {word:?} may contain only letters, digits, '_' and '-'"),
        ));
    }
    Ok(())
}

fn check_len(field: &str, s: &str) -> Result<(), Error> {
    if s.is_empty() {
        return Err(Error::bad_field(field, "must not be empty"));
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(Error::bad_field(
            field,
            format!("at most {MAX_TOPIC_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Checks a concrete topic (no wildcards).
pub fn validate_topic(field: &str, topic: &str) -> Result<(), Error> {
    check_len(field, topic)?;
    for w in topic.split('.') {
        check_word(field, w, topic)?;
    }
    Ok(())
}

/// Whether the topic is the hub's own (`sys.…`): only the hub publishes there.
pub fn is_reserved(topic: &str) -> bool {
    topic == RESERVED || topic.starts_with("sys.")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Word(String),
    One,
    Rest,
}

/// A parsed subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
    text: String,
}

impl Pattern {
    pub fn parse(field: &str, text: &str) -> Result<Pattern, Error> {
        check_len(field, text)?;
        let words: Vec<&str> = text.split('.').collect();
        let mut parts = Vec::with_capacity(words.len());
        for (i, w) in words.iter().enumerate() {
            match *w {
                "*" => parts.push(Part::One),
                ">" if i + 1 == words.len() => parts.push(Part::Rest),
                ">" => {
                    return Err(Error::bad_field(
                        field,
                        format!("{text:?}: '>' may only be the last word"),
                    ))
                }
                w => {
                    check_word(field, w, text)?;
                    parts.push(Part::Word(w.to_string()));
                }
            }
        }
        Ok(Pattern {
            parts,
            text: text.to_string(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn matches(&self, topic: &str) -> bool {
        let mut words = topic.split('.');
        for (i, part) in self.parts.iter().enumerate() {
            match part {
                Part::Rest => return words.next().is_some(),
                Part::One => {
                    if words.next().is_none() {
                        return false;
                    }
                }
                Part::Word(w) => {
                    if words.next() != Some(w.as_str()) {
                        return false;
                    }
                }
            }
            debug_assert!(i < self.parts.len());
        }
        words.next().is_none()
    }
}

/// A comma-separated list of patterns; an event matches if any pattern does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatternSet(Vec<Pattern>);

impl PatternSet {
    /// `None` or empty text subscribes to everything (`>`).
    pub fn parse(field: &str, text: Option<&str>) -> Result<PatternSet, Error> {
        let text = text.map(str::trim).filter(|t| !t.is_empty()).unwrap_or(">");
        let pats = text
            .split(',')
            .map(|p| Pattern::parse(field, p.trim()))
            .collect::<Result<Vec<_>, _>>()?;
        if pats.len() > 64 {
            return Err(Error::bad_field(field, "at most 64 patterns"));
        }
        Ok(PatternSet(pats))
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.0.iter().any(|p| p.matches(topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::parse("topics", p).unwrap().matches(t)
    }

    #[test]
    fn wildcards_like_nats() {
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(m("a.*", "a.b"));
        assert!(!m("a.*", "a"));
        assert!(!m("a.*", "a.b.c"));
        assert!(m("a.>", "a.b"));
        assert!(m("a.>", "a.b.c"));
        assert!(!m("a.>", "a"));
        assert!(m(">", "anything.at.all"));
        assert!(m("*.b.>", "x.b.c"));
        assert!(!m("*.b.>", "x.c.c"));
    }

    #[test]
    fn bad_patterns_are_named() {
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a b", "a.b c"] {
            let e = Pattern::parse("topics", bad).unwrap_err();
            assert_eq!(e.details["field"], "topics", "{bad}");
        }
        assert!(validate_topic("topic", "a.*").is_err());
        assert!(validate_topic("topic", "crew.channel").is_ok());
        assert!(is_reserved("sys.ghost"));
        assert!(!is_reserved("system.x"));
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-c]{1,2}"
    }

    proptest! {
        #[test]
        fn exact_patterns_match_only_themselves(a in proptest::collection::vec(word(), 1..5), b in proptest::collection::vec(word(), 1..5)) {
            let (ta, tb) = (a.join("."), b.join("."));
            prop_assert_eq!(m(&ta, &tb), ta == tb);
        }

        #[test]
        fn rest_matches_every_longer_topic(a in proptest::collection::vec(word(), 1..4), extra in proptest::collection::vec(word(), 0..3)) {
            let prefix = a.join(".");
            let mut t = a.clone();
            t.extend(extra.clone());
            let topic = t.join(".");
            prop_assert_eq!(m(&format!("{prefix}.>"), &topic), !extra.is_empty());
            let stars = vec!["*"; t.len()].join(".");
            prop_assert!(m(&stars, &topic));
        }

        #[test]
        fn parsing_never_panics(s in ".{0,40}") {
            let _ = Pattern::parse("topics", &s).map(|p| p.matches("a.b"));
            let _ = validate_topic("topic", &s);
        }
    }
}

//! The work queue's rules (DESIGN §7): task states, what a failure turns into,
//! backoff, schedules. Pure, so both backends and the handlers agree on them.

use crate::error::Error;
use chrono::{TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    /// `not_before` is in the future.
    Scheduled,
    Running,
    Completed,
    /// Failed and will retry after its backoff.
    Failed,
    /// Out of attempts (or failed with `retry: false`).
    Dead,
    Cancelled,
}

impl TaskState {
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Scheduled,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Dead,
        TaskState::Cancelled,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Scheduled => "scheduled",
            TaskState::Running => "running",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Dead => "dead",
            TaskState::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }
    /// No further transition is possible.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Dead | TaskState::Cancelled
        )
    }
}

pub const MAX_QUEUE_LEN: usize = 128;
pub const MAX_CLAIM: u32 = 1000;
pub const MIN_LEASE_MS: i64 = 1_000;
pub const MAX_LEASE_MS: i64 = 86_400_000;
pub const DEFAULT_LEASE_MS: i64 = 30_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_BACKOFF_MS: i64 = 1_000;
/// Longest backoff between attempts, whatever the exponent says.
pub const MAX_BACKOFF_MS: i64 = 3_600_000;

/// Queue names: created on first use; 1..=128 bytes, no whitespace or control characters.
pub fn validate_queue(field: &str, q: &str) -> Result<(), Error> {
    if q.is_empty() {
        return Err(Error::bad_field(field, "must not be empty"));
    }
    if q.len() > MAX_QUEUE_LEN {
        return Err(Error::bad_field(
            field,
            format!("at most {MAX_QUEUE_LEN} bytes"),
        ));
    }
    if q.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::bad_field(
            field,
            format!("{q:?} must not contain spaces or control characters"),
        ));
    }
    Ok(())
}

pub fn validate_lease(field: &str, ms: i64) -> Result<(), Error> {
    if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&ms) {
        return Err(Error::bad_field(
            field,
            format!("must be between {MIN_LEASE_MS} and {MAX_LEASE_MS}"),
        ));
    }
    Ok(())
}

/// Delay before attempt `attempt + 1` after `attempt` failed: exponential from
/// `backoff_ms`, capped.
pub fn retry_delay(backoff_ms: i64, attempt: u32) -> i64 {
    let exp = attempt.saturating_sub(1).min(20);
    backoff_ms
        .max(0)
        .saturating_mul(1i64 << exp)
        .min(MAX_BACKOFF_MS)
}

/// What a failure does to a task that has made `attempt` attempts of `max_attempts`.
pub fn after_failure(attempt: u32, max_attempts: u32, retry: bool) -> TaskState {
    if retry && attempt < max_attempts {
        TaskState::Failed
    } else {
        TaskState::Dead
    }
}

/// What a lapsed claim (lease expired, claimer died) does to a running task.
pub fn after_lost_claim(attempt: u32, max_attempts: u32) -> TaskState {
    if attempt < max_attempts {
        TaskState::Pending
    } else {
        TaskState::Dead
    }
}

/// A recurring schedule: every N ms, or a cron expression (5 fields, minute first;
/// 6 or 7 fields with seconds first are accepted too), evaluated in UTC.
#[derive(Debug, Clone)]
pub enum Recurrence {
    Every(i64),
    Cron(Box<cron::Schedule>),
}

impl Recurrence {
    pub fn parse(every_ms: Option<i64>, cron_expr: Option<&str>) -> Result<Recurrence, Error> {
        match (every_ms, cron_expr) {
            (Some(_), Some(_)) => Err(Error::bad_field(
                "cron",
                "give either every_ms or cron, not both",
            )),
            (None, None) => Err(Error::bad_field(
                "every_ms",
                "a schedule needs every_ms or cron",
            )),
            (Some(ms), None) if !(1_000..=366 * 86_400_000).contains(&ms) => Err(Error::bad_field(
                "every_ms",
                "must be between 1000 (1 s) and one year",
            )),
            (Some(ms), None) => Ok(Recurrence::Every(ms)),
            (None, Some(expr)) => {
                let fields = expr.split_whitespace().count();
                let full = match fields {
                    5 => format!("0 {expr}"),
                    6 | 7 => expr.to_string(),
                    _ => {
                        return Err(Error::bad_field(
                            "cron",
                            format!("{expr:?}: expected 5 fields (minute hour day month weekday)"),
                        ))
                    }
                };
                cron::Schedule::from_str(&full)
                    .map(|s| Recurrence::Cron(Box::new(s)))
                    .map_err(|e| Error::bad_field("cron", format!("{expr:?}: {e}")))
            }
        }
    }

    /// The first due time strictly after `after_ms`.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Recurrence::Every(ms) => Some(after_ms - after_ms.rem_euclid(*ms) + ms),
            Recurrence::Cron(s) => {
                let t = Utc.timestamp_millis_opt(after_ms).single()?;
                s.after(&t).next().map(|d| d.timestamp_millis())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn failures_retry_until_out_of_attempts() {
        assert_eq!(after_failure(1, 3, true), TaskState::Failed);
        assert_eq!(after_failure(3, 3, true), TaskState::Dead);
        assert_eq!(after_failure(1, 3, false), TaskState::Dead);
        assert_eq!(after_lost_claim(1, 3), TaskState::Pending);
        assert_eq!(after_lost_claim(3, 3), TaskState::Dead);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(retry_delay(1000, 1), 1000);
        assert_eq!(retry_delay(1000, 2), 2000);
        assert_eq!(retry_delay(1000, 3), 4000);
        assert_eq!(retry_delay(1000, 60), MAX_BACKOFF_MS);
    }

    #[test]
    fn schedules() {
        let every = Recurrence::parse(Some(60_000), None).unwrap();
        assert_eq!(every.next_after(0), Some(60_000));
        assert_eq!(every.next_after(59_999), Some(60_000));
        assert_eq!(every.next_after(60_000), Some(120_000));
        let cron = Recurrence::parse(None, Some("*/15 * * * *")).unwrap();
        assert_eq!(cron.next_after(0), Some(15 * 60_000));
        assert_eq!(cron.next_after(15 * 60_000), Some(30 * 60_000));
        assert!(Recurrence::parse(None, Some("nonsense")).is_err());
        assert!(Recurrence::parse(None, Some("61 * * * *")).is_err());
        assert!(Recurrence::parse(Some(10), None).is_err());
        assert!(Recurrence::parse(Some(1000), Some("* * * * *")).is_err());
    }

    #[test]
    fn queue_names() {
        assert!(validate_queue("queue", "default").is_ok());
        assert!(validate_queue("queue", "dispatch.review").is_ok());
        assert!(validate_queue("queue", "").is_err());
        assert!(validate_queue("queue", "a b").is_err());
        assert!(validate_queue("queue", &"q".repeat(129)).is_err());
    }

    proptest! {
        #[test]
        fn next_due_is_always_in_the_future(every in 1_000i64..10_000_000, at in 0i64..10_000_000_000) {
            let r = Recurrence::parse(Some(every), None).unwrap();
            let n = r.next_after(at).unwrap();
            prop_assert!(n > at && n - at <= every && n % every == 0);
        }

        #[test]
        fn a_task_fails_at_most_max_attempts_times(max in 1u32..10, retries in proptest::collection::vec(any::<bool>(), 1..12)) {
            let mut attempt = 0;
            let mut state = TaskState::Pending;
            for retry in retries {
                if state.is_final() { break; }
                attempt += 1;
                state = after_failure(attempt, max, retry);
                prop_assert!(attempt <= max);
            }
        }

        /// Cron-shaped text (ranges, steps, lists, names, impossible dates like
        /// 30 February): it parses or is refused naming `cron`, and a schedule that
        /// parses answers `next_after` (strictly later, or never) without panicking.
        #[test]
        fn cron_shaped_expressions_parse_or_are_refused(
            fields in proptest::collection::vec(
                prop_oneof![
                    Just("*".to_string()),
                    (0u32..70).prop_map(|n| n.to_string()),
                    (0u32..40, 1u32..40).prop_map(|(a, b)| format!("{a}-{b}")),
                    (1u32..70).prop_map(|n| format!("*/{n}")),
                    (0u32..32, 0u32..32).prop_map(|(a, b)| format!("{a},{b}")),
                    Just("FEB".to_string()),
                    Just("MON-FRI".to_string()),
                    Just("?".to_string()),
                    Just("L".to_string()),
                ],
                4..8,
            ),
            at in 0i64..4_000_000_000_000,
        ) {
            let expr = fields.join(" ");
            match Recurrence::parse(None, Some(&expr)) {
                Err(e) => prop_assert!(e.details.to_string().contains("cron")),
                Ok(r) => {
                    if let Some(n) = r.next_after(at) {
                        prop_assert!(n > at, "{} after {} gave {}", expr, at, n);
                    }
                }
            }
        }

        #[test]
        fn cron_parsing_never_panics(s in ".{0,30}") {
            let _ = Recurrence::parse(None, Some(&s)).map(|r| r.next_after(0));
        }
    }
}

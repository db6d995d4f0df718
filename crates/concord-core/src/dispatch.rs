//! Dispatch rules (DESIGN §8): reducers that turn many peers' answers into one,
//! and the quorum decision of when a dispatch is done. Pure and deterministic, so
//! every hub replica reaches the same answer from the same peer results.

use crate::error::Error;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quorum {
    /// One peer (retried on another only when idempotent).
    Single,
    /// Up to `max` peers; at least `min` results needed.
    Multi,
    /// Every matching peer; what arrived by the deadline.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum IfUnderMin {
    #[default]
    Fail,
    Degraded,
    Wait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReducerKind {
    First,
    All,
    Majority,
    WeightedMean,
    Fedavg,
    BestOf,
    Union,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Reducer {
    pub kind: ReducerKind,
    /// JSON pointer to the value each peer's result is reduced by ("" = whole result).
    #[serde(default)]
    pub path: Option<String>,
    /// weighted_mean, fedavg: JSON pointer to each peer's weight (default 1).
    #[serde(default)]
    pub weight_path: Option<String>,
    /// best_of: JSON pointer to the score to maximise.
    #[serde(default)]
    pub score_path: Option<String>,
    /// union: JSON pointer (within each element) to dedupe by (default the whole element).
    #[serde(default)]
    pub key_path: Option<String>,
}

fn check_pointer(field: &str, p: &Option<String>) -> Result<(), Error> {
    match p {
        Some(p) if !p.is_empty() && !p.starts_with('/') => Err(Error::bad_field(
            field,
            format!("{p:?} is not a JSON pointer (\"\" or starting with '/')"),
        )),
        _ => Ok(()),
    }
}

impl Reducer {
    pub fn validate(&self) -> Result<(), Error> {
        check_pointer("reducer.path", &self.path)?;
        check_pointer("reducer.weight_path", &self.weight_path)?;
        check_pointer("reducer.score_path", &self.score_path)?;
        check_pointer("reducer.key_path", &self.key_path)?;
        if self.kind == ReducerKind::BestOf && self.score_path.is_none() {
            return Err(Error::bad_field(
                "reducer.score_path",
                "best_of needs score_path",
            ));
        }
        Ok(())
    }
}

/// One peer's answer, in the order answers arrived.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub instance: String,
    pub result: Value,
}

/// The reduced value plus what was set aside and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reduced {
    pub value: Value,
    /// Peers left out of the reduction, with the reason.
    pub excluded: Vec<Value>,
    /// majority: every value that tied for the most votes (length > 1 means a tie).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie: Option<Vec<Value>>,
}

fn at<'a>(v: &'a Value, p: &Option<String>) -> Option<&'a Value> {
    match p.as_deref() {
        None | Some("") => Some(v),
        Some(p) => v.pointer(p),
    }
}

/// JSON with object keys sorted, so equal values compare equal as text.
pub fn canonical(v: &Value) -> String {
    fn sort(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let sorted: BTreeMap<&String, Value> =
                    m.iter().map(|(k, v)| (k, sort(v))).collect();
                Value::Object(
                    sorted
                        .into_iter()
                        .map(|(k, v)| (k.clone(), v))
                        .collect::<Map<_, _>>(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

fn exclude(instance: &str, reason: impl Into<String>) -> Value {
    json!({"instance": instance, "reason": reason.into()})
}

fn weight(a: &Answer, r: &Reducer) -> Result<f64, String> {
    match &r.weight_path {
        None => Ok(1.0),
        Some(_) => match at(&a.result, &r.weight_path).and_then(Value::as_f64) {
            Some(w) if w.is_finite() && w >= 0.0 => Ok(w),
            Some(_) => Err("weight is negative or not finite".into()),
            None => Err(format!(
                "no number at weight_path {}",
                r.weight_path.as_deref().unwrap_or("")
            )),
        },
    }
}

/// Applies the reducer to the answers (in arrival order).
pub fn reduce(r: &Reducer, answers: &[Answer]) -> Reduced {
    let mut excluded = Vec::new();
    let mut tie = None;
    let path = || r.path.as_deref().unwrap_or("");
    let value = match r.kind {
        ReducerKind::First => answers
            .first()
            .and_then(|a| at(&a.result, &r.path).cloned())
            .unwrap_or(Value::Null),
        ReducerKind::All => Value::Array(
            answers
                .iter()
                .filter_map(|a| match at(&a.result, &r.path) {
                    Some(v) => Some(json!({"instance": a.instance, "value": v})),
                    None => {
                        excluded.push(exclude(&a.instance, format!("no value at path {}", path())));
                        None
                    }
                })
                .collect(),
        ),
        ReducerKind::Majority => {
            let mut votes: Vec<(String, Value, usize)> = Vec::new();
            for a in answers {
                match at(&a.result, &r.path) {
                    Some(v) => {
                        let key = canonical(v);
                        match votes.iter_mut().find(|(k, _, _)| *k == key) {
                            Some(e) => e.2 += 1,
                            None => votes.push((key, v.clone(), 1)),
                        }
                    }
                    None => {
                        excluded.push(exclude(&a.instance, format!("no value at path {}", path())))
                    }
                }
            }
            let best = votes.iter().map(|v| v.2).max().unwrap_or(0);
            let winners: Vec<Value> = votes
                .iter()
                .filter(|v| v.2 == best)
                .map(|v| v.1.clone())
                .collect();
            let counts: Vec<Value> = votes
                .iter()
                .map(|v| json!({"value": v.1, "votes": v.2}))
                .collect();
            if winners.len() > 1 {
                tie = Some(winners.clone());
                json!({"value": null, "tie": true, "votes": counts})
            } else {
                json!({"value": winners.first().cloned().unwrap_or(Value::Null), "tie": false, "votes": counts})
            }
        }
        ReducerKind::WeightedMean => {
            let (mut sum, mut wsum) = (0.0, 0.0);
            for a in answers {
                let x = at(&a.result, &r.path)
                    .and_then(Value::as_f64)
                    .filter(|x| x.is_finite());
                match (x, weight(a, r)) {
                    (None, _) => excluded.push(exclude(
                        &a.instance,
                        format!("no number at path {}", path()),
                    )),
                    (_, Err(e)) => excluded.push(exclude(&a.instance, e)),
                    (Some(x), Ok(w)) => {
                        sum += x * w;
                        wsum += w;
                    }
                }
            }
            if wsum > 0.0 {
                json!(sum / wsum)
            } else {
                Value::Null
            }
        }
        ReducerKind::Fedavg => {
            let mut acc: Option<(Vec<f64>, f64)> = None;
            for a in answers {
                let arr = at(&a.result, &r.path).and_then(Value::as_array);
                let nums: Option<Vec<f64>> = arr.and_then(|a| {
                    a.iter()
                        .map(|x| x.as_f64().filter(|f| f.is_finite()))
                        .collect()
                });
                match (nums, weight(a, r)) {
                    (None, _) => excluded.push(exclude(
                        &a.instance,
                        format!("no array of numbers at path {}", path()),
                    )),
                    (_, Err(e)) => excluded.push(exclude(&a.instance, e)),
                    (Some(xs), Ok(w)) => match &mut acc {
                        None => acc = Some((xs.iter().map(|x| x * w).collect(), w)),
                        Some((sum, _)) if sum.len() != xs.len() => excluded.push(exclude(
                            &a.instance,
                            format!("array length {} differs from {}", xs.len(), sum.len()),
                        )),
                        Some((sum, wsum)) => {
                            for (s, x) in sum.iter_mut().zip(&xs) {
                                *s += x * w;
                            }
                            *wsum += w;
                        }
                    },
                }
            }
            match acc {
                Some((sum, wsum)) if wsum > 0.0 => {
                    json!(sum.iter().map(|s| s / wsum).collect::<Vec<_>>())
                }
                _ => Value::Null,
            }
        }
        ReducerKind::BestOf => {
            let mut best: Option<(f64, &Answer)> = None;
            for a in answers {
                match at(&a.result, &r.score_path)
                    .and_then(Value::as_f64)
                    .filter(|x| x.is_finite())
                {
                    None => excluded.push(exclude(&a.instance, "no number at score_path")),
                    // Strictly greater: ties go to the earliest answer.
                    Some(s) if best.is_none_or(|(b, _)| s > b) => best = Some((s, a)),
                    Some(_) => {}
                }
            }
            match best {
                Some((score, a)) => json!({
                    "instance": a.instance,
                    "score": score,
                    "value": at(&a.result, &r.path).cloned().unwrap_or(Value::Null),
                }),
                None => Value::Null,
            }
        }
        ReducerKind::Union => {
            let mut seen = std::collections::HashSet::new();
            let mut out = Vec::new();
            for a in answers {
                match at(&a.result, &r.path).and_then(Value::as_array) {
                    None => {
                        excluded.push(exclude(&a.instance, format!("no array at path {}", path())))
                    }
                    Some(items) => {
                        for item in items {
                            let key = canonical(at(item, &r.key_path).unwrap_or(item));
                            if seen.insert(key) {
                                out.push(item.clone());
                            }
                        }
                    }
                }
            }
            Value::Array(out)
        }
    };
    Reduced {
        value,
        excluded,
        tie,
    }
}

/// How a dispatch stands, from its peers' outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep waiting.
    Running,
    Completed,
    Degraded,
    Failed,
}

/// What is known of a dispatch at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Tally {
    pub quorum: Quorum,
    pub min: usize,
    pub max: usize,
    pub if_under_min: IfUnderMin,
    /// `first` reducers may finish at the first good answer.
    pub first_wins: bool,
    /// Peers sent to so far.
    pub selected: usize,
    /// Good answers so far.
    pub ok: usize,
    /// Peers that can still answer (their task is pending or running).
    pub outstanding: usize,
    pub deadline_passed: bool,
}

/// The quorum rule.
pub fn verdict(t: Tally) -> Verdict {
    let needed = match t.quorum {
        Quorum::Single => 1,
        Quorum::Multi => t.min.max(1),
        Quorum::Any => 1,
    };
    let enough_now = match t.quorum {
        Quorum::Single => t.ok >= 1,
        Quorum::Multi => t.ok >= t.max.max(needed) || (t.ok >= needed && t.outstanding == 0),
        Quorum::Any => (t.first_wins && t.ok >= 1) || (t.outstanding == 0 && t.selected > 0),
    };
    if enough_now {
        return if t.ok >= needed {
            Verdict::Completed
        } else {
            under_min(t)
        };
    }
    if t.deadline_passed || (t.outstanding == 0 && t.if_under_min != IfUnderMin::Wait) {
        if t.ok >= needed && t.quorum != Quorum::Single {
            return Verdict::Completed;
        }
        if t.outstanding == 0 && t.if_under_min == IfUnderMin::Wait && !t.deadline_passed {
            return Verdict::Running;
        }
        return under_min(t);
    }
    Verdict::Running
}

fn under_min(t: Tally) -> Verdict {
    match t.if_under_min {
        IfUnderMin::Fail => Verdict::Failed,
        IfUnderMin::Degraded | IfUnderMin::Wait => {
            if t.deadline_passed || t.if_under_min == IfUnderMin::Degraded {
                Verdict::Degraded
            } else {
                Verdict::Running
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ans(i: &str, v: Value) -> Answer {
        Answer {
            instance: i.into(),
            result: v,
        }
    }
    fn red(kind: ReducerKind, path: Option<&str>) -> Reducer {
        Reducer {
            kind,
            path: path.map(Into::into),
            weight_path: None,
            score_path: None,
            key_path: None,
        }
    }

    #[test]
    fn majority_reports_ties() {
        let r = red(ReducerKind::Majority, Some("/verdict"));
        let a = [
            ans("a", json!({"verdict": "ok"})),
            ans("b", json!({"verdict": "ok"})),
            ans("c", json!({"verdict": "no"})),
        ];
        let out = reduce(&r, &a);
        assert_eq!(out.value["value"], "ok");
        assert!(out.tie.is_none());
        let out = reduce(&r, &a[1..]);
        assert_eq!(out.value["tie"], true);
        assert_eq!(out.tie.unwrap().len(), 2);
        let out = reduce(&r, &[ans("x", json!(5))]);
        assert_eq!(out.excluded[0]["instance"], "x");
    }

    #[test]
    fn majority_compares_canonical_json() {
        let r = red(ReducerKind::Majority, None);
        let out = reduce(
            &r,
            &[
                ans("a", json!({"x": 1, "y": 2})),
                ans("b", json!({"y": 2, "x": 1})),
                ans("c", json!(3)),
            ],
        );
        assert_eq!(out.value["value"], json!({"x": 1, "y": 2}));
    }

    #[test]
    fn means_and_fedavg() {
        let mut r = red(ReducerKind::WeightedMean, Some("/v"));
        r.weight_path = Some("/n".into());
        let out = reduce(
            &r,
            &[
                ans("a", json!({"v": 1.0, "n": 1})),
                ans("b", json!({"v": 4.0, "n": 2})),
                ans("c", json!({"v": "x"})),
            ],
        );
        assert_eq!(out.value, json!(3.0));
        assert_eq!(out.excluded.len(), 1);
        let mut f = red(ReducerKind::Fedavg, Some("/g"));
        f.weight_path = Some("/n".into());
        let out = reduce(
            &f,
            &[
                ans("a", json!({"g": [1.0, 2.0], "n": 1})),
                ans("b", json!({"g": [3.0, 4.0], "n": 3})),
                ans("c", json!({"g": [1.0], "n": 1})),
            ],
        );
        assert_eq!(out.value, json!([2.5, 3.5]));
        assert!(out.excluded[0]["reason"]
            .as_str()
            .unwrap()
            .contains("length"));
    }

    #[test]
    fn best_of_first_and_union() {
        let mut r = red(ReducerKind::BestOf, Some("/text"));
        r.score_path = Some("/score".into());
        let out = reduce(
            &r,
            &[
                ans("a", json!({"score": 2, "text": "x"})),
                ans("b", json!({"score": 2, "text": "y"})),
                ans("c", json!({"score": 1})),
            ],
        );
        assert_eq!(out.value["instance"], "a", "ties go to the earliest");
        assert_eq!(out.value["value"], "x");
        let first = reduce(
            &red(ReducerKind::First, None),
            &[ans("a", json!(1)), ans("b", json!(2))],
        );
        assert_eq!(first.value, json!(1));
        let mut u = red(ReducerKind::Union, Some("/hits"));
        u.key_path = Some("/id".into());
        let out = reduce(
            &u,
            &[
                ans("a", json!({"hits": [{"id": 1, "s": 0.1}, {"id": 2}]})),
                ans("b", json!({"hits": [{"id": 2, "s": 9}, {"id": 3}]})),
                ans("c", json!({"hits": "nope"})),
            ],
        );
        assert_eq!(
            out.value,
            json!([{"id": 1, "s": 0.1}, {"id": 2}, {"id": 3}])
        );
        assert_eq!(out.excluded.len(), 1);
    }

    #[test]
    fn paths_must_be_pointers() {
        let r = red(ReducerKind::Majority, Some("verdict"));
        assert_eq!(r.validate().unwrap_err().details["field"], "reducer.path");
        assert!(red(ReducerKind::BestOf, None).validate().is_err());
    }

    fn tally(
        quorum: Quorum,
        min: usize,
        max: usize,
        ok: usize,
        outstanding: usize,
        deadline: bool,
        iu: IfUnderMin,
    ) -> Verdict {
        verdict(Tally {
            quorum,
            min,
            max,
            if_under_min: iu,
            first_wins: false,
            selected: ok + outstanding,
            ok,
            outstanding,
            deadline_passed: deadline,
        })
    }

    #[test]
    fn quorum_rules() {
        use IfUnderMin::*;
        use Quorum::*;
        assert_eq!(tally(Single, 1, 1, 1, 0, false, Fail), Verdict::Completed);
        assert_eq!(tally(Single, 1, 1, 0, 1, false, Fail), Verdict::Running);
        assert_eq!(tally(Single, 1, 1, 0, 0, false, Fail), Verdict::Failed);
        assert_eq!(
            tally(Multi, 2, 3, 2, 1, false, Fail),
            Verdict::Running,
            "waits for the third while time remains"
        );
        assert_eq!(tally(Multi, 2, 3, 2, 1, true, Fail), Verdict::Completed);
        assert_eq!(tally(Multi, 2, 3, 3, 0, false, Fail), Verdict::Completed);
        assert_eq!(tally(Multi, 2, 3, 1, 0, false, Fail), Verdict::Failed);
        assert_eq!(tally(Multi, 2, 3, 1, 0, false, Degraded), Verdict::Degraded);
        assert_eq!(tally(Multi, 2, 3, 1, 0, false, Wait), Verdict::Running);
        assert_eq!(tally(Multi, 2, 3, 1, 0, true, Wait), Verdict::Degraded);
        assert_eq!(tally(Any, 1, 0, 2, 0, false, Fail), Verdict::Completed);
        assert_eq!(tally(Any, 1, 0, 0, 0, true, Degraded), Verdict::Degraded);
    }

    proptest! {
        #[test]
        fn reducers_never_panic_and_exclusions_are_peers(values in proptest::collection::vec(any::<i16>(), 0..8), kind in 0usize..7) {
            let kinds = [ReducerKind::First, ReducerKind::All, ReducerKind::Majority, ReducerKind::WeightedMean, ReducerKind::Fedavg, ReducerKind::BestOf, ReducerKind::Union];
            let mut r = red(kinds[kind], Some("/v"));
            r.score_path = Some("/v".into());
            let answers: Vec<Answer> = values.iter().enumerate().map(|(i, v)| ans(&format!("p{i}"), if v % 3 == 0 { json!({"v": [*v]}) } else { json!({"v": *v}) })).collect();
            let out = reduce(&r, &answers);
            prop_assert!(out.excluded.len() <= answers.len());
        }

        /// Any pointer text a caller can send: validation either refuses it naming
        /// the field, or every reducer evaluates it over arbitrary JSON without panicking.
        #[test]
        fn any_json_pointer_validates_or_evaluates(
            path in "(/([a-z0-9~]|~0|~1|-){0,4}){0,4}|.{0,12}",
            kind in 0usize..7,
            values in proptest::collection::vec(any::<i8>(), 0..6),
        ) {
            let kinds = [ReducerKind::First, ReducerKind::All, ReducerKind::Majority, ReducerKind::WeightedMean, ReducerKind::Fedavg, ReducerKind::BestOf, ReducerKind::Union];
            let mut r = red(kinds[kind], Some(&path));
            r.score_path = Some(path.clone());
            r.weight_path = Some(path.clone());
            r.key_path = Some(path.clone());
            match r.validate() {
                Err(e) => prop_assert!(e.details.to_string().contains("reducer.")),
                Ok(()) => {
                    let answers: Vec<Answer> = values.iter().enumerate().map(|(i, v)| ans(&format!("p{i}"), json!({"a": [*v, {"b": *v}], "~": *v, "/": [*v]}))).collect();
                    let out = reduce(&r, &answers);
                    prop_assert!(out.excluded.len() <= answers.len());
                }
            }
        }

        #[test]
        fn weighted_mean_is_between_min_and_max(values in proptest::collection::vec(-1000i32..1000, 1..10)) {
            let r = red(ReducerKind::WeightedMean, Some("/v"));
            let answers: Vec<Answer> = values.iter().map(|v| ans("p", json!({"v": v}))).collect();
            let m = reduce(&r, &answers).value.as_f64().unwrap();
            let lo = *values.iter().min().unwrap() as f64;
            let hi = *values.iter().max().unwrap() as f64;
            prop_assert!(m >= lo - 1e-9 && m <= hi + 1e-9);
        }

        #[test]
        fn a_finished_verdict_never_returns_to_running_as_time_passes(ok in 0usize..5, outstanding in 0usize..5, min in 1usize..4, q in 0usize..3, iu in 0usize..3) {
            let quorum = [Quorum::Single, Quorum::Multi, Quorum::Any][q];
            let if_under_min = [IfUnderMin::Fail, IfUnderMin::Degraded, IfUnderMin::Wait][iu];
            let t = Tally { quorum, min, max: min + 2, if_under_min, first_wins: false, selected: ok + outstanding, ok, outstanding, deadline_passed: true };
            prop_assert_ne!(verdict(t), Verdict::Running, "the deadline always ends a dispatch");
        }
    }
}

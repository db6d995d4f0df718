//! Recall scoring (DESIGN §5): reciprocal-rank fusion of the full-text and vector
//! rankings, weighted by recency.
//!
//! Why rank fusion rather than adding scores: BM25 scores are unbounded and depend
//! on the corpus, cosine similarities live in [-1, 1] and depend on the model;
//! adding them needs per-corpus tuning, while ranks are comparable as they are
//! (Cormack et al., "Reciprocal Rank Fusion outperforms Condorcet and individual
//! rank learning methods", SIGIR 2009). Scores are normalized so that a hit ranked
//! first in every list used scores 1.0 before recency.

use crate::memory::Explain;
use std::collections::HashMap;
use std::hash::Hash;

/// The RRF constant: damps the difference between the first few ranks.
pub const RRF_K: f32 = 60.0;

/// One list's contribution for a 1-based rank.
pub fn rrf(rank: u32) -> f32 {
    1.0 / (RRF_K + rank as f32)
}

/// The recency factor: 1 for a memory created now, ½ after one half-life.
/// Without a half-life (or for a memory from the future) it is 1. It never reaches
/// 0: a very old hit still ranks (last, in its relevance order) instead of tying
/// with everything else at a score of zero.
pub fn recency(age_ms: i64, half_life_ms: Option<i64>) -> f32 {
    match half_life_ms {
        Some(h) if h > 0 && age_ms > 0 => (0.5f64.powf(age_ms as f64 / h as f64) as f32).max(1e-30),
        _ => 1.0,
    }
}

/// A fused hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused<K> {
    pub key: K,
    pub score: f32,
    pub explain: Explain,
}

/// Fuses the full-text ranking (`(key, bm25)`, best first) and the vector ranking
/// (`(key, cosine)`, best first), weights each hit by `recency(age(key))`, and
/// returns the best `limit`, best first (ties broken by key, so the answer is
/// deterministic). `lists` is how many rankings the search used (1 for full-text
/// only, 2 for hybrid), for normalization; an empty list still counts if it was
/// used (no vector hit is information).
pub fn fuse<K: Clone + Eq + Hash + Ord>(
    bm25: &[(K, f32)],
    vector: &[(K, f32)],
    lists: u32,
    age_ms: impl Fn(&K) -> i64,
    half_life_ms: Option<i64>,
    limit: usize,
) -> Vec<Fused<K>> {
    let mut by_key: HashMap<K, Explain> = HashMap::new();
    for (i, (k, s)) in bm25.iter().enumerate() {
        let e = by_key.entry(k.clone()).or_default();
        if e.bm25_rank.is_none() {
            e.bm25 = Some(*s);
            e.bm25_rank = Some(i as u32 + 1);
        }
    }
    for (i, (k, s)) in vector.iter().enumerate() {
        let e = by_key.entry(k.clone()).or_default();
        if e.vector_rank.is_none() {
            e.vector = Some(*s);
            e.vector_rank = Some(i as u32 + 1);
        }
    }
    let best = lists.max(1) as f32 * rrf(1);
    let mut out: Vec<Fused<K>> = by_key
        .into_iter()
        .map(|(key, mut explain)| {
            let raw = explain.bm25_rank.map(rrf).unwrap_or(0.0)
                + explain.vector_rank.map(rrf).unwrap_or(0.0);
            explain.recency = recency(age_ms(&key), half_life_ms);
            Fused {
                score: raw / best * explain.recency,
                key,
                explain,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.key.cmp(&b.key))
    });
    out.truncate(limit);
    out
}

/// Cosine similarity; 0 when either vector is zero or the lengths differ.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0f32, 0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Scales a vector to unit length (a zero vector stays zero), so that cosine
/// similarity becomes a dot product in the ANN index.
pub fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_in_both_lists_scores_one() {
        let f = fuse(
            &[(1, 9.0), (2, 3.0)],
            &[(1, 0.9), (3, 0.5)],
            2,
            |_| 0,
            None,
            10,
        );
        assert_eq!(f[0].key, 1);
        assert!((f[0].score - 1.0).abs() < 1e-6);
        assert_eq!(f[0].explain.bm25_rank, Some(1));
        assert_eq!(f[0].explain.vector_rank, Some(1));
        assert_eq!(f.len(), 3);
    }

    #[test]
    fn a_hit_in_both_lists_beats_a_hit_in_one() {
        // 2 is second in both; 1 is first in text only; 3 first in vectors only.
        let f = fuse(
            &[(1, 9.0), (2, 3.0)],
            &[(3, 0.9), (2, 0.8)],
            2,
            |_| 0,
            None,
            10,
        );
        assert_eq!(f[0].key, 2);
    }

    #[test]
    fn recency_halves_per_half_life() {
        assert!((recency(1000, Some(1000)) - 0.5).abs() < 1e-6);
        assert!((recency(2000, Some(1000)) - 0.25).abs() < 1e-6);
        assert_eq!(recency(5000, None), 1.0);
        assert_eq!(recency(-5, Some(10)), 1.0);
        // Found by the property test: a very old hit must not score zero.
        assert!(recency(19_000, Some(1)) > 0.0);
        let f = fuse(
            &[(1, 9.0), (2, 8.0)],
            &[],
            1,
            |k| if *k == 1 { 10_000 } else { 0 },
            Some(1000),
            10,
        );
        assert_eq!(f[0].key, 2, "an old first hit loses to a fresh second one");
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-6);
        assert_eq!(cosine(&[1.0], &[1.0, 2.0]), 0.0);
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6);
    }

    proptest! {
        #[test]
        fn fused_scores_are_bounded_sorted_and_limited(
            a in proptest::collection::vec(0u32..50, 0..30),
            b in proptest::collection::vec(0u32..50, 0..30),
            limit in 0usize..40,
            hl in proptest::option::of(1i64..100_000),
        ) {
            let bm: Vec<(u32, f32)> = a.iter().map(|k| (*k, 1.0)).collect();
            let ve: Vec<(u32, f32)> = b.iter().map(|k| (*k, 0.5)).collect();
            let f = fuse(&bm, &ve, 2, |k| *k as i64 * 1000, hl, limit);
            prop_assert!(f.len() <= limit);
            for w in f.windows(2) {
                prop_assert!(w[0].score >= w[1].score);
            }
            for h in &f {
                prop_assert!(h.score > 0.0 && h.score <= 1.0 + 1e-6);
                prop_assert!(h.explain.bm25_rank.is_some() || h.explain.vector_rank.is_some());
            }
        }
    }
}

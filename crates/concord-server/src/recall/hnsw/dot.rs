//! The distance kernel: a query in `f32` against a stored vector in `f16`.
//!
//! Why stored vectors are half precision: a graph walk reads vectors at
//! random from an arena far larger than the cache, so a distance costs its
//! bytes, not its arithmetic (the fused multiply-adds waited on their loads in
//! `perf annotate`). Half the bytes made insertion 30–40% faster in process
//! (100,000 corpus-like 384-d vectors) and halve the index's memory. Rounding a unit vector's components to 11 significant
//! bits moves a cosine by about 10⁻⁴, far below the gaps that order recall
//! results. The memory log keeps every embedding in `f32`; only this derived
//! index rounds.

use half::f16;

/// Rounds `v` to half precision, appending it to `out`.
pub fn extend_half(out: &mut Vec<f16>, v: &[f32]) {
    out.extend(v.iter().map(|&x| f16::from_f32(x)));
}

/// A stored vector back in `f32`, into `out` (cleared first). Candidates are
/// widened once to be compared with many others, so this is on the hot path
/// too, and `half`'s portable conversion was slower than the distances.
pub fn widen(v: &[f16], out: &mut Vec<f32>) {
    out.clear();
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU was just found to support both.
        return unsafe { avx2::widen(v, out) };
    }
    out.extend(v.iter().map(|x| x.to_f32()));
}

/// Dot product of a query and a stored vector of the same dimension.
///
/// AVX2 with FMA and F16C where the CPU has them, otherwise a portable loop.
/// The release build targets baseline x86-64, so only a run-time check can use
/// them; the check is one cached load, and on a given machine every call takes
/// the same path, so a rebuild from the same log is still the same graph.
#[inline]
pub fn dot(q: &[f32], v: &[f16]) -> f32 {
    debug_assert_eq!(q.len(), v.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU was just found to support all three.
        return unsafe { avx2::dot(q, v) };
    }
    dot_portable(q, v)
}

/// Independent accumulators, so that the compiler vectorizes the sums.
#[inline]
pub(super) fn dot_portable(q: &[f32], v: &[f16]) -> f32 {
    let mut acc = [0f32; 8];
    let (cq, cv) = (q.chunks_exact(8), v.chunks_exact(8));
    let (rq, rv) = (cq.remainder(), cv.remainder());
    for (x, y) in cq.zip(cv) {
        for ((s, p), h) in acc.iter_mut().zip(x).zip(y) {
            *s += p * h.to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in rq.iter().zip(rv) {
        s += x * y.to_f32();
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Four 8-lane accumulators, so that consecutive FMAs do not wait on each
    /// other's latency; each 8 halves are widened with one `vcvtph2ps`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(q: &[f32], v: &[f16]) -> f32 {
        let n = q.len().min(v.len());
        let (pq, pv) = (q.as_ptr(), v.as_ptr().cast::<__m128i>());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 lanes at an offset `i` with `i + 8 <= n`,
        // inside both slices (`f16` is two bytes, so 8 of them are one
        // unaligned 128-bit load at `pv + i / 8`).
        unsafe {
            while i + 32 <= n {
                for (k, s) in acc.iter_mut().enumerate() {
                    let x = _mm256_loadu_ps(pq.add(i + 8 * k));
                    let y = _mm256_cvtph_ps(_mm_loadu_si128(pv.add(i / 8 + k)));
                    *s = _mm256_fmadd_ps(x, y, *s);
                }
                i += 32;
            }
            while i + 8 <= n {
                let x = _mm256_loadu_ps(pq.add(i));
                let y = _mm256_cvtph_ps(_mm_loadu_si128(pv.add(i / 8)));
                acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
                i += 8;
            }
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0f32; 8];
        // SAFETY: `lanes` holds exactly 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
        let mut total: f32 = lanes.iter().sum();
        for (x, y) in q[i..n].iter().zip(&v[i..n]) {
            total += x * y.to_f32();
        }
        total
    }

    /// Appends `v` widened to `out`, eight lanes per `vcvtph2ps`.
    ///
    /// # Safety
    /// The CPU must support AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub unsafe fn widen(v: &[f16], out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + v.len(), 0.0);
        let dst = &mut out[start..];
        let whole = v.len() / 8 * 8;
        let (pv, pd) = (v.as_ptr().cast::<__m128i>(), dst.as_mut_ptr());
        // SAFETY: each step reads 8 halves and writes 8 floats at `i < whole`,
        // inside `v` and `dst`, which have the same length.
        unsafe {
            for i in (0..whole).step_by(8) {
                _mm256_storeu_ps(pd.add(i), _mm256_cvtph_ps(_mm_loadu_si128(pv.add(i / 8))));
            }
        }
        for (d, h) in dst[whole..].iter_mut().zip(&v[whole..]) {
            *d = h.to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_agree_with_the_plain_sum_of_the_rounded_vector_at_every_length() {
        let mut s = 17u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 384, 1536] {
            let q: Vec<f32> = (0..len).map(|_| next()).collect();
            let v: Vec<f32> = (0..len).map(|_| next()).collect();
            let mut h = Vec::new();
            extend_half(&mut h, &v);
            let plain: f64 = q.iter().zip(&h).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            for got in [dot(&q, &h), dot_portable(&q, &h)] {
                assert!(
                    (got as f64 - plain).abs() < 1e-4,
                    "len {len}: {got} vs {plain}"
                );
            }
            // Rounding to half precision moves the product only a little.
            let exact: f64 = q.iter().zip(&v).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((plain - exact).abs() < 1e-3 * (len as f64).sqrt().max(1.0));
            let mut back = Vec::new();
            widen(&h, &mut back);
            assert!(back
                .iter()
                .zip(&v)
                .all(|(b, x)| (b - x).abs() <= x.abs() / 1024.0 + 1e-7));
        }
    }
}

//! Vector math for attention rows: `exp` over a row of logits and Keyformer's Gumbel noise for
//! a row of key positions, eight lanes at a time with AVX2, each with a scalar twin that gives
//! the same bits (the same f32 operations in the same order, no fused multiply-add).
//!
//! `exp` follows Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-5 polynomial for
//! e^r, then scaling by 2^n through the exponent bits); the noise is
//! [`keyformer_kv::noise`]'s definition (an integer hash whose top bits index a table of
//! Gumbel quantiles: a gather, no logarithm).

use keyformer_kv::noise::{self, LN2_HI, LN2_LO};

/// Below this, `exp` is 0 (e^-87.3 is the smallest normal f32); above [`EXP_MAX`] it saturates (at e^88, not infinity).
const EXP_MIN: f32 = -87.336_55;
const EXP_MAX: f32 = 88.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Cephes expf's polynomial for e^r - 1 - r, over r^2, highest degree first.
const EXP_POLY: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];

/// `e^x` to about 1 ulp; exactly 0 below [`EXP_MIN`] (so masked logits at -inf give 0).
pub fn exp_scalar(x: f32) -> f32 {
    if x < EXP_MIN {
        return 0.0;
    }
    let x = x.min(EXP_MAX);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI;
    let r = r - n * LN2_LO;
    let z = r * r;
    let mut y = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        y = y * r + c;
    }
    let y = y * z + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// `x[i] = e^x[i]` for the whole row.
pub fn exp_in_place(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time).
        return unsafe { x86::exp_in_place(x) };
    }
    x.iter_mut().for_each(|v| *v = exp_scalar(*v));
}

/// The largest value of a row (-inf when empty).
pub fn row_max(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time).
        return unsafe { x86::row_max(x) };
    }
    row_max_scalar(x)
}

pub fn row_max_scalar(x: &[f32]) -> f32 {
    x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `y[i] = (x[i] + g[i]) * s` (-inf stays -inf); returns the largest `y`.
pub fn add_scale_max(x: &[f32], g: &[f32], s: f32, y: &mut [f32]) -> f32 {
    assert!(x.len() == g.len() && x.len() == y.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time); lengths checked above.
        return unsafe { x86::add_scale_max(x, g, s, y) };
    }
    add_scale_max_scalar(x, g, s, y)
}

pub fn add_scale_max_scalar(x: &[f32], g: &[f32], s: f32, y: &mut [f32]) -> f32 {
    let mut m = f32::NEG_INFINITY;
    for ((yv, &xv), &gv) in y.iter_mut().zip(x).zip(g) {
        *yv = (xv + gv) * s;
        m = m.max(*yv);
    }
    m
}

/// `x[i] = e^(x[i] - m)` (the numerators of a softmax whose max is `m`); returns their sum.
pub fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time).
        return unsafe { x86::exp_shifted_sum(x, m) };
    }
    exp_shifted_sum_scalar(x, m)
}

/// The scalar twin of [`exp_shifted_sum`]: the same values bit for bit; the sum in another order.
pub fn exp_shifted_sum_scalar(x: &mut [f32], m: f32) -> f32 {
    x.iter_mut()
        .map(|v| {
            *v = exp_scalar(*v - m);
            *v
        })
        .sum()
}

/// Gumbel(0, 1) noise of a row whose key is `key` (see [`noise::NoiseRow`]) for each position.
pub fn gumbel_row(key: u32, positions: &[u32], out: &mut [f32]) {
    assert_eq!(positions.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time).
        return unsafe { x86::gumbel_row(key, positions, out) };
    }
    gumbel_row_scalar(key, positions, out)
}

pub fn gumbel_row_scalar(key: u32, positions: &[u32], out: &mut [f32]) {
    for (o, &p) in out.iter_mut().zip(positions) {
        *o = noise::gumbel_of_hash(noise::position_hash(key, p));
    }
}

/// Keyformer's noisy softmax numerators in one pass: `out[i] = e^((x[i] + g[i]) * inv_tau -
/// shift)`, `g[i]` the Gumbel draw of `positions[i]` under the row key `key`; returns their
/// sum. With `shift = (max x + GUMBEL_TABLE_MAX) * inv_tau` no exponent exceeds 0 and the
/// largest numerator is at least e^-14.3 / tau, so no max pass is needed.
pub fn gumbel_exp_sum(x: &[f32], key: u32, positions: &[u32], inv_tau: f32, shift: f32, out: &mut [f32]) -> f32 {
    assert!(x.len() == positions.len() && x.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 is present (checked at run time); lengths checked above.
        return unsafe { x86::gumbel_exp_sum(x, key, positions, inv_tau, shift, out) };
    }
    gumbel_exp_sum_scalar(x, key, positions, inv_tau, shift, out)
}

/// The scalar twin of [`gumbel_exp_sum`]: the same values bit for bit; the sum in another order.
pub fn gumbel_exp_sum_scalar(x: &[f32], key: u32, positions: &[u32], inv_tau: f32, shift: f32, out: &mut [f32]) -> f32 {
    let mut sum = 0.0;
    for ((o, &xv), &p) in out.iter_mut().zip(x).zip(positions) {
        *o = exp_scalar((xv + noise::gumbel_of_hash(noise::position_hash(key, p))) * inv_tau - shift);
        sum += *o;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::quant::dot::x86::hsum;

    #[target_feature(enable = "avx2")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let zero_mask = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_LT_OQ);
        let x = _mm256_min_ps(x, _mm256_set1_ps(EXP_MAX));
        let n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _mm256_set1_ps(0.5)));
        let r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)));
        let z = _mm256_mul_ps(r, r);
        let mut y = _mm256_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            y = _mm256_add_ps(_mm256_mul_ps(y, r), _mm256_set1_ps(*c));
        }
        let y = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(y, z), r), _mm256_set1_ps(1.0));
        // n is within [-126, 128] here; below the clamp the lane is zeroed anyway.
        let ni = _mm256_max_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(-126));
        let scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
        _mm256_andnot_ps(zero_mask, _mm256_mul_ps(y, scale))
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hmax(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn row_max(x: &[f32]) -> f32 {
        let mut acc = _mm256_set1_ps(f32::NEG_INFINITY);
        let chunks = x.chunks_exact(8);
        let tail = row_max_scalar(chunks.remainder());
        for c in chunks {
            acc = _mm256_max_ps(acc, _mm256_loadu_ps(c.as_ptr()));
        }
        hmax(acc).max(tail)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn add_scale_max(x: &[f32], g: &[f32], s: f32, y: &mut [f32]) -> f32 {
        let n = x.len() / 8 * 8;
        let (vs, mut acc) = (_mm256_set1_ps(s), _mm256_set1_ps(f32::NEG_INFINITY));
        for i in (0..n).step_by(8) {
            let v = _mm256_mul_ps(
                _mm256_add_ps(_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(g.as_ptr().add(i))),
                vs,
            );
            _mm256_storeu_ps(y.as_mut_ptr().add(i), v);
            acc = _mm256_max_ps(acc, v);
        }
        hmax(acc).max(add_scale_max_scalar(&x[n..], &g[n..], s, &mut y[n..]))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
        let (vm, mut acc) = (_mm256_set1_ps(m), _mm256_setzero_ps());
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vm));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        hsum(acc) + exp_shifted_sum_scalar(chunks.into_remainder(), m)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn exp_in_place(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = exp_scalar(*v));
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn gumbel_row(key: u32, positions: &[u32], out: &mut [f32]) {
        let n = positions.len() / 8 * 8;
        let (k, table) = (_mm256_set1_epi32(key as i32), noise::gumbel_table().as_ptr());
        for i in (0..n).step_by(8) {
            let p = _mm256_loadu_si256(positions.as_ptr().add(i) as *const __m256i);
            _mm256_storeu_ps(out.as_mut_ptr().add(i), gumbel8(table, p, k));
        }
        gumbel_row_scalar(key, &positions[n..], &mut out[n..]);
    }

    /// Eight Gumbel draws: [`noise::position_hash`] of the positions under the row key, whose
    /// top bits index the quantile table.
    #[target_feature(enable = "avx2")]
    unsafe fn gumbel8(table: *const f32, p: __m256i, k: __m256i) -> __m256 {
        let mut h = _mm256_xor_si256(_mm256_mullo_epi32(p, _mm256_set1_epi32(0x9E37_79B9u32 as i32)), k);
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0x85EB_CA6Bu32 as i32));
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
        h = _mm256_mullo_epi32(h, _mm256_set1_epi32(0xC2B2_AE35u32 as i32));
        h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
        const SHIFT: i32 = 32 - noise::GUMBEL_TABLE_BITS as i32;
        _mm256_i32gather_ps::<4>(table, _mm256_srli_epi32::<SHIFT>(h))
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn gumbel_exp_sum(
        x: &[f32],
        key: u32,
        positions: &[u32],
        inv_tau: f32,
        shift: f32,
        out: &mut [f32],
    ) -> f32 {
        let n = positions.len() / 8 * 8;
        let (k, table) = (_mm256_set1_epi32(key as i32), noise::gumbel_table().as_ptr());
        let (vt, vs, mut acc) = (_mm256_set1_ps(inv_tau), _mm256_set1_ps(shift), _mm256_setzero_ps());
        // The draws of a block first, then their exponentials: kept apart, the gathers of a
        // block overlap each other instead of waiting behind the exponentials.
        const BLOCK: usize = 64;
        let mut g = [0f32; BLOCK];
        for start in (0..n).step_by(BLOCK) {
            let len = BLOCK.min(n - start);
            for i in (0..len).step_by(8) {
                let p = _mm256_loadu_si256(positions.as_ptr().add(start + i) as *const __m256i);
                _mm256_storeu_ps(g.as_mut_ptr().add(i), gumbel8(table, p, k));
            }
            for i in (0..len).step_by(8) {
                let xg = _mm256_add_ps(_mm256_loadu_ps(x.as_ptr().add(start + i)), _mm256_loadu_ps(g.as_ptr().add(i)));
                let e = exp8(_mm256_sub_ps(_mm256_mul_ps(xg, vt), vs));
                _mm256_storeu_ps(out.as_mut_ptr().add(start + i), e);
                acc = _mm256_add_ps(acc, e);
            }
        }
        hsum(acc) + gumbel_exp_sum_scalar(&x[n..], key, &positions[n..], inv_tau, shift, &mut out[n..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dot::tests::Lcg;

    #[test]
    fn exp_is_within_two_ulp_and_zero_below_the_normal_range() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp();
            worst = worst.max((exp_scalar(x) as f64 - exact).abs() / (exact * f32::EPSILON as f64));
            x += 0.013;
        }
        assert!(worst <= 2.0, "worst {worst} ulp");
        assert_eq!(exp_scalar(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_scalar(-100.0), 0.0);
        assert_eq!(exp_scalar(0.0), 1.0);
    }

    #[test]
    fn fused_row_helpers_equal_their_scalar_twins() {
        let mut rng = Lcg(17);
        for n in [0usize, 1, 7, 8, 9, 31, 100, 1027] {
            let mut x: Vec<f32> = (0..n).map(|_| (rng.f32() - 0.5) * 40.0).collect();
            if n > 2 {
                x[1] = f32::NEG_INFINITY;
            }
            let g: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
            assert_eq!(row_max(&x).to_bits(), row_max_scalar(&x).to_bits(), "max n={n}");
            let (mut y1, mut y2) = (vec![0f32; n], vec![0f32; n]);
            let m1 = add_scale_max(&x, &g, 0.7, &mut y1);
            let m2 = add_scale_max_scalar(&x, &g, 0.7, &mut y2);
            assert_eq!((m1.to_bits(), &y1), (m2.to_bits(), &y2), "add_scale_max n={n}");
            let (mut e1, mut e2) = (x.clone(), x.clone());
            let m = row_max_scalar(&x);
            let s1 = exp_shifted_sum(&mut e1, m);
            let s2 = exp_shifted_sum_scalar(&mut e2, m);
            assert_eq!(
                e1.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                e2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert!((s1 - s2).abs() <= 1e-5 * s2.max(1.0), "sum n={n}: {s1} vs {s2}");
            if n > 0 {
                assert!(s2 >= 1.0, "the max contributes e^0");
            }
        }
    }

    #[test]
    fn vector_exp_and_noise_equal_their_scalar_twins_bit_for_bit() {
        let mut rng = Lcg(3);
        for n in [0usize, 1, 7, 8, 9, 31, 100, 1027] {
            let mut x: Vec<f32> = (0..n).map(|_| (rng.f32() - 0.5) * 200.0).collect();
            if n > 3 {
                x[1] = f32::NEG_INFINITY;
                x[2] = -87.0;
                x[3] = 0.0;
            }
            let want: Vec<u32> = x.iter().map(|&v| exp_scalar(v).to_bits()).collect();
            let mut got = x.clone();
            exp_in_place(&mut got);
            assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want, "exp n={n}");

            let positions: Vec<u32> = (0..n as u32).map(|i| i.wrapping_mul(2_654_435_761) ^ 77).collect();
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            gumbel_row(0xDEAD_BEEF, &positions, &mut a);
            gumbel_row_scalar(0xDEAD_BEEF, &positions, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "gumbel n={n}"
            );
        }
        // The fused noisy numerators: the same bits as the scalar twin, and the value of the
        // unfused definition e^((x + g) * inv_tau - shift).
        for n in [0usize, 1, 7, 8, 9, 31, 100, 1027] {
            let mut x: Vec<f32> = (0..n).map(|_| (rng.f32() - 0.5) * 30.0).collect();
            if n > 3 {
                x[2] = f32::NEG_INFINITY;
            }
            let positions: Vec<u32> = (0..n as u32).map(|i| i * 3 + 1).collect();
            let (inv_tau, shift) = (1.0 / 1.37, (15.0 + noise::GUMBEL_TABLE_MAX) / 1.37);
            let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
            let sa = gumbel_exp_sum(&x, 99, &positions, inv_tau, shift, &mut a);
            let sb = gumbel_exp_sum_scalar(&x, 99, &positions, inv_tau, shift, &mut b);
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "gumbel_exp_sum n={n}"
            );
            assert!((sa - sb).abs() <= 1e-5 * sb.max(1e-30), "sum n={n}: {sa} vs {sb}");
            let mut g = vec![0f32; n];
            gumbel_row_scalar(99, &positions, &mut g);
            for i in 0..n {
                let want = (((x[i] + g[i]) * inv_tau - shift) as f64).exp();
                assert!((a[i] as f64 - want).abs() <= 4e-7 * want, "value {i}: {} vs {want}", a[i]);
                assert!(a[i] <= 1.0);
            }
        }
        // The row helper is the noise module's definition.
        let row = noise::NoiseRow::new(keyformer_kv::NoiseKind::Gumbel, 5, 1, 2, 3);
        let mut g = [0f32; 3];
        gumbel_row(row.key[0], &[0, 10, 4000], &mut g);
        assert_eq!(g, [row.sample(0), row.sample(10), row.sample(4000)]);
    }
}

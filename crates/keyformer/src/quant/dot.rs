//! Row-dot kernels: one weight row (any [`GgmlType`]) against one activation vector.
//!
//! For the legacy types and Q4_K/Q5_K/Q6_K the activation is first quantised to [`Q8Block`]s
//! (8-bit values, one f32 scale per 32, as llama.cpp's Q8_1; a K-quant's 32-element sub-blocks
//! each meet one of them) and the dot is done in integers; the AVX2 kernels and their scalar
//! twins compute the same integer sums. Q2_K/Q3_K and float types are dotted against f32
//! activations after dequantising the row one super-block at a time.

use super::{dequantize_row, f16_at, scalar, GgmlType, QK};

/// 32 activations quantised to i8 with one scale; `sum` = `d * sum(qs)` (used by types with
/// an offset, Q4_1 and Q5_1, and by Q4_0's implicit -8).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Q8Block {
    pub d: f32,
    pub sum: f32,
    pub qs: [i8; 32],
}

/// Quantise activations (length a multiple of 32) into `out` (AVX2 where available; the
/// scalar twin [`quantize_q8_scalar`] gives identical blocks).
pub fn quantize_q8(x: &[f32], out: &mut Vec<Q8Block>) {
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        out.clear();
        out.resize(x.len() / QK, Q8Block::default());
        // SAFETY: AVX2 is present (checked at run time); `out` has one block per 32 inputs.
        unsafe { x86::quantize_q8(x, out) };
        return;
    }
    #[cfg(target_arch = "aarch64")]
    {
        out.clear();
        out.resize(x.len() / QK, Q8Block::default());
        neon::quantize_q8(x, out);
        return;
    }
    #[allow(unreachable_code)]
    quantize_q8_scalar(x, out)
}

/// Scalar twin of [`quantize_q8`]: round half to even, as the vector conversion does.
pub fn quantize_q8_scalar(x: &[f32], out: &mut Vec<Q8Block>) {
    out.clear();
    for chunk in x.chunks_exact(QK) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 127.0 / amax } else { 0.0 };
        let mut b = Q8Block { d, sum: 0.0, qs: [0; 32] };
        let mut s = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(chunk) {
            *q = (v * id).round_ties_even() as i8;
            s += *q as i32;
        }
        b.sum = d * s as f32;
        out.push(b);
    }
}

/// Activations prepared for dotting against rows of one weight type.
pub enum PreparedActivations<'a> {
    F32(&'a [f32]),
    Q8(&'a [Q8Block]),
}

/// Reference: dequantise the whole row, then an f32 dot.
pub fn dot_reference(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let mut w = vec![0f32; x.len()];
    dequantize_row(t, row, &mut w);
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

/// Fast dot of one row of type `t` with prepared activations.
#[inline]
pub fn dot_row(t: GgmlType, row: &[u8], act: &PreparedActivations) -> f32 {
    match act {
        PreparedActivations::Q8(a) => dot_q8(t, row, a),
        PreparedActivations::F32(x) => dot_f32(t, row, x),
    }
}

/// Dot of a row of a float type or K-quant with f32 activations.
pub fn dot_f32(t: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    match t {
        GgmlType::F32 => {
            // The mapped bytes need not be 4-aligned: read little-endian words.
            let mut acc = [0f32; 8];
            let mut i = 0;
            for (c, xs) in row.chunks_exact(32).zip(x.chunks_exact(8)) {
                for k in 0..8 {
                    acc[k] += f32::from_le_bytes([c[4 * k], c[4 * k + 1], c[4 * k + 2], c[4 * k + 3]]) * xs[k];
                }
                i += 8;
            }
            let mut s: f32 = acc.iter().sum();
            for j in i..x.len() {
                let c = &row[4 * j..4 * j + 4];
                s += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x[j];
            }
            s
        }
        _ => {
            // Dequantise one block (or 256 floats) at a time into a stack buffer.
            let bs = if t.block_size() == 1 { 256 } else { t.block_size() };
            let row_bytes_per = t.row_bytes(bs);
            let mut buf = [0f32; 256];
            let mut acc = [0f32; 8];
            for (blk, xs) in row.chunks(row_bytes_per).zip(x.chunks(bs)) {
                let w = &mut buf[..xs.len()];
                dequantize_row(t, blk, w);
                let mut wc = w.chunks_exact(8);
                let mut xc = xs.chunks_exact(8);
                for (a, b) in (&mut wc).zip(&mut xc) {
                    for k in 0..8 {
                        acc[k] += a[k] * b[k];
                    }
                }
                for (a, b) in wc.remainder().iter().zip(xc.remainder()) {
                    acc[0] += a * b;
                }
            }
            acc.iter().sum()
        }
    }
}

/// Dot of a legacy-quant row with Q8 activations: dispatches to AVX2 where available.
pub fn dot_q8(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if vnni_available() {
            // SAFETY: the CPU supports AVX-512 VNNI/VL besides AVX2 (checked once at run time).
            unsafe {
                match t {
                    GgmlType::Q4_1 => return x86::dot_q4_1_vnni(row, a),
                    GgmlType::Q5_0 => return x86::dot_q5_0_vnni(row, a),
                    GgmlType::Q8_0 => return x86::dot_q8_0_vnni(row, a),
                    GgmlType::Q4K => return x86::dot_q4_k_vnni(row, a),
                    GgmlType::Q5K => return x86::dot_q5_k_vnni(row, a),
                    GgmlType::Q6K => return x86::dot_q6_k_vnni(row, a),
                    _ => {}
                }
            }
        }
        if simd_available() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked once at run time).
            unsafe {
                match t {
                    GgmlType::Q4_0 => return x86::dot_q4_0(row, a),
                    GgmlType::Q4_1 => return x86::dot_q4_1(row, a),
                    GgmlType::Q5_0 => return x86::dot_q5_0(row, a),
                    GgmlType::Q8_0 => return x86::dot_q8_0(row, a),
                    GgmlType::Q4K => return x86::dot_q4_k(row, a),
                    GgmlType::Q5K => return x86::dot_q5_k(row, a),
                    GgmlType::Q6K => return x86::dot_q6_k(row, a),
                    _ => {}
                }
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    if t.uses_q8_activations() {
        return neon::dot_q8(t, row, a);
    }
    dot_q8_scalar(t, row, a)
}

/// [`dot_q8`] of one weight row with `T` tokens' activations at once: the row's blocks are
/// loaded and unpacked once for all of them. Every `out[t]` is bit for bit
/// `dot_q8(t, row, acts[t])` (the same operations per token in the same order). Returns false,
/// leaving `out` alone, where this CPU or type has no such kernel (call [`dot_q8`] per token).
pub fn dot_q8_tokens<const T: usize>(t: GgmlType, row: &[u8], acts: &[&[Q8Block]; T], out: &mut [f32; T]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() && acts.iter().all(|a| a.len() == acts[0].len()) {
        // SAFETY: the CPU supports AVX-512 VNNI/VL besides AVX2 (checked once at run time); the
        // activations have equal lengths.
        unsafe {
            match t {
                GgmlType::Q4_1 => {
                    x86::dot_q4_1_vnni_tokens(row, acts, out);
                    return true;
                }
                GgmlType::Q8_0 => {
                    x86::dot_q8_0_vnni_tokens(row, acts, out);
                    return true;
                }
                _ => {}
            }
        }
    }
    let _ = (t, row, acts, out);
    false
}

/// Whether [`dot_q8_tokens`] has a kernel for `t` on this CPU.
pub fn has_dot_q8_tokens(t: GgmlType) -> bool {
    #[cfg(target_arch = "x86_64")]
    if vnni_available() {
        return matches!(t, GgmlType::Q4_1 | GgmlType::Q8_0);
    }
    let _ = t;
    false
}

/// Whether the AVX2 kernels run on this CPU (on aarch64 NEON is always there and its kernels
/// are used without asking).
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::env::var_os("KEYFORMER_NO_SIMD").is_none()
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 VNNI kernels (256-bit `vpdpbusd`) run on this CPU; `KEYFORMER_NO_VNNI`
/// turns them off to compare against the AVX2 kernels.
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            simd_available()
                && std::env::var_os("KEYFORMER_NO_VNNI").is_none()
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block's 12 scale bytes.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Scalar twin of the K-quant kernels: per 32-element sub-block the integer sum of the
/// unsigned quant values times the activation's, then `d * scale * d_a * sum - dmin * min *
/// sum_a` (Q4_K/Q5_K) or, for Q6_K's signed values, two scales per sub-block.
fn dot_q8_k_scalar(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
    let bb = t.block_bytes();
    let mut total = 0f32;
    for (b, ab) in row.chunks_exact(bb).zip(a.chunks_exact(8)) {
        match t {
            GgmlType::Q4K | GgmlType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let sc = &b[4..16];
                let (qh, qs) = if t == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                for (j, aj) in ab.iter().enumerate() {
                    let q = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    let mut sumi = 0i32;
                    for l in 0..32 {
                        let mut v = if j % 2 == 0 { q[l] & 0x0F } else { q[l] >> 4 } as i32;
                        if let Some(qh) = qh {
                            v += (((qh[l] >> j) & 1) as i32) << 4;
                        }
                        sumi += v * aj.qs[l] as i32;
                    }
                    let (s, m) = scale_min_k4(j, sc);
                    total += d * s as f32 * aj.d * sumi as f32 - dmin * m as f32 * aj.sum;
                }
            }
            GgmlType::Q6K => {
                let (ql, qh, sc, d) = (&b[0..128], &b[128..192], &b[192..208], f16_at(b, 208));
                for (j, aj) in ab.iter().enumerate() {
                    // Sub-block j: half j / 4 of the super-block, quarter k = j % 4 of it.
                    let (half, k) = (j / 4, j % 4);
                    let (ql, qh) = (&ql[half * 64..half * 64 + 64], &qh[half * 32..half * 32 + 32]);
                    let mut sums = [0i32; 2];
                    for l in 0..32 {
                        let lo = match k {
                            0 => ql[l] & 0x0F,
                            1 => ql[l + 32] & 0x0F,
                            2 => ql[l] >> 4,
                            _ => ql[l + 32] >> 4,
                        };
                        let v = (lo | ((qh[l] >> (2 * k)) & 3) << 4) as i32 - 32;
                        sums[l / 16] += v * aj.qs[l] as i32;
                    }
                    let s = &sc[half * 8 + 2 * k..half * 8 + 2 * k + 2];
                    total += d * aj.d * (s[0] as i8 as f32 * sums[0] as f32 + s[1] as i8 as f32 * sums[1] as f32);
                }
            }
            _ => unreachable!("{t} is not a K-quant with Q8 activations"),
        }
    }
    total
}

/// Scalar twin of the integer kernels: the same integer sums, one block at a time.
pub fn dot_q8_scalar(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
    if matches!(t, GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K) {
        return dot_q8_k_scalar(t, row, a);
    }
    let bb = t.block_bytes();
    let mut total = 0f32;
    for (b, ab) in row.chunks_exact(bb).zip(a) {
        total += match t {
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let d = f16_at(b, 0);
                let (m, qs) = if t == GgmlType::Q4_1 { (f16_at(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                let mut sumi = 0i32;
                for j in 0..16 {
                    sumi += (qs[j] & 0x0F) as i32 * ab.qs[j] as i32 + (qs[j] >> 4) as i32 * ab.qs[j + 16] as i32;
                }
                d * ab.d * sumi as f32 + m * ab.sum
            }
            GgmlType::Q8_0 => {
                let d = f16_at(b, 0);
                let sumi: i32 = (0..32).map(|j| b[2 + j] as i8 as i32 * ab.qs[j] as i32).sum();
                d * ab.d * sumi as f32
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // Reuse the reference dequantiser for the 5-bit unpacking, then integerise.
                let mut w = [0f32; 32];
                if t == GgmlType::Q5_0 {
                    scalar::dequant_q5_0(b, &mut w);
                } else {
                    scalar::dequant_q5_1(b, &mut w);
                }
                w.iter().zip(&ab.qs).map(|(w, &q)| w * q as f32).sum::<f32>() * ab.d
            }
            _ => unreachable!("{t} does not use Q8 activations"),
        };
    }
    total
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Q8Block;
    use std::arch::x86_64::*;

    /// The sum of eight lanes (shared by the CPU backend's x86 kernels).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Two f16 values at `p` as f32 (F16C).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16x2(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    /// 16 bytes of nibbles -> 32 unsigned bytes (low nibbles first, as ggml orders them).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let q = _mm_loadu_si128(p as *const __m128i);
        let m = _mm_set1_epi8(0x0F);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m))
    }

    /// Sum of unsigned x signed byte products as 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul_sum_us8(u: __m256i, s: __m256i) -> __m256 {
        let p16 = _mm256_maddubs_epi16(u, s);
        _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
    }

    /// `sum_i scale_i * products_i` (lanes summed) `+ sum_i offset_i` over `n` blocks, where
    /// the block expression gives block i's `(scale, products, offset)`; even and odd blocks go
    /// to two independent chains to hide the FMA latency. A macro that pastes the block inline
    /// (a closure here measured 5% slower decoding: it was not always inlined).
    macro_rules! two_chain_sum {
        ($n:expr, |$i:ident: usize| $block:expr) => {{
            let n = $n;
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let (mut offs0, mut offs1) = (0f32, 0f32);
            for pair in 0..n / 2 {
                let (s0, p0, o0) = {
                    let $i = 2 * pair;
                    $block
                };
                let (s1, p1, o1) = {
                    let $i = 2 * pair + 1;
                    $block
                };
                acc0 = _mm256_fmadd_ps(s0, p0, acc0);
                acc1 = _mm256_fmadd_ps(s1, p1, acc1);
                offs0 += o0;
                offs1 += o1;
            }
            if n % 2 == 1 {
                let (s, p, o) = {
                    let $i = n - 1;
                    $block
                };
                acc0 = _mm256_fmadd_ps(s, p, acc0);
                offs0 += o;
            }
            hsum(_mm256_add_ps(acc0, acc1)) + (offs0 + offs1)
        }};
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(row: &[u8], a: &[Q8Block]) -> f32 {
        debug_assert!(row.len() >= a.len() * 20);
        let p = row.as_ptr();
        two_chain_sum!(a.len(), |i: usize| {
            let (ab, b) = (a.get_unchecked(i), p.add(i * 20));
            let (d, m) = f16x2(b);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            (_mm256_set1_ps(d * ab.d), mul_sum_us8(nibbles(b.add(4)), y), m * ab.sum)
        })
    }

    /// [`dot_q4_1`] with `vpdpbusd` (one instruction for the byte products and their sums).
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_q4_1_vnni(row: &[u8], a: &[Q8Block]) -> f32 {
        debug_assert!(row.len() >= a.len() * 20);
        let p = row.as_ptr();
        let zero = _mm256_setzero_si256();
        two_chain_sum!(a.len(), |i: usize| {
            let (ab, b) = (a.get_unchecked(i), p.add(i * 20));
            let (d, m) = f16x2(b);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            let products = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, nibbles(b.add(4)), y));
            (_mm256_set1_ps(d * ab.d), products, m * ab.sum)
        })
    }

    /// [`dot_q8_0`] with `vpdpbusd`, two chains.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_q8_0_vnni(row: &[u8], a: &[Q8Block]) -> f32 {
        debug_assert!(row.len() >= a.len() * 34);
        let p = row.as_ptr();
        let zero = _mm256_setzero_si256();
        two_chain_sum!(a.len(), |i: usize| {
            let (ab, b) = (a.get_unchecked(i), p.add(i * 34));
            let (d, _) = f16x2(b);
            let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            // vpdpbusd needs an unsigned operand: move the weight's sign onto the activation.
            let products =
                _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, _mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w)));
            (_mm256_set1_ps(d * ab.d), products, 0.0)
        })
    }

    /// The two-chain block loop of [`two_chain_sum`] for several tokens: `$block` computes a
    /// block's shared part once (from `$i`), then `$token` each token's (scale, products,
    /// offset) from it (`$t`); each token accumulates exactly as the single-token kernel does.
    macro_rules! two_chain_sum_tokens {
        ($n:expr, $out:expr, |$i:ident| $block:expr, |$shared:ident, $t:ident| $token:expr) => {{
            let n = $n;
            let out = $out;
            let mut acc = [[_mm256_setzero_ps(); 2]; T];
            let mut offs = [[0f32; 2]; T];
            let mut step = |blk: usize, chain: usize| {
                let $shared = {
                    let $i = blk;
                    $block
                };
                for $t in 0..T {
                    let (s, p, o) = $token;
                    acc[$t][chain] = _mm256_fmadd_ps(s, p, acc[$t][chain]);
                    offs[$t][chain] += o;
                }
            };
            for pair in 0..n / 2 {
                step(2 * pair, 0);
                step(2 * pair + 1, 1);
            }
            if n % 2 == 1 {
                step(n - 1, 0);
            }
            for t in 0..T {
                out[t] = hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + (offs[t][0] + offs[t][1]);
            }
        }};
    }

    /// [`dot_q4_1_vnni`] for `T` tokens: each block's scales and nibbles once.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_q4_1_vnni_tokens<const T: usize>(row: &[u8], acts: &[&[Q8Block]; T], out: &mut [f32; T]) {
        let n = acts[0].len();
        debug_assert!(row.len() >= n * 20);
        let p = row.as_ptr();
        let zero = _mm256_setzero_si256();
        two_chain_sum_tokens!(
            n,
            out,
            |i| {
                let b = p.add(i * 20);
                let (d, m) = f16x2(b);
                (i, d, m, nibbles(b.add(4)))
            },
            |shared, t| {
                let (i, d, m, w) = shared;
                let ab = acts[t].get_unchecked(i);
                let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                let products = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, w, y));
                (_mm256_set1_ps(d * ab.d), products, m * ab.sum)
            }
        )
    }

    /// [`dot_q8_0_vnni`] for `T` tokens: each block's scale and weights once.
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub unsafe fn dot_q8_0_vnni_tokens<const T: usize>(row: &[u8], acts: &[&[Q8Block]; T], out: &mut [f32; T]) {
        let n = acts[0].len();
        debug_assert!(row.len() >= n * 34);
        let p = row.as_ptr();
        let zero = _mm256_setzero_si256();
        two_chain_sum_tokens!(
            n,
            out,
            |i| {
                let b = p.add(i * 34);
                let (d, _) = f16x2(b);
                let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
                (i, d, w, _mm256_sign_epi8(w, w))
            },
            |shared, t| {
                let (i, d, w, w_abs) = shared;
                let ab = acts[t].get_unchecked(i);
                let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                let products = _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(zero, w_abs, _mm256_sign_epi8(y, w)));
                (_mm256_set1_ps(d * ab.d), products, 0.0)
            }
        )
    }

    /// 32 floats -> one [`Q8Block`] per chunk, round half to even (`vcvtps2dq`).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
        let sign_off = _mm256_set1_ps(-0.0);
        for (chunk, b) in x.chunks_exact(32).zip(out.iter_mut()) {
            let p = chunk.as_ptr();
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let abs = |v: __m256| _mm256_andnot_ps(sign_off, v);
            let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
            let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d > 0.0 { 127.0 / amax } else { 0.0 });
            let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], id));
            let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], id));
            let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], id));
            let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], id));
            // Integer sum of the 32 values, then pack to bytes (the packs interleave lanes:
            // a final permute restores the order).
            let sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            let s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            let w01 = _mm256_packs_epi32(i0, i1);
            let w23 = _mm256_packs_epi32(i2, i3);
            let bytes = _mm256_packs_epi16(w01, w23);
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(b.qs.as_mut_ptr() as *mut __m256i, bytes);
            b.d = d;
            b.sum = d * _mm_cvtsi128_si32(s1) as f32;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_0(row: &[u8], a: &[Q8Block]) -> f32 {
        debug_assert!(row.len() >= a.len() * 18);
        let mut acc = _mm256_setzero_ps();
        let mut offs = 0f32;
        let p = row.as_ptr();
        for (i, ab) in a.iter().enumerate() {
            let b = p.add(i * 18);
            let (d, _) = f16x2(b);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), mul_sum_us8(nibbles(b.add(2)), y), acc);
            // The stored nibble is q+8: subtract 8 * d * sum(activations).
            offs -= 8.0 * d * ab.sum;
        }
        hsum(acc) + offs
    }

    /// Bit i of the 32 bits at `p` as byte i: 0xFF where set, 0 where not.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn bits_to_bytes(p: *const u8) -> __m256i {
        let bits = (p as *const u32).read_unaligned() as i32;
        // Byte i takes the bits' byte i / 8, then its bit i % 8 is tested.
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits),
            _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303),
        );
        let masks = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
        _mm256_cmpeq_epi8(_mm256_and_si256(spread, masks), masks)
    }

    /// The Q5_0 and K-quant kernels, written once for each way to multiply unsigned by signed
    /// bytes and sum them in fours: AVX2's `maddubs` (+ `madd`), or AVX-512 VNNI's `dpbusd`.
    /// Both give the same exact integer sums, so the two sets agree bit for bit.
    macro_rules! q8_kernels {
        ($feat:literal, $mul:ident, $fifth:ident, $q5_0:ident, $q45_k:ident, $q4_k:ident, $q5_k:ident, $q6_k:ident) => {
            /// Q5_0: 5-bit values (nibbles plus bit i of `qh`) stored as q + 16.
            #[target_feature(enable = $feat)]
            pub unsafe fn $q5_0(row: &[u8], a: &[Q8Block]) -> f32 {
                debug_assert!(row.len() >= a.len() * 22);
                let p = row.as_ptr();
                two_chain_sum!(a.len(), |i: usize| {
                    let (ab, b) = (a.get_unchecked(i), p.add(i * 22));
                    let (d, _) = f16x2(b);
                    let u = $fifth(nibbles(b.add(6)), b.add(2));
                    let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
                    (_mm256_set1_ps(d * ab.d), $mul(u, y), -16.0 * d * ab.sum)
                })
            }

            /// Q4_K and Q5_K (`HIGH`: a fifth bit per value from 32 bytes of `qh`): 8 sub-blocks of
            /// 32 per super-block, each with a 6-bit scale and min; one Q8 block per sub-block.
            #[inline]
            #[target_feature(enable = $feat)]
            unsafe fn $q45_k<const HIGH: bool>(row: &[u8], a: &[Q8Block]) -> f32 {
                let bb = if HIGH { 176 } else { 144 };
                debug_assert!(row.len() * 8 >= a.len() * bb);
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut offs = 0f32;
                let low = _mm256_set1_epi8(0x0F);
                for (sb, ab) in a.chunks_exact(8).enumerate() {
                    let b = row.as_ptr().add(sb * bb);
                    let (d, dmin) = f16x2(b);
                    let sc = std::slice::from_raw_parts(b.add(4), 12);
                    let qh =
                        if HIGH { _mm256_loadu_si256(b.add(16) as *const __m256i) } else { _mm256_setzero_si256() };
                    let qs = b.add(if HIGH { 48 } else { 16 });
                    for c in 0..4 {
                        let q = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                        let (j0, j1) = (2 * c, 2 * c + 1);
                        let mut u0 = _mm256_and_si256(q, low);
                        let mut u1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                        if HIGH {
                            let one = _mm256_set1_epi8(1);
                            let h0 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j0 as i32)), one);
                            let h1 = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(j1 as i32)), one);
                            u0 = _mm256_or_si256(u0, _mm256_slli_epi16(h0, 4));
                            u1 = _mm256_or_si256(u1, _mm256_slli_epi16(h1, 4));
                        }
                        let (a0, a1) = (ab.get_unchecked(j0), ab.get_unchecked(j1));
                        let (s0, m0) = super::scale_min_k4(j0, sc);
                        let (s1, m1) = super::scale_min_k4(j1, sc);
                        let y0 = _mm256_loadu_si256(a0.qs.as_ptr() as *const __m256i);
                        let y1 = _mm256_loadu_si256(a1.qs.as_ptr() as *const __m256i);
                        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * s0 as f32 * a0.d), $mul(u0, y0), acc0);
                        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * s1 as f32 * a1.d), $mul(u1, y1), acc1);
                        offs -= dmin * m0 as f32 * a0.sum + dmin * m1 as f32 * a1.sum;
                    }
                }
                hsum(_mm256_add_ps(acc0, acc1)) + offs
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn $q4_k(row: &[u8], a: &[Q8Block]) -> f32 {
                $q45_k::<false>(row, a)
            }

            #[target_feature(enable = $feat)]
            pub unsafe fn $q5_k(row: &[u8], a: &[Q8Block]) -> f32 {
                $q45_k::<true>(row, a)
            }

            /// Q6_K: 6-bit values minus 32 (low nibbles from `ql`, two high bits from `qh`), 16 signed
            /// scales per super-block (two per Q8 block: the halves of its 8 product lanes).
            #[target_feature(enable = $feat)]
            pub unsafe fn $q6_k(row: &[u8], a: &[Q8Block]) -> f32 {
                debug_assert!(row.len() * 8 >= a.len() * 210);
                let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let (low, three, bias) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3), _mm256_set1_epi8(32));
                for (sb, ab) in a.chunks_exact(8).enumerate() {
                    let b = row.as_ptr().add(sb * 210);
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        b.add(208).cast::<u16>().read_unaligned() as i32
                    )));
                    let sc = b.add(192) as *const i8;
                    for half in 0..2 {
                        let ql0 = _mm256_loadu_si256(b.add(half * 64) as *const __m256i);
                        let ql1 = _mm256_loadu_si256(b.add(half * 64 + 32) as *const __m256i);
                        let qh = _mm256_loadu_si256(b.add(128 + half * 32) as *const __m256i);
                        let lows = [
                            _mm256_and_si256(ql0, low),
                            _mm256_and_si256(ql1, low),
                            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low),
                            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low),
                        ];
                        for (k, lo) in lows.into_iter().enumerate() {
                            let hi = match k {
                                0 => _mm256_and_si256(qh, three),
                                1 => _mm256_and_si256(_mm256_srli_epi16(qh, 2), three),
                                2 => _mm256_and_si256(_mm256_srli_epi16(qh, 4), three),
                                _ => _mm256_and_si256(_mm256_srli_epi16(qh, 6), three),
                            };
                            let w = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), bias);
                            let aj = ab.get_unchecked(4 * half + k);
                            let y = _mm256_loadu_si256(aj.qs.as_ptr() as *const __m256i);
                            // Signed x signed: the weight's sign moves onto the activation.
                            let prod = $mul(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
                            let (s0, s1) = (*sc.add(half * 8 + 2 * k) as f32, *sc.add(half * 8 + 2 * k + 1) as f32);
                            let f = d * aj.d;
                            let scales = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1);
                            if k % 2 == 0 {
                                acc0 = _mm256_fmadd_ps(_mm256_mul_ps(scales, _mm256_set1_ps(f)), prod, acc0);
                            } else {
                                acc1 = _mm256_fmadd_ps(_mm256_mul_ps(scales, _mm256_set1_ps(f)), prod, acc1);
                            }
                        }
                    }
                }
                hsum(_mm256_add_ps(acc0, acc1))
            }
        };
    }

    q8_kernels!("avx2,fma,f16c", mul_sum_us8, add_fifth_bits, dot_q5_0, dot_q45_k, dot_q4_k, dot_q5_k, dot_q6_k);
    q8_kernels!(
        "avx2,fma,f16c,avx512vnni,avx512vl,avx512bw",
        mul_sum_us8_vnni,
        add_fifth_bits_masked,
        dot_q5_0_vnni,
        dot_q45_k_vnni,
        dot_q4_k_vnni,
        dot_q5_k_vnni,
        dot_q6_k_vnni
    );

    /// Q5's 32 fifth bits at `qh` (bit i for byte i) added to the nibbles `u` as 16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add_fifth_bits(u: __m256i, qh: *const u8) -> __m256i {
        _mm256_or_si256(u, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)))
    }

    /// [`add_fifth_bits`] with the bits as an AVX-512 byte mask: one masked add instead of the
    /// shuffle, test and compare that spread them into bytes (a Q5_0 block's costliest step).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vl,avx512bw")]
    unsafe fn add_fifth_bits_masked(u: __m256i, qh: *const u8) -> __m256i {
        let mask = (qh as *const u32).read_unaligned();
        _mm256_mask_add_epi8(u, mask, u, _mm256_set1_epi8(0x10))
    }

    /// [`mul_sum_us8`] with AVX-512 VNNI (one instruction, no 16-bit intermediate).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    unsafe fn mul_sum_us8_vnni(u: __m256i, s: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], a: &[Q8Block]) -> f32 {
        debug_assert!(row.len() >= a.len() * 34);
        let mut acc = _mm256_setzero_ps();
        let p = row.as_ptr();
        for (i, ab) in a.iter().enumerate() {
            let b = p.add(i * 34);
            let (d, _) = f16x2(b);
            let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let y = _mm256_loadu_si256(ab.qs.as_ptr() as *const __m256i);
            // maddubs needs an unsigned operand: move the weight's sign onto the activation.
            let prod = mul_sum_us8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * ab.d), prod, acc);
        }
        hsum(acc)
    }
}

/// NEON kernels (aarch64, where NEON is part of the base ISA, so no run-time check). The
/// integer block sums are exact and each block's float combine is done in the scalar twin's
/// order, so these give bit for bit what [`dot_q8_scalar`] and [`quantize_q8_scalar`] give.
/// They run here only under qemu (`scripts/check-neon.sh`); no aarch64 machine has timed them.
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use super::{f16_at, GgmlType, Q8Block, QK};
    use std::arch::aarch64::*;

    /// Sum of 16 unsigned-nibble (0..15) or signed bytes `w` times 16 signed bytes `a`.
    #[inline(always)]
    unsafe fn dot16(w: int8x16_t, a: int8x16_t) -> int32x4_t {
        let lo = vmull_s8(vget_low_s8(w), vget_low_s8(a));
        let hi = vmull_high_s8(w, a);
        vpadalq_s16(vpaddlq_s16(lo), hi)
    }

    /// The integer part of one block: `sum_j w_j * a_j` over its 32 values.
    #[inline(always)]
    unsafe fn block_sum(t: GgmlType, b: &[u8], a: &Q8Block) -> i32 {
        let a_lo = vld1q_s8(a.qs.as_ptr());
        let a_hi = vld1q_s8(a.qs.as_ptr().add(16));
        let acc = match t {
            GgmlType::Q8_0 => {
                let w_lo = vld1q_s8(b.as_ptr().add(2) as *const i8);
                let w_hi = vld1q_s8(b.as_ptr().add(18) as *const i8);
                vaddq_s32(dot16(w_lo, a_lo), dot16(w_hi, a_hi))
            }
            _ => {
                let start = if t == GgmlType::Q4_1 { 4 } else { 2 };
                let q = vld1q_u8(b.as_ptr().add(start));
                // Low nibbles are values 0..15, high nibbles 16..31 (ggml's order).
                let lo = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0x0F)));
                let hi = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
                vaddq_s32(dot16(lo, a_lo), dot16(hi, a_hi))
            }
        };
        vaddvq_s32(acc)
    }

    /// 16 bits of `bits` (bit i for byte i) as 16 bytes of 0x10 or 0: Q5's fifth bits.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u16) -> uint8x16_t {
        const LANE_BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let spread = vcombine_u8(vdup_n_u8(bits as u8), vdup_n_u8((bits >> 8) as u8));
        vandq_u8(vtstq_u8(spread, vld1q_u8(LANE_BIT.as_ptr())), vdupq_n_u8(0x10))
    }

    /// The integer sum of a 32-value sub-block `(lo, hi)` (values 0..15, 16..31, each a signed
    /// byte) with its activations.
    #[inline(always)]
    unsafe fn sub_sum(lo: int8x16_t, hi: int8x16_t, a: &Q8Block) -> i32 {
        let (a_lo, a_hi) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
        vaddvq_s32(vaddq_s32(dot16(lo, a_lo), dot16(hi, a_hi)))
    }

    /// Q5_0 and Q5_1 against Q8 activations: the 5-bit values (0..31) in integers, then
    /// `d * d_a * sum + m * sum_a` (Q5_0's implicit minimum is -16 d), as the x86 kernels.
    fn dot_q5(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
        let (bb, qh_at) = (t.block_bytes(), if t == GgmlType::Q5_0 { 2 } else { 4 });
        let mut total = 0f32;
        for (b, ab) in row.chunks_exact(bb).zip(a) {
            let d = f16_at(b, 0);
            let m = if t == GgmlType::Q5_0 { -16.0 * d } else { f16_at(b, 2) };
            let qh = u32::from_le_bytes([b[qh_at], b[qh_at + 1], b[qh_at + 2], b[qh_at + 3]]);
            // SAFETY: NEON is in the aarch64 base ISA; `b` holds a whole block (chunks_exact).
            let sumi = unsafe {
                let q = vld1q_u8(b.as_ptr().add(qh_at + 4));
                let lo = vorrq_u8(vandq_u8(q, vdupq_n_u8(0x0F)), fifth_bits(qh as u16));
                let hi = vorrq_u8(vshrq_n_u8::<4>(q), fifth_bits((qh >> 16) as u16));
                sub_sum(vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi), ab)
            };
            total += d * ab.d * sumi as f32 + m * ab.sum;
        }
        total
    }

    /// The K-quants against Q8 activations (one per 32-value sub-block): the scalar twin's
    /// integer sums and float expressions in its order, so the result is its bit for bit.
    fn dot_k(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
        let bb = t.block_bytes();
        let mut total = 0f32;
        for (b, ab) in row.chunks_exact(bb).zip(a.chunks_exact(8)) {
            let p = b.as_ptr();
            for (j, aj) in ab.iter().enumerate() {
                // SAFETY: NEON is in the aarch64 base ISA; every load is inside the block `b`
                // (144, 176 or 210 bytes, chunks_exact).
                unsafe {
                    match t {
                        GgmlType::Q4K | GgmlType::Q5K => {
                            let qs_at = if t == GgmlType::Q4K { 16 } else { 48 };
                            let q = p.add(qs_at + (j / 2) * 32);
                            let (mut v0, mut v1) = (vld1q_u8(q), vld1q_u8(q.add(16)));
                            if j % 2 == 0 {
                                (v0, v1) = (vandq_u8(v0, vdupq_n_u8(0x0F)), vandq_u8(v1, vdupq_n_u8(0x0F)));
                            } else {
                                (v0, v1) = (vshrq_n_u8::<4>(v0), vshrq_n_u8::<4>(v1));
                            }
                            if t == GgmlType::Q5K {
                                // Bit j of qh[l] is value l's fifth bit.
                                let shift = vdupq_n_s8(-(j as i8));
                                let bit = |h: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(vshlq_u8(h, shift), vdupq_n_u8(1)));
                                v0 = vorrq_u8(v0, bit(vld1q_u8(p.add(16))));
                                v1 = vorrq_u8(v1, bit(vld1q_u8(p.add(32))));
                            }
                            let sumi = sub_sum(vreinterpretq_s8_u8(v0), vreinterpretq_s8_u8(v1), aj);
                            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                            let (s, m) = super::scale_min_k4(j, &b[4..16]);
                            total += d * s as f32 * aj.d * sumi as f32 - dmin * m as f32 * aj.sum;
                        }
                        _ => {
                            // Q6_K: sub-block j is half j / 4, quarter k = j % 4 of it.
                            let (half, k) = (j / 4, j % 4);
                            let ql = p.add(half * 64 + (k % 2) * 32);
                            let qh = p.add(128 + half * 32);
                            let low = |v: uint8x16_t| match k / 2 {
                                0 => vandq_u8(v, vdupq_n_u8(0x0F)),
                                _ => vshrq_n_u8::<4>(v),
                            };
                            let shift = vdupq_n_s8(-2 * k as i8);
                            let high = |h: uint8x16_t| vshlq_n_u8::<4>(vandq_u8(vshlq_u8(h, shift), vdupq_n_u8(3)));
                            let value = |l: uint8x16_t, h: uint8x16_t| {
                                vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(low(l), high(h))), vdupq_n_s8(32))
                            };
                            let v0 = value(vld1q_u8(ql), vld1q_u8(qh));
                            let v1 = value(vld1q_u8(ql.add(16)), vld1q_u8(qh.add(16)));
                            let (a_lo, a_hi) = (vld1q_s8(aj.qs.as_ptr()), vld1q_s8(aj.qs.as_ptr().add(16)));
                            let (s0, s1) = (vaddvq_s32(dot16(v0, a_lo)), vaddvq_s32(dot16(v1, a_hi)));
                            let sc = &b[192 + half * 8 + 2 * k..192 + half * 8 + 2 * k + 2];
                            let d = f16_at(b, 208);
                            total += d * aj.d * (sc[0] as i8 as f32 * s0 as f32 + sc[1] as i8 as f32 * s1 as f32);
                        }
                    }
                }
            }
        }
        total
    }

    /// [`super::dot_q8`] for every type with Q8 activations.
    pub(crate) fn dot_q8(t: GgmlType, row: &[u8], a: &[Q8Block]) -> f32 {
        match t {
            GgmlType::Q5_0 | GgmlType::Q5_1 => return dot_q5(t, row, a),
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => return dot_k(t, row, a),
            _ => {}
        }
        let bb = t.block_bytes();
        let mut total = 0f32;
        for (b, ab) in row.chunks_exact(bb).zip(a) {
            // SAFETY: NEON is in the aarch64 base ISA; `b` holds a whole block (chunks_exact).
            let sumi = unsafe { block_sum(t, b, ab) };
            let d = f16_at(b, 0);
            total += match t {
                GgmlType::Q4_1 => d * ab.d * sumi as f32 + f16_at(b, 2) * ab.sum,
                GgmlType::Q4_0 => d * ab.d * sumi as f32 + (-8.0 * d) * ab.sum,
                _ => d * ab.d * sumi as f32,
            };
        }
        total
    }

    /// [`super::quantize_q8`]: `vcvtnq` rounds half to even, as the scalar twin does.
    pub(crate) fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
        for (chunk, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
            // SAFETY: NEON is in the aarch64 base ISA; `chunk` holds 32 floats.
            unsafe {
                let p = chunk.as_ptr();
                let v: [float32x4_t; 8] = std::array::from_fn(|k| vld1q_f32(p.add(4 * k)));
                let mut m = vabsq_f32(v[0]);
                for vk in &v[1..] {
                    m = vmaxq_f32(m, vabsq_f32(*vk));
                }
                let amax = vmaxvq_f32(m);
                let d = amax / 127.0;
                let id = if d > 0.0 { 127.0 / amax } else { 0.0 };
                let mut s = vdupq_n_s32(0);
                for (k, vk) in v.iter().enumerate() {
                    let q = vcvtnq_s32_f32(vmulq_n_f32(*vk, id));
                    s = vaddq_s32(s, q);
                    let mut lanes = [0i32; 4];
                    vst1q_s32(lanes.as_mut_ptr(), q);
                    for (j, l) in lanes.iter().enumerate() {
                        b.qs[4 * k + j] = *l as i8;
                    }
                }
                b.d = d;
                b.sum = d * vaddvq_s32(s) as f32;
            }
        }
    }

    /// f32 dot with four 4-lane running sums (the CPU backend's [`crate::backend::cpu::ops::dot`]).
    pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let body = n - n % 16;
        // SAFETY: NEON is in the aarch64 base ISA; every load is below `body <= n`.
        let mut s = unsafe {
            let mut acc = [vdupq_n_f32(0.0); 4];
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut i = 0;
            while i < body {
                for (k, acc_k) in acc.iter_mut().enumerate() {
                    *acc_k = vfmaq_f32(*acc_k, vld1q_f32(pa.add(i + 4 * k)), vld1q_f32(pb.add(i + 4 * k)));
                }
                i += 16;
            }
            vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])))
        };
        for j in body..n {
            s += a[j] * b[j];
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random bytes and floats (no external RNG needed).
    pub(crate) struct Lcg(pub(crate) u64);
    impl Lcg {
        pub(crate) fn next_u32(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }
        pub(crate) fn f32(&mut self) -> f32 {
            self.next_u32() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    /// A random but valid row: scale fields are set to small finite f16 values.
    pub(crate) fn random_row(t: GgmlType, n: usize, rng: &mut Lcg) -> Vec<u8> {
        let mut row: Vec<u8> = (0..t.row_bytes(n)).map(|_| rng.next_u32() as u8).collect();
        let scale = |rng: &mut Lcg| half::f16::from_f32(rng.f32() * 0.05).to_bits().to_le_bytes();
        let bb = t.block_bytes();
        for b in row.chunks_exact_mut(bb) {
            let offsets: &[usize] = match t {
                GgmlType::F32 => {
                    b.copy_from_slice(&rng.f32().to_le_bytes());
                    &[]
                }
                GgmlType::F16 | GgmlType::BF16 => &[0],
                GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
                GgmlType::Q2K => &[80, 82],
                GgmlType::Q3K => &[108],
                GgmlType::Q6K => &[208],
            };
            for &o in offsets {
                let s = if t == GgmlType::BF16 {
                    half::bf16::from_f32(rng.f32()).to_bits().to_le_bytes()
                } else {
                    scale(rng)
                };
                b[o..o + 2].copy_from_slice(&s);
            }
        }
        row
    }

    fn check_several_token_dots<const T: usize>(rng: &mut Lcg) {
        for t in [GgmlType::Q4_1, GgmlType::Q8_0] {
            for blocks in [1usize, 2, 3, 7, 18] {
                let n = blocks * 32;
                let row = random_row(t, n, rng);
                let acts: Vec<Vec<Q8Block>> = (0..T)
                    .map(|_| {
                        let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                        let mut q = Vec::new();
                        quantize_q8(&x, &mut q);
                        q
                    })
                    .collect();
                let refs: [&[Q8Block]; T] = std::array::from_fn(|k| acts[k].as_slice());
                let mut out = [f32::NAN; T];
                let ran = dot_q8_tokens(t, &row, &refs, &mut out);
                assert_eq!(ran, has_dot_q8_tokens(t), "{t:?}: the kernel runs where it is said to");
                if !ran {
                    continue;
                }
                for k in 0..T {
                    let single = dot_q8(t, &row, &acts[k]);
                    assert_eq!(out[k].to_bits(), single.to_bits(), "{t:?} T={T} blocks {blocks} token {k}");
                }
            }
        }
    }

    #[test]
    fn several_token_dots_equal_the_single_token_dot_bit_for_bit() {
        let mut rng = Lcg(11);
        check_several_token_dots::<2>(&mut rng);
        check_several_token_dots::<4>(&mut rng);
        check_several_token_dots::<8>(&mut rng);
    }

    #[test]
    fn fast_dots_match_reference_on_awkward_sizes() {
        let mut rng = Lcg(7);
        for t in GgmlType::ALL {
            for blocks in [1usize, 3, 7, 18] {
                let n = blocks * t.block_size().max(32);
                let row = random_row(t, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                let reference = dot_reference(t, &row, &x);
                let mut w = vec![0f32; n];
                dequantize_row(t, &row, &mut w);
                let magnitude: f32 = w.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum::<f32>() + 1e-6;
                let (fast, tol) = if t.uses_q8_activations() {
                    let mut q = Vec::new();
                    quantize_q8(&x, &mut q);
                    let scalar = dot_q8_scalar(t, &row, &q);
                    let fast = dot_q8(t, &row, &q);
                    // SIMD and scalar integer kernels differ only in float summation order.
                    assert!((fast - scalar).abs() <= 1e-4 * magnitude, "{t}: simd {fast} vs scalar {scalar}");
                    // 8-bit activations: error bounded by ~1/127 of the magnitude.
                    (fast, 1.0 / 100.0)
                } else {
                    (dot_f32(t, &row, &x), 1e-5)
                };
                assert!(
                    (fast - reference).abs() <= tol * magnitude,
                    "{t} n={n}: fast {fast} vs reference {reference} (magnitude {magnitude})"
                );
            }
        }
    }

    /// The VNNI kernels sum the same integers as the AVX2 ones in the same float order.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_kernels_agree_bit_for_bit() {
        if !vnni_available() {
            return;
        }
        let mut rng = Lcg(13);
        for t in [GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            for blocks in [1usize, 2, 7] {
                let n = blocks * t.block_size().max(32);
                let row = random_row(t, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
                let mut q = Vec::new();
                quantize_q8(&x, &mut q);
                // SAFETY: AVX2 and VNNI are present (checked above).
                let (avx2, vnni) = unsafe {
                    match t {
                        GgmlType::Q5_0 => (x86::dot_q5_0(&row, &q), x86::dot_q5_0_vnni(&row, &q)),
                        GgmlType::Q4K => (x86::dot_q4_k(&row, &q), x86::dot_q4_k_vnni(&row, &q)),
                        GgmlType::Q5K => (x86::dot_q5_k(&row, &q), x86::dot_q5_k_vnni(&row, &q)),
                        _ => (x86::dot_q6_k(&row, &q), x86::dot_q6_k_vnni(&row, &q)),
                    }
                };
                assert_eq!(avx2.to_bits(), vnni.to_bits(), "{t} blocks {blocks}: {avx2} vs {vnni}");
            }
        }
    }

    /// The NEON kernels keep the scalar twin's float order, so they must agree exactly (Q5_0
    /// and Q5_1, whose twin dots dequantised floats, are checked against it with the other
    /// fast kernels in `fast_dots_match_reference_on_awkward_sizes`).
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_dots_equal_the_scalar_twin_bit_for_bit() {
        let mut rng = Lcg(5);
        for t in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            for blocks in [1usize, 2, 7, 18] {
                let n = blocks * t.block_size();
                let row = random_row(t, n, &mut rng);
                let x: Vec<f32> = (0..n).map(|_| rng.f32() * 3.0).collect();
                let mut q = Vec::new();
                quantize_q8_scalar(&x, &mut q);
                let (fast, slow) = (neon::dot_q8(t, &row, &q), dot_q8_scalar(t, &row, &q));
                assert_eq!(fast.to_bits(), slow.to_bits(), "{t} blocks {blocks}: {fast} vs {slow}");
            }
        }
    }

    #[test]
    fn vector_quantisation_equals_its_scalar_twin() {
        let mut rng = Lcg(11);
        for blocks in [1usize, 2, 5, 18] {
            let mut x: Vec<f32> = (0..blocks * 32).map(|_| rng.f32() * 4.0).collect();
            x[3] = 0.0;
            if blocks > 1 {
                x[32..64].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
            }
            // Exact ties at +-0.5 steps exercise the rounding mode.
            x[5] = x.iter().take(32).fold(0f32, |m, v| m.max(v.abs())) / 127.0 * 2.5;
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            quantize_q8(&x, &mut fast);
            quantize_q8_scalar(&x, &mut slow);
            for (f, s) in fast.iter().zip(&slow) {
                assert_eq!((f.d, f.sum, f.qs), (s.d, s.sum, s.qs));
            }
        }
    }

    #[test]
    fn q8_quantisation_round_trips_within_half_a_step() {
        let mut rng = Lcg(3);
        let x: Vec<f32> = (0..96).map(|_| rng.f32() * 3.0).collect();
        let mut q = Vec::new();
        quantize_q8(&x, &mut q);
        for (b, chunk) in q.iter().zip(x.chunks(32)) {
            for (&qi, &v) in b.qs.iter().zip(chunk) {
                assert!((qi as f32 * b.d - v).abs() <= b.d * 0.5 + 1e-6);
            }
            let s: i32 = b.qs.iter().map(|&v| v as i32).sum();
            assert!((b.sum - b.d * s as f32).abs() < 1e-5);
        }
    }
}

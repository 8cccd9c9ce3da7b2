//! Many tokens' 8-bit activations against quantised weight rows, in integers: the prefill's
//! product when its activations are quantised as a decode step's are (llama.cpp's prefill does
//! the same).
//!
//! Every supported type is first unpacked into one form: per row and per group of `G` columns
//! (32, or 16 for Q6_K's 16-element scales) unsigned 8-bit values `q` with a scale `dw` and an
//! offset `mw`, so that `w = dw * q + mw`. Rows go in groups of 8 with their bytes interleaved
//! four at a time, so that one `vpdpbusd` multiplies four columns of all 8 rows by the same four
//! activations: the 8 lanes of the sum are the 8 rows' partial dots and need no horizontal
//! reduction. A task unpacks its rows once and reuses them for every token of the prompt, so
//! the unpacking costs as much as one more token.
//!
//! `dot = sum over groups of isum * (dw * da) + mw * asum`, where `isum` is the integer dot of
//! `q` with the activation's 8-bit values, `da` the activation block's scale and `asum` the
//! group's activation sum (`da * sum(qa)`). The scalar twin [`tile_scalar`] computes the same
//! operations in the same order (fused multiply-adds), so it equals the VNNI kernel bit for bit.

use super::dot::Q8Block;
use super::{f16_at, GgmlType, QK, QK_K};

/// Rows per interleaved group: the 8 i32 lanes of a 256-bit register.
pub const ROWS: usize = 8;

/// The column group of type `t`'s integer form, or None where it has none here (float types,
/// Q2_K and Q3_K keep the f32 path).
pub fn group_len(t: GgmlType) -> Option<usize> {
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => Some(32),
        GgmlType::Q4K | GgmlType::Q5K => Some(32),
        GgmlType::Q6K => Some(16),
        _ => None,
    }
}

/// Rows of one weight unpacked into the interleaved integer form, padded to whole groups of
/// [`ROWS`] (padding rows are zero and give zero).
#[derive(Default)]
pub struct PackedRows {
    pub group: usize,
    pub cols: usize,
    pub rows: usize,
    /// Per row group, per column group: `group / 4` vectors of 32 bytes (4 bytes of each row).
    pub q: Vec<u8>,
    /// Per row group, per column group: 8 scales, then [`mw`](Self::mw) alike.
    pub dw: Vec<f32>,
    pub mw: Vec<f32>,
}

impl PackedRows {
    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    pub fn row_groups(&self) -> usize {
        self.rows.div_ceil(ROWS)
    }

    /// Unpack `rows` rows of type `t` (`bytes` holds them back to back) of `cols` columns,
    /// reusing this buffer's memory.
    pub fn pack(&mut self, t: GgmlType, bytes: &[u8], rows: usize, cols: usize) {
        let group = group_len(t).expect("a type with an integer form");
        assert!(cols.is_multiple_of(t.block_size()) && cols.is_multiple_of(group), "whole blocks per row");
        let rb = t.row_bytes(cols);
        assert!(bytes.len() >= rows * rb, "rows' bytes");
        self.group = group;
        self.cols = cols;
        self.rows = rows;
        let groups = cols / group;
        let row_groups = rows.div_ceil(ROWS);
        self.q.clear();
        self.q.resize(row_groups * groups * group * ROWS, 0);
        self.dw.clear();
        self.dw.resize(row_groups * groups * ROWS, 0.0);
        self.mw.clear();
        self.mw.resize(row_groups * groups * ROWS, 0.0);
        let mut q = vec![0u8; cols];
        let mut dw = vec![0f32; groups];
        let mut mw = vec![0f32; groups];
        for r in 0..rows {
            unpack_row(t, &bytes[r * rb..(r + 1) * rb], &mut q, &mut dw, &mut mw);
            let (rg, lane) = (r / ROWS, r % ROWS);
            for g in 0..groups {
                let base = (rg * groups + g) * group * ROWS + lane * 4;
                // Four bytes at a time: vector k of the group holds bytes 4k..4k+4 of each row.
                for (k, four) in q[g * group..(g + 1) * group].chunks_exact(4).enumerate() {
                    self.q[base + k * 32..base + k * 32 + 4].copy_from_slice(four);
                }
                self.dw[(rg * groups + g) * ROWS + lane] = dw[g];
                self.mw[(rg * groups + g) * ROWS + lane] = mw[g];
            }
        }
    }
}

/// One row in the integer form: `w[c] = dw[c / G] * q[c] + mw[c / G]`.
pub fn unpack_row(t: GgmlType, row: &[u8], q: &mut [u8], dw: &mut [f32], mw: &mut [f32]) {
    match t {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
            for (i, b) in row.chunks_exact(t.block_bytes()).enumerate() {
                let qb = &mut q[i * QK..(i + 1) * QK];
                let d = f16_at(b, 0);
                dw[i] = d;
                mw[i] = match t {
                    GgmlType::Q4_0 => {
                        nibbles(&b[2..18], qb);
                        -8.0 * d
                    }
                    GgmlType::Q4_1 => {
                        nibbles(&b[4..20], qb);
                        f16_at(b, 2)
                    }
                    GgmlType::Q5_0 => {
                        nibbles(&b[6..22], qb);
                        fifth_bits(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), qb);
                        -16.0 * d
                    }
                    GgmlType::Q5_1 => {
                        nibbles(&b[8..24], qb);
                        fifth_bits(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), qb);
                        f16_at(b, 2)
                    }
                    _ => {
                        // Q8_0's signed values shifted to unsigned; the offset takes the 128 back.
                        for (o, &v) in qb.iter_mut().zip(&b[2..34]) {
                            *o = (v as i8 as i16 + 128) as u8;
                        }
                        -128.0 * d
                    }
                };
            }
        }
        GgmlType::Q4K | GgmlType::Q5K => {
            for (sb, b) in row.chunks_exact(t.block_bytes()).enumerate() {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if t == GgmlType::Q5K { (Some(&b[16..48]), &b[48..176]) } else { (None, &b[16..144]) };
                for j in 0..8 {
                    let (sc, m) = scale_min_k4(j, scales);
                    let g = sb * 8 + j;
                    dw[g] = d * sc as f32;
                    mw[g] = -dmin * m as f32;
                    let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                    for l in 0..32 {
                        let nib = if j % 2 == 0 { chunk[l] & 0x0F } else { chunk[l] >> 4 };
                        let high = qh.map_or(0, |h| ((h[l] >> j) & 1) << 4);
                        q[g * 32 + l] = nib | high;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (sb, b) in row.chunks_exact(t.block_bytes()).enumerate() {
                let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &ql_all[half * 64..half * 64 + 64];
                    let qh = &qh_all[half * 32..half * 32 + 32];
                    let out = &mut q[sb * QK_K + half * 128..];
                    for l in 0..32 {
                        out[l] = (ql[l] & 0x0F) | (qh[l] & 3) << 4;
                        out[l + 32] = (ql[l + 32] & 0x0F) | ((qh[l] >> 2) & 3) << 4;
                        out[l + 64] = (ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4;
                        out[l + 96] = (ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4;
                    }
                }
                // 16 groups of 16: value = d * scale * (q - 32).
                for (k, &s) in sc_all.iter().enumerate() {
                    let g = sb * 16 + k;
                    dw[g] = d * (s as i8) as f32;
                    mw[g] = -32.0 * dw[g];
                }
            }
        }
        _ => panic!("{t} has no integer form"),
    }
}

/// Q4 nibbles: low nibbles are elements 0..16, high 16..32.
fn nibbles(qs: &[u8], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = qs[j] & 0x0F;
        out[j + 16] = qs[j] >> 4;
    }
}

/// Q5's fifth bits: bit j of `qh` belongs to element j.
fn fifth_bits(qh: u32, out: &mut [u8]) {
    for (j, o) in out.iter_mut().enumerate().take(32) {
        *o |= (((qh >> j) & 1) << 4) as u8;
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K super-block's 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// One token's activations for a given group length: the 8-bit values (from its [`Q8Block`]s)
/// and per group the scale `da` and sum `asum`.
pub struct TokenActs<'a> {
    pub blocks: &'a [Q8Block],
    /// `[da, asum]` per group.
    pub scales: &'a [[f32; 2]],
}

/// Per group `[da, asum]` of quantised activations, for group length `group` (32: the block's
/// own; 16: each half's sum).
pub fn group_scales(blocks: &[Q8Block], group: usize, out: &mut Vec<[f32; 2]>) {
    out.clear();
    for b in blocks {
        if group == QK {
            out.push([b.d, b.sum]);
        } else {
            for half in b.qs.chunks_exact(group) {
                let s: i32 = half.iter().map(|&v| v as i32).sum();
                out.push([b.d, b.d * s as f32]);
            }
        }
    }
}

/// Whether [`tile`] has a vector kernel on this CPU (AVX-512 VNNI/VL); elsewhere callers keep
/// the f32 path, since the scalar twin is for tests.
pub fn available() -> bool {
    super::dot::vnni_available()
}

/// Row group `rg` of `w` against `T` tokens: `out[t][lane]` for the group's 8 rows.
pub fn tile<const T: usize>(w: &PackedRows, rg: usize, acts: &[TokenActs; T], out: &mut [[f32; ROWS]; T]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has AVX-512 VNNI/VL (checked at run time); the shapes are checked
        // by `check_tile`.
        check_tile(w, rg, acts);
        unsafe {
            match w.group {
                32 => x86::tile::<T, 32>(w, rg, acts, out),
                _ => x86::tile::<T, 16>(w, rg, acts, out),
            }
        }
        return;
    }
    tile_scalar(w, rg, acts, out)
}

fn check_tile<const T: usize>(w: &PackedRows, rg: usize, acts: &[TokenActs; T]) {
    assert!(rg < w.row_groups() && (w.group == 32 || w.group == 16));
    for a in acts {
        assert_eq!(a.blocks.len() * QK, w.cols, "activation length");
        assert_eq!(a.scales.len(), w.groups_per_row(), "activation groups");
    }
}

/// Scalar twin of [`tile`]: the same integer sums and the same fused multiply-adds in order.
pub fn tile_scalar<const T: usize>(w: &PackedRows, rg: usize, acts: &[TokenActs; T], out: &mut [[f32; ROWS]; T]) {
    check_tile(w, rg, acts);
    let (g_len, groups) = (w.group, w.groups_per_row());
    for (t, a) in acts.iter().enumerate() {
        let mut acc = [0f32; ROWS];
        for g in 0..groups {
            let base = (rg * groups + g) * g_len * ROWS;
            let first = g * g_len;
            let qa = &a.blocks[first / QK].qs[first % QK..first % QK + g_len];
            let [da, asum] = a.scales[g];
            for (lane, acc) in acc.iter_mut().enumerate() {
                let mut isum = 0i32;
                for e in 0..g_len {
                    isum += w.q[base + (e / 4) * 32 + lane * 4 + e % 4] as i32 * qa[e] as i32;
                }
                let s = (rg * groups + g) * ROWS + lane;
                *acc = (isum as f32).mul_add(w.dw[s] * da, *acc);
                *acc = w.mw[s].mul_add(asum, *acc);
            }
        }
        out[t] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedRows, TokenActs, QK, ROWS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
    pub unsafe fn tile<const T: usize, const G: usize>(
        w: &PackedRows,
        rg: usize,
        acts: &[TokenActs; T],
        out: &mut [[f32; ROWS]; T],
    ) {
        let groups = w.groups_per_row();
        let mut acc = [_mm256_setzero_ps(); T];
        let q = w.q.as_ptr().add(rg * groups * G * ROWS);
        let dw = w.dw.as_ptr().add(rg * groups * ROWS);
        let mw = w.mw.as_ptr().add(rg * groups * ROWS);
        for g in 0..groups {
            let qg = q.add(g * G * ROWS);
            // G/4 vectors of 4 columns x 8 rows, loaded once for all T tokens.
            let mut wv = [_mm256_setzero_si256(); 8];
            for (k, v) in wv.iter_mut().enumerate().take(G / 4) {
                *v = _mm256_loadu_si256(qg.add(k * 32) as *const __m256i);
            }
            let dwv = _mm256_loadu_ps(dw.add(g * ROWS));
            let mwv = _mm256_loadu_ps(mw.add(g * ROWS));
            let first = g * G;
            for t in 0..T {
                let a = &acts[t];
                let qa = a.blocks.get_unchecked(first / QK).qs.as_ptr().add(first % QK);
                let mut isum = _mm256_setzero_si256();
                for k in 0..G / 4 {
                    let four = _mm256_set1_epi32((qa.add(4 * k) as *const i32).read_unaligned());
                    isum = _mm256_dpbusd_epi32(isum, wv[k], four);
                }
                let [da, asum] = *a.scales.get_unchecked(g);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dwv, _mm256_set1_ps(da)), acc[t]);
                acc[t] = _mm256_fmadd_ps(mwv, _mm256_set1_ps(asum), acc[t]);
            }
        }
        for t in 0..T {
            _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dequantize_row;
    use crate::quant::dot::quantize_q8_scalar;
    use crate::quant::dot::tests::{random_row, Lcg};

    const TYPES: [GgmlType; 8] = GgmlType::Q8_ACTIVATION_TYPES;

    #[test]
    fn the_integer_form_gives_back_the_dequantised_row() {
        for t in TYPES {
            let cols = 512;
            let g = group_len(t).unwrap();
            let row = random_row(t, cols, &mut Lcg(7));
            let (mut q, mut dw, mut mw) = (vec![0u8; cols], vec![0f32; cols / g], vec![0f32; cols / g]);
            unpack_row(t, &row, &mut q, &mut dw, &mut mw);
            let mut want = vec![0f32; cols];
            dequantize_row(t, &row, &mut want);
            for c in 0..cols {
                let got = dw[c / g] * q[c] as f32 + mw[c / g];
                assert!((got - want[c]).abs() <= 1e-5 * (1.0 + want[c].abs()), "{t} column {c}: {got} vs {want:?}");
            }
        }
    }

    #[test]
    fn tiles_equal_the_scalar_twin_and_the_f32_product() {
        for t in TYPES {
            let (rows, cols) = (13, 512); // a partial row group
            let bytes = random_row(t, rows * cols, &mut Lcg(11));
            let mut packed = PackedRows::default();
            packed.pack(t, &bytes, rows, cols);
            let x: Vec<Vec<f32>> =
                (0..3).map(|k| (0..cols).map(|i| ((i * 37 + k * 11) % 23) as f32 / 7.0 - 1.5).collect()).collect();
            let blocks: Vec<Vec<Q8Block>> = x
                .iter()
                .map(|xs| {
                    let mut b = Vec::new();
                    quantize_q8_scalar(xs, &mut b);
                    b
                })
                .collect();
            let scales: Vec<Vec<[f32; 2]>> = blocks
                .iter()
                .map(|b| {
                    let mut s = Vec::new();
                    group_scales(b, packed.group, &mut s);
                    s
                })
                .collect();
            let acts: [TokenActs; 3] = std::array::from_fn(|k| TokenActs { blocks: &blocks[k], scales: &scales[k] });
            let mut w = vec![0f32; rows * cols];
            dequantize_row(t, &bytes, &mut w);
            for rg in 0..packed.row_groups() {
                let (mut fast, mut twin) = ([[0f32; ROWS]; 3], [[0f32; ROWS]; 3]);
                tile(&packed, rg, &acts, &mut fast);
                tile_scalar(&packed, rg, &acts, &mut twin);
                assert_eq!(fast, twin, "{t}: the kernel and its twin");
                for (k, xs) in x.iter().enumerate() {
                    for lane in 0..ROWS {
                        let r = rg * ROWS + lane;
                        let exact: f32 = if r < rows {
                            w[r * cols..(r + 1) * cols].iter().zip(xs).map(|(a, b)| a * b).sum()
                        } else {
                            0.0
                        };
                        let scale: f32 = if r < rows {
                            w[r * cols..(r + 1) * cols].iter().zip(xs).map(|(a, b)| (a * b).abs()).sum()
                        } else {
                            0.0
                        };
                        // 8-bit activations: an error of ~1% of the absolute products' sum.
                        assert!(
                            (fast[k][lane] - exact).abs() <= 0.01 * scale + 1e-6,
                            "{t} row {r}: {} vs {exact}",
                            fast[k][lane]
                        );
                    }
                }
            }
        }
    }
}

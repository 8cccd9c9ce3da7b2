//! ggml tensor types: block layouts, dequantisation and dot products.
//!
//! Block layouts follow ggml (`ggml-common.h`): 32-element blocks for the legacy types (Q4_0,
//! Q4_1, Q5_0, Q5_1, Q8_0) and 256-element super-blocks for the K-quants (Q2_K..Q6_K).
//! [`scalar`] holds the plain reference dequantisers; [`dot`] holds the fast row-dot kernels
//! that the matrix products use, each with a scalar twin that tests compare against.

pub mod dot;
pub mod gemm_q8;
pub mod scalar;

use std::fmt;

/// The tensor element types this engine reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

/// Elements per K-quant super-block.
/// Row ranges covering `rows` rows of `cols` values, each at most `max_values` values (one row
/// at least): the tiles a quantised weight is dequantised in for a matrix product (the GPU's
/// f16 tiles for cuBLAS).
pub fn row_tiles(rows: usize, cols: usize, max_values: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per_tile = (max_values / cols.max(1)).clamp(1, rows.max(1));
    (0..rows).step_by(per_tile).map(move |r0| r0..(r0 + per_tile).min(rows))
}

pub const QK_K: usize = 256;
/// Elements per legacy block.
pub const QK: usize = 32;

impl GgmlType {
    pub const ALL: [GgmlType; 13] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// The ggml type id used in GGUF tensor infos.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    /// The type named `name` as ggml writes it (Q4_K), any case (q4_k).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => QK,
            _ => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            GgmlType::Q2K => 16 + 64 + 2 + 2,
            GgmlType::Q3K => 32 + 64 + 12 + 2,
            GgmlType::Q4K => 2 + 2 + 12 + 128,
            GgmlType::Q5K => 2 + 2 + 12 + 32 + 128,
            GgmlType::Q6K => 128 + 64 + 16 + 2,
        }
    }

    /// Bytes of one row of `n` elements (`n` must be a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.block_bytes()
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
        }
    }

    /// Whether rows are dotted against activations quantised to 8-bit blocks of 32 (as
    /// llama.cpp does for these types; for the K-quants it uses blocks of 256) rather than
    /// against f32 activations.
    pub fn uses_q8_activations(self) -> bool {
        Self::Q8_ACTIVATION_TYPES.contains(&self)
    }

    /// The types whose products take 8-bit activations ([`dot::Q8Block`]) and integer sums,
    /// on the CPU and, kept in their blocks, on the GPU.
    pub const Q8_ACTIVATION_TYPES: [GgmlType; 8] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantise `out.len()` elements of type `t` from `bytes` (the plain reference path).
pub fn dequantize_row(t: GgmlType, bytes: &[u8], out: &mut [f32]) {
    let bs = t.block_size();
    let bb = t.block_bytes();
    debug_assert_eq!(out.len() % bs, 0);
    debug_assert!(bytes.len() >= out.len() / bs * bb);
    match t {
        GgmlType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => {
            let f = match t {
                GgmlType::Q4_0 => scalar::dequant_q4_0,
                GgmlType::Q4_1 => scalar::dequant_q4_1,
                GgmlType::Q5_0 => scalar::dequant_q5_0,
                GgmlType::Q5_1 => scalar::dequant_q5_1,
                GgmlType::Q8_0 => scalar::dequant_q8_0,
                GgmlType::Q2K => scalar::dequant_q2_k,
                GgmlType::Q3K => scalar::dequant_q3_k,
                GgmlType::Q4K => scalar::dequant_q4_k,
                GgmlType::Q5K => scalar::dequant_q5_k,
                GgmlType::Q6K => scalar::dequant_q6_k,
                _ => unreachable!("float types handled above"),
            };
            for (o, b) in out.chunks_exact_mut(bs).zip(bytes.chunks_exact(bb)) {
                f(b, o);
            }
        }
    }
}

#[inline]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_tiles_cover_every_row_once_within_the_limit() {
        for (rows, cols, max) in
            [(11008, 4096, 8 << 20), (32000, 4096, 8 << 20), (7, 100, 250), (5, 1000, 10), (0, 64, 64)]
        {
            let tiles: Vec<_> = row_tiles(rows, cols, max).collect();
            let mut next = 0;
            for t in &tiles {
                assert_eq!(t.start, next, "{rows}x{cols}: gap or overlap");
                assert!(!t.is_empty() && (t.len() * cols <= max || t.len() == 1), "{rows}x{cols}: tile {t:?}");
                next = t.end;
            }
            assert_eq!(next, rows, "{rows}x{cols}: rows left out");
        }
        assert_eq!(row_tiles(11008, 4096, 8 << 20).count(), 6);
    }
}

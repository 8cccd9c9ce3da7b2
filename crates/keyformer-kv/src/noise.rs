//! Reproducible noise for Keyformer's score (spec, Algorithm 1; the paper's Table 4 ablation).
//!
//! Every sample is a pure function of (seed, layer, head, step, position) through a
//! counter-based hash, so runs repeat exactly and a GPU kernel computing the same hash selects
//! the same tokens. The hash is split to be cheap where it is hot: a 64-bit key per attention
//! row (seed, layer, head, step; splitmix64's finaliser), then one 32-bit mix per position
//! (murmur3's finaliser over the position and the key), which vectorises. A Gumbel draw is the
//! top 16 bits of that hash looking up [`gumbel_table`], the Gumbel quantiles at the midpoints of
//! 2^16 equal bins of u: no logarithm per draw (two logarithms per draw had been 12% of a
//! Keyformer decode step at 4k tokens of context), the same numbers on any backend that is
//! handed the table, and a distribution whose mean and standard deviation match Gumbel(0, 1)
//! to 1e-4 (the tails stop at the 1/131072 quantiles, -2.47 and [`GUMBEL_TABLE_MAX`]). The
//! Gaussian's logarithm is [`ln_approx`], plain f32 arithmetic that SIMD and GPU code reproduce
//! to the bit.

/// Which regulariser is added to the attention logits before the score's softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseKind {
    /// Gumbel(0, 1): `-ln(-ln u)`. The paper's choice.
    #[default]
    Gumbel,
    /// Normal with the Gumbel's mean and standard deviation (0.5772, 1.2825).
    Gaussian,
    /// The Gumbel's mean, 0.5772, everywhere (a constant shift: no regularisation).
    Constant,
    /// No noise: the score is a temperature-scaled softmax (equal to H2O at temperature 1).
    None,
}

impl std::str::FromStr for NoiseKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "gumbel" => NoiseKind::Gumbel,
            "gaussian" => NoiseKind::Gaussian,
            "constant" => NoiseKind::Constant,
            "none" => NoiseKind::None,
            _ => return Err(format!("unknown noise '{s}' (gumbel, gaussian, constant, none)")),
        })
    }
}

/// The Euler-Mascheroni constant: the mean of Gumbel(0, 1).
pub const GUMBEL_MEAN: f32 = 0.577_215_7;
/// pi / sqrt(6): the standard deviation of Gumbel(0, 1).
pub const GUMBEL_STD: f32 = 1.282_549_8;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A 64-bit hash of the counter (seed, layer, head, step, position).
pub fn counter_hash(seed: u64, layer: u32, head: u32, step: u32, position: u32) -> u64 {
    let a = mix(seed ^ 0x9E37_79B9_7F4A_7C15);
    let b = mix(a ^ (((layer as u64) << 32) | head as u64));
    mix(b ^ (((step as u64) << 32) | position as u64))
}

/// Uniform in the open interval (0, 1) from the hash (never 0 or 1, so logs are finite).
pub fn uniform_open(seed: u64, layer: u32, head: u32, step: u32, position: u32, stream: u64) -> f64 {
    let h = counter_hash(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93), layer, head, step, position);
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// murmur3's 32-bit finaliser (a bijection with full avalanche).
pub fn fmix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x85EB_CA6B);
    x ^= x >> 13;
    x = x.wrapping_mul(0xC2B2_AE35);
    x ^ (x >> 16)
}

/// The per-position hash under a row key: `fmix32(position * golden ^ key)`.
pub fn position_hash(key: u32, position: u32) -> u32 {
    fmix32(position.wrapping_mul(0x9E37_79B9) ^ key)
}

/// 23 bits of a hash as a uniform in (0, 1), exact in f32 (so never 0 or 1).
pub fn unit_open(h: u32) -> f32 {
    ((h >> 9) as f32 + 0.5) * (1.0 / 8_388_608.0)
}

/// Natural logarithm of a positive, finite, normal `x` to about 1 ulp, in plain f32 operations
/// (no fused multiply-add) so that vector and GPU code give the same bits: x = 2^e m with m in
/// [sqrt(1/2), sqrt(2)), ln x = e ln 2 + ln m, ln m = f - f^2/2 + f^3 P(f) for f = m - 1
/// (the minimax polynomial of Cephes' logf), and ln 2 split in two for the e term.
pub fn ln_approx(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000); // in [0.5, 1)
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        m = m + m - 1.0;
    } else {
        m -= 1.0;
    }
    let e = e as f32;
    let z = m * m;
    let mut y = LN_POLY[0];
    for c in &LN_POLY[1..] {
        y = y * m + c;
    }
    y = y * m * z;
    y += e * LN2_LO;
    y += -0.5 * z;
    let r = m + y;
    r + e * LN2_HI
}

/// Cephes logf's polynomial, highest degree first.
pub const LN_POLY: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333e-1,
];
/// ln 2 = LN2_HI + LN2_LO, with LN2_HI exact in few bits so that e * LN2_HI is exact.
pub const LN2_HI: f32 = 0.693_359_4;
pub const LN2_LO: f32 = -2.121_944_4e-4;

/// Bits of the position hash that pick a Gumbel quantile.
pub const GUMBEL_TABLE_BITS: u32 = 16;

/// `-ln(-ln u)` at the bin midpoints `u = (i + 0.5) / 2^16`, computed in f64 and rounded once.
pub fn gumbel_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let n = 1usize << GUMBEL_TABLE_BITS;
        (0..n).map(|i| -(-((i as f64 + 0.5) / n as f64).ln()).ln() as f32).collect()
    })
}

/// The largest value in [`gumbel_table`] (its last entry): an upper bound of every draw, which
/// lets a softmax over noisy logits shift by (max logit + this) without a pass for the max.
pub const GUMBEL_TABLE_MAX: f32 = 11.783_498;

/// The Gumbel(0, 1) draw of a 32-bit position hash.
pub fn gumbel_of_hash(h: u32) -> f32 {
    gumbel_table()[(h >> (32 - GUMBEL_TABLE_BITS)) as usize]
}

/// The noise of one attention row, (seed, layer, head, step) fixed, for any key position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseRow {
    pub kind: NoiseKind,
    /// Two 32-bit keys from the row's 64-bit counter hash (the second feeds Box-Muller's angle).
    pub key: [u32; 2],
}

impl NoiseRow {
    pub fn new(kind: NoiseKind, seed: u64, layer: u32, head: u32, step: u32) -> Self {
        let h = counter_hash(seed, layer, head, step, u32::MAX);
        Self { kind, key: [h as u32, (h >> 32) as u32] }
    }

    /// The noise added to the logit of the key at `position`.
    pub fn sample(&self, position: u32) -> f32 {
        match self.kind {
            NoiseKind::None => 0.0,
            NoiseKind::Constant => GUMBEL_MEAN,
            NoiseKind::Gumbel => gumbel_of_hash(position_hash(self.key[0], position)),
            NoiseKind::Gaussian => {
                // Box-Muller from two independent uniforms.
                let u1 = unit_open(position_hash(self.key[0], position));
                let u2 = unit_open(position_hash(self.key[1], position));
                let z = (-2.0 * ln_approx(u1)).sqrt() * (std::f32::consts::TAU * u2).cos();
                GUMBEL_MEAN + GUMBEL_STD * z
            }
        }
    }
}

/// The noise added to logit (query `step`, key `position`) of `head` in `layer`.
pub fn sample(kind: NoiseKind, seed: u64, layer: u32, head: u32, step: u32, position: u32) -> f32 {
    NoiseRow::new(kind, seed, layer, head, step).sample(position)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_repeat_and_depend_on_every_counter_field() {
        let base = sample(NoiseKind::Gumbel, 7, 1, 2, 3, 4);
        assert_eq!(base, sample(NoiseKind::Gumbel, 7, 1, 2, 3, 4));
        for other in [
            sample(NoiseKind::Gumbel, 8, 1, 2, 3, 4),
            sample(NoiseKind::Gumbel, 7, 2, 2, 3, 4),
            sample(NoiseKind::Gumbel, 7, 1, 3, 3, 4),
            sample(NoiseKind::Gumbel, 7, 1, 2, 4, 4),
            sample(NoiseKind::Gumbel, 7, 1, 2, 3, 5),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn moments_match_the_distributions() {
        for (kind, mean, std) in
            [(NoiseKind::Gumbel, GUMBEL_MEAN, GUMBEL_STD), (NoiseKind::Gaussian, GUMBEL_MEAN, GUMBEL_STD)]
        {
            let xs: Vec<f64> = (0..200_000u32).map(|i| sample(kind, 1, 0, 0, i / 1000, i % 1000) as f64).collect();
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
            assert!((m - mean as f64).abs() < 0.01, "{kind:?} mean {m}");
            assert!((sd - std as f64).abs() < 0.01, "{kind:?} sd {sd}");
        }
        assert_eq!(sample(NoiseKind::Constant, 1, 2, 3, 4, 5), GUMBEL_MEAN);
        assert_eq!(sample(NoiseKind::None, 1, 2, 3, 4, 5), 0.0);
    }

    #[test]
    fn ln_approx_is_within_two_ulp_of_the_true_logarithm() {
        let mut worst = 0.0f64;
        let mut x = f32::MIN_POSITIVE;
        while x < 1e30 {
            for m in [1.0f32, 1.1, 1.3, 1.414, 1.415, 1.5, 1.7, 1.99] {
                let v = x * m;
                let exact = (v as f64).ln();
                let got = ln_approx(v) as f64;
                let ulp = (exact.abs() as f32 * f32::EPSILON).max(f32::MIN_POSITIVE) as f64;
                worst = worst.max((got - exact).abs() / ulp);
            }
            x *= 1.37;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(ln_approx(1.0), 0.0);
    }

    #[test]
    fn the_gumbel_table_holds_the_quantiles_at_bin_midpoints() {
        let t = gumbel_table();
        assert_eq!(t.len(), 1 << GUMBEL_TABLE_BITS);
        assert!(t.windows(2).all(|w| w[0] < w[1]), "quantiles increase");
        assert_eq!(t[t.len() - 1], GUMBEL_TABLE_MAX);
        // The median of Gumbel(0, 1) is -ln(ln 2), between the two middle bins.
        let median = -(2f64.ln().ln());
        assert!((t[32767] as f64) < median && median < t[32768] as f64);
        // Bin i's value is the CDF's inverse at its midpoint: exp(-exp(-g)) = (i + 0.5) / 2^16.
        for i in [0usize, 1, 1000, 40000, 65535] {
            let cdf = (-(-(t[i] as f64)).exp()).exp();
            assert!((cdf - (i as f64 + 0.5) / 65536.0).abs() < 1e-6 * (1.0 + i as f64), "bin {i}: {cdf}");
        }
        // A hash's top bits pick the bin.
        assert_eq!(gumbel_of_hash(0xFFFF_0000), GUMBEL_TABLE_MAX);
        assert_eq!(gumbel_of_hash(0x0000_FFFF), t[0]);
    }

    #[test]
    fn uniforms_are_open_and_rows_differ() {
        assert!(unit_open(0) > 0.0 && unit_open(u32::MAX) < 1.0);
        let a = NoiseRow::new(NoiseKind::Gumbel, 1, 2, 3, 4);
        assert_ne!(a.key, NoiseRow::new(NoiseKind::Gumbel, 1, 2, 3, 5).key);
        let xs: std::collections::HashSet<u32> = (0..10_000).map(|p| a.sample(p).to_bits()).collect();
        // 10,000 draws into 2^16 bins: about 9,250 distinct values expected (birthday collisions).
        assert!(xs.len() > 9_100, "positions of a row get independent noise: {} distinct", xs.len());
    }
}

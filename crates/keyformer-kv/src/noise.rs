//! Reproducible noise for Keyformer's score (spec, Algorithm 1; the paper's Table 4 ablation).
//!
//! Every sample is a pure function of (seed, layer, head, step, position) through a
//! counter-based hash (splitmix64 finaliser over the packed counter), so runs repeat exactly
//! and a GPU kernel computing the same hash selects the same tokens.

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

/// The noise added to logit (query `step`, key `position`) of `head` in `layer`.
pub fn sample(kind: NoiseKind, seed: u64, layer: u32, head: u32, step: u32, position: u32) -> f32 {
    match kind {
        NoiseKind::None => 0.0,
        NoiseKind::Constant => GUMBEL_MEAN,
        NoiseKind::Gumbel => {
            let u = uniform_open(seed, layer, head, step, position, 0);
            -(-u.ln()).ln() as f32
        }
        NoiseKind::Gaussian => {
            // Box-Muller from two independent uniforms.
            let u1 = uniform_open(seed, layer, head, step, position, 1);
            let u2 = uniform_open(seed, layer, head, step, position, 2);
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            GUMBEL_MEAN + GUMBEL_STD * z as f32
        }
    }
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
        for (kind, mean, std) in [(NoiseKind::Gumbel, GUMBEL_MEAN, GUMBEL_STD), (NoiseKind::Gaussian, GUMBEL_MEAN, GUMBEL_STD)] {
            let xs: Vec<f64> = (0..200_000u32).map(|i| sample(kind, 1, 0, 0, i / 1000, i % 1000) as f64).collect();
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let sd = (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt();
            assert!((m - mean as f64).abs() < 0.01, "{kind:?} mean {m}");
            assert!((sd - std as f64).abs() < 0.01, "{kind:?} sd {sd}");
        }
        assert_eq!(sample(NoiseKind::Constant, 1, 2, 3, 4, 5), GUMBEL_MEAN);
        assert_eq!(sample(NoiseKind::None, 1, 2, 3, 4, 5), 0.0);
    }
}

//! Choosing the next token from logits: repetition penalty, then top-k, top-p and min-p
//! filtering, then temperature and a seeded draw (llama.cpp's default order). Temperature 0
//! is greedy.

/// Sampling settings. `Default` is greedy with no penalty.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability (0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens by this (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplingParams {
    /// Reject settings that have no meaning.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top-p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min-p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(format!("repeat penalty must be > 0, got {}", self.repeat_penalty));
        }
        Ok(())
    }
}

/// A seed from the clock, for a run or request that gives none (as llama.cpp's default).
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self([next(), next(), next(), next()])
    }
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A sampler with its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// Pick the next token given the logits and the tokens so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                if let Some(l) = logits.get_mut(t as usize) {
                    if seen.insert(t) {
                        *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                    }
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        // Candidates sorted by logit, best first.
        let mut cand: Vec<(u32, f32)> = logits.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
        cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let probs = |c: &[(u32, f32)], temp: f32| -> Vec<f64> {
            let max = c[0].1 as f64;
            let e: Vec<f64> = c.iter().map(|&(_, l)| ((l as f64 - max) / temp as f64).exp()).collect();
            let s: f64 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect()
        };
        if p.top_p < 1.0 {
            let pr = probs(&cand, 1.0);
            let mut acc = 0.0;
            let keep = pr.iter().position(|&q| {
                acc += q;
                acc >= p.top_p as f64
            });
            cand.truncate(keep.map_or(cand.len(), |k| k + 1));
        }
        if p.min_p > 0.0 {
            let pr = probs(&cand, 1.0);
            let floor = pr[0] * p.min_p as f64;
            let keep = pr.iter().take_while(|&&q| q >= floor).count().max(1);
            cand.truncate(keep);
        }
        let pr = probs(&cand, p.temperature);
        let mut u = self.rng.next_f64();
        for (&(id, _), q) in cand.iter().zip(&pr) {
            if u < *q {
                return id;
            }
            u -= q;
        }
        cand.last().map_or(0, |c| c.0)
    }
}

/// Index of the largest logit (the first one on ties, as llama.cpp and torch do).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(f: impl FnOnce(&mut SamplingParams)) -> Sampler {
        let mut p = SamplingParams { temperature: 1.0, ..Default::default() };
        f(&mut p);
        Sampler::new(p)
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.9], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_min_p_cuts_the_tail() {
        let logits = [1.0, 2.0, 0.5, 1.9];
        let mut s = sampler(|p| p.top_k = 1);
        assert!((0..50).all(|_| s.sample(&logits, &[]) == 1));
        // min_p 0.9: only tokens within 90% of the best probability survive (ids 1 and 3).
        let mut s = sampler(|p| p.min_p = 0.9);
        assert!((0..200).all(|_| matches!(s.sample(&logits, &[]), 1 | 3)));
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: p = 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = sampler(|p| p.top_p = 0.8);
        let draws: Vec<u32> = (0..300).map(|_| s.sample(&logits, &[])).collect();
        assert!(draws.iter().all(|&t| t < 2));
        assert!(draws.contains(&0) && draws.contains(&1));
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 2.0, ..Default::default() });
        assert_eq!(s.sample(&[3.0, 2.0], &[0]), 1);
    }

    #[test]
    fn the_same_seed_repeats_and_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 0.25, 0.75
        let run = |seed| {
            let mut s = sampler(|p| p.seed = seed);
            (0..4000).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let ones = run(5).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
    }
}

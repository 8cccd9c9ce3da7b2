//! Expected attention (kvpress's ExpectedAttention press): score a cached token by the attention
//! that the queries still to come are expected to give it, before any of them is known.
//!
//! The prompt's queries of one query head (before rotary) are summarised by their mean `mu` and
//! covariance `S`; the rotation of the positions to come (the next few hundred) is averaged into
//! one matrix `R`, so a future query is modelled as Gaussian with mean `R mu` and covariance
//! `R S R^T`. For a Gaussian query `q`, `E[exp(scale q.k)] = exp(scale m.k + scale^2 k^T C k / 2)`
//! (`m`, `C` the rotated moments): that is each key's expected attention logit. The scores are
//! the softmax of these logits over the head's held keys, averaged over the KV head's query
//! heads and multiplied by the norm of the token's value (a token whose value is small changes
//! the output little). The rotation and the moments come from the backend, which knows the
//! model's rotary embedding; this module is plain arithmetic on slices.

/// The queries to come of one KV head's query heads, and the softmax normalisers fitted to the
/// keys held when the model was made (a token that arrives later is scored against them).
#[derive(Debug, Clone, PartialEq)]
pub struct QueryModel {
    head_dim: usize,
    /// Per query head: the rotated mean (`head_dim`) and covariance (`head_dim^2`, row-major).
    means: Vec<Vec<f32>>,
    covs: Vec<Vec<f32>>,
    /// The attention's logit scale (`1/sqrt(head_dim)` for most models).
    scale: f32,
    /// Per query head: the log of the softmax's denominator over the held keys.
    log_norms: Vec<f32>,
    /// The fit's temperature and the mean of its noise (Keyformer's regularisation on these
    /// logits; 1 and 0 without it): a later token is scored at the noise's mean.
    tau: f32,
    noise_mean: f32,
}

impl QueryModel {
    /// A model from each query head's rotated mean and covariance (all of `head_dim` and
    /// `head_dim^2` values; the two lists of equal length, at least one head).
    pub fn new(head_dim: usize, means: Vec<Vec<f32>>, covs: Vec<Vec<f32>>, scale: f32) -> Self {
        assert!(!means.is_empty() && means.len() == covs.len(), "one mean and one covariance per query head");
        assert!(means.iter().all(|m| m.len() == head_dim), "means of head_dim values");
        assert!(covs.iter().all(|c| c.len() == head_dim * head_dim), "covariances of head_dim^2 values");
        let log_norms = vec![0.0; means.len()];
        Self { head_dim, means, covs, scale, log_norms, tau: 1.0, noise_mean: 0.0 }
    }

    /// Query head `h`'s expected attention logit for `key`.
    pub fn logit(&self, h: usize, key: &[f32]) -> f32 {
        let d = self.head_dim;
        let (mean, cov) = (&self.means[h], &self.covs[h]);
        let linear: f32 = mean.iter().zip(key).map(|(m, k)| m * k).sum();
        let quadratic: f32 =
            (0..d).map(|i| key[i] * cov[i * d..(i + 1) * d].iter().zip(key).map(|(c, k)| c * k).sum::<f32>()).sum();
        self.scale * linear + 0.5 * self.scale * self.scale * quadratic
    }

    /// Fit the normalisers to `keys` (a head's held keys) and return each one's score: its
    /// softmax weight averaged over the query heads, times `value_norms[j]`.
    pub fn fit_and_score(&mut self, keys: &[&[f32]], value_norms: &[f32]) -> Vec<f32> {
        self.fit_and_score_noisy(keys, value_norms, |_, _| 0.0, 0.0, 1.0)
    }

    /// [`fit_and_score`](Self::fit_and_score) with Keyformer's regularisation: the softmax of
    /// `(logit + noise(h, j)) / tau` for query head `h` and key `j`; `noise_mean` is the noise's
    /// expectation, at which [`score`](Self::score) puts a later token.
    pub fn fit_and_score_noisy(
        &mut self,
        keys: &[&[f32]],
        value_norms: &[f32],
        noise: impl Fn(usize, usize) -> f32,
        noise_mean: f32,
        tau: f32,
    ) -> Vec<f32> {
        assert_eq!(keys.len(), value_norms.len(), "one value norm per key");
        (self.tau, self.noise_mean) = (tau, noise_mean);
        let mut scores = vec![0f32; keys.len()];
        if keys.is_empty() {
            return scores;
        }
        let heads = self.means.len();
        for h in 0..heads {
            let logits: Vec<f32> =
                keys.iter().enumerate().map(|(j, k)| (self.logit(h, k) + noise(h, j)) / tau).collect();
            let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = logits.iter().map(|&z| ((z - top) as f64).exp()).sum();
            self.log_norms[h] = top + total.ln() as f32;
            for (s, z) in scores.iter_mut().zip(&logits) {
                *s += (z - self.log_norms[h]).exp() / heads as f32;
            }
        }
        scores.iter_mut().zip(value_norms).for_each(|(s, v)| *s *= v);
        scores
    }

    /// The score of a token that arrives after the fit, against the fitted normalisers.
    pub fn score(&self, key: &[f32], value_norm: f32) -> f32 {
        let heads = self.means.len();
        let weight: f32 = (0..heads)
            .map(|h| ((self.logit(h, key) + self.noise_mean) / self.tau - self.log_norms[h]).exp())
            .sum::<f32>()
            / heads as f32;
        weight * value_norm
    }
}

/// The mean of `count` rotations of a rotary embedding, one per position from `first`: for each
/// frequency `f` of `inv_freq`, `(mean cos(p f), mean sin(p f))` times `mscale` (YaRN's factor),
/// the 2x2 block the averaged rotation applies to that frequency's pair of dimensions.
pub fn mean_rotation(inv_freq: &[f32], mscale: f32, first: usize, count: usize) -> Vec<(f32, f32)> {
    let count = count.max(1);
    inv_freq
        .iter()
        .map(|&f| {
            let (mut c, mut s) = (0f64, 0f64);
            for p in first..first + count {
                let angle = p as f64 * f as f64;
                c += angle.cos();
                s += angle.sin();
            }
            ((c / count as f64) as f32 * mscale, (s / count as f64) as f32 * mscale)
        })
        .collect()
}

/// Which dimensions a rotary frequency turns: `(2i, 2i + 1)` (adjacent pairs) or `(i, i + half)`
/// (the two halves of the rotated part, NeoX's layout).
pub fn rotary_pair(i: usize, n_freq: usize, adjacent: bool) -> (usize, usize) {
    if adjacent {
        (2 * i, 2 * i + 1)
    } else {
        (i, i + n_freq)
    }
}

/// `x = R x` for the averaged rotation `rot` ([`mean_rotation`]); dimensions past the rotated
/// ones are left as they are.
pub fn rotate(x: &mut [f32], rot: &[(f32, f32)], adjacent: bool) {
    for (i, &(c, s)) in rot.iter().enumerate() {
        let (a, b) = rotary_pair(i, rot.len(), adjacent);
        let (xa, xb) = (x[a], x[b]);
        x[a] = c * xa - s * xb;
        x[b] = s * xa + c * xb;
    }
}

/// `R S R^T` for a `d x d` row-major `cov` and the averaged rotation `rot`.
pub fn rotate_covariance(cov: &mut [f32], d: usize, rot: &[(f32, f32)], adjacent: bool) {
    // R S: rotate each column; then (R S) R^T: rotate each row.
    let mut column = vec![0f32; d];
    for j in 0..d {
        (0..d).for_each(|i| column[i] = cov[i * d + j]);
        rotate(&mut column, rot, adjacent);
        (0..d).for_each(|i| cov[i * d + j] = column[i]);
    }
    for row in cov.chunks_exact_mut(d) {
        rotate(row, rot, adjacent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected value of exp(scale q.k) for q ~ N(m, C), estimated by sampling, agrees with
    /// the closed form the logit takes (so the quadratic term has the right factor).
    #[test]
    fn logit_is_the_log_of_the_expected_exponential() {
        let d = 3;
        let mean = vec![0.3f32, -0.2, 0.5];
        // C = L L^T with a fixed lower-triangular L.
        let l = [[0.5f32, 0.0, 0.0], [0.2, 0.4, 0.0], [-0.1, 0.3, 0.6]];
        let mut cov = vec![0f32; 9];
        for i in 0..d {
            for j in 0..d {
                cov[i * d + j] = (0..d).map(|k| l[i][k] * l[j][k]).sum();
            }
        }
        let model = QueryModel::new(d, vec![mean.clone()], vec![cov], 0.7);
        let key = [1.0f32, -2.0, 0.5];
        // Box-Muller normals from a fixed LCG.
        let mut state = 12345u64;
        let mut uniform = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let n = 200_000;
        let mut total = 0f64;
        for _ in 0..n {
            let z: Vec<f64> = (0..d)
                .map(|_| (-2.0 * uniform().ln()).sqrt() * (2.0 * std::f64::consts::PI * uniform()).cos())
                .collect();
            let q: Vec<f64> =
                (0..d).map(|i| mean[i] as f64 + (0..d).map(|k| l[i][k] as f64 * z[k]).sum::<f64>()).collect();
            let dot: f64 = q.iter().zip(&key).map(|(a, b)| a * *b as f64).sum();
            total += (0.7 * dot).exp();
        }
        let sampled = (total / n as f64).ln();
        assert!((sampled - model.logit(0, &key) as f64).abs() < 0.02, "{sampled} vs {}", model.logit(0, &key));
    }

    #[test]
    fn scores_are_softmax_weights_times_value_norms_and_later_tokens_match() {
        let mean = vec![1.0f32, 0.0];
        let mut model = QueryModel::new(2, vec![mean.clone(), vec![0.0, 1.0]], vec![vec![0.0; 4], vec![0.0; 4]], 1.0);
        let keys: [&[f32]; 3] = [&[1.0, 0.0], &[0.0, 1.0], &[-1.0, 0.0]];
        let scores = model.fit_and_score(&keys, &[1.0, 2.0, 1.0]);
        // Head 0's logits 1, 0, -1; head 1's 0, 1, 0.
        let e = std::f32::consts::E;
        let h0 = [e, 1.0, 1.0 / e].map(|v| v / (e + 1.0 + 1.0 / e));
        let h1 = [1.0, e, 1.0].map(|v| v / (2.0 + e));
        for j in 0..3 {
            let want = (h0[j] + h1[j]) / 2.0 * [1.0, 2.0, 1.0][j];
            assert!((scores[j] - want).abs() < 1e-6, "key {j}: {} vs {want}", scores[j]);
            // A token scored after the fit gets what the fit gave the same key.
            assert!((model.score(keys[j], [1.0, 2.0, 1.0][j]) - scores[j]).abs() < 1e-6);
        }
        // The weights of one head's softmax sum to one.
        let unit = model.fit_and_score(&keys, &[1.0; 3]);
        assert!((unit.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn noise_and_temperature_enter_the_softmax() {
        let zero = vec![vec![0.0f32; 4]];
        let mut model = QueryModel::new(2, vec![vec![1.0, 0.0]], zero, 1.0);
        let keys: [&[f32]; 2] = [&[1.0, 0.0], &[0.0, 0.0]];
        // Logits 1 and 0; noise 0 and 3, temperature 2: softmax of (0.5, 1.5).
        let scores = model.fit_and_score_noisy(&keys, &[1.0, 1.0], |_, j| [0.0, 3.0][j], 0.5, 2.0);
        let e = (1.0f32).exp();
        assert!((scores[1] - e / (1.0 + e)).abs() < 1e-6, "{scores:?}");
        // A later token with the first key gets its logit at the noise's mean: (1 + 0.5) / 2.
        let later = model.score(keys[0], 1.0);
        let want = (0.75f32).exp() / ((0.5f32).exp() + (1.5f32).exp());
        assert!((later - want).abs() < 1e-6, "{later} vs {want}");
    }

    #[test]
    fn averaged_rotation_of_one_position_is_that_rotation() {
        let inv_freq = [0.9f32, 0.1];
        let rot = mean_rotation(&inv_freq, 1.0, 7, 1);
        for adjacent in [false, true] {
            let mut x = vec![0.3f32, -1.2, 0.8, 0.5, 2.0];
            let orig = x.clone();
            rotate(&mut x, &rot, adjacent);
            for (i, &f) in inv_freq.iter().enumerate() {
                let (a, b) = rotary_pair(i, 2, adjacent);
                let (s, c) = (7.0 * f).sin_cos();
                assert!((x[a] - (c * orig[a] - s * orig[b])).abs() < 1e-5);
                assert!((x[b] - (s * orig[a] + c * orig[b])).abs() < 1e-5);
            }
            assert_eq!(x[4], 2.0, "a dimension past the rotated ones passes");
        }
        // Over a full period a frequency's rotation averages to nothing.
        let rot = mean_rotation(&[std::f32::consts::PI / 2.0], 1.0, 3, 4);
        assert!(rot[0].0.abs() < 1e-6 && rot[0].1.abs() < 1e-6);
    }

    #[test]
    fn rotated_covariance_is_r_s_r_transposed() {
        let d = 4;
        let rot = mean_rotation(&[0.4, 0.05], 1.0, 100, 16);
        let cov: Vec<f32> = (0..16).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect();
        let cov: Vec<f32> = (0..16).map(|i| cov[i] + cov[(i % 4) * 4 + i / 4]).collect(); // symmetric
                                                                                          // R as a dense matrix: its columns are rotated unit vectors.
        let mut r = vec![0f32; 16];
        for j in 0..d {
            let mut e = vec![0f32; d];
            e[j] = 1.0;
            rotate(&mut e, &rot, false);
            (0..d).for_each(|i| r[i * d + j] = e[i]);
        }
        let mul = |a: &[f32], b: &[f32]| -> Vec<f32> {
            (0..16).map(|ij| (0..d).map(|k| a[(ij / d) * d + k] * b[k * d + ij % d]).sum()).collect()
        };
        let rt: Vec<f32> = (0..16).map(|ij| r[(ij % d) * d + ij / d]).collect();
        let want = mul(&mul(&r, &cov), &rt);
        let mut got = cov.clone();
        rotate_covariance(&mut got, d, &rot, false);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
        }
    }
}

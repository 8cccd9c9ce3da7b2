//! Fidelity of a compressed cache to the full one (llama.cpp's KL-divergence method): the same
//! continuation is teacher-forced through both caches and every next-token distribution of the
//! compressed run is compared with the full run's.

use keyformer_kv::PolicyConfig;

use keyformer::kv::KvCache;
use keyformer::sampling::argmax;
use keyformer::{Engine, ModelError};

/// KL divergence statistics over the teacher-forced steps.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FidelityReport {
    /// Distributions compared (one after the prompt, then one per forced token but the last).
    pub steps: usize,
    pub mean_kl: f64,
    pub p90_kl: f64,
    pub max_kl: f64,
    /// Fraction of steps where both caches rank the same token first.
    pub top1_agreement: f64,
}

/// `log softmax(logits)` in f64.
fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    logits.iter().map(|&v| v as f64 - lse).collect()
}

/// KL(P || Q) for P = softmax(`reference`), Q = softmax(`candidate`), in nats.
pub fn kl_divergence(reference: &[f32], candidate: &[f32]) -> f64 {
    let (lp, lq) = (log_softmax(reference), log_softmax(candidate));
    lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>().max(0.0)
}

/// The value below which a fraction `q` of `values` lies (nearest rank).
pub fn percentile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Teacher-force `continuation` after `prompt` through the full cache and through `kv`, and
/// compare the next-token distributions step by step.
pub fn fidelity(
    engine: &Engine,
    prompt: &[u32],
    continuation: &[u32],
    kv: &PolicyConfig,
) -> Result<FidelityReport, ModelError> {
    if prompt.is_empty() || continuation.is_empty() {
        return Err(ModelError::Input("fidelity needs a prompt and a continuation".into()));
    }
    let steps = continuation.len();
    let mut full = engine.new_cache(&PolicyConfig::default(), prompt.len(), steps)?;
    let mut compressed = engine.new_cache(kv, prompt.len(), steps)?;
    let lf = engine.prefill(prompt, &mut full)?;
    let lc = engine.prefill(prompt, &mut compressed)?;
    let reference = teacher_forced_logits(engine, (full, lf), continuation)?;
    fidelity_against(engine, &reference, (compressed, lc), continuation)
}

/// The next-token logits along a teacher-forced `continuation`, from a cache that holds the
/// prompt (with the prompt's last logits): one row per forced token, each predicting it.
pub fn teacher_forced_logits(
    engine: &Engine,
    (mut cache, mut logits): (KvCache, Vec<f32>),
    continuation: &[u32],
) -> Result<Vec<Vec<f32>>, ModelError> {
    let mut rows = Vec::with_capacity(continuation.len());
    for (i, &token) in continuation.iter().enumerate() {
        if i + 1 < continuation.len() {
            let next = engine.decode_step(token, &mut cache)?;
            rows.push(std::mem::replace(&mut logits, next));
        } else {
            rows.push(std::mem::take(&mut logits));
        }
    }
    Ok(rows)
}

/// Teacher-force `continuation` through a compressed cache that holds the prompt and compare
/// each next-token distribution with the full cache's (`reference`, from
/// [`teacher_forced_logits`]).
pub fn fidelity_against(
    engine: &Engine,
    reference: &[Vec<f32>],
    (mut cache, mut logits): (KvCache, Vec<f32>),
    continuation: &[u32],
) -> Result<FidelityReport, ModelError> {
    let steps = continuation.len();
    if steps == 0 || reference.len() != steps {
        return Err(ModelError::Input(format!("fidelity needs a continuation and its {steps} reference rows")));
    }
    let (mut kls, mut agree) = (Vec::with_capacity(steps), 0usize);
    for (i, (&token, full)) in continuation.iter().zip(reference).enumerate() {
        kls.push(kl_divergence(full, &logits));
        agree += usize::from(argmax(full) == argmax(&logits));
        if i + 1 < steps {
            logits = engine.decode_step(token, &mut cache)?;
        }
    }
    Ok(FidelityReport {
        steps,
        mean_kl: kls.iter().sum::<f64>() / steps as f64,
        p90_kl: percentile(&kls, 0.9),
        max_kl: kls.iter().cloned().fold(0.0, f64::max),
        top1_agreement: agree as f64 / steps as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_hand_computed_distributions() {
        // P = (1/2, 1/2), Q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3).
        let p = [0.0f32, 0.0];
        let q = [0.0f32, (3.0f32).ln()];
        let want = 0.5 * (2.0f64).ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((kl_divergence(&p, &q) - want).abs() < 1e-7);
        assert_eq!(kl_divergence(&q, &q), 0.0);
    }

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v, 1.0), 10.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
    }
}

//! llama-bench-style timing: prompt processing of `p` tokens and generation of `n` tokens,
//! on synthetic token ids, with no tokenizer or sampling inside the timed region.

use std::time::Instant;

use crate::engine::Engine;
use crate::models::llama::Logits;
use crate::sampling::argmax;
use crate::ModelError;

/// One timed test, repeated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// `pp512`, `tg128`, as llama-bench names them.
    pub test: String,
    pub tokens: usize,
    pub samples_s: Vec<f64>,
    pub median_tok_s: f64,
    pub min_tok_s: f64,
    pub max_tok_s: f64,
}

impl BenchResult {
    fn new(test: String, tokens: usize, samples_s: Vec<f64>) -> Self {
        let mut rates: Vec<f64> = samples_s.iter().map(|s| tokens as f64 / s).collect();
        rates.sort_by(f64::total_cmp);
        Self {
            test,
            tokens,
            median_tok_s: rates[rates.len() / 2],
            min_tok_s: rates[0],
            max_tok_s: rates[rates.len() - 1],
            samples_s,
        }
    }
}

/// Synthetic prompt: ids spread over the vocabulary, skipping none (any id is a valid input).
fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Time prefilling `p` tokens into an empty cache, `reps` times (after one warm-up).
pub fn prompt_processing(engine: &Engine, p: usize, reps: usize) -> Result<BenchResult, ModelError> {
    let tokens = synthetic_tokens(p, engine.model.config.vocab_size);
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let mut cache = engine.model.new_cache(p);
        let t = Instant::now();
        engine.prefill(&tokens, &mut cache)?;
        if rep > 0 {
            samples.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult::new(format!("pp{p}"), p, samples))
}

/// Time generating `n` tokens one at a time from an empty cache (greedy on the model's own
/// output, so each step is a real decode step), `reps` times after one warm-up.
pub fn generation(engine: &Engine, n: usize, reps: usize) -> Result<BenchResult, ModelError> {
    let mut samples = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let mut cache = engine.model.new_cache(n);
        let mut next = 1u32;
        let t = Instant::now();
        for _ in 0..n {
            let logits = engine.model.forward(&[next], &mut cache, Logits::Last)?;
            next = argmax(&logits);
        }
        if rep > 0 {
            samples.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult::new(format!("tg{n}"), n, samples))
}

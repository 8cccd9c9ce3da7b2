//! The paper's throughput protocol on the GPU (`keyformer bench --device cuda`): a batch of
//! sequences, each a copy of a `prompt`-token prompt, prefilled one after another, then
//! `gen` greedy tokens decoded for all of them together, one batched step per token (the
//! argmax found on the GPU; only the chosen ids come back). The budget of a compressed policy
//! is a share of the prompt, fixed while generating, as in the paper.

use std::time::Instant;

use keyformer_kv::PolicyConfig;

use super::backend::Cuda;
use super::kv::GpuKvCache;
use super::tensor_parallel::ShardedModel;
use crate::backend::{Backend, SequenceCache};
use crate::models::config::ModelConfig;
use crate::models::decoder::{Logits, Model};
use crate::models::random;
use crate::sampling::argmax;
use crate::ModelError;

/// Device memory kept free beyond the caches: activations, attention scratch, cuBLAS, and a
/// margin for the allocator's granularity.
const RESERVE_BYTES: usize = 4 << 30;

/// One measured configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuBenchRow {
    pub prompt: usize,
    pub gen: usize,
    /// `full`, `keyformer@50%`, ...
    pub kv: String,
    pub batch: usize,
    /// Prefill of every sequence, one after another.
    pub prefill_s: f64,
    /// One sequence's prefill once everything is warm (the median of three after the run, its
    /// caches freed first: cuBLAS loaded, the allocator's pool and the activations sized), as
    /// transformers' figure is taken after a warm-up and llama-bench's after its warm-up run.
    pub prefill_warm_s: f64,
    pub decode_s: f64,
    /// Generated tokens (all sequences) per second of decoding.
    pub decode_tok_s: f64,
    /// Generated tokens per second of the whole run (prefill + decode), the paper's throughput.
    pub total_tok_s: f64,
    pub ms_per_step: f64,
    /// Decode steps' time at the start and at the end (mean of 16 steps each).
    pub ms_per_step_first: f64,
    pub ms_per_step_last: f64,
    /// KV bytes one sequence holds at the end, and what the full cache would hold.
    pub kv_bytes_per_sequence: usize,
    pub kv_bytes_full: usize,
    /// Device memory in use at the run's peak (sampled after prefill and at the end).
    pub peak_gpu_bytes: usize,
}

/// Bytes of keys and values per token held (all layers and KV heads, f16).
pub fn bytes_per_token(model: &Model<Cuda>) -> usize {
    model.kv_bytes_per_token()
}

/// The most sequences of this shape whose caches fit in `free_bytes` of device memory (what
/// was free with the weights loaded, before any run: memory a run frees may stay in the
/// driver's pool, so it is not measured again). Each sequence holds what its KV plan holds
/// once its prompt is compressed (full: prompt + gen; a budget: budget + 1 slots in the global
/// layers, a sliding layer its window), and one prompt at full size is held while it is
/// prefilled and compressed.
pub fn max_batch(
    model: &Model<Cuda>,
    prompt: usize,
    gen: usize,
    kv: &PolicyConfig,
    free_bytes: usize,
) -> Result<usize, ModelError> {
    let plan = model.plan_kv(kv, prompt, gen)?;
    let transient = plan.bytes_prefill.saturating_sub(plan.bytes_steady);
    let free = (free_bytes - free_bytes / 20).saturating_sub(RESERVE_BYTES + transient);
    Ok((free / plan.bytes_steady.max(1)).max(1))
}

/// The protocol's prompt (the same tokens for every sequence), once the sizes are checked.
fn protocol_prompt(c: &ModelConfig, prompt: usize, gen: usize, batch: usize) -> Result<Vec<u32>, ModelError> {
    if prompt == 0 || gen == 0 || batch == 0 {
        return Err(ModelError::Input("prompt, generation and batch must be at least 1".into()));
    }
    if prompt + gen > c.context_length {
        return Err(ModelError::PromptTooLong { prompt: prompt + gen, context: c.context_length });
    }
    Ok((0..prompt as u64).map(|i| (random::mix64(i ^ 0x5EED) % c.vocab_size as u64) as u32).collect())
}

/// Run one configuration.
pub fn run(
    model: &Model<Cuda>,
    prompt: usize,
    gen: usize,
    kv: &PolicyConfig,
    batch: usize,
    progress: &dyn Fn(&str),
) -> Result<GpuBenchRow, ModelError> {
    let c = &model.config;
    let tokens = protocol_prompt(c, prompt, gen, batch)?;
    let gpu = &model.backend.gpu;
    // The peak is this run's: what earlier runs freed goes back to the device first.
    gpu.release_free_memory()?;
    let mut caches: Vec<GpuKvCache> = Vec::with_capacity(batch);
    let mut next = Vec::with_capacity(batch);
    gpu.synchronize()?;
    let t0 = Instant::now();
    for i in 0..batch {
        let mut cache = model.new_sequence_cache(kv, prompt, gen)?;
        let mut last = 0;
        model.prefill(&tokens, &mut cache, Logits::Last, &mut |_, l| last = argmax(l))?;
        next.push(last);
        caches.push(cache);
        if (i + 1) % 8 == 0 {
            progress(&format!("prefilled {}/{batch}", i + 1));
        }
    }
    gpu.synchronize()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut peak = model.backend.memory_used()?.0;

    let mut step_ms = Vec::with_capacity(gen);
    let t1 = Instant::now();
    let mut refs: Vec<&mut GpuKvCache> = caches.iter_mut().collect();
    let mut out = Vec::with_capacity(batch);
    for step in 0..gen {
        let ts = Instant::now();
        model.decode_step_greedy(&next, &mut refs, &mut out)?;
        for cache in refs.iter_mut() {
            model.backend.end_step(cache);
        }
        std::mem::swap(&mut next, &mut out);
        step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        if (step + 1) % 512 == 0 {
            progress(&format!("decoded {}/{gen} steps", step + 1));
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    peak = peak.max(model.backend.memory_used()?.0);
    let held = refs[0].bytes_held();
    drop(refs);
    drop(caches);
    let prefill_warm_s = median_of_three(|| {
        let mut cache = model.new_sequence_cache(kv, prompt, gen)?;
        model.prefill(&tokens, &mut cache, Logits::Last, &mut |_, _| {})?;
        gpu.synchronize()?;
        Ok(())
    })?;
    let timed = Timed { prompt, gen, batch, prefill_s, prefill_warm_s, decode_s, step_ms };
    Ok(timed.row(kv, held, bytes_per_token(model), peak))
}

/// The median time of three runs of `f` (each ends once the device is done).
fn median_of_three(mut f: impl FnMut() -> Result<(), ModelError>) -> Result<f64, ModelError> {
    let mut times = Vec::with_capacity(3);
    for _ in 0..3 {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[1])
}

/// A run's times, before they become a [`GpuBenchRow`].
struct Timed {
    prompt: usize,
    gen: usize,
    batch: usize,
    prefill_s: f64,
    prefill_warm_s: f64,
    decode_s: f64,
    step_ms: Vec<f64>,
}

impl Timed {
    fn row(self, kv: &PolicyConfig, held: usize, per_token: usize, peak: usize) -> GpuBenchRow {
        let Timed { prompt, gen, batch, prefill_s, prefill_warm_s, decode_s, step_ms } = self;
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let k = 16.min(gen);
        GpuBenchRow {
            prompt,
            gen,
            kv: kv.label(),
            batch,
            prefill_s,
            prefill_warm_s,
            decode_s,
            decode_tok_s: (batch * gen) as f64 / decode_s,
            total_tok_s: (batch * gen) as f64 / (prefill_s + decode_s),
            ms_per_step: decode_s * 1e3 / gen as f64,
            ms_per_step_first: mean(&step_ms[..k]),
            ms_per_step_last: mean(&step_ms[gen - k..]),
            kv_bytes_per_sequence: held,
            kv_bytes_full: (prompt + gen) * per_token,
            peak_gpu_bytes: peak,
        }
    }
}

/// [`run`] on a model split over GPUs: the same protocol, each step's logits gathered from the
/// shards and the greedy tokens taken on the host.
pub fn run_sharded(
    model: &ShardedModel,
    prompt: usize,
    gen: usize,
    kv: &PolicyConfig,
    batch: usize,
    progress: &dyn Fn(&str),
) -> Result<GpuBenchRow, ModelError> {
    let c = &model.config;
    let tokens = protocol_prompt(c, prompt, gen, batch)?;
    model.release_free_memory()?;
    let mut caches = Vec::with_capacity(batch);
    let mut next = Vec::with_capacity(batch);
    let t0 = Instant::now();
    for i in 0..batch {
        let mut cache = model.new_sequence(kv, prompt, gen)?;
        next.push(argmax(&model.prefill_rows(&mut cache, &tokens, crate::models::decoder::Logits::Last)?));
        caches.push(cache);
        if (i + 1) % 8 == 0 {
            progress(&format!("prefilled {}/{batch}", i + 1));
        }
    }
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut peak = model.memory_used()?.0;
    let mut step_ms = Vec::with_capacity(gen);
    let t1 = Instant::now();
    for step in 0..gen {
        let ts = Instant::now();
        let logits = model.decode(&mut caches.iter_mut().collect::<Vec<_>>(), &next)?;
        next.clear();
        next.extend(logits.chunks_exact(c.vocab_size).map(argmax));
        step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        if (step + 1) % 512 == 0 {
            progress(&format!("decoded {}/{gen} steps", step + 1));
        }
    }
    let decode_s = t1.elapsed().as_secs_f64();
    peak = peak.max(model.memory_used()?.0);
    let held = crate::backend::SequenceCache::bytes_held(&caches[0]);
    drop(caches);
    let prefill_warm_s = median_of_three(|| {
        let mut cache = model.new_sequence(kv, prompt, gen)?;
        model.prefill_rows(&mut cache, &tokens, crate::models::decoder::Logits::Last)?;
        Ok(())
    })?;
    let per_token = crate::kv::KvType::F16.token_bytes(c.n_layers, c.n_kv_heads, c.head_dim);
    let timed = Timed { prompt, gen, batch, prefill_s, prefill_warm_s, decode_s, step_ms };
    Ok(timed.row(kv, held, per_token, peak))
}

//! llama-bench-style timing: prompt processing of `p` tokens and generation of `n` tokens,
//! on synthetic token ids, with no tokenizer or sampling inside the timed region; plus what a
//! decode step costs in memory traffic (weights + the KV cache held), the machine's read
//! bandwidth (a streaming sum, the ceiling for decoding) and the process's peak memory.

use std::time::Instant;

use keyformer_kv::PolicyConfig;

use keyformer::backend::{pool, Backend};
use keyformer::engine::Engine;
use keyformer::kv::KvCache;
use keyformer::models::decoder::Logits;
use keyformer::sampling::argmax;
use keyformer::ModelError;

/// One timed test, repeated.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    /// `pp512`, `tg128`, with `@d8192` at a context depth, as llama-bench names them.
    pub test: String,
    pub tokens: usize,
    /// Tokens already in the cache when the timed tokens start.
    pub depth: usize,
    /// Sequences decoded together (each step one token of each; tokens/s counts them all).
    pub batch: usize,
    /// The KV policy (`full`, or e.g. `keyformer@50%`).
    pub kv: String,
    pub samples_s: Vec<f64>,
    pub median_tok_s: f64,
    pub min_tok_s: f64,
    pub max_tok_s: f64,
    /// KV bytes held at the end of the timed tokens (one sequence's), and what the full cache
    /// would hold.
    pub kv_bytes: usize,
    pub kv_bytes_full: usize,
    /// Generation: bytes read per generated token (every weight once per step, shared by the
    /// batch, plus each sequence's KV cache held on average over the timed steps), and that
    /// times the median tokens/s.
    pub bytes_per_token: Option<usize>,
    pub read_gb_s: Option<f64>,
    /// The process's peak resident memory (Linux; weights are mapped, so the pages of the
    /// model file that were touched count too): over the whole test for prompt processing,
    /// over the last repetition (one cache, no copy) for generation.
    pub peak_rss_bytes: Option<usize>,
}

impl BenchResult {
    fn new(
        name: &str,
        tokens: usize,
        depth: usize,
        batch: usize,
        kv: &PolicyConfig,
        samples_s: Vec<f64>,
        cache: &KvCache,
    ) -> Self {
        let mut rates: Vec<f64> = samples_s.iter().map(|s| (tokens * batch) as f64 / s).collect();
        rates.sort_by(f64::total_cmp);
        let test = if depth > 0 { format!("{name}{tokens} @ d{depth}") } else { format!("{name}{tokens}") };
        let kv = kv.label();
        Self {
            bytes_per_token: None,
            read_gb_s: None,
            peak_rss_bytes: None,
            test,
            tokens,
            depth,
            batch,
            kv,
            median_tok_s: rates[rates.len() / 2],
            min_tok_s: rates[0],
            max_tok_s: rates[rates.len() - 1],
            samples_s,
            kv_bytes: cache.bytes_held(),
            kv_bytes_full: cache.stats.bytes_full_equivalent,
        }
    }
}

/// Synthetic prompt: ids spread over the vocabulary, skipping none (any id is a valid input).
fn synthetic_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Time prefilling `p` tokens after `depth` tokens already in the cache, `reps` times (after
/// one warm-up). The prompt runs under `kv` (its scoring and the trim to the budget are timed;
/// a percentage budget is of `depth + p`).
pub fn prompt_processing(
    engine: &Engine,
    p: usize,
    depth: usize,
    kv: &PolicyConfig,
    reps: usize,
) -> Result<BenchResult, ModelError> {
    let tokens = synthetic_tokens(depth + p, engine.model.config.vocab_size);
    reset_peak_rss();
    let mut samples = Vec::with_capacity(reps);
    let mut last = None;
    for rep in 0..=reps {
        let mut cache = engine.new_cache(kv, depth + p, 0)?;
        // The context before the timed tokens, with the full attention a prompt gets.
        for chunk in tokens[..depth].chunks(engine.model.backend.prefill_chunk()) {
            engine.model.forward(chunk, &mut cache, Logits::Last)?;
        }
        let t = Instant::now();
        engine.prefill(&tokens[depth..], &mut cache)?;
        if rep > 0 {
            samples.push(t.elapsed().as_secs_f64());
        }
        last = Some(cache);
    }
    let mut r = BenchResult::new("pp", p, depth, 1, kv, samples, &last.expect("at least one run"));
    r.peak_rss_bytes = peak_rss_bytes();
    Ok(r)
}

/// Time generating `n` tokens one at a time after a prompt of `depth` tokens (greedy on the
/// model's own output, so each step is a real decode step), `reps` times after one warm-up.
/// The prompt is prefilled once, untimed, under `kv` (a percentage budget is of `depth`), and
/// every repetition starts from a copy of that cache. With `batch` > 1, that many copies of
/// the prompt decode together (one batched step per token, as the server's scheduler runs
/// them).
pub fn generation(
    engine: &Engine,
    n: usize,
    depth: usize,
    batch: usize,
    kv: &PolicyConfig,
    reps: usize,
) -> Result<BenchResult, ModelError> {
    let (prompt_cache, first) = prompt_for_generation(engine, kv, depth, n)?;
    let prompt_bytes = prompt_cache.bytes_held();
    let mut prompt_cache = Some(prompt_cache);
    let mut samples = Vec::with_capacity(reps);
    let mut last = None;
    let mut logits = Vec::new();
    for rep in 0..=reps {
        drop(last.take());
        // The last repetition decodes from the prompt's cache itself, with no copy beside it,
        // and the peak memory is measured over it alone: what a user's generation holds.
        let mut caches = if rep == reps {
            let prompt = prompt_cache.take().expect("kept until the last repetition");
            reset_peak_rss();
            // (No clone at all for one sequence: `vec![x; 0]` would still make one.)
            let copies: Vec<KvCache> = (1..batch).map(|_| prompt.clone()).collect();
            std::iter::once(prompt).chain(copies).collect()
        } else {
            vec![prompt_cache.as_ref().expect("kept until the last repetition").clone(); batch]
        };
        let seconds = decode_timed(engine, &mut caches, first, n, &mut logits)?;
        if rep > 0 {
            samples.push(seconds);
        }
        last = Some(caches);
    }
    let last = last.expect("at least one run");
    Ok(generation_row(engine, n, depth, kv, samples, prompt_bytes, &last, peak_rss_bytes()))
}

/// [`generation`] for several policies at once, their repetitions interleaved (round r runs
/// every policy's r-th repetition in turn), so that a shared machine's changing load falls on
/// all of them alike and their ratios hold. Every prompt is prefilled first (untimed) and kept;
/// each repetition decodes from a copy. Peak RSS is the whole run's (all the prompts' caches
/// are held at once): [`generation`] gives a policy's own.
pub fn generation_interleaved(
    engine: &Engine,
    n: usize,
    depth: usize,
    batch: usize,
    kvs: &[PolicyConfig],
    reps: usize,
) -> Result<Vec<BenchResult>, ModelError> {
    let prompts = kvs.iter().map(|kv| prompt_for_generation(engine, kv, depth, n)).collect::<Result<Vec<_>, _>>()?;
    reset_peak_rss();
    let mut samples = vec![Vec::with_capacity(reps); kvs.len()];
    let mut last: Vec<Option<Vec<KvCache>>> = vec![None; kvs.len()];
    let mut logits = Vec::new();
    for rep in 0..=reps {
        for (i, (prompt, first)) in prompts.iter().enumerate() {
            drop(last[i].take());
            let mut caches = vec![prompt.clone(); batch];
            let seconds = decode_timed(engine, &mut caches, *first, n, &mut logits)?;
            if rep > 0 {
                samples[i].push(seconds);
            }
            last[i] = Some(caches);
        }
    }
    let peak = peak_rss_bytes();
    let rows = kvs.iter().zip(&prompts).zip(samples.into_iter().zip(last));
    Ok(rows
        .map(|((kv, (prompt, _)), (samples, last))| {
            let last = last.expect("at least one repetition ran");
            generation_row(engine, n, depth, kv, samples, prompt.bytes_held(), &last, peak)
        })
        .collect())
}

/// The prompt of a generation test: `depth` synthetic tokens prefilled (untimed) under `kv`,
/// and the first token to decode.
fn prompt_for_generation(
    engine: &Engine,
    kv: &PolicyConfig,
    depth: usize,
    n: usize,
) -> Result<(KvCache, u32), ModelError> {
    let mut cache = engine.new_cache(kv, depth, n)?;
    let mut first = 1u32;
    if depth > 0 {
        let logits = engine.prefill(&synthetic_tokens(depth, engine.model.config.vocab_size), &mut cache)?;
        first = argmax(&logits);
    }
    Ok((cache, first))
}

/// Seconds to decode `n` tokens greedily from `first` in every cache (each step a real decode
/// step; several caches step together, each on its own greedy output).
fn decode_timed(
    engine: &Engine,
    caches: &mut [KvCache],
    first: u32,
    n: usize,
    logits: &mut Vec<f32>,
) -> Result<f64, ModelError> {
    let vocab = engine.model.config.vocab_size;
    let mut next = vec![first; caches.len()];
    let t = Instant::now();
    if let [cache] = caches {
        for _ in 0..n {
            engine.decode_step_into(next[0], cache, logits)?;
            next[0] = argmax(logits);
        }
    } else {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        for _ in 0..n {
            engine.decode_batch_into(&next, &mut refs, logits)?;
            for (t, row) in next.iter_mut().zip(logits.chunks_exact(vocab)) {
                *t = argmax(row);
            }
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// A generation row: the timings, and the bytes read per token (every weight once per step,
/// shared by the batch, plus each sequence's KV cache, which grows (full) or stays at its
/// budget over the steps: its mean size).
#[allow(clippy::too_many_arguments)]
fn generation_row(
    engine: &Engine,
    n: usize,
    depth: usize,
    kv: &PolicyConfig,
    samples: Vec<f64>,
    prompt_bytes: usize,
    last: &[KvCache],
    peak_rss: Option<usize>,
) -> BenchResult {
    let batch = last.len();
    let mut r = BenchResult::new("tg", n, depth, batch, kv, samples, &last[0]);
    let bytes = weight_bytes(engine) / batch + (prompt_bytes + last[0].bytes_held()) / 2;
    r.bytes_per_token = Some(bytes);
    r.read_gb_s = Some(bytes as f64 * r.median_tok_s / 1e9);
    r.peak_rss_bytes = peak_rss;
    r
}

/// Bytes of all weight tensors (each is read once per decode step; the tied output matrix is
/// the embedding table, read once as well).
pub fn weight_bytes(engine: &Engine) -> usize {
    engine.model.backend.file.tensors.iter().map(|t| t.size_bytes).sum()
}

/// Read bandwidth in GB/s: the best of a few parallel streaming sums over `bytes` of memory
/// (touched first, so the pages are resident), on the engine's thread pool.
pub fn read_bandwidth_gb_s(bytes: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let chunk = (words.len() / (4 * pool::threads())).max(1 << 16);
    let chunks: Vec<&[u64]> = words.chunks(chunk).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sums = pool::map(chunks.len(), |i| chunks[i].iter().fold(0u64, |a, &w| a.wrapping_add(w)));
        let sum = sums.iter().fold(0u64, |a, &s| a.wrapping_add(s));
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max(words.len() as f64 * 8.0 / secs / 1e9);
    }
    best
}

/// Start a new peak-RSS measurement (Linux: `5` to /proc/self/clear_refs resets VmHWM).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM from /proc/self/status, in bytes.
fn peak_rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

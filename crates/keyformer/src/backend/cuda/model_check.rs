//! The whole model on the GPU against the CPU (`keyformer gpu-check --model-shape tiny,...`
//! on random weights: a GGUF file the CPU loads, and the same values drawn on the GPU; or
//! `--model-file F.gguf` for any family's file, uploaded), logits through a prompt and greedy decode steps, and the tokens each KV head keeps
//! under Keyformer and H2O after the prompt and after decoding.

use keyformer_kv::{Amount, PolicyConfig, PolicyKind};

use super::backend::{Cuda, GpuMatrix, GpuWeights, WeightFormat};
use super::check::{row, CheckRow};
use super::Gpu;
use crate::backend::Backend;
use crate::kv::KvCache;
use crate::models::decoder::{Logits, Model};
use crate::models::random::{self, RandomShape};
use crate::quant::GgmlType;
use crate::sampling::argmax;
use crate::ModelError;

/// Logits' largest difference relative to the largest CPU logit.
fn logit_error(cpu: &[f32], gpu: &[f32]) -> f64 {
    let scale = cpu.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30);
    cpu.iter().zip(gpu).map(|(a, b)| (*a as f64 - *b as f64).abs()).fold(0.0, f64::max) / scale
}

/// Whether the GPU's greedy token differs from the CPU's by more than the step's own logit
/// error explains: the CPU's winner leads the GPU's pick by more than twice the largest
/// |GPU - CPU| logit difference (each of the two logits may have moved by that much; the
/// logits row bounds that error itself).
fn unexplained_flip(cpu: &[f32], gpu: &[f32]) -> bool {
    let (i, j) = (argmax(cpu) as usize, argmax(gpu) as usize);
    let err = cpu.iter().zip(gpu).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    i != j && cpu[i] - cpu[j] > 2.0 * err
}

/// Positions each (layer, KV head) of a CPU cache holds, sorted.
fn cpu_held(cache: &KvCache) -> Vec<Vec<Vec<u32>>> {
    cache.layers.iter().map(|layer| layer.iter().map(|h| h.table.held_positions()).collect()).collect()
}

/// Tokens held by one side and not the other, over all layers and KV heads.
pub(crate) fn held_difference(a: &[Vec<Vec<u32>>], b: &[Vec<Vec<u32>>]) -> usize {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| x.iter().filter(|p| y.binary_search(p).is_err()).count() + y.len().saturating_sub(x.len()))
        .sum()
}

/// A matrix's bytes as the device holds them (f16 values or quantised blocks).
fn device_bytes(g: &Gpu, m: &GpuMatrix) -> Result<Vec<u8>, ModelError> {
    Ok(match &m.weights {
        GpuWeights::F16(d) => g.download(d)?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GpuWeights::Quantised { blocks, .. } => g.download(blocks)?,
    })
}

/// Run the model checks at `shape` with a prompt of `prompt_len` tokens and `steps` decode
/// steps, the matrices f16 or of a quantised `weight_type` (kept in their blocks on the GPU;
/// the CPU's integer products and the GPU's then compute the same integer sums).
pub fn run(
    shape: &RandomShape,
    weight_type: GgmlType,
    prompt_len: usize,
    steps: usize,
    dir: &std::path::Path,
) -> Result<Vec<CheckRow>, ModelError> {
    let seed = 11;
    let path = dir.join(format!("random-{}-{weight_type}.gguf", shape.name));
    random::write_gguf_typed(&path, shape, seed, weight_type)?;
    let (_, mut cpu) = crate::models::load(&path, crate::gguf::LoadMode::Mmap)?;
    cpu.backend.prefill_activations = PROMPT_ACTIVATIONS_AS_GPU;
    let mut cuda = Cuda::new(Gpu::open(0)?);
    cuda.weight_format = WeightFormat::Native;
    let gpu_file = Model::<Cuda>::from_cpu(cuda, &cpu)?;
    let mut gpu = Model::<Cuda>::random(Cuda::new(Gpu::open(0)?), shape, seed, weight_type)?;
    set_repeat_request(&mut cpu, &mut gpu);
    std::fs::remove_file(&path).ok();
    let mut checks = Vec::new();
    let name =
        if weight_type == GgmlType::F16 { shape.name.to_string() } else { format!("{} {weight_type}", shape.name) };

    // The weights drawn for the GPU are the file's, bit for bit, and in the type asked.
    let mut differ = 0usize;
    let g = &gpu.backend.gpu;
    for (a, b) in [
        (&gpu.token_embd, &gpu_file.token_embd),
        (&gpu.layers[0].wq, &gpu_file.layers[0].wq),
        (&gpu.layers[shape.n_layers - 1].w_down, &gpu_file.layers[shape.n_layers - 1].w_down),
    ] {
        let (x, y) = (device_bytes(g, a)?, device_bytes(&gpu_file.backend.gpu, b)?);
        differ += x.iter().zip(&y).filter(|(p, q)| p != q).count() + x.len().abs_diff(y.len());
        differ += usize::from(a.ggml_type() != b.ggml_type() || a.ggml_type() != weight_type);
    }
    drop(gpu_file);
    checks.push(row(
        &format!("{name}: random weights drawn for the GPU equal the file's"),
        differ as f64,
        0.0,
        "bytes that differ (embedding, first and last layer; +1 per matrix of another type)",
    ));
    checks.extend(compare(&name, &mut cpu, &gpu, prompt_len, steps)?);
    Ok(checks)
}

/// The whole-model checks on a GGUF file (any family): the CPU's model and the same weights
/// on the GPU. A prompt of `prompt_len` tokens longer than a sliding window exercises it.
pub fn run_file(
    path: &std::path::Path,
    format: WeightFormat,
    prompt_len: usize,
    steps: usize,
) -> Result<Vec<CheckRow>, ModelError> {
    let (_, mut cpu) = crate::models::load(path, crate::gguf::LoadMode::Mmap)?;
    cpu.backend.prefill_activations = PROMPT_ACTIVATIONS_AS_GPU;
    let mut cuda = Cuda::new(Gpu::open(0)?);
    cuda.weight_format = format;
    let mut gpu = Model::<Cuda>::from_cpu(cuda, &cpu)?;
    set_repeat_request(&mut cpu, &mut gpu);
    let name = format!(
        "{} ({})",
        path.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned()),
        cpu.config.architecture
    );
    let prompt_len = prompt_len.min(cpu.config.context_length / 2);
    compare(&name, &mut cpu, &gpu, prompt_len, steps)
}

/// KVzip's repeat request on both sides: a few fixed tokens (a model of random weights has no
/// words to ask with; the repetition's arithmetic is the same).
fn set_repeat_request(cpu: &mut Model, gpu: &mut Model<Cuda>) {
    let vocab = cpu.config.vocab_size as u32;
    let request = crate::kvzip::RepeatRequest {
        first: [11, 12, 13, 14].map(|t| t % vocab).to_vec(),
        later: [21, 22, 23].map(|t| t % vocab).to_vec(),
        suffix: [31, 32].map(|t| t % vocab).to_vec(),
    };
    cpu.repeat_request = Some(request.clone());
    gpu.repeat_request = Some(request);
}

/// The CPU reference multiplies a prompt's rows by unrounded activations, as the GPU does for
/// more than 8 rows (dequantised f16 tiles through cuBLAS): with its default 8-bit prompt
/// activations, the comparison of quantised models measured the CPU's rounding (1.7-5.2% of
/// the largest logit on the tiny model, H200, 2026-12-05), not the GPU's. Decode steps compare
/// the same 8-bit integer sums on both sides.
const PROMPT_ACTIVATIONS_AS_GPU: crate::backend::cpu::PrefillActivations = crate::backend::cpu::PrefillActivations::F32;

/// `cpu` and `gpu` (the same weights) against each other: logits through a prompt and greedy
/// steps with the full cache, batched steps as a CUDA graph against plain launches, and the
/// tokens Keyformer, H2O and window keep.
fn compare(
    name: &str,
    cpu: &mut Model,
    gpu: &Model<Cuda>,
    prompt_len: usize,
    steps: usize,
) -> Result<Vec<CheckRow>, ModelError> {
    let mut checks = Vec::new();
    let c = &cpu.config;
    let (vocab, n_layers, n_kv_heads) = (c.vocab_size, c.n_layers, c.n_kv_heads);
    let g = &gpu.backend.gpu;

    // A prompt through the full cache, then greedy steps (the CPU's token fed to both).
    let prompt: Vec<u32> = (0..prompt_len as u64).map(|i| (random::mix64(i ^ 0xABCD) % vocab as u64) as u32).collect();
    let full = PolicyConfig::default();
    let ctx = prompt_len + steps;
    let policy = full.resolve(prompt_len, steps, n_layers, n_kv_heads).map_err(ModelError::Policy)?;
    let mut cpu_cache = cpu.new_cache_with(policy, ctx);
    let mut gpu_cache = gpu.new_sequence_cache(&full, prompt_len, steps)?;
    let mut want = cpu.forward(&prompt, &mut cpu_cache, Logits::Last)?;
    let mut got = gpu.forward(&prompt, &mut gpu_cache, Logits::Last)?;
    cpu_cache.finish_prompt()?;
    gpu_cache.finish_prompt(g)?;
    let mut worst = logit_error(&want, &got);
    let mut agree = usize::from(argmax(&want) == argmax(&got));
    let mut unexplained = usize::from(unexplained_flip(&want, &got));
    let (mut wants, mut fed) = (vec![want.clone()], Vec::with_capacity(steps));
    for _ in 0..steps {
        let t = argmax(&want);
        fed.push(t);
        want = cpu.forward(&[t], &mut cpu_cache, Logits::Last)?;
        got = gpu.forward(&[t], &mut gpu_cache, Logits::Last)?;
        worst = worst.max(logit_error(&want, &got));
        agree += usize::from(argmax(&want) == argmax(&got));
        unexplained += usize::from(unexplained_flip(&want, &got));
        wants.push(want.clone());
    }
    // What rounding a decode step's activations to 8 bits (quantised weights, both sides) does
    // to these logits by itself: the CPU again over the same tokens with f32 activations in
    // every product (0 for float weights). The GPU's and the CPU's roundings differ where
    // their f32 sums before them differ in the last bits, each moving the logits by up to
    // that much: twice it is allowed, 2e-2 at least. Float weights: the GPU rounds every
    // product's input to f16 (2^-11 relative), ~1e-3 of the logits' range over the layers;
    // 2e-2 leaves room without hiding a bug (a wrong head, position or mask moves logits by
    // their own size).
    let rounding = {
        let acts = cpu.backend.prefill_activations;
        cpu.backend.prefill_activations = crate::backend::cpu::PrefillActivations::Exact;
        let measured = (|| -> Result<f64, ModelError> {
            let policy = full.resolve(prompt_len, steps, n_layers, n_kv_heads).map_err(ModelError::Policy)?;
            let mut cache = cpu.new_cache_with(policy, ctx);
            let mut own = logit_error(&wants[0], &cpu.forward(&prompt, &mut cache, Logits::Last)?);
            cache.finish_prompt()?;
            for (t, want) in fed.iter().zip(&wants[1..]) {
                own = own.max(logit_error(want, &cpu.forward(&[*t], &mut cache, Logits::Last)?));
            }
            Ok(own)
        })();
        cpu.backend.prefill_activations = acts;
        measured?
    };
    let allowed = (2.0 * rounding).max(2e-2);
    checks.push(row(
        &format!("{name}: logits, full cache, {prompt_len}-token prompt + {steps} steps"),
        worst,
        allowed,
        &format!(
            "largest |GPU - CPU| over the largest |CPU logit|, worst step (8-bit activations alone: {rounding:.1e})"
        ),
    ));
    let near_ties = steps + 1 - agree - unexplained;
    checks.push(row(
        &format!("{name}: greedy tokens agree"),
        unexplained as f64,
        ((steps + 1) / 10) as f64,
        &format!(
            "steps whose argmax differs by more than the step's logit error explains; {near_ties} more flipped \
             between logits closer than twice that error"
        ),
    ));

    // Batched decoding replayed as a CUDA graph equals the same steps launched one by one:
    // three sequences with different prompts under Keyformer, 3 x `steps` steps, greedy tokens
    // found on the device, and logits brought back (the server's sampling path, replayed
    // through `decode_batch_into` as the engine calls it).
    {
        let kv = PolicyConfig {
            kind: PolicyKind::Keyformer,
            budget: Some(Amount::Percent(50.0)),
            seed: 9,
            min_budget: 1,
            ..Default::default()
        };
        let gen = 3 * steps;
        #[derive(Clone, Copy, PartialEq)]
        enum Step {
            PlainGreedy,
            GraphGreedy,
            PlainLogits,
            GraphLogits,
        }
        let mut runs = Vec::new();
        for mode in [Step::PlainGreedy, Step::GraphGreedy, Step::PlainLogits, Step::GraphLogits] {
            let mut caches = Vec::new();
            let mut next = Vec::new();
            for s in 0..3usize {
                let p: Vec<u32> = prompt.iter().map(|t| (t + s as u32 * 7) % vocab as u32).collect();
                let mut cache = gpu.new_sequence_cache(&kv, prompt_len, gen)?;
                let logits = gpu.forward(&p[..prompt_len - 10 * s], &mut cache, Logits::Last)?;
                cache.finish_prompt(g)?;
                next.push(argmax(&logits));
                caches.push(cache);
            }
            let mut refs: Vec<&mut super::kv::GpuKvCache> = caches.iter_mut().collect();
            let mut tokens = Vec::new();
            let mut all_logits = Vec::new();
            let mut out = Vec::new();
            let mut rows = Vec::new();
            for _ in 0..gen {
                match mode {
                    Step::PlainGreedy => gpu.forward_batch_greedy(&next, &mut refs, &mut out)?,
                    Step::GraphGreedy => gpu.decode_step_greedy(&next, &mut refs, &mut out)?,
                    Step::PlainLogits => gpu.forward_batch(&next, &mut refs, &mut rows)?,
                    Step::GraphLogits => gpu.decode_batch_into(&next, &mut refs, &mut rows)?,
                }
                if matches!(mode, Step::PlainLogits | Step::GraphLogits) {
                    out = rows.chunks_exact(vocab).map(argmax).collect();
                    all_logits.extend_from_slice(&rows);
                }
                if mode != Step::GraphLogits {
                    for c in refs.iter_mut() {
                        c.policy.next_step(); // decode_batch_into ends its steps itself
                    }
                }
                tokens.extend_from_slice(&out);
                std::mem::swap(&mut next, &mut out);
            }
            let held: Vec<Vec<Vec<u32>>> =
                caches.iter().map(|c| c.held_positions(g, n_layers - 1)).collect::<Result<_, _>>()?;
            runs.push((tokens, held, all_logits));
        }
        let differ = |a: usize, b: usize| {
            runs[a].0.iter().zip(&runs[b].0).filter(|(x, y)| x != y).count() + usize::from(runs[a].1 != runs[b].1)
        };
        checks.push(row(
            &format!("{name}: batched {} steps replayed as a CUDA graph equal plain launches", kv.label()),
            differ(0, 1) as f64,
            0.0,
            "greedy tokens that differ (+1 if the last layer keeps other tokens), 3 sequences",
        ));
        let logits_differ = runs[2].2.iter().zip(&runs[3].2).filter(|(x, y)| x.to_bits() != y.to_bits()).count()
            + usize::from(runs[2].2.len() != runs[3].2.len());
        checks.push(row(
            &format!("{name}: batched {} steps with logits replayed as a CUDA graph equal plain launches", kv.label()),
            (logits_differ + differ(2, 3)) as f64,
            0.0,
            "logits not bit-identical + tokens that differ (+1 if other tokens kept), 3 sequences",
        ));
    }

    // Compressed caches: the same tokens kept, after the prompt and after decoding, in every
    // layer (a sliding-window layer keeps its window whatever the policy, as on the CPU).
    // Besides the plain policies, budgets spread by score (per layer: AdaKV's; over the whole
    // model: the heads packed each at its own budget), pinned sinks, and KVzip's repetition
    // (its scores from the GPU's prefill), per head and over the whole model.
    let defaults = PolicyConfig { seed: 5, min_budget: 1, ..PolicyConfig::default() };
    for spec in [
        "keyformer:budget=50%",
        "h2o:budget=50%",
        "window:budget=50%",
        "h2o:budget=50%:adaptive",
        "keyformer:budget=50%:layers=global:sinks=2",
        "kvzip:budget=50%",
        "kvzip-global:budget=50%",
    ] {
        let kv = PolicyConfig::parse_spec(spec, &defaults).map_err(ModelError::Policy)?;
        let policy = kv.resolve(prompt_len, steps, n_layers, n_kv_heads).map_err(ModelError::Policy)?;
        let mut cpu_cache = cpu.new_cache_with(policy, ctx);
        let mut gpu_cache = gpu.new_sequence_cache(&kv, prompt_len, steps)?;
        let mut want = cpu.forward(&prompt, &mut cpu_cache, Logits::Last)?;
        gpu.forward(&prompt, &mut gpu_cache, Logits::Last)?;
        // KVzip's repetition (nothing for the other policies), then the prompt's end.
        cpu.backend.before_prompt_end(cpu, &prompt, &mut cpu_cache)?;
        gpu.backend.before_prompt_end(gpu, &prompt, &mut gpu_cache)?;
        cpu_cache.finish_prompt()?;
        gpu_cache.finish_prompt(g)?;
        let gpu_held = |c: &super::kv::GpuKvCache| -> Result<Vec<Vec<Vec<u32>>>, ModelError> {
            (0..n_layers).map(|l| c.held_positions(g, l)).collect()
        };
        let kept = cpu_held(&cpu_cache);
        let total: usize = kept.iter().flatten().map(Vec::len).sum();
        let after_prompt = held_difference(&kept, &gpu_held(&gpu_cache)?);
        // A step's logits are compared where both sides hold the same tokens before it; once a
        // near-tie of scores has kept another token on one side (the kept-token rows bound how
        // many), the two attend to different tokens and the logits part by that token's weight,
        // not by the arithmetic under check.
        let (mut worst_alike, mut alike) = (0f64, 0usize);
        let mut worst_apart = 0f64;
        for step in 0..steps {
            let now =
                if step == 0 { after_prompt } else { held_difference(&cpu_held(&cpu_cache), &gpu_held(&gpu_cache)?) };
            let t = argmax(&want);
            want = cpu.forward(&[t], &mut cpu_cache, Logits::Last)?;
            let got = gpu.forward(&[t], &mut gpu_cache, Logits::Last)?;
            cpu_cache.policy.next_step();
            cpu_cache.end_step();
            gpu_cache.policy.next_step();
            let error = logit_error(&want, &got);
            if now == 0 {
                worst_alike = worst_alike.max(error);
                alike += 1;
            } else {
                worst_apart = worst_apart.max(error);
            }
        }
        let after_steps = held_difference(&cpu_held(&cpu_cache), &gpu_held(&gpu_cache)?);
        // Memory: what the GPU says it holds is what the CPU holds, and each global layer's
        // storage has one free slot per head beyond it (packed heads included).
        let cpu_kept = cpu_held(&cpu_cache);
        let cpu_tokens: usize = cpu_kept.iter().flatten().map(Vec::len).sum();
        let gpu_tokens = crate::backend::SequenceCache::bytes_held(&gpu_cache) / (4 * c.head_dim);
        let spare: i64 = (0..n_layers)
            .filter(|&l| c.layers[l].window.is_none())
            .map(|l| {
                let held: usize = cpu_kept[l].iter().map(Vec::len).sum();
                gpu_cache.allocated_slots(l) as i64 - (held + n_kv_heads) as i64
            })
            .sum();
        let label = spec;
        checks.push(row(
            &format!("{name}: {label} keeps the same tokens after the prompt"),
            after_prompt as f64,
            (total / 200) as f64,
            &format!("kept tokens that differ, of {total} (0.5% allowed: f16 inputs move scores near ties)"),
        ));
        checks.push(row(
            &format!("{name}: {label} keeps the same tokens after {steps} steps"),
            after_steps as f64,
            (total / 200) as f64,
            &format!("kept tokens that differ, of {total}"),
        ));
        checks.push(row(
            &format!("{name}: {label} holds the CPU's tokens in their slots + one per head"),
            (cpu_tokens.abs_diff(gpu_tokens) as i64 + spare.abs()) as f64,
            0.0,
            &format!(
                "|GPU - CPU| tokens held ({gpu_tokens} on the GPU) + slots allocated beyond them and one per head"
            ),
        ));
        // The same arithmetic as the full cache's over fewer tokens: the same allowance (twice
        // the 8-bit activations' own effect, 2e-2 at least).
        checks.push(row(
            &format!("{name}: {label} logits while evicting"),
            worst_alike,
            allowed,
            &format!(
                "largest |GPU - CPU| over the largest |CPU logit|, worst step, over the {alike} of {steps} steps \
                 holding the same tokens (the others attend to a near-tie kept on one side: {worst_apart:.1e}, not \
                 compared)"
            ),
        ));
    }
    Ok(checks)
}

//! [`Backend`] on the CPU: the weights stay in the GGUF memory map in their own (usually
//! quantised) types, activations are `Vec<f32>`, and the KV cache is [`KvCache`] (slot tables
//! and policies in plain Rust, keys and values in f32/f16/q8_0 rows).

use std::sync::Arc;

use keyformer_kv::{PolicyKind, SequencePolicy, Signal};

use super::ops::{self as cpu, WeightView};
use crate::backend::{AttentionSpec, Backend, CacheShape, ForwardBuffers, RopeStyle, SequenceCache};
use crate::gguf::{GgufFile, TensorInfo};
use crate::kv::{KvCache, KvStats, KvType, QueryRope};
use crate::quant::dequantize_row;
use crate::ModelError;

/// Prompt tokens per forward pass on the CPU: bounds the activation memory of long prompts.
pub const PREFILL_CHUNK: usize = 512;

/// Weights one [`Backend::matmul`] call takes at most (Q, K and V).
const MAX_FUSED: usize = 3;

/// The CPU backend over one model file.
pub struct Cpu {
    pub file: Arc<GgufFile>,
    /// How prompt chunks multiply with quantised weights (`--prefill-activations`).
    pub prefill_activations: cpu::PrefillActivations,
}

/// A weight's location in the file (the bytes stay in the memory map): rows
/// `first_row..first_row + rows` of a tensor (a fused QKV or gate-up tensor gives several).
#[derive(Debug, Clone)]
pub struct GgufWeight {
    pub info: TensorInfo,
    pub first_row: usize,
    pub rows: usize,
    pub cols: usize,
}

impl Cpu {
    pub fn view(&self, w: &GgufWeight) -> WeightView<'_> {
        let row_bytes = w.info.ggml_type.row_bytes(w.cols);
        let bytes = &self.file.tensor_bytes(&w.info)[w.first_row * row_bytes..(w.first_row + w.rows) * row_bytes];
        WeightView { ggml_type: w.info.ggml_type, rows: w.rows, cols: w.cols, bytes }
    }
}

impl SequenceCache for KvCache {
    fn next_position(&self) -> u32 {
        KvCache::next_position(self)
    }
    fn len(&self) -> usize {
        KvCache::len(self)
    }
    fn capacity(&self) -> usize {
        KvCache::capacity(self)
    }
    fn fits(&self, n: usize) -> bool {
        self.layers.iter().all(|heads| heads.iter().all(|h| h.table.len() + n <= h.table.capacity()))
    }
    fn policy(&self) -> &SequencePolicy {
        &self.policy
    }
    fn bytes_held(&self) -> usize {
        KvCache::bytes_held(self)
    }
    fn stats(&self) -> KvStats {
        self.stats.clone()
    }
}

thread_local! {
    static FORWARD_BUFFERS: std::cell::RefCell<ForwardBuffers<Vec<f32>>> = Default::default();
}

impl Backend for Cpu {
    type Matrix = GgufWeight;
    type Vector = Vec<f32>;
    type Act = Vec<f32>;
    type Cache = KvCache;

    fn resize(&self, a: &mut Vec<f32>, len: usize) -> Result<(), ModelError> {
        a.resize(len, 0.0);
        Ok(())
    }

    fn embed(&self, table: &GgufWeight, tokens: &[u32], out: &mut Vec<f32>) -> Result<(), ModelError> {
        let embd = self.view(table);
        for (row, &t) in out.chunks_exact_mut(table.cols).zip(tokens) {
            dequantize_row(embd.ggml_type, embd.row(t as usize), row);
        }
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &Vec<f32>,
        first_row: usize,
        rows: usize,
        weight: &Vec<f32>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let d = weight.len();
        cpu::rms_norm(&x[first_row * d..(first_row + rows) * d], weight, eps, &mut out[..rows * d]);
        Ok(())
    }

    fn matmul(
        &self,
        ws: &[&GgufWeight],
        x: &Vec<f32>,
        n: usize,
        per_token: bool,
        ys: &mut [&mut Vec<f32>],
    ) -> Result<(), ModelError> {
        if ws.is_empty() || ws.len() != ys.len() {
            return Err(ModelError::Input(format!("{} weights for {} outputs", ws.len(), ys.len())));
        }
        // Views and output slices on the stack: this runs several times per layer and token.
        let first = self.view(ws[0]);
        let mut views = [first; MAX_FUSED];
        for (v, w) in views.iter_mut().zip(ws).skip(1) {
            *v = self.view(w);
        }
        let views = &views[..ws.len()];
        // A batch of single tokens takes the single-token kernels row by row.
        let run = |outs: &mut [&mut [f32]]| {
            if per_token {
                cpu::matmul_many_per_token(views, x, n, outs)
            } else {
                cpu::matmul_many(views, x, n, self.prefill_activations, outs)
            }
        };
        match ys {
            [a] => run(&mut [a.as_mut_slice()]),
            [a, b] => run(&mut [a.as_mut_slice(), b.as_mut_slice()]),
            [a, b, c] => run(&mut [a.as_mut_slice(), b.as_mut_slice(), c.as_mut_slice()]),
            _ => return Err(ModelError::Input(format!("{} weights in one product (at most 3)", ys.len()))),
        }
        Ok(())
    }

    fn logits(
        &self,
        w: &GgufWeight,
        x: &Vec<f32>,
        n: usize,
        per_token: bool,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        out.resize(n * w.rows, 0.0);
        let x = &x[..n * w.cols];
        if per_token {
            cpu::matmul_many_per_token(&[self.view(w)], x, n, &mut [out]);
        } else {
            cpu::matmul_many(&[self.view(w)], x, n, self.prefill_activations, &mut [out]);
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &Vec<f32>,
        first_row: usize,
        rows: usize,
        weight: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        eps: f32,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let d = weight.len();
        let bias = bias.map(|b| b.as_slice());
        cpu::layer_norm(&x[first_row * d..(first_row + rows) * d], weight, bias, eps, &mut out[..rows * d]);
        Ok(())
    }

    fn rms_norm_heads(&self, x: &mut Vec<f32>, rows: usize, weight: &Vec<f32>, eps: f32) -> Result<(), ModelError> {
        cpu::rms_norm_in_place(&mut x[..rows * weight.len()], weight, eps);
        Ok(())
    }

    fn add_bias(&self, x: &mut Vec<f32>, rows: usize, bias: &Vec<f32>) -> Result<(), ModelError> {
        for row in x[..rows * bias.len()].chunks_exact_mut(bias.len()) {
            row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<(), ModelError> {
        x.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &Vec<f32>,
        style: RopeStyle,
        mscale: f32,
    ) -> Result<(), ModelError> {
        cpu::rope(x, n_heads, head_dim, positions, inv_freq, style, mscale);
        Ok(())
    }

    fn observe_queries(
        &self,
        layer: usize,
        q: &Vec<f32>,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &Vec<f32>,
        style: RopeStyle,
        mscale: f32,
        scale: f32,
        caches: &mut [&mut KvCache],
    ) -> Result<(), ModelError> {
        let batch = caches.len() > 1;
        let q_dim = n_heads * head_dim;
        for (ci, cache) in caches.iter_mut().enumerate() {
            if !cache.gathers_query_moments() {
                continue;
            }
            let span = if batch { ci..ci + 1 } else { 0..positions.len() };
            let rope =
                QueryRope { inv_freq: inv_freq.clone(), adjacent: style == RopeStyle::AdjacentPairs, mscale, scale };
            cache.query_moments.get_or_insert_with(Default::default).add(
                layer,
                &q[span.start * q_dim..span.end * q_dim],
                n_heads,
                head_dim,
                &positions[span],
                &rope,
            );
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), ModelError> {
        cpu::silu_mul(gate, up);
        Ok(())
    }

    fn gelu_mul(&self, gate: &mut Vec<f32>, up: &Vec<f32>) -> Result<(), ModelError> {
        gate.iter_mut().zip(up).for_each(|(g, &u)| *g = cpu::gelu_tanh(*g) * u);
        Ok(())
    }

    fn gelu(&self, x: &mut Vec<f32>) -> Result<(), ModelError> {
        x.iter_mut().for_each(|v| *v = cpu::gelu_tanh(*v));
        Ok(())
    }

    fn clamp(&self, x: &mut Vec<f32>, limit: f32) -> Result<(), ModelError> {
        x.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
        Ok(())
    }

    fn gelu_erf(&self, x: &mut Vec<f32>) -> Result<(), ModelError> {
        x.iter_mut().for_each(|v| *v = cpu::gelu_erf(*v));
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<(), ModelError> {
        x.iter_mut().zip(y.iter()).for_each(|(a, b)| *a += b);
        Ok(())
    }

    fn attend(
        &self,
        li: usize,
        spec: AttentionSpec,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        positions: &[u32],
        caches: &mut [&mut KvCache],
        attn: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let AttentionSpec { n_heads, n_kv_heads, head_dim: hd, .. } = spec;
        let (q_dim, kv_dim) = (n_heads * hd, n_kv_heads * hd);
        let batch = caches.len() > 1;
        let n = positions.len();
        let mut stored_key = vec![0f32; hd];
        let mut stored_value = vec![0f32; hd];
        for (ci, cache) in caches.iter_mut().enumerate() {
            let span = if batch { ci..ci + 1 } else { 0..n };
            let q = &q[span.start * q_dim..span.end * q_dim];
            let (k, v) = (&k[span.start * kv_dim..span.end * kv_dim], &v[span.start * kv_dim..span.end * kv_dim]);
            let attn = &mut attn[span.start * q_dim..span.end * q_dim];
            let positions = &positions[span];
            let signal = cache.policy.signal();
            let observation = cache.policy.observation_signal();
            for (i, &pos) in positions.iter().enumerate() {
                for h in 0..n_kv_heads {
                    let at = i * kv_dim + h * hd;
                    let slot = cache.layers[li][h].insert(pos, &k[at..at + hd], &v[at..at + hd])?;
                    // Policies see the key as stored (key-norm scores it), as attention does.
                    cache.layers[li][h].read_key(slot, &mut stored_key);
                    if cache.policy.wants_values() {
                        cache.layers[li][h].read_value(slot, &mut stored_value);
                    }
                    cache.policy.on_insert_kv(li, h, slot, &stored_key, &stored_value);
                }
            }
            // Where each signal's sums go: H2O's and Keyformer's scores and a shared prefill's
            // recorded sums are running sums, added to in place; TOVA and SnapKV get fresh rows.
            let kv_heads = li * n_kv_heads..(li + 1) * n_kv_heads;
            let mut fresh: Vec<Vec<f32>> = Vec::new();
            let (running, observing) = cache.policy.running_rows(li);
            let own: &mut [Vec<f32>] = match running {
                Some(rows) => rows,
                None if signal == Signal::None => &mut [],
                None => {
                    fresh.resize(n_kv_heads, Vec::new());
                    &mut fresh
                }
            };
            let mut signals = vec![signal];
            let mut sums = vec![own];
            if let Some(rows) = observing {
                signals.push(observation);
                sums.push(rows);
            }
            if let Some(r) = &mut cache.recorder {
                signals.extend_from_slice(&r.signals);
                sums.extend(r.sums.iter_mut().map(|rows| &mut rows[kv_heads.clone()]));
            }
            cpu::attention_into(q, positions, &cache.layers[li], &spec, li, &signals, attn, &mut sums);
            drop(sums);
            if !fresh.is_empty() {
                let mut sums = fresh;
                if cache.policy.kind() == PolicyKind::Tova {
                    // TOVA scores by the attention averaged over all the layer's heads: every KV
                    // head gets the layer's sum (their slot tables evolve identically).
                    let total = sums.iter().skip(1).fold(sums[0].clone(), |mut a, s| {
                        a.iter_mut().zip(s).for_each(|(x, y)| *x += y);
                        a
                    });
                    sums.iter_mut().for_each(|s| s.copy_from_slice(&total));
                }
                for (h, s) in sums.iter().enumerate() {
                    cache.policy.observe(li, h, s);
                }
            }
            // A sliding layer drops what left its window at once, prompt or not.
            if cache.policy.prompt_done() || cache.windows[li].is_some() {
                cache.evict_to_budget(li)?;
            }
        }
        Ok(())
    }

    fn new_cache(
        &self,
        c: CacheShape,
        kv_type: KvType,
        policy: SequencePolicy,
        context: usize,
    ) -> Result<KvCache, ModelError> {
        Ok(KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, kv_type, policy, context).with_windows(c.windows))
    }

    fn finish_prompt(&self, cache: &mut KvCache) -> Result<(), ModelError> {
        Ok(cache.finish_prompt()?)
    }

    fn before_prompt_end(
        &self,
        model: &crate::models::decoder::Model<Self>,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<(), ModelError> {
        if cache.policy.wants_reconstruction() {
            model.score_by_repetition(tokens, cache)?;
        }
        Ok(())
    }

    fn reopen_prompt(&self, cache: &mut KvCache, extra: usize, steps: usize) -> Result<(), ModelError> {
        cache.reopen_prompt(extra, steps);
        Ok(())
    }

    fn snapshot_supported(&self) -> bool {
        true
    }

    fn snapshot(&self, cache: &KvCache) -> Option<KvCache> {
        Some(cache.clone())
    }

    fn resume_snapshot(&self, cache: &mut KvCache, prompt_len: usize, steps: usize, context: usize) {
        cache.resume_prompt(prompt_len, steps, context)
    }

    fn trims_prompt_chunks(&self) -> bool {
        true
    }

    fn trim_prompt_chunk(&self, cache: &mut KvCache, next_end: usize) -> Result<(), ModelError> {
        Ok(cache.trim_prompt_chunk(next_end)?)
    }

    fn end_step(&self, cache: &mut KvCache) {
        cache.policy.next_step();
        cache.end_step();
    }

    fn trims_windows_during_prompt(&self) -> bool {
        true
    }

    fn prefill_chunk(&self) -> usize {
        PREFILL_CHUNK
    }

    fn with_buffers<R>(&self, f: impl FnOnce(&mut ForwardBuffers<Vec<f32>>) -> R) -> R {
        FORWARD_BUFFERS.with(|buffers| f(&mut buffers.borrow_mut()))
    }
}

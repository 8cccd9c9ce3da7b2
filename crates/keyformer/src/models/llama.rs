//! The Llama family (Llama 1-3, SmolLM, Mistral-style GQA): pre-norm decoder blocks.
//!
//! For each token x at position p:
//!   h = x + Wo · Attn(RoPE_p(Wq·n), RoPE_p(Wk·n), Wv·n),   n = RMSNorm(x) * g_attn
//!   y = h + Wd · (silu(Wg·m) ⊙ Wu·m),                      m = RMSNorm(h) * g_ffn
//! and logits = W_out · RMSNorm(y_last_layer) * g_out, with W_out tied to the token embedding
//! when the file has no `output.weight`. Keys are cached after RoPE with the token's original
//! position, so a later eviction never needs to re-rotate anything.

use std::sync::Arc;

use crate::backend::cpu::{self, WeightView};
use crate::gguf::{GgufError, GgufFile, TensorInfo};
use keyformer_kv::{PolicyConfig, PolicyKind, SequencePolicy, Signal};

use crate::kv::{KvCache, KvType};
use crate::quant::dequantize_row;
use crate::ModelError;

/// Hyper-parameters read from the GGUF metadata (`<arch>.*` keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LlamaConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    pub rope_dim: usize,
    pub rms_eps: f32,
}

impl LlamaConfig {
    pub fn from_gguf(f: &GgufFile, arch: &str) -> Result<Self, GgufError> {
        let k = |s: &str| format!("{arch}.{s}");
        let n_embd = f.get_usize(&k("embedding_length"))?;
        let n_heads = f.get_usize(&k("attention.head_count"))?;
        let n_kv_heads = f.get_usize(&k("attention.head_count_kv")).unwrap_or(n_heads);
        let head_dim = f.get_usize(&k("attention.key_length")).unwrap_or(n_embd / n_heads.max(1));
        let vocab_size = match f.get_usize(&k("vocab_size")) {
            Ok(v) => v,
            Err(_) => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        Ok(Self {
            architecture: arch.to_string(),
            n_layers: f.get_usize(&k("block_count"))?,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff: f.get_usize(&k("feed_forward_length"))?,
            vocab_size,
            context_length: f.get_usize(&k("context_length"))?,
            // Defaults where files vary: Llama's original base and epsilon.
            rope_theta: f.get_f32(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_dim: f.get_usize(&k("rope.dimension_count")).unwrap_or(head_dim),
            rms_eps: f.get_f32(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        })
    }
}

/// A weight's location in the file (the bytes stay in the memory map).
#[derive(Debug, Clone)]
struct Weight {
    info: TensorInfo,
    rows: usize,
    cols: usize,
}

struct Layer {
    attn_norm: Vec<f32>,
    wq: Weight,
    wk: Weight,
    wv: Weight,
    wo: Weight,
    ffn_norm: Vec<f32>,
    w_gate: Weight,
    w_up: Weight,
    w_down: Weight,
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, teacher forcing).
    All,
}

pub struct Llama {
    pub config: LlamaConfig,
    file: Arc<GgufFile>,
    token_embd: Weight,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Weight,
    inv_freq: Vec<f32>,
    /// How new caches store keys and values.
    pub kv_type: KvType,
}

impl Llama {
    pub fn load(file: Arc<GgufFile>, arch: &str) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file, arch)?;
        let c = &config;
        if c.n_heads == 0 || c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
            return Err(ModelError::Invalid(format!(
                "{} query heads cannot be grouped over {} KV heads",
                c.n_heads, c.n_kv_heads
            )));
        }
        if c.rope_dim % 2 != 0 || c.rope_dim > c.head_dim {
            return Err(ModelError::Invalid(format!("rope dimension {} for head size {}", c.rope_dim, c.head_dim)));
        }
        let weight = |name: &str, rows: usize, cols: usize| -> Result<Weight, ModelError> {
            let info = file.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
            if info.dims.len() != 2 || info.dims[0] != cols || info.dims[1] != rows {
                return Err(ModelError::Invalid(format!(
                    "tensor {name} has shape {:?}, expected [{cols}, {rows}]",
                    info.dims
                )));
            }
            Ok(Weight { info: info.clone(), rows, cols })
        };
        let vector = |name: &str, len: usize| -> Result<Vec<f32>, ModelError> {
            let info = file.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
            if info.n_elements() != len {
                return Err(ModelError::Invalid(format!(
                    "tensor {name} has {} elements, expected {len}",
                    info.n_elements()
                )));
            }
            let mut v = vec![0f32; len];
            dequantize_row(info.ggml_type, file.tensor_bytes(info), &mut v);
            Ok(v)
        };
        let (d, hd) = (c.n_embd, c.head_dim);
        let token_embd = weight("token_embd.weight", c.vocab_size, d)?;
        let output = match file.tensor_info("output.weight") {
            Some(_) => weight("output.weight", c.vocab_size, d)?,
            None => token_embd.clone(), // tied embeddings
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            layers.push(Layer {
                attn_norm: vector(&p("attn_norm.weight"), d)?,
                wq: weight(&p("attn_q.weight"), c.n_heads * hd, d)?,
                wk: weight(&p("attn_k.weight"), c.n_kv_heads * hd, d)?,
                wv: weight(&p("attn_v.weight"), c.n_kv_heads * hd, d)?,
                wo: weight(&p("attn_output.weight"), d, c.n_heads * hd)?,
                ffn_norm: vector(&p("ffn_norm.weight"), d)?,
                w_gate: weight(&p("ffn_gate.weight"), c.n_ff, d)?,
                w_up: weight(&p("ffn_up.weight"), c.n_ff, d)?,
                w_down: weight(&p("ffn_down.weight"), d, c.n_ff)?,
            });
        }
        let output_norm = vector("output_norm.weight", d)?;
        // theta_i = base^(-2i/d_rope); Llama 3.1 files may carry per-frequency divisors.
        let mut inv_freq: Vec<f32> =
            (0..c.rope_dim / 2).map(|i| c.rope_theta.powf(-2.0 * i as f32 / c.rope_dim as f32)).collect();
        if file.tensor_info("rope_freqs.weight").is_some() {
            let factors = vector("rope_freqs.weight", c.rope_dim / 2)?;
            inv_freq.iter_mut().zip(factors).for_each(|(f, k)| *f /= k);
        }
        Ok(Self { config, file, token_embd, layers, output_norm, output, inv_freq, kv_type: KvType::default() })
    }

    fn view(&self, w: &Weight) -> WeightView<'_> {
        WeightView { ggml_type: w.info.ggml_type, rows: w.rows, cols: w.cols, bytes: self.file.tensor_bytes(&w.info) }
    }

    /// A new, empty KV cache that keeps everything, for at most `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let full =
            PolicyConfig::default().resolve(0, 0, self.config.n_layers, self.config.n_kv_heads).expect("full cache");
        self.new_cache_with(full, capacity)
    }

    /// A new, empty KV cache trimmed by `policy`; `context` bounds it when the policy keeps all.
    pub fn new_cache_with(&self, policy: SequencePolicy, context: usize) -> KvCache {
        KvCache::new(self.config.n_layers, self.config.n_kv_heads, self.config.head_dim, self.kv_type, policy, context)
    }

    /// Run `tokens` through the model at the cache's next positions, appending their keys and
    /// values to `cache`. Returns logits (vocab-sized rows) as asked by `which`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>, ModelError> {
        let mut logits = Vec::new();
        self.forward_into(tokens, cache, which, &mut logits)?;
        Ok(logits)
    }

    /// [`forward`](Self::forward) writing the logits into `logits` (resized): with the same
    /// vector every step and the activations in buffers kept by the calling thread, a decode
    /// step allocates nothing of the model's size.
    pub fn forward_into(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        FORWARD_BUFFERS
            .with(|buffers| self.forward_with(tokens, &mut [cache], which, logits, &mut buffers.borrow_mut()))
    }

    /// One decode step of several sequences at once: `tokens[i]` joins `caches[i]` at that
    /// cache's next position, and `logits` gets one row per sequence. The weights are read once
    /// for the whole batch (each row still takes the single-token dot kernels, so every row's
    /// logits equal what [`forward`](Self::forward) gives that sequence alone); attention and
    /// eviction run per sequence, each under its own policy.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), caches.len())));
        }
        FORWARD_BUFFERS
            .with(|buffers| self.forward_with(tokens, caches, Logits::All, logits, &mut buffers.borrow_mut()))
    }

    /// The forward pass. One cache: every token joins it (a prompt chunk or a decode step).
    /// Several: token i joins cache i (a batch of decode steps).
    fn forward_with(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        which: Logits,
        logits: &mut Vec<f32>,
        buffers: &mut ForwardBuffers,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let n = tokens.len();
        logits.clear();
        if n == 0 {
            return Ok(());
        }
        let batch = caches.len() > 1;
        let (d, hd) = (c.n_embd, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let ForwardBuffers { positions, x, normed, q, k, v, attn, proj, gate, up, stored_key } = buffers;
        positions.clear();
        // Which rows each cache takes.
        let rows_of = |i: usize| if batch { i..i + 1 } else { 0..n };
        for cache in caches.iter() {
            let m = if batch { 1 } else { n };
            if cache.len() + m > cache.capacity() {
                return Err(ModelError::ContextFull { needed: cache.len() + m, capacity: cache.capacity() });
            }
            let start = cache.next_position();
            positions.extend(start..start + m as u32);
        }
        // Every element of each buffer is written before it is read: no zeroing needed.
        for (buf, len) in [
            (&mut *x, n * d),
            (&mut *normed, n * d),
            (&mut *q, n * q_dim),
            (&mut *k, n * kv_dim),
            (&mut *v, n * kv_dim),
            (&mut *attn, n * q_dim),
            (&mut *proj, n * d),
            (&mut *gate, n * c.n_ff),
            (&mut *up, n * c.n_ff),
            (&mut *stored_key, hd),
        ] {
            buf.resize(len, 0.0);
        }
        // A batch of single tokens takes the single-token kernels row by row.
        let matmul_many = if batch { cpu::matmul_many_per_token } else { cpu::matmul_many };
        let embd = self.view(&self.token_embd);
        for (row, &t) in x.chunks_exact_mut(d).zip(tokens) {
            if t as usize >= c.vocab_size {
                return Err(ModelError::TokenOutOfRange { token: t, vocab: c.vocab_size });
            }
            dequantize_row(embd.ggml_type, embd.row(t as usize), row);
        }

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            cpu::rms_norm(x, &layer.attn_norm, c.rms_eps, normed);
            let qkv = [self.view(&layer.wq), self.view(&layer.wk), self.view(&layer.wv)];
            matmul_many(&qkv, normed, n, &mut [q, k, v]);
            cpu::rope_adjacent_pairs(q, c.n_heads, hd, positions, &self.inv_freq);
            cpu::rope_adjacent_pairs(k, c.n_kv_heads, hd, positions, &self.inv_freq);
            for (ci, cache) in caches.iter_mut().enumerate() {
                let span = rows_of(ci);
                let q = &q[span.start * q_dim..span.end * q_dim];
                let (k, v) = (&k[span.start * kv_dim..span.end * kv_dim], &v[span.start * kv_dim..span.end * kv_dim]);
                let attn = &mut attn[span.start * q_dim..span.end * q_dim];
                let positions = &positions[span];
                let signal = cache.policy.signal();
                for (i, &pos) in positions.iter().enumerate() {
                    for h in 0..c.n_kv_heads {
                        let at = i * kv_dim + h * hd;
                        let slot = cache.layers[li][h].insert(pos, &k[at..at + hd], &v[at..at + hd])?;
                        // Policies see the key as stored (key-norm scores it), as attention does.
                        cache.layers[li][h].read_key(slot, stored_key);
                        cache.policy.on_insert(li, h, slot, stored_key);
                    }
                }
                // Where each signal's sums go: H2O's and Keyformer's scores and a shared prefill's
                // recorded sums are running sums, added to in place; TOVA and SnapKV get fresh rows.
                let kv_heads = li * c.n_kv_heads..(li + 1) * c.n_kv_heads;
                let mut fresh: Vec<Vec<f32>> = Vec::new();
                let own: &mut [Vec<f32>] = match cache.policy.running_sum_scores(li) {
                    Some(rows) => rows,
                    None if signal == Signal::None => &mut [],
                    None => {
                        fresh.resize(c.n_kv_heads, Vec::new());
                        &mut fresh
                    }
                };
                let mut signals = vec![signal];
                let mut sums = vec![own];
                if let Some(r) = &mut cache.recorder {
                    signals.extend_from_slice(&r.signals);
                    sums.extend(r.sums.iter_mut().map(|rows| &mut rows[kv_heads.clone()]));
                }
                cpu::attention_into(q, positions, &cache.layers[li], c.n_heads, hd, li, &signals, attn, &mut sums);
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
                if cache.policy.prompt_done() {
                    cache.evict_to_budget(li)?;
                }
            }
            matmul_many(&[self.view(&layer.wo)], attn, n, &mut [proj]);
            x.iter_mut().zip(proj.iter()).for_each(|(a, b)| *a += b);

            // Feed-forward block (SwiGLU).
            cpu::rms_norm(x, &layer.ffn_norm, c.rms_eps, normed);
            let gate_up = [self.view(&layer.w_gate), self.view(&layer.w_up)];
            matmul_many(&gate_up, normed, n, &mut [gate, up]);
            cpu::silu_mul(gate, up);
            matmul_many(&[self.view(&layer.w_down)], gate, n, &mut [proj]);
            x.iter_mut().zip(proj.iter()).for_each(|(a, b)| *a += b);
        }

        let rows: &[f32] = match which {
            Logits::Last => &x[(n - 1) * d..],
            Logits::All => x,
        };
        let m = rows.len() / d;
        let final_norm = &mut normed[..m * d];
        cpu::rms_norm(rows, &self.output_norm, c.rms_eps, final_norm);
        logits.resize(m * c.vocab_size, 0.0);
        matmul_many(&[self.view(&self.output)], final_norm, m, &mut [logits]);
        Ok(())
    }
}

/// The activations of one forward pass, kept per thread so that decode steps reuse them.
#[derive(Default)]
struct ForwardBuffers {
    positions: Vec<u32>,
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    stored_key: Vec<f32>,
}

thread_local! {
    static FORWARD_BUFFERS: std::cell::RefCell<ForwardBuffers> = std::cell::RefCell::new(ForwardBuffers::default());
}

//! The Llama family (Llama 1-3, SmolLM, Mistral-style GQA): pre-norm decoder blocks.
//!
//! For each token x at position p:
//!   h = x + Wo · Attn(RoPE_p(Wq·n), RoPE_p(Wk·n), Wv·n),   n = RMSNorm(x) * g_attn
//!   y = h + Wd · (silu(Wg·m) ⊙ Wu·m),                      m = RMSNorm(h) * g_ffn
//! and logits = W_out · RMSNorm(y_last_layer) * g_out, with W_out tied to the token embedding
//! when the file has no `output.weight`. Keys are cached after RoPE with the token's original
//! position, so a later eviction never needs to re-rotate anything.
//!
//! The pass is written once against [`Backend`]: `Llama` (the CPU) and `Llama<Cuda>` (feature
//! `cuda`) run this same code.

use std::sync::Arc;

use crate::backend::cpu_backend::GgufWeight;
use crate::backend::{Backend, Cpu, ForwardBuffers, HeadShape, SequenceCache};
use crate::gguf::{GgufError, GgufFile};
use keyformer_kv::{PolicyConfig, SequencePolicy};

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
    /// Shapes the forward pass can run.
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return Err(ModelError::Invalid(format!(
                "{} query heads cannot be grouped over {} KV heads",
                self.n_heads, self.n_kv_heads
            )));
        }
        if self.rope_dim % 2 != 0 || self.rope_dim > self.head_dim {
            return Err(ModelError::Invalid(format!(
                "rope dimension {} for head size {}",
                self.rope_dim, self.head_dim
            )));
        }
        Ok(())
    }

    /// RoPE's frequencies theta_i = base^(-2i/d_rope), each divided by its factor when the file
    /// has `rope_freqs.weight` (Llama 3.1).
    pub fn inv_freq(&self, factors: Option<&[f32]>) -> Vec<f32> {
        let d = self.rope_dim;
        let mut f: Vec<f32> = (0..d / 2).map(|i| self.rope_theta.powf(-2.0 * i as f32 / d as f32)).collect();
        if let Some(k) = factors {
            f.iter_mut().zip(k).for_each(|(f, k)| *f /= k);
        }
        f
    }

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

/// One decoder block's weights.
pub struct Layer<B: Backend> {
    pub attn_norm: B::Vector,
    pub wq: B::Matrix,
    pub wk: B::Matrix,
    pub wv: B::Matrix,
    pub wo: B::Matrix,
    pub ffn_norm: B::Vector,
    pub w_gate: B::Matrix,
    pub w_up: B::Matrix,
    pub w_down: B::Matrix,
}

/// Where a forward pass's result goes: the logits, or each row's greedy token.
pub(crate) enum Out<'a> {
    Logits(&'a mut Vec<f32>),
    Greedy(&'a mut Vec<u32>),
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, teacher forcing).
    All,
}

/// A Llama model on backend `B` (the CPU unless said otherwise).
pub struct Llama<B: Backend = Cpu> {
    pub config: LlamaConfig,
    pub backend: B,
    pub token_embd: B::Matrix,
    pub layers: Vec<Layer<B>>,
    pub output_norm: B::Vector,
    /// `None`: tied to the token embedding.
    pub output: Option<B::Matrix>,
    pub inv_freq: B::Vector,
    /// How new caches store keys and values.
    pub kv_type: KvType,
}

impl Llama<Cpu> {
    pub fn load(file: Arc<GgufFile>, arch: &str) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(&file, arch)?;
        config.validate()?;
        let c = &config;
        let weight = |name: &str, rows: usize, cols: usize| -> Result<GgufWeight, ModelError> {
            let info = file.tensor_info(name).ok_or_else(|| GgufError::MissingTensor(name.into()))?;
            if info.dims.len() != 2 || info.dims[0] != cols || info.dims[1] != rows {
                return Err(ModelError::Invalid(format!(
                    "tensor {name} has shape {:?}, expected [{cols}, {rows}]",
                    info.dims
                )));
            }
            Ok(GgufWeight { info: info.clone(), rows, cols })
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
            Some(_) => Some(weight("output.weight", c.vocab_size, d)?),
            None => None, // tied embeddings
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
        // Llama 3.1 files may carry per-frequency divisors.
        let factors = match file.tensor_info("rope_freqs.weight") {
            Some(_) => Some(vector("rope_freqs.weight", c.rope_dim / 2)?),
            None => None,
        };
        let inv_freq = c.inv_freq(factors.as_deref());
        let backend = Cpu { file };
        Ok(Self { config, backend, token_embd, layers, output_norm, output, inv_freq, kv_type: KvType::default() })
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
}

impl<B: Backend> Llama<B> {
    /// An empty cache for a prompt of `prompt_len` tokens followed by `steps` decode steps under
    /// `kv`; the full cache is sized for exactly that many tokens (a backend may allocate it
    /// all at once).
    pub fn new_sequence_cache(
        &self,
        kv: &keyformer_kv::PolicyConfig,
        prompt_len: usize,
        steps: usize,
    ) -> Result<B::Cache, ModelError> {
        let c = &self.config;
        let policy = kv.resolve(prompt_len, steps, c.n_layers, c.n_kv_heads).map_err(ModelError::Policy)?;
        let context = prompt_len.saturating_add(steps).min(c.context_length).max(prompt_len);
        self.backend.new_cache(c, self.kv_type, policy, context)
    }

    /// Run `tokens` through the model at the cache's next positions, appending their keys and
    /// values to `cache`. Returns logits (vocab-sized rows) as asked by `which`.
    pub fn forward(&self, tokens: &[u32], cache: &mut B::Cache, which: Logits) -> Result<Vec<f32>, ModelError> {
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
        cache: &mut B::Cache,
        which: Logits,
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.backend
            .with_buffers(|buffers| self.forward_with(tokens, &mut [cache], which, Out::Logits(logits), buffers))
    }

    /// One decode step of several sequences at once: `tokens[i]` joins `caches[i]` at that
    /// cache's next position, and `logits` gets one row per sequence. The weights are read once
    /// for the whole batch; attention and eviction run per sequence, each under its own policy.
    /// On the CPU each row still takes the single-token dot kernels, so every row's logits equal
    /// what [`forward`](Self::forward) gives that sequence alone (on the GPU they may differ in
    /// the last bits: one row and several take different matrix products).
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut B::Cache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.forward_batch_to(tokens, caches, Out::Logits(logits))
    }

    /// [`forward_batch`](Self::forward_batch) giving each sequence's greedy next token instead
    /// of its logits (on the GPU the logits never leave it).
    pub fn forward_batch_greedy(
        &self,
        tokens: &[u32],
        caches: &mut [&mut B::Cache],
        next: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        self.forward_batch_to(tokens, caches, Out::Greedy(next))
    }

    fn forward_batch_to(&self, tokens: &[u32], caches: &mut [&mut B::Cache], out: Out<'_>) -> Result<(), ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), caches.len())));
        }
        self.backend.with_buffers(|buffers| self.forward_with(tokens, caches, Logits::All, out, buffers))
    }

    /// The forward pass. One cache: every token joins it (a prompt chunk or a decode step).
    /// Several: token i joins cache i (a batch of decode steps).
    pub(crate) fn forward_with(
        &self,
        tokens: &[u32],
        caches: &mut [&mut B::Cache],
        which: Logits,
        mut out: Out<'_>,
        buffers: &mut ForwardBuffers<B::Act>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let be = &self.backend;
        let n = tokens.len();
        match &mut out {
            Out::Logits(l) => l.clear(),
            Out::Greedy(t) => t.clear(),
        }
        if n == 0 {
            return Ok(());
        }
        let batch = caches.len() > 1;
        let (d, hd) = (c.n_embd, c.head_dim);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let shape = HeadShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: hd };
        let ForwardBuffers { positions, x, normed, q, k, v, attn, proj, gate, up } = buffers;
        positions.clear();
        for cache in caches.iter() {
            let m = if batch { 1 } else { n };
            if cache.len() + m > cache.capacity() {
                return Err(ModelError::ContextFull { needed: cache.len() + m, capacity: cache.capacity() });
            }
            let start = cache.next_position();
            positions.extend(start..start + m as u32);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange { token: t, vocab: c.vocab_size });
        }
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
        ] {
            be.resize(buf, len)?;
        }
        be.embed(&self.token_embd, tokens, x)?;

        for (li, layer) in self.layers.iter().enumerate() {
            // Attention block.
            be.rms_norm(x, 0, n, &layer.attn_norm, c.rms_eps, normed)?;
            be.matmul(&[&layer.wq, &layer.wk, &layer.wv], normed, n, batch, &mut [q, k, v])?;
            be.rope(q, c.n_heads, hd, positions, &self.inv_freq)?;
            be.rope(k, c.n_kv_heads, hd, positions, &self.inv_freq)?;
            be.attend(li, shape, q, k, v, positions, caches, attn)?;
            be.matmul(&[&layer.wo], attn, n, batch, &mut [proj])?;
            be.add(x, proj)?;

            // Feed-forward block (SwiGLU).
            be.rms_norm(x, 0, n, &layer.ffn_norm, c.rms_eps, normed)?;
            be.matmul(&[&layer.w_gate, &layer.w_up], normed, n, batch, &mut [gate, up])?;
            be.silu_mul(gate, up)?;
            be.matmul(&[&layer.w_down], gate, n, batch, &mut [proj])?;
            be.add(x, proj)?;
        }

        let (first, m) = match which {
            Logits::Last => (n - 1, 1),
            Logits::All => (0, n),
        };
        be.rms_norm(x, first, m, &self.output_norm, c.rms_eps, normed)?;
        let w = self.output.as_ref().unwrap_or(&self.token_embd);
        match out {
            Out::Logits(logits) => be.logits(w, normed, m, batch, logits),
            Out::Greedy(next) => be.greedy(w, normed, m, batch, next),
        }
    }
}

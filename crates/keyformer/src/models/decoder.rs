//! The decoder, written once for every family: a stack of blocks described by
//! [`ModelConfig`] (see `models/config.rs` for what each family sets). For each token x at
//! position p, a block computes
//!   a = Attn(rope_p(Wq n + bq), rope_p(Wk n + bk), Wv n + bv),   n = Norm(x)
//!   h = x + PostNorm(Wo a + bo)
//!   y = h + PostNorm(Down(Act(Gate m) * Up m)),                   m = Norm(h)
//! where each optional piece (biases, Q/K RMS norms per head, Gemma's sandwich post-norms,
//! SwiGLU / GeGLU / GELU, soft-capping, sliding windows, embedding scaling) is present when the
//! family or the file says so; logits = W_out Norm(y_last) with W_out tied to the token
//! embedding when the file has no `output.weight`. Keys are cached after RoPE with the token's
//! original position, so a later eviction never needs to re-rotate anything.
//!
//! The pass is written against [`Backend`]: `Model` (the CPU) and `Model<Cuda>` (feature
//! `cuda`) run this same code.

use std::sync::Arc;

use crate::backend::cpu::GgufWeight;
use crate::backend::{AttentionSpec, Backend, CacheShape, Cpu, ForwardBuffers, SequenceCache};
use crate::gguf::GgufFile;
use keyformer_kv::{PolicyConfig, SequencePolicy};

use super::config::{FfnKind, ModelConfig, NormKind, PositionKind};
use crate::kv::{KvCache, KvType};
use crate::quant::dequantize_row;
use crate::tensor_parallel::{LayerParts, Part};
use crate::ModelError;

/// A sequence's KV settings, resolved once ([`Model::plan_kv`]): its policy, and the bytes of
/// keys and values its cache holds at most once running and while its prompt is processed.
#[derive(Debug, Clone)]
pub struct KvPlan {
    pub policy: SequencePolicy,
    pub prompt_len: usize,
    pub steps: usize,
    pub bytes_steady: usize,
    pub bytes_prefill: usize,
    /// The settings it was resolved from (a model split over GPUs resolves them again on each
    /// GPU for its own KV heads).
    pub kv: PolicyConfig,
}

/// A norm's weight and optional bias.
pub struct Norm<B: Backend> {
    pub weight: B::Vector,
    pub bias: Option<B::Vector>,
}

/// One decoder block's weights; `None` where the family has no such piece.
pub struct Layer<B: Backend> {
    pub attn_norm: Norm<B>,
    pub wq: B::Matrix,
    pub wk: B::Matrix,
    pub wv: B::Matrix,
    pub q_bias: Option<B::Vector>,
    pub k_bias: Option<B::Vector>,
    pub v_bias: Option<B::Vector>,
    /// RMSNorm of each query / key head before RoPE (Qwen 3, Gemma 3).
    pub q_norm: Option<B::Vector>,
    pub k_norm: Option<B::Vector>,
    pub wo: B::Matrix,
    pub o_bias: Option<B::Vector>,
    /// Norm of the attention's output before the residual add (Gemma's sandwich).
    pub post_attn_norm: Option<Norm<B>>,
    /// `None` only with a parallel residual (GPT-J: one norm feeds attention and MLP).
    pub ffn_norm: Option<Norm<B>>,
    /// `None`: a plain MLP (`FfnKind::Gelu`).
    pub w_gate: Option<B::Matrix>,
    pub w_up: B::Matrix,
    pub up_bias: Option<B::Vector>,
    pub w_down: B::Matrix,
    pub down_bias: Option<B::Vector>,
    pub post_ffn_norm: Option<Norm<B>>,
}

/// A rotary embedding's frequencies on the backend, and its factor on cos and sin.
pub struct Rope<B: Backend> {
    pub inv_freq: B::Vector,
    pub mscale: f32,
}

impl<B: Backend> Norm<B> {
    pub fn try_map<C: Backend, E>(&self, v: &impl Fn(&B::Vector) -> Result<C::Vector, E>) -> Result<Norm<C>, E> {
        Ok(Norm { weight: v(&self.weight)?, bias: self.bias.as_ref().map(v).transpose()? })
    }
}

impl<B: Backend> Layer<B> {
    /// The same layer on another backend, each matrix and vector converted by `m` and `v`.
    pub fn try_map<C: Backend, E>(
        &self,
        m: &impl Fn(&B::Matrix) -> Result<C::Matrix, E>,
        v: &impl Fn(&B::Vector) -> Result<C::Vector, E>,
    ) -> Result<Layer<C>, E> {
        self.try_map_parts(&LayerParts::whole(), &|w, _| m(w), &|x, _| v(x))
    }

    /// The part of this layer `parts` names (a tensor-parallel shard's) on another backend,
    /// each matrix and vector converted by `m` and `v` given the part to take.
    pub fn try_map_parts<C: Backend, E>(
        &self,
        parts: &LayerParts,
        m: &impl Fn(&B::Matrix, &Part) -> Result<C::Matrix, E>,
        v: &impl Fn(&B::Vector, &Part) -> Result<C::Vector, E>,
    ) -> Result<Layer<C>, E> {
        let whole = |x: &B::Vector| v(x, &Part::Whole);
        let ov = |x: &Option<B::Vector>, part: &Part| x.as_ref().map(|x| v(x, part)).transpose();
        let on = |x: &Option<Norm<B>>| x.as_ref().map(|n| n.try_map(&whole)).transpose();
        Ok(Layer {
            attn_norm: self.attn_norm.try_map(&whole)?,
            wq: m(&self.wq, &parts.q)?,
            wk: m(&self.wk, &parts.kv)?,
            wv: m(&self.wv, &parts.kv)?,
            q_bias: ov(&self.q_bias, &parts.q)?,
            k_bias: ov(&self.k_bias, &parts.kv)?,
            v_bias: ov(&self.v_bias, &parts.kv)?,
            q_norm: ov(&self.q_norm, &Part::Whole)?,
            k_norm: ov(&self.k_norm, &Part::Whole)?,
            wo: m(&self.wo, &parts.attn_output)?,
            o_bias: ov(&self.o_bias, &Part::Whole)?,
            post_attn_norm: on(&self.post_attn_norm)?,
            ffn_norm: on(&self.ffn_norm)?,
            w_gate: self.w_gate.as_ref().map(|w| m(w, &parts.ff)).transpose()?,
            w_up: m(&self.w_up, &parts.ff)?,
            up_bias: ov(&self.up_bias, &parts.ff)?,
            w_down: m(&self.w_down, &parts.down)?,
            down_bias: ov(&self.down_bias, &Part::Whole)?,
            post_ffn_norm: on(&self.post_ffn_norm)?,
        })
    }

    /// The weight matrices.
    pub fn matrices(&self) -> Vec<&B::Matrix> {
        let mut m = vec![&self.wq, &self.wk, &self.wv, &self.wo, &self.w_up, &self.w_down];
        m.extend(self.w_gate.as_ref());
        m
    }
}

/// Where a forward pass's result goes: the logits, or each row's greedy token.
pub enum Out<'a> {
    /// Vocabulary-sized rows of logits.
    Logits(&'a mut Vec<f32>),
    /// Each row's argmax.
    Greedy(&'a mut Vec<u32>),
}

impl Out<'_> {
    /// The same destination, borrowed again (to pass on while keeping this one).
    pub fn reborrow(&mut self) -> Out<'_> {
        match self {
            Out::Logits(l) => Out::Logits(l),
            Out::Greedy(t) => Out::Greedy(t),
        }
    }
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's (perplexity, teacher forcing).
    All,
}

/// A decoder on backend `B` (the CPU unless said otherwise).
pub struct Model<B: Backend = Cpu> {
    pub config: ModelConfig,
    pub backend: B,
    pub token_embd: B::Matrix,
    pub layers: Vec<Layer<B>>,
    pub output_norm: Norm<B>,
    /// `None`: tied to the token embedding.
    pub output: Option<B::Matrix>,
    /// Added to the logits (GPT-J's output head), kept on the host.
    pub output_bias: Option<Vec<f32>>,
    /// Learned position embeddings (`PositionKind::Learned`), a row per position.
    pub pos_embd: Option<B::Matrix>,
    /// `config.ropes`' frequencies.
    pub ropes: Vec<Rope<B>>,
    /// How new caches store keys and values.
    pub kv_type: KvType,
    /// What KVzip asks before it repeats a prompt, in this model's tokens (set by the Engine,
    /// which has the tokenizer).
    pub repeat_request: Option<crate::kvzip::RepeatRequest>,
}

/// Reads a GGUF file's tensors for [`Model::load`], checking each shape.
struct TensorReader<'a> {
    file: &'a GgufFile,
}

impl TensorReader<'_> {
    fn has(&self, name: &str) -> bool {
        self.file.tensor_info(name).is_some()
    }

    /// Rows `first_row..first_row + rows` of a matrix stored as `total_rows x cols` (a fused
    /// QKV or gate-up tensor is read as several matrices, none copied).
    fn rows_of(
        &self,
        name: &str,
        total_rows: usize,
        cols: usize,
        first_row: usize,
        rows: usize,
    ) -> Result<GgufWeight, ModelError> {
        let info = self.file.tensor_info(name).ok_or_else(|| self.file.missing_tensor(name))?;
        if info.dims.len() != 2 || info.dims[0] != cols || info.dims[1] != total_rows {
            // Rows x columns reads the same in GGUF (innermost first) and safetensors (outermost first).
            let shape = info.dims.iter().rev().map(|d| d.to_string()).collect::<Vec<_>>().join(" x ");
            return Err(ModelError::Invalid(format!(
                "tensor {} is {shape}, expected {total_rows} x {cols} (rows x columns)",
                self.file.describe(name),
            )));
        }
        Ok(GgufWeight { info: info.clone(), first_row, rows, cols })
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<GgufWeight, ModelError> {
        self.rows_of(name, rows, cols, 0, rows)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.file.tensor_info(name).ok_or_else(|| self.file.missing_tensor(name))?;
        if info.n_elements() != len {
            return Err(ModelError::Invalid(format!(
                "tensor {} has {} elements, expected {len}",
                self.file.describe(name),
                info.n_elements()
            )));
        }
        let mut v = vec![0f32; len];
        dequantize_row(info.ggml_type, self.file.tensor_bytes(info), &mut v);
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Invalid(format!(
                "tensor {} holds a value that is not finite",
                self.file.describe(name)
            )));
        }
        Ok(v)
    }

    fn optional_vector(&self, name: &str, len: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `<prefix>.weight` and `<prefix>.bias` if present.
    fn norm(&self, prefix: &str, len: usize) -> Result<Norm<Cpu>, ModelError> {
        Ok(Norm {
            weight: self.vector(&format!("{prefix}.weight"), len)?,
            bias: self.optional_vector(&format!("{prefix}.bias"), len)?,
        })
    }

    fn optional_norm(&self, prefix: &str, len: usize) -> Result<Option<Norm<Cpu>>, ModelError> {
        if self.has(&format!("{prefix}.weight")) {
            self.norm(prefix, len).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Model<Cpu> {
    pub fn load(file: Arc<GgufFile>, arch: &str) -> Result<Self, ModelError> {
        let config = ModelConfig::from_gguf(&file, arch)?;
        config.validate()?;
        let c = &config;
        let t = TensorReader { file: &file };
        let (d, hd, ff) = (c.n_embd, c.head_dim, c.n_ff);
        let (q_dim, kv_dim) = (c.n_heads * hd, c.n_kv_heads * hd);
        let token_embd = t.matrix("token_embd.weight", c.vocab_size, d)?;
        let output = if t.has("output.weight") { Some(t.matrix("output.weight", c.vocab_size, d)?) } else { None };
        let output_bias = t.optional_vector("output.bias", c.vocab_size)?;
        let pos_embd = match c.positions {
            PositionKind::Learned => Some(t.matrix("position_embd.weight", c.context_length, d)?),
            _ => None,
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for i in 0..c.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            // Q, K and V: three tensors, or one fused (Phi-3) read as three row ranges.
            let (wq, wk, wv, q_bias, k_bias, v_bias) = if t.has(&p("attn_qkv.weight")) {
                let total = q_dim + 2 * kv_dim;
                let fused = |first, rows| t.rows_of(&p("attn_qkv.weight"), total, d, first, rows);
                let bias = t.optional_vector(&p("attn_qkv.bias"), total)?;
                let split = |r: std::ops::Range<usize>| bias.as_ref().map(|b| b[r].to_vec());
                (
                    fused(0, q_dim)?,
                    fused(q_dim, kv_dim)?,
                    fused(q_dim + kv_dim, kv_dim)?,
                    split(0..q_dim),
                    split(q_dim..q_dim + kv_dim),
                    split(q_dim + kv_dim..total),
                )
            } else {
                (
                    t.matrix(&p("attn_q.weight"), q_dim, d)?,
                    t.matrix(&p("attn_k.weight"), kv_dim, d)?,
                    t.matrix(&p("attn_v.weight"), kv_dim, d)?,
                    t.optional_vector(&p("attn_q.bias"), q_dim)?,
                    t.optional_vector(&p("attn_k.bias"), kv_dim)?,
                    t.optional_vector(&p("attn_v.bias"), kv_dim)?,
                )
            };
            // Gate and up: two tensors, one fused (Phi-3: gate first), or up alone (GELU MLP).
            let (w_gate, w_up) = match c.ffn {
                FfnKind::Gelu | FfnKind::GeluErf => (None, t.matrix(&p("ffn_up.weight"), ff, d)?),
                _ if t.has(&p("ffn_gate.weight")) => {
                    (Some(t.matrix(&p("ffn_gate.weight"), ff, d)?), t.matrix(&p("ffn_up.weight"), ff, d)?)
                }
                _ => (
                    Some(t.rows_of(&p("ffn_up.weight"), 2 * ff, d, 0, ff)?),
                    t.rows_of(&p("ffn_up.weight"), 2 * ff, d, ff, ff)?,
                ),
            };
            layers.push(Layer {
                attn_norm: t.norm(&p("attn_norm"), d)?,
                wq,
                wk,
                wv,
                q_bias,
                k_bias,
                v_bias,
                q_norm: t.optional_vector(&p("attn_q_norm.weight"), hd)?,
                k_norm: t.optional_vector(&p("attn_k_norm.weight"), hd)?,
                wo: t.matrix(&p("attn_output.weight"), d, q_dim)?,
                o_bias: t.optional_vector(&p("attn_output.bias"), d)?,
                post_attn_norm: t.optional_norm(&p("post_attention_norm"), d)?,
                ffn_norm: match c.parallel_residual {
                    true => t.optional_norm(&p("ffn_norm"), d)?,
                    false => Some(t.norm(&p("ffn_norm"), d)?),
                },
                w_gate,
                w_up,
                up_bias: t.optional_vector(&p("ffn_up.bias"), ff)?,
                w_down: t.matrix(&p("ffn_down.weight"), d, ff)?,
                down_bias: t.optional_vector(&p("ffn_down.bias"), d)?,
                post_ffn_norm: t.optional_norm(&p("post_ffw_norm"), d)?,
            });
        }
        let output_norm = t.norm("output_norm", d)?;
        let ropes = c
            .ropes
            .iter()
            .map(|r| {
                // Llama 3.1's and Phi-3's per-frequency divisors.
                let factors = match r.factors_tensor(c.context_length) {
                    Some(name) => Some(t.vector(name, r.dim / 2)?),
                    None => None,
                };
                let (inv_freq, mscale) = r.frequencies(factors.as_deref());
                Ok(Rope { inv_freq, mscale })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let backend = Cpu { file: file.clone(), prefill_activations: Default::default() };
        Ok(Self {
            config,
            backend,
            token_embd,
            layers,
            output_norm,
            output,
            output_bias,
            pos_embd,
            ropes,
            kv_type: KvType::default(),
            repeat_request: None,
        })
    }

    /// A new, empty KV cache that keeps everything, for at most `capacity` tokens.
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        let full =
            PolicyConfig::default().resolve(0, 0, self.config.n_layers, self.config.n_kv_heads).expect("full cache");
        self.new_cache_with(full, capacity)
    }

    /// A new, empty KV cache trimmed by `policy`; `context` bounds it when the policy keeps all.
    pub fn new_cache_with(&self, policy: SequencePolicy, context: usize) -> KvCache {
        let c = &self.config;
        KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, self.kv_type, policy, context)
            .with_windows(c.layers.iter().map(|l| l.window).collect())
    }
}

impl<B: Backend> Model<B> {
    /// Resolve a sequence's KV settings once: the policy for a prompt of `prompt_len` tokens
    /// and `steps` decode steps, and the bytes its cache holds (what the server admits by).
    pub fn plan_kv(&self, kv: &PolicyConfig, prompt_len: usize, steps: usize) -> Result<KvPlan, ModelError> {
        let c = &self.config;
        let policy = kv.resolve(prompt_len, steps, c.n_layers, c.n_kv_heads).map_err(ModelError::Policy)?;
        if let Some(chunk) = kv.prefill_chunk.filter(|&n| n > c.context_length) {
            return Err(ModelError::Input(format!(
                "a prefill chunk of {chunk} tokens is longer than the model's context ({})",
                c.context_length
            )));
        }
        if policy.prompt_chunk().is_some() && !self.backend.trims_prompt_chunks() {
            return Err(ModelError::Input(
                "a prompt trimmed chunk by chunk (--prefill-chunk) runs on the CPU only for now".into(),
            ));
        }
        let trims_windows = self.backend.trims_windows_during_prompt();
        let lifetime = prompt_len.saturating_add(steps);
        let per_layer = self.kv_type.token_bytes(1, c.n_kv_heads, c.head_dim);
        let (mut steady, mut prefill) = (0usize, 0usize);
        let per_head = self.kv_type.token_bytes(1, 1, c.head_dim);
        for (l, layer) in c.layers.iter().enumerate() {
            let (held, during_prompt) = match layer.window {
                // A sliding layer: its window; while the prompt runs, the window plus a forward
                // chunk, or the whole prompt on a backend that trims it only at its end.
                Some(w) => (
                    lifetime.min(w.saturating_add(1)) * per_layer,
                    if trims_windows {
                        prompt_len.min(w.saturating_add(self.backend.prefill_chunk())) * per_layer
                    } else {
                        prompt_len * per_layer
                    },
                ),
                // Each head its budget + 1 (pyramid budgets differ by layer; adaptive ones by
                // head, with the layer's sum unchanged); while the prompt runs, all of it, or
                // budget + a chunk when it is trimmed chunk by chunk.
                _ => (
                    (0..c.n_kv_heads)
                        .map(|h| lifetime.min(policy.head_budget(l, h).saturating_add(policy.decode_room())) * per_head)
                        .sum::<usize>(),
                    (0..c.n_kv_heads).map(|h| policy.held_during_prompt(l, h) * per_head).sum::<usize>(),
                ),
            };
            steady += held;
            prefill += held.max(during_prompt);
        }
        Ok(KvPlan { policy, prompt_len, steps, bytes_steady: steady, bytes_prefill: prefill, kv: kv.clone() })
    }

    /// An empty cache for the sequence `plan` describes; the full cache is sized for exactly
    /// its prompt and steps (a backend may allocate it all at once).
    pub fn new_planned_cache(&self, plan: KvPlan) -> Result<B::Cache, ModelError> {
        let context = plan.prompt_len.saturating_add(plan.steps).min(self.config.context_length).max(plan.prompt_len);
        self.backend.new_cache(self.cache_shape(), self.kv_type, plan.policy, context)
    }

    /// An empty cache for a prompt of `prompt_len` tokens followed by `steps` decode steps under
    /// `kv` ([`plan_kv`](Self::plan_kv), then [`new_planned_cache`](Self::new_planned_cache)).
    pub fn new_sequence_cache(
        &self,
        kv: &keyformer_kv::PolicyConfig,
        prompt_len: usize,
        steps: usize,
    ) -> Result<B::Cache, ModelError> {
        self.new_planned_cache(self.plan_kv(kv, prompt_len, steps)?)
    }

    /// The optional pieces this model's blocks have, as words for `keyformer info`.
    pub fn features(&self) -> Vec<String> {
        let l = &self.layers[0];
        let mut f = Vec::new();
        if l.q_bias.is_some() || l.k_bias.is_some() || l.v_bias.is_some() {
            f.push("QKV bias".to_string());
        }
        if l.q_norm.is_some() || l.k_norm.is_some() {
            f.push("Q/K norm".into());
        }
        if l.post_attn_norm.is_some() || l.post_ffn_norm.is_some() {
            f.push("post-norms (sandwich)".into());
        }
        if l.o_bias.is_some() || l.up_bias.is_some() || l.down_bias.is_some() {
            f.push("output/MLP bias".into());
        }
        if self.output_bias.is_some() {
            f.push("output head bias".into());
        }
        if let Some(c) = self.config.clamp_kqv {
            f.push(format!("Q/K/V clamped to ±{c}"));
        }
        if let Some(s) = self.config.embedding_scale {
            f.push(format!("embedding scale {s}"));
        }
        f.push(if self.output.is_some() { "separate output".into() } else { "tied output".into() });
        f
    }

    /// Key and value bytes of one token in a full cache of this model.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        self.kv_type.token_bytes(c.n_layers, c.n_kv_heads, c.head_dim)
    }

    /// The dimensions of this model's KV caches.
    pub fn cache_shape(&self) -> CacheShape {
        let c = &self.config;
        CacheShape {
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            windows: c.layers.iter().map(|l| l.window).collect(),
        }
    }

    /// `out` = the configured norm of rows `first..first + rows` of `x`.
    fn norm(&self, x: &B::Act, first: usize, rows: usize, norm: &Norm<B>, out: &mut B::Act) -> Result<(), ModelError> {
        let c = &self.config;
        match c.norm {
            NormKind::Rms => {
                self.backend.rms_norm(x, first, rows, &norm.weight, c.norm_eps, out)?;
                if let Some(b) = &norm.bias {
                    self.backend.add_bias(out, rows, b)?;
                }
                Ok(())
            }
            NormKind::Layer => {
                self.backend.layer_norm(x, first, rows, &norm.weight, norm.bias.as_ref(), c.norm_eps, out)
            }
        }
    }

    /// The step protocol, part 1: a prompt through the cache in the backend's chunks, then its
    /// end (the cache compressed to the policy's budget). `on_rows(first, logits)` receives
    /// each chunk's logits (every row if `which` is `All`, else the chunk's last row), so a
    /// long prompt never holds more than one chunk of logits.
    pub fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut B::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), ModelError> {
        self.prefill_observed(tokens, cache, which, on_rows, &[], &mut |_, _| {})
    }

    /// [`prefill`](Self::prefill) that also shows `on_break` the cache as it stands at each
    /// prompt position in `breaks` (ascending; after a chunk's trim where the prompt is trimmed
    /// chunk by chunk), for keeping copies of shared prefixes.
    pub fn prefill_observed(
        &self,
        tokens: &[u32],
        cache: &mut B::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
        breaks: &[usize],
        on_break: &mut dyn FnMut(usize, &B::Cache),
    ) -> Result<(), ModelError> {
        let rows = self.backend.prefill_chunk();
        // A prompt compressed as it goes is trimmed at every multiple of its chunk (in prompt
        // positions, so a prompt continued after earlier tokens keeps the same boundaries).
        let every = cache.policy().prompt_chunk();
        let mut logits = Vec::new();
        let mut done = 0;
        while done < tokens.len() {
            let pos = cache.next_position() as usize;
            let mut take = rows.min(tokens.len() - done);
            if let Some(c) = every {
                take = take.min((pos / c + 1) * c - pos);
            }
            if let Some(&b) = breaks.iter().find(|&&b| b > pos) {
                take = take.min(b - pos);
            }
            self.forward_into(&tokens[done..done + take], cache, which, &mut logits)?;
            on_rows(done, &logits);
            done += take;
            let pos = cache.next_position() as usize;
            if let Some(c) = every.filter(|&c| pos % c == 0 && done < tokens.len()) {
                self.backend.trim_prompt_chunk(cache, pos + c)?;
            }
            if breaks.contains(&pos) && done < tokens.len() {
                on_break(pos, cache);
            }
        }
        self.backend.before_prompt_end(self, tokens, cache)?;
        self.backend.finish_prompt(cache)
    }

    /// The step protocol, part 2: one decode step of one sequence (`token` joins the cache,
    /// which evicts to its budget), then the step's end (the policy's schedule moves on).
    pub fn decode_step_into(&self, token: u32, cache: &mut B::Cache, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        if !self.backend.replay_decode_step(self, &[token], &mut [&mut *cache], &mut Out::Logits(logits))? {
            self.forward_into(&[token], cache, Logits::Last, logits)?;
        }
        self.backend.end_step(cache);
        Ok(())
    }

    /// [`decode_step_into`](Self::decode_step_into) for several sequences at once (`tokens[i]`
    /// joins `caches[i]`), each step ended.
    pub fn decode_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut B::Cache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), caches.len())));
        }
        if !self.backend.replay_decode_step(self, tokens, caches, &mut Out::Logits(logits))? {
            self.forward_batch(tokens, caches, logits)?;
        }
        for cache in caches.iter_mut() {
            self.backend.end_step(cache);
        }
        Ok(())
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
        let ForwardBuffers { positions, x, normed, q, k, v, attn, proj, gate, up } = buffers;
        positions.clear();
        // Checked before anything changes; in a batch the error names its sequence.
        let in_batch = |index: usize, error: ModelError| match batch {
            true => ModelError::InBatch { index, error: Box::new(error) },
            false => error,
        };
        for (i, cache) in caches.iter().enumerate() {
            let m = if batch { 1 } else { n };
            if !cache.fits(m) {
                let full = ModelError::ContextFull { needed: cache.len() + m, capacity: cache.capacity() };
                return Err(in_batch(i, full));
            }
            let start = cache.next_position();
            positions.extend(start..start + m as u32);
        }
        if self.pos_embd.is_some() {
            // A learned position exists only up to the context the model was trained for.
            if let Some(i) = positions.iter().position(|&p| p as usize >= c.context_length) {
                let past = ModelError::ContextFull { needed: positions[i] as usize + 1, capacity: c.context_length };
                return Err(in_batch(i, past));
            }
        }
        if let Some(i) = tokens.iter().position(|&t| t as usize >= c.vocab_size) {
            return Err(in_batch(i, ModelError::TokenOutOfRange { token: tokens[i], vocab: c.vocab_size }));
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
        if let Some(s) = c.embedding_scale {
            be.scale(x, s)?;
        }
        if let Some(table) = &self.pos_embd {
            // Each token's ORIGINAL position picks its row (`proj` is free until the first layer).
            be.embed(table, positions, proj)?;
            be.add(x, proj)?;
        }

        // The last layer's residual, when it is added together with the next norm (`proj`).
        let mut residual_pending = false;
        for (li, (layer, la)) in self.layers.iter().zip(&c.layers).enumerate() {
            // Attention block.
            if residual_pending {
                self.add_then_norm(x, proj, None, &layer.attn_norm, n, normed)?;
                residual_pending = false;
            } else {
                self.norm(x, 0, n, &layer.attn_norm, normed)?;
            }
            be.matmul(&[&layer.wq, &layer.wk, &layer.wv], normed, n, batch, &mut [q, k, v])?;
            for (act, bias) in [(&mut *q, &layer.q_bias), (&mut *k, &layer.k_bias), (&mut *v, &layer.v_bias)] {
                if let Some(b) = bias {
                    be.add_bias(act, n, b)?;
                }
            }
            if let Some(limit) = c.clamp_kqv {
                for act in [&mut *q, &mut *k, &mut *v] {
                    be.clamp(act, limit)?;
                }
            }
            if let Some(w) = &layer.q_norm {
                be.rms_norm_heads(q, n * c.n_heads, w, c.norm_eps)?;
            }
            if let Some(w) = &layer.k_norm {
                be.rms_norm_heads(k, n * c.n_kv_heads, w, c.norm_eps)?;
            }
            let (rope, style) = (&self.ropes[la.rope], c.ropes[la.rope].style);
            let scale = c.attention_scale;
            be.observe_queries(li, q, c.n_heads, hd, positions, &rope.inv_freq, style, rope.mscale, scale, caches)?;
            be.rope_qk(q, k, c.n_heads, c.n_kv_heads, hd, positions, &rope.inv_freq, style, rope.mscale)?;
            let spec = AttentionSpec {
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads,
                head_dim: hd,
                scale: c.attention_scale,
                softcap: c.attention_softcap,
                window: la.window.map(|w| w.min(u32::MAX as usize) as u32),
                alibi: match c.positions {
                    PositionKind::Alibi { max_bias } => Some(max_bias),
                    _ => None,
                },
            };
            be.attend(li, spec, q, k, v, positions, caches, attn)?;
            be.matmul(&[&layer.wo], attn, n, batch, &mut [proj])?;
            // A shard's heads give part of the projection; the bias is added once, to the sum.
            be.all_reduce(proj)?;
            if let Some(b) = &layer.o_bias {
                be.add_bias(proj, n, b)?;
            }
            if c.parallel_residual {
                // The MLP reads the block's input too: normed by its own norm before the add
                // (GPT-NeoX), or the attention's normed input as it is (GPT-J).
                if let Some(norm) = &layer.ffn_norm {
                    self.norm(x, 0, n, norm, normed)?;
                }
                be.add(x, proj)?;
            } else {
                let norm = layer.ffn_norm.as_ref().expect("loaded for every sequential block");
                self.add_then_norm(x, proj, layer.post_attn_norm.as_ref(), norm, n, normed)?;
            }

            // Feed-forward block (its input normed above).
            match &layer.w_gate {
                Some(w_gate) => {
                    be.matmul(&[w_gate, &layer.w_up], normed, n, batch, &mut [gate, up])?;
                    if let Some(b) = &layer.up_bias {
                        be.add_bias(up, n, b)?;
                    }
                    match c.ffn {
                        FfnKind::GeGlu => be.gelu_mul(gate, up)?,
                        _ => be.silu_mul(gate, up)?,
                    }
                }
                None => {
                    be.matmul(&[&layer.w_up], normed, n, batch, &mut [gate])?;
                    if let Some(b) = &layer.up_bias {
                        be.add_bias(gate, n, b)?;
                    }
                    match c.ffn {
                        FfnKind::GeluErf => be.gelu_erf(gate)?,
                        _ => be.gelu(gate)?,
                    }
                }
            }
            be.matmul(&[&layer.w_down], gate, n, batch, &mut [proj])?;
            be.all_reduce(proj)?;
            if let Some(b) = &layer.down_bias {
                be.add_bias(proj, n, b)?;
            }
            match &layer.post_ffn_norm {
                None => residual_pending = true, // added with the next layer's norm
                Some(post) => self.residual_add(x, proj, Some(post), n, normed)?,
            }
        }
        if residual_pending {
            be.add(x, proj)?;
        }

        let (first, m) = match which {
            Logits::Last => (n - 1, 1),
            Logits::All => (0, n),
        };
        self.norm(x, first, m, &self.output_norm, normed)?;
        let w = self.output.as_ref().unwrap_or(&self.token_embd);
        match out {
            Out::Logits(logits) => {
                be.logits(w, normed, m, batch, logits)?;
                self.finish_logits(logits);
                Ok(())
            }
            // A bias moves the argmax: taken over the host's logits.
            Out::Greedy(next) if self.output_bias.is_some() => {
                let mut logits = Vec::new();
                be.logits(w, normed, m, batch, &mut logits)?;
                let bias = self.output_bias.as_ref().expect("checked by the guard");
                next.clear();
                next.extend(logits.chunks_exact(bias.len()).map(|row| {
                    let biased = row.iter().zip(bias).map(|(l, b)| l + b);
                    biased
                        .enumerate()
                        .fold((0u32, f32::NEG_INFINITY), |best, (i, v)| if v > best.1 { (i as u32, v) } else { best })
                        .0
                }));
                Ok(())
            }
            // Soft-capping is monotonic: the argmax is the uncapped one.
            Out::Greedy(next) => be.greedy(w, normed, m, batch, next),
        }
    }

    /// What the output projection's logits still need on the host: the output bias, then the
    /// final soft-cap (Gemma 2).
    pub(crate) fn finish_logits(&self, logits: &mut [f32]) {
        if let Some(bias) = &self.output_bias {
            logits.chunks_exact_mut(bias.len()).for_each(|row| row.iter_mut().zip(bias).for_each(|(l, b)| *l += b));
        }
        if let Some(cap) = self.config.final_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
    }

    /// `x += y` (or `PostNorm(y)`), then `out` = `norm` of x's `n` rows: one pass where the
    /// backend fuses a residual add with an RMS norm (a decode step is mostly such small ops).
    fn add_then_norm(
        &self,
        x: &mut B::Act,
        y: &B::Act,
        post_norm: Option<&Norm<B>>,
        norm: &Norm<B>,
        n: usize,
        out: &mut B::Act,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        if post_norm.is_none() && c.norm == NormKind::Rms {
            self.backend.add_rms_norm(x, y, n, &norm.weight, c.norm_eps, out)?;
            if let Some(b) = &norm.bias {
                self.backend.add_bias(out, n, b)?;
            }
            return Ok(());
        }
        self.residual_add(x, y, post_norm, n, out)?;
        self.norm(x, 0, n, norm, out)
    }

    /// `x += y`, or `x += PostNorm(y)` (Gemma's sandwich; `scratch` takes the normed rows).
    fn residual_add(
        &self,
        x: &mut B::Act,
        y: &B::Act,
        post_norm: Option<&Norm<B>>,
        n: usize,
        scratch: &mut B::Act,
    ) -> Result<(), ModelError> {
        match post_norm {
            None => self.backend.add(x, y),
            Some(norm) => {
                self.norm(y, 0, n, norm, scratch)?;
                self.backend.add(x, scratch)
            }
        }
    }
}

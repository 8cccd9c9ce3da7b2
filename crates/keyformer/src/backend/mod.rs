//! Backends implement the op set the models are written against ([`Backend`]): the CPU
//! ([`cpu::Cpu`]), and with the cargo feature `cuda` an NVIDIA GPU (`cuda::Cuda`).
//! A model file (`models/llama.rs`) calls only these ops, so each architecture is written
//! once; the KV policies stay plain Rust (`keyformer-kv`) and each backend's cache drives them.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pool;

pub use cpu::Cpu;

use keyformer_kv::SequencePolicy;

use crate::kv::{KvStats, KvType};
use crate::ModelError;

/// One sequence's KV cache as the model and the engine see it: where the next token goes, how
/// much fits, the policy that trims it and what it has held.
pub trait SequenceCache {
    /// Position the next token takes: one past the last cached position.
    fn next_position(&self) -> u32;
    /// Tokens held (per layer and KV head).
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Slots per (layer, KV head).
    fn capacity(&self) -> usize;
    /// Whether `n` more tokens fit in every layer before anything is evicted (a sliding layer
    /// holds its window in fewer slots than the global ones).
    fn fits(&self, n: usize) -> bool {
        self.len() + n <= self.capacity()
    }
    fn policy(&self) -> &SequencePolicy;
    /// Key and value bytes held now, over all layers and KV heads.
    fn bytes_held(&self) -> usize;
    /// What the cache has held over the sequence's life.
    fn stats(&self) -> KvStats;
}

/// One layer's attention: its shape and options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q.k before the softmax.
    pub scale: f32,
    /// Logits become `cap * tanh(logit / cap)` (Gemma 2).
    pub softcap: Option<f32>,
    /// A query at position p sees keys at positions p - window + 1 ..= p; `None`: all before it.
    pub window: Option<u32>,
    /// ALiBi's largest bias (MPT: 8): head h adds `alibi_slope(h) * (key - query position)`.
    pub alibi: Option<f32>,
}

impl AttentionSpec {
    /// Plain causal attention scaled by 1/sqrt(head_dim).
    pub fn causal(n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Self {
            n_heads,
            n_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap: None,
            window: None,
            alibi: None,
        }
    }

    /// ALiBi's slope of query head `h` (0 without ALiBi), as MPT computes it: for n heads
    /// rounded up to a power of two p, slopes 2^(-max_bias * i / p) for i = 1..=p, and when n
    /// is not p itself the odd-numbered ones first, then the even ones, cut to n.
    pub fn alibi_slope(&self, h: usize) -> f32 {
        let Some(max_bias) = self.alibi else { return 0.0 };
        let p = self.n_heads.next_power_of_two();
        let slope = |i: usize| 2f32.powf(-max_bias * i as f32 / p as f32);
        if p == self.n_heads {
            return slope(h + 1);
        }
        // [slopes[1::2], slopes[::2]] of slopes[i - 1] = slope(i).
        let odd = p / 2;
        if h < odd {
            slope(2 * h + 2)
        } else {
            slope(2 * (h - odd) + 1)
        }
    }
}

/// The dimensions of one sequence's KV cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheShape {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Per layer, the sliding window it attends over (`None`: global). A backend may hold only
    /// the window in those layers.
    pub windows: Vec<Option<usize>>,
}

/// How a rotary embedding pairs a head's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// (2i, 2i+1): ggml's normal mode, which Llama GGUF files expect (their Q/K rows are
    /// permuted by the converter).
    AdjacentPairs,
    /// (i, i + dim/2): GPT-NeoX's and Hugging Face's rotate-half layout (Qwen, Gemma, Phi-3).
    Halves,
}

/// The op set. Activations are f32 rows; `n` rows of a matrix product are either one sequence's
/// tokens (a prompt chunk) or one token of each of `n` sequences (a batch of decode steps,
/// `per_token`).
/// A backend is shared between threads (a server tokenises on its request handlers and
/// decodes on its scheduler thread), and a sequence's cache may move between them.
pub trait Backend: Send + Sync + 'static {
    /// A weight matrix, `rows` output features of `cols` inputs.
    type Matrix: Send + Sync;
    /// A vector of f32 (norm weights, RoPE frequencies).
    type Vector: Send + Sync;
    /// Activations: rows of f32.
    type Act: Default;
    /// One sequence's KV cache.
    type Cache: SequenceCache + Send;

    /// Make `a` hold `len` values (contents unspecified: every op writes before it reads).
    fn resize(&self, a: &mut Self::Act, len: usize) -> Result<(), ModelError>;
    /// Row `tokens[i]` of the embedding table into row i of `out`.
    fn embed(&self, table: &Self::Matrix, tokens: &[u32], out: &mut Self::Act) -> Result<(), ModelError>;
    /// RMSNorm of rows `first_row..first_row + rows` of `x` into the first `rows` rows of `out`.
    fn rms_norm(
        &self,
        x: &Self::Act,
        first_row: usize,
        rows: usize,
        weight: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<(), ModelError>;
    /// `x += y`, then `out` = the RMS norm of the first `rows` rows of `x` (a residual add and
    /// the norm after it; a backend may do both in one pass over `x`).
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        x: &mut Self::Act,
        y: &Self::Act,
        rows: usize,
        weight: &Self::Vector,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<(), ModelError> {
        self.add(x, y)?;
        self.rms_norm(x, 0, rows, weight, eps, out)
    }
    /// `ys[i] = x * ws[i]^T` for the `n` rows of `x` (weights that share their input).
    fn matmul(
        &self,
        ws: &[&Self::Matrix],
        x: &Self::Act,
        n: usize,
        per_token: bool,
        ys: &mut [&mut Self::Act],
    ) -> Result<(), ModelError>;
    /// The output projection of `n` normalised rows, as host logits (`n` x vocabulary).
    fn logits(
        &self,
        w: &Self::Matrix,
        x: &Self::Act,
        n: usize,
        per_token: bool,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError>;
    /// The output projection's argmax of each of `n` rows (greedy decoding; the first of equal
    /// maxima). A backend may find it without sending the logits to the host.
    fn greedy(
        &self,
        w: &Self::Matrix,
        x: &Self::Act,
        n: usize,
        per_token: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        let mut logits = Vec::new();
        self.logits(w, x, n, per_token, &mut logits)?;
        out.clear();
        out.extend(logits.chunks_exact(logits.len() / n.max(1)).map(crate::sampling::argmax));
        Ok(())
    }
    /// LayerNorm of rows `first_row..first_row + rows` of `x` into the first `rows` rows of
    /// `out`: `(x - mean) / sqrt(var + eps) * weight (+ bias)`.
    #[allow(clippy::too_many_arguments)]
    fn layer_norm(
        &self,
        x: &Self::Act,
        first_row: usize,
        rows: usize,
        weight: &Self::Vector,
        bias: Option<&Self::Vector>,
        eps: f32,
        out: &mut Self::Act,
    ) -> Result<(), ModelError>;
    /// RMSNorm in place of every `weight.len()`-sized piece of the first `rows` rows of `x`
    /// (Q/K norms: one per head).
    fn rms_norm_heads(&self, x: &mut Self::Act, rows: usize, weight: &Self::Vector, eps: f32)
        -> Result<(), ModelError>;
    /// `x[r] += bias` for each of the first `rows` rows of `x`.
    fn add_bias(&self, x: &mut Self::Act, rows: usize, bias: &Self::Vector) -> Result<(), ModelError>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Act, s: f32) -> Result<(), ModelError>;
    /// Rotary embedding by each row's position: pair i of each head turns by
    /// `position * inv_freq[i]`, laid out as `style` says; cos and sin are multiplied by
    /// `mscale` (YaRN's attention factor; 1 otherwise). Dimensions past the rotated ones pass.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Act,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &Self::Vector,
        style: RopeStyle,
        mscale: f32,
    ) -> Result<(), ModelError>;
    /// [`rope`](Self::rope) on the queries `q` (`n_heads` heads) and the keys `k`
    /// (`n_kv_heads`) of the same rows (a backend may turn both in one pass).
    #[allow(clippy::too_many_arguments)]
    fn rope_qk(
        &self,
        q: &mut Self::Act,
        k: &mut Self::Act,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &Self::Vector,
        style: RopeStyle,
        mscale: f32,
    ) -> Result<(), ModelError> {
        self.rope(q, n_heads, head_dim, positions, inv_freq, style, mscale)?;
        self.rope(k, n_kv_heads, head_dim, positions, inv_freq, style, mscale)
    }
    /// Before rotary: every cache whose policy scores by the queries to come (expected
    /// attention, [`SequencePolicy::wants_query_moments`]) adds these rows' query heads to
    /// `layer`'s moments; rows map to caches as in [`attend`](Self::attend). `inv_freq`, `style`
    /// and `mscale` are the layer's rotary embedding and `scale` its logit scale, which the
    /// model of the queries needs at the prompt's end.
    #[allow(clippy::too_many_arguments)]
    fn observe_queries(
        &self,
        layer: usize,
        q: &Self::Act,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &Self::Vector,
        style: RopeStyle,
        mscale: f32,
        scale: f32,
        caches: &mut [&mut Self::Cache],
    ) -> Result<(), ModelError>;
    /// SwiGLU: `gate = silu(gate) * up`.
    fn silu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<(), ModelError>;
    /// GeGLU: `gate = gelu_tanh(gate) * up`.
    fn gelu_mul(&self, gate: &mut Self::Act, up: &Self::Act) -> Result<(), ModelError>;
    /// `x = gelu_tanh(x)`.
    fn gelu(&self, x: &mut Self::Act) -> Result<(), ModelError>;
    /// `x = gelu(x)`, exact: `x Phi(x)` with the normal distribution's `Phi`.
    fn gelu_erf(&self, x: &mut Self::Act) -> Result<(), ModelError>;
    /// Every value into `[-limit, limit]` (MPT's `clip_qkv` on Q, K and V).
    fn clamp(&self, x: &mut Self::Act, limit: f32) -> Result<(), ModelError>;
    /// `x += y`.
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<(), ModelError>;
    /// Sum `x` over the devices of a tensor-parallel group, every device left with the sum
    /// (the partial products of the attention output and down projections of a shard). A
    /// backend alone on its model has nothing to add.
    fn all_reduce(&self, _x: &mut Self::Act) -> Result<(), ModelError> {
        Ok(())
    }
    /// One layer's attention with its KV cache: the rows' keys and values join their caches
    /// (one cache: every row is its next token; several: row i joins cache i), attention runs
    /// over what each cache holds, each policy gets its scores and evicts as it must. `out`
    /// gets the rows' attention outputs (`n_heads * head_dim` each).
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        shape: AttentionSpec,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        positions: &[u32],
        caches: &mut [&mut Self::Cache],
        out: &mut Self::Act,
    ) -> Result<(), ModelError>;
    /// An empty cache for one sequence under `policy`; `context` bounds it when the policy
    /// keeps everything (a backend may allocate all of it at once).
    fn new_cache(
        &self,
        shape: CacheShape,
        kv_type: KvType,
        policy: SequencePolicy,
        context: usize,
    ) -> Result<Self::Cache, ModelError>;
    /// The prompt has gone through the model: compress the cache to the policy's budget.
    fn finish_prompt(&self, cache: &mut Self::Cache) -> Result<(), ModelError>;
    /// Whether this backend trims a prompt chunk by chunk ([`trim_prompt_chunk`](Self::trim_prompt_chunk)).
    fn trims_prompt_chunks(&self) -> bool {
        false
    }
    /// A prompt chunk has gone through and more follows: trim the cache to the policy's budget;
    /// the next chunk ends at prompt position `next_end`.
    fn trim_prompt_chunk(&self, cache: &mut Self::Cache, next_end: usize) -> Result<(), ModelError> {
        let _ = (cache, next_end);
        Err(ModelError::Input(
            "this device does not trim a prompt chunk by chunk (--prefill-chunk): use the CPU".into(),
        ))
    }
    /// More prompt tokens (`extra`) follow a processed prompt, then `steps` decode steps: the
    /// cache scores them as a prompt again and makes room for them.
    fn reopen_prompt(&self, cache: &mut Self::Cache, extra: usize, steps: usize) -> Result<(), ModelError> {
        let _ = (cache, extra, steps);
        Err(ModelError::Input("this device does not continue a processed prompt: use the CPU".into()))
    }
    /// Whether [`snapshot`](Self::snapshot) gives copies.
    fn snapshot_supported(&self) -> bool {
        false
    }
    /// A copy of a cache in the middle of its prompt, kept to start later sequences whose
    /// prompts begin alike; `None` where this backend does not copy caches (nothing is reused).
    fn snapshot(&self, cache: &Self::Cache) -> Option<Self::Cache> {
        let _ = cache;
        None
    }
    /// A [`snapshot`](Self::snapshot) goes on as the prompt of a sequence of `prompt_len`
    /// tokens and `steps` steps (context: the model's).
    fn resume_snapshot(&self, cache: &mut Self::Cache, prompt_len: usize, steps: usize, context: usize) {
        let _ = (cache, prompt_len, steps, context);
        unreachable!("a backend without snapshots has none to resume")
    }
    /// A decode step has gone through the model (the policy's schedule moves on).
    fn end_step(&self, cache: &mut Self::Cache);
    /// The prompt `tokens` (the cache's last positions) has gone through the model and its end
    /// comes next: a policy that scores the prompt by another read of it (KVzip's repetition)
    /// does that here. Nothing by default (a backend without such policies refuses them when
    /// their cache is made).
    fn before_prompt_end(
        &self,
        model: &crate::models::decoder::Model<Self>,
        tokens: &[u32],
        cache: &mut Self::Cache,
    ) -> Result<(), ModelError>
    where
        Self: Sized,
    {
        let _ = (model, tokens, cache);
        Ok(())
    }
    /// Run a batch of decode steps (token i joins cache i) the backend's own way, e.g. replayed
    /// as a recorded graph, and say whether it did: `Ok(false)` leaves the step to the model's
    /// op-by-op forward pass. The result must equal that pass's.
    fn replay_decode_step(
        &self,
        model: &crate::models::decoder::Model<Self>,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
        out: &mut crate::models::decoder::Out<'_>,
    ) -> Result<bool, ModelError>
    where
        Self: Sized,
    {
        let _ = (model, tokens, caches, out);
        Ok(false)
    }
    /// Prompt tokens per forward pass (bounds a long prompt's activation memory).
    fn prefill_chunk(&self) -> usize;
    /// A sliding-window layer's cache (`CacheShape::windows`) holds only its window once the
    /// prompt is processed, whatever the policy; whether it also drops what left the window
    /// during the prompt (chunk by chunk) or holds the whole prompt until its end.
    fn trims_windows_during_prompt(&self) -> bool;
    /// Run `f` with this backend's forward-pass buffers (kept between calls, so a decode step
    /// allocates nothing of the model's size).
    fn with_buffers<R>(&self, f: impl FnOnce(&mut ForwardBuffers<Self::Act>) -> R) -> R;
}

/// The activations of one forward pass.
#[derive(Default)]
pub struct ForwardBuffers<A> {
    pub positions: Vec<u32>,
    pub x: A,
    pub normed: A,
    pub q: A,
    pub k: A,
    pub v: A,
    pub attn: A,
    pub proj: A,
    pub gate: A,
    pub up: A,
}

#[cfg(test)]
mod tests {
    use super::AttentionSpec;

    #[test]
    fn alibi_slopes_are_mpts() {
        // Hand-computed from transformers' build_mpt_alibi_tensor: 4 heads, max bias 8:
        // 2^-2, 2^-4, 2^-6, 2^-8; 6 heads (8 rounded): the even-indexed of 2^-1..2^-8, then
        // the odd-indexed, cut to 6.
        let spec = |n| AttentionSpec { alibi: Some(8.0), ..AttentionSpec::causal(n, n, 16) };
        let slopes = |n| (0..n).map(|h| spec(n).alibi_slope(h).log2()).collect::<Vec<f32>>();
        assert_eq!(slopes(4), vec![-2.0, -4.0, -6.0, -8.0]);
        assert_eq!(slopes(6), vec![-2.0, -4.0, -6.0, -8.0, -1.0, -3.0]);
        assert_eq!(AttentionSpec::causal(4, 4, 16).alibi_slope(1), 0.0, "no ALiBi, no slope");
    }
}

//! A decoder described by its configuration: what each family does differently, read from the
//! GGUF metadata and the tensors present, so that one forward pass ([`super::decoder`]) runs
//! every family. A family is a [`Family`] row (what its files do not say: rotary layout, MLP
//! kind, which layers slide), the rest comes from `<arch>.*` keys and from which optional
//! tensors the file has (biases, Q/K norms, sandwich norms).

use crate::backend::RopeStyle;
use crate::gguf::{GgufError, GgufFile};
use crate::ModelError;

/// How a block normalises its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `x / rms(x) * w` (Llama, Qwen, Gemma; Gemma's files store `1 + w`).
    Rms,
    /// `(x - mean) / std * w (+ b)`.
    Layer,
}

/// The MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FfnKind {
    /// `down(silu(gate x) * up x)`.
    SwiGlu,
    /// `down(gelu_tanh(gate x) * up x)` (Gemma).
    GeGlu,
    /// `down(gelu_tanh(up x + b) + b)` (GPT-2's "gelu_new", GPT-J).
    Gelu,
    /// The same with the exact GELU, `x Phi(x)` (GPT-NeoX / Pythia, MPT).
    GeluErf,
}

/// How a token's position enters the model.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum PositionKind {
    /// Rotary embeddings of queries and keys ([`ModelConfig::ropes`]).
    Rotary,
    /// A learned embedding per position added to the token's at the input (GPT-2,
    /// Cerebras-GPT); a kept token keeps the embedding of its original position.
    Learned,
    /// ALiBi (MPT): `slope_h * (key position - query position)` added to the attention
    /// logits, from the tokens' original positions, so an eviction shifts no one's bias.
    Alibi { max_bias: f32 },
}

/// Which layers attend over a sliding window instead of the whole sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlidingLayers {
    /// None (a window in the metadata is ignored, as llama.cpp does for these families).
    None,
    /// Every layer, when the file declares a window (Phi-3).
    All,
    /// Every layer but each `n`-th, counting from 1 (Gemma 2: n = 2, layers 0, 2, 4...
    /// slide; Gemma 3: n = 6, five local layers then a global one).
    AllButEvery(usize),
}

/// What a family's files leave to the reader (llama.cpp's per-architecture code knows the same).
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub architecture: &'static str,
    pub rope_style: RopeStyle,
    pub ffn: FfnKind,
    pub norm: NormKind,
    /// The token embedding is multiplied by sqrt(n_embd) (Gemma).
    pub scale_embeddings: bool,
    pub sliding: SlidingLayers,
    /// RoPE base of the sliding layers when the file does not say (Gemma 3: 10,000).
    pub local_rope_base: Option<f32>,
    pub positions: PositionKind,
    /// Attention and MLP both read the block's input and add to it together (GPT-NeoX by
    /// default, `<arch>.use_parallel_residual` says; GPT-J always).
    pub parallel_residual: bool,
}

impl Family {
    /// Whether layer `l` attends over the sliding window (when the file declares one).
    pub fn slides(&self, l: usize) -> bool {
        match self.sliding {
            SlidingLayers::None => false,
            SlidingLayers::All => true,
            SlidingLayers::AllButEvery(n) => (l + 1) % n != 0,
        }
    }
}

const fn family(architecture: &'static str, rope_style: RopeStyle, ffn: FfnKind) -> Family {
    Family {
        architecture,
        rope_style,
        ffn,
        norm: NormKind::Rms,
        scale_embeddings: false,
        sliding: SlidingLayers::None,
        local_rope_base: None,
        positions: PositionKind::Rotary,
        parallel_residual: false,
    }
}

/// The families this engine runs. Llama files (and Mistral's, which the converter writes as
/// `llama`) have Q/K rows permuted so that adjacent pairs rotate; the others rotate halves.
pub const FAMILIES: &[Family] = &[
    family("llama", RopeStyle::AdjacentPairs, FfnKind::SwiGlu),
    family("mistral", RopeStyle::AdjacentPairs, FfnKind::SwiGlu),
    family("qwen2", RopeStyle::Halves, FfnKind::SwiGlu),
    family("qwen3", RopeStyle::Halves, FfnKind::SwiGlu),
    Family {
        scale_embeddings: true,
        sliding: SlidingLayers::AllButEvery(2),
        ..family("gemma2", RopeStyle::Halves, FfnKind::GeGlu)
    },
    Family {
        scale_embeddings: true,
        sliding: SlidingLayers::AllButEvery(6),
        local_rope_base: Some(10_000.0),
        ..family("gemma3", RopeStyle::Halves, FfnKind::GeGlu)
    },
    Family { sliding: SlidingLayers::All, ..family("phi3", RopeStyle::Halves, FfnKind::SwiGlu) },
    // The paper's families (GPT-J comes only from Hugging Face folders: llama.cpp's converter
    // does not write it).
    Family {
        norm: NormKind::Layer,
        parallel_residual: true,
        ..family("gptj", RopeStyle::AdjacentPairs, FfnKind::Gelu)
    },
    Family { norm: NormKind::Layer, parallel_residual: true, ..family("gptneox", RopeStyle::Halves, FfnKind::GeluErf) },
    Family {
        norm: NormKind::Layer,
        positions: PositionKind::Learned,
        ..family("gpt2", RopeStyle::Halves, FfnKind::Gelu)
    },
    Family {
        norm: NormKind::Layer,
        positions: PositionKind::Alibi { max_bias: 8.0 },
        ..family("mpt", RopeStyle::Halves, FfnKind::GeluErf)
    },
];

/// The `general.architecture` values that load.
pub fn supported_architectures() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.architecture).collect()
}

/// How RoPE's frequencies are stretched for contexts past the trained one.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every frequency divided by it).
    Linear {
        factor: f32,
    },
    /// Per-frequency divisors from the file (`rope_freqs.weight`: Llama 3.1's schedule, which
    /// the converter computes; Phi-3's short factors).
    Factors,
    /// Phi-3's LongRoPE: per-frequency divisors from the file, cos and sin scaled by
    /// `attn_factor`. The long factors (`rope_factors_long.weight`) are used when the model's
    /// context length is past the original one, as llama.cpp does with a full-size context;
    /// transformers switches per sequence length instead (short factors up to the original
    /// context), so short prompts on a 128k model differ from transformers there.
    LongRope {
        original_context: usize,
        attn_factor: f32,
    },
    /// YaRN (Peng et al. 2023), as transformers computes it: frequencies blended between
    /// interpolated and original by a ramp over the dimensions, cos and sin scaled by
    /// `0.1 ln(factor) + 1`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
    },
}

/// One rotary embedding: the frequencies of its rotated pairs and how they are laid out.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    pub style: RopeStyle,
    /// Rotated dimensions of each head (the rest pass through).
    pub dim: usize,
    pub theta: f32,
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// The tensor of per-frequency divisors this scaling reads, if any (`context`: the
    /// model's context length).
    pub fn factors_tensor(&self, context: usize) -> Option<&'static str> {
        match self.scaling {
            RopeScaling::Factors => Some("rope_freqs.weight"),
            RopeScaling::LongRope { original_context, .. } if context > original_context => {
                Some("rope_factors_long.weight")
            }
            RopeScaling::LongRope { .. } => Some("rope_factors_short.weight"),
            _ => None,
        }
    }

    /// theta_i = base^(-2i/dim), stretched by the scaling; `factors` are the file's per-pair
    /// divisors. Returns the frequencies and the factor on cos and sin.
    pub fn frequencies(&self, factors: Option<&[f32]>) -> (Vec<f32>, f32) {
        let d = self.dim;
        let base: Vec<f32> = (0..d / 2).map(|i| self.theta.powf(-2.0 * i as f32 / d as f32)).collect();
        match self.scaling {
            RopeScaling::None => (base, 1.0),
            RopeScaling::Linear { factor } => (base.iter().map(|f| f / factor).collect(), 1.0),
            RopeScaling::Factors | RopeScaling::LongRope { .. } => {
                let mut f = base;
                if let Some(k) = factors {
                    f.iter_mut().zip(k).for_each(|(f, k)| *f /= k);
                }
                let mscale = match self.scaling {
                    RopeScaling::LongRope { attn_factor, .. } => attn_factor,
                    _ => 1.0,
                };
                (f, mscale)
            }
            RopeScaling::Yarn { factor, original_context, beta_fast, beta_slow } => {
                // The dimension whose wavelength fits `rotations` times in the original context.
                let correction = |rotations: f32| {
                    d as f32 * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * self.theta.ln())
                };
                let low = correction(beta_fast).floor().max(0.0);
                let high = correction(beta_slow).ceil().min(d as f32 - 1.0);
                let span = if high == low { high - low + 0.001 } else { high - low };
                let f = base
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| {
                        let ramp = ((i as f32 - low) / span).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        (b / factor) * (1.0 - extrapolate) + b * extrapolate
                    })
                    .collect();
                let mscale = if factor <= 1.0 { 1.0 } else { 0.1 * factor.ln() + 1.0 };
                (f, mscale)
            }
        }
    }
}

/// The attention of one layer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerAttention {
    /// Tokens a query sees back (itself included); `None`: the whole sequence.
    pub window: Option<usize>,
    /// Index into [`ModelConfig::ropes`].
    pub rope: usize,
}

/// Hyper-parameters of a decoder, from the GGUF metadata (`<arch>.*` keys) and its family.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub norm: NormKind,
    pub norm_eps: f32,
    pub ffn: FfnKind,
    /// The model's rotary embeddings: `[global]` or `[global, local]` (Gemma 3's sliding
    /// layers have their own base).
    pub ropes: Vec<RopeConfig>,
    pub layers: Vec<LayerAttention>,
    /// Multiplies q.k (1/sqrt(head_dim) unless the file says otherwise).
    pub attention_scale: f32,
    /// Attention logits become `cap * tanh(logit / cap)` (Gemma 2).
    pub attention_softcap: Option<f32>,
    /// Output logits likewise.
    pub final_softcap: Option<f32>,
    /// The token embedding is multiplied by this (Gemma: sqrt(n_embd)).
    pub embedding_scale: Option<f32>,
    pub positions: PositionKind,
    pub parallel_residual: bool,
    /// Q, K and V clipped into `[-c, c]` after their projection (MPT's `clip_qkv`).
    pub clamp_kqv: Option<f32>,
}

impl ModelConfig {
    /// Shapes the forward pass can run.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |s: String| Err(ModelError::Invalid(s));
        if self.n_layers == 0 || self.n_embd == 0 || self.head_dim == 0 || self.vocab_size == 0 || self.n_ff == 0 {
            return bad(format!(
                "{} layers, {} embedding, {} head size, {} vocabulary, {} feed-forward: all must be at least 1",
                self.n_layers, self.n_embd, self.head_dim, self.vocab_size, self.n_ff
            ));
        }
        if !(2..=Self::MAX_CONTEXT).contains(&self.context_length) {
            return bad(format!("a context length of {} (2 to {} supported)", self.context_length, Self::MAX_CONTEXT));
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("{} query heads cannot be grouped over {} KV heads", self.n_heads, self.n_kv_heads));
        }
        for r in &self.ropes {
            if r.dim % 2 != 0 || r.dim > self.head_dim {
                return bad(format!("rope dimension {} for head size {}", r.dim, self.head_dim));
            }
            if !(r.theta.is_finite() && r.theta > 0.0) {
                return bad(format!("rope base {}", r.theta));
            }
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return bad(format!("norm epsilon {}", self.norm_eps));
        }
        if let Some(c) = self.clamp_kqv.filter(|c| !(c.is_finite() && *c > 0.0)) {
            return bad(format!("a Q/K/V clamp of {c}"));
        }
        for (what, v) in [("attention", self.attention_softcap), ("final", self.final_softcap)] {
            if v.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
                return bad(format!("{what} soft-cap {v:?}"));
            }
        }
        if self.layers.len() != self.n_layers || self.layers.iter().any(|l| l.rope >= self.ropes.len()) {
            return bad("layer descriptions do not match the layer count".into());
        }
        if let Some(w) = self.layers.iter().find_map(|l| l.window.filter(|&w| w < 2)) {
            return bad(format!("a sliding window of {w} tokens (at least 2: a query and one before it)"));
        }
        for r in &self.ropes {
            let factor = match r.scaling {
                RopeScaling::Linear { factor } | RopeScaling::Yarn { factor, .. } => factor,
                RopeScaling::LongRope { attn_factor, .. } => attn_factor,
                _ => 1.0,
            };
            if !(factor.is_finite() && factor > 0.0) {
                return bad(format!("rope scaling factor {factor}"));
            }
        }
        Ok(())
    }

    /// The family row of `arch`, or an error naming the supported ones.
    pub fn family(arch: &str) -> Result<&'static Family, ModelError> {
        FAMILIES.iter().find(|f| f.architecture == arch).ok_or_else(|| ModelError::UnsupportedArchitecture(arch.into()))
    }

    /// Read the configuration of a file of family `arch` (its tensors' names select the
    /// per-frequency RoPE factors).
    pub fn from_gguf(f: &GgufFile, arch: &str) -> Result<Self, ModelError> {
        let fam = Self::family(arch)?;
        let k = |s: &str| format!("{arch}.{s}");
        let opt_f32 = |key: &str| -> Result<Option<f32>, GgufError> {
            match f.get(&k(key)) {
                None => Ok(None),
                Some(_) => f.get_f32(&k(key)).map(Some),
            }
        };
        let opt_usize = |key: &str| -> Result<Option<usize>, GgufError> {
            match f.get(&k(key)) {
                None => Ok(None),
                Some(_) => f.get_usize(&k(key)).map(Some),
            }
        };
        let n_embd = f.get_usize(&k("embedding_length"))?;
        let n_heads = f.get_usize(&k("attention.head_count"))?;
        let n_kv_heads = opt_usize("attention.head_count_kv")?.unwrap_or(n_heads);
        let head_dim = opt_usize("attention.key_length")?.unwrap_or(n_embd / n_heads.max(1));
        if let Some(v) = opt_usize("attention.value_length")? {
            if v != head_dim {
                return Err(ModelError::Invalid(format!("value heads of {v} for key heads of {head_dim}")));
            }
        }
        let vocab_size = match opt_usize("vocab_size")? {
            Some(v) => v,
            None => f.get_array("tokenizer.ggml.tokens")?.len(),
        };
        let n_layers = f.get_usize(&k("block_count"))?;
        // The block count must match the blocks the file holds, checked before anything is
        // sized by it (a corrupt count of 2^31 would otherwise allocate terabytes).
        let blocks_present = f
            .tensors
            .iter()
            .filter_map(|t| t.name.strip_prefix("blk.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |last| last + 1);
        if n_layers == 0 || n_layers != blocks_present {
            return Err(ModelError::Invalid(format!(
                "{arch}.block_count is {n_layers} but the file holds tensors for {blocks_present} blocks"
            )));
        }
        let (norm, norm_eps) = match opt_f32("attention.layer_norm_rms_epsilon")? {
            Some(e) => (NormKind::Rms, e),
            None => match opt_f32("attention.layer_norm_epsilon")? {
                Some(e) => (NormKind::Layer, e),
                None => (fam.norm, 1e-5),
            },
        };
        let theta = opt_f32("rope.freq_base")?.unwrap_or(10_000.0);
        // Learned positions and ALiBi rotate nothing: a rope of no dimensions.
        let rope_dim = match fam.positions {
            PositionKind::Rotary => opt_usize("rope.dimension_count")?.unwrap_or(head_dim),
            _ => 0,
        };
        let positions = match fam.positions {
            PositionKind::Alibi { max_bias } => {
                PositionKind::Alibi { max_bias: opt_f32("attention.max_alibi_bias")?.unwrap_or(max_bias) }
            }
            p => p,
        };
        // 0 means none (llama.cpp's reading); NaN is kept for `validate` to refuse.
        let clamp_kqv = opt_f32("attention.clamp_kqv")?.filter(|&c| c != 0.0);
        let parallel_residual = match f.get(&k("use_parallel_residual")) {
            Some(v) => {
                v.as_bool().ok_or_else(|| GgufError::WrongType { key: k("use_parallel_residual"), expected: "bool" })?
            }
            None => fam.parallel_residual,
        };
        let scaling_type = match f.get(&k("rope.scaling.type")) {
            Some(_) => f.get_str(&k("rope.scaling.type"))?.to_string(),
            None => "none".into(),
        };
        let factor = opt_f32("rope.scaling.factor")?;
        let scaling = match scaling_type.as_str() {
            _ if f.tensor_info("rope_freqs.weight").is_some() => RopeScaling::Factors,
            _ if f.tensor_info("rope_factors_long.weight").is_some() => RopeScaling::LongRope {
                original_context: opt_usize("rope.scaling.original_context_length")?
                    .unwrap_or(f.get_usize(&k("context_length"))?),
                attn_factor: opt_f32("rope.scaling.attn_factor")?.unwrap_or(1.0),
            },
            "none" => RopeScaling::None,
            "linear" => match factor {
                Some(f) if f > 0.0 && f != 1.0 => RopeScaling::Linear { factor: f },
                _ => RopeScaling::None,
            },
            "yarn" => RopeScaling::Yarn {
                factor: factor.unwrap_or(1.0),
                original_context: opt_usize("rope.scaling.original_context_length")?
                    .unwrap_or(f.get_usize(&k("context_length"))?),
                beta_fast: opt_f32("rope.scaling.yarn_beta_fast")?.unwrap_or(32.0),
                beta_slow: opt_f32("rope.scaling.yarn_beta_slow")?.unwrap_or(1.0),
            },
            other => return Err(ModelError::Invalid(format!("unsupported rope scaling '{other}'"))),
        };
        // A Hugging Face folder's Llama keeps its Q/K rows unpermuted, so it rotates halves.
        let style = match f.get("keyformer.rope_layout") {
            None => fam.rope_style,
            Some(_) => match f.get_str("keyformer.rope_layout")? {
                "halves" => RopeStyle::Halves,
                "pairs" => RopeStyle::AdjacentPairs,
                other => return Err(ModelError::Invalid(format!("keyformer.rope_layout '{other}'"))),
            },
        };
        // A folder's config names its GELU; a GGUF file leaves it to the family.
        let ffn = match (fam.ffn, f.get("keyformer.activation")) {
            (FfnKind::Gelu | FfnKind::GeluErf, Some(_)) => match f.get_str("keyformer.activation")? {
                "gelu_tanh" => FfnKind::Gelu,
                "gelu_erf" => FfnKind::GeluErf,
                other => return Err(ModelError::Invalid(format!("keyformer.activation '{other}'"))),
            },
            (ffn, _) => ffn,
        };
        let global = RopeConfig { style, dim: rope_dim, theta, scaling };
        let mut ropes = vec![global.clone()];
        let window = opt_usize("attention.sliding_window")?.filter(|&w| w > 0);
        let sliding = |l: usize| window.is_some() && fam.slides(l);
        let local_rope = match (opt_f32("rope.freq_base_swa")?.or(fam.local_rope_base), window) {
            (Some(base), Some(_)) => {
                // Local layers rotate unscaled (llama.cpp and transformers agree for Gemma 3).
                ropes.push(RopeConfig { theta: base, scaling: RopeScaling::None, ..global });
                1
            }
            _ => 0,
        };
        let layers = (0..n_layers)
            .map(|l| {
                if sliding(l) {
                    LayerAttention { window, rope: local_rope }
                } else {
                    LayerAttention { window: None, rope: 0 }
                }
            })
            .collect();
        let attention_scale = match opt_f32("attention.scale")? {
            Some(s) if s > 0.0 => s,
            // Gemma 2/3 27B scale queries by 1/sqrt(n_embd / n_head) (their
            // query_pre_attn_scalar, which no GGUF key carries; llama.cpp knows them by their
            // layer count, 46 and 62, as this does).
            _ if (arch == "gemma2" && n_layers == 46) || (arch == "gemma3" && n_layers == 62) => {
                1.0 / (n_embd as f32 / n_heads as f32).sqrt()
            }
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        Ok(Self {
            architecture: arch.to_string(),
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff: f.get_usize(&k("feed_forward_length"))?,
            vocab_size,
            context_length: f.get_usize(&k("context_length"))?,
            norm,
            norm_eps,
            ffn,
            ropes,
            layers,
            attention_scale,
            // 0 means none; NaN is kept for `validate` to refuse.
            attention_softcap: opt_f32("attn_logit_softcapping")?.filter(|&c| c > 0.0 || c.is_nan()),
            final_softcap: opt_f32("final_logit_softcapping")?.filter(|&c| c > 0.0 || c.is_nan()),
            embedding_scale: fam.scale_embeddings.then(|| (n_embd as f32).sqrt()),
            positions,
            parallel_residual,
            clamp_kqv,
        })
    }

    /// The longest context a file may declare: caches reserve (not touch) their context's
    /// slots, so an absurd length must be refused, not reserved.
    pub const MAX_CONTEXT: usize = 1 << 24;

    /// A plain Llama configuration (random-weight shapes).
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        n_layers: usize,
        n_embd: usize,
        n_heads: usize,
        n_kv_heads: usize,
        n_ff: usize,
        vocab_size: usize,
        context_length: usize,
        rope_theta: f32,
    ) -> Self {
        let head_dim = n_embd / n_heads;
        Self {
            architecture: "llama".into(),
            n_layers,
            n_embd,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff,
            vocab_size,
            context_length,
            norm: NormKind::Rms,
            norm_eps: 1e-5,
            ffn: FfnKind::SwiGlu,
            ropes: vec![RopeConfig {
                style: RopeStyle::AdjacentPairs,
                dim: head_dim,
                theta: rope_theta,
                scaling: RopeScaling::None,
            }],
            layers: vec![LayerAttention { window: None, rope: 0 }; n_layers],
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            attention_softcap: None,
            final_softcap: None,
            embedding_scale: None,
            positions: PositionKind::Rotary,
            parallel_residual: false,
            clamp_kqv: None,
        }
    }

    /// Whether any layer attends over a sliding window.
    pub fn has_sliding_layers(&self) -> bool {
        self.layers.iter().any(|l| l.window.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let r = RopeConfig {
            style: RopeStyle::Halves,
            dim: 64,
            theta: 10_000.0,
            scaling: RopeScaling::Yarn { factor: 4.0, original_context: 4096, beta_fast: 32.0, beta_slow: 1.0 },
        };
        let (f, mscale) = r.frequencies(None);
        let (plain, _) = RopeConfig { scaling: RopeScaling::None, ..r.clone() }.frequencies(None);
        // Hand-computed ramp bounds: low = floor(64 ln(4096 / (32 * 2 pi)) / (2 ln 10000)) =
        // floor(10.47) = 10, high = ceil(64 ln(4096 / (2 pi)) / (2 ln 10000)) = ceil(22.51) = 23.
        for i in 0..=10 {
            assert_eq!(f[i], plain[i], "dimension pair {i} extrapolates");
        }
        for i in 23..32 {
            assert!((f[i] - plain[i] / 4.0).abs() <= 1e-7 * plain[i], "dimension pair {i} interpolates");
        }
        let (mid, ramp) = (17, 7.0 / 13.0); // ramp (17 - 10) / (23 - 10)
        assert!((f[mid] - (plain[mid] / 4.0 * ramp + plain[mid] * (1.0 - ramp))).abs() < 1e-6 * plain[mid]);
        assert!((mscale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-7);
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let r = RopeConfig {
            style: RopeStyle::AdjacentPairs,
            dim: 8,
            theta: 100.0,
            scaling: RopeScaling::Linear { factor: 2.0 },
        };
        let (f, m) = r.frequencies(None);
        assert_eq!(m, 1.0);
        for (i, v) in f.iter().enumerate() {
            assert!((v - 100f32.powf(-2.0 * i as f32 / 8.0) / 2.0).abs() < 1e-7);
        }
    }
}

//! Random Llama weights at real shapes (`--random-weights llama2-7b`), so that speed can be
//! measured without downloading a model, and at tiny shapes for CPU-against-GPU parity.
//!
//! Element `i` of tensor `t` is a pure function of (seed, t, i) ([`value`]), so the CPU (a GGUF
//! file written by [`write_gguf`]) and the GPU (a fill kernel that computes the same function)
//! hold the same f16 weights without copying 13 GB. Linear weights are uniform in
//! `±sqrt(3 / fan_in)` (unit variance out for unit variance in) and norm weights are 1, so
//! activations stay finite over every layer.

use std::io::Write;
use std::path::Path;

use half::f16;

use crate::quant::GgmlType;
use crate::ModelError;

/// The names of [`QUANTISED_TYPES`], for messages.
pub fn quantised_type_names() -> String {
    QUANTISED_TYPES.iter().map(|t| t.name().to_lowercase()).collect::<Vec<_>>().join(", ")
}

/// Whether random weights can be of type `t`: F16 or one of [`QUANTISED_TYPES`].
pub fn check_weight_type(t: GgmlType) -> Result<(), ModelError> {
    if t == GgmlType::F16 || QUANTISED_TYPES.contains(&t) {
        return Ok(());
    }
    Err(ModelError::Input(format!("weight type '{}': f16 or {}", t.name().to_lowercase(), quantised_type_names())))
}

/// A random weights' type by name (`f16`, `q4_k`, ...): see [`check_weight_type`].
pub fn weight_type_by_name(name: &str) -> Result<GgmlType, ModelError> {
    let t = GgmlType::from_name(name)
        .ok_or_else(|| ModelError::Input(format!("weight type '{name}': f16 or {}", quantised_type_names())))?;
    check_weight_type(t)?;
    Ok(t)
}

/// A model shape with no weights.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RandomShape {
    pub name: &'static str,
    /// The family it is described as (`models::config::FAMILIES`).
    pub family: &'static str,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    /// Sliding window of the family's sliding layers (0: none).
    pub window: usize,
    /// Rotated dimensions of each head (0: all of them; GPT-J rotates 64 of 256).
    pub rope_dim: usize,
}

const fn llama_shape(
    name: &'static str,
    n_layers: usize,
    n_embd: usize,
    n_heads: usize,
    n_kv_heads: usize,
    n_ff: usize,
    vocab_size: usize,
    rope_theta: f32,
) -> RandomShape {
    RandomShape {
        name,
        family: "llama",
        n_layers,
        n_embd,
        n_heads,
        n_kv_heads,
        head_dim: n_embd / n_heads,
        n_ff,
        vocab_size,
        context_length: 8192,
        rope_theta,
        window: 0,
        rope_dim: 0,
    }
}

/// The shapes `--random-weights` knows. Contexts are 8192 so that the paper's 4096 + 4096
/// runs at every shape (Llama 2's own is 4096, the paper's GPT-J, MPT and Cerebras-GPT 2048;
/// with random weights it changes nothing measured, and ALiBi has no trained length).
/// The family shapes carry their family's pieces (Qwen2's Q/K/V biases, Gemma 2's sandwich
/// norms, soft-caps and sliding layers, Phi-3's head size of 96, GPT-J's partial rotary and
/// single norm, MPT's ALiBi, Cerebras-GPT's learned positions, LayerNorm and GELU MLPs).
pub const SHAPES: [RandomShape; 19] = [
    llama_shape("llama2-7b", 32, 4096, 32, 32, 11008, 32000, 10_000.0),
    // 140 GB in f16: split over GPUs (`bench --device cuda -tp 2`).
    llama_shape("llama2-70b", 80, 8192, 64, 8, 28672, 32000, 10_000.0),
    llama_shape("llama3-8b", 32, 4096, 32, 8, 14336, 128256, 500_000.0),
    llama_shape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 100_000.0),
    // Mistral 7B v0.1 (its files are written as `llama`; llama.cpp ignores its window).
    llama_shape("mistral-7b", 32, 4096, 32, 8, 14336, 32000, 10_000.0),
    RandomShape { family: "qwen2", ..llama_shape("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, 1_000_000.0) },
    RandomShape { family: "phi3", ..llama_shape("phi3-mini", 32, 3072, 32, 32, 8192, 32064, 10_000.0) },
    RandomShape {
        family: "gemma2",
        head_dim: 256,
        window: 4096,
        ..llama_shape("gemma2-9b", 42, 3584, 16, 8, 14336, 256000, 10_000.0)
    },
    RandomShape {
        family: "gemma3",
        head_dim: 256,
        window: 1024,
        ..llama_shape("gemma3-12b", 48, 3840, 16, 8, 15360, 262208, 1_000_000.0)
    },
    // The paper's models (Keyformer, MLSys 2024, Table 1 and Figures 6-8).
    RandomShape {
        family: "gptj",
        head_dim: 256,
        rope_dim: 64,
        ..llama_shape("gptj-6b", 28, 4096, 16, 16, 16384, 50400, 10_000.0)
    },
    RandomShape { family: "mpt", ..llama_shape("mpt-7b", 32, 4096, 32, 32, 16384, 50432, 10_000.0) },
    RandomShape { family: "gpt2", ..llama_shape("cerebras-gpt-6.7b", 32, 4096, 32, 32, 16384, 50257, 10_000.0) },
    // Parity tests: GQA (2 query heads per KV head), two layers; and a Qwen2 one with biases.
    RandomShape { context_length: 4096, ..llama_shape("tiny", 2, 256, 4, 2, 512, 1000, 10_000.0) },
    RandomShape { family: "qwen2", context_length: 4096, ..llama_shape("tiny-qwen2", 2, 256, 4, 2, 512, 1000, 1e6) },
    // Gemma 2's pieces with its head size of 256 (the GPU's second attention entry points).
    RandomShape {
        family: "gemma2",
        head_dim: 256,
        window: 64,
        context_length: 4096,
        ..llama_shape("tiny-gemma2", 2, 256, 2, 1, 512, 1000, 10_000.0)
    },
    // Gemma 3's: Q/K norms, five local layers with their own rope base, then a global one.
    RandomShape {
        family: "gemma3",
        head_dim: 256,
        window: 64,
        context_length: 4096,
        ..llama_shape("tiny-gemma3", 6, 256, 2, 1, 512, 1000, 1_000_000.0)
    },
    // The paper's families small: CPU against GPU.
    RandomShape {
        family: "gptj",
        head_dim: 64,
        rope_dim: 16,
        context_length: 4096,
        ..llama_shape("tiny-gptj", 2, 256, 4, 4, 1024, 1000, 10_000.0)
    },
    RandomShape { family: "mpt", context_length: 4096, ..llama_shape("tiny-mpt", 2, 256, 4, 4, 1024, 1000, 10_000.0) },
    RandomShape {
        family: "gpt2",
        context_length: 4096,
        ..llama_shape("tiny-gpt2", 2, 256, 4, 4, 1024, 1000, 10_000.0)
    },
];

impl RandomShape {
    pub fn by_name(name: &str) -> Result<Self, ModelError> {
        SHAPES.iter().find(|s| s.name == name).copied().ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|s| s.name).collect();
            ModelError::Input(format!("unknown model shape '{name}' (known: {})", names.join(", ")))
        })
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    fn family_row(&self) -> &'static crate::models::config::Family {
        crate::models::config::ModelConfig::family(self.family).expect("a known family")
    }
    /// Whether the MLP has a gate (SwiGLU, GeGLU) or is a plain GELU MLP.
    fn gated(&self) -> bool {
        use crate::models::config::FfnKind;
        matches!(self.family_row().ffn, FfnKind::SwiGlu | FfnKind::GeGlu)
    }
    /// Every matrix as (GGUF name, rows, cols, tensor number for [`value`]), in file order.
    pub fn matrices(&self) -> Vec<(String, usize, usize, u32)> {
        let (d, hd, ff) = (self.n_embd, self.head_dim(), self.n_ff);
        let mut m = vec![
            ("token_embd.weight".to_string(), self.vocab_size, d, 0),
            ("output.weight".to_string(), self.vocab_size, d, 1),
        ];
        if self.family_row().positions == crate::models::config::PositionKind::Learned {
            m.push(("position_embd.weight".to_string(), self.context_length, d, 2 + 7 * self.n_layers as u32));
        }
        for l in 0..self.n_layers {
            let t = 2 + 7 * l as u32;
            let p = |s: &str| format!("blk.{l}.{s}");
            m.push((p("attn_q.weight"), self.n_heads * hd, d, t));
            m.push((p("attn_k.weight"), self.n_kv_heads * hd, d, t + 1));
            m.push((p("attn_v.weight"), self.n_kv_heads * hd, d, t + 2));
            m.push((p("attn_output.weight"), d, self.n_heads * hd, t + 3));
            if self.gated() {
                m.push((p("ffn_gate.weight"), ff, d, t + 4));
            }
            m.push((p("ffn_up.weight"), ff, d, t + 5));
            m.push((p("ffn_down.weight"), d, ff, t + 6));
        }
        m
    }
    /// The hyper-parameters, as a GGUF file of this shape declares them.
    pub fn config(&self) -> crate::models::config::ModelConfig {
        let mut c = crate::models::config::ModelConfig::llama(
            self.n_layers,
            self.n_embd,
            self.n_heads,
            self.n_kv_heads,
            self.n_ff,
            self.vocab_size,
            self.context_length,
            self.rope_theta,
        );
        c.architecture = self.family.into();
        c.head_dim = self.head_dim;
        let fam = self.family_row();
        c.ropes[0].dim = match fam.positions {
            crate::models::config::PositionKind::Rotary if self.rope_dim > 0 => self.rope_dim,
            crate::models::config::PositionKind::Rotary => self.head_dim,
            _ => 0,
        };
        c.attention_scale = 1.0 / (self.head_dim as f32).sqrt();
        c.ropes[0].style = fam.rope_style;
        c.ffn = fam.ffn;
        c.norm = fam.norm;
        c.positions = fam.positions;
        c.parallel_residual = fam.parallel_residual;
        c.embedding_scale = fam.scale_embeddings.then(|| (self.n_embd as f32).sqrt());
        if self.family == "gemma2" {
            c.attention_softcap = Some(50.0);
            c.final_softcap = Some(30.0);
        }
        if self.window > 0 {
            // Sliding layers rotate with the family's local base where it has one (Gemma 3).
            let local = fam.local_rope_base.map(|theta| {
                c.ropes.push(crate::models::config::RopeConfig { theta, ..c.ropes[0].clone() });
                c.ropes.len() - 1
            });
            for (l, layer) in c.layers.iter_mut().enumerate() {
                if fam.slides(l) {
                    layer.window = Some(self.window);
                    layer.rope = local.unwrap_or(0);
                }
            }
        }
        c
    }

    /// The family's vectors besides the norms' weights: (GGUF name, length, value).
    pub fn extra_vectors(&self) -> Vec<(String, usize, f32)> {
        let mut v = Vec::new();
        for l in 0..self.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            let (q, kv) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
            match self.family {
                "qwen2" => {
                    v.push((p("attn_q.bias"), q, 0.01));
                    v.push((p("attn_k.bias"), kv, 0.01));
                    v.push((p("attn_v.bias"), kv, 0.01));
                }
                "gemma2" | "gemma3" => {
                    v.push((p("post_attention_norm.weight"), self.n_embd, 1.0));
                    v.push((p("post_ffw_norm.weight"), self.n_embd, 1.0));
                    if self.family == "gemma3" {
                        v.push((p("attn_q_norm.weight"), self.head_dim, 1.0));
                        v.push((p("attn_k_norm.weight"), self.head_dim, 1.0));
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// Whether blocks have a norm before the MLP (GPT-J's one norm feeds both).
    pub fn has_ffn_norm(&self) -> bool {
        !(self.family_row().parallel_residual && self.family == "gptj")
    }

    /// Bytes of the f16 weights.
    pub fn weight_bytes(&self) -> usize {
        self.matrices().iter().map(|(_, r, c, _)| r * c * 2).sum()
    }
}

/// The range of a matrix's uniform values: unit variance out for the embedding, and for a
/// linear layer unit variance out per unit variance in.
pub fn scale(name: &str, cols: usize) -> f32 {
    if name == "token_embd.weight" {
        1.0
    } else {
        (3.0 / cols as f32).sqrt()
    }
}

/// splitmix64's finaliser.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// Element `i` of tensor `tensor` under `seed`: uniform in [-scale, scale), rounded to f16. The
/// GPU's `fill_random_f16` computes the same bits (each float step exactly rounded).
pub fn value(seed: u64, tensor: u32, i: u64, scale: f32) -> f16 {
    let h = mix64(seed ^ mix64(tensor as u64 + 1) ^ i);
    let u = (h >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
    f16::from_f32((2.0 * u - 1.0) * scale)
}

/// The ggml types [`quantised_blocks`] draws (those the GPU keeps in their block layout).
pub const QUANTISED_TYPES: [GgmlType; 8] = GgmlType::Q8_ACTIVATION_TYPES;

/// Whether a matrix of `cols` columns can be stored as `t` (whole blocks per row).
pub fn fits_blocks(t: GgmlType, cols: usize) -> bool {
    cols % t.block_size() == 0
}

/// Random blocks of type `t` (one of [`QUANTISED_TYPES`]) for a `rows` x `cols` tensor: every
/// quant bit random, scales random within a range that gives the values about the spread of
/// [`value`]'s uniform `[-scale, scale)`, and offsets (Q4_1/Q5_1 minimums, K-quant mins) that
/// centre them. Not a quantisation of [`value`]'s weights: a file of real-looking blocks for
/// speed at a quantised model's size and for checking kernels on every bit pattern.
pub fn quantised_blocks(t: GgmlType, rows: usize, cols: usize, seed: u64, tensor: u32, scale: f32) -> Vec<u8> {
    assert!(QUANTISED_TYPES.contains(&t) && fits_blocks(t, cols), "{t} blocks for {cols} columns");
    let (bs, bb) = (t.block_size(), t.block_bytes());
    let n_blocks = rows * cols / bs;
    let key = seed ^ mix64(tensor as u64 + 1) ^ 0x5155_414E_5453; // apart from `value`'s stream
    let mut out = vec![0u8; n_blocks * bb];
    // The spread of uniform integers over n levels; values are d * q (+ offset), so d is
    // chosen for a standard deviation of scale / sqrt(3), as `value`'s.
    let spread = |levels: f32| ((levels * levels - 1.0) / 12.0).sqrt();
    let target = scale / 3f32.sqrt();
    let put_f16 =
        |b: &mut [u8], at: usize, v: f32| b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    for (i, b) in out.chunks_exact_mut(bb).enumerate() {
        for (w, chunk) in b.chunks_mut(8).enumerate() {
            let h = mix64(key ^ ((i as u64) << 8 | w as u64)).to_le_bytes();
            chunk.copy_from_slice(&h[..chunk.len()]);
        }
        let r = mix64(key ^ !(i as u64));
        match t {
            GgmlType::Q4_0 => put_f16(b, 0, target / spread(16.0)),
            GgmlType::Q5_0 => put_f16(b, 0, target / spread(32.0)),
            GgmlType::Q8_0 => put_f16(b, 0, target / spread(256.0)),
            GgmlType::Q4_1 | GgmlType::Q5_1 => {
                let levels = if t == GgmlType::Q4_1 { 16.0 } else { 32.0 };
                let d = target / spread(levels);
                put_f16(b, 0, d);
                put_f16(b, 2, -d * (levels - 1.0) / 2.0);
            }
            GgmlType::Q4K | GgmlType::Q5K => {
                // Six-bit scales and mins in 32..64 (mean 47.5), mins centring the values.
                let levels = if t == GgmlType::Q4K { 16.0 } else { 32.0 };
                let d = target / (spread(levels) * 47.5);
                put_f16(b, 0, d);
                put_f16(b, 2, d * (levels - 1.0) / 2.0);
                let six = |k: u32| 32 | ((r >> (6 * k)) & 31) as u8;
                let (sc, mn): ([u8; 8], [u8; 8]) =
                    (std::array::from_fn(|j| six(j as u32)), std::array::from_fn(|j| six(8 + j as u32)));
                let q = &mut b[4..16];
                for j in 0..4 {
                    q[j] = sc[j] | (sc[j + 4] >> 4) << 6;
                    q[j + 4] = mn[j] | (mn[j + 4] >> 4) << 6;
                    q[j + 8] = (sc[j + 4] & 0x0F) | (mn[j + 4] & 0x0F) << 4;
                }
            }
            GgmlType::Q6K => {
                // Signed scales of magnitude 16..64 (mean 40), random signs.
                for (k, s) in b[192..208].iter_mut().enumerate() {
                    let m = 16 + ((r >> (4 * k)) & 31) as i8 + ((r >> 60) & 15) as i8;
                    *s = (if (r >> k) & 1 == 1 { -m } else { m }) as u8;
                }
                put_f16(b, 208, target / (spread(64.0) * 40.0));
            }
            _ => unreachable!("checked above"),
        }
    }
    out
}

/// Write the model as a GGUF v3 file (F16 matrices, F32 norms and biases, its family's
/// metadata; no tokenizer),
/// loadable by `models::load`. Meant for small shapes (the bytes are built in memory).
pub fn write_gguf(path: &Path, shape: &RandomShape, seed: u64) -> Result<(), ModelError> {
    write_gguf_typed(path, shape, seed, GgmlType::F16)
}

/// [`write_gguf`] with the matrices as `weight_type`: F16 ([`value`]'s weights), or one of
/// [`QUANTISED_TYPES`] ([`quantised_blocks`]; a matrix whose rows are not whole blocks stays F16).
pub fn write_gguf_typed(path: &Path, shape: &RandomShape, seed: u64, weight_type: GgmlType) -> Result<(), ModelError> {
    const ALIGN: usize = 32;
    check_weight_type(weight_type)?;
    let io = |e: std::io::Error| ModelError::Input(format!("writing {}: {e}", path.display()));
    let mut tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)> = Vec::new(); // name, dims, type, bytes
    for (name, rows, cols, t) in shape.matrices() {
        let s = scale(&name, cols);
        if weight_type != GgmlType::F16 && fits_blocks(weight_type, cols) {
            let bytes = quantised_blocks(weight_type, rows, cols, seed, t, s);
            tensors.push((name, vec![cols, rows], weight_type.id(), bytes));
            continue;
        }
        let bytes: Vec<u8> =
            (0..(rows * cols) as u64).flat_map(|i| value(seed, t, i, s).to_bits().to_le_bytes()).collect();
        tensors.push((name, vec![cols, rows], 1, bytes));
    }
    let ones: Vec<u8> = (0..shape.n_embd).flat_map(|_| 1f32.to_le_bytes()).collect();
    let config = shape.config();
    for l in 0..shape.n_layers {
        tensors.push((format!("blk.{l}.attn_norm.weight"), vec![shape.n_embd], 0, ones.clone()));
        if shape.has_ffn_norm() {
            tensors.push((format!("blk.{l}.ffn_norm.weight"), vec![shape.n_embd], 0, ones.clone()));
        }
    }
    tensors.push(("output_norm.weight".into(), vec![shape.n_embd], 0, ones));
    for (name, len, value) in shape.extra_vectors() {
        tensors.push((name, vec![len], 0, (0..len).flat_map(|_| value.to_le_bytes()).collect()));
    }

    let mut b: Vec<u8> = Vec::new();
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let arch = shape.family;
    let mut u32s: Vec<(String, usize)> = [
        ("block_count", shape.n_layers),
        ("embedding_length", shape.n_embd),
        ("attention.head_count", shape.n_heads),
        ("attention.head_count_kv", shape.n_kv_heads),
        ("attention.key_length", shape.head_dim),
        ("attention.value_length", shape.head_dim),
        ("feed_forward_length", shape.n_ff),
        ("vocab_size", shape.vocab_size),
        ("context_length", shape.context_length),
    ]
    .into_iter()
    .map(|(k, v)| (format!("{arch}.{k}"), v))
    .collect();
    if shape.window > 0 {
        u32s.push((format!("{arch}.attention.sliding_window"), shape.window));
    }
    if config.ropes[0].dim != shape.head_dim {
        u32s.push((format!("{arch}.rope.dimension_count"), config.ropes[0].dim));
    }
    let norm_key = match config.norm {
        crate::models::config::NormKind::Rms => "layer_norm_rms_epsilon",
        crate::models::config::NormKind::Layer => "layer_norm_epsilon",
    };
    let mut f32s: Vec<(String, f32)> =
        vec![(format!("{arch}.rope.freq_base"), shape.rope_theta), (format!("{arch}.attention.{norm_key}"), 1e-5)];
    for (key, cap) in
        [("attn_logit_softcapping", config.attention_softcap), ("final_logit_softcapping", config.final_softcap)]
    {
        if let Some(cap) = cap {
            f32s.push((format!("{arch}.{key}"), cap));
        }
    }
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&((1 + u32s.len() + f32s.len()) as u64).to_le_bytes());
    put_str(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    put_str(&mut b, arch);
    for (k, v) in u32s {
        put_str(&mut b, &k);
        b.extend_from_slice(&4u32.to_le_bytes()); // uint32
        b.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for (k, v) in f32s {
        put_str(&mut b, &k);
        b.extend_from_slice(&6u32.to_le_bytes()); // float32
        b.extend_from_slice(&v.to_le_bytes());
    }
    let mut offset = 0usize;
    for (name, dims, ty, bytes) in &tensors {
        put_str(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += bytes.len().next_multiple_of(ALIGN);
    }
    b.resize(b.len().next_multiple_of(ALIGN), 0);
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(&b).map_err(io)?;
    for (_, _, _, bytes) in &tensors {
        f.write_all(bytes).map_err(io)?;
        f.write_all(&vec![0u8; bytes.len().next_multiple_of(ALIGN) - bytes.len()]).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::decoder::Logits;

    #[test]
    fn values_are_uniform_in_their_range_and_differ_by_tensor() {
        let s = 0.25f32;
        let v: Vec<f32> = (0..10_000).map(|i| value(7, 3, i, s).to_f32()).collect();
        assert!(v.iter().all(|x| x.abs() <= s));
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - s * s / 3.0).abs() < 0.1 * s * s / 3.0, "variance {var}");
        assert_ne!(value(7, 3, 5, s), value(7, 4, 5, s));
        assert_ne!(value(7, 3, 5, s), value(8, 3, 5, s));
    }

    /// The paper's families at small shapes: each loads as its family and runs.
    #[test]
    fn the_paper_families_random_shapes_load_as_their_family() {
        use crate::models::config::{NormKind, PositionKind};
        for (name, arch, positions) in [
            ("tiny-gptj", "gptj", PositionKind::Rotary),
            ("tiny-mpt", "mpt", PositionKind::Alibi { max_bias: 8.0 }),
            ("tiny-gpt2", "gpt2", PositionKind::Learned),
        ] {
            let shape = RandomShape::by_name(name).unwrap();
            let path = std::env::temp_dir().join(format!("keyformer-random-{}-{name}.gguf", std::process::id()));
            write_gguf(&path, &shape, 1).unwrap();
            let (file, model) = crate::models::load(&path, crate::gguf::LoadMode::Mmap).unwrap();
            std::fs::remove_file(&path).ok();
            let c = &model.config;
            assert_eq!((c.architecture.as_str(), c.norm, c.positions), (arch, NormKind::Layer, positions), "{name}");
            // The file declares what the GPU's drawing assumes.
            let declared = shape.config();
            assert_eq!(
                (c.ffn, c.parallel_residual, c.ropes[0].dim),
                (declared.ffn, declared.parallel_residual, declared.ropes[0].dim)
            );
            assert_eq!(file.tensor_info("blk.0.ffn_gate.weight").is_some(), false, "{name}: a GELU MLP has no gate");
            assert_eq!(model.layers[0].ffn_norm.is_some(), shape.has_ffn_norm(), "{name}");
            let mut cache = model.new_cache(64);
            let logits = model.forward(&[1, 2, 3, 4], &mut cache, Logits::Last).unwrap();
            assert!(logits.iter().all(|x| x.is_finite()), "{name}");
        }
        assert_eq!(RandomShape::by_name("gptj-6b").unwrap().config().ropes[0].dim, 64);
        assert_eq!(RandomShape::by_name("mpt-7b").unwrap().config().ropes[0].dim, 0);
    }

    #[test]
    fn a_written_tiny_model_loads_and_gives_finite_distinct_logits() {
        let shape = RandomShape::by_name("tiny").unwrap();
        let dir = std::env::temp_dir().join(format!("keyformer-random-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &shape, 1).unwrap();
        let (file, model) = crate::models::load(&path, crate::gguf::LoadMode::Mmap).unwrap();
        // The file holds exactly the function's values.
        let info = file.tensor_info("blk.1.ffn_up.weight").unwrap();
        let bytes = file.tensor_bytes(info);
        let t = 2 + 7 + 5;
        for i in [0usize, 1, 777, shape.n_ff * shape.n_embd - 1] {
            let got = u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]);
            assert_eq!(got, value(1, t, i as u64, scale("", shape.n_embd)).to_bits());
        }
        let mut cache = model.new_cache(64);
        let logits = model.forward(&[1, 2, 3, 4], &mut cache, Logits::Last).unwrap();
        assert_eq!(logits.len(), shape.vocab_size);
        assert!(logits.iter().all(|x| x.is_finite()));
        let spread = logits.iter().fold(f32::MIN, |m, x| m.max(*x)) - logits.iter().fold(f32::MAX, |m, x| m.min(*x));
        assert!(spread > 0.1, "logits should not be flat: spread {spread}");
        std::fs::remove_dir_all(&dir).ok();
        assert!(RandomShape::by_name("llama9").is_err());
    }

    /// Every quantised type's random blocks dequantise to values of about `value`'s spread
    /// (mean near 0, variance near scale^2 / 3), and depend on the seed and the tensor.
    #[test]
    fn quantised_blocks_have_the_spread_of_the_f16_weights() {
        let (rows, cols, s) = (16, 512, 0.2f32);
        for t in QUANTISED_TYPES {
            let bytes = quantised_blocks(t, rows, cols, 3, 5, s);
            assert_eq!(bytes.len(), rows * t.row_bytes(cols));
            let mut v = vec![0f32; rows * cols];
            for (r, out) in v.chunks_exact_mut(cols).enumerate() {
                crate::quant::dequantize_row(t, &bytes[r * t.row_bytes(cols)..(r + 1) * t.row_bytes(cols)], out);
            }
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
            let want = s * s / 3.0;
            assert!(mean.abs() < 0.1 * s, "{t}: mean {mean}");
            assert!((var / want - 1.0).abs() < 0.35, "{t}: variance {var}, want about {want}");
            assert_ne!(bytes, quantised_blocks(t, rows, cols, 4, 5, s), "{t}: the seed changes nothing");
            assert_ne!(bytes, quantised_blocks(t, rows, cols, 3, 6, s), "{t}: the tensor changes nothing");
        }
    }

    /// A tiny model written as each quantised type loads with its matrices in that type and
    /// gives finite logits that differ from the F16 model's.
    #[test]
    fn a_quantised_tiny_model_loads_as_its_type() {
        let shape = RandomShape::by_name("tiny").unwrap();
        let dir = std::env::temp_dir().join(format!("keyformer-random-q-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for t in [GgmlType::Q4_0, GgmlType::Q4K, GgmlType::Q6K] {
            let path = dir.join(format!("tiny-{t}.gguf"));
            write_gguf_typed(&path, &shape, 1, t).unwrap();
            let (file, model) = crate::models::load(&path, crate::gguf::LoadMode::Mmap).unwrap();
            assert_eq!(file.tensor_info("blk.0.attn_q.weight").unwrap().ggml_type, t);
            let mut cache = model.new_cache(64);
            let logits = model.forward(&[1, 2, 3, 4], &mut cache, Logits::Last).unwrap();
            assert!(logits.iter().all(|x| x.is_finite()), "{t}");
        }
        let err = write_gguf_typed(&dir.join("x.gguf"), &shape, 1, GgmlType::Q2K).unwrap_err();
        assert!(err.to_string().contains("q4_k"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

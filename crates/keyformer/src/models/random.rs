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

use crate::ModelError;

/// A model shape with no weights.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RandomShape {
    pub name: &'static str,
    pub n_layers: usize,
    pub n_embd: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub n_ff: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
}

/// The shapes `--random-weights` knows. Contexts are 8192 so that the paper's 4096 + 4096
/// runs at every shape (Llama 2's own is 4096; with random weights it changes nothing measured).
pub const SHAPES: [RandomShape; 4] = [
    RandomShape {
        name: "llama2-7b",
        n_layers: 32,
        n_embd: 4096,
        n_heads: 32,
        n_kv_heads: 32,
        n_ff: 11008,
        vocab_size: 32000,
        context_length: 8192,
        rope_theta: 10_000.0,
    },
    RandomShape {
        name: "llama3-8b",
        n_layers: 32,
        n_embd: 4096,
        n_heads: 32,
        n_kv_heads: 8,
        n_ff: 14336,
        vocab_size: 128256,
        context_length: 8192,
        rope_theta: 500_000.0,
    },
    RandomShape {
        name: "smollm2-135m",
        n_layers: 30,
        n_embd: 576,
        n_heads: 9,
        n_kv_heads: 3,
        n_ff: 1536,
        vocab_size: 49152,
        context_length: 8192,
        rope_theta: 100_000.0,
    },
    // Parity tests: GQA (2 query heads per KV head), two layers.
    RandomShape {
        name: "tiny",
        n_layers: 2,
        n_embd: 256,
        n_heads: 4,
        n_kv_heads: 2,
        n_ff: 512,
        vocab_size: 1000,
        context_length: 4096,
        rope_theta: 10_000.0,
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
        self.n_embd / self.n_heads
    }
    /// Every matrix as (GGUF name, rows, cols, tensor number for [`value`]), in file order.
    pub fn matrices(&self) -> Vec<(String, usize, usize, u32)> {
        let (d, hd, ff) = (self.n_embd, self.head_dim(), self.n_ff);
        let mut m = vec![
            ("token_embd.weight".to_string(), self.vocab_size, d, 0),
            ("output.weight".to_string(), self.vocab_size, d, 1),
        ];
        for l in 0..self.n_layers {
            let t = 2 + 7 * l as u32;
            let p = |s: &str| format!("blk.{l}.{s}");
            m.push((p("attn_q.weight"), self.n_heads * hd, d, t));
            m.push((p("attn_k.weight"), self.n_kv_heads * hd, d, t + 1));
            m.push((p("attn_v.weight"), self.n_kv_heads * hd, d, t + 2));
            m.push((p("attn_output.weight"), d, self.n_heads * hd, t + 3));
            m.push((p("ffn_gate.weight"), ff, d, t + 4));
            m.push((p("ffn_up.weight"), ff, d, t + 5));
            m.push((p("ffn_down.weight"), d, ff, t + 6));
        }
        m
    }
    /// The hyper-parameters, as a GGUF file of this shape declares them.
    pub fn config(&self) -> crate::models::config::ModelConfig {
        crate::models::config::ModelConfig::llama(
            self.n_layers,
            self.n_embd,
            self.n_heads,
            self.n_kv_heads,
            self.n_ff,
            self.vocab_size,
            self.context_length,
            self.rope_theta,
        )
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

/// Write the model as a GGUF v3 file (F16 matrices, F32 norms, Llama metadata; no tokenizer),
/// loadable by `models::load`. Meant for small shapes (the bytes are built in memory).
pub fn write_gguf(path: &Path, shape: &RandomShape, seed: u64) -> Result<(), ModelError> {
    const ALIGN: usize = 32;
    let io = |e: std::io::Error| ModelError::Input(format!("writing {}: {e}", path.display()));
    let mut tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)> = Vec::new(); // name, dims, type, bytes
    for (name, rows, cols, t) in shape.matrices() {
        let s = scale(&name, cols);
        let bytes: Vec<u8> =
            (0..(rows * cols) as u64).flat_map(|i| value(seed, t, i, s).to_bits().to_le_bytes()).collect();
        tensors.push((name, vec![cols, rows], 1, bytes));
    }
    let ones: Vec<u8> = (0..shape.n_embd).flat_map(|_| 1f32.to_le_bytes()).collect();
    for l in 0..shape.n_layers {
        tensors.push((format!("blk.{l}.attn_norm.weight"), vec![shape.n_embd], 0, ones.clone()));
        tensors.push((format!("blk.{l}.ffn_norm.weight"), vec![shape.n_embd], 0, ones.clone()));
    }
    tensors.push(("output_norm.weight".into(), vec![shape.n_embd], 0, ones));

    let mut b: Vec<u8> = Vec::new();
    let put_str = |b: &mut Vec<u8>, s: &str| {
        b.extend_from_slice(&(s.len() as u64).to_le_bytes());
        b.extend_from_slice(s.as_bytes());
    };
    let u32s = [
        ("llama.block_count", shape.n_layers),
        ("llama.embedding_length", shape.n_embd),
        ("llama.attention.head_count", shape.n_heads),
        ("llama.attention.head_count_kv", shape.n_kv_heads),
        ("llama.feed_forward_length", shape.n_ff),
        ("llama.vocab_size", shape.vocab_size),
        ("llama.context_length", shape.context_length),
    ];
    let f32s = [("llama.rope.freq_base", shape.rope_theta), ("llama.attention.layer_norm_rms_epsilon", 1e-5)];
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&((1 + u32s.len() + f32s.len()) as u64).to_le_bytes());
    put_str(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    put_str(&mut b, "llama");
    for (k, v) in u32s {
        put_str(&mut b, k);
        b.extend_from_slice(&4u32.to_le_bytes()); // uint32
        b.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for (k, v) in f32s {
        put_str(&mut b, k);
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

    #[test]
    fn a_written_tiny_model_loads_and_gives_finite_distinct_logits() {
        let shape = RandomShape::by_name("tiny").unwrap();
        let dir = std::env::temp_dir().join(format!("keyformer-random-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &shape, 1).unwrap();
        let (file, model) = crate::models::load(&path).unwrap();
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
}

//! Hugging Face model folders (`config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json`, `tokenizer_config.json`,
//! `generation_config.json`, `chat_template.jinja`), read into the shape of a GGUF file: the
//! config becomes the metadata keys llama.cpp's converter would write, each tensor gets its GGUF
//! name and stays in the safetensors memory map in its own type (f32, f16 or bf16). So a folder
//! and its converted GGUF go through one model description ([`crate::models::config`]).
//!
//! Three things differ from what the converter writes, because a folder is read where it lies:
//! Llama's Q/K rows keep Hugging Face's order (the key `keyformer.rope_layout = halves` says
//! so; the converter permutes them for adjacent-pair rotation), a GELU MLP says which GELU its
//! config names (`keyformer.activation`; the converter's GGUF has no key for it), and
//! Gemma 2/3's `query_pre_attn_scalar` becomes `attention.scale`. The few tensors a converter
//! changes (GPT-2's transposed Conv1D weights, GPT-NeoX's per-head fused QKV, Gemma's `1 + w`
//! norms) are converted once at load into one extra mapping; everything else is not copied.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::gguf::{GgufFile, MetaValue, TensorInfo};
use crate::models::config::{Family, ModelConfig};
use crate::quant::GgmlType;
use crate::tokenizer::{HfTokenizerSettings, Tokenizer};

/// What is wrong with a folder, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}", .path.display())]
pub struct HfError {
    pub path: PathBuf,
    pub what: String,
}

fn err(path: &Path, what: impl Into<String>) -> HfError {
    HfError { path: path.to_path_buf(), what: what.into() }
}

/// Whether `dir` looks like a Hugging Face model folder.
pub fn is_model_folder(dir: &Path) -> bool {
    dir.is_dir() && dir.join("config.json").is_file()
}

/// A folder's model (in GGUF's terms) and its tokenizer.
pub struct HfModel {
    pub file: GgufFile,
    pub tokenizer: Tokenizer,
}

/// How a family's tensors are named in a folder: `(hf, gguf)` name stems, `{N}` standing for a
/// block's index; `.weight` / `.bias` follow either.
struct Naming {
    model_types: &'static [&'static str],
    architecture: &'static str,
    names: &'static [(&'static str, &'static str)],
    /// Buffers some checkpoints carry that are not weights (causal masks, cached frequencies).
    ignored: &'static [&'static str],
}

const LLAMA_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{N}.input_layernorm", "blk.{N}.attn_norm"),
    ("model.layers.{N}.self_attn.q_proj", "blk.{N}.attn_q"),
    ("model.layers.{N}.self_attn.k_proj", "blk.{N}.attn_k"),
    ("model.layers.{N}.self_attn.v_proj", "blk.{N}.attn_v"),
    ("model.layers.{N}.self_attn.qkv_proj", "blk.{N}.attn_qkv"),
    ("model.layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"),
    ("model.layers.{N}.self_attn.q_norm", "blk.{N}.attn_q_norm"),
    ("model.layers.{N}.self_attn.k_norm", "blk.{N}.attn_k_norm"),
    ("model.layers.{N}.post_attention_layernorm", "blk.{N}.ffn_norm"),
    ("model.layers.{N}.mlp.gate_proj", "blk.{N}.ffn_gate"),
    ("model.layers.{N}.mlp.up_proj", "blk.{N}.ffn_up"),
    ("model.layers.{N}.mlp.gate_up_proj", "blk.{N}.ffn_up"),
    ("model.layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"),
];

/// Gemma's sandwich: the attention's output is normed before the add, the MLP's input by
/// `pre_feedforward_layernorm`.
const GEMMA_NAMES: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{N}.input_layernorm", "blk.{N}.attn_norm"),
    ("model.layers.{N}.self_attn.q_proj", "blk.{N}.attn_q"),
    ("model.layers.{N}.self_attn.k_proj", "blk.{N}.attn_k"),
    ("model.layers.{N}.self_attn.v_proj", "blk.{N}.attn_v"),
    ("model.layers.{N}.self_attn.o_proj", "blk.{N}.attn_output"),
    ("model.layers.{N}.self_attn.q_norm", "blk.{N}.attn_q_norm"),
    ("model.layers.{N}.self_attn.k_norm", "blk.{N}.attn_k_norm"),
    ("model.layers.{N}.post_attention_layernorm", "blk.{N}.post_attention_norm"),
    ("model.layers.{N}.pre_feedforward_layernorm", "blk.{N}.ffn_norm"),
    ("model.layers.{N}.post_feedforward_layernorm", "blk.{N}.post_ffw_norm"),
    ("model.layers.{N}.mlp.gate_proj", "blk.{N}.ffn_gate"),
    ("model.layers.{N}.mlp.up_proj", "blk.{N}.ffn_up"),
    ("model.layers.{N}.mlp.down_proj", "blk.{N}.ffn_down"),
];

const GPT_NEOX_NAMES: &[(&str, &str)] = &[
    ("gpt_neox.embed_in", "token_embd"),
    ("gpt_neox.final_layer_norm", "output_norm"),
    ("embed_out", "output"),
    ("gpt_neox.layers.{N}.input_layernorm", "blk.{N}.attn_norm"),
    ("gpt_neox.layers.{N}.attention.query_key_value", "blk.{N}.attn_qkv"),
    ("gpt_neox.layers.{N}.attention.dense", "blk.{N}.attn_output"),
    ("gpt_neox.layers.{N}.post_attention_layernorm", "blk.{N}.ffn_norm"),
    ("gpt_neox.layers.{N}.mlp.dense_h_to_4h", "blk.{N}.ffn_up"),
    ("gpt_neox.layers.{N}.mlp.dense_4h_to_h", "blk.{N}.ffn_down"),
];

const GPT2_NAMES: &[(&str, &str)] = &[
    ("transformer.wte", "token_embd"),
    ("transformer.wpe", "position_embd"),
    ("transformer.ln_f", "output_norm"),
    ("lm_head", "output"),
    ("transformer.h.{N}.ln_1", "blk.{N}.attn_norm"),
    ("transformer.h.{N}.attn.c_attn", "blk.{N}.attn_qkv"),
    ("transformer.h.{N}.attn.c_proj", "blk.{N}.attn_output"),
    ("transformer.h.{N}.ln_2", "blk.{N}.ffn_norm"),
    ("transformer.h.{N}.mlp.c_fc", "blk.{N}.ffn_up"),
    ("transformer.h.{N}.mlp.c_proj", "blk.{N}.ffn_down"),
];

const MPT_NAMES: &[(&str, &str)] = &[
    ("transformer.wte", "token_embd"),
    ("transformer.norm_f", "output_norm"),
    ("lm_head", "output"),
    ("transformer.blocks.{N}.norm_1", "blk.{N}.attn_norm"),
    ("transformer.blocks.{N}.attn.Wqkv", "blk.{N}.attn_qkv"),
    ("transformer.blocks.{N}.attn.out_proj", "blk.{N}.attn_output"),
    ("transformer.blocks.{N}.norm_2", "blk.{N}.ffn_norm"),
    ("transformer.blocks.{N}.ffn.up_proj", "blk.{N}.ffn_up"),
    ("transformer.blocks.{N}.ffn.down_proj", "blk.{N}.ffn_down"),
];

/// GPT-J: one LayerNorm feeds attention and MLP (no `ffn_norm`), the output head has a bias.
const GPTJ_NAMES: &[(&str, &str)] = &[
    ("transformer.wte", "token_embd"),
    ("transformer.ln_f", "output_norm"),
    ("lm_head", "output"),
    ("transformer.h.{N}.ln_1", "blk.{N}.attn_norm"),
    ("transformer.h.{N}.attn.q_proj", "blk.{N}.attn_q"),
    ("transformer.h.{N}.attn.k_proj", "blk.{N}.attn_k"),
    ("transformer.h.{N}.attn.v_proj", "blk.{N}.attn_v"),
    ("transformer.h.{N}.attn.out_proj", "blk.{N}.attn_output"),
    ("transformer.h.{N}.mlp.fc_in", "blk.{N}.ffn_up"),
    ("transformer.h.{N}.mlp.fc_out", "blk.{N}.ffn_down"),
];

const ROTARY_BUFFERS: &[&str] = &["rotary_emb.inv_freq"];
const GPT_BUFFERS: &[&str] = &[".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias"];

const NAMINGS: &[Naming] = &[
    Naming { model_types: &["llama"], architecture: "llama", names: LLAMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["mistral"], architecture: "mistral", names: LLAMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["qwen2"], architecture: "qwen2", names: LLAMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["qwen3"], architecture: "qwen3", names: LLAMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["phi3"], architecture: "phi3", names: LLAMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["gemma2"], architecture: "gemma2", names: GEMMA_NAMES, ignored: ROTARY_BUFFERS },
    // Gemma 3's text models (1B, and the text half of a multimodal folder saved on its own);
    // a multimodal `gemma3` folder nests its config and names its tensors otherwise.
    Naming { model_types: &["gemma3_text"], architecture: "gemma3", names: GEMMA_NAMES, ignored: ROTARY_BUFFERS },
    Naming { model_types: &["gpt_neox"], architecture: "gptneox", names: GPT_NEOX_NAMES, ignored: GPT_BUFFERS },
    Naming { model_types: &["gpt2"], architecture: "gpt2", names: GPT2_NAMES, ignored: GPT_BUFFERS },
    Naming { model_types: &["mpt"], architecture: "mpt", names: MPT_NAMES, ignored: GPT_BUFFERS },
    Naming { model_types: &["gptj"], architecture: "gptj", names: GPTJ_NAMES, ignored: GPT_BUFFERS },
];

/// The `model_type` values a folder may have.
pub fn supported_model_types() -> Vec<&'static str> {
    NAMINGS.iter().flat_map(|n| n.model_types.iter().copied()).collect()
}

impl Naming {
    /// The GGUF name of a folder's tensor, `None` for one this family does not have.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let (_, suffix) = hf.rsplit_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        self.names.iter().find_map(|(h, g)| rename(hf, h, g))
    }
}

/// `name` (a stem matching `from`, `{N}` a block index, then `.weight`/`.bias`) renamed by the
/// pattern pair to `to`'s stem with the same index and suffix.
fn rename(name: &str, from: &str, to: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    let renamed = match from.split_once("{N}") {
        None => (stem == from).then(|| to.to_string())?,
        Some((pre, post)) => {
            let n = stem.strip_prefix(pre)?.strip_suffix(post)?;
            n.parse::<usize>().ok()?;
            to.replace("{N}", n)
        }
    };
    Some(format!("{renamed}.{suffix}"))
}

/// The folder's name of a GGUF tensor name, for a message about a tensor the folder lacks.
pub(crate) fn folder_name(architecture: &str, gguf: &str) -> Option<String> {
    let naming = NAMINGS.iter().find(|n| n.architecture == architecture)?;
    naming.names.iter().find_map(|(h, g)| rename(gguf, g, h))
}

/// The conversion a tensor needs before it matches its GGUF counterpart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Convert {
    /// Used where it lies.
    None,
    /// GPT-2's Conv1D stores `in x out`: transposed to `out x in`.
    Transpose,
    /// GPT-NeoX's fused QKV is per head `[q_h; k_h; v_h]`: reordered to `[q; k; v]`.
    NeoxQkv { n_heads: usize },
    /// Gemma's RMSNorm multiplies by `1 + w`: the GGUF convention stores `1 + w`.
    AddOne,
}

fn conversion(arch: &str, gguf: &str, n_heads: usize) -> Convert {
    match arch {
        "gpt2"
            if gguf.ends_with(".weight")
                && ["attn_qkv", "attn_output", "ffn_up", "ffn_down"]
                    .iter()
                    .any(|t| gguf.contains(&format!(".{t}."))) =>
        {
            Convert::Transpose
        }
        "gptneox" if gguf.contains(".attn_qkv.") => Convert::NeoxQkv { n_heads },
        "gemma2" | "gemma3" if gguf.ends_with("norm.weight") => Convert::AddOne,
        _ => Convert::None,
    }
}

/// A folder's `config.json`, read by key with the alternative spellings families use.
#[derive(Clone, Copy)]
struct Config<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl<'a> Config<'a> {
    /// The first of `keys` present and not null.
    fn get(&self, keys: &[&str]) -> Option<&'a Value> {
        keys.iter().find_map(|k| self.v.get(*k).filter(|v| !v.is_null()))
    }
    fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>, HfError> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|u| usize::try_from(u).ok())
                .map(Some)
                .ok_or_else(|| err(self.path, format!("{} is {v}, not a non-negative integer", keys[0]))),
        }
    }
    fn usize(&self, keys: &[&str]) -> Result<usize, HfError> {
        self.opt_usize(keys)?.ok_or_else(|| err(self.path, format!("no {}", keys.join(" or "))))
    }
    fn opt_f64(&self, keys: &[&str]) -> Result<Option<f64>, HfError> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| err(self.path, format!("{} is {v}, not a number", keys[0]))),
        }
    }
    fn opt_bool(&self, keys: &[&str]) -> Result<Option<bool>, HfError> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => {
                v.as_bool().map(Some).ok_or_else(|| err(self.path, format!("{} is {v}, not a boolean", keys[0])))
            }
        }
    }
    fn opt_str(&self, keys: &[&str]) -> Option<&'a str> {
        self.get(keys).and_then(Value::as_str)
    }
    fn sub(&self, keys: &[&str]) -> Option<Config<'a>> {
        self.get(keys).filter(|v| v.is_object()).map(|v| Config { v, path: self.path })
    }
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|e| err(path, format!("cannot read it: {e}")))?;
    serde_json::from_str(&text).map_err(|e| err(path, format!("not valid JSON: {e}")))
}

fn read_optional_json(path: &Path) -> Result<Option<Value>, HfError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Metadata and extra tensors (RoPE factors) being assembled.
struct Assembly {
    md: BTreeMap<String, MetaValue>,
    arch: &'static str,
    /// f32 tensors made from the config.
    extra: Vec<(String, Vec<f32>)>,
}

impl Assembly {
    fn set(&mut self, key: &str, v: MetaValue) {
        self.md.insert(format!("{}.{key}", self.arch), v);
    }
    fn set_u(&mut self, key: &str, v: usize) {
        self.set(key, MetaValue::U64(v as u64));
    }
    fn set_f(&mut self, key: &str, v: f64) {
        self.set(key, MetaValue::F32(v as f32));
    }
}

/// Open a Hugging Face model folder.
pub fn open(dir: &Path) -> Result<HfModel, crate::ModelError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(err(dir, "no config.json: not a Hugging Face model folder").into());
    }
    let config_value = read_json(&config_path)?;
    let cfg = Config { v: &config_value, path: &config_path };
    let model_type = cfg.opt_str(&["model_type"]).unwrap_or("");
    let naming = NAMINGS.iter().find(|n| n.model_types.contains(&model_type)).ok_or_else(|| {
        err(
            &config_path,
            format!(
                "model_type '{}' is not a family this engine runs (supported: {})",
                crate::one_line(model_type),
                supported_model_types().join(", ")
            ),
        )
    })?;
    let family = ModelConfig::family(naming.architecture)?;
    let mut asm = Assembly { md: BTreeMap::new(), arch: naming.architecture, extra: Vec::new() };
    asm.md.insert("general.architecture".into(), MetaValue::String(naming.architecture.into()));
    if let Some(name) = dir.file_name() {
        asm.md.insert("general.name".into(), MetaValue::String(name.to_string_lossy().into_owned()));
    }
    let shape = describe_config(&cfg, family, &mut asm)?;

    let (sources, mut tensors) = map_weights(dir, naming, &shape)?;
    let (converted, computed) = convert_tensors(dir, &sources, &mut tensors, naming.architecture, &shape, &asm.extra)?;
    tensors.extend(computed);
    let mut sources = sources.into_iter().map(|(_, m)| m).collect::<Vec<_>>();
    sources.extend(converted);
    let tokenizer = open_tokenizer(dir, &cfg, shape.vocab_size, &mut asm.md)?;
    let file = GgufFile::assembled(dir.to_path_buf(), asm.md, tensors, sources)?;
    Ok(HfModel { file, tokenizer })
}

/// What the weights are checked and converted against.
struct Shape {
    n_heads: usize,
    vocab_size: usize,
    tied: bool,
}

/// The config's hyper-parameters as GGUF keys.
fn describe_config(cfg: &Config, family: &Family, asm: &mut Assembly) -> Result<Shape, HfError> {
    let arch = asm.arch;
    let n_embd = cfg.usize(&["hidden_size", "n_embd", "d_model"])?;
    let n_heads = cfg.usize(&["num_attention_heads", "n_head", "n_heads"])?;
    let n_layers = cfg.usize(&["num_hidden_layers", "n_layer", "n_layers"])?;
    let vocab_size = cfg.usize(&["vocab_size"])?;
    if n_heads == 0 || n_embd % n_heads != 0 && cfg.get(&["head_dim"]).is_none() {
        return Err(err(cfg.path, format!("{n_heads} attention heads for a hidden size of {n_embd}")));
    }
    let head_dim = cfg.opt_usize(&["head_dim"])?.unwrap_or(n_embd / n_heads);
    asm.set_u("embedding_length", n_embd);
    asm.set_u("attention.head_count", n_heads);
    asm.set_u("block_count", n_layers);
    asm.set_u("vocab_size", vocab_size);
    if cfg.get(&["head_dim"]).is_some() {
        asm.set_u("attention.key_length", head_dim);
        asm.set_u("attention.value_length", head_dim);
    }
    let context = cfg.usize(&["max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"])?;
    asm.set_u("context_length", context);
    let rope = cfg.sub(&["rope_parameters", "rope_scaling"]);
    let theta = |r: Option<&Config>| -> Result<f64, HfError> {
        Ok(match r.map(|r| r.opt_f64(&["rope_theta"])).transpose()?.flatten() {
            Some(t) => t,
            None => cfg.opt_f64(&["rope_theta", "rotary_emb_base"])?.unwrap_or(10_000.0),
        })
    };
    let partial = |r: Option<&Config>| -> Result<Option<f64>, HfError> {
        match r.map(|r| r.opt_f64(&["partial_rotary_factor"])).transpose()?.flatten() {
            Some(p) => Ok(Some(p)),
            None => cfg.opt_f64(&["partial_rotary_factor", "rotary_pct"]),
        }
    };
    match arch {
        "gpt2" | "gptj" | "mpt" => {
            let ff = match arch {
                "mpt" => cfg.opt_usize(&["expansion_ratio"])?.unwrap_or(4) * n_embd,
                _ => cfg.opt_usize(&["n_inner"])?.unwrap_or(4 * n_embd),
            };
            asm.set_u("feed_forward_length", ff);
            asm.set_f("attention.layer_norm_epsilon", cfg.opt_f64(&["layer_norm_epsilon"])?.unwrap_or(1e-5));
        }
        _ => asm.set_u("feed_forward_length", cfg.usize(&["intermediate_size"])?),
    }
    let activation = cfg.opt_str(&["hidden_act", "activation_function", "hidden_activation"]);
    match arch {
        "gpt2" => {
            if cfg.opt_bool(&["scale_attn_by_inverse_layer_idx"])? == Some(true)
                || cfg.opt_bool(&["reorder_and_upcast_attn"])? == Some(true)
            {
                return Err(err(
                    cfg.path,
                    "scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported",
                ));
            }
            gelu_kind(cfg, activation, asm)?;
        }
        "gptj" => {
            asm.set_u("rope.dimension_count", cfg.opt_usize(&["rotary_dim"])?.unwrap_or(head_dim));
            asm.set_f("rope.freq_base", 10_000.0);
            gelu_kind(cfg, activation, asm)?;
        }
        "mpt" => {
            let attn = cfg.sub(&["attn_config"]);
            let attn_get = |k: &str| attn.as_ref().and_then(|a| a.get(&[k]));
            if attn_get("alibi").and_then(Value::as_bool) != Some(true) {
                return Err(err(cfg.path, "an MPT model without ALiBi (attn_config.alibi false) is not supported"));
            }
            if attn_get("qk_ln").and_then(Value::as_bool) == Some(true) {
                return Err(err(cfg.path, "attn_config.qk_ln (MPT's Q/K LayerNorm) is not supported"));
            }
            asm.set_f("attention.max_alibi_bias", attn_get("alibi_bias_max").and_then(Value::as_f64).unwrap_or(8.0));
            if let Some(c) = attn_get("clip_qkv").and_then(Value::as_f64) {
                asm.set_f("attention.clamp_kqv", c);
            }
            if let Some(s) = attn_get("softmax_scale").and_then(Value::as_f64) {
                asm.set_f("attention.scale", s);
            }
            if let Some(kv) = attn_get("kv_n_heads").and_then(Value::as_u64) {
                asm.set_u("attention.head_count_kv", kv as usize);
            }
        }
        "gptneox" => {
            asm.set_f("attention.layer_norm_epsilon", cfg.opt_f64(&["layer_norm_eps"])?.unwrap_or(1e-5));
            let pct = partial(rope.as_ref())?.unwrap_or(0.25);
            asm.set_u("rope.dimension_count", (pct * head_dim as f64) as usize);
            asm.set_f("rope.freq_base", theta(rope.as_ref())?);
            let parallel = cfg.opt_bool(&["use_parallel_residual"])?.unwrap_or(true);
            asm.set("use_parallel_residual", MetaValue::Bool(parallel));
            gelu_kind(cfg, activation, asm)?;
        }
        _ => {
            // The Llama-like families: RMSNorm, rotary, grouped KV heads.
            asm.set_u("attention.head_count_kv", cfg.opt_usize(&["num_key_value_heads"])?.unwrap_or(n_heads));
            asm.set_f("attention.layer_norm_rms_epsilon", cfg.opt_f64(&["rms_norm_eps"])?.unwrap_or(1e-6));
            if matches!(arch, "llama" | "mistral") {
                asm.md.insert("keyformer.rope_layout".into(), MetaValue::String("halves".into()));
            }
            let rope_dim = match partial(rope.as_ref())? {
                Some(p) => (p * head_dim as f64) as usize,
                None => head_dim,
            };
            asm.set_u("rope.dimension_count", rope_dim);
            let global = match arch {
                "gemma3" => rope.as_ref().and_then(|r| r.sub(&["full_attention"])).or(rope),
                _ => rope,
            };
            let base = theta(global.as_ref())?;
            asm.set_f("rope.freq_base", base);
            rope_scaling(cfg, global.as_ref(), base, rope_dim, context, asm)?;
            if arch == "gemma3" {
                let local = rope.as_ref().and_then(|r| r.sub(&["sliding_attention"]));
                let local_theta = match local.as_ref().map(|l| l.opt_f64(&["rope_theta"])).transpose()?.flatten() {
                    Some(t) => Some(t),
                    None => cfg.opt_f64(&["rope_local_base_freq"])?,
                };
                if let Some(t) = local_theta {
                    asm.set_f("rope.freq_base_swa", t);
                }
            }
            if matches!(arch, "gemma2" | "gemma3") {
                if let Some(s) = cfg.opt_f64(&["query_pre_attn_scalar"])? {
                    asm.set_f("attention.scale", 1.0 / s.sqrt());
                }
                for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
                    if let Some(c) = cfg.opt_f64(&[key])? {
                        asm.set_f(key, c);
                    }
                }
            }
            // A window only where the family slides (llama.cpp ignores Mistral's and Qwen2's).
            let window = cfg.opt_usize(&["sliding_window"])?.filter(|&w| w > 0);
            if let (Some(w), true) = (window, family.sliding != crate::models::config::SlidingLayers::None) {
                asm.set_u("attention.sliding_window", w);
                check_layer_types(cfg, family, n_layers)?;
            }
        }
    }
    let tied = cfg.opt_bool(&["tie_word_embeddings"])?.unwrap_or(true);
    Ok(Shape { n_heads, vocab_size, tied })
}

/// GPT-2-style configs name their GELU: the tanh approximation or the exact one.
fn gelu_kind(cfg: &Config, activation: Option<&str>, asm: &mut Assembly) -> Result<(), HfError> {
    let kind = match activation {
        Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") => "gelu_tanh",
        Some("gelu") | None => match asm.arch {
            // GPT-J's and GPT-2's default is the tanh approximation.
            "gptj" | "gpt2" if activation.is_none() => "gelu_tanh",
            _ => "gelu_erf",
        },
        Some(other) => return Err(err(cfg.path, format!("activation '{}' is not supported", crate::one_line(other)))),
    };
    asm.md.insert("keyformer.activation".into(), MetaValue::String(kind.into()));
    Ok(())
}

/// A config's `layer_types` must slide where the family's layers do.
fn check_layer_types(cfg: &Config, family: &Family, n_layers: usize) -> Result<(), HfError> {
    let Some(types) = cfg.get(&["layer_types"]).and_then(Value::as_array) else { return Ok(()) };
    for (l, t) in types.iter().enumerate().take(n_layers) {
        let slides = t.as_str() == Some("sliding_attention");
        if slides != family.slides(l) {
            return Err(err(
                cfg.path,
                format!(
                    "layer_types[{l}] is {t}, where a {} model's layers alternate differently",
                    family.architecture
                ),
            ));
        }
    }
    Ok(())
}

/// RoPE scaling from the config's `rope_parameters` / `rope_scaling`.
fn rope_scaling(
    cfg: &Config,
    rope: Option<&Config>,
    theta: f64,
    rope_dim: usize,
    context: usize,
    asm: &mut Assembly,
) -> Result<(), HfError> {
    let Some(r) = rope else { return Ok(()) };
    let kind = r.opt_str(&["rope_type", "type"]).unwrap_or("default");
    let factor = r.opt_f64(&["factor"])?;
    let original = match r.opt_usize(&["original_max_position_embeddings"])? {
        Some(o) => Some(o),
        None => cfg.opt_usize(&["original_max_position_embeddings"])?,
    };
    match kind {
        "default" => {}
        "linear" => {
            asm.set("rope.scaling.type", MetaValue::String("linear".into()));
            asm.set_f("rope.scaling.factor", factor.unwrap_or(1.0));
        }
        "yarn" => {
            asm.set("rope.scaling.type", MetaValue::String("yarn".into()));
            asm.set_f("rope.scaling.factor", factor.unwrap_or(1.0));
            asm.set_u("rope.scaling.original_context_length", original.unwrap_or(context));
            for (hf, gguf) in [("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")] {
                if let Some(b) = r.opt_f64(&[hf])? {
                    asm.set_f(&format!("rope.scaling.{gguf}"), b);
                }
            }
        }
        "llama3" => {
            // The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight`.
            let factor = factor.unwrap_or(8.0);
            let low = r.opt_f64(&["low_freq_factor"])?.unwrap_or(1.0);
            let high = r.opt_f64(&["high_freq_factor"])?.unwrap_or(4.0);
            let old = original.unwrap_or(8192) as f64;
            let divisors = (0..rope_dim / 2)
                .map(|i| {
                    let freq = (1.0 / theta.powf(2.0 * i as f64 / rope_dim as f64)) as f32 as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < old / high {
                        1.0
                    } else if wavelen > old / low {
                        factor as f32
                    } else {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                    }
                })
                .collect();
            asm.extra.push(("rope_freqs.weight".into(), divisors));
        }
        "longrope" | "su" => {
            let list = |k: &str| -> Result<Vec<f32>, HfError> {
                let v = r
                    .get(&[k])
                    .and_then(Value::as_array)
                    .ok_or_else(|| err(cfg.path, format!("longrope without {k}")))?;
                let f: Option<Vec<f32>> = v.iter().map(|x| x.as_f64().map(|x| x as f32)).collect();
                match f {
                    Some(f) if f.len() == rope_dim / 2 => Ok(f),
                    _ => {
                        Err(err(cfg.path, format!("{k} must be {} numbers (half the rotary dimensions)", rope_dim / 2)))
                    }
                }
            };
            let original = original.unwrap_or(context);
            let scale = context as f64 / original as f64;
            let attn_factor = match r.opt_f64(&["attention_factor"])? {
                Some(a) => a,
                None if scale > 1.0 => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
                None => 1.0,
            };
            asm.set_u("rope.scaling.original_context_length", original);
            asm.set_f("rope.scaling.attn_factor", attn_factor);
            asm.extra.push(("rope_factors_long.weight".into(), list("long_factor")?));
            asm.extra.push(("rope_factors_short.weight".into(), list("short_factor")?));
        }
        other => {
            return Err(err(cfg.path, format!("rope scaling '{}' is not supported", crate::one_line(other))));
        }
    }
    Ok(())
}

/// The safetensors files of a folder: one, or the shards its index names.
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.is_file() {
        return Ok(vec![single]);
    }
    if !index.is_file() {
        return Err(err(
            dir,
            "no model.safetensors or model.safetensors.index.json (weights in safetensors are needed)",
        ));
    }
    let v = read_json(&index)?;
    let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| err(&index, "no weight_map"))?;
    let mut files = BTreeSet::new();
    for (name, file) in map {
        let file = file.as_str().ok_or_else(|| err(&index, format!("the shard of {name} is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(err(&index, format!("shard '{}' is not a file of the folder", crate::one_line(file))));
        }
        files.insert(file.to_string());
    }
    let mut paths = Vec::new();
    for f in files {
        let p = dir.join(&f);
        if !p.is_file() {
            return Err(err(&index, format!("names shard {f}, which the folder does not have")));
        }
        paths.push(p);
    }
    Ok(paths)
}

/// Map every shard and name its tensors as GGUF does.
#[allow(clippy::type_complexity)]
fn map_weights(dir: &Path, naming: &Naming, shape: &Shape) -> Result<(Vec<(PathBuf, Mmap)>, Vec<TensorInfo>), HfError> {
    let mut sources = Vec::new();
    let mut tensors: Vec<TensorInfo> = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for path in shard_files(dir)? {
        let file = std::fs::File::open(&path).map_err(|e| err(&path, format!("cannot open it: {e}")))?;
        // SAFETY: read-only map; as for GGUF files, a file changed underneath is not guarded against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| err(&path, format!("cannot map it: {e}")))?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| err(&path, format!("not a valid safetensors file: {e:?}")))?;
        let data_start = 8 + header_len;
        let shard = sources.len();
        let file_name = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        for hf_name in meta.offset_keys() {
            let info = meta.info(&hf_name).expect("a listed tensor");
            if naming.ignored.iter().any(|s| hf_name.ends_with(s)) {
                continue;
            }
            let Some(gguf) = naming.gguf_name(&hf_name) else {
                return Err(err(
                    &path,
                    format!(
                        "tensor '{}' is not part of a {} model (or a variant this engine does not run)",
                        crate::one_line(&hf_name),
                        naming.architecture
                    ),
                ));
            };
            if gguf.starts_with("output.") && shape.tied {
                continue; // tied to the embedding: transformers reads the embedding too
            }
            if let Some(other) = seen.insert(gguf.clone(), hf_name.clone()) {
                return Err(err(&path, format!("tensors '{other}' and '{hf_name}' both give {gguf}")));
            }
            let ggml_type = match info.dtype {
                safetensors::Dtype::F32 => GgmlType::F32,
                safetensors::Dtype::F16 => GgmlType::F16,
                safetensors::Dtype::BF16 => GgmlType::BF16,
                other => {
                    return Err(err(
                        &path,
                        format!("tensor '{hf_name}' is {other:?}; weights in F32, F16 or BF16 are supported"),
                    ))
                }
            };
            let (start, end) = info.data_offsets;
            let (Some(offset), Some(_)) = (data_start.checked_add(start), data_start.checked_add(end)) else {
                return Err(err(&path, format!("tensor '{hf_name}' has offsets past any file")));
            };
            if data_start + end > mmap.len() {
                return Err(err(
                    &path,
                    format!("tensor '{hf_name}' lies past the end of the file ({} bytes): truncated?", mmap.len()),
                ));
            }
            if info.shape.is_empty() || info.shape.len() > 2 {
                return Err(err(
                    &path,
                    format!("tensor '{hf_name}' has shape {:?}: 1 or 2 dimensions expected", info.shape),
                ));
            }
            tensors.push(TensorInfo {
                name: gguf,
                dims: info.shape.iter().rev().copied().collect(),
                ggml_type,
                offset,
                size_bytes: end - start,
                source: shard,
                origin: Some(format!("{hf_name} in {file_name}")),
            });
        }
        sources.push((path, mmap));
    }
    if !shape.tied && !tensors.iter().any(|t| t.name == "output.weight") {
        let head = naming.names.iter().find(|(_, g)| *g == "output").map_or("lm_head", |(h, _)| *h);
        return Err(err(dir, format!("tie_word_embeddings is false but the weights have no {head}.weight")));
    }
    Ok((sources, tensors))
}

/// Convert the tensors that need it into one new mapping, with the config's f32 tensors (whose
/// infos are returned).
fn convert_tensors(
    dir: &Path,
    sources: &[(PathBuf, Mmap)],
    tensors: &mut [TensorInfo],
    arch: &str,
    shape: &Shape,
    extra: &[(String, Vec<f32>)],
) -> Result<(Option<Mmap>, Vec<TensorInfo>), HfError> {
    let mut out: Vec<u8> = Vec::new();
    let mut new_infos = Vec::new();
    let index = sources.len();
    for t in tensors.iter_mut() {
        let conv = conversion(arch, &t.name, shape.n_heads);
        if conv == Convert::None {
            continue;
        }
        let (path, mmap) = &sources[t.source];
        let bytes = &mmap[t.offset..t.offset + t.size_bytes];
        let elem = t.ggml_type.block_bytes();
        let converted = match conv {
            Convert::None => unreachable!("skipped above"),
            Convert::Transpose => {
                let [cols, rows] = t.dims[..] else {
                    return Err(err(path, format!("tensor {} should be a matrix", t.origin.as_deref().unwrap_or(""))));
                };
                // Stored rows x cols (in x out); wanted cols x rows.
                let mut o = vec![0u8; bytes.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        let (src, dst) = ((r * cols + c) * elem, (c * rows + r) * elem);
                        o[dst..dst + elem].copy_from_slice(&bytes[src..src + elem]);
                    }
                }
                t.dims = vec![rows, cols];
                o
            }
            Convert::NeoxQkv { n_heads } => {
                // Rows are [head][q|k|v][head_dim]; biases are one row of the same layout.
                let row_bytes = if t.dims.len() == 2 { t.dims[0] * elem } else { elem };
                let total_rows = t.size_bytes / row_bytes;
                if n_heads == 0 || total_rows % (3 * n_heads) != 0 {
                    return Err(err(path, format!("fused QKV {} does not split over {n_heads} heads", t.name)));
                }
                let hd = total_rows / (3 * n_heads);
                let mut o = Vec::with_capacity(bytes.len());
                for part in 0..3 {
                    for h in 0..n_heads {
                        let first = (h * 3 + part) * hd;
                        o.extend_from_slice(&bytes[first * row_bytes..(first + hd) * row_bytes]);
                    }
                }
                o
            }
            Convert::AddOne => {
                let mut v = vec![0f32; t.n_elements()];
                crate::quant::dequantize_row(t.ggml_type, bytes, &mut v);
                t.ggml_type = GgmlType::F32;
                v.iter().flat_map(|x| (x + 1.0).to_le_bytes()).collect()
            }
        };
        t.offset = out.len();
        t.size_bytes = converted.len();
        t.source = index;
        out.extend_from_slice(&converted);
        // Keep each tensor 4-byte aligned for f32 readers.
        out.resize(out.len().next_multiple_of(4), 0);
    }
    for (name, values) in extra {
        new_infos.push(TensorInfo {
            name: name.clone(),
            dims: vec![values.len()],
            ggml_type: GgmlType::F32,
            offset: out.len(),
            size_bytes: values.len() * 4,
            source: index,
            origin: Some(format!("computed from {}", dir.join("config.json").display())),
        });
        out.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    }
    if out.is_empty() {
        return Ok((None, new_infos));
    }
    let mut anon =
        memmap2::MmapMut::map_anon(out.len()).map_err(|e| err(dir, format!("memory for converted tensors: {e}")))?;
    anon.copy_from_slice(&out);
    let map = anon.make_read_only().map_err(|e| err(dir, format!("memory for converted tensors: {e}")))?;
    Ok((Some(map), new_infos))
}

/// The tokenizer from `tokenizer.json`, its special tokens from `tokenizer_config.json` and
/// `generation_config.json`, the chat template into the metadata.
fn open_tokenizer(
    dir: &Path,
    cfg: &Config,
    vocab_size: usize,
    md: &mut BTreeMap<String, MetaValue>,
) -> Result<Tokenizer, crate::ModelError> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(err(dir, "no tokenizer.json (the tokenizer is read from it)").into());
    }
    let json = std::fs::read(&tok_path).map_err(|e| err(&tok_path, format!("cannot read it: {e}")))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = read_optional_json(&tc_path)?.unwrap_or(Value::Null);
    let gen_path = dir.join("generation_config.json");
    let gen = read_optional_json(&gen_path)?.unwrap_or(Value::Null);
    // A special token is a string or an AddedToken object with its `content`.
    let token_text = |v: Option<&Value>| -> Option<String> {
        let v = v?;
        v.as_str().map(str::to_string).or_else(|| v.get("content")?.as_str().map(str::to_string))
    };
    let ids = |v: Option<&Value>| -> Vec<u32> {
        match v {
            Some(Value::Number(n)) => n.as_u64().map(|i| i as u32).into_iter().collect(),
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|i| i as u32)).collect(),
            _ => Vec::new(),
        }
    };
    let mut eos_ids = ids(gen.get("eos_token_id"));
    if eos_ids.is_empty() {
        eos_ids = ids(cfg.get(&["eos_token_id"]));
    }
    let settings = HfTokenizerSettings {
        bos_token: token_text(tc.get("bos_token")),
        eos_token: token_text(tc.get("eos_token")),
        bos_id: ids(gen.get("bos_token_id"))
            .first()
            .copied()
            .or_else(|| ids(cfg.get(&["bos_token_id"])).first().copied()),
        eos_ids,
        add_bos: tc.get("add_bos_token").and_then(Value::as_bool),
        vocab_size,
    };
    let tokenizer = Tokenizer::from_hf_json(&json, &settings).map_err(|e| err(&tok_path, e.to_string()))?;
    let template_file = dir.join("chat_template.jinja");
    let template = if template_file.is_file() {
        Some(std::fs::read_to_string(&template_file).map_err(|e| err(&template_file, format!("cannot read it: {e}")))?)
    } else {
        match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        }
    };
    if let Some(t) = template {
        md.insert("tokenizer.chat_template".into(), MetaValue::String(t));
    }
    Ok(tokenizer)
}

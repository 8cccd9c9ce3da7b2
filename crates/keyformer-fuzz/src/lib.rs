//! Fuzzing keyformer's inputs on stable Rust: structured mutations of a small seed corpus,
//! run for a fixed number of cases (CI) or for a time (`scripts/fuzz.sh`), each case checked
//! for panics (caught, the input saved), hangs (a watchdog), its heap growth against a bound
//! and the shape of its error (one line).
//!
//! Targets: `gguf` (a mutated tiny model file, parsed, then loaded as an engine: model and
//! tokenizer), `tokenizer` (mutated text encoded and decoded by real vocabularies, byte-level
//! BPE round-tripping exactly), `chat` (every family's chat template, sometimes mutated,
//! rendering hostile messages) and `request` (mutated OpenAI request bodies through the
//! server's parser, then the KV plan they ask for).

pub mod alloc;
pub mod mutate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyformer::chat::ChatMessage;
use keyformer::gguf::GgufFile;
use keyformer::tokenizer::Tokenizer;
use keyformer::Engine;
use mutate::Mutator;
use serde_json::Value;

/// A case's heap growth must stay under this plus [`BOUND_PER_INPUT_BYTE`] times its input.
pub const BOUND_FIXED: usize = 16 << 20;
pub const BOUND_PER_INPUT_BYTE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Gguf,
    Tokenizer,
    Chat,
    Request,
}

impl Target {
    pub const ALL: [Target; 4] = [Target::Gguf, Target::Tokenizer, Target::Chat, Target::Request];
    pub fn name(self) -> &'static str {
        match self {
            Target::Gguf => "gguf",
            Target::Tokenizer => "tokenizer",
            Target::Chat => "chat",
            Target::Request => "request",
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Target::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown target '{s}' (gguf, tokenizer, chat, request)"))
    }
}

/// What the cases are made from.
pub struct Seeds {
    /// GGUF files: name, bytes, and where their tensor data starts (mutations favour the bytes before).
    ggufs: Vec<(String, Vec<u8>, usize)>,
    /// Tokenizers: name, the tokenizer, and whether decode(encode(text)) must give the text back.
    tokenizers: Vec<(String, Tokenizer, bool)>,
    templates: Vec<(String, String)>,
    texts: Vec<String>,
    requests: Vec<Value>,
}

impl Seeds {
    /// The corpus: the tiny family models of `tests/golden/families` (files, vocabularies and
    /// chat templates), `tests/data` texts, `tests/fuzz/request` bodies, and llama.cpp's
    /// vocabulary files when `vocab_dir` holds them.
    pub fn load(repo: &Path, vocab_dir: Option<&Path>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let list = |dir: &Path, ext: &str| -> anyhow::Result<Vec<PathBuf>> {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .collect();
            files.sort();
            Ok(files)
        };
        let mut seeds = Seeds {
            ggufs: Vec::new(),
            tokenizers: Vec::new(),
            templates: Vec::new(),
            texts: Vec::new(),
            requests: Vec::new(),
        };
        for path in list(&repo.join("tests/golden/families"), "gguf")? {
            let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path)?;
            let file = GgufFile::from_bytes(&path, &bytes)?;
            let data_start = file.tensors.iter().map(|t| t.offset).min().unwrap_or(bytes.len());
            if let Some(t) = file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
                seeds.templates.push((name.clone(), t.to_string()));
            }
            seeds.ggufs.push((name, bytes, data_start));
        }
        // Two families' vocabularies are enough among the tiny models (they share a few).
        for (name, _, _) in seeds.ggufs.iter().filter(|g| g.0 == "llama" || g.0 == "gemma2") {
            let file = GgufFile::open(repo.join(format!("tests/golden/families/{name}.gguf")))?;
            seeds.tokenizers.push((name.clone(), Tokenizer::from_gguf(&file)?, false));
        }
        if let Some(dir) = vocab_dir.filter(|d| d.is_dir()) {
            for path in list(dir, "gguf")? {
                let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                let Ok(file) = GgufFile::open(&path) else { continue };
                // Round trips are owed only by byte-level vocabularies holding a token for every
                // byte (StarCoder's lacks some and drops them, as it was trained).
                let byte_level = file.get("tokenizer.ggml.model").and_then(|v| v.as_str()) == Some("gpt2")
                    && file.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).is_some_and(|tokens| {
                        let have: std::collections::HashSet<&str> = tokens.iter().filter_map(|t| t.as_str()).collect();
                        (0..=255u8).all(|b| have.contains(gpt2_byte_char(b).encode_utf8(&mut [0; 4]) as &str))
                    });
                let md = &file.metadata;
                // Supported vocabularies only (the vocabulary test says which those are).
                if let Ok(t) = Tokenizer::from_metadata_with(md, true) {
                    seeds.tokenizers.push((name.clone(), t, false));
                }
                if byte_level {
                    if let Ok(t) = Tokenizer::from_metadata_with(md, false) {
                        seeds.tokenizers.push((format!("{name} (specials as text)"), t, true));
                    }
                }
            }
        }
        for path in list(&repo.join("tests/data"), "txt")? {
            seeds.texts.push(std::fs::read_to_string(path)?);
        }
        for path in list(&repo.join("tests/fuzz/request"), "json")? {
            let text = std::fs::read_to_string(&path)?;
            seeds.requests.push(serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?);
        }
        anyhow::ensure!(
            !seeds.ggufs.is_empty() && !seeds.texts.is_empty() && !seeds.requests.is_empty(),
            "an empty corpus"
        );
        Ok(seeds)
    }

    pub fn describe(&self) -> String {
        format!(
            "{} GGUF files, {} tokenizers, {} chat templates, {} texts, {} request bodies",
            self.ggufs.len(),
            self.tokenizers.len(),
            self.templates.len(),
            self.texts.len(),
            self.requests.len()
        )
    }
}

/// The character GPT-2's byte-level alphabet writes for byte `b` (printable bytes stand for
/// themselves, the others are moved above 255).
fn gpt2_byte_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    if printable(b) {
        return char::from(b);
    }
    let shift = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shift).expect("a valid char")
}

/// One case's input, made from (run seed, case number) alone, so that any case can be replayed.
pub enum Input {
    Gguf(Vec<u8>),
    Text { tokenizer: usize, text: String, ids: Vec<u32> },
    Chat { template: String, messages: Vec<ChatMessage> },
    Request(Vec<u8>),
}

impl Input {
    pub fn make(target: Target, seeds: &Seeds, run_seed: u64, case: u64) -> Self {
        let mut m = Mutator::new(run_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ case);
        let text_seed = &seeds.texts[m.below(seeds.texts.len())];
        match target {
            Target::Gguf => {
                let (_, bytes, hot) = &seeds.ggufs[m.below(seeds.ggufs.len())];
                Input::Gguf(m.bytes(bytes, *hot))
            }
            Target::Tokenizer => {
                let tokenizer = m.below(seeds.tokenizers.len());
                let text = m.text(text_seed, 400);
                let vocab = seeds.tokenizers.get(tokenizer).map_or(1, |t| t.1.vocab_size());
                let ids = (0..m.below(20)).map(|_| m.below(vocab + vocab / 8 + 2) as u32).collect();
                Input::Text { tokenizer, text, ids }
            }
            Target::Chat => {
                let (_, template) = &seeds.templates[m.below(seeds.templates.len())];
                let template = if m.below(10) < 3 { m.text(template, 4000) } else { template.clone() };
                let roles = ["system", "user", "assistant", "user", "tool", "{{", ""];
                let messages = (0..m.below(6))
                    .map(|_| ChatMessage {
                        role: roles[m.below(roles.len())].to_string(),
                        content: m.text(text_seed, 200),
                    })
                    .collect();
                Input::Chat { template, messages }
            }
            Target::Request => {
                let seed = &seeds.requests[m.below(seeds.requests.len())];
                Input::Request(m.request(seed, text_seed))
            }
        }
    }

    /// Bytes the input is made of (what the allocation bound scales with).
    pub fn len(&self) -> usize {
        match self {
            Input::Gguf(b) | Input::Request(b) => b.len(),
            Input::Text { text, ids, .. } => text.len() + 4 * ids.len(),
            Input::Chat { template, messages } => {
                template.len() + messages.iter().map(|m| m.role.len() + m.content.len()).sum::<usize>()
            }
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The input as a file, to reproduce a failure outside the fuzzer.
    pub fn to_file_bytes(&self) -> Vec<u8> {
        match self {
            Input::Gguf(b) | Input::Request(b) => b.clone(),
            Input::Text { tokenizer, text, ids } => {
                serde_json::json!({"tokenizer": tokenizer, "text": text, "ids": ids}).to_string().into_bytes()
            }
            Input::Chat { template, messages } => {
                serde_json::json!({"template": template, "messages": messages}).to_string().into_bytes()
            }
        }
    }
}

/// What a case did that it must not.
#[derive(Debug)]
pub struct Violation(pub String);

/// Run one case: `Ok(None)` accepted, `Ok(Some(error))` refused with that error.
pub fn run_case(seeds: &Seeds, input: &Input) -> Result<Option<String>, Violation> {
    let refused = |e: String| {
        if e.contains('\n') {
            Err(Violation(format!("an error of more than one line: {e:?}")))
        } else {
            Ok(Some(e))
        }
    };
    match input {
        Input::Gguf(bytes) => {
            let file = match GgufFile::from_bytes("fuzz.gguf", bytes) {
                Ok(f) => Arc::new(f),
                Err(e) => return refused(e.to_string()),
            };
            match Engine::from_file(file, "fuzz".into()) {
                Ok(engine) => {
                    // A model that loads must also tokenise and render its chat prompt.
                    if let Err(e) = engine.encode("Hello, world! 123") {
                        return refused(e.to_string());
                    }
                    match engine.chat_prompt("Hi") {
                        Ok(_) => Ok(None),
                        Err(e) => refused(e.to_string()),
                    }
                }
                Err(e) => refused(e.to_string()),
            }
        }
        Input::Text { tokenizer, text, ids } => {
            let Some((name, t, round_trips)) = seeds.tokenizers.get(*tokenizer) else { return Ok(None) };
            let encoded = match t.encode(text, *tokenizer % 2 == 0) {
                Ok(e) => e,
                Err(e) => return refused(e.to_string()),
            };
            if let Some(&bad) = encoded.iter().find(|&&id| id as usize >= t.vocab_size()) {
                return Err(Violation(format!("{name}: encode gave id {bad} outside the vocabulary")));
            }
            if *round_trips {
                let plain = t.encode(text, false).map_err(|e| Violation(e.to_string()))?;
                let back = t.decode(&plain).map_err(|e| Violation(e.to_string()))?;
                if &back != text {
                    return Err(Violation(format!("{name}: decode(encode({text:?})) = {back:?}")));
                }
            }
            match t.decode(ids) {
                Ok(_) => Ok(None),
                Err(e) => refused(e.to_string()),
            }
        }
        Input::Chat { template, messages } => match keyformer::chat::render(template, messages, "<s>", "</s>") {
            Ok(_) => Ok(None),
            Err(e) => refused(e.to_string()),
        },
        Input::Request(body) => {
            use keyformer_server::api::{parse_chat, parse_completion, Defaults};
            let defaults =
                Defaults { kv: Default::default(), model_name: "smollm2-135m".into(), completion_max_tokens: 16 };
            let chat = body.windows(10).any(|w| w == b"\"messages\"");
            let parsed = if chat { parse_chat(body, &defaults) } else { parse_completion(body, &defaults) };
            match parsed {
                Ok(p) => {
                    // The plan the request's KV settings make for a prompt (SmolLM2's shape).
                    let steps = p.req.max_tokens.min(1 << 20);
                    match p.req.kv.resolve(1 + body.len() % 10_000, steps, 30, 3) {
                        Ok(_) => Ok(None),
                        Err(e) => refused(e.to_string()),
                    }
                }
                Err(e) => refused(e.message),
            }
        }
    }
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub cases: u64,
    pub seconds: Option<f64>,
    pub seed: u64,
    pub threads: usize,
    /// Where failing inputs are written.
    pub out: PathBuf,
    /// A case running this long is a hang: the input is saved and the process exits.
    pub hang_seconds: f64,
    /// Print a progress line this often (0: never).
    pub progress_seconds: f64,
}

/// What a run found.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub target: String,
    pub cases: u64,
    pub accepted: u64,
    pub refused: u64,
    pub panics: Vec<(u64, String)>,
    pub violations: Vec<(u64, String)>,
    pub over_bound: Vec<(u64, usize)>,
    pub slowest_ms: f64,
    pub slowest_case: u64,
    pub max_heap_growth: usize,
    pub max_heap_growth_case: u64,
    pub seconds: f64,
    /// The most frequent refusals (digits folded), to see what the mutations reach.
    pub top_errors: Vec<(String, u64)>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.panics.is_empty() && self.violations.is_empty() && self.over_bound.is_empty()
    }
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Run `target` for `opts.cases` cases (or until `opts.seconds` pass).
pub fn run(target: Target, seeds: &Seeds, opts: &RunOptions) -> Report {
    std::panic::set_hook(Box::new(|info| {
        let msg = info.to_string().replace('\n', " ");
        LAST_PANIC.with(|p| *p.borrow_mut() = msg);
    }));
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let report = Mutex::new(Report { target: target.name().into(), ..Default::default() });
    let errors: Mutex<BTreeMap<String, u64>> = Mutex::default();
    let threads = opts.threads.max(1);
    // Per worker: the case running and when it began (ms since start; u64::MAX when idle).
    let running: Vec<(AtomicU64, AtomicU64)> =
        (0..threads).map(|_| (AtomicU64::new(0), AtomicU64::new(u64::MAX))).collect();
    std::thread::scope(|scope| {
        for w in 0..threads {
            let (next, stop, report, errors, running) = (&next, &stop, &report, &errors, &running);
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let case = next.fetch_add(1, Ordering::Relaxed);
                if case >= opts.cases || opts.seconds.is_some_and(|s| start.elapsed().as_secs_f64() > s) {
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
                let input = Input::make(target, seeds, opts.seed, case);
                running[w].0.store(case, Ordering::Relaxed);
                running[w].1.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
                let t = Instant::now();
                let level = alloc::start();
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(seeds, &input)));
                let growth = alloc::peak_growth(level);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                running[w].1.store(u64::MAX, Ordering::Relaxed);
                let mut r = report.lock().unwrap_or_else(|e| e.into_inner());
                r.cases += 1;
                if ms > r.slowest_ms {
                    (r.slowest_ms, r.slowest_case) = (ms, case);
                }
                if growth > r.max_heap_growth {
                    (r.max_heap_growth, r.max_heap_growth_case) = (growth, case);
                }
                let save = |kind: &str| {
                    let _ = std::fs::create_dir_all(&opts.out);
                    let path = opts.out.join(format!("{kind}-{}-seed{}-case{case}.bin", target.name(), opts.seed));
                    let _ = std::fs::write(path, input.to_file_bytes());
                };
                if growth > BOUND_FIXED + BOUND_PER_INPUT_BYTE * input.len() {
                    r.over_bound.push((case, growth));
                    save("heap");
                }
                match outcome {
                    Ok(Ok(None)) => r.accepted += 1,
                    Ok(Ok(Some(e))) => {
                        r.refused += 1;
                        let folded: String =
                            e.chars().take(70).map(|c| if c.is_ascii_digit() { '#' } else { c }).collect();
                        *errors.lock().unwrap_or_else(|e| e.into_inner()).entry(folded).or_default() += 1;
                    }
                    Ok(Err(Violation(v))) => {
                        r.violations.push((case, v));
                        save("violation");
                    }
                    Err(_) => {
                        let msg = LAST_PANIC.with(|p| p.borrow().clone());
                        r.panics.push((case, msg));
                        save("panic");
                    }
                }
            });
        }
        // The watchdog: a case past the hang limit cannot be stopped, so its input is saved
        // and the process ends with the reason.
        let (stop, running, report) = (&stop, &running, &report);
        scope.spawn(move || {
            let mut last_progress = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let now = start.elapsed().as_millis() as u64;
                for (case, began) in running {
                    let began = began.load(Ordering::Relaxed);
                    if began != u64::MAX && now.saturating_sub(began) as f64 > opts.hang_seconds * 1e3 {
                        let case = case.load(Ordering::Relaxed);
                        let input = Input::make(target, seeds, opts.seed, case);
                        let _ = std::fs::create_dir_all(&opts.out);
                        let path = opts.out.join(format!("hang-{}-seed{}-case{case}.bin", target.name(), opts.seed));
                        let _ = std::fs::write(&path, input.to_file_bytes());
                        eprintln!(
                            "{}: case {case} ran past {} s (a hang); its input is {}",
                            target.name(),
                            opts.hang_seconds,
                            path.display()
                        );
                        std::process::exit(3);
                    }
                }
                if opts.progress_seconds > 0.0 && last_progress.elapsed().as_secs_f64() >= opts.progress_seconds {
                    last_progress = Instant::now();
                    let r = report.lock().unwrap_or_else(|e| e.into_inner());
                    let secs = start.elapsed().as_secs_f64();
                    eprintln!(
                        "{}: {} cases in {secs:.0} s ({:.0}/s), {} panics, {} violations, {} over the heap bound",
                        target.name(),
                        r.cases,
                        r.cases as f64 / secs,
                        r.panics.len(),
                        r.violations.len(),
                        r.over_bound.len()
                    );
                }
            }
        });
    });
    let mut r = report.into_inner().unwrap_or_else(|e| e.into_inner());
    r.seconds = start.elapsed().as_secs_f64();
    let mut top: Vec<(String, u64)> = errors.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1));
    top.truncate(12);
    r.top_errors = top;
    let _ = std::panic::take_hook();
    r
}

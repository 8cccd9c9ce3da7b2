//! The evaluation matrix behind `keyformer eval`: tasks x policies x budgets x seeds over a set
//! of documents, one JSON row per case in `results.jsonl` (appended as each case finishes, so
//! an interrupted run resumes where it stopped), then `summary.json`, `summary.md` and one SVG
//! plot per task and metric (quality against budget, a line per policy).
//!
//! Tasks: `fidelity` (KL divergence against the full cache on a teacher-forced continuation),
//! `generation` (greedy continuation of the compressed cache against the full cache's: ROUGE
//! and identical prefix), `summary` (a chat-template summary of the document: ROUGE against the
//! human reference and against the full cache's summary), `needle` (a passkey hidden at a depth
//! of a haystack of real text, asked for after it), `ppl` (streaming perplexity), and `ruler`
//! / `ruler_inside` (RULER-style synthetic tasks, [`crate::eval::ruler`]: the question after the
//! compressed context, kvpress's protocol, or inside the prompt that is compressed).
//!
//! Every prompt but perplexity's (which streams, so eviction starts inside it) is prefilled
//! once with the full cache; that prefill records every policy's prompt scores, and each
//! policy, budget and seed compresses its own copy ([`Engine::shared_prefill`]). The full
//! cache's own answer for the prompt is computed once and compared against.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use keyformer_kv::{Amount, NoiseKind, PolicyConfig, PolicyKind};
use serde::{Deserialize, Serialize};

use crate::eval::fidelity::{fidelity_against, teacher_forced_logits};
use crate::eval::plot::{line_chart_svg, Series, YKind};
use crate::eval::rouge;
use crate::eval::ruler::{self, Haystack, RulerCase, RulerMode, RulerTask};
use keyformer::engine::GenerateRequest;
use keyformer::sampling::SamplingParams;
use keyformer::{Engine, ModelError};

/// One document: any JSONL of `{id, context, question?, reference?}` is accepted.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Document {
    pub id: String,
    pub context: String,
    /// Summary task: the instruction after the document (default: a request for a summary).
    #[serde(default)]
    pub question: Option<String>,
    /// Summary task: the human-written summary.
    #[serde(default)]
    pub reference: Option<String>,
}

/// Load documents: a `.jsonl` file holds one per line; any other file is one document.
pub fn load_documents(path: &Path) -> Result<Vec<Document>, ModelError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ModelError::Input(format!("reading {}: {e}", path.display())))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| ModelError::Input(format!("{} line {}: {e}", path.display(), i + 1)))
            })
            .collect()
    } else {
        let id = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(vec![Document { id, context: text, question: None, reference: None }])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    Fidelity,
    Generation,
    Summary,
    Needle,
    Ppl,
    /// RULER-style tasks, the question after compression.
    Ruler,
    /// The same cases with the question compressed with the prompt.
    RulerInside,
}

impl Task {
    pub const ALL: [Task; 7] =
        [Task::Fidelity, Task::Generation, Task::Summary, Task::Needle, Task::Ppl, Task::Ruler, Task::RulerInside];

    pub fn name(self) -> &'static str {
        match self {
            Task::Fidelity => "fidelity",
            Task::Generation => "generation",
            Task::Summary => "summary",
            Task::Needle => "needle",
            Task::Ppl => "ppl",
            Task::Ruler => "ruler",
            Task::RulerInside => "ruler_inside",
        }
    }

    fn ruler_mode(self) -> Option<RulerMode> {
        match self {
            Task::Ruler => Some(RulerMode::After),
            Task::RulerInside => Some(RulerMode::Inside),
            _ => None,
        }
    }
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Task::ALL.into_iter().find(|t| t.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Task::ALL.iter().map(|t| t.name()).collect();
            format!("unknown task '{s}' (available: {})", names.join(", "))
        })
    }
}

/// A policy with its own settings, labelled as written (`keyformer:noise=none`); the syntax
/// is [`PolicyConfig::parse_spec`]'s, the same as `--kv-policy` and a server request's.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVariant {
    pub label: String,
    pub config: PolicyConfig,
}

impl PolicyVariant {
    pub fn parse(spec: &str, defaults: &PolicyConfig) -> Result<Self, String> {
        let config = PolicyConfig::parse_spec(spec, defaults).map_err(|e| e.to_string())?;
        Ok(Self { label: spec.trim().to_string(), config })
    }

    fn seeded(&self) -> bool {
        match self.config.kind {
            PolicyKind::Random => true,
            PolicyKind::Keyformer => !matches!(self.config.keyformer.noise, NoiseKind::None | NoiseKind::Constant),
            _ => false,
        }
    }

    /// The configuration of one case.
    pub fn case(&self, budget: Amount, seed: u64) -> PolicyConfig {
        PolicyConfig { budget: Some(budget), seed, ..self.config.clone() }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub tasks: Vec<Task>,
    pub policies: Vec<PolicyVariant>,
    pub budgets: Vec<Amount>,
    pub seeds: Vec<u64>,
    /// Documents used at most.
    pub limit: Option<usize>,
    /// Fidelity and generation: prompt tokens (compressed to the budget) and tokens after it
    /// (teacher-forced, or generated). Summary: document tokens kept at most.
    pub prompt_tokens: usize,
    pub continuation_tokens: usize,
    /// Summary: tokens generated at most.
    pub summary_tokens: usize,
    /// Perplexity: window length (a percentage budget is of the window).
    pub ppl_ctx: usize,
    /// Needle: haystack lengths in tokens, and depths (percent of the haystack) of the passkey.
    pub needle_lengths: Vec<usize>,
    pub needle_depths: Vec<u32>,
    /// RULER: which tasks, prompt lengths in tokens (capped at the model's context), cases per
    /// task and length, and the seed the cases are drawn from.
    pub ruler_tasks: Vec<RulerTask>,
    pub ruler_lengths: Vec<usize>,
    pub ruler_samples: usize,
    pub ruler_seed: u64,
    /// RULER: answer tokens at most (RULER's per-task limit when `None`).
    pub ruler_answer_tokens: Option<usize>,
}

/// One finished case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseRow {
    pub task: String,
    pub doc: String,
    pub policy: String,
    pub budget: String,
    pub seed: u64,
    pub metrics: BTreeMap<String, f64>,
    /// The text generated (generation, summary and needle), to read beside the scores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The full cache's text for the same prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_output: Option<String>,
    /// Fingerprints of what made the row: the model (its file, shape and KV type) and the
    /// case's own settings (the document's text, the task's token counts, the policy's
    /// options). A resumed run redoes rows whose fingerprints differ from its own.
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub settings: String,
}

/// FNV-1a, 64 bits, as hex: a stable fingerprint across runs and builds.
fn fingerprint(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The model's fingerprint: its file name and size, its configuration and the KV type.
fn model_fingerprint(engine: &Engine) -> String {
    let file = engine.file.as_ref().map(|f| {
        let size = std::fs::metadata(&f.path).map_or(0, |m| m.len());
        format!("{}:{size}", f.path.file_name().unwrap_or_default().to_string_lossy())
    });
    fingerprint(&format!("{file:?}|{}|{:?}|{:?}", engine.name, engine.model.config, engine.model.kv_type))
}

/// A case's own settings: what its numbers depend on besides the model and the key.
fn case_fingerprint(plan: &EvalPlan, unit: &Unit, variant: &PolicyVariant) -> String {
    let d = unit.doc;
    if let Some(case) = &unit.ruler {
        // The case's whole text: the generator's output is what the numbers depend on.
        return fingerprint(&format!("{}|{:?}", fingerprint(&format!("{case:?}")), variant.config));
    }
    let counts = match unit.task {
        Task::Fidelity | Task::Generation => format!("{} {}", plan.prompt_tokens, plan.continuation_tokens),
        Task::Summary => format!("{} {}", plan.prompt_tokens, plan.summary_tokens),
        Task::Needle => String::new(), // length and depth are in the unit's label
        Task::Ppl => plan.ppl_ctx.to_string(),
        Task::Ruler | Task::RulerInside => unreachable!("returned above"),
    };
    let text = format!("{}|{:?}|{:?}", d.context, d.question, d.reference);
    fingerprint(&format!("{}|{counts}|{:?}", fingerprint(&text), variant.config))
}

type CaseKey = (String, String, String, String, u64);

impl CaseRow {
    fn key(&self) -> CaseKey {
        (self.task.clone(), self.doc.clone(), self.policy.clone(), self.budget.clone(), self.seed)
    }
}

/// One prompt of one task: every policy, budget and seed runs on it.
struct Unit<'a> {
    task: Task,
    doc: &'a Document,
    /// Needle: haystack length and depth.
    needle: Option<(usize, u32)>,
    /// RULER: the case.
    ruler: Option<RulerCase>,
    label: String,
}

/// The full cache's answer for a unit, computed once.
enum FullAnswer {
    Logits(Vec<Vec<f32>>),
    Text { ids: Vec<u32>, text: String },
    Needle(bool),
    Ruler { score: f64 },
    None,
}

const NEEDLE_ANSWER_TOKENS: usize = 12;

/// Run `plan` over `docs`, appending to `out/results.jsonl` (cases already there are skipped),
/// then writing `summary.json`, `summary.md` and the plots. `progress(done, total)` after each case.
pub fn run_eval(
    engine: &Engine,
    plan: &EvalPlan,
    docs: &[Document],
    out: &Path,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<PathBuf, ModelError> {
    let io = |e: std::io::Error| ModelError::Input(format!("writing to {}: {e}", out.display()));
    std::fs::create_dir_all(out).map_err(io)?;
    let results = out.join("results.jsonl");
    // Keep the complete rows of an earlier run (a line cut by an interruption is dropped and
    // its case runs again), rewritten so that new rows start on a fresh line.
    let previous = read_rows(&results)?;
    let docs = &docs[..plan.limit.map_or(docs.len(), |l| l.min(docs.len()))];
    if plan.tasks.contains(&Task::Summary) {
        if let Some(d) = docs.iter().find(|d| d.reference.is_none()) {
            return Err(ModelError::Input(format!(
                "the summary task needs a reference summary; document '{}' has none",
                d.id
            )));
        }
    }

    let mut units = Vec::new();
    let ruler_cases = match plan.tasks.iter().any(|t| t.ruler_mode().is_some()) {
        true => ruler_cases(engine, plan, docs)?,
        false => Vec::new(),
    };
    for &task in &plan.tasks {
        if task.ruler_mode().is_some() {
            for case in &ruler_cases {
                units.push(Unit {
                    task,
                    doc: &docs[0],
                    needle: None,
                    ruler: Some(case.clone()),
                    label: case.id.clone(),
                });
            }
            continue;
        }
        for doc in docs {
            if task == Task::Needle {
                for &length in &plan.needle_lengths {
                    for &depth in &plan.needle_depths {
                        units.push(Unit {
                            task,
                            doc,
                            ruler: None,
                            needle: Some((length, depth)),
                            label: format!("{}@{length}@{depth}%", doc.id),
                        });
                    }
                }
            } else {
                units.push(Unit { task, doc, needle: None, ruler: None, label: doc.id.clone() });
            }
        }
    }
    let cases: Vec<(&PolicyVariant, Amount, u64)> = plan
        .policies
        .iter()
        .flat_map(|v| plan.budgets.iter().map(move |&b| (v, b)))
        .flat_map(|(v, b)| {
            let seeds: &[u64] = if v.seeded() { &plan.seeds } else { &[0] };
            seeds.iter().map(move |&s| (v, b, s))
        })
        .collect();
    let total = units.len() * cases.len();
    let key = |unit: &Unit, v: &PolicyVariant, b: Amount, seed: u64| -> CaseKey {
        (unit.task.name().to_string(), unit.label.clone(), v.label.clone(), b.to_string(), seed)
    };
    // An earlier run's rows stay only where they were made as this run would make them: the
    // same model, and for the cases of this plan the same settings. The others move to
    // results.stale.jsonl (kept, not lost) and their cases run again.
    let model = model_fingerprint(engine);
    let mut current: BTreeMap<CaseKey, String> = BTreeMap::new();
    for unit in &units {
        for &(v, b, s) in &cases {
            current.insert(key(unit, v, b, s), case_fingerprint(plan, unit, v));
        }
    }
    let (kept, stale): (Vec<CaseRow>, Vec<CaseRow>) = previous
        .into_iter()
        .partition(|r| r.model == model && current.get(&r.key()).is_none_or(|settings| &r.settings == settings));
    if !stale.is_empty() {
        let stale_path = out.join("results.stale.jsonl");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&stale_path).map_err(io)?;
        for r in &stale {
            writeln!(f, "{}", serde_json::to_string(r).expect("rows serialise")).map_err(io)?;
        }
        eprintln!(
            "eval: {} rows of {} were made with another model or other settings (data, token counts, policy \
             options); moved to {} and run again",
            stale.len(),
            results.display(),
            stale_path.display()
        );
    }
    if results.exists() {
        // Rewritten whole, so that new rows start on a fresh line after a cut one.
        let text: String = kept.iter().map(|r| serde_json::to_string(r).expect("rows serialise") + "\n").collect();
        std::fs::write(&results, text).map_err(io)?;
    }
    let done: HashSet<CaseKey> = kept.iter().map(CaseRow::key).collect();

    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&results).map_err(io)?;
    let mut tokens_of: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut finished = 0;
    for unit in &units {
        let pending: Vec<_> = cases.iter().filter(|(v, b, s)| !done.contains(&key(unit, v, *b, *s))).collect();
        finished += cases.len() - pending.len();
        progress(finished, total);
        if pending.is_empty() {
            continue;
        }
        if !tokens_of.contains_key(&unit.doc.id) && unit.ruler.is_none() {
            tokens_of.insert(unit.doc.id.clone(), engine.encode(&unit.doc.context)?);
        }
        let empty = Vec::new();
        let tokens = tokens_of.get(&unit.doc.id).unwrap_or(&empty);
        // RULER's prompt comes with a tail (after compression: the question's tokens, fed as
        // decode steps); the other tasks' have none.
        let (prompt, steps, passkey, ruler_tail) = match (&unit.ruler, unit.task.ruler_mode()) {
            (Some(case), Some(mode)) => {
                let (prompt, tail) = ruler_prompt(engine, case, mode)?;
                (prompt, case.max_new_tokens, String::new(), tail)
            }
            _ => {
                let (prompt, steps, passkey) = unit_prompt(engine, plan, unit, tokens)?;
                (prompt, steps, passkey, Vec::new())
            }
        };
        // RULER follows kvpress's protocol: only the prompt is compressed, the question and the
        // answer join what it kept.
        let grow = unit.ruler.is_some();
        let configs: Vec<PolicyConfig> =
            pending.iter().map(|(v, b, s)| PolicyConfig { grow: grow || v.config.grow, ..v.case(*b, *s) }).collect();
        let shared = match unit.task {
            Task::Ppl => None,
            _ => Some(engine.shared_prefill(&prompt, &configs, steps + ruler_tail.len())?),
        };
        let from_shared =
            |kv: &PolicyConfig| engine.cache_from_shared(shared.as_ref().expect("shared for this task"), kv, steps);
        // Greedy answers from a cache that holds the prompt (its own policy applies).
        let req = GenerateRequest {
            max_tokens: steps,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            kv: PolicyConfig::default(),
            logprobs: None,
        };
        let greedy = |start| -> Result<(Vec<u32>, String), ModelError> {
            let out = engine.generate_from(&prompt, start, &req, &mut |_| {})?;
            Ok((out.token_ids, out.text))
        };
        // RULER: the question (after mode) as decode steps, then the answer, scored.
        let ruler_answer = |kv: &PolicyConfig| -> Result<(f64, String), ModelError> {
            let case = unit.ruler.as_ref().expect("a RULER unit");
            let (mut cache, mut logits) = engine.cache_from_shared(
                shared.as_ref().expect("shared for this task"),
                kv,
                steps + ruler_tail.len(),
            )?;
            for &t in &ruler_tail {
                engine.decode_step_into(t, &mut cache, &mut logits)?;
            }
            let mut seen = prompt.clone();
            seen.extend_from_slice(&ruler_tail);
            let text = engine.generate_from(&seen, (cache, logits), &req, &mut |_| {})?.text;
            Ok((ruler::score(&text, &case.answers), text))
        };
        let forced = || &tokens[plan.prompt_tokens..plan.prompt_tokens + plan.continuation_tokens];
        let full = match unit.task {
            Task::Fidelity => {
                FullAnswer::Logits(teacher_forced_logits(engine, from_shared(&PolicyConfig::default())?, forced())?)
            }
            Task::Generation | Task::Summary => {
                let (ids, text) = greedy(from_shared(&PolicyConfig::default())?)?;
                FullAnswer::Text { ids, text }
            }
            Task::Needle => {
                let (_, text) = greedy(from_shared(&PolicyConfig::default())?)?;
                FullAnswer::Needle(answer_has(&text, &passkey))
            }
            Task::Ppl => FullAnswer::None,
            Task::Ruler | Task::RulerInside => FullAnswer::Ruler { score: ruler_answer(&PolicyConfig::default())?.0 },
        };
        let mut full_ppl: BTreeMap<String, f64> = BTreeMap::new();
        for ((variant, budget, seed), kv) in pending.into_iter().zip(configs) {
            let mut metrics = BTreeMap::new();
            let mut output = None;
            let full_output = match &full {
                FullAnswer::Text { text, .. } => Some(text.clone()),
                _ => None,
            };
            match (&full, unit.task) {
                (FullAnswer::Logits(reference), _) => {
                    let r = fidelity_against(engine, reference, from_shared(&kv)?, forced())?;
                    metrics.insert("mean_kl".into(), r.mean_kl);
                    metrics.insert("p90_kl".into(), r.p90_kl);
                    metrics.insert("top1_agreement".into(), r.top1_agreement);
                }
                (FullAnswer::Text { ids: full_ids, text: full_text }, Task::Generation) => {
                    let (ids, text) = greedy(from_shared(&kv)?)?;
                    let r = rouge::score(full_text, &text);
                    metrics.insert("rouge1".into(), r.rouge1.f1);
                    metrics.insert("rouge2".into(), r.rouge2.f1);
                    metrics.insert("rougeL".into(), r.rouge_l.f1);
                    let same = ids.iter().zip(full_ids).take_while(|(a, b)| a == b).count();
                    metrics.insert("identical_prefix".into(), same as f64);
                    // The full cache's answer agrees with itself over its whole length.
                    metrics.insert("full_identical_prefix".into(), full_ids.len() as f64);
                    output = Some(text);
                }
                (FullAnswer::Text { text: full_text, .. }, _) => {
                    let reference = unit.doc.reference.as_deref().unwrap_or_default();
                    let (_, text) = greedy(from_shared(&kv)?)?;
                    let (ours, theirs) = (rouge::score(reference, &text), rouge::score(reference, full_text));
                    metrics.insert("rouge1".into(), ours.rouge1.f1);
                    metrics.insert("rouge2".into(), ours.rouge2.f1);
                    metrics.insert("rougeL".into(), ours.rouge_l.f1);
                    metrics.insert("full_rouge1".into(), theirs.rouge1.f1);
                    metrics.insert("full_rouge2".into(), theirs.rouge2.f1);
                    metrics.insert("full_rougeL".into(), theirs.rouge_l.f1);
                    metrics.insert("rougeL_vs_full".into(), rouge::score(full_text, &text).rouge_l.f1);
                    output = Some(text);
                }
                (FullAnswer::Needle(full_correct), _) => {
                    let (_, text) = greedy(from_shared(&kv)?)?;
                    metrics.insert("correct".into(), f64::from(u8::from(answer_has(&text, &passkey))));
                    metrics.insert("full_correct".into(), f64::from(u8::from(*full_correct)));
                    output = Some(text);
                }
                (FullAnswer::Ruler { score: full_score }, _) => {
                    let (score, text) = ruler_answer(&kv)?;
                    metrics.insert("score".into(), score);
                    metrics.insert("full_score".into(), *full_score);
                    metrics.insert("prompt_tokens".into(), (prompt.len() + ruler_tail.len()) as f64);
                    output = Some(text);
                }
                (FullAnswer::None, _) => {
                    let r = engine.perplexity(tokens, plan.ppl_ctx, Some(1), &kv, &mut |_, _| {})?;
                    metrics.insert("ppl".into(), r.ppl);
                    metrics.insert("mean_nll".into(), r.mean_nll);
                    // The full cache with the same prompt/decode split (decode steps and
                    // prompts round differently), once per budget.
                    let label = budget.to_string();
                    if !full_ppl.contains_key(&label) {
                        let full = PolicyConfig { budget: Some(*budget), ..PolicyConfig::default() };
                        full_ppl.insert(
                            label.clone(),
                            engine.perplexity(tokens, plan.ppl_ctx, Some(1), &full, &mut |_, _| {})?.ppl,
                        );
                    }
                    metrics.insert("full_ppl".into(), full_ppl[&label]);
                }
            }
            let (task, doc, policy, budget, seed) = key(unit, variant, *budget, *seed);
            let settings = case_fingerprint(plan, unit, variant);
            let row = CaseRow {
                task,
                doc,
                policy,
                budget,
                seed,
                metrics,
                output,
                full_output,
                model: model.clone(),
                settings,
            };
            writeln!(file, "{}", serde_json::to_string(&row).expect("rows serialise")).map_err(io)?;
            file.flush().map_err(io)?;
            finished += 1;
            progress(finished, total);
        }
    }
    write_summary(out, &read_rows(&results)?).map_err(io)?;
    Ok(results)
}

/// The prompt of a unit, the tokens to generate or force after it, and the needle's passkey.
fn unit_prompt(
    engine: &Engine,
    plan: &EvalPlan,
    unit: &Unit,
    tokens: &[u32],
) -> Result<(Vec<u32>, usize, String), ModelError> {
    let id = &unit.doc.id;
    Ok(match unit.task {
        Task::Fidelity => {
            let (p, c) = (plan.prompt_tokens, plan.continuation_tokens);
            if tokens.len() < p + c {
                return Err(ModelError::Input(format!(
                    "document '{id}' has {} tokens; fidelity needs {} (prompt {p} + continuation {c})",
                    tokens.len(),
                    p + c
                )));
            }
            (tokens[..p].to_vec(), c, String::new())
        }
        Task::Generation => {
            (tokens[..plan.prompt_tokens.min(tokens.len())].to_vec(), plan.continuation_tokens, String::new())
        }
        Task::Summary => {
            (summary_prompt(engine, unit.doc, tokens, plan.prompt_tokens)?, plan.summary_tokens, String::new())
        }
        Task::Needle => {
            let (length, depth) = unit.needle.expect("needle units carry a haystack");
            let (prompt, code) = needle_prompt(engine, tokens, id, length, depth)?;
            (prompt, NEEDLE_ANSWER_TOKENS, code)
        }
        Task::Ppl => (Vec::new(), 0, String::new()), // streams the whole document itself
        Task::Ruler | Task::RulerInside => unreachable!("RULER units build their prompt with ruler_prompt"),
    })
}

/// The RULER cases of `plan`: every task x length x sample, haystacks from `docs`, sized in
/// the model's tokens (the chat template's included), lengths capped at what the model's
/// context holds with the answer.
pub fn ruler_cases(engine: &Engine, plan: &EvalPlan, docs: &[Document]) -> Result<Vec<RulerCase>, ModelError> {
    let hay = Haystack::new(docs.iter().map(|d| d.context.as_str()));
    let count = |s: &str| engine.tokenizer.encode(s, false).map_or(0, |v| v.len());
    let overhead = match engine.chat_template() {
        Some(_) => engine.encode(&engine.chat_prompt("")?)?.len(),
        None => usize::from(engine.tokenizer.add_bos),
    };
    let context = engine.model.config.context_length;
    let mut cases = Vec::new();
    for &task in &plan.ruler_tasks {
        for &length in &plan.ruler_lengths {
            let length = length.min(context.saturating_sub(task.answer_tokens() + 1));
            for sample in 0..plan.ruler_samples {
                let mut case = ruler::generate(task, length, sample, plan.ruler_seed, overhead, &hay, &count)
                    .map_err(ModelError::Input)?;
                if let Some(cap) = plan.ruler_answer_tokens {
                    case.max_new_tokens = case.max_new_tokens.min(cap.max(1));
                }
                cases.push(case);
            }
        }
    }
    Ok(cases)
}

/// The RULER cases of `plan` as JSONL for other engines (scripts/kvpress-ruler.py): each case's
/// text with this model's token ids of the context part (`context_ids`: the chat template up to
/// the question) and of the rest (`question_ids`: the question, the end of the user's turn and
/// the answer prefix), so that another engine runs exactly these tokens.
pub fn export_ruler_cases(
    engine: &Engine,
    plan: &EvalPlan,
    docs: &[Document],
    path: &Path,
) -> Result<usize, ModelError> {
    let mut text = String::new();
    let cases = ruler_cases(engine, plan, docs)?;
    for case in &cases {
        let (context_ids, question_ids) = ruler_prompt(engine, case, RulerMode::After)?;
        let mut row = serde_json::to_value(case).expect("cases serialise");
        row["context_ids"] = context_ids.into();
        row["question_ids"] = question_ids.into();
        text.push_str(&(row.to_string() + "\n"));
    }
    std::fs::write(path, text).map_err(|e| ModelError::Input(format!("writing {}: {e}", path.display())))?;
    Ok(cases.len())
}

/// A RULER case's tokens: the prompt (its user message up to the question, in the chat
/// template) and the rest (the question, the template's end of turn, the answer prefix). In
/// `Inside` mode the prompt is both; the split is the same, so both modes see the same tokens.
fn ruler_prompt(engine: &Engine, case: &RulerCase, mode: RulerMode) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
    const MARK: &str = "\u{1}QUESTION\u{1}";
    let user = format!("{}{MARK}{}", case.before_question(), case.question);
    let text = match engine.chat_template() {
        Some(_) => engine.chat_prompt(&user)?,
        None => format!("{user}\n"),
    };
    // `after` begins with the question.
    let (before, after) = text.split_once(MARK).expect("the template keeps the message");
    let mut prompt = engine.encode(before)?;
    let rest = engine.tokenizer.encode(&format!("{after}{}", case.answer_prefix), false)?;
    Ok(match mode {
        RulerMode::After => (prompt, rest),
        RulerMode::Inside => {
            prompt.extend(rest);
            (prompt, Vec::new())
        }
    })
}

fn answer_has(text: &str, passkey: &str) -> bool {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    digits.contains(passkey)
}

/// The document's first `max_tokens` tokens as a user message in the chat template, followed
/// by the instruction (the document's `question`, else a request for a short summary), so the
/// instruction is in the recent window of every policy.
fn summary_prompt(engine: &Engine, doc: &Document, tokens: &[u32], max_tokens: usize) -> Result<Vec<u32>, ModelError> {
    const MARK: &str = "\u{1}DOCUMENT\u{1}";
    let instruction = doc.question.as_deref().unwrap_or("Summarize the text above in two or three sentences.");
    let chat = engine.chat_prompt(&format!("{MARK}\n\n{instruction}"))?;
    let (before, after) = chat.split_once(MARK).expect("the template keeps the message");
    // `tokens` starts with BOS when the model asks for one; the template's text comes first.
    let body = match engine.tokenizer.bos {
        Some(b) if tokens.first() == Some(&b) => &tokens[1..],
        _ => tokens,
    };
    let mut prompt = engine.encode(before)?;
    prompt.extend_from_slice(&body[..max_tokens.min(body.len())]);
    prompt.extend(engine.tokenizer.encode(after, false)?);
    Ok(prompt)
}

/// A haystack of `length` tokens of the document with a passkey sentence at `depth` percent,
/// followed by the question. Returns the prompt's tokens and the passkey's digits.
fn needle_prompt(
    engine: &Engine,
    doc: &[u32],
    id: &str,
    length: usize,
    depth: u32,
) -> Result<(Vec<u32>, String), ModelError> {
    if doc.len() < length {
        return Err(ModelError::Input(format!(
            "document '{id}' has {} tokens, fewer than a {length}-token haystack",
            doc.len()
        )));
    }
    // A 5-digit code that differs per haystack but repeats from run to run.
    let h = keyformer_kv::noise::counter_hash(id.bytes().map(u64::from).sum(), length as u32, depth, 0, 0);
    let code = format!("{}", 10_000 + h % 90_000);
    let needle = engine
        .tokenizer
        .encode(&format!(" The secret passkey is {code}. Remember it: the passkey is {code}. "), false)?;
    let question = engine.tokenizer.encode("\n\nWhat is the secret passkey? The secret passkey is", false)?;
    // A BOS stays first, also when the needle is at depth 0.
    let lead = usize::from(engine.tokenizer.bos.is_some() && doc.first() == engine.tokenizer.bos.as_ref());
    let at = lead + ((length - lead) as u64 * depth.min(100) as u64 / 100) as usize;
    let mut prompt = Vec::with_capacity(length + needle.len() + question.len());
    prompt.extend_from_slice(&doc[..at]);
    prompt.extend_from_slice(&needle);
    prompt.extend_from_slice(&doc[at..length]);
    prompt.extend_from_slice(&question);
    Ok((prompt, code))
}

/// Token budgets first, then percentages, each ascending.
fn budget_order(label: &str) -> (bool, f64) {
    (label.ends_with('%'), label.trim_end_matches('%').parse().unwrap_or(f64::MAX))
}

fn read_rows(path: &Path) -> Result<Vec<CaseRow>, ModelError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text =
        std::fs::read_to_string(path).map_err(|e| ModelError::Input(format!("reading {}: {e}", path.display())))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// Sums and counts of each metric per (task, policy, budget).
type Accumulated = BTreeMap<(String, String, String), BTreeMap<String, (f64, usize)>>;

/// A task's budgets (token budgets first, then percentages, each ascending) and policies.
fn budgets_and_policies<'a>(acc: &'a Accumulated, task: &String) -> (Vec<&'a String>, BTreeSet<&'a String>) {
    let mut budgets: Vec<&String> = acc.keys().filter(|k| &k.0 == task).map(|k| &k.2).collect();
    budgets.sort_by(|a, b| budget_order(a).partial_cmp(&budget_order(b)).unwrap_or(std::cmp::Ordering::Equal));
    budgets.dedup();
    (budgets, acc.keys().filter(|k| &k.0 == task).map(|k| &k.1).collect())
}

/// The mean of `metric` for (task, policy, budget), if any case recorded it.
fn mean_of(acc: &Accumulated, task: &str, policy: &str, budget: &str, metric: &str) -> Option<f64> {
    acc.get(&(task.to_string(), policy.to_string(), budget.to_string()))
        .and_then(|ms| ms.get(metric))
        .map(|(s, n)| s / *n as f64)
}

/// Mean of each metric per (task, policy, budget), over documents and seeds.
fn write_summary(out: &Path, rows: &[CaseRow]) -> std::io::Result<()> {
    let mut acc = Accumulated::new();
    for r in rows {
        let m = acc.entry((r.task.clone(), r.policy.clone(), r.budget.clone())).or_default();
        for (k, v) in &r.metrics {
            let e = m.entry(k.clone()).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }
    let summary: Vec<serde_json::Value> = acc
        .iter()
        .map(|((task, policy, budget), m)| {
            let means: BTreeMap<&String, f64> = m.iter().map(|(k, (s, n))| (k, s / *n as f64)).collect();
            serde_json::json!({"task": task, "policy": policy, "budget": budget, "cases": m.values().next().map_or(0, |v| v.1), "mean": means})
        })
        .collect();
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;

    let mut md = String::from("# Evaluation summary\n");
    let tasks: BTreeSet<&String> = acc.keys().map(|k| &k.0).collect();
    for task in tasks {
        let metric = match task.as_str() {
            "ppl" => "ppl",
            "generation" | "summary" => "rougeL",
            "needle" => "correct",
            "ruler" | "ruler_inside" => "score",
            _ => "mean_kl",
        };
        let direction = if matches!(metric, "rougeL" | "correct" | "score") { "higher" } else { "lower" };
        let (budgets, policies) = budgets_and_policies(&acc, task);
        let mean = |p: &String, b: &String, m: &str| mean_of(&acc, task, p, b, m);
        // Tasks that record the full cache's own score beside each case (`full_<metric>`) get a
        // row for it, and a second table relative to it.
        let full_metric = format!("full_{metric}");
        let full: Vec<Option<f64>> =
            budgets.iter().map(|b| policies.iter().find_map(|p| mean(p, b, &full_metric))).collect();
        let header = |title: String| {
            let mut h = format!("\n## {title}\n\n| policy | ");
            h.push_str(&budgets.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(" | "));
            h.push_str(&format!(" |\n|---|{}\n", "---:|".repeat(budgets.len())));
            h
        };
        let cell = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        md.push_str(&header(format!("{task} (mean {metric}; {direction} is better)")));
        for p in &policies {
            let cells: Vec<String> = budgets.iter().map(|b| cell(mean(p, b, metric))).collect();
            md.push_str(&format!("| {p} | {} |\n", cells.join(" | ")));
        }
        if full.iter().any(Option::is_some) {
            md.push_str(&format!(
                "| *full cache* | {} |\n",
                full.iter().map(|v| cell(*v)).collect::<Vec<_>>().join(" | ")
            ));
            md.push_str(&header(format!("{task}: {metric} as a percentage of the full cache's")));
            for p in &policies {
                let cells: Vec<String> = budgets
                    .iter()
                    .zip(&full)
                    .map(|(b, f)| match (mean(p, b, metric), f) {
                        (Some(v), Some(f)) if *f > 0.0 => format!("{:.1}%", 100.0 * v / f),
                        _ => String::new(),
                    })
                    .collect();
                md.push_str(&format!("| {p} | {} |\n", cells.join(" | ")));
            }
        }
    }
    std::fs::write(out.join("summary.md"), md)?;
    write_plots(out, &acc)
}

/// One SVG per (task, metric): the metric's mean against budget, a line per policy.
fn write_plots(out: &Path, acc: &Accumulated) -> std::io::Result<()> {
    let tasks: BTreeSet<&String> = acc.keys().map(|k| &k.0).collect();
    for task in tasks {
        let (budgets, policies) = budgets_and_policies(acc, task);
        let metrics: BTreeSet<&String> = acc.iter().filter(|(k, _)| &k.0 == task).flat_map(|(_, m)| m.keys()).collect();
        let mean = |p: &String, b: &String, m: &str| mean_of(acc, task, p, b, m);
        for metric in metrics.iter().filter(|m| !m.starts_with("full_")) {
            let mut series: Vec<Series> = policies
                .iter()
                .map(|p| Series {
                    label: (*p).clone(),
                    values: budgets.iter().map(|b| mean(p, b, metric)).collect(),
                    reference: false,
                })
                .collect();
            // The full cache's own score as a reference line: recorded by the task, or known
            // (the full cache agrees with itself).
            let full_metric = format!("full_{metric}");
            let known = match metric.as_str() {
                "mean_kl" | "p90_kl" => Some(0.0),
                "top1_agreement" => Some(1.0),
                "rouge1" | "rouge2" | "rougeL" if task.as_str() == "generation" => Some(1.0),
                "rougeL_vs_full" => Some(1.0),
                _ => None,
            };
            if metrics.contains(&full_metric) {
                let values = budgets.iter().map(|b| policies.iter().find_map(|p| mean(p, b, &full_metric))).collect();
                series.push(Series { label: "full cache".into(), values, reference: true });
            } else if let Some(v) = known {
                series.push(Series {
                    label: "full cache".into(),
                    values: vec![Some(v); budgets.len()],
                    reference: true,
                });
            }
            let labels: Vec<String> = budgets.iter().map(|b| (*b).clone()).collect();
            let svg = line_chart_svg(
                &format!("{task}: {metric} against KV budget"),
                &labels,
                metric,
                &series,
                YKind::of_metric(metric),
            );
            let svg_path = out.join(format!("{task}-{metric}.svg"));
            std::fs::write(&svg_path, svg)?;
            // PNG copies where librsvg's converter is installed (Debian: librsvg2-bin); the SVG
            // is the plot of record.
            let _ = std::process::Command::new("rsvg-convert")
                .arg(&svg_path)
                .arg("-o")
                .arg(svg_path.with_extension("png"))
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    Ok(())
}

//! The evaluation matrix behind `keyformer eval`: tasks x policies x budgets x seeds over a set
//! of documents, one JSON row per case in `results.jsonl` (appended as each case finishes, so
//! an interrupted run resumes where it stopped), then `summary.json`, `summary.md` and one SVG
//! plot per task and metric (quality against budget, a line per policy).
//!
//! Tasks so far: `fidelity` (KL divergence against the full cache on a teacher-forced
//! continuation), `generation` (greedy continuation of the compressed cache against the full
//! cache's: ROUGE and identical prefix), `needle` (a passkey hidden at a depth of a haystack of
//! real text, asked for after it; the full cache's answer is recorded beside) and `ppl`
//! (streaming perplexity). For `fidelity` each document's prompt is prefilled once and every
//! policy, budget and seed compresses its own copy. The summary task is still to come.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use keyformer_kv::{Amount, PolicyConfig, PolicyKind};
use serde::{Deserialize, Serialize};

use crate::engine::GenerateRequest;
use crate::engine::SharedPrefill;
use crate::eval::fidelity::fidelity_from;
use crate::eval::plot::{line_chart_svg, Series};
use crate::eval::rouge;
use crate::sampling::SamplingParams;
use crate::{Engine, ModelError};

/// One document: any JSONL of `{id, context, question?, reference?}` is accepted.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Document {
    pub id: String,
    pub context: String,
    #[serde(default)]
    pub question: Option<String>,
    #[serde(default)]
    pub reference: Option<String>,
}

/// Load documents: a `.jsonl` file holds one per line; any other file is one document.
pub fn load_documents(path: &Path) -> Result<Vec<Document>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Input(format!("reading {}: {e}", path.display())))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| ModelError::Input(format!("{} line {}: {e}", path.display(), i + 1)))
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
    Needle,
    Ppl,
}

impl std::str::FromStr for Task {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fidelity" => Ok(Task::Fidelity),
            "generation" => Ok(Task::Generation),
            "needle" => Ok(Task::Needle),
            "ppl" => Ok(Task::Ppl),
            other => Err(format!("unknown or not yet available task '{other}' (available: fidelity, generation, needle, ppl)")),
        }
    }
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Fidelity => "fidelity",
            Task::Generation => "generation",
            Task::Needle => "needle",
            Task::Ppl => "ppl",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    pub tasks: Vec<Task>,
    pub policies: Vec<PolicyKind>,
    pub budgets: Vec<Amount>,
    pub seeds: Vec<u64>,
    /// Documents used at most.
    pub limit: Option<usize>,
    /// Fidelity: prompt tokens (compressed to the budget) and teacher-forced tokens after it.
    pub prompt_tokens: usize,
    pub continuation_tokens: usize,
    /// Perplexity: window length (a percentage budget is of the window).
    pub ppl_ctx: usize,
    /// Needle: haystack lengths in tokens, and depths (percent of the haystack) of the passkey.
    pub needle_lengths: Vec<usize>,
    pub needle_depths: Vec<u32>,
    /// Settings other than policy, budget and seed (sinks, recent window, keyformer options).
    pub base: PolicyConfig,
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
}

impl CaseRow {
    fn key(&self) -> (String, String, String, String, u64) {
        (self.task.clone(), self.doc.clone(), self.policy.clone(), self.budget.clone(), self.seed)
    }
}

/// Policies whose result depends on the seed.
fn seeded(kind: PolicyKind) -> bool {
    matches!(kind, PolicyKind::Keyformer | PolicyKind::Random)
}

/// Run `plan` over `docs`, appending to `out/results.jsonl` (cases already there are skipped),
/// then writing `summary.json` and `summary.md`. `progress(done, total)` after each case.
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
    if results.exists() {
        let text: String = previous.iter().map(|r| serde_json::to_string(r).expect("rows serialise") + "\n").collect();
        std::fs::write(&results, text).map_err(io)?;
    }
    let mut done: HashSet<_> = previous.iter().map(CaseRow::key).collect();
    let docs = &docs[..plan.limit.map_or(docs.len(), |l| l.min(docs.len()))];

    let mut cases = Vec::new();
    for &task in &plan.tasks {
        for doc in docs {
            // The needle task makes one haystack per (length, depth) from each document.
            let units: Vec<Option<(usize, u32)>> = if task == Task::Needle {
                plan.needle_lengths.iter().flat_map(|&l| plan.needle_depths.iter().map(move |&d| Some((l, d)))).collect()
            } else {
                vec![None]
            };
            for unit in units {
                for &kind in &plan.policies {
                    for &budget in &plan.budgets {
                        let seeds: &[u64] = if seeded(kind) { &plan.seeds } else { &[0] };
                        for &seed in seeds {
                            cases.push((task, doc, unit, kind, budget, seed));
                        }
                    }
                }
            }
        }
    }
    let total = cases.len();
    // The full cache's greedy continuation per document, computed once.
    let mut full_generation: BTreeMap<String, (Vec<u32>, String)> = BTreeMap::new();
    let mut full_needle: BTreeMap<String, bool> = BTreeMap::new();
    let mut token_cache: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    let mut shared: Option<(String, SharedPrefill)> = None;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&results).map_err(io)?;
    for (i, (task, doc, unit, kind, budget, seed)) in cases.into_iter().enumerate() {
        let doc_label = match unit {
            Some((length, depth)) => format!("{}@{length}@{depth}%", doc.id),
            None => doc.id.clone(),
        };
        let key = (task.name().to_string(), doc_label.clone(), kind.name().to_string(), budget.to_string(), seed);
        if done.contains(&key) {
            progress(i + 1, total);
            continue;
        }
        let kv = PolicyConfig { kind, budget: Some(budget), seed, ..plan.base.clone() };
        if !token_cache.contains_key(&doc.id) {
            token_cache.insert(doc.id.clone(), engine.encode(&doc.context)?);
        }
        let tokens = &token_cache[&doc.id];
        let mut metrics = BTreeMap::new();
        match task {
            Task::Fidelity => {
                let (p, c) = (plan.prompt_tokens, plan.continuation_tokens);
                if tokens.len() < p + c {
                    return Err(ModelError::Input(format!(
                        "document '{}' has {} tokens; fidelity needs {} (prompt {p} + continuation {c})",
                        doc.id,
                        tokens.len(),
                        p + c
                    )));
                }
                // One prefill per document, shared by every policy, budget and seed.
                if shared.as_ref().is_none_or(|(id, _)| id != &doc.id) {
                    let configs: Vec<PolicyConfig> = plan
                        .policies
                        .iter()
                        .flat_map(|&kind| plan.budgets.iter().map(move |&b| (kind, b)))
                        .flat_map(|(kind, budget)| {
                            let seeds: &[u64] = if seeded(kind) { &plan.seeds } else { &[0] };
                            seeds.iter().map(move |&seed| PolicyConfig { kind, budget: Some(budget), seed, ..plan.base.clone() })
                        })
                        .collect();
                    shared = Some((doc.id.clone(), engine.shared_prefill(&tokens[..p], &configs, c)?));
                }
                let prefill = &shared.as_ref().expect("set above").1;
                let full = engine.cache_from_shared(prefill, &PolicyConfig::default(), c)?;
                let compressed = engine.cache_from_shared(prefill, &kv, c)?;
                let r = fidelity_from(engine, full, compressed, &tokens[p..p + c])?;
                metrics.insert("mean_kl".into(), r.mean_kl);
                metrics.insert("p90_kl".into(), r.p90_kl);
                metrics.insert("top1_agreement".into(), r.top1_agreement);
            }
            Task::Generation => {
                let p = plan.prompt_tokens.min(tokens.len());
                let prompt = &tokens[..p];
                let greedy = |kv: PolicyConfig| -> Result<(Vec<u32>, String), ModelError> {
                    let req = GenerateRequest {
                        max_tokens: plan.continuation_tokens,
                        sampling: SamplingParams::default(),
                        stop: Vec::new(),
                        kv,
                    };
                    let out = engine.generate(prompt, &req, &mut |_| {})?;
                    Ok((out.token_ids, out.text))
                };
                if !full_generation.contains_key(&doc.id) {
                    full_generation.insert(doc.id.clone(), greedy(PolicyConfig::default())?);
                }
                let (full_ids, full_text) = &full_generation[&doc.id];
                let (ids, text) = greedy(kv)?;
                let r = rouge::score(full_text, &text);
                metrics.insert("rouge1".into(), r.rouge1.f1);
                metrics.insert("rouge2".into(), r.rouge2.f1);
                metrics.insert("rougeL".into(), r.rouge_l.f1);
                let same = ids.iter().zip(full_ids).take_while(|(a, b)| a == b).count();
                metrics.insert("identical_prefix".into(), same as f64);
            }
            Task::Needle => {
                let (length, depth) = unit.expect("needle cases carry a haystack");
                let (prompt, code) = needle_prompt(engine, tokens, &doc.id, length, depth)?;
                let answer = |kv: PolicyConfig| -> Result<bool, ModelError> {
                    let req = GenerateRequest { max_tokens: 12, sampling: SamplingParams::default(), stop: Vec::new(), kv };
                    let out = engine.generate(&prompt, &req, &mut |_| {})?;
                    let digits: String = out.text.chars().filter(char::is_ascii_digit).collect();
                    Ok(digits.contains(&code))
                };
                if !full_needle.contains_key(&doc_label) {
                    full_needle.insert(doc_label.clone(), answer(PolicyConfig::default())?);
                }
                metrics.insert("correct".into(), f64::from(u8::from(answer(kv)?)));
                metrics.insert("full_correct".into(), f64::from(u8::from(full_needle[&doc_label])));
            }
            Task::Ppl => {
                let r = engine.perplexity(tokens, plan.ppl_ctx, Some(1), &kv, &mut |_, _| {})?;
                metrics.insert("ppl".into(), r.ppl);
                metrics.insert("mean_nll".into(), r.mean_nll);
            }
        }
        let row = CaseRow { task: key.0.clone(), doc: key.1.clone(), policy: key.2.clone(), budget: key.3.clone(), seed, metrics };
        writeln!(file, "{}", serde_json::to_string(&row).expect("rows serialise")).map_err(io)?;
        file.flush().map_err(io)?;
        done.insert(key);
        progress(i + 1, total);
    }
    write_summary(out, &read_rows(&results)?).map_err(io)?;
    Ok(results)
}

/// A haystack of `length` tokens of the document with a passkey sentence at `depth` percent,
/// followed by the question. Returns the prompt's tokens and the passkey's digits.
fn needle_prompt(engine: &Engine, doc: &[u32], id: &str, length: usize, depth: u32) -> Result<(Vec<u32>, String), ModelError> {
    if doc.len() < length {
        return Err(ModelError::Input(format!("document '{id}' has {} tokens, fewer than a {length}-token haystack", doc.len())));
    }
    // A 5-digit code that differs per haystack but repeats from run to run.
    let h = keyformer_kv::noise::counter_hash(id.bytes().map(u64::from).sum(), length as u32, depth, 0, 0);
    let code = format!("{}", 10_000 + h % 90_000);
    let needle = engine.encode(&format!(" The secret passkey is {code}. Remember it: the passkey is {code}. "))?;
    let question = engine.encode(&format!("\n\nWhat is the secret passkey? The secret passkey is"))?;
    let at = (length as u64 * depth.min(100) as u64 / 100) as usize;
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
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::Input(format!("reading {}: {e}", path.display())))?;
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// Mean of each metric per (task, policy, budget), over documents and seeds.
fn write_summary(out: &Path, rows: &[CaseRow]) -> std::io::Result<()> {
    type Key = (String, String, String);
    let mut acc: BTreeMap<Key, BTreeMap<String, (f64, usize)>> = BTreeMap::new();
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
    let tasks: Vec<&String> = acc.keys().map(|k| &k.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
    for task in tasks {
        let metric = match task.as_str() {
            "ppl" => "ppl",
            "generation" => "rougeL",
            "needle" => "correct",
            _ => "mean_kl",
        };
        let direction = if matches!(metric, "rougeL" | "correct") { "higher" } else { "lower" };
        let mut budgets: Vec<&String> = acc.keys().filter(|k| &k.0 == task).map(|k| &k.2).collect();
        budgets.sort_by(|a, b| budget_order(a).partial_cmp(&budget_order(b)).unwrap_or(std::cmp::Ordering::Equal));
        budgets.dedup();
        md.push_str(&format!("\n## {task} (mean {metric}; {direction} is better)\n\n| policy | "));
        md.push_str(&budgets.iter().map(|b| b.as_str()).collect::<Vec<_>>().join(" | "));
        md.push_str(" |\n|---|");
        md.push_str(&"---:|".repeat(budgets.len()));
        md.push('\n');
        let policies: Vec<&String> =
            acc.keys().filter(|k| &k.0 == task).map(|k| &k.1).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
        for p in policies {
            let cells: Vec<String> = budgets
                .iter()
                .map(|b| {
                    acc.get(&(task.clone(), p.clone(), (*b).clone()))
                        .and_then(|m| m.get(metric))
                        .map_or(String::new(), |(s, n)| format!("{:.4}", s / *n as f64))
                })
                .collect();
            md.push_str(&format!("| {p} | {} |\n", cells.join(" | ")));
        }
    }
    std::fs::write(out.join("summary.md"), md)?;
    write_plots(out, &acc)
}

/// One SVG per (task, metric): the metric's mean against budget, a line per policy.
fn write_plots(out: &Path, acc: &BTreeMap<(String, String, String), BTreeMap<String, (f64, usize)>>) -> std::io::Result<()> {
    let tasks: std::collections::BTreeSet<&String> = acc.keys().map(|k| &k.0).collect();
    for task in tasks {
        let mut budgets: Vec<&String> = acc.keys().filter(|k| &k.0 == task).map(|k| &k.2).collect();
        budgets.sort_by(|a, b| budget_order(a).partial_cmp(&budget_order(b)).unwrap_or(std::cmp::Ordering::Equal));
        budgets.dedup();
        let policies: std::collections::BTreeSet<&String> = acc.keys().filter(|k| &k.0 == task).map(|k| &k.1).collect();
        let metrics: std::collections::BTreeSet<&String> =
            acc.iter().filter(|(k, _)| &k.0 == task).flat_map(|(_, m)| m.keys()).collect();
        for metric in metrics {
            let series: Vec<Series> = policies
                .iter()
                .map(|p| Series {
                    label: (*p).clone(),
                    values: budgets
                        .iter()
                        .map(|b| {
                            acc.get(&(task.clone(), (*p).clone(), (*b).clone())).and_then(|m| m.get(metric)).map(|(s, n)| s / *n as f64)
                        })
                        .collect(),
                })
                .collect();
            let labels: Vec<String> = budgets.iter().map(|b| (*b).clone()).collect();
            let svg = line_chart_svg(&format!("{task}: {metric} against KV budget"), &labels, metric, &series);
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

//! The evaluation matrix on the real model: its shared prefill must give every case the numbers
//! a separate run of that case gives, and its variants and summary task must do what they say.

// The core crate's test helpers (model paths, golden files), shared rather than copied.
#[path = "../../keyformer/tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;

use common::*;
use keyformer::engine::GenerateRequest;
use keyformer::keyformer_kv::{Amount, NoiseKind, PolicyConfig, PolicyKind};
use keyformer::sampling::SamplingParams;
use keyformer::Engine;
use keyformer_eval::eval::fidelity::fidelity;
use keyformer_eval::eval::rouge;
use keyformer_eval::eval::ruler::{self, RulerTask};
use keyformer_eval::eval::suite::{ruler_cases, run_eval, CaseRow, Document, EvalPlan, PolicyVariant, Task};

fn plan(tasks: Vec<Task>, policies: &[&str]) -> EvalPlan {
    // Short test prompts: no floor under the percentage budgets.
    let defaults = PolicyConfig { min_budget: 1, ..PolicyConfig::default() };
    EvalPlan {
        tasks,
        policies: policies.iter().map(|p| PolicyVariant::parse(p, &defaults).unwrap()).collect(),
        budgets: vec![Amount::Percent(40.0)],
        seeds: vec![3],
        limit: None,
        prompt_tokens: 96,
        continuation_tokens: 10,
        summary_tokens: 12,
        ppl_ctx: 64,
        needle_lengths: vec![128],
        needle_depths: vec![50],
        ruler_tasks: vec![RulerTask::NiahSingle2, RulerTask::Vt],
        ruler_lengths: vec![400],
        ruler_samples: 1,
        ruler_seed: 0,
        ruler_answer_tokens: None,
    }
}

fn prose_doc() -> Document {
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    Document { id: "prose".into(), context: text, question: None, reference: Some("A story about a house.".into()) }
}

/// An empty folder for one test's output.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let out = std::env::temp_dir().join(format!("keyformer-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    out
}

fn rows(dir: &std::path::Path) -> Vec<CaseRow> {
    let text = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn greedy(engine: &Engine, prompt: &[u32], kv: PolicyConfig, n: usize) -> (Vec<u32>, String) {
    let req =
        GenerateRequest { max_tokens: n, sampling: SamplingParams::default(), stop: Vec::new(), kv, logprobs: None };
    let out = engine.generate(prompt, &req, &mut |_| {}).unwrap();
    (out.token_ids, out.text)
}

#[test]
fn shared_prefill_rows_equal_separate_runs() {
    let engine = Engine::load(&q4_model()).unwrap();
    let out = scratch_dir("shared");
    let p = plan(
        vec![Task::Fidelity, Task::Generation],
        &["window", "h2o", "keyformer", "keyformer:noise=none:recent=10%", "keyformer:observe=16", "h2o:observe=8"],
    );
    let doc = prose_doc();
    run_eval(&engine, &p, std::slice::from_ref(&doc), &out, &mut |_, _| {}).unwrap();
    let got: BTreeMap<(String, String), CaseRow> =
        rows(&out).into_iter().map(|r| ((r.task.clone(), r.policy.clone()), r)).collect();
    assert_eq!(got.len(), 12);

    let tokens = engine.encode(&doc.context).unwrap();
    let (prompt, forced) = (&tokens[..96], &tokens[96..106]);
    let (full_ids, full_text) = greedy(&engine, prompt, PolicyConfig::default(), 10);
    for variant in &p.policies {
        let kv = variant
            .case(Amount::Percent(40.0), if variant.config.keyformer.noise == NoiseKind::Gumbel { 3 } else { 0 });
        let f = fidelity(&engine, prompt, forced, &kv).unwrap();
        let row = &got[&("fidelity".to_string(), variant.label.clone())];
        assert_eq!(row.metrics["mean_kl"], f.mean_kl, "{}", variant.label);
        assert_eq!(row.metrics["top1_agreement"], f.top1_agreement, "{}", variant.label);

        let (ids, text) = greedy(&engine, prompt, kv, 10);
        let row = &got[&("generation".to_string(), variant.label.clone())];
        assert_eq!(row.output.as_deref(), Some(text.as_str()), "{}", variant.label);
        assert_eq!(row.full_output.as_deref(), Some(full_text.as_str()));
        assert_eq!(row.metrics["rougeL"], rouge::score(&full_text, &text).rouge_l.f1, "{}", variant.label);
        let same = ids.iter().zip(&full_ids).take_while(|(a, b)| a == b).count();
        assert_eq!(row.metrics["identical_prefix"], same as f64, "{}", variant.label);
    }
    // The observation window changes what is kept (or the setting would be a no-op).
    let fid = |label: &str| got[&("fidelity".to_string(), label.to_string())].metrics["mean_kl"];
    assert_ne!(fid("h2o"), fid("h2o:observe=8"));
    // A tight window must lose something against the full cache, or the comparison is vacuous.
    assert!(got[&("fidelity".to_string(), "window".to_string())].metrics["mean_kl"] > 0.0);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn summary_task_scores_against_the_reference_and_the_full_cache() {
    let engine = Engine::load(&q4_model()).unwrap();
    let out = scratch_dir("summary");
    let p = plan(vec![Task::Summary], &["window", "keyformer:noise=none"]);
    let mut doc = prose_doc();
    // A budget that keeps everything must reproduce the full cache's summary exactly.
    let mut covering = plan(vec![Task::Summary], &["h2o"]);
    covering.budgets = vec![Amount::Tokens(4096)];
    run_eval(&engine, &covering, std::slice::from_ref(&doc), &out, &mut |_, _| {}).unwrap();
    let full = &rows(&out)[0];
    assert_eq!(full.output, full.full_output);
    assert_eq!(full.metrics["rougeL_vs_full"], 1.0);
    assert_eq!(full.metrics["rougeL"], full.metrics["full_rougeL"]);
    let reference = doc.reference.clone().unwrap();
    let want = rouge::score(&reference, full.output.as_deref().unwrap()).rouge1.f1;
    assert_eq!(full.metrics["rouge1"], want);

    run_eval(&engine, &p, std::slice::from_ref(&doc), &out, &mut |_, _| {}).unwrap();
    assert_eq!(rows(&out).len(), 3);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| *full cache* |") && md.contains("as a percentage of the full cache"), "{md}");
    assert!(out.join("summary-rougeL.svg").exists() && !out.join("summary-full_rougeL.svg").exists());

    // A document without a reference is refused before any work.
    doc.reference = None;
    let err = run_eval(&engine, &p, &[doc], &out.join("refused"), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("needs a reference summary"), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn policy_variants_parse_their_options_and_refuse_unknown_ones() {
    let d = PolicyConfig::default();
    let v = PolicyVariant::parse("keyformer:noise=constant:recent=10%:tau=1-1:frozen", &d).unwrap();
    assert_eq!(v.label, "keyformer:noise=constant:recent=10%:tau=1-1:frozen");
    assert_eq!(v.config.kind, PolicyKind::Keyformer);
    assert_eq!(v.config.keyformer.noise, NoiseKind::Constant);
    assert_eq!(v.config.recent, Some(Amount::Percent(10.0)));
    assert_eq!((v.config.keyformer.tau_init, v.config.keyformer.tau_end), (1.0, 1.0));
    assert!(v.config.keyformer.frozen);
    assert_eq!(PolicyVariant::parse("sink:sinks=8", &d).unwrap().config.sinks, 8);
    assert_eq!(PolicyVariant::parse("snapkv:window=16", &d).unwrap().config.snapkv_window, 16);
    for bad in ["keyformer:noise=pink", "keyformer:colour=red", "nope", "h2o:sinks=x", "keyformer:tau=2"] {
        assert!(PolicyVariant::parse(bad, &d).is_err(), "{bad}");
    }
}

#[test]
fn ppl_rows_carry_the_full_cache_at_the_same_split() {
    let engine = Engine::load(&q4_model()).unwrap();
    let out = scratch_dir("ppl");
    let p = plan(vec![Task::Ppl], &["full", "window"]);
    run_eval(&engine, &p, &[prose_doc()], &out, &mut |_, _| {}).unwrap();
    let r = rows(&out);
    let (full, window) = (&r[0].metrics, &r[1].metrics);
    // `full` with a budget is the full cache with that budget's split: its own reference.
    assert_eq!(full["ppl"], full["full_ppl"]);
    assert_eq!(window["full_ppl"], full["ppl"]);
    assert!(window["ppl"] > full["ppl"], "a 40% window must lose something: {window:?}");
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("| *full cache* |"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn fidelity_is_exact_for_a_covering_budget_and_degrades_below_it() {
    let e = Engine::load(&q4_model()).unwrap();
    let config =
        |kind, budget| PolicyConfig { kind, budget: Some(budget), seed: 1, min_budget: 1, ..Default::default() };
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    let all = e.encode(&text).unwrap()[..160].to_vec();
    let (p, cont) = all.split_at(96);
    let covering = fidelity(&e, p, cont, &config(PolicyKind::Keyformer, Amount::Tokens(160))).unwrap();
    assert_eq!(covering.steps, 64);
    assert_eq!((covering.mean_kl, covering.top1_agreement), (0.0, 1.0));
    let tight = fidelity(&e, p, cont, &config(PolicyKind::Window, Amount::Tokens(16))).unwrap();
    let kf = fidelity(&e, p, cont, &config(PolicyKind::Keyformer, Amount::Tokens(48))).unwrap();
    assert!(tight.mean_kl > kf.mean_kl && kf.mean_kl > 0.0, "window@16 {tight:?} vs keyformer@48 {kf:?}");
    assert!(tight.p90_kl >= tight.mean_kl * 0.5 && tight.top1_agreement < 1.0);
}

/// RULER rows: a covering budget answers as the full cache; in "inside" mode a row equals a
/// separate generation from the whole prompt under the same policy; in "after" mode the
/// question comes after the compressed context, so it is never evicted before it is read.
#[test]
fn ruler_rows_equal_separate_runs_and_a_covering_budget_equals_full() {
    let engine = Engine::load(&q4_model()).unwrap();
    let out = scratch_dir("ruler");
    let mut p = plan(vec![Task::Ruler, Task::RulerInside], &["h2o", "keyformer"]);
    p.budgets = vec![Amount::Percent(40.0), Amount::Tokens(4096)];
    let doc = prose_doc();
    run_eval(&engine, &p, std::slice::from_ref(&doc), &out, &mut |_, _| {}).unwrap();
    let got = rows(&out);
    // 2 tasks x 1 sample x 2 modes x 2 policies x 2 budgets.
    assert_eq!(got.len(), 16);
    let cases = ruler_cases(&engine, &p, std::slice::from_ref(&doc)).unwrap();
    assert_eq!(cases.len(), 2);
    for row in &got {
        let case = cases.iter().find(|c| c.id == row.doc).unwrap();
        assert_eq!(row.metrics["score"], ruler::score(row.output.as_deref().unwrap(), &case.answers));
        let tokens = row.metrics["prompt_tokens"];
        assert!((300.0..=400.0).contains(&tokens), "{}: {tokens} prompt tokens for 400", row.doc);
        if row.budget == "4096" {
            assert_eq!(row.metrics["score"], row.metrics["full_score"], "{} {}", row.doc, row.policy);
        }
    }
    // Inside mode: the prompt is the template's text up to the answer prefix.
    let case = &cases[0];
    let mark = "\u{1}Q\u{1}";
    let chat = engine.chat_prompt(&format!("{}{mark}{}", case.before_question(), case.question)).unwrap();
    let (before, after) = chat.split_once(mark).unwrap();
    let mut prompt = engine.encode(before).unwrap();
    prompt.extend(engine.tokenizer.encode(&format!("{after}{}", case.answer_prefix), false).unwrap());
    // RULER rows follow kvpress's protocol: the prompt compressed, the answer added to it.
    let kv = PolicyConfig { grow: true, ..p.policies[1].case(Amount::Percent(40.0), 3) };
    let (_, text) = greedy(&engine, &prompt, kv, case.max_new_tokens);
    let row = got
        .iter()
        .find(|r| r.task == "ruler_inside" && r.doc == case.id && r.policy == "keyformer" && r.budget == "40%")
        .unwrap();
    assert_eq!(row.output.as_deref(), Some(text.as_str()));
    std::fs::remove_dir_all(&out).unwrap();
}

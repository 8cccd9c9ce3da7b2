//! The `keyformer` binary end to end: the JSON contract of each command, and bad input giving
//! one clear error line and a non-zero exit, never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn keyformer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_keyformer")).args(args).output().expect("running keyformer")
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cli-tests");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The default model's path, as the CLI resolves it (fetching it on first use).
fn default_model() -> PathBuf {
    let out = keyformer(&["info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().find(|l| l.starts_with("file:")).unwrap();
    let path = line.trim_start_matches("file:").trim();
    PathBuf::from(&path[..path.rfind(" (").unwrap()])
}

/// Run the CLI, require success, and parse its standard output as one JSON value.
fn keyformer_json(args: &[&str]) -> serde_json::Value {
    let out = keyformer(args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON value")
}

/// Asserts a clean failure: non-zero exit, one `error:` line naming `needle`, no panic.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success; stderr: {stderr}");
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].to_lowercase().contains(&needle.to_lowercase()), "{:?} lacks {needle:?}", lines[0]);
}

/// A minimal GGUF v3 writer for corrupt-input cases (independent of the reader under test).
struct TinyGguf {
    arch: &'static str,
    tensor_type: u32,
    tensor_offset: u64,
    data_len: usize,
}

impl TinyGguf {
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, self.arch);
        s(&mut b, "token_embd.weight");
        b.extend_from_slice(&2u32.to_le_bytes());
        b.extend_from_slice(&32u64.to_le_bytes());
        b.extend_from_slice(&4u64.to_le_bytes());
        b.extend_from_slice(&self.tensor_type.to_le_bytes());
        b.extend_from_slice(&self.tensor_offset.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, self.data_len));
        b
    }
    fn write(&self, name: &str) -> PathBuf {
        let p = scratch(name);
        std::fs::write(&p, self.bytes()).unwrap();
        p
    }
}

fn info_of(p: &Path) -> Output {
    keyformer(&["info", "--model", p.to_str().unwrap()])
}

#[test]
fn corrupt_files_give_one_line_errors() {
    let good = TinyGguf { arch: "llama", tensor_type: 0, tensor_offset: 0, data_len: 512 };
    // Truncated: a real model cut in its metadata and in its tensor data.
    let real = std::fs::read(default_model()).unwrap();
    for (name, cut) in [("cut-meta.gguf", 4_000usize), ("cut-data.gguf", 5_000_000)] {
        let p = scratch(name);
        std::fs::write(&p, &real[..cut]).unwrap();
        let out = info_of(&p);
        assert_clean_error(&out, if cut < 100_000 { "truncated" } else { "past the end" });
    }
    let mut bad_magic = good.bytes();
    bad_magic[..4].copy_from_slice(b"GGML");
    let p = scratch("bad-magic.gguf");
    std::fs::write(&p, bad_magic).unwrap();
    assert_clean_error(&info_of(&p), "not a GGUF file");

    let p = TinyGguf { tensor_offset: 1 << 20, ..good }.write("offset.gguf");
    assert_clean_error(&info_of(&p), "past the end");
    let p = TinyGguf { tensor_type: 99, ..good }.write("type.gguf");
    assert_clean_error(&info_of(&p), "unknown type id 99");
    let p = TinyGguf { arch: "mamba", ..good }.write("arch.gguf");
    assert_clean_error(&info_of(&p), "unsupported architecture 'mamba'");
    let p = good.write("missing.gguf");
    assert_clean_error(&info_of(&p), "missing metadata key");
    assert_clean_error(&keyformer(&["info", "--model", "/nonexistent/model.gguf"]), "does not exist");
    assert_clean_error(&keyformer(&["info", "--model", "/tmp"]), "is a directory without config.json");
    assert_clean_error(&keyformer(&["info", "--model", "/dev/null"]), "special file");
    let hf = scratch("hf-folder");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::write(hf.join("config.json"), "{}").unwrap();
    assert_clean_error(&keyformer(&["info", "--model", hf.to_str().unwrap()]), "model_type '' is not a family");
    // A text file: what it begins with, not raw bytes.
    let text = scratch("text.gguf");
    std::fs::write(&text, "What is this?").unwrap();
    assert_clean_error(&info_of(&text), "begins with \"What\"");
}

#[test]
fn bad_run_arguments_give_one_line_errors() {
    let long = "word ".repeat(9000); // > 8192 tokens
    let p = scratch("long.txt");
    std::fs::write(&p, long).unwrap();
    assert_clean_error(&keyformer(&["run", "--file", p.to_str().unwrap(), "-n", "1"]), "the model's context is");
    assert_clean_error(&keyformer(&["run", "-p", "hi", "--max-tokens", "0"]), "--max-tokens");
    assert_clean_error(&keyformer(&["run", "-p", "hi", "--top-p", "0"]), "top-p");
    assert_clean_error(&keyformer(&["run", "-p", "", "-n", "4"]), "empty");
    assert_clean_error(&keyformer(&["run", "--file", "/nonexistent.txt"]), "reading /nonexistent.txt");
    assert_clean_error(&keyformer(&["perplexity", "-f", p.to_str().unwrap(), "--ctx", "100000"]), "does not fit");
}

#[test]
fn bad_serve_arguments_give_one_line_errors() {
    assert_clean_error(&keyformer(&["serve", "--kv-memory", "lots"]), "--kv-memory");
    assert_clean_error(&keyformer(&["serve", "--kv-memory", "0"]), "--kv-memory");
    assert_clean_error(&keyformer(&["serve", "--kv-memory", "150%"]), "percentage");
    assert_clean_error(&keyformer(&["serve", "--max-batch", "0"]), "--max-batch");
    assert_clean_error(&keyformer(&["serve", "--kv-policy", "keyformer"]), "needs a --kv-budget");
    // A port already taken: a clear error, not a panic.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    assert_clean_error(&keyformer(&["serve", "--port", &port]), "cannot listen");
}

#[test]
fn bad_kv_settings_give_clear_errors() {
    assert_clean_error(&keyformer(&["run", "-p", "hi", "--kv-policy", "h2o", "--kv-budget", "0"]), "at least 1 token");
    assert_clean_error(
        &keyformer(&["run", "-p", "hi", "--kv-policy", "keyformer", "--kv-budget", "8", "--kv-recent", "9"]),
        "recent window (9 tokens) is larger than the KV budget (8 tokens)",
    );
    assert_clean_error(&keyformer(&["run", "-p", "hi", "--kv-policy", "tova"]), "needs a --kv-budget");
    assert_clean_error(&keyformer(&["run", "-p", "hi", "--kv-policy", "lru"]), "unknown KV policy 'lru'");
    assert_clean_error(
        &keyformer(&["run", "-p", "hi", "--kv-policy", "h2o:colour=red", "--kv-budget", "8"]),
        "unknown option",
    );
    assert_clean_error(
        &keyformer(&["run", "-p", "hi", "--kv-policy", "full", "--kv-budget", "50%"]),
        "needs a policy such as keyformer",
    );
    assert_clean_error(
        &keyformer(&["run", "-p", "hi", "--kv-budget", "8", "--prefill-chunk", "0"]),
        "a prefill chunk must be at least 1 token",
    );
    assert_clean_error(
        &keyformer(&["run", "-p", "hi", "--kv-budget", "8", "--prefill-chunk", "9000"]),
        "a prefill chunk of 9000 tokens is longer than the model's context (8192)",
    );
    // Values clap cannot parse: its own error (usage follows), exit 2, no panic.
    for (flag, value, needle) in
        [("--kv-budget", "12x", "invalid amount"), ("--keyformer-noise", "pink", "unknown noise")]
    {
        let out = keyformer(&["run", "-p", "hi", flag, value]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.lines().next().unwrap().starts_with("error:") && stderr.contains(needle), "{stderr}");
    }
}

#[test]
fn run_json_reports_the_kv_cache() {
    let prose = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/prose.txt");
    let v = keyformer_json(&[
        "run",
        "-f",
        prose.to_str().unwrap(),
        "-n",
        "8",
        "--json",
        "--kv-policy",
        "keyformer",
        "--kv-budget",
        "50%",
    ]);
    let kv = &v["kv_cache"];
    let prompt = v["prompt_tokens"].as_u64().unwrap();
    let budget = kv["budget_tokens"].as_u64().unwrap();
    assert_eq!(kv["policy"], "keyformer");
    assert_eq!(budget, (prompt as f64 / 2.0).round() as u64);
    assert_eq!(kv["tokens_held_max"].as_u64().unwrap(), budget);
    // K and V, f16 (the default), 30 layers x 3 KV heads x 64 dims.
    let per_token = 2 * 2 * 30 * 3 * 64;
    assert_eq!(kv["bytes_held_max"].as_u64().unwrap(), budget * per_token);
    let seen = prompt + v["generated_tokens"].as_u64().unwrap() - 1;
    assert_eq!(kv["bytes_full_equivalent"].as_u64().unwrap(), seen * per_token);
    assert!(kv["evictions"].as_u64().unwrap() > 0);
}

#[test]
fn run_json_has_the_contract_fields_and_is_deterministic() {
    let args = ["run", "-p", "The capital of France is", "-n", "8", "--json", "--temperature", "0.8", "--seed", "3"];
    let v = keyformer_json(&args);
    for k in ["text", "token_ids", "prompt_tokens", "generated_tokens"] {
        assert!(v.get(k).is_some(), "missing {k}: {v}");
    }
    assert!(v["timings"]["prefill_tok_s"].as_f64().unwrap() > 0.0);
    assert!(v["timings"]["decode_tok_s"].as_f64().is_some());
    assert_eq!(v["prompt_tokens"], 5);
    assert_eq!(v["generated_tokens"].as_u64().unwrap() as usize, v["token_ids"].as_array().unwrap().len());
    // The same seed gives the same sample.
    let again: serde_json::Value = serde_json::from_slice(&keyformer(&args).stdout).unwrap();
    assert_eq!(v["token_ids"], again["token_ids"]);
}

#[test]
fn stop_strings_and_chat_mode() {
    let out = keyformer(&["run", "-p", "1, 2, 3, 4, 5,", "-n", "40", "--json", "--stop", "8"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = v["text"].as_str().unwrap();
    assert!(!text.contains('8'), "{text:?}");
    assert_eq!(v["stop_reason"], "stop_string", "{v}");
    let out = keyformer(&["run", "--chat", "-p", "What is the capital of France?", "-n", "24", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // SmolLM2's template adds its default system turn: 37 tokens, as llama.cpp counts the
    // same rendered text.
    assert_eq!(v["prompt_tokens"], 37, "{v}");
    assert!(!v["text"].as_str().unwrap().is_empty(), "{v}");
}

#[test]
fn tokenize_and_perplexity_json() {
    let out = keyformer(&["tokenize", "-p", "In 1969", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // SmolLM2 splits digits one by one: "In", " ", "1", "9", "6", "9".
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 6, "{v}");
    let prose = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/prose.txt");
    let v =
        keyformer_json(&["perplexity", "-f", prose.to_str().unwrap(), "--ctx", "128", "--max-windows", "2", "--json"]);
    assert_eq!(v["tokens_scored"], 2 * 127);
    let (nll, ppl) = (v["mean_nll"].as_f64().unwrap(), v["ppl"].as_f64().unwrap());
    assert!((nll.exp() - ppl).abs() < 1e-6 * ppl && ppl > 1.0 && ppl < 200.0, "{v}");
}

#[test]
fn eval_writes_rows_and_a_summary_and_resumes() {
    let prose =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/prose.txt")).unwrap();
    let (a, b) = prose.split_at(prose.len() / 2);
    let data = scratch("docs.jsonl");
    let line =
        |id: &str, text: &str| serde_json::json!({"id": id, "context": text, "reference": "A summary."}).to_string();
    std::fs::write(&data, format!("{}\n{}\n", line("first", a), line("second", b))).unwrap();
    let out = scratch("eval-out");
    let _ = std::fs::remove_dir_all(&out);
    let args = [
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "fidelity,generation,summary,needle,ppl",
        "--policies",
        "window,keyformer,keyformer:noise=none",
        "--budgets",
        "50%",
        "--seeds",
        "0,1",
        "--prompt-tokens",
        "64",
        "--continuation-tokens",
        "8",
        "--summary-tokens",
        "8",
        "--ppl-ctx",
        "64",
        "--needle-lengths",
        "256",
        "--needle-depths",
        "50",
        "--kv-min-budget",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let run = keyformer(&args);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let rows = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    // 5 tasks x 2 documents (x 1 haystack for the needle) x (window + keyformer x 2 seeds +
    // keyformer without noise, which needs no seeds) = 40.
    assert_eq!(rows.lines().count(), 40);
    let first: serde_json::Value = serde_json::from_str(rows.lines().next().unwrap()).unwrap();
    assert!(first["metrics"]["mean_kl"].as_f64().unwrap() >= 0.0);
    assert!(out.join("summary.json").exists());
    let svg = std::fs::read_to_string(out.join("fidelity-mean_kl.svg")).unwrap();
    assert_eq!(
        svg.matches("<polyline").count() + svg.matches("<circle").count(),
        3,
        "one point per policy at one budget"
    );
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| keyformer |") && md.contains("| keyformer:noise=none |") && md.contains("## summary"),
        "{md}"
    );
    // Interrupted: the last row is cut in half; the rerun redoes only that case.
    let cut = &rows[..rows.len() - 20];
    std::fs::write(out.join("results.jsonl"), cut).unwrap();
    let rerun = keyformer(&args);
    assert!(rerun.status.success(), "{}", String::from_utf8_lossy(&rerun.stderr));
    let again = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let parsed = again.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()).count();
    assert_eq!(parsed, 40, "{again}");
    let needle: serde_json::Value =
        serde_json::from_str(again.lines().find(|l| l.contains("\"needle\"")).unwrap()).unwrap();
    assert!(needle["doc"].as_str().unwrap().ends_with("@256@50%"), "{needle}");
    for m in ["correct", "full_correct"] {
        let v = needle["metrics"][m].as_f64().unwrap();
        assert!(v == 0.0 || v == 1.0, "{needle}");
    }
    let generation = again.lines().find(|l| l.contains("\"generation\"")).unwrap();
    let g: serde_json::Value = serde_json::from_str(generation).unwrap();
    let r1 = g["metrics"]["rouge1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&r1) && g["metrics"]["identical_prefix"].as_f64().unwrap() <= 8.0);
    // The same run again: nothing is redone.
    let same = keyformer(&args);
    assert!(!String::from_utf8_lossy(&same.stderr).contains("run again"));
    assert_eq!(std::fs::read_to_string(out.join("results.jsonl")).unwrap(), again);
    // Another --continuation-tokens: the fidelity and generation rows (2 tasks x 2 documents x
    // 4 cases) were made otherwise; they move aside and run again; the others stay.
    let mut changed = args.to_vec();
    let at = changed.iter().position(|&a| a == "--continuation-tokens").unwrap();
    changed[at + 1] = "6";
    let redo = keyformer(&changed);
    assert!(String::from_utf8_lossy(&redo.stderr).contains("16 rows"), "{}", String::from_utf8_lossy(&redo.stderr));
    let stale = std::fs::read_to_string(out.join("results.stale.jsonl")).unwrap();
    assert_eq!(stale.lines().count(), 16);
    let now = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    assert_eq!(now.lines().count(), 40);
    let g: serde_json::Value =
        serde_json::from_str(now.lines().rev().find(|l| l.contains("\"generation\"")).unwrap()).unwrap();
    assert!(g["metrics"]["identical_prefix"].as_f64().unwrap() <= 6.0, "{g}");
    assert_clean_error(
        &keyformer(&["eval", "--data", "/nonexistent.jsonl", "--out", out.to_str().unwrap()]),
        "reading /nonexistent.jsonl",
    );
    let bad_variant = [
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--policies",
        "keyformer:noise=pink",
        "--out",
        out.to_str().unwrap(),
    ];
    assert_clean_error(&keyformer(&bad_variant), "unknown noise");
}

#[test]
fn bench_runs_each_policy_at_each_depth_and_reports_the_kv_it_held() {
    let args = [
        "bench",
        "-p",
        "16",
        "-n",
        "4",
        "-d",
        "0,32",
        "--kv-policy",
        "full,h2o",
        "--kv-budget",
        "50%",
        "--kv-min-budget",
        "1",
        "-r",
        "1",
        "--bandwidth-mib",
        "64",
    ];
    let v = keyformer_json(&[&args[..], &["--json"]].concat());
    let rows = v["results"].as_array().unwrap();
    let names: Vec<String> =
        rows.iter().map(|r| format!("{} {}", r["kv"].as_str().unwrap(), r["test"].as_str().unwrap())).collect();
    // tg at depth 0 has no prompt for a percentage budget to be a share of: only full runs it.
    assert_eq!(
        names,
        [
            "full pp16",
            "h2o@50% pp16",
            "full tg4",
            "full pp16 @ d32",
            "h2o@50% pp16 @ d32",
            "full tg4 @ d32",
            "h2o@50% tg4 @ d32"
        ],
    );
    let row = |name: &str| &rows[names.iter().position(|n| n == name).unwrap()];
    assert_eq!(row("full tg4 @ d32")["speedup_vs_full"], 1.0);
    let (full, h2o) =
        (row("full tg4 @ d32")["kv_bytes"].as_u64().unwrap(), row("h2o@50% tg4 @ d32")["kv_bytes"].as_u64().unwrap());
    // 36 tokens in the full cache; 16 kept of the 32-token prompt (+1 slot while a step runs).
    assert!(h2o * 2 <= full, "h2o {h2o} vs full {full}");
    assert!(rows.iter().all(|r| r["median_tok_s"].as_f64().unwrap() > 0.0));
    assert!(v["read_bandwidth_gb_s"].as_f64().unwrap() > 0.1);
    // A decode step reads at least the weights (the Q4_1 file is ~98 MB) plus its cache.
    let tg = row("h2o@50% tg4 @ d32");
    assert!(tg["bytes_per_token"].as_u64().unwrap() > 90_000_000, "{tg}");
    assert!(tg["fraction_of_bandwidth"].as_f64().unwrap() > 0.0);
    assert!(tg["peak_rss_bytes"].as_u64().unwrap() > 50_000_000, "{tg}");
    assert!(row("full pp16")["bytes_per_token"].is_null());
    let table = keyformer(&args);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("read bandwidth") && text.contains("| of bandwidth |"), "{text}");
    assert_clean_error(&keyformer(&["bench", "--kv-policy", "h2o"]), "--kv-budget");
    assert_clean_error(&keyformer(&["bench", "-p", "9000"]), "exceed the model's context");
}

#[test]
fn bench_batches_sequences_and_shares_the_weight_reads() {
    let v = keyformer_json(&[
        "bench",
        "-p",
        "0",
        "-n",
        "3",
        "-d",
        "32",
        "-b",
        "1,3",
        "--kv-policy",
        "full,window",
        "--kv-budget",
        "16",
        "-r",
        "1",
        "--bandwidth-mib",
        "0",
        "--json",
    ]);
    let rows = v["results"].as_array().unwrap();
    let key = |r: &serde_json::Value| format!("{} x{}", r["kv"].as_str().unwrap(), r["batch"]);
    let names: Vec<String> = rows.iter().map(key).collect();
    assert_eq!(names, ["full x1", "window@16 x1", "full x3", "window@16 x3"]);
    let row = |name: &str| &rows[names.iter().position(|n| n == name).unwrap()];
    // Each batch is compared with the full cache at the same batch.
    assert_eq!(row("full x3")["speedup_vs_full"], 1.0);
    // Three sequences share one read of the weights per step: fewer bytes per token.
    let per_token = |name: &str| row(name)["bytes_per_token"].as_u64().unwrap();
    assert!(per_token("full x3") * 2 < per_token("full x1"), "{} vs {}", per_token("full x3"), per_token("full x1"));
    // KV held is one sequence's: the same at any batch.
    assert_eq!(row("window@16 x3")["kv_bytes"], row("window@16 x1")["kv_bytes"]);
    assert_clean_error(&keyformer(&["bench", "-b", "0"]), "--batch must be at least 1");
}

#[test]
fn gpu_check_without_a_gpu_says_why() {
    // CI has neither the `cuda` feature nor a GPU: either way the answer is one clear line.
    let out = keyformer(&["gpu-check", "--shape", "llama2-7b"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("built without the CUDA backend") || err.contains("no CUDA driver") || err.contains("no CUDA GPU"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn gpu_bench_arguments_without_a_gpu_give_one_line_errors() {
    // --device cuda on a build without the feature (CI) or a machine without a GPU.
    let out = keyformer(&["bench", "--device", "cuda", "--random-weights", "llama2-7b", "-p", "8", "-n", "8"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("built without the CUDA backend") || err.contains("no CUDA driver") || err.contains("no CUDA GPU"),
        "{err}"
    );
    // CPU-only settings are refused before any model loads.
    for (args, want) in [
        (&["bench", "-b", "max"][..], "--batch max needs --device cuda"),
        (&["bench", "--random-weights", "llama2-7b"][..], "for small shapes"),
        (&["run", "--random-weights", "llama9", "-p", "x"][..], "llama9"),
        (&["run", "--random-weights", "tiny", "-m", "x.gguf", "-p", "x"][..], "cannot be used with"),
        (&["run", "--device", "cuda", "--random-weights", "tiny", "-p", "x"][..], "CUDA"),
        (&["serve", "--device", "cuda", "--random-weights", "tiny"][..], "CUDA"),
        (&["bench", "-b", "0"][..], "--batch must be at least 1"),
        (&["bench", "-b", "two"][..], "not a batch size"),
        (&["bench", "--kv-policy", "h2o"][..], "needs a budget"),
        (&["bench", "--kv-policy", "h2o:budget=0"][..], "budget"),
        (&["bench", "--random-weights", "tiny", "--random-type", "q2_k"][..], "weight type 'q2_k': f16 or q4_0"),
        (&["bench", "--random-weights", "tiny", "--random-type", "q9"][..], "--random-type"),
        (&["bench", "--gpu-weights", "q4"][..], "invalid value 'q4'"),
    ] {
        let out = keyformer(args);
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `--random-type` on the CPU: the tiny shape's matrices as random Q4_K blocks run (the
/// quantised row dots), and give other tokens than the f16 weights.
#[test]
fn random_weights_of_a_quantised_type_run_on_the_cpu() {
    let text = |t: &str| {
        let v = keyformer_json(&[
            "run",
            "--random-weights",
            "tiny",
            "--random-type",
            t,
            "-p",
            "abc",
            "-n",
            "6",
            "--temperature",
            "0",
            "--json",
        ]);
        assert_eq!(v["generated_tokens"], 6, "{t}: {v}");
        v["token_ids"].to_string()
    };
    assert_ne!(text("f16"), text("q4_k"));
}

#[test]
fn a_policy_may_carry_its_own_budget_in_bench_but_not_in_eval() {
    let v = keyformer_json(&[
        "bench",
        "-p",
        "0",
        "-n",
        "2",
        "-d",
        "40",
        "--kv-policy",
        "full,h2o:budget=90%,keyformer:budget=50%",
        "--kv-min-budget",
        "1",
        "-r",
        "1",
        "--bandwidth-mib",
        "0",
        "--json",
    ]);
    let kv: Vec<&str> = v["results"].as_array().unwrap().iter().map(|r| r["kv"].as_str().unwrap()).collect();
    assert_eq!(kv, ["full", "h2o@90%", "keyformer@50%"]);
    let held: Vec<u64> = v["results"].as_array().unwrap().iter().map(|r| r["kv_bytes"].as_u64().unwrap()).collect();
    // 90% of 40 tokens is 36 held, 50% is 20: fewer bytes with the smaller budget.
    assert!(held[2] < held[1] && held[1] < held[0], "{held:?}");
    let out = keyformer(&[
        "eval",
        "--data",
        "/nonexistent.jsonl",
        "--out",
        "/nonexistent-dir",
        "--policies",
        "h2o:budget=50%",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("budget= is for bench"));
}

#[test]
fn kv_type_f16_halves_the_cache_and_bad_types_are_refused() {
    let held = |t: &str| {
        let v = keyformer_json(&[
            "--kv-type",
            t,
            "bench",
            "-p",
            "0",
            "-n",
            "2",
            "-d",
            "64",
            "-r",
            "1",
            "--bandwidth-mib",
            "0",
            "--json",
        ]);
        assert_eq!(v["kv_type"], t);
        v["results"][0]["kv_bytes"].as_u64().unwrap()
    };
    assert_eq!(held("f16") * 2, held("f32"));
    let bad = keyformer(&["--kv-type", "f8", "info"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("unknown KV cache type"));
}

/// A tiny model of each family (tests/golden/families/) through every command a user runs:
/// run, perplexity, bench, eval and serve.
#[test]
fn every_family_answers_run_perplexity_bench_eval_and_serve() {
    use std::io::{BufRead, BufReader, Read, Write};
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests");
    let prose = root.join("data/prose.txt");
    let data = scratch("family-docs.jsonl");
    let text = std::fs::read_to_string(&prose).unwrap();
    std::fs::write(&data, serde_json::json!({"id": "d", "context": &text[..2000]}).to_string() + "\n").unwrap();
    // Hugging Face folders too (GPT-J exists only as one).
    for family in ["qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "gpt2", "mpt", "hf/gptj", "hf/llama"] {
        let model = match family.starts_with("hf/") {
            true => root.join(format!("golden/families/{family}")),
            false => root.join(format!("golden/families/{family}.gguf")),
        };
        let family = family.replace('/', "-");
        let m = model.to_str().unwrap();
        let r = keyformer_json(&[
            "run",
            "-m",
            m,
            "--prompt",
            "The cat sat on the mat",
            "--max-tokens",
            "6",
            "--json",
            "--kv-policy",
            "keyformer",
            "--kv-budget",
            "50%",
            "--kv-min-budget",
            "1",
        ]);
        assert_eq!(r["generated_tokens"], 6, "{family}: {r}");
        assert!(r["kv_cache"]["evictions"].as_u64().unwrap() > 0, "{family}: {r}");
        let p = keyformer_json(&[
            "perplexity",
            "-m",
            m,
            "--file",
            prose.to_str().unwrap(),
            "--ctx",
            "64",
            "--max-windows",
            "1",
            "--json",
        ]);
        assert!(p["ppl"].as_f64().unwrap().is_finite(), "{family}: {p}");
        let b = keyformer(&[
            "bench",
            "-m",
            m,
            "-p",
            "16",
            "-n",
            "4",
            "-r",
            "1",
            "--kv-policy",
            "full,keyformer",
            "--kv-budget",
            "50%",
            "--kv-min-budget",
            "1",
        ]);
        assert!(b.status.success(), "{family}: {}", String::from_utf8_lossy(&b.stderr));
        let table = String::from_utf8_lossy(&b.stdout);
        assert!(table.contains("| full | pp16 |") && table.contains("| keyformer@50% | pp16 |"), "{family}: {table}");
        let out = scratch(&format!("family-eval-{family}"));
        let _ = std::fs::remove_dir_all(&out);
        let e = keyformer(&[
            "eval",
            "-m",
            m,
            "--data",
            data.to_str().unwrap(),
            "--tasks",
            "fidelity",
            "--policies",
            "h2o,keyformer",
            "--budgets",
            "50%",
            "--kv-min-budget",
            "1",
            "--prompt-tokens",
            "48",
            "--continuation-tokens",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(e.status.success(), "{family}: {}", String::from_utf8_lossy(&e.stderr));
        let rows = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
        assert!(rows.contains("\"h2o\"") && rows.contains("\"keyformer\""), "{family}: {rows}");

        // serve: a completion over HTTP, then the server is stopped.
        let mut server = Command::new(env!("CARGO_BIN_EXE_keyformer"))
            .args([
                "serve",
                "-m",
                m,
                "--port",
                "0",
                "--kv-policy",
                "keyformer",
                "--kv-budget",
                "50%",
                "--kv-min-budget",
                "1",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(server.stderr.take().unwrap()).lines();
        let addr = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.split("listening on http://").nth(1).map(|a| a.split_whitespace().next().unwrap().to_string())
            })
            .unwrap_or_else(|| panic!("{family}: the server did not start"));
        let body = serde_json::json!({"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}).to_string();
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        server.kill().ok();
        server.wait().ok();
        assert!(response.starts_with("HTTP/1.1 200"), "{family}: {response}");
        let json: serde_json::Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(json["usage"]["completion_tokens"], 5, "{family}: {json}");
    }
}

/// What tripped a new user (issue 17): escapes in --stop, llama.cpp's spellings, seeds,
/// threads above the cores, a budget without a policy, budgets over 100% and the floor.
#[test]
fn llama_cpp_habits_work_and_short_prompts_are_not_starved() {
    // --stop "\n\n" stops at a blank line (the escape is read); the same text without it goes on.
    let prompt = "Write a letter to a friend.";
    let stopped = keyformer_json(&["run", "-p", prompt, "-n", "80", "--chat", "--stop", "\\n\\n", "--json"]);
    let free = keyformer_json(&["run", "-p", prompt, "-n", "80", "--chat", "--json"]);
    let (s, f) = (stopped["text"].as_str().unwrap(), free["text"].as_str().unwrap());
    assert!(f.contains("\n\n"), "the free answer has a blank line: {f:?}");
    assert_eq!(stopped["stop_reason"], "stop_string", "{s:?}");
    assert_eq!(s, &f[..f.find("\n\n").unwrap()]);

    // llama.cpp's spellings mean what they mean there: --temp, -s, -c, --repeat-last-n, -ngl 0.
    let a = keyformer_json(&["run", "-p", "Once", "-n", "12", "--temp", "1", "-s", "5", "-c", "64", "--json"]);
    let b = keyformer_json(&[
        "run",
        "-p",
        "Once",
        "-n",
        "12",
        "--temperature",
        "1",
        "--seed",
        "5",
        "--repeat-last-n",
        "64",
        "-ngl",
        "0",
        "--json",
    ]);
    assert_eq!((a["text"].clone(), a["seed"].clone()), (b["text"].clone(), b["seed"].clone()));
    // Without --seed, sampling draws one from the clock (and says which).
    let seeds: Vec<u64> = (0..2)
        .map(|_| keyformer_json(&["run", "-p", "Once", "-n", "4", "--temp", "1", "--json"])["seed"].as_u64().unwrap())
        .collect();
    assert_ne!(seeds[0], seeds[1]);
    // -c bounds the context: a prompt past it is refused.
    let long = "word ".repeat(100);
    assert_clean_error(&keyformer(&["run", "-p", &long, "-c", "32"]), "context is 32 tokens");
    // -tp N (vLLM's spelling) is read; above 1 it needs GPUs and a command that splits a model.
    assert_clean_error(&keyformer(&["run", "-p", "Once", "-tp", "2"]), "add --device cuda");
    assert_clean_error(&keyformer(&["serve", "-tp", "2"]), "add --device cuda");
    assert_clean_error(&keyformer(&["chat", "-tp", "2", "--device", "cuda"]), "chat runs on one device");
    assert_clean_error(&keyformer(&["bench", "-p", "8", "-n", "0", "-tp=2"]), "add --device cuda");
    assert_clean_error(&keyformer(&["bench", "-p", "8", "-n", "0", "--tensor-parallel", "0"]), "at least 1");
    // -ub N (llama.cpp's physical batch) is read, and 0 refused.
    assert_clean_error(&keyformer(&["run", "-p", "Once", "-ub", "0"]), "--ubatch-size must be at least 1");
    assert_clean_error(&keyformer(&["run", "-p", "Once", "-ub=0"]), "--ubatch-size must be at least 1");
    // bench -o json is --json.
    let v = keyformer_json(&["bench", "-o", "json", "-p", "8", "-n", "0", "-r", "1", "--bandwidth-mib", "0"]);
    assert!(v["results"].as_array().is_some_and(|r| r.len() == 1), "{v}");

    // Long work off a terminal (stderr is a pipe here) still reports: a line at the end.
    let prose = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/prose.txt");
    let ppl = keyformer(&["perplexity", "-f", prose.to_str().unwrap(), "-c", "64", "--max-windows", "2"]);
    let err = String::from_utf8_lossy(&ppl.stderr);
    assert!(ppl.status.success() && err.contains("scoring: 2/2 windows done in"), "{err}");
    assert!(String::from_utf8_lossy(&ppl.stdout).contains("in 2 windows of 64 tokens"));

    // More threads than cores: a warning and the cores, not a 50x slowdown.
    let out = keyformer(&["-t", "512", "run", "-p", "Hi", "-n", "2"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("more than the"), "{}", String::from_utf8_lossy(&out.stderr));

    // A budget alone means keyformer; a percentage never starves a short prompt (the floor,
    // 64 tokens by default), over 100% keeps the whole prompt, and --kv-min-budget lowers the floor.
    let kv = |args: &[&str]| {
        let mut all = vec!["run", "-p", "The cat sat on the mat.", "-n", "4", "--json"];
        all.extend_from_slice(args);
        keyformer_json(&all)["kv_cache"].clone()
    };
    let half = kv(&["--kv-budget", "50%"]);
    assert_eq!((half["policy"].as_str(), half["budget_tokens"].as_u64()), (Some("keyformer"), Some(64)));
    assert_eq!(half["evictions"], 0);
    assert_eq!(kv(&["--kv-budget", "150%", "--kv-min-budget", "1"])["budget_tokens"], 11, "150% of 7 tokens");
    let low = kv(&["--kv-policy", "h2o", "--kv-budget", "50%", "--kv-min-budget", "2"]);
    assert_eq!(low["budget_tokens"], 4);
    // The smallest budgets with no recent window (the probes' failing case).
    let tiny = kv(&["--kv-policy", "h2o", "--kv-budget", "1", "--kv-recent", "0"]);
    assert_eq!(tiny["budget_tokens"], 1);
}

/// `keyformer chat` driven by a script on stdin: answers stream, /stats reports what the cache
/// holds and that later turns computed only their new text, a message past the context is one
/// error line and the conversation goes on, /reset forgets it, and the end of input ends it.
#[test]
fn chat_turns_share_one_cache_and_survive_a_bad_message() {
    use std::io::Write as _;
    let script = format!(
        "What is the capital of France?\n/stats\nAnd of Germany?\n/stats\n{}\nThanks.\n/nope\n/reset\n/stats\n",
        "word ".repeat(400)
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyformer"))
        .args(["chat", "--kv-budget", "64", "--prefill-chunk", "32", "-n", "12", "--ctx-size", "400"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let stats: Vec<&str> = stdout.lines().filter(|l| l.starts_with('[') && l.contains("turns;")).collect();
    assert_eq!(stats.len(), 3, "{stdout}");
    let numbers = |line: &str| -> Vec<usize> {
        line.split(|c: char| !c.is_ascii_digit()).filter(|w| !w.is_empty()).filter_map(|w| w.parse().ok()).collect()
    };
    // "[T turns; conversation C tokens, P prefilled in all (R restarts); KV keyformer@64: H tokens ..."
    let (one, two) = (numbers(stats[0]), numbers(stats[1]));
    assert_eq!((one[0], two[0]), (1, 2), "{stdout}");
    assert!(two[1] > one[1] && two[2] < two[1], "the second turn computed only its new text: {stdout}");
    assert_eq!(two[3], 0, "no restarts: {stdout}");
    assert!(numbers(stats[1])[5] <= 64, "held within the budget: {stdout}");
    assert_eq!(stderr.matches("error:").count(), 1, "one error, for the long message: {stderr}");
    assert!(stderr.contains("context") && stderr.contains("kept"), "{stderr}");
    assert!(stdout.contains("[unknown command /nope"), "{stdout}");
    assert!(stdout.contains("[conversation reset]"), "{stdout}");
    assert!(stats[2].starts_with("[0 turns;"), "{stdout}");
}

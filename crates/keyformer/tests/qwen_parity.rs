//! Parity with llama.cpp on the real Qwen2.5-Coder files (fetched through their aliases, as a
//! user would; `tests/golden/qwen2.5-coder-*/llamacpp.json` made by
//! `tools/reference/golden_llamacpp.py` with an f32 KV cache and llama.cpp's plain kernels,
//! not the weight repacking it does on some CPUs): token ids of the test texts,
//! the top-5 next tokens after three prompts, and the perplexity of a 1024-token window.
//!
//! The llama.cpp checks run with the default 8-bit prefill activations, as llama.cpp's own
//! products quantise them. The perplexity is also checked against transformers on the same file
//! (its GGUF loader dequantises the weights to f32; `tools/reference/golden_transformers_ppl.py`)
//! with f32 prefill activations (`PrefillActivations::F32`): then ours agrees with it to 1e-6
//! in mean NLL.

mod common;

use common::*;
use keyformer::registry;

fn engine(alias: &str) -> keyformer::Engine {
    let path = registry::resolve(alias, &mut |_| {}).unwrap_or_else(|e| panic!("fetching {alias}: {e}"));
    load_with_f32_cache(&path)
}

fn check(alias: &str) {
    let engine = engine(alias);
    let g = golden_json(&format!("golden/{alias}/llamacpp.json"));
    for case in g["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(engine.tokenizer.encode(text, true).unwrap(), ids(&case["ids"]), "{alias}: text {text:?}");
        assert_eq!(engine.tokenizer.decode(&ids(&case["ids"])).unwrap(), text, "{alias}: decode");
    }
    // Both sides quantise the activations to 8 bits, but in different blocks (ours 32 values
    // a scale; llama.cpp's K-quant products 256), so logits differ (by up to 0.25 measured on
    // the 1.5B file; 0.18 on both with llama.cpp's plain kernels) and near-ties may swap.
    for case in g["top5"].as_array().unwrap() {
        assert_top5_matches(alias, &engine, case, 0.3);
    }
    let r = prose_perplexity(&engine);
    let want = g["perplexity"]["ppl"].as_f64().unwrap();
    let rel = (r.ppl - want).abs() / want;
    eprintln!("{alias} perplexity: ours {:.4}, llama.cpp {want:.4}, relative difference {:.3}%", r.ppl, rel * 100.0);
    // The bound: 0.5% (measured 0.17% on the 0.5B file, 0.007% on the 1.5B).
    assert!(rel < 0.005, "{alias}: perplexity {} vs llama.cpp {want}", r.ppl);
    let mut engine = engine;
    engine.model.backend.prefill_activations = keyformer::backend::cpu::PrefillActivations::F32;
    let r = prose_perplexity(&engine);
    let hf = golden_json(&format!("golden/{alias}/transformers.json"));
    let hf_nll = hf["perplexity"]["mean_nll"].as_f64().unwrap();
    eprintln!("{alias} mean NLL: ours {:.7}, transformers {hf_nll:.7}", r.mean_nll);
    assert!((r.mean_nll - hf_nll).abs() < 1e-5, "{alias}: mean NLL {} vs transformers {hf_nll}", r.mean_nll);
}

#[test]
fn qwen2_5_coder_0_5b_equals_llama_cpp() {
    check("qwen2.5-coder-0.5b");
}

#[test]
fn qwen2_5_coder_1_5b_equals_llama_cpp() {
    check("qwen2.5-coder-1.5b");
}

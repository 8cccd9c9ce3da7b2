//! Parity with llama.cpp on the real Qwen2.5-Coder files (fetched through their aliases, as a
//! user would; `tests/golden/qwen2.5-coder-*/llamacpp.json` made by
//! `tools/reference/golden_llamacpp.py` with an f32 KV cache): token ids of the test texts,
//! the top-5 next tokens after three prompts, and the perplexity of a 1024-token window.
//!
//! The perplexity is also checked against transformers on the same file (its GGUF loader
//! dequantises the weights to f32; `tools/reference/golden_transformers_ppl.py`): ours agrees
//! with it to 1e-6 in mean NLL, while llama.cpp, which quantises activations to 8 bits in its
//! products, lies 0.34% (0.5B) and 0.51% (1.5B) away in perplexity.

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
    for case in g["top5"].as_array().unwrap() {
        let (order, logits) = ranked_after(&engine, &ids(&case["ids"]));
        let want = ids(&case["top5"]);
        let want_logits: Vec<f32> =
            case["top5_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let diff = want.iter().zip(&want_logits).map(|(&t, &l)| (logits[t as usize] - l).abs()).fold(0f32, f32::max);
        eprintln!(
            "{alias} {:?}: top-5 {:?} (llama.cpp {want:?}), logits within {diff:.4}",
            case["prompt"],
            &order[..5]
        );
        // Prefill products: ours are exact to the dequantised weights, llama.cpp's quantise the
        // activations to 8 bits, so logits differ by ~0.1 and near-ties (within TIE) may swap.
        const TIE: f32 = 0.25;
        assert!(diff < TIE, "{alias}: top-5 logits differ by {diff}");
        assert_eq!(order[0], want[0], "{alias}: top-1 for {:?}", case["prompt"]);
        let fifth = want_logits[4];
        for &t in &order[..5] {
            if !want.contains(&t) {
                // Not in llama.cpp's top-5: it must be a near-tie with llama.cpp's fifth.
                assert!(
                    logits[t as usize] < fifth + TIE,
                    "{alias}: token {t} ({}) in our top-5 for {:?}, llama.cpp's fifth is {fifth}",
                    logits[t as usize],
                    case["prompt"]
                );
            }
        }
        for (&t, &l) in want.iter().zip(&want_logits) {
            assert!(order[..5].contains(&t) || l < fifth + TIE, "{alias}: llama.cpp's top-5 token {t} missing");
        }
    }
    let r = prose_perplexity(&engine);
    let want = g["perplexity"]["ppl"].as_f64().unwrap();
    let rel = (r.ppl - want).abs() / want;
    eprintln!("{alias} perplexity: ours {:.4}, llama.cpp {want:.4}, relative difference {:.3}%", r.ppl, rel * 100.0);
    assert!(rel < 0.006, "{alias}: perplexity {} vs llama.cpp {want}", r.ppl);
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

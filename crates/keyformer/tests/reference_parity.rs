//! Parity with independent implementations on the real model (SmolLM2-135M):
//! llama.cpp (through llama-cpp-python) on the Q4_1 file, transformers on its F32 copy, and
//! the `gguf` package's dequantiser. Golden values come from `tools/reference/*.py`.

mod common;

use common::*;
use keyformer::gguf::{GgufFile, MetaValue};
use keyformer::models::decoder::Logits;
use keyformer::quant::{dequantize_row, GgmlType};
use keyformer::sampling::argmax;
use keyformer::tokenizer::Tokenizer;

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("type {name}"))
}

fn assert_close(got: &[f32], want: &[serde_json::Value], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let w = w.as_f64().unwrap() as f32;
        assert!((g - w).abs() <= 1e-6 * w.abs().max(1.0), "{what}[{i}]: {g} vs gguf-py {w}");
    }
}

#[test]
fn dequantisers_match_the_gguf_package() {
    let g = golden_json("golden/quant.json");
    let mut seen = std::collections::BTreeSet::new();
    for case in g["random"].as_array().unwrap() {
        let t = type_named(case["type"].as_str().unwrap());
        let bytes: Vec<u8> = (0..case["bytes_hex"].as_str().unwrap().len() / 2)
            .map(|i| u8::from_str_radix(&case["bytes_hex"].as_str().unwrap()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let want = case["values"].as_array().unwrap();
        let mut got = vec![0f32; want.len()];
        dequantize_row(t, &bytes, &mut got);
        assert_close(&got, want, t.name());
        seen.insert(t.name());
    }
    // Every quantised type plus F16/BF16 is covered (F32 is a plain read).
    assert_eq!(seen.len(), GgmlType::ALL.len() - 1, "{seen:?}");

    let f = GgufFile::open(q4_model()).unwrap();
    for case in g["model"].as_array().unwrap() {
        let info = f.tensor_info(case["tensor"].as_str().unwrap()).unwrap();
        let start = case["start"].as_u64().unwrap() as usize;
        let want = case["values"].as_array().unwrap();
        let bs = info.ggml_type.block_size();
        let bytes = &f.tensor_bytes(info)[info.ggml_type.row_bytes(start / bs * bs)..];
        let mut got = vec![0f32; want.len()];
        dequantize_row(info.ggml_type, bytes, &mut got);
        assert_close(&got, want, &info.name);
    }
}

#[test]
fn token_ids_equal_llama_cpp() {
    let engine = load_with_f32_cache(&q4_model());
    let g = golden_json("golden/llamacpp.json");
    for case in g["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(engine.tokenizer.encode(text, true).unwrap(), ids(&case["ids"]), "text {text:?}");
        // And decoding gives the text back (byte-level BPE is lossless).
        assert_eq!(engine.tokenizer.decode(&ids(&case["ids"])).unwrap(), text);
    }
}

#[test]
fn every_pre_tokenizer_table_equals_llama_cpp() {
    // SmolLM2's vocabulary under other `tokenizer.ggml.pre` values (llama.cpp tokenised the
    // same texts with a vocab-only copy of the file carrying each value).
    let f = GgufFile::open(q4_model()).unwrap();
    let g = golden_json("golden/llamacpp.json");
    let texts: Vec<&str> = g["tokenizer"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
    let variants = g["pre_variants"].as_object().unwrap();
    assert!(variants.len() >= 5);
    for (pre, cases) in variants {
        let mut md = f.metadata.clone();
        md.insert("tokenizer.ggml.pre".into(), MetaValue::String(pre.clone()));
        let tok = Tokenizer::from_metadata(&md).unwrap();
        for (text, want) in texts.iter().zip(cases.as_array().unwrap()) {
            assert_eq!(tok.encode(text, false).unwrap(), ids(want), "pre {pre}, text {text:?}");
        }
    }
    let mut md = f.metadata.clone();
    md.insert("tokenizer.ggml.pre".into(), MetaValue::String("no-such-pre".into()));
    let err = Tokenizer::from_metadata(&md).err().expect("an unknown pre-tokenizer is refused");
    assert!(err.to_string().contains("unknown pre-tokenizer 'no-such-pre'"), "{err}");
}

#[test]
fn q4_1_top5_equals_llama_cpp() {
    use keyformer::backend::cpu::PrefillActivations;
    let mut engine = load_with_f32_cache(&q4_model());
    let g = golden_json("golden/llamacpp.json");
    // Logits within 0.21 (f32 prefill activations) and 0.28 (8-bit, the default: rounded as
    // llama.cpp rounds but summed in another order); at 8 bits a near-tie at rank 5 of the first
    // prompt swaps (13.16 in llama.cpp against the next token).
    for (acts, tie) in [(PrefillActivations::Q8, 0.35), (PrefillActivations::F32, 0.25)] {
        engine.model.backend.prefill_activations = acts;
        for case in g["top5"].as_array().unwrap() {
            assert_top5_matches(&format!("smollm2 {acts:?}"), &engine, case, tie);
        }
    }
}

#[test]
fn q4_1_perplexity_within_half_a_percent_of_llama_cpp() {
    let engine = load_with_f32_cache(&q4_model());
    let g = golden_json("golden/llamacpp.json");
    let r = prose_perplexity(&engine);
    let want = g["perplexity"]["ppl"].as_f64().unwrap();
    let rel = (r.ppl - want).abs() / want;
    eprintln!("perplexity: ours {:.4}, llama.cpp {want:.4}, relative difference {:.4}%", r.ppl, rel * 100.0);
    assert!(rel < 0.005, "ours {} vs llama.cpp {want}", r.ppl);
}

fn transformers_cases() -> Vec<(Vec<u32>, Vec<f32>, Vec<u32>)> {
    let g = golden_json("golden/transformers.json");
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let raw = std::fs::read(golden(&format!("golden/{}", c["logits_file"].as_str().unwrap()))).unwrap();
            let logits = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (ids(&c["ids"]), logits, ids(&c["greedy32"]))
        })
        .collect()
}

#[test]
fn f32_last_token_logits_match_transformers() {
    let engine = load_with_f32_cache(&f32_model());
    for (prompt, want, _) in transformers_cases() {
        let mut cache = engine.model.new_cache(prompt.len());
        let got = engine.model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        eprintln!("prompt of {} tokens: max |logit diff| vs transformers = {max_diff:.5}", prompt.len());
        assert!(max_diff < 0.05, "max abs diff {max_diff}");
    }
}

#[test]
fn f32_greedy_32_tokens_match_transformers() {
    let engine = load_with_f32_cache(&f32_model());
    for (prompt, _, want) in transformers_cases() {
        // Token by token through the decode path (no stop on EOS: transformers ran 32 steps).
        let mut cache = engine.model.new_cache(prompt.len() + 32);
        let mut logits = engine.model.forward(&prompt, &mut cache, Logits::Last).unwrap();
        let mut got = Vec::new();
        for _ in 0..32 {
            let next = argmax(&logits);
            got.push(next);
            logits = engine.model.forward(&[next], &mut cache, Logits::Last).unwrap();
        }
        assert_eq!(got, want);
    }
}

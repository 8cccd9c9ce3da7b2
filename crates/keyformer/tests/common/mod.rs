//! Shared by the reference tests: where the models and golden files are.
#![allow(dead_code)]

use std::path::PathBuf;

use keyformer::registry;

/// The SmolLM2 Q4_1 file (fetched through the alias on first use, as a user would).
pub fn q4_model() -> PathBuf {
    registry::resolve(registry::DEFAULT_MODEL, &mut |_| {}).expect("fetching the default model")
}

/// The F32 copy made by `tools/reference/make_f32_gguf.py` (scripts/test.sh makes it).
pub fn f32_model() -> PathBuf {
    let path = std::env::var_os("KEYFORMER_F32_MODEL").map(PathBuf::from).unwrap_or_else(|| {
        registry::cache_dir().expect("cache dir").join("models").join("SmolLM2-135M-Instruct.F32.gguf")
    });
    assert!(
        path.is_file(),
        "{} is missing: run scripts/test.sh, which makes it with tools/reference/make_f32_gguf.py",
        path.display()
    );
    path
}

/// An engine whose KV cache stores f32, as the references (transformers; llama.cpp run with an
/// f32 cache) do: the parity tests compare exact arithmetic.
pub fn load_with_f32_cache(path: &std::path::Path) -> keyformer::Engine {
    let mut engine = keyformer::Engine::load(path).expect("loading the model");
    engine.model.kv_type = keyformer::kv::KvType::F32;
    engine
}

pub fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests").join(name)
}

pub fn golden_json(name: &str) -> serde_json::Value {
    let p = golden(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Greedy decoding for `steps` tokens under `kv`; returns every step's logits and the cache.
pub fn decode_greedy(
    engine: &keyformer::Engine,
    kv: &keyformer::keyformer_kv::PolicyConfig,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<f32>>, keyformer::kv::KvCache) {
    let mut cache = engine.new_cache(kv, prompt.len(), steps).unwrap();
    let mut logits = vec![engine.prefill(prompt, &mut cache).unwrap()];
    for _ in 0..steps {
        let next = keyformer::sampling::argmax(logits.last().unwrap());
        logits.push(engine.decode_step(next, &mut cache).unwrap());
    }
    (logits, cache)
}

/// Token ids by descending logit after `prompt` (full cache, the prompt's last row).
pub fn ranked_after(engine: &keyformer::Engine, prompt: &[u32]) -> (Vec<u32>, Vec<f32>) {
    let mut cache = engine.model.new_cache(prompt.len());
    let logits = engine.model.forward(prompt, &mut cache, keyformer::models::decoder::Logits::Last).unwrap();
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    (order, logits)
}

/// Our top-5 after a golden `case` of llama.cpp's (`ids`, `top5`, `top5_logits`): the same
/// top-1, logits of its top-5 within `tie` of llama.cpp's, and a token in one top-5 but not the
/// other only as a near-tie (within `tie`) with llama.cpp's fifth. Returns the largest logit
/// difference.
pub fn assert_top5_matches(label: &str, engine: &keyformer::Engine, case: &serde_json::Value, tie: f32) -> f32 {
    let (order, logits) = ranked_after(engine, &ids(&case["ids"]));
    let want = ids(&case["top5"]);
    let want_logits: Vec<f32> =
        case["top5_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let diff = want.iter().zip(&want_logits).map(|(&t, &l)| (logits[t as usize] - l).abs()).fold(0f32, f32::max);
    eprintln!("{label} {:?}: top-5 {:?} (llama.cpp {want:?}), logits within {diff:.4}", case["prompt"], &order[..5]);
    assert!(diff < tie, "{label}: top-5 logits differ by {diff}");
    assert_eq!(order[0], want[0], "{label}: top-1 for {:?}", case["prompt"]);
    let fifth = want_logits[4];
    for &t in &order[..5] {
        if !want.contains(&t) {
            assert!(
                logits[t as usize] < fifth + tie,
                "{label}: token {t} ({}) in our top-5 for {:?}, llama.cpp's fifth is {fifth}",
                logits[t as usize],
                case["prompt"]
            );
        }
    }
    for (&t, &l) in want.iter().zip(&want_logits) {
        assert!(order[..5].contains(&t) || l < fifth + tie, "{label}: llama.cpp's top-5 token {t} missing");
    }
    diff
}

/// Perplexity of the first 1024-token window of tests/data/prose.txt with the full cache (the
/// window the llama.cpp and transformers goldens score).
pub fn prose_perplexity(engine: &keyformer::Engine) -> keyformer::PerplexityReport {
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    let tokens = engine.encode(&text).unwrap();
    let kv = keyformer::keyformer_kv::PolicyConfig::default();
    let r = engine.perplexity(&tokens, 1024, Some(1), &kv, &mut |_, _| {}).unwrap();
    assert_eq!(r.tokens_scored, 1023);
    r
}

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

//! Broken Hugging Face folders: each is refused with one error line that names the file and
//! what is wrong, never a panic. Each case is the tiny Llama folder
//! (tests/golden/families/hf/llama) copied and broken in one way.

use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

fn source() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families/hf/llama")
}

/// A fresh copy of the tiny Llama folder named `case`.
fn copy(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyformer-bad-folder-{}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(source()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    dir
}

/// Load `dir`; the error's text, which must be one line containing every piece of `expect`.
fn refused(dir: &Path, expect: &[&str]) -> String {
    let msg = match keyformer::Engine::load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "a multi-line error: {msg}");
    for piece in expect {
        assert!(msg.contains(piece), "'{piece}' missing from: {msg}");
    }
    let _ = std::fs::remove_dir_all(dir);
    eprintln!("refused: {msg}");
    msg
}

/// Rewrite the folder's weights through `edit` (name, dtype, shape, bytes).
fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn edit_json(path: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn the_untouched_copy_loads() {
    let dir = copy("good");
    keyformer::Engine::load(&dir).expect("the tiny Llama folder loads");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_folder_without_config_json_is_refused() {
    let dir = copy("no-config");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    refused(&dir, &["no config.json"]);
}

#[test]
fn an_unknown_model_type_names_the_supported_ones() {
    let dir = copy("bert");
    edit_json(&dir.join("config.json"), |v| v["model_type"] = "bert".into());
    refused(&dir, &["config.json", "model_type 'bert'", "gpt_neox", "gptj"]);
}

#[test]
fn a_config_that_is_not_json_is_refused() {
    let dir = copy("bad-json");
    std::fs::write(dir.join("config.json"), "{\"model_type\": ").unwrap();
    refused(&dir, &["config.json", "not valid JSON"]);
}

#[test]
fn a_missing_shard_is_named() {
    let dir = copy("missing-shard");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    refused(&dir, &["model.safetensors.index.json", "model-00001-of-00002.safetensors"]);
}

#[test]
fn sharded_weights_load_and_give_the_same_logits() {
    let dir = copy("sharded");
    let whole = keyformer::Engine::load(&dir).unwrap();
    // Split the one file in two shards and index them.
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map = serde_json::Map::new();
    let mut parts: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(name.clone(), file.into());
        parts[i % 2].push((name, view));
    }
    for (i, part) in parts.into_iter().enumerate() {
        let file = dir.join(format!("model-0000{}-of-00002.safetensors", i + 1));
        std::fs::write(file, safetensors::serialize(part, None).unwrap()).unwrap();
    }
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": map }).to_string())
        .unwrap();
    let sharded = keyformer::Engine::load(&dir).unwrap();
    let prompt = [5u32, 77, 300, 12, 9];
    let logits = |e: &keyformer::Engine| {
        let mut cache = e.model.new_cache(8);
        e.model.forward(&prompt, &mut cache, keyformer::models::decoder::Logits::All).unwrap()
    };
    assert_eq!(logits(&whole), logits(&sharded));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let dir = copy("shape");
    edit_json(&dir.join("config.json"), |v| v["intermediate_size"] = 100.into());
    refused(&dir, &["model.layers.0.mlp.gate_proj.weight in model.safetensors", "is 128 x 64, expected 100 x 64"]);
}

#[test]
fn a_tensor_of_an_unsupported_dtype_is_named() {
    let dir = copy("dtype");
    rewrite_weights(&dir, |t| {
        let norm = t.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        norm.1 = Dtype::I32;
    });
    refused(&dir, &["model.safetensors", "model.norm.weight", "I32", "F32, F16 or BF16"]);
}

#[test]
fn a_missing_tensor_is_named_as_the_folder_names_it() {
    let dir = copy("missing-tensor");
    rewrite_weights(&dir, |t| t.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight"));
    refused(&dir, &["no tensor 'model.layers.1.mlp.up_proj.weight'", "blk.1.ffn_up.weight"]);
}

#[test]
fn an_unknown_tensor_is_refused() {
    let dir = copy("extra-tensor");
    rewrite_weights(&dir, |t| {
        t.push(("model.layers.0.self_attn.rel_pos.weight".into(), Dtype::F32, vec![4], vec![0; 16]));
    });
    refused(&dir, &["model.layers.0.self_attn.rel_pos.weight", "not part of a llama model"]);
}

#[test]
fn a_truncated_safetensors_file_is_refused() {
    for (case, keep) in [("header", 20usize), ("data", 4000)] {
        let dir = copy(&format!("truncated-{case}"));
        let path = dir.join("model.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..keep]).unwrap();
        refused(&dir, &["model.safetensors"]);
    }
}

#[test]
fn a_tokenizer_json_that_does_not_parse_is_refused() {
    let dir = copy("tokenizer");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\", \"vocab\": 3}}").unwrap();
    refused(&dir, &["tokenizer.json"]);
    let dir = copy("no-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    refused(&dir, &["no tokenizer.json"]);
}

#[test]
fn untied_weights_without_an_output_head_are_refused() {
    let dir = copy("no-head");
    rewrite_weights(&dir, |t| t.retain(|t| t.0 != "lm_head.weight"));
    refused(&dir, &["tie_word_embeddings is false", "lm_head.weight"]);
}

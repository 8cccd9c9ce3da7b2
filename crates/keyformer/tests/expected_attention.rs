//! The `expected` policy against its reference, kvpress's ExpectedAttentionPress, on a tiny
//! Qwen2 model folder (QKV bias, 2 query heads per KV head): the same scores and the same kept
//! tokens. Golden file: tools/reference/golden_expected_attention.py.

mod common;

use common::*;
use keyformer::keyformer_kv::{Amount, PolicyConfig};
use keyformer::kv::KvType;
use keyformer::Engine;

#[test]
fn expected_attention_keeps_what_kvpress_keeps() {
    let reference = golden_json("golden/expected_attention_qwen2.json");
    let mut engine = Engine::load(&golden("golden/families/hf/qwen2")).unwrap();
    engine.model.kv_type = KvType::F32;
    let ids: Vec<u32> = reference["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let n_kept = reference["n_kept"].as_u64().unwrap() as usize;
    let n_sink = reference["n_sink"].as_u64().unwrap() as u32;
    // kvpress's press: no recent window, its sinks pinned, the top n_kept of the rest.
    let kv = PolicyConfig::parse_spec(&format!("expected:recent=0:sinks={n_sink}"), &PolicyConfig::default()).unwrap();
    let kv = PolicyConfig { budget: Some(Amount::Tokens(n_kept)), min_budget: 1, ..kv };
    let mut cache = engine.new_cache(&kv, ids.len(), 1).unwrap();
    engine.prefill(&ids, &mut cache).unwrap();
    let layers = reference["layers"].as_array().unwrap();
    assert_eq!(layers.len(), cache.layers.len());
    for (l, want) in layers.iter().enumerate() {
        for (h, head) in cache.layers[l].iter().enumerate() {
            let kept = head.table.held_positions();
            let want_kept: Vec<u32> =
                want["kept"][h].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            assert_eq!(kept, want_kept, "layer {l}, KV head {h}");
            // The scores of what was kept (the sinks aside), position for position.
            let want_scores = want["scores"][h].as_array().unwrap();
            let scores = cache.policy.scores(l, h);
            for (slot, p) in head.table.occupied().filter(|&(_, p)| p >= n_sink) {
                let w = want_scores[(p - n_sink) as usize].as_f64().unwrap() as f32;
                assert!(
                    (scores[slot] - w).abs() <= 1e-4 * w.abs().max(1e-3),
                    "layer {l}, head {h}, position {p}: {} vs {w}",
                    scores[slot]
                );
            }
        }
    }
}

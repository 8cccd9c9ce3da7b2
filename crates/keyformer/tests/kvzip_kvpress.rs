//! `kvzip:recent=0:layers=global` against its reference, kvpress's KVzipPress with its defaults,
//! on a tiny Qwen2 model folder (QKV bias, 2 query heads per KV head): the same repeat request,
//! the same reconstruction scores and the same kept tokens in every layer and head. Golden file:
//! tools/reference/golden_kvzip.py.

mod common;

use common::*;
use keyformer::keyformer_kv::{Amount, PolicyConfig};
use keyformer::kv::KvType;
use keyformer::Engine;

#[test]
fn kvzip_keeps_what_kvpress_keeps() {
    let reference = golden_json("golden/kvzip_qwen2.json");
    let mut engine = Engine::load(&golden("golden/families/hf/qwen2")).unwrap();
    engine.model.kv_type = KvType::F32;
    let numbers = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    let ids = numbers(&reference["ids"]);
    let request = engine.model.repeat_request.as_ref().unwrap();
    assert_eq!(request.suffix, numbers(&reference["suffix"]), "the chat template's end of turn, as kvpress finds it");
    let ratio = reference["compression_ratio"].as_f64().unwrap();
    let budget = (ids.len() as f64 * (1.0 - ratio)).round() as usize;
    let kv = PolicyConfig::parse_spec("kvzip:recent=0:layers=global", &PolicyConfig::default()).unwrap();
    let kv = PolicyConfig { budget: Some(Amount::Tokens(budget)), min_budget: 1, ..kv };
    let mut cache = engine.new_cache(&kv, ids.len(), 1).unwrap();
    engine.prefill(&ids, &mut cache).unwrap();
    let layers = reference["layers"].as_array().unwrap();
    assert_eq!(layers.len(), cache.layers.len());
    let mut counts = std::collections::BTreeSet::new();
    for (l, want) in layers.iter().enumerate() {
        for (h, head) in cache.layers[l].iter().enumerate() {
            let kept = head.table.held_positions();
            assert_eq!(kept, numbers(&want["kept"][h]), "layer {l}, KV head {h}");
            counts.insert(kept.len());
            let want_scores = want["scores"][h].as_array().unwrap();
            let scores = cache.policy.scores(l, h);
            for (slot, p) in head.table.occupied() {
                let w = want_scores[p as usize].as_f64().unwrap() as f32;
                assert!(
                    (scores[slot] - w).abs() <= 1e-4 * w.abs().max(1e-3),
                    "layer {l}, head {h}, position {p}: {} vs {w}",
                    scores[slot]
                );
            }
        }
    }
    assert!(counts.len() > 1, "kvpress spreads one budget over the model's heads: so must we");
}

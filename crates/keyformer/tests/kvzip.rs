//! KVzip on the real model (SmolLM2-135M): its trim keeps exactly the prompt tokens that the
//! repetition attends to most, as a one-pass reference computes them (the prompt and its
//! repetition read into one full cache, the maxima recorded on the way: no copy of the cache,
//! no growing of its storage, no merging of parts), and the repetition never enters the
//! sequence's own cache.

mod common;

use common::*;
use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind, Signal, KVZIP_SINKS};
use keyformer::kv::PromptScores;
use keyformer::models::decoder::Logits;
use keyformer::Engine;

fn engine() -> Engine {
    Engine::load(&q4_model()).unwrap()
}

fn prompt(engine: &Engine, n: usize) -> Vec<u32> {
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    engine.encode(&text).unwrap()[..n].to_vec()
}

#[test]
fn the_repeat_request_ends_with_the_chat_templates_turn_to_the_assistant() {
    let e = engine();
    let request = e.model.repeat_request.as_ref().expect("set by the engine");
    let suffix = e.tokenizer.decode(&request.suffix).unwrap();
    assert!(suffix.contains("<|im_end|>") && suffix.trim_end().ends_with("assistant"), "{suffix:?}");
    let first = e.tokenizer.decode(&request.first).unwrap();
    assert_eq!(first, keyformer::kvzip::FIRST_REQUEST);
    // A later part quotes the previous part's last 8 tokens after its request.
    let (prev, part) = ([1u32, 2, 3, 4, 5, 6, 7, 8, 9, 10], [20u32, 21]);
    let pass = request.pass(Some(&prev), &part);
    let quoted = request.later.len()..request.later.len() + 8;
    assert_eq!(&pass[quoted], &prev[2..]);
    assert!(pass.ends_with(&[&request.suffix[..], &part[..]].concat()));
}

/// The reference scores: prompt and repetition through one full cache, the maxima recorded;
/// per (layer, KV head), a row indexed by position; and the prompt's last logits.
fn repetition_maxima(e: &Engine, p: &[u32]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let n = p.len() as u32;
    let request = e.model.repeat_request.as_ref().unwrap();
    let repeat = request.pass(None, p);
    let c = &e.model.config;
    let mut full = e.new_cache(&PolicyConfig::default(), p.len() + repeat.len(), 0).unwrap();
    let signal = Signal::Reconstruction { from_position: n, first: 0, end: n, sinks: KVZIP_SINKS as u32, noise: None };
    full.recorder = Some(PromptScores::new(vec![signal], c.n_layers, c.n_kv_heads));
    let prompt_logits = e.model.forward(p, &mut full, Logits::Last).unwrap();
    e.model.forward(&repeat, &mut full, Logits::Last).unwrap();
    (full.recorder.take().unwrap().sums.swap_remove(0), prompt_logits)
}

#[test]
fn kvzip_keeps_the_tokens_its_repetition_attends_to_most() {
    let e = engine();
    let p = prompt(&e, 120);
    let n = p.len() as u32;
    let kv = PolicyConfig {
        kind: PolicyKind::Kvzip,
        budget: Some(Amount::Percent(40.0)),
        min_budget: 1,
        ..Default::default()
    };
    let mut cache = e.new_cache(&kv, p.len(), 4).unwrap();
    let logits = e.prefill(&p, &mut cache).unwrap();
    assert_eq!(cache.next_position(), n, "the repetition left the sequence's own cache alone");

    let (sums, prompt_logits) = repetition_maxima(&e, &p);
    assert!(prompt_logits == logits, "the prompt's logits do not depend on the policy");
    let sums = &sums;
    let c = &e.model.config;

    let policy = &cache.policy;
    let (budget, recent, pinned) = (policy.budget, policy.recent, policy.pinned() as u32);
    assert!(budget < p.len() && pinned == KVZIP_SINKS as u32 && recent > 0);
    let mut differs = 0;
    for layer in 0..c.n_layers {
        for h in 0..c.n_kv_heads {
            let scores = &sums[layer * c.n_kv_heads + h]; // slot = position in the full cache
            let first_recent = n - recent as u32;
            let mut keys: Vec<u32> = (pinned..first_recent).collect();
            keys.sort_by(|&a, &b| scores[b as usize].total_cmp(&scores[a as usize]).then(b.cmp(&a)));
            let mut want: Vec<u32> = (0..pinned).chain(first_recent..n).collect();
            want.extend_from_slice(&keys[..budget - recent - pinned as usize]);
            want.sort();
            let got = cache.layers[layer][h].table.held_positions();
            assert_eq!(got, want, "layer {layer}, KV head {h}");
            // The kept key tokens are the repetition's, not simply the newest before the window.
            let k = budget - recent - pinned as usize;
            let mut chosen = keys[..k].to_vec();
            chosen.sort();
            differs += usize::from(chosen != (first_recent - k as u32..first_recent).collect::<Vec<u32>>());
        }
    }
    assert!(differs > 0, "every head kept the newest tokens: the check would not see a wrong score");
}

/// A shared prefill (eval's: one prompt, every policy compressing a copy) gives KVzip the same
/// cache as its own prefill, for each budget and setting, from one repetition.
#[test]
fn kvzip_from_a_shared_prefill_equals_its_own_prefill() {
    let e = engine();
    let p = prompt(&e, 90);
    let configs: Vec<PolicyConfig> =
        ["kvzip:budget=30%", "kvzip:budget=60%:recent=0", "kvzip:budget=30%:layers=global"]
            .iter()
            .map(|s| PolicyConfig { min_budget: 1, ..PolicyConfig::parse_spec(s, &PolicyConfig::default()).unwrap() })
            .collect();
    let shared = e.shared_prefill(&p, &configs, 4).unwrap();
    for kv in &configs {
        let (from_shared, shared_logits) = e.cache_from_shared(&shared, kv, 4).unwrap();
        let mut own = e.new_cache(kv, p.len(), 4).unwrap();
        let own_logits = e.prefill(&p, &mut own).unwrap();
        assert!(shared_logits == own_logits);
        for (a, b) in from_shared.layers.iter().flatten().zip(own.layers.iter().flatten()) {
            let held = |h: &keyformer::kv::HeadKv| h.table.held_positions();
            assert_eq!(held(a), held(b), "{}", kv.label());
            assert!(held(a).len() < p.len(), "the budget trims");
        }
    }
}

/// `layers=global` (kvpress's KVzip): the key tokens of every layer and head compete for one
/// budget, so the trim keeps each head's window and sinks plus the model-wide best scores of the
/// reference; the heads together hold no more than budget x layers x KV heads, their counts
/// differ, and each head's storage shrinks to its own count.
#[test]
fn kvzip_with_one_budget_for_the_model_keeps_its_best_tokens_anywhere() {
    let e = engine();
    let p = prompt(&e, 120);
    let n = p.len() as u32;
    let (sums, _) = repetition_maxima(&e, &p);
    let c = &e.model.config;
    for spec in ["kvzip:budget=30%:layers=global", "kvzip:budget=50%:recent=0:layers=global"] {
        let kv = PolicyConfig { min_budget: 1, ..PolicyConfig::parse_spec(spec, &PolicyConfig::default()).unwrap() };
        let mut cache = e.new_cache(&kv, p.len(), 4).unwrap();
        e.prefill(&p, &mut cache).unwrap();
        let policy = &cache.policy;
        let (budget, recent, pinned) = (policy.budget, policy.recent, policy.pinned() as u32);
        let first_recent = n - recent as u32;
        let mut pool: Vec<(f32, u32, usize)> = Vec::new();
        for (i, row) in sums.iter().enumerate() {
            pool.extend((pinned..first_recent).map(|pos| (row[pos as usize], pos, i)));
        }
        pool.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)));
        let quota = sums.len() * (budget - recent - pinned as usize);
        let mut want: Vec<Vec<u32>> = vec![(0..pinned).chain(first_recent..n).collect(); sums.len()];
        for &(_, pos, i) in &pool[..quota] {
            want[i].push(pos);
        }
        let mut held_total = 0;
        let mut counts = std::collections::BTreeSet::new();
        for layer in 0..c.n_layers {
            for h in 0..c.n_kv_heads {
                let head = &cache.layers[layer][h];
                let got = head.table.held_positions();
                want[layer * c.n_kv_heads + h].sort();
                assert_eq!(got, want[layer * c.n_kv_heads + h], "{spec}: layer {layer}, KV head {h}");
                assert!(head.table.capacity() <= got.len() + policy.decode_room(), "{spec}: storage follows the count");
                held_total += got.len();
                counts.insert(got.len());
            }
        }
        assert_eq!(held_total, c.n_layers * c.n_kv_heads * budget, "{spec}: the model's budget, no more");
        assert!(counts.len() > 1, "{spec}: every head kept the same count: nothing was spread");
    }
}

/// Decoding after a trim that spreads budgets by score (over the model, or over a layer's heads
/// as AdaKV): a head given more than the uniform share, up to its whole prompt, still has room
/// for each step's token, and every head stays within its own budget.
#[test]
fn decoding_after_budgets_spread_by_score_keeps_every_head_within_its_own() {
    let e = engine();
    let p = prompt(&e, 120);
    let steps = 6;
    for spec in ["kvzip:budget=50%:layers=global", "kvzip:budget=50%:adaptive", "h2o:budget=50%:layers=global"] {
        let kv = PolicyConfig { min_budget: 1, ..PolicyConfig::parse_spec(spec, &PolicyConfig::default()).unwrap() };
        let mut cache = e.new_cache(&kv, p.len(), steps).unwrap();
        let mut logits = e.prefill(&p, &mut cache).unwrap();
        let most = (0..cache.layers.len())
            .flat_map(|l| (0..cache.layers[l].len()).map(move |h| (l, h)))
            .map(|(l, h)| cache.policy.head_budget(l, h))
            .max()
            .unwrap();
        assert!(most > cache.policy.budget, "{spec}: no head was given more than the uniform share");
        for step in 0..steps {
            let token = keyformer::sampling::argmax(&logits);
            e.decode_step_into(token, &mut cache, &mut logits)
                .unwrap_or_else(|err| panic!("{spec}, step {step}: {err}"));
            for (l, heads) in cache.layers.iter().enumerate() {
                for (h, head) in heads.iter().enumerate() {
                    assert!(head.table.len() <= cache.policy.head_budget(l, h), "{spec}: layer {l}, head {h}");
                }
            }
        }
    }
}

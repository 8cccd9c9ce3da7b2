//! Exactness per family: tiny random-weight models made with transformers' own config classes,
//! converted to GGUF by llama.cpp's `convert_hf_to_gguf.py` (tools/reference/tiny_families.py;
//! the files and transformers' logits are committed in tests/golden/families/). Every
//! position's logits within 1e-4 of the largest logit, and the 32-token greedy continuation
//! identical. The golden files also record how much each family feature moves the logits when
//! switched off (soft-caps, windows, Q/K norms...), so these tests fail if one is dropped.
//! The same models load from their Hugging Face folders (tests/golden/families/hf/: config.json,
//! model.safetensors, tokenizer.json...), GPT-J only from its folder (the converter lacks it).

mod common;

use common::*;
use keyformer::models::decoder::Logits;
use keyformer::sampling::argmax;

/// The families whose golden files this test reads (transformers `model_type` names).
const FAMILIES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "phi3-longrope",
    "gpt2",
    "gpt_neox",
    "mpt",
    "mpt-clip",
];

/// Families that also exist as a folder only.
const FOLDER_ONLY: &[&str] = &["gptj"];

fn gguf_of(name: &str) -> std::path::PathBuf {
    golden(&format!("golden/families/{name}.gguf"))
}

fn folder_of(name: &str) -> std::path::PathBuf {
    golden(&format!("golden/families/hf/{name}"))
}

fn check_family(name: &str, model: &std::path::Path) -> f32 {
    let g = golden_json(&format!("golden/families/{name}.json"));
    let engine = load_with_f32_cache(model);
    // (A Mistral folder is "mistral"; the converter writes its GGUF as "llama".)
    if name != "mistral" || !model.is_dir() {
        assert_eq!(engine.model.config.architecture, g["architecture"].as_str().unwrap(), "{name}: architecture");
    }
    let vocab = engine.model.config.vocab_size;
    let mut worst = 0f32;
    for (ci, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["ids"]);
        let mut cache = engine.model.new_cache(prompt.len() + 40);
        let logits = engine.model.forward(&prompt, &mut cache, Logits::All).unwrap();
        assert_eq!(logits.len(), prompt.len() * vocab);
        let positions = ids(&case["positions"]);
        let want_rows = case["logits"].as_array().unwrap();
        let max_abs = want_rows
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap().abs() as f32))
            .fold(0f32, f32::max);
        for (&p, want) in positions.iter().zip(want_rows) {
            let got = &logits[p as usize * vocab..(p as usize + 1) * vocab];
            let want: Vec<f32> = want.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            worst = worst.max(diff / max_abs);
            assert!(
                diff <= 1e-4 * max_abs,
                "{name} case {ci} position {p}: logits differ by {diff} (largest logit {max_abs})"
            );
        }
        // Greedy continuation through the cache, a token at a time.
        let mut next = argmax(&logits[(prompt.len() - 1) * vocab..]);
        let mut got = vec![next];
        while got.len() < 32 {
            let l = engine.model.forward(&[next], &mut cache, Logits::Last).unwrap();
            next = argmax(&l);
            got.push(next);
        }
        assert_eq!(got, ids(&case["greedy32"]), "{name} case {ci}: greedy continuation");
    }
    eprintln!("{name}: largest logit difference {worst:.2e} of the largest logit");
    worst
}

#[test]
fn every_family_matches_transformers() {
    for name in FAMILIES {
        check_family(name, &gguf_of(name));
    }
}

#[test]
fn every_family_from_its_hugging_face_folder_matches_transformers() {
    for name in FAMILIES.iter().chain(FOLDER_ONLY) {
        check_family(name, &folder_of(name));
    }
}

/// A folder and the GGUF file llama.cpp's converter made of it: the same logits (the same f32
/// weights; only the order of a few sums differs, e.g. Llama's unpermuted rotation) and the same
/// token ids for the same text.
#[test]
fn a_folder_and_its_converted_gguf_agree() {
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    for name in FAMILIES {
        let (from_folder, from_gguf) = (load_with_f32_cache(&folder_of(name)), load_with_f32_cache(&gguf_of(name)));
        let ids = from_gguf.encode(&text[..2000]).unwrap();
        assert_eq!(from_folder.encode(&text[..2000]).unwrap(), ids, "{name}: token ids");
        assert_eq!(from_folder.tokenizer.decode(&ids).unwrap(), text[..2000], "{name}: decoding");
        assert_eq!(from_folder.tokenizer.add_bos, from_gguf.tokenizer.add_bos, "{name}: add_bos");
        assert_eq!(from_folder.tokenizer.end_of_generation, from_gguf.tokenizer.end_of_generation, "{name}");
        assert_eq!(from_folder.chat_template(), from_gguf.chat_template(), "{name}: chat template");
        let prompt = &ids[..60];
        let a = from_folder.model.forward(prompt, &mut from_folder.model.new_cache(64), Logits::All).unwrap();
        let b = from_gguf.model.forward(prompt, &mut from_gguf.model.new_cache(64), Logits::All).unwrap();
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale, "{name}: folder and GGUF differ by {diff} (largest logit {scale})");
    }
}

/// A bf16 folder: computed in f32 over its bf16 weights, the logits are transformers' in f32
/// over the same weights (1e-4 of the largest); transformers in bf16 rounds every activation
/// too, and lands within bf16's precision of them (2^-8 relative, a few roundings deep).
#[test]
fn a_bf16_folder_matches_transformers() {
    let g = golden_json("golden/families/qwen2-bf16.json");
    let engine = load_with_f32_cache(&folder_of("qwen2-bf16"));
    let vocab = engine.model.config.vocab_size;
    let (mut worst_f32, mut worst_bf16) = (0f32, 0f32);
    for case in g["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let logits = engine.model.forward(&prompt, &mut engine.model.new_cache(prompt.len()), Logits::All).unwrap();
        for (key, worst) in [("logits", &mut worst_f32), ("logits_bf16", &mut worst_bf16)] {
            let rows = case[key].as_array().unwrap();
            let want: Vec<Vec<f32>> = rows
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
                .collect();
            let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
            for (&p, want) in ids(&case["positions"]).iter().zip(&want) {
                let got = &logits[p as usize * vocab..(p as usize + 1) * vocab];
                let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                *worst = worst.max(diff / scale);
            }
        }
    }
    eprintln!("bf16 folder: {worst_f32:.2e} of the largest logit from transformers f32, {worst_bf16:.2e} from bf16");
    assert!(worst_f32 <= 1e-4, "bf16 weights computed in f32 differ from transformers by {worst_f32}");
    assert!(worst_bf16 <= 0.05, "transformers in bf16 differs by {worst_bf16}, more than bf16 rounding explains");
}

#[test]
fn an_unknown_architecture_is_one_clear_error() {
    // The GPT-2 file renamed BERT (same length, so only the name changes): an encoder.
    let mut bytes = std::fs::read(golden("golden/families/gpt2.gguf")).unwrap();
    let key = b"general.architecture";
    let at = bytes.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&bytes[at..at + 4], b"gpt2");
    bytes[at..at + 4].copy_from_slice(b"bert");
    let path = std::env::temp_dir().join(format!("keyformer-bert-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let err = keyformer::Engine::load(&path).err().expect("bert is refused");
    let _ = std::fs::remove_file(&path);
    let msg = err.to_string();
    assert!(msg.contains("unsupported architecture 'bert'") && msg.contains("gptneox"), "{msg}");
}

/// Every policy on every family: a covering budget is bit-identical to the full cache, a 50%
/// budget holds at most its budget (+1 in decode) in every layer and head and stays finite.
#[test]
fn every_policy_runs_on_every_family() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    let decode = decode_greedy;
    for name in FAMILIES.iter().chain(FOLDER_ONLY) {
        let model = if FOLDER_ONLY.contains(name) { folder_of(name) } else { gguf_of(name) };
        let engine = load_with_f32_cache(&model);
        let g = golden_json(&format!("golden/families/{name}.json"));
        let prompt = ids(&g["cases"][2]["ids"]);
        let steps = 8;
        let (full, _) = decode(&engine, &PolicyConfig::default(), &prompt, steps);
        // Every kind, and the composable settings on the scored ones.
        let composed = |kind| PolicyConfig {
            kind,
            pinned_sinks: 2,
            accumulate: keyformer::keyformer_kv::Accumulate::Mean,
            value_weighted: true,
            key_diversity: true,
            snapkv_window: 8,
            ..Default::default()
        };
        let variants = PolicyKind::ALL
            .into_iter()
            .filter(|&k| k != PolicyKind::Full)
            .map(|kind| PolicyConfig { kind, ..Default::default() })
            .chain([PolicyKind::H2o, PolicyKind::Keyformer, PolicyKind::Tova].map(composed))
            .chain([PolicyKind::Keyformer, PolicyKind::SnapKv].map(|kind| PolicyConfig {
                adaptive: true,
                layer_budgets: keyformer::keyformer_kv::policy::LayerBudgets::Pyramid,
                ..composed(kind)
            }));
        for base in variants {
            let kind = base.kind;
            let kv = |budget| PolicyConfig { budget: Some(budget), seed: 3, min_budget: 1, ..base.clone() };
            // Pyramid budgets keep half the budget at the last layer: twice covers.
            let covers = (prompt.len() + steps) * if base.layer_budgets == Default::default() { 1 } else { 2 };
            let (covering, _) = decode(&engine, &kv(Amount::Tokens(covers)), &prompt, steps);
            assert!(covering == full, "{name} {kind:?}: a covering budget differs from the full cache");
            let (half, cache) = decode(&engine, &kv(Amount::Percent(50.0)), &prompt, steps);
            let budget = cache.policy.budget;
            assert_eq!(budget, prompt.len() / 2, "{name} {kind:?}");
            // Each head within its own budget (+1 in decode), each layer within its heads'
            // budgets, and the whole cache within budget x layers x heads (+1 per head).
            let mut total = 0;
            for (l, heads) in cache.layers.iter().enumerate() {
                let held: usize = heads.iter().map(|h| h.table.len()).sum();
                for (h, head) in heads.iter().enumerate() {
                    let own = cache.policy.head_budget(l, h);
                    assert!(head.table.len() <= own + 1, "{name} {kind:?}: {} held of {own}", head.table.len());
                }
                assert!(held <= cache.policy.layer_budget(l) + heads.len(), "{name} {kind:?}: layer {l}");
                total += held;
            }
            let heads = cache.layers.len() * cache.layers[0].len();
            assert!(total <= heads * (budget + 1), "{name} {kind:?}: {total} held in all");
            assert!(half.iter().flatten().all(|x| x.is_finite()), "{name} {kind:?}");
            assert!(cache.stats.evictions > 0, "{name} {kind:?}: nothing evicted");
        }
    }
}

/// Sliding-window layers hold only their window (whatever the policy), and with the full cache
/// the logits are those of a cache that keeps every token (up to float summation order). Under
/// a policy the sliding layers keep their whole window, where trimming them by the policy's
/// budget could drop tokens they attend to.
#[test]
fn sliding_layers_hold_only_their_window() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    use keyformer::kv::KvCache;
    for name in ["gemma2", "gemma3"] {
        let engine = load_with_f32_cache(&golden(&format!("golden/families/{name}.gguf")));
        let c = &engine.model.config;
        let window = c.layers.iter().find_map(|l| l.window).expect("a sliding layer");
        let prompt = ids(&golden_json(&format!("golden/families/{name}.json"))["cases"][2]["ids"]);
        assert!(prompt.len() > 2 * window);
        for kv in [
            PolicyConfig::default(),
            PolicyConfig {
                kind: PolicyKind::Keyformer,
                budget: Some(Amount::Percent(50.0)),
                min_budget: 1,
                ..Default::default()
            },
        ] {
            let steps = 12;
            let mut windowed = engine.new_cache(&kv, prompt.len(), steps).unwrap();
            let policy = kv.resolve(prompt.len(), steps, c.n_layers, c.n_kv_heads).unwrap();
            // The same cache without the windows' eviction: every token stays.
            let mut kept_all = KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, engine.model.kv_type, policy, 64);
            let mut a = engine.prefill(&prompt, &mut windowed).unwrap();
            let mut b = engine.prefill(&prompt, &mut kept_all).unwrap();
            for step in 0..=steps {
                let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
                let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                if kv.kind == PolicyKind::Full {
                    assert!(diff <= 1e-5 * scale, "{name} step {step}: {diff}");
                }
                for (l, layer) in windowed.layers.iter().enumerate() {
                    for head in layer {
                        match c.layers[l].window {
                            Some(w) => assert!(head.table.len() < w, "{name} layer {l}: {} held", head.table.len()),
                            None if kv.kind == PolicyKind::Full => {
                                assert_eq!(head.table.len(), prompt.len() + step)
                            }
                            None => assert!(head.table.len() <= windowed.policy.budget + 1),
                        }
                    }
                }
                if step < steps {
                    let next = argmax(&a);
                    a = engine.decode_step(next, &mut windowed).unwrap();
                    b = engine.decode_step(next, &mut kept_all).unwrap();
                }
            }
            assert!(windowed.bytes_held() < kept_all.bytes_held(), "{name}: the window holds less");
        }
    }
}

/// A sequence's KV plan (what the server admits by) bounds what its cache really holds, and is
/// exact for a full cache: sliding layers counted at their window.
#[test]
fn the_kv_plan_bounds_what_the_cache_holds() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    for name in ["qwen2", "gemma2", "gemma3"] {
        let engine = load_with_f32_cache(&golden(&format!("golden/families/{name}.gguf")));
        let prompt = ids(&golden_json(&format!("golden/families/{name}.json"))["cases"][2]["ids"]);
        let steps = 10;
        for kv in [
            PolicyConfig::default(),
            PolicyConfig {
                kind: PolicyKind::H2o,
                budget: Some(Amount::Percent(50.0)),
                min_budget: 1,
                ..Default::default()
            },
        ] {
            let plan = engine.model.plan_kv(&kv, prompt.len(), steps).unwrap();
            let (steady, prefill) = (plan.bytes_steady, plan.bytes_prefill);
            let mut cache = engine.model.new_planned_cache(plan).unwrap();
            let mut logits = engine.prefill(&prompt, &mut cache).unwrap();
            for _ in 0..steps {
                logits = engine.decode_step(argmax(&logits), &mut cache).unwrap();
            }
            assert!(
                cache.stats.bytes_held_max <= prefill,
                "{name} {:?}: {} > {prefill}",
                kv.kind,
                cache.stats.bytes_held_max
            );
            assert!(cache.bytes_held() <= steady, "{name} {:?}: {} > {steady}", kv.kind, cache.bytes_held());
            if kv.kind == PolicyKind::Full && name == "qwen2" {
                assert_eq!(cache.bytes_held(), steady, "a full cache holds its plan exactly");
            }
        }
    }
}

/// A prompt shorter than the window, then decoding past it under a compressed policy: the
/// sliding layers grow to their window (they were once compacted to the prompt's size and
/// overflowed at the first step).
#[test]
fn sliding_layers_grow_to_their_window_after_a_short_prompt() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    let engine = load_with_f32_cache(&golden("golden/families/gemma2.gguf"));
    let window = engine.model.config.layers.iter().find_map(|l| l.window).unwrap();
    let prompt: Vec<u32> = (0..window as u32 / 2).map(|i| 10 + i).collect();
    let steps = 3 * window;
    let kv = PolicyConfig {
        kind: PolicyKind::Keyformer,
        budget: Some(Amount::Percent(50.0)),
        min_budget: 1,
        ..Default::default()
    };
    let mut cache = engine.new_cache(&kv, prompt.len(), steps).unwrap();
    let mut logits = engine.prefill(&prompt, &mut cache).unwrap();
    for _ in 0..steps {
        logits = engine.decode_step(argmax(&logits), &mut cache).unwrap();
    }
    let sliding = engine.model.config.layers.iter().position(|l| l.window.is_some()).unwrap();
    assert_eq!(cache.layers[sliding][0].table.len(), window - 1);
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// Several tokens at once after the prompt, more than a sliding layer has room for: one clear
/// error before any layer took them, and the cache still decodes.
#[test]
fn tokens_that_do_not_fit_a_sliding_layer_are_refused_before_any_layer_takes_them() {
    use keyformer::keyformer_kv::PolicyConfig;
    let engine = load_with_f32_cache(&golden("golden/families/gemma2.gguf"));
    let window = engine.model.config.layers.iter().find_map(|l| l.window).unwrap();
    let prompt: Vec<u32> = (0..4 * window as u32).map(|i| 20 + i).collect();
    // The full cache: the global layers have room for every step, a sliding one for its window.
    let mut cache = engine.new_cache(&PolicyConfig::default(), prompt.len(), 2 * window).unwrap();
    engine.prefill(&prompt, &mut cache).unwrap();
    let many: Vec<u32> = vec![7; 3];
    let err = engine.model.forward(&many, &mut cache, Logits::Last).unwrap_err();
    assert!(err.to_string().contains("context is full"), "{err}");
    let before = cache.next_position();
    let logits = engine.decode_step(7, &mut cache).unwrap();
    assert_eq!(cache.next_position(), before + 1);
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// GPT-2's learned positions end at its trained context: with a KV budget the cache never
/// fills, so the position table is what stops the sequence, with an error rather than an
/// index past the table.
#[test]
fn a_learned_position_past_the_context_is_refused() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    let engine = load_with_f32_cache(&golden("golden/families/gpt2.gguf"));
    let context = engine.model.config.context_length;
    let kv = PolicyConfig { kind: PolicyKind::Window, budget: Some(Amount::Tokens(8)), ..Default::default() };
    let mut cache = engine.new_cache(&kv, 4, context).unwrap();
    let mut logits = engine.prefill(&[1, 2, 3, 4], &mut cache).unwrap();
    for step in 4..context {
        logits = engine.decode_step(argmax(&logits), &mut cache).unwrap_or_else(|e| panic!("step {step}: {e}"));
    }
    let err = engine.decode_step(argmax(&logits), &mut cache).unwrap_err();
    assert!(matches!(err, keyformer::ModelError::ContextFull { .. }), "{err}");
}

/// `grow` (kvpress's protocol): the prompt is compressed to the budget, then every decode step's
/// token joins without eviction, so the cache ends at budget + steps; the same prompt's
/// compression as without it.
#[test]
fn a_growing_cache_compresses_the_prompt_only() {
    use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
    let engine = load_with_f32_cache(&gguf_of("qwen2"));
    let g = golden_json("golden/families/qwen2.json");
    let prompt = ids(&g["cases"][2]["ids"]);
    let steps = 8;
    let kv = |grow| PolicyConfig {
        kind: PolicyKind::Keyformer,
        budget: Some(Amount::Percent(50.0)),
        min_budget: 1,
        grow,
        ..Default::default()
    };
    let (fixed, fixed_cache) = decode_greedy(&engine, &kv(false), &prompt, steps);
    let (grown, cache) = decode_greedy(&engine, &kv(true), &prompt, steps);
    let budget = cache.policy.budget;
    assert_eq!(fixed[0], grown[0], "the prompt is compressed alike");
    for head in cache.layers.iter().flatten() {
        assert_eq!(head.table.len(), budget + steps, "every decoded token kept");
    }
    let evicted_in_decode = fixed_cache.stats.evictions - cache.stats.evictions;
    assert_eq!(evicted_in_decode, steps * cache.layers.len() * cache.layers[0].len());
    assert_ne!(fixed[steps], grown[steps], "keeping the decoded tokens changes the later logits");
}

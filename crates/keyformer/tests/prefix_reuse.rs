//! Prompt prefixes kept and reused (`PrefixCache`): a request that starts from a kept prefix
//! answers exactly as it does alone (same tokens, same log-probabilities bit for bit), for the
//! full cache and for policies trimmed chunk by chunk; the kept copies stay under their memory
//! limit, least recently used first out.

mod common;

use common::*;
use keyformer::engine::GenerateRequest;
use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
use keyformer::prefix::PrefixCache;
use keyformer::sampling::SamplingParams;
use keyformer::Engine;

fn request(kv: PolicyConfig) -> GenerateRequest {
    GenerateRequest { max_tokens: 6, sampling: SamplingParams::default(), stop: Vec::new(), kv, logprobs: Some(3) }
}

fn answer(
    engine: &Engine,
    prompt: &[u32],
    req: &GenerateRequest,
    prefixes: Option<&mut PrefixCache<keyformer::kv::KvCache>>,
) -> String {
    let plan = engine.model.plan_kv(&req.kv, prompt.len(), req.max_tokens).unwrap();
    let g = match prefixes {
        Some(p) => engine.start_generation_reusing(prompt, req, plan, p).unwrap(),
        None => engine.start_planned_generation(prompt, req, plan).unwrap(),
    };
    let out = engine.complete(g, &mut |_| {}).unwrap();
    // Token ids and every log-probability, printed exactly.
    format!(
        "{:?} {:?}",
        out.token_ids,
        out.logprobs
            .unwrap()
            .iter()
            .map(|l| (l.logprob.to_bits(), l.top.iter().map(|t| (t.0, t.1.to_bits())).collect::<Vec<_>>()))
            .collect::<Vec<_>>()
    )
}

#[test]
fn a_reused_prefix_answers_bit_for_bit_as_a_fresh_prefill() {
    let engine = Engine::load(&q4_model()).unwrap();
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    let system = engine.encode(&text).unwrap()[..300].to_vec();
    let ask = |q: &str| {
        let mut p = system.clone();
        p.extend(engine.tokenizer.encode(q, false).unwrap());
        p
    };
    let prompts =
        [ask(" Who wrote this?"), ask(" What is it about?"), ask(" Summarise it."), ask(" Who wrote this? And when?")];
    let chunked = |kind| PolicyConfig {
        kind,
        budget: Some(Amount::Tokens(96)),
        prefill_chunk: Some(64),
        seed: 3,
        ..Default::default()
    };
    for kv in [
        PolicyConfig::default(),
        chunked(PolicyKind::Keyformer),
        chunked(PolicyKind::Tova),
        chunked(PolicyKind::SnapKv),
        chunked(PolicyKind::H2o),
    ] {
        let req = request(kv.clone());
        let mut prefixes = PrefixCache::new(256 << 20);
        for (i, p) in prompts.iter().enumerate() {
            let alone = answer(&engine, p, &req, None);
            let reused = answer(&engine, p, &req, Some(&mut prefixes));
            assert_eq!(reused, alone, "{} prompt {i}", kv.label());
        }
        let st = prefixes.stats();
        // The first two prompts find nothing; the second keeps the shared system prompt, which
        // the third and fourth start from (the fourth could also start from the first's end).
        assert!(st.hits >= 2, "{}: {st:?}", kv.label());
        assert!(st.tokens_reused >= 2 * 256, "{}: {st:?}", kv.label());
        assert!(st.bytes_held > 0 && st.bytes_held <= 256 << 20);
    }
    // A policy trimmed once at the prompt's end cannot start from a copy: nothing is kept.
    let req = request(PolicyConfig { prefill_chunk: None, ..chunked(PolicyKind::Keyformer) });
    let mut prefixes = PrefixCache::new(256 << 20);
    for p in &prompts {
        assert_eq!(answer(&engine, p, &req, Some(&mut prefixes)), answer(&engine, p, &req, None));
    }
    assert_eq!((prefixes.stats().hits, prefixes.stats().entries), (0, 0));
}

#[test]
fn kept_prefixes_stay_under_their_limit_least_recently_used_out() {
    let engine = Engine::load(&q4_model()).unwrap();
    let req = request(PolicyConfig::default());
    let per_token = engine.model.kv_bytes_per_token();
    // Room for about 200 tokens of full cache: prefixes of 128 tokens fit one at a time.
    let mut prefixes = PrefixCache::new(200 * per_token);
    let text = std::fs::read_to_string(golden("data/prose.txt")).unwrap();
    let ids = engine.encode(&text).unwrap();
    let a: Vec<u32> = ids[..140].to_vec();
    let b: Vec<u32> = ids[200..340].to_vec();
    answer(&engine, &a, &req, Some(&mut prefixes));
    assert_eq!(prefixes.stats().entries, 1);
    assert!(prefixes.bytes_held() <= 200 * per_token);
    answer(&engine, &b, &req, Some(&mut prefixes));
    assert_eq!(prefixes.stats().entries, 1, "the older copy made room");
    // `a` again: its copy is gone, a miss; `b` + more: a hit.
    let misses = prefixes.stats().misses;
    answer(&engine, &a, &req, Some(&mut prefixes));
    assert_eq!(prefixes.stats().misses, misses + 1);
    prefixes.shrink_to(0);
    assert_eq!((prefixes.stats().entries, prefixes.bytes_held()), (0, 0));
}

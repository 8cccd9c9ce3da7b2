//! Multi-turn chat from one cache (`ChatSession`): each turn computes only its new text, the
//! answers equal a fresh run over the whole conversation where the cache keeps everything, a
//! compressed conversation stays within its budget, and a failed turn loses nothing.

mod common;

use common::*;
use keyformer::engine::GenerateRequest;
use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyKind};
use keyformer::sampling::SamplingParams;
use keyformer::session::ChatSession;
use keyformer::Engine;

fn request(kv: PolicyConfig, max_tokens: usize) -> GenerateRequest {
    GenerateRequest { max_tokens, sampling: SamplingParams::default(), stop: Vec::new(), kv, logprobs: None }
}

const TURNS: [&str; 3] = ["What is the capital of France?", "And of Germany?", "Name a river in either."];

#[test]
fn turns_compute_only_their_new_text_and_answer_as_a_fresh_run_does() {
    let engine = Engine::load(&q4_model()).unwrap();
    let req = request(PolicyConfig::default(), 24);
    let mut session = ChatSession::new(Some("You are a helpful assistant.".into()), req.kv.clone());
    let mut prompts = Vec::new();
    for (i, user) in TURNS.iter().enumerate() {
        let before = session.stats().prefilled_tokens;
        let out = session.turn(&engine, user, &req, &mut |_| {}).unwrap();
        let mut messages = vec![keyformer::chat::ChatMessage {
            role: "system".into(),
            content: "You are a helpful assistant.".into(),
        }];
        messages.extend(session.messages()[..session.messages().len() - 1].iter().cloned());
        let rendered = engine.chat_prompt_messages(&messages).unwrap();
        let fresh = engine.generate(&engine.encode(&rendered).unwrap(), &req, &mut |_| {}).unwrap();
        // The full cache holds the same tokens either way; only the products' grouping differs
        // (a decode step against a prompt chunk), so the greedy answers agree.
        assert_eq!(out.text, fresh.text, "turn {i}");
        let computed = session.stats().prefilled_tokens - before;
        prompts.push(engine.encode(&rendered).unwrap().len());
        if i > 0 {
            assert!(computed < prompts[i] / 2, "turn {i} computed {computed} of {} prompt tokens", prompts[i]);
        }
    }
    let st = session.stats();
    assert_eq!(st.restarts, 0);
    assert_eq!(st.turns, 3);
    // Prompt tokens computed over the conversation: about its length, not the sum of its prompts.
    assert!(st.prefilled_tokens <= st.conversation_tokens, "{st:?}");
    assert!(prompts.iter().sum::<usize>() > st.prefilled_tokens * 2, "{st:?} against prompts {prompts:?}");
}

#[test]
fn a_compressed_conversation_stays_within_its_budget() {
    let engine = Engine::load(&q4_model()).unwrap();
    for chunk in [None, Some(16)] {
        let kv = PolicyConfig {
            kind: PolicyKind::Keyformer,
            budget: Some(Amount::Tokens(40)),
            prefill_chunk: chunk,
            ..Default::default()
        };
        let req = request(kv, 16);
        let mut session = ChatSession::new(None, req.kv.clone());
        for user in TURNS {
            let out = session.turn(&engine, user, &req, &mut |_| {}).unwrap();
            assert!(!out.text.is_empty());
            let cache = session.cache().expect("the conversation goes on from its cache");
            for h in cache.layers.iter().flatten() {
                assert!(h.table.len() <= 40, "{chunk:?}: {} held", h.table.len());
            }
        }
        assert_eq!(session.stats().restarts, 0);
        assert!(session.stats().conversation_tokens > 40, "the conversation outgrew the budget");
    }
}

#[test]
fn a_turn_past_the_context_fails_and_the_conversation_goes_on() {
    let mut engine = Engine::load(&q4_model()).unwrap();
    engine.model.config.context_length = 96;
    let req = request(PolicyConfig::default(), 8);
    let mut session = ChatSession::new(None, req.kv.clone());
    session.turn(&engine, "Hello!", &req, &mut |_| {}).unwrap();
    let long = "word ".repeat(200);
    let err = session.turn(&engine, &long, &req, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("context"), "{err}");
    assert_eq!(session.messages().len(), 2, "the failed turn left no message");
    let out = session.turn(&engine, "Thanks.", &req, &mut |_| {}).unwrap();
    assert!(!out.text.is_empty());
    assert_eq!(session.messages().len(), 4);
}

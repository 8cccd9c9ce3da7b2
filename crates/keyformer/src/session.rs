//! A multi-turn chat whose history lives in one compressed KV cache: each turn computes only
//! its new text (the end of the previous answer's turn, the user's message, the start of the
//! reply), which the cache scores and trims as a prompt ([`Engine::extend_prompt`]), so a
//! conversation of n tokens costs n tokens of prefill, not the square of its turns.
//!
//! A turn goes on from the cache when the chat template renders the conversation so far as a
//! prefix of the conversation with the new message (templates append), and the last answer
//! ended at an end-of-generation token or at its token limit. Otherwise (a stop string cut the
//! answer, a template that rewrites earlier turns) the conversation is prefilled again from its
//! start, and [`ChatStats::restarts`] counts it.

use keyformer_kv::PolicyConfig;

use crate::backend::SequenceCache;
use crate::chat::ChatMessage;
use crate::engine::{Engine, GenerateRequest, GenerationOutput, StopReason};
use crate::step_model::StepModel;
use crate::ModelError;

/// A conversation and the cache that holds it.
pub struct ChatSession<M: StepModel> {
    system: Option<String>,
    kv: PolicyConfig,
    messages: Vec<ChatMessage>,
    /// The cache after the last turn, and what it has seen: the text, and the answer's last
    /// token when no step has run it yet.
    state: Option<SessionCache<M>>,
    stats: ChatStats,
}

struct SessionCache<M: StepModel> {
    cache: M::Cache,
    /// The rendered conversation up to the end of the last answer's text.
    text: String,
    /// Generated tokens not yet run through the model (the last one, when a token limit ended
    /// the answer).
    pending: Vec<u32>,
}

/// What a session has computed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ChatStats {
    pub turns: usize,
    /// Prompt tokens run through the model over all turns.
    pub prefilled_tokens: usize,
    /// Tokens of the conversation so far (prompt and answers).
    pub conversation_tokens: usize,
    /// Turns that could not go on from the cache and prefilled the conversation again.
    pub restarts: usize,
}

impl<M: StepModel> ChatSession<M> {
    pub fn new(system: Option<String>, kv: PolicyConfig) -> Self {
        Self { system, kv, messages: Vec::new(), state: None, stats: ChatStats::default() }
    }

    /// Forget the conversation (the system message stays).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.state = None;
        self.stats = ChatStats::default();
    }

    pub fn stats(&self) -> &ChatStats {
        &self.stats
    }

    /// The cache holding the conversation, between turns.
    pub fn cache(&self) -> Option<&M::Cache> {
        self.state.as_ref().map(|s| &s.cache)
    }

    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// One turn: `user` joins the conversation and the model answers (streamed to `on_text`).
    /// On an error the conversation is as it was before the turn (its cache may be dropped, in
    /// which case the next turn prefills the conversation again).
    pub fn turn(
        &mut self,
        engine: &Engine<M>,
        user: &str,
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, ModelError> {
        let mut messages: Vec<ChatMessage> = self.system.iter().map(|s| message("system", s)).collect();
        messages.extend(self.messages.iter().cloned());
        messages.push(message("user", user));
        let rendered = engine.chat_prompt_messages(&messages)?;
        // Go on from the cache when what it has seen is a prefix of the new rendering.
        let resumable = self.state.take().filter(|s| rendered.len() > s.text.len() && rendered.starts_with(&s.text));
        // `new`: the tokens this turn runs; `seen`: the conversation's tokens after them.
        let (new, seen, cache, logits) = match resumable {
            Some(SessionCache { mut cache, text, pending }) => {
                let mut new = pending;
                new.extend(engine.tokenizer.encode(&rendered[text.len()..], false)?);
                let seen = cache.next_position() as usize + new.len();
                let logits = engine.extend_prompt(&new, &mut cache, req.max_tokens)?;
                (new, seen, cache, logits)
            }
            None => {
                if !self.messages.is_empty() {
                    self.stats.restarts += 1;
                }
                let tokens = engine.encode(&rendered)?;
                engine.check_prompt(tokens.len())?;
                let mut cache = engine.new_cache(&self.kv, tokens.len(), req.max_tokens)?;
                let logits = engine.prefill(&tokens, &mut cache)?;
                (tokens.clone(), tokens.len(), cache, logits)
            }
        };
        self.stats.prefilled_tokens += new.len();
        // A repetition penalty looks back over this turn's tokens and the answer.
        let (out, cache) = engine.generate_from_keeping_cache(&new, (cache, logits), req, on_text)?;
        self.stats.turns += 1;
        self.stats.conversation_tokens = seen + out.token_ids.len();
        self.messages.push(message("user", user));
        self.messages.push(message("assistant", &out.text));
        // The cache holds the answer's tokens but those no step has run: a token limit leaves
        // the last one pending; a stop string's text is not the tokens' text, so start over.
        let ran = cache.next_position() as usize - seen;
        let resumable = matches!(out.stop_reason, StopReason::EndOfGeneration | StopReason::MaxTokens);
        if resumable && ran <= out.token_ids.len() {
            self.state = Some(SessionCache {
                cache,
                text: format!("{rendered}{}", out.text),
                pending: out.token_ids[ran..].to_vec(),
            });
        }
        Ok(out)
    }
}

fn message(role: &str, content: &str) -> ChatMessage {
    ChatMessage { role: role.into(), content: content.into() }
}

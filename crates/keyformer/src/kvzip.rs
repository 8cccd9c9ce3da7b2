//! KVzip's scores (Kim et al., 2025; kvpress's `KVzipPress`): at the end of a prompt, the model
//! is asked to repeat it and reads the prompt again after that request, teacher-forced, part
//! by part; a prompt token's score is the largest attention any query of the repetition pays
//! it (the softmax taken over the sinks, the part being repeated and the repetition, as
//! kvpress takes it). The repetition runs through a copy of the cache, so the sequence's own
//! cache never holds it; the scores then decide the prompt's trim like any policy's.

use crate::backend::{Backend, Cpu};
use crate::kv::KvCache;
use crate::models::decoder::{Logits, Model};
use crate::ModelError;

/// Prompt tokens repeated per pass (kvpress's `chunk_size`).
pub const PART_TOKENS: usize = 2048;
/// Tokens of the previous part quoted in the request for the next (kvpress's
/// `prev_postfix_size`).
const QUOTED_TOKENS: usize = 8;

/// The text of the requests, as kvpress words them.
pub const FIRST_REQUEST: &str = "\n\nRepeat the previous context exactly.";
pub const LATER_REQUEST: &str = "\n\nRepeat the part of the previous context exactly, starting with";

/// What the model is asked before it repeats a prompt, as token ids of its tokenizer: the
/// request for the first part, the request for a later part (then the previous part's last
/// tokens), and the end of the user's turn up to the start of the answer (the chat
/// template's; a newline for a model without one).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepeatRequest {
    pub first: Vec<u32>,
    pub later: Vec<u32>,
    pub suffix: Vec<u32>,
}

impl RepeatRequest {
    /// The tokens read for the part `part` of `prompt` (`previous`: the part before it).
    pub fn pass(&self, previous: Option<&[u32]>, part: &[u32]) -> Vec<u32> {
        let mut tokens = match previous {
            None => self.first.clone(),
            Some(prev) => {
                let mut t = self.later.clone();
                t.extend_from_slice(&prev[prev.len().saturating_sub(QUOTED_TOKENS)..]);
                t
            }
        };
        tokens.extend_from_slice(&self.suffix);
        tokens.extend_from_slice(part);
        tokens
    }
}

impl Model<Cpu> {
    /// Score the prompt tokens just read into `cache` (`prompt`, the last `prompt.len()`
    /// positions) by their repetition, into the cache's policy (KVzip), before the prompt's
    /// end trims it.
    pub fn score_by_repetition(&self, prompt: &[u32], cache: &mut KvCache) -> Result<(), ModelError> {
        let request = self.repeat_request.as_ref().ok_or_else(|| {
            ModelError::Input("kvzip needs the words of its repeat request: load the model through an Engine".into())
        })?;
        let end = cache.next_position();
        let start = end - prompt.len() as u32;
        let (n_layers, n_kv) = (cache.layers.len(), cache.layers[0].len());
        // best[layer * n_kv + head][position - start]
        let mut best = vec![vec![0f32; prompt.len()]; n_layers * n_kv];
        let mut logits = Vec::new();
        let mut previous: Option<&[u32]> = None;
        for (i, part) in prompt.chunks(PART_TOKENS).enumerate() {
            let first = start + (i * PART_TOKENS) as u32;
            let tokens = request.pass(previous, part);
            let mut copy = cache.clone();
            copy.recorder = None;
            copy.grow_for(tokens.len());
            copy.policy.begin_reconstruction(first, first + part.len() as u32, end);
            for piece in tokens.chunks(self.backend.prefill_chunk()) {
                self.forward_into(piece, &mut copy, Logits::Last, &mut logits)?;
            }
            for layer in 0..n_layers {
                if copy.windows[layer].is_some() {
                    continue; // a sliding layer keeps its window whatever the scores
                }
                for h in 0..n_kv {
                    let scores = copy.policy.scores(layer, h);
                    let row = &mut best[layer * n_kv + h];
                    for (slot, pos) in copy.layers[layer][h].table.occupied() {
                        if pos >= start && pos < end {
                            let b = &mut row[(pos - start) as usize];
                            *b = b.max(scores.get(slot).copied().unwrap_or(0.0));
                        }
                    }
                }
            }
            previous = Some(part);
        }
        for layer in 0..n_layers {
            if cache.windows[layer].is_some() {
                continue;
            }
            for h in 0..n_kv {
                let head = &cache.layers[layer][h];
                let mut per_slot = vec![0f32; head.table.positions().len()];
                for (slot, pos) in head.table.occupied() {
                    if pos >= start && pos < end {
                        per_slot[slot] = best[layer * n_kv + h][(pos - start) as usize];
                    }
                }
                cache.policy.observe(layer, h, &per_slot);
            }
        }
        Ok(())
    }
}

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

/// Whether a policy's repetition scores take Keyformer's noise and temperature (`kvzip:gumbel`):
/// its noise options and seed, or `None` for KVzip's plain softmax. Scores are shared between
/// policies that agree on this.
#[derive(Debug, Clone, PartialEq)]
pub struct RepetitionNoise(pub Option<(keyformer_kv::KeyformerOptions, u64)>);

impl RepetitionNoise {
    pub fn of(config: &keyformer_kv::PolicyConfig) -> Self {
        Self(config.noisy_scores.then(|| (config.keyformer.clone(), config.seed)))
    }
}

/// A prompt's repetition scores: for each (layer, KV head), the score of each prompt position
/// from `start` on (`rows[layer * n_kv_heads + head][position - start]`); sliding layers'
/// rows are empty.
#[derive(Debug, Clone, PartialEq)]
pub struct RepetitionScores {
    pub start: u32,
    pub rows: Vec<Vec<f32>>,
}

impl RepetitionScores {
    /// Give them to `cache`'s policy (its held prompt tokens' scores).
    pub fn apply(&self, cache: &mut KvCache) {
        let n_kv = cache.layers[0].len();
        for layer in 0..cache.layers.len() {
            for h in 0..n_kv {
                let row = &self.rows[layer * n_kv + h];
                if row.is_empty() {
                    continue;
                }
                let head = &cache.layers[layer][h];
                let mut per_slot = vec![0f32; head.table.positions().len()];
                for (slot, pos) in head.table.occupied() {
                    if let Some(&score) = pos.checked_sub(self.start).and_then(|i| row.get(i as usize)) {
                        per_slot[slot] = score;
                    }
                }
                cache.policy.observe(layer, h, &per_slot);
            }
        }
    }
}

impl Model<Cpu> {
    /// Score the prompt tokens just read into `cache` (`prompt`, the last `prompt.len()`
    /// positions) by their repetition, into the cache's policy (KVzip), before the prompt's
    /// end trims it.
    pub fn score_by_repetition(&self, prompt: &[u32], cache: &mut KvCache) -> Result<(), ModelError> {
        let noise = RepetitionNoise::of(&cache.policy.config);
        self.repetition_scores(prompt, cache, noise)?.apply(cache);
        Ok(())
    }

    /// The repetition scores of the prompt tokens just read into `cache` (`prompt`, its last
    /// `prompt.len()` positions; the cache holds them all), whatever its policy, plain or with
    /// Keyformer's `noise`: they depend on the tokens (and the noise) alone, so one computation
    /// serves every budget.
    pub fn repetition_scores(
        &self,
        prompt: &[u32],
        cache: &KvCache,
        noise: RepetitionNoise,
    ) -> Result<RepetitionScores, ModelError> {
        let request = repeat_request(self)?;
        let end = cache.next_position();
        let start = end - prompt.len() as u32;
        let (n_layers, n_kv) = (cache.layers.len(), cache.layers[0].len());
        let global = |layer: usize| cache.windows[layer].is_none();
        let mut rows: Vec<Vec<f32>> = (0..n_layers * n_kv)
            .map(|i| if global(i / n_kv) { vec![0f32; prompt.len()] } else { Vec::new() })
            .collect();
        let mut logits = Vec::new();
        for (first, part_end, tokens) in passes(request, prompt, start) {
            let mut copy = cache.clone();
            copy.recorder = None;
            copy.query_moments = None;
            let lifetime = end as usize + tokens.len();
            copy.policy = scorer_policy(lifetime, &noise, n_layers, n_kv)?;
            copy.grow_for(tokens.len());
            copy.policy.begin_reconstruction(first, part_end, end);
            for piece in tokens.chunks(self.backend.prefill_chunk()) {
                self.forward_into(piece, &mut copy, Logits::Last, &mut logits)?;
            }
            for layer in (0..n_layers).filter(|&l| global(l)) {
                for h in 0..n_kv {
                    let scores = copy.policy.scores(layer, h);
                    let row = &mut rows[layer * n_kv + h];
                    for (slot, pos) in copy.layers[layer][h].table.occupied() {
                        if pos >= start && pos < end {
                            let b = &mut row[(pos - start) as usize];
                            *b = b.max(scores.get(slot).copied().unwrap_or(0.0));
                        }
                    }
                }
            }
        }
        Ok(RepetitionScores { start, rows })
    }
}

/// The model's repeat request, or the error that says why there is none.
pub(crate) fn repeat_request<B: Backend>(model: &Model<B>) -> Result<&RepeatRequest, ModelError> {
    model.repeat_request.as_ref().ok_or_else(|| {
        ModelError::Input("kvzip needs the words of its repeat request: load the model through an Engine".into())
    })
}

/// The passes of `prompt`'s repetition (its first position `start`), one per part of
/// [`PART_TOKENS`]: the part's positions `first..end` and the tokens read (the request, then the
/// part).
pub(crate) fn passes<'a>(
    request: &'a RepeatRequest,
    prompt: &'a [u32],
    start: u32,
) -> impl Iterator<Item = (u32, u32, Vec<u32>)> + 'a {
    prompt.chunks(PART_TOKENS).enumerate().map(move |(i, part)| {
        let previous = i.checked_sub(1).map(|j| &prompt[j * PART_TOKENS..(j + 1) * PART_TOKENS]);
        let first = start + (i * PART_TOKENS) as u32;
        (first, first + part.len() as u32, request.pass(previous, part))
    })
}

/// The policy a repetition's copy of the cache scores with, whatever the cache's own: KVzip's
/// (with Keyformer's noise when asked), under a budget that holds everything (`lifetime`
/// tokens: nothing is trimmed while the prompt runs anyway).
pub(crate) fn scorer_policy(
    lifetime: usize,
    noise: &RepetitionNoise,
    n_layers: usize,
    n_kv: usize,
) -> Result<keyformer_kv::SequencePolicy, ModelError> {
    let mut scorer = keyformer_kv::PolicyConfig {
        kind: keyformer_kv::PolicyKind::Kvzip,
        budget: Some(keyformer_kv::Amount::Tokens(lifetime)),
        ..Default::default()
    };
    if let Some((keyformer, seed)) = &noise.0 {
        (scorer.noisy_scores, scorer.keyformer, scorer.seed) = (true, keyformer.clone(), *seed);
    }
    scorer.resolve(lifetime, 0, n_layers, n_kv).map_err(ModelError::Policy)
}

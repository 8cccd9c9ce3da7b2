//! What the [`Engine`](crate::engine::Engine) needs of a model: its configuration, its caches
//! and the step protocol over them (prefill with the prompt's end, decode steps of one or many
//! sequences). A model on one device ([`Model`]) provides it, and so does a model split over
//! GPUs (`backend::cuda::tensor_parallel::ShardedModel`), so that generation, chat sessions,
//! the server and the evaluations are written once over either.

use keyformer_kv::PolicyConfig;

use crate::backend::{Backend, SequenceCache};
use crate::models::config::ModelConfig;
use crate::models::decoder::{KvPlan, Logits, Model};
use crate::ModelError;

pub trait StepModel: Send + Sync + 'static {
    /// One sequence's keys and values (on a split model, a handle to every shard's part).
    type Cache: SequenceCache + Send;

    fn config(&self) -> &ModelConfig;

    /// Bound the context (`-c`): prompts and generations stop there.
    fn set_context_length(&mut self, tokens: usize);

    /// Key and value bytes one token takes over every layer and KV head (of every shard).
    fn kv_bytes_per_token(&self) -> usize;

    /// Resolve a sequence's KV settings once ([`Model::plan_kv`]); the bytes are the whole
    /// model's.
    fn plan_kv(&self, kv: &PolicyConfig, prompt_len: usize, steps: usize) -> Result<KvPlan, ModelError>;

    /// An empty cache for the sequence `plan` describes.
    fn new_planned_cache(&self, plan: KvPlan) -> Result<Self::Cache, ModelError>;

    /// A prompt through the cache, then its end (the cache compressed to its budget);
    /// `on_rows(first, logits)` sees the logits `which` asks for, in order.
    fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut Self::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), ModelError>;

    /// Make a processed prompt's cache take `extra` more prompt tokens and `steps` more steps
    /// (a chat's next turn).
    fn reopen_prompt(&self, cache: &mut Self::Cache, extra: usize, steps: usize) -> Result<(), ModelError>;

    /// One decode step of one sequence, its logits into `logits`.
    fn decode_step_into(&self, token: u32, cache: &mut Self::Cache, logits: &mut Vec<f32>) -> Result<(), ModelError>;

    /// One decode step of several sequences (`tokens[i]` joins `caches[i]`), a row of logits
    /// each.
    fn decode_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut Self::Cache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError>;

    /// Whether caches can be copied mid-prompt ([`snapshot`](Self::snapshot)), so that later
    /// prompts sharing a prefix start from a copy.
    fn snapshot_supported(&self) -> bool {
        false
    }
    fn snapshot(&self, cache: &Self::Cache) -> Option<Self::Cache> {
        let _ = cache;
        None
    }
    /// Make a copy taken mid-prompt ready for the rest of a prompt of `prompt_len` tokens.
    fn resume_snapshot(&self, cache: &mut Self::Cache, prompt_len: usize, steps: usize) {
        let _ = (cache, prompt_len, steps);
        unreachable!("a model without snapshots has none to resume")
    }
    /// [`prefill`](Self::prefill) showing `on_break` the cache at each prompt position of
    /// `breaks` (only called where [`snapshot_supported`](Self::snapshot_supported)).
    fn prefill_observed(
        &self,
        tokens: &[u32],
        cache: &mut Self::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
        breaks: &[usize],
        on_break: &mut dyn FnMut(usize, &Self::Cache),
    ) -> Result<(), ModelError> {
        let _ = (breaks, on_break);
        self.prefill(tokens, cache, which, on_rows)
    }

    /// The model's KVzip repeat request (set by the engine, which has the tokenizer).
    fn set_repeat_request(&mut self, request: Option<crate::kvzip::RepeatRequest>) {
        let _ = request;
    }
}

impl<B: Backend> StepModel for Model<B> {
    type Cache = B::Cache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn set_context_length(&mut self, tokens: usize) {
        self.config.context_length = tokens;
    }
    fn kv_bytes_per_token(&self) -> usize {
        Model::kv_bytes_per_token(self)
    }
    fn plan_kv(&self, kv: &PolicyConfig, prompt_len: usize, steps: usize) -> Result<KvPlan, ModelError> {
        Model::plan_kv(self, kv, prompt_len, steps)
    }
    fn new_planned_cache(&self, plan: KvPlan) -> Result<B::Cache, ModelError> {
        Model::new_planned_cache(self, plan)
    }
    fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut B::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), ModelError> {
        Model::prefill(self, tokens, cache, which, on_rows)
    }
    fn reopen_prompt(&self, cache: &mut B::Cache, extra: usize, steps: usize) -> Result<(), ModelError> {
        self.backend.reopen_prompt(cache, extra, steps)
    }
    fn decode_step_into(&self, token: u32, cache: &mut B::Cache, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        Model::decode_step_into(self, token, cache, logits)
    }
    fn decode_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut B::Cache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        Model::decode_batch_into(self, tokens, caches, logits)
    }
    fn snapshot_supported(&self) -> bool {
        !self.config.has_sliding_layers() && self.backend.snapshot_supported()
    }
    fn snapshot(&self, cache: &B::Cache) -> Option<B::Cache> {
        self.backend.snapshot(cache)
    }
    fn resume_snapshot(&self, cache: &mut B::Cache, prompt_len: usize, steps: usize) {
        self.backend.resume_snapshot(cache, prompt_len, steps, self.config.context_length)
    }
    fn prefill_observed(
        &self,
        tokens: &[u32],
        cache: &mut B::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
        breaks: &[usize],
        on_break: &mut dyn FnMut(usize, &B::Cache),
    ) -> Result<(), ModelError> {
        Model::prefill_observed(self, tokens, cache, which, on_rows, breaks, on_break)
    }
    fn set_repeat_request(&mut self, request: Option<crate::kvzip::RepeatRequest>) {
        self.repeat_request = request;
    }
}

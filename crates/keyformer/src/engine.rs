//! The library's front door: load a model, generate text, score perplexity. The CLI, and later
//! the server and the evaluation suite, are thin layers over [`Engine`].

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::backend::{Cpu, SequenceCache};
use crate::chat::{self, ChatMessage};
use crate::gguf::GgufFile;
use crate::step_model::StepModel;
use keyformer_kv::{Amount, PolicyConfig, Signal};

use crate::kv::{KvCache, PromptScores};
use crate::models::decoder::{KvPlan, Logits, Model};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{models, ModelError};

/// A loaded model with its tokenizer: `Model<B>` on one device (the CPU unless said otherwise),
/// or any other [`StepModel`] (a model split over GPUs).
pub struct Engine<M: StepModel = Model<Cpu>> {
    /// The model file; `None` when the weights were drawn on the GPU.
    pub file: Option<Arc<GgufFile>>,
    /// What the model is called: the file's stem, or `random-SHAPE`.
    pub name: String,
    pub model: M,
    pub tokenizer: Tokenizer,
}

/// What to generate.
#[derive(Debug, Clone, Default)]
pub struct GenerateRequest {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// How the KV cache is compressed.
    pub kv: PolicyConfig,
    /// Report each generated token's log-probability and this many most likely alternatives
    /// (OpenAI's `logprobs` / `top_logprobs`); `None`: no report.
    pub logprobs: Option<usize>,
}

/// One generated token's log-probability under the model (before temperature and the other
/// sampling filters, as OpenAI and vLLM report it), with the most likely alternatives.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-generation token (EOS, EOT, end of turn).
    EndOfGeneration,
    StopString,
    MaxTokens,
    /// The model's context length was reached.
    ContextFull,
    /// The caller's time limit ended it (the server's --timeout); the text so far is kept.
    TimedOut,
    /// The caller stopped asking for more (a stream closed early); the text so far is kept.
    Cancelled,
}

impl StopReason {
    /// As people read it: "end of generation", "stop string", "max tokens", ...
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::EndOfGeneration => "end of generation",
            StopReason::StopString => "stop string",
            StopReason::MaxTokens => "max tokens",
            StopReason::ContextFull => "context full",
            StopReason::TimedOut => "timed out",
            StopReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationOutput {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub kv_cache: KvReport,
    /// Per generated token, when the request asked (`GenerateRequest::logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// What the KV cache held: the `kv_cache` object of `run --json` and `perplexity --json`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KvReport {
    pub policy: String,
    /// Tokens kept per (layer, KV head); null for the full cache.
    pub budget_tokens: Option<usize>,
    pub recent_tokens: usize,
    pub tokens_held_max: usize,
    pub bytes_held_max: usize,
    /// The most bytes held at any moment, the prompt's cache before its trim included.
    pub bytes_peak: usize,
    pub bytes_full_equivalent: usize,
    pub evictions: usize,
}

impl KvReport {
    fn of(cache: &impl SequenceCache) -> Self {
        let (p, stats) = (cache.policy(), cache.stats());
        Self {
            policy: p.kind().name().to_string(),
            budget_tokens: (p.budget != usize::MAX).then_some(p.budget),
            recent_tokens: p.recent,
            tokens_held_max: stats.tokens_held_max,
            bytes_held_max: stats.bytes_held_max,
            bytes_peak: stats.bytes_peak,
            bytes_full_equivalent: stats.bytes_full_equivalent,
            evictions: stats.evictions,
        }
    }
    /// Combine the reports of several sequences (maxima of maxima, sums of evictions).
    fn merge(&mut self, other: KvReport) {
        self.policy = other.policy;
        self.budget_tokens = other.budget_tokens;
        self.recent_tokens = other.recent_tokens;
        self.tokens_held_max = self.tokens_held_max.max(other.tokens_held_max);
        self.bytes_held_max = self.bytes_held_max.max(other.bytes_held_max);
        self.bytes_peak = self.bytes_peak.max(other.bytes_peak);
        self.bytes_full_equivalent = self.bytes_full_equivalent.max(other.bytes_full_equivalent);
        self.evictions += other.evictions;
    }
}

impl GenerationOutput {
    /// The result as `run --json` prints it and the Python package returns it, with the
    /// sampling `seed` it used.
    pub fn report(&self, seed: u64) -> serde_json::Value {
        serde_json::json!({
            "text": self.text,
            "token_ids": self.token_ids,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "stop_reason": self.stop_reason,
            "seed": seed,
            "timings": {
                "prefill_seconds": self.prefill_seconds,
                "decode_seconds": self.decode_seconds,
                "prefill_tok_s": self.prefill_tok_s(),
                "decode_tok_s": self.decode_tok_s(),
            },
            "kv_cache": self.kv_cache,
        })
    }

    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
    }
    /// Tokens per second of the decode steps (the first token comes from the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_seconds)
    }
}

/// One sequence being generated, a token at a time: [`Engine::generate`] runs it to the end
/// alone; a scheduler advances many together ([`Engine::step_generations`]). Either way the
/// same sampling and stopping rules apply, so a sequence's text does not depend on its batch.
pub struct Generation<M: StepModel = Model<Cpu>> {
    pub cache: M::Cache,
    logits: Vec<f32>,
    sampler: Sampler,
    history: Vec<u32>,
    generated: Vec<u32>,
    stream: StopStream,
    text: IncrementalText,
    max_tokens: usize,
    prompt_tokens: usize,
    stop_reason: Option<StopReason>,
    /// Top alternatives to report per token, and the report so far.
    logprobs: Option<(usize, Vec<TokenLogprob>)>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl<M: StepModel> Generation<M> {
    fn new(prompt: &[u32], cache: M::Cache, logits: Vec<f32>, req: &GenerateRequest) -> Self {
        Self {
            cache,
            logits,
            sampler: Sampler::new(req.sampling.clone()),
            history: prompt.to_vec(),
            generated: Vec::new(),
            stream: StopStream::new(req.stop.clone()),
            text: IncrementalText::default(),
            max_tokens: req.max_tokens,
            prompt_tokens: prompt.len(),
            stop_reason: None,
            logprobs: req.logprobs.map(|top| (top, Vec::new())),
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
        }
    }

    /// End the sequence now (a time limit): what was generated is kept and reported.
    pub fn time_out(&mut self) {
        self.stop_reason.get_or_insert(StopReason::TimedOut);
    }

    /// Why it ended; `None` while it runs.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop_reason
    }
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }
    pub fn generated_tokens(&self) -> usize {
        self.generated.len()
    }

    /// Pick the next token from the current logits and stream the text that became final.
    /// Returns the token the model must now run (`Some`), or `None` when the sequence ended
    /// (end of generation, a stop string, `max_tokens`, or a full context).
    pub fn advance(&mut self, engine: &Engine<M>, on_text: &mut dyn FnMut(&str)) -> Result<Option<u32>, ModelError> {
        if self.stop_reason.is_some() {
            return Ok(None);
        }
        if self.generated.len() >= self.max_tokens {
            self.stop_reason = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        let next = self.sampler.sample(&self.logits, &self.history);
        if let Some((top, report)) = &mut self.logprobs {
            report.push(token_logprob(&self.logits, next, *top));
        }
        if engine.tokenizer.is_end_of_generation(next) {
            self.stop_reason = Some(StopReason::EndOfGeneration);
            return Ok(None);
        }
        self.generated.push(next);
        self.history.push(next);
        let text = self.text.update(&engine.tokenizer, &self.generated)?;
        if self.stream.push(text, on_text) {
            self.stop_reason = Some(StopReason::StopString);
            return Ok(None);
        }
        if self.generated.len() == self.max_tokens {
            self.stop_reason = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        // The model's context, or the cache's own size (sized for the request's tokens).
        if self.cache.next_position() as usize >= engine.context_length() || self.cache.len() >= self.cache.capacity() {
            self.stop_reason = Some(StopReason::ContextFull);
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// Send what is left of the text and report.
    pub fn finish(self, engine: &Engine<M>, on_text: &mut dyn FnMut(&str)) -> Result<GenerationOutput, ModelError> {
        Ok(self.finish_keeping_cache(engine, on_text)?.0)
    }

    /// [`finish`](Self::finish), giving back the cache too (a chat goes on from it).
    pub fn finish_keeping_cache(
        mut self,
        engine: &Engine<M>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(GenerationOutput, M::Cache), ModelError> {
        let text = self.stream.finish(&engine.tokenizer.decode(&self.generated)?, on_text);
        let output = GenerationOutput {
            text,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: self.generated.len(),
            token_ids: self.generated,
            stop_reason: self.stop_reason.unwrap_or(StopReason::MaxTokens),
            prefill_seconds: self.prefill_seconds,
            decode_seconds: self.decode_seconds,
            kv_cache: KvReport::of(&self.cache),
            logprobs: self.logprobs.map(|(_, report)| report),
        };
        Ok((output, self.cache))
    }
}

/// `token`'s log-softmax in `logits` and the `top` largest (ties: lower id first).
fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = max + logits.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if best.len() < top || l > best[best.len() - 1].1 {
                let at = best.partition_point(|&(_, b)| b >= l);
                best.insert(at, (i as u32, l));
                best.truncate(top);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: logits[token as usize] - log_sum,
        top: best.into_iter().map(|(i, l)| (i, l - log_sum)).collect(),
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// A prompt prefilled once with the full cache, with every requested policy's prompt scores.
#[derive(Debug, Clone)]
pub struct SharedPrefill {
    cache: KvCache,
    scores: PromptScores,
    logits: Vec<f32>,
    /// The prompt, for the policies that must prefill on their own (trimmed chunk by chunk).
    prompt: Vec<u32>,
    /// KVzip's scores of the prompt, computed for the first `kvzip` policy that asks and
    /// shared by the others with the same noise (they depend on the tokens and it alone).
    repetition: Arc<Mutex<Vec<SharedRepetition>>>,
}

/// Repetition scores with the noise they were computed with.
type SharedRepetition = (crate::kvzip::RepetitionNoise, Arc<crate::kvzip::RepetitionScores>);

impl SharedPrefill {
    /// The repetition scores computed so far (a poisoned lock still holds whole entries).
    fn lock_repetition(&self) -> std::sync::MutexGuard<'_, Vec<SharedRepetition>> {
        self.repetition.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PerplexityReport {
    pub tokens_scored: usize,
    pub mean_nll: f64,
    pub ppl: f64,
    pub windows: usize,
    pub ctx: usize,
    pub seconds: f64,
    pub kv_cache: KvReport,
}

impl<M: StepModel> Engine<M> {
    /// KVzip's repeat request in this model's tokens (its chat template's end of a user turn
    /// where it has one, as kvpress finds it: a message rendered around a marker, cut there).
    fn with_repeat_request(mut self) -> Self {
        let encode = |text: &str| self.tokenizer.encode(text, false).ok();
        let suffix = match self.chat_template() {
            Some(_) => {
                const MARKER: &str = "\n##kvzip-marker##";
                self.chat_prompt(&format!("context{MARKER}"))
                    .ok()
                    .and_then(|p| p.split_once(MARKER).map(|(_, after)| after.to_string()))
            }
            None => None,
        };
        let request = (|| {
            Some(crate::kvzip::RepeatRequest {
                first: encode(crate::kvzip::FIRST_REQUEST)?,
                later: encode(crate::kvzip::LATER_REQUEST)?,
                suffix: encode(suffix.as_deref().unwrap_or("\n"))?,
            })
        })();
        self.model.set_repeat_request(request);
        self
    }

    /// The one rule for a prompt's length (the CLI, the server and the benches ask here): at
    /// least one token, and fewer than the context, so that a token can be generated.
    pub fn check_prompt(&self, prompt_len: usize) -> Result<(), ModelError> {
        if prompt_len == 0 {
            return Err(ModelError::Input("the prompt is empty".into()));
        }
        let context = self.context_length();
        if prompt_len >= context {
            return Err(ModelError::PromptTooLong { prompt: prompt_len, context });
        }
        Ok(())
    }

    pub fn context_length(&self) -> usize {
        self.model.config().context_length
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.file.as_ref()?.get("tokenizer.chat_template").and_then(|v| v.as_str())
    }

    /// Wrap a user message in the model's chat template.
    pub fn chat_prompt(&self, user: &str) -> Result<String, ModelError> {
        self.chat_prompt_messages(&[ChatMessage { role: "user".into(), content: user.into() }])
    }

    /// Render a conversation with the model's chat template, ending where the assistant's
    /// reply starts.
    pub fn chat_prompt_messages(&self, messages: &[ChatMessage]) -> Result<String, ModelError> {
        let template =
            self.chat_template().ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        let tok = |id: Option<u32>| id.and_then(|i| self.tokenizer.token_text(i)).unwrap_or("").to_string();
        chat::render(template, messages, &tok(self.tokenizer.bos), &tok(self.tokenizer.eos))
    }

    /// Tokenise a prompt (BOS added when the model asks for it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self.tokenizer.encode(text, true)?)
    }

    /// A cache for a prompt of `prompt_len` tokens followed by `steps` decode steps.
    /// The full cache is sized for exactly that many tokens (a backend may allocate it all).
    pub fn new_cache(&self, kv: &PolicyConfig, prompt_len: usize, steps: usize) -> Result<M::Cache, ModelError> {
        self.model.new_planned_cache(self.model.plan_kv(kv, prompt_len, steps)?)
    }

    /// [`Model::prefill`]: the prompt in chunks, then its end (the cache compressed).
    pub fn prefill_with(
        &self,
        tokens: &[u32],
        cache: &mut M::Cache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), ModelError> {
        self.model.prefill(tokens, cache, which, on_rows)
    }

    /// Prefill `tokens` and return the last token's logits.
    pub fn prefill(&self, tokens: &[u32], cache: &mut M::Cache) -> Result<Vec<f32>, ModelError> {
        let mut last = Vec::new();
        self.prefill_with(tokens, cache, Logits::Last, &mut |_, l| last = l.to_vec())?;
        Ok(last)
    }

    /// More prompt for a cache whose prompt has been processed (a chat's next turn, after the
    /// answer so far): `tokens` go through as a prompt (scored, and trimmed at their end to the
    /// cache's budget; chunk by chunk when it trims so), room is made for `steps` decode steps,
    /// and the last token's logits come back. Only the new tokens are computed.
    pub fn extend_prompt(&self, tokens: &[u32], cache: &mut M::Cache, steps: usize) -> Result<Vec<f32>, ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::Input("no new prompt tokens".into()));
        }
        let end = cache.next_position() as usize + tokens.len();
        let context = self.context_length();
        if end >= context {
            return Err(ModelError::PromptTooLong { prompt: end, context });
        }
        self.model.reopen_prompt(cache, tokens.len(), steps.min(context - end))?;
        self.prefill(tokens, cache)
    }

    /// One decode step: `token` joins the cache (which then evicts down to its budget).
    pub fn decode_step(&self, token: u32, cache: &mut M::Cache) -> Result<Vec<f32>, ModelError> {
        let mut logits = Vec::new();
        self.decode_step_into(token, cache, &mut logits)?;
        Ok(logits)
    }

    /// [`decode_step`](Self::decode_step) into a logits vector the caller reuses.
    pub fn decode_step_into(&self, token: u32, cache: &mut M::Cache, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        self.model.decode_step_into(token, cache, logits)
    }

    /// One decode step of several sequences together (continuous batching): `tokens[i]` joins
    /// `caches[i]`; `logits` gets one vocabulary-sized row per sequence, each equal to what
    /// [`decode_step`](Self::decode_step) gives that sequence alone.
    pub fn decode_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut M::Cache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        self.model.decode_batch_into(tokens, caches, logits)
    }

    /// Generate after `prompt`, calling `on_text` with each new piece of text as soon as it is
    /// final (text that could still become a stop string, or half a UTF-8 character, waits).
    pub fn generate(
        &self,
        prompt: &[u32],
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, ModelError> {
        let mut generation = self.start_generation(prompt, req)?;
        self.run_generation(&mut generation, on_text, &mut || true)?;
        generation.finish(self, on_text)
    }

    /// [`generate`](Self::generate) that asks `keep_going()` before each decode step and ends
    /// the sequence as [`StopReason::Cancelled`] when it says no (a stream whose reader left).
    pub fn generate_while(
        &self,
        prompt: &[u32],
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<GenerationOutput, ModelError> {
        let mut generation = self.start_generation(prompt, req)?;
        self.run_generation(&mut generation, on_text, keep_going)?;
        generation.finish(self, on_text)
    }

    /// Check the request, prefill `prompt` under `req.kv`, and return the sequence ready for
    /// its first token.
    pub fn start_generation(&self, prompt: &[u32], req: &GenerateRequest) -> Result<Generation<M>, ModelError> {
        self.check_prompt(prompt.len())?;
        let plan = self.model.plan_kv(&req.kv, prompt.len(), req.max_tokens)?;
        self.start_planned_generation(prompt, req, plan)
    }

    /// [`start_generation`](Self::start_generation) with the KV settings already resolved (the
    /// server plans a request once, to admit it by its memory, then starts it with that plan).
    pub fn start_planned_generation(
        &self,
        prompt: &[u32],
        req: &GenerateRequest,
        plan: KvPlan,
    ) -> Result<Generation<M>, ModelError> {
        req.sampling.validate().map_err(ModelError::Input)?;
        self.check_prompt(prompt.len())?;
        let mut cache = self.model.new_planned_cache(plan)?;
        let t0 = Instant::now();
        let logits = self.prefill(prompt, &mut cache)?;
        let mut generation = Generation::new(prompt, cache, logits, req);
        generation.prefill_seconds = t0.elapsed().as_secs_f64();
        Ok(generation)
    }

    /// [`start_planned_generation`](Self::start_planned_generation) that starts from the
    /// longest kept prefix of `prompt` in `prefixes` (computing only the rest) and keeps copies
    /// of this prompt's cache where later prompts may share it ([`crate::prefix`]). The result
    /// is exactly the one without `prefixes`. Policies a copy cannot start (trimmed once at the
    /// prompt's end), models with sliding-window layers and backends without copies prefill as
    /// usual.
    pub fn start_generation_reusing(
        &self,
        prompt: &[u32],
        req: &GenerateRequest,
        plan: KvPlan,
        prefixes: &mut crate::prefix::PrefixCache<M::Cache>,
    ) -> Result<Generation<M>, ModelError> {
        let reusable = plan.policy.reuse_key().filter(|_| prefixes.limit() > 0 && self.model.snapshot_supported());
        let Some((key, step)) = reusable else {
            return self.start_planned_generation(prompt, req, plan);
        };
        req.sampling.validate().map_err(ModelError::Input)?;
        self.check_prompt(prompt.len())?;
        let t0 = Instant::now();
        let (mut cache, from) = match prefixes.lookup(&key, prompt, |c| self.model.snapshot(c)) {
            Some((at, mut cache)) => {
                self.model.resume_snapshot(&mut cache, prompt.len(), plan.steps);
                (cache, at)
            }
            None => (self.model.new_planned_cache(plan)?, 0),
        };
        let breaks = prefixes.breaks(&key, prompt, step, from);
        let mut copies = Vec::new();
        let mut logits = Vec::new();
        self.model.prefill_observed(
            &prompt[from..],
            &mut cache,
            Logits::Last,
            &mut |_, l| logits = l.to_vec(),
            &breaks,
            &mut |at, c| copies.extend(self.model.snapshot(c).map(|copy| (at, copy))),
        )?;
        for (at, copy) in copies {
            prefixes.insert(&key, &prompt[..at], copy);
        }
        prefixes.remember(prompt);
        let mut generation = Generation::new(prompt, cache, logits, req);
        generation.prefill_seconds = t0.elapsed().as_secs_f64();
        Ok(generation)
    }

    /// [`Engine::generate`] from a cache that already holds `prompt` (with the prompt's last
    /// logits), as [`Engine::cache_from_shared`] hands it out; `req.kv` is not used, the cache's
    /// own policy is. The output's `prefill_seconds` is 0.
    pub fn generate_from(
        &self,
        prompt: &[u32],
        (cache, logits): (M::Cache, Vec<f32>),
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, ModelError> {
        Ok(self.generate_from_keeping_cache(prompt, (cache, logits), req, on_text)?.0)
    }

    /// [`generate_from`](Self::generate_from), giving back the cache (it holds the prompt and
    /// the answer's tokens but the last one, which no step has run yet).
    pub fn generate_from_keeping_cache(
        &self,
        prompt: &[u32],
        (cache, logits): (M::Cache, Vec<f32>),
        req: &GenerateRequest,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<(GenerationOutput, M::Cache), ModelError> {
        req.sampling.validate().map_err(ModelError::Input)?;
        let mut generation = Generation::new(prompt, cache, logits, req);
        self.run_generation(&mut generation, on_text, &mut || true)?;
        generation.finish_keeping_cache(self, on_text)
    }

    /// Run a started generation to its end, one sequence alone.
    pub fn complete(
        &self,
        mut g: Generation<M>,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<GenerationOutput, ModelError> {
        self.run_generation(&mut g, on_text, &mut || true)?;
        g.finish(self, on_text)
    }

    fn run_generation(
        &self,
        g: &mut Generation<M>,
        on_text: &mut dyn FnMut(&str),
        keep_going: &mut dyn FnMut() -> bool,
    ) -> Result<(), ModelError> {
        let t = Instant::now();
        while let Some(next) = g.advance(self, on_text)? {
            if !keep_going() {
                g.stop_reason.get_or_insert(StopReason::Cancelled);
                break;
            }
            self.decode_step_into(next, &mut g.cache, &mut g.logits)?;
        }
        g.decode_seconds += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// One decode step of several generations together (continuous batching): `next[i]` is
    /// what `generations[i].advance` returned. Each one's logits are those it would get alone.
    pub fn step_generations(&self, generations: &mut [&mut Generation<M>], next: &[u32]) -> Result<(), ModelError> {
        let t = Instant::now();
        let mut rows = Vec::new();
        let mut caches: Vec<&mut M::Cache> = generations.iter_mut().map(|g| &mut g.cache).collect();
        self.decode_batch_into(next, &mut caches, &mut rows)?;
        let vocab = self.model.config().vocab_size;
        let seconds = t.elapsed().as_secs_f64();
        for (g, row) in generations.iter_mut().zip(rows.chunks_exact(vocab)) {
            g.logits.clear();
            g.logits.extend_from_slice(row);
            g.decode_seconds += seconds;
        }
        Ok(())
    }

    /// The next-token logits at every position of `tokens` (row `i` predicts token `i + 1`),
    /// teacher-forced through a cache under `kv`: the first `split` tokens are a prompt (one
    /// forward pass, compressed to the budget at its end), every later token one decode step
    /// with eviction, as generation runs. `on_row(i, logits)` sees the rows in order.
    pub fn score_tokens(
        &self,
        tokens: &[u32],
        split: usize,
        kv: &PolicyConfig,
        on_row: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<KvReport, ModelError> {
        if split == 0 || split > tokens.len() {
            return Err(ModelError::Input(format!(
                "the prompt part must be 1 to {} tokens, got {split}",
                tokens.len()
            )));
        }
        if tokens.len() > self.context_length() {
            return Err(ModelError::Input(format!(
                "{} tokens do not fit the model's context of {} tokens",
                tokens.len(),
                self.context_length()
            )));
        }
        let vocab = self.model.config().vocab_size;
        let mut cache = self.new_cache(kv, split, tokens.len() - split)?;
        self.prefill_with(&tokens[..split], &mut cache, Logits::All, &mut |first, logits| {
            for (j, row) in logits.chunks_exact(vocab).enumerate() {
                on_row(first + j, row);
            }
        })?;
        let mut row = Vec::new();
        for (i, &token) in tokens.iter().enumerate().skip(split) {
            self.decode_step_into(token, &mut cache, &mut row)?;
            on_row(i, &row);
        }
        Ok(KvReport::of(&cache))
    }

    /// Mean negative log-likelihood over consecutive windows of `ctx` tokens: every token of a
    /// window but the first is predicted from the ones before it in that window (the loss
    /// transformers computes over a window). `on_window(done, total)` reports progress.
    ///
    /// With a KV budget the evaluation streams, as StreamingLLM's does: the first `budget`
    /// tokens of a window are a prompt (a percentage is of the window), every later token is
    /// one decode step with eviction. For `full`, a budget only sets that split.
    pub fn perplexity(
        &self,
        tokens: &[u32],
        ctx: usize,
        max_windows: Option<usize>,
        kv: &PolicyConfig,
        on_window: &mut dyn FnMut(usize, usize),
    ) -> Result<PerplexityReport, ModelError> {
        if ctx < 2 {
            return Err(ModelError::Input(format!("--ctx must be at least 2, got {ctx}")));
        }
        if ctx > self.context_length() {
            return Err(ModelError::Input(format!(
                "a window of {ctx} tokens does not fit the model's context of {} tokens",
                self.context_length()
            )));
        }
        kv.validate().map_err(ModelError::Policy)?;
        let available = tokens.len() / ctx;
        if available == 0 {
            return Err(ModelError::Input(format!(
                "the text has {} tokens, fewer than one window of {ctx}",
                tokens.len()
            )));
        }
        let windows = max_windows.map_or(available, |w| w.min(available));
        // The streaming split: the budget, resolved against the window.
        let split = kv.budget.map_or(ctx, |b| b.resolve(ctx).clamp(1, ctx));
        let mut window_kv = kv.clone();
        if let Some(b) = kv.budget {
            window_kv.budget = Some(Amount::Tokens(b.resolve(ctx)));
        }
        let t0 = Instant::now();
        let (mut nll, mut scored) = (0f64, 0usize);
        let mut report = KvReport::default();
        for w in 0..windows {
            on_window(w, windows);
            let window = &tokens[w * ctx..(w + 1) * ctx];
            // The last token's row predicts past the window: not scored (its step comes after
            // every scored one, so it changes none of them).
            let kv_report = self.score_tokens(window, split, &window_kv, &mut |i, row| {
                if let Some(&target) = window.get(i + 1) {
                    nll += negative_log_likelihood(row, target);
                    scored += 1;
                }
            })?;
            report.merge(kv_report);
        }
        on_window(windows, windows);
        let mean_nll = nll / scored as f64;
        Ok(PerplexityReport {
            tokens_scored: scored,
            mean_nll,
            ppl: mean_nll.exp(),
            windows,
            ctx,
            seconds: t0.elapsed().as_secs_f64(),
            kv_cache: report,
        })
    }
}

impl Engine<Model<Cpu>> {
    /// Random weights at `shape` ([`models::random`]) with a byte-level tokenizer
    /// ([`Tokenizer::byte_level`]): for measuring speed and serving at a model's size without
    /// its weights. The weights go through a temporary GGUF file (meant for small shapes).
    pub fn random(shape: &models::random::RandomShape, seed: u64) -> Result<Self, ModelError> {
        Self::random_typed(shape, seed, crate::quant::GgmlType::F16)
    }

    /// [`Engine::random`] with the matrices of a quantised `weight_type`
    /// ([`models::random::write_gguf_typed`]).
    pub fn random_typed(
        shape: &models::random::RandomShape,
        seed: u64,
        weight_type: crate::quant::GgmlType,
    ) -> Result<Self, ModelError> {
        // The file is built in memory first.
        const MAX_BYTES: usize = 2 << 30;
        if shape.weight_bytes() > MAX_BYTES {
            return Err(ModelError::Input(format!(
                "random {} weights take {:.1} GiB: on the CPU, random weights are for small shapes (tiny, \
                 smollm2-135m); the GPU draws large ones on the device (--device cuda)",
                shape.name,
                shape.weight_bytes() as f64 / (1u64 << 30) as f64
            )));
        }
        static FILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nth = FILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("keyformer-random-{}-{}-{nth}.gguf", shape.name, std::process::id()));
        models::random::write_gguf_typed(&path, shape, seed, weight_type)?;
        let loaded = models::load(&path, crate::gguf::LoadMode::Resident);
        // The file is mapped: its name can go now.
        let _ = std::fs::remove_file(&path);
        let (file, model) = loaded?;
        let tokenizer = Tokenizer::byte_level(model.config.vocab_size)?;
        Ok(Self { file: Some(file), name: format!("random-{}", shape.name), model, tokenizer }.with_repeat_request())
    }

    /// A GGUF file, or a Hugging Face model folder ([`crate::hf`]), its weights read into
    /// memory ([`crate::gguf::LoadMode::Resident`]).
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        Self::load_with(path, crate::gguf::LoadMode::default())
    }

    /// [`Engine::load`] with the weights held as `mode` says.
    pub fn load_with(path: &Path, mode: crate::gguf::LoadMode) -> Result<Self, ModelError> {
        let name = path.file_stem().map_or_else(|| path.display().to_string(), |s| s.to_string_lossy().into_owned());
        if path.is_dir() {
            let mut folder = crate::hf::open(path)?;
            folder.file.hold(mode)?;
            let file = Arc::new(folder.file);
            return Self::assemble(models::load_file(file.clone())?, file, folder.tokenizer, name);
        }
        let mut file = crate::gguf::GgufFile::open(path)?;
        file.hold(mode)?;
        Self::from_file(Arc::new(file), name)
    }

    /// The engine of an open GGUF file (its model and tokenizer), named `name`.
    pub fn from_file(file: Arc<crate::gguf::GgufFile>, name: String) -> Result<Self, ModelError> {
        // The model first: an unknown architecture is the clearer error.
        let model = models::load_file(file.clone())?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        Self::assemble(model, file, tokenizer, name)
    }

    fn assemble(
        model: models::decoder::Model,
        file: Arc<crate::gguf::GgufFile>,
        tokenizer: Tokenizer,
        name: String,
    ) -> Result<Self, ModelError> {
        if tokenizer.vocab_size() != model.config.vocab_size {
            return Err(ModelError::Invalid(format!(
                "tokenizer has {} tokens, the model {}",
                tokenizer.vocab_size(),
                model.config.vocab_size
            )));
        }
        Ok(Self { file: Some(file), name, model, tokenizer }.with_repeat_request())
    }

    /// Prefill `prompt` once with the full cache while recording the prompt scores that every
    /// policy in `configs` needs; [`cache_from_shared`](Self::cache_from_shared) then gives each
    /// policy its own compressed copy, equal to what its own prefill would have made.
    pub fn shared_prefill(
        &self,
        prompt: &[u32],
        configs: &[PolicyConfig],
        steps: usize,
    ) -> Result<SharedPrefill, ModelError> {
        let c = &self.model.config;
        let mut signals: Vec<Signal> = Vec::new();
        for kv in configs {
            let policy = kv.resolve(prompt.len(), steps, c.n_layers, c.n_kv_heads).map_err(ModelError::Policy)?;
            for sig in [policy.signal(), policy.observation_signal()] {
                if sig != Signal::None && !signals.contains(&sig) {
                    signals.push(sig);
                }
            }
        }
        let mut cache = self.new_cache(&PolicyConfig::default(), prompt.len(), steps)?;
        let mut recorder = PromptScores::new(signals, c.n_layers, c.n_kv_heads);
        recorder.query_moments = configs.iter().any(|kv| kv.kind == keyformer_kv::PolicyKind::Expected);
        cache.recorder = Some(recorder);
        let mut logits = Vec::new();
        for chunk in prompt.chunks(crate::backend::Backend::prefill_chunk(&self.model.backend)) {
            logits = self.model.forward(chunk, &mut cache, Logits::Last)?;
        }
        let scores = cache.recorder.take().expect("recorder set above");
        Ok(SharedPrefill { cache, scores, logits, prompt: prompt.to_vec(), repetition: Default::default() })
    }

    /// A copy of a shared prefill compressed by `kv`, and the prompt's last logits.
    pub fn cache_from_shared(
        &self,
        shared: &SharedPrefill,
        kv: &PolicyConfig,
        steps: usize,
    ) -> Result<(KvCache, Vec<f32>), ModelError> {
        let c = &self.model.config;
        let policy = kv.resolve(shared.prompt.len(), steps, c.n_layers, c.n_kv_heads).map_err(ModelError::Policy)?;
        if policy.prompt_chunk().is_some() {
            // Trimmed chunk by chunk, a policy's later chunks see only what it kept of the
            // earlier ones: its cache cannot come from the full cache's prefill.
            let mut cache = self.new_cache(kv, shared.prompt.len(), steps)?;
            let logits = self.prefill(&shared.prompt, &mut cache)?;
            return Ok((cache, logits));
        }
        let signal = policy.signal();
        let observation = policy.observation_signal();
        let mut cache = self.model.new_cache_with(policy, c.context_length);
        cache.layers = shared.cache.layers.clone();
        if cache.policy.wants_query_moments() {
            cache.query_moments = Some(shared.cache.query_moments.clone().ok_or_else(|| {
                ModelError::Input(
                    "the shared prefill did not gather query moments: pass this policy to shared_prefill".into(),
                )
            })?);
        }
        let tova = cache.policy.kind() == keyformer_kv::PolicyKind::Tova;
        for (li, heads) in cache.layers.iter().enumerate() {
            for (h, head) in heads.iter().enumerate() {
                for (slot, _) in head.table.occupied() {
                    cache.policy.on_insert_kv(li, h, slot, &head.key(slot), &head.value(slot));
                }
            }
            if signal == Signal::None {
                continue;
            }
            let recorded = |signal: Signal| {
                shared.scores.signals.iter().position(|s| *s == signal).ok_or_else(|| {
                    ModelError::Input(format!(
                        "the shared prefill did not record {signal:?}: pass this policy to shared_prefill"
                    ))
                })
            };
            if observation != Signal::None {
                let sums = &shared.scores.sums[recorded(observation)?][li * c.n_kv_heads..(li + 1) * c.n_kv_heads];
                for (h, s) in sums.iter().enumerate() {
                    cache.policy.observe_window(li, h, s);
                }
            }
            let k = recorded(signal)?;
            let sums = &shared.scores.sums[k][li * c.n_kv_heads..(li + 1) * c.n_kv_heads];
            if tova {
                // TOVA scores with the layer's sum over all heads (as in the forward pass).
                let mut total = sums[0].clone();
                for s in &sums[1..] {
                    total.iter_mut().zip(s).for_each(|(a, b)| *a += b);
                }
                (0..c.n_kv_heads).for_each(|h| cache.policy.observe(li, h, &total));
            } else {
                for (h, s) in sums.iter().enumerate() {
                    cache.policy.observe(li, h, s);
                }
            }
        }
        if cache.policy.wants_reconstruction() {
            let noise = crate::kvzip::RepetitionNoise::of(&cache.policy.config);
            let known = shared.lock_repetition().iter().find(|(n, _)| *n == noise).map(|(_, s)| s.clone());
            let scores = match known {
                Some(s) => s,
                None => {
                    let s = Arc::new(self.model.repetition_scores(&shared.prompt, &shared.cache, noise.clone())?);
                    shared.lock_repetition().push((noise, s.clone()));
                    s
                }
            };
            scores.apply(&mut cache);
        }
        cache.finish_prompt()?;
        Ok((cache, shared.logits.clone()))
    }
}

/// `-log softmax(logits)[target]`, computed stably in f64.
pub fn negative_log_likelihood(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = max + logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    lse - logits[target as usize] as f64
}

/// The generated tokens' text, decoded a few tokens at a time: decoding the whole answer at
/// every step costs O(n^2) over a long one (a server decodes every running sequence each
/// step). Byte-level BPE text is its tokens' bytes in order, so where the text so far ends on a
/// whole character, the text of the next tokens can be decoded on its own and appended: the
/// result is the full decode's, exactly. So only the tokens since the last such point are
/// decoded each step; while they end in half a character (U+FFFD) the point does not move.
#[derive(Default)]
struct IncrementalText {
    /// The text of every token so far (the pending tail included).
    text: String,
    /// `text[..committed]` is the text of `tokens[..decoded]`, ending on a whole character.
    committed: usize,
    decoded: usize,
}

impl IncrementalText {
    /// The text of `tokens` (the tokens seen before plus new ones).
    fn update(&mut self, tokenizer: &Tokenizer, tokens: &[u32]) -> Result<&str, ModelError> {
        let tail = tokenizer.decode(&tokens[self.decoded..])?;
        self.text.truncate(self.committed);
        self.text.push_str(&tail);
        if !tail.ends_with('\u{FFFD}') {
            self.committed = self.text.len();
            self.decoded = tokens.len();
        }
        Ok(&self.text)
    }
}

/// Streams generated text while holding back what could still turn into a stop string.
struct StopStream {
    stops: Vec<String>,
    emitted: usize,
}

impl StopStream {
    fn new(stops: Vec<String>) -> Self {
        Self { stops, emitted: 0 }
    }

    /// Offer the full text so far; returns true when a stop string has appeared.
    fn push(&mut self, text: &str, out: &mut dyn FnMut(&str)) -> bool {
        if let Some(cut) = self.first_stop(text) {
            self.emit_to(text, cut, out);
            return true;
        }
        // Hold back a trailing partial UTF-8 character (decoded as U+FFFD) ...
        let base = text.trim_end_matches('\u{FFFD}').len();
        // ... and the longest suffix that is the start of a stop string.
        let hold = self
            .stops
            .iter()
            .filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && text[..base].ends_with(&s[..k])))
            .max()
            .unwrap_or(0);
        self.emit_to(text, base - hold, out);
        false
    }

    /// The final text (cut at a stop string) with everything not yet streamed sent.
    fn finish(&mut self, text: &str, out: &mut dyn FnMut(&str)) -> String {
        let end = self.first_stop(text).unwrap_or(text.len());
        self.emit_to(text, end, out);
        text[..end].to_string()
    }

    /// Where the first stop string starts. Searched from the text not yet streamed: whatever
    /// could begin a stop is held back, so none starts earlier (and a long answer is not
    /// scanned whole at every step).
    fn first_stop(&self, text: &str) -> Option<usize> {
        let (from, rest) = match text.get(self.emitted..) {
            Some(rest) => (self.emitted, rest),
            None => (0, text),
        };
        self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| rest.find(s.as_str())).min().map(|i| from + i)
    }

    fn emit_to(&mut self, text: &str, end: usize, out: &mut dyn FnMut(&str)) {
        let mut end = end.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end > self.emitted {
            out(&text[self.emitted..end]);
            self.emitted = end;
        }
    }
}

/// Bytes as people read them: `512 B`, `3.4 KiB`, `12.0 MiB`, `1.50 GiB` (powers of 1024).
pub fn human_bytes(bytes: usize) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit >= 2 && v < 10.0 {
        format!("{v:.2} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        let cases = [(512, "512 B"), (3 << 10, "3.0 KiB"), (12 << 20, "12.0 MiB"), (3 << 29, "1.50 GiB")];
        for (n, want) in cases {
            assert_eq!(human_bytes(n), want);
        }
    }

    #[test]
    fn a_token_logprob_is_its_log_softmax_with_the_top_alternatives() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let r = token_logprob(&logits, 2, 3);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((r.logprob as f64 - (2.0 - z.ln())).abs() < 1e-6);
        // Ties keep the lower id first.
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        assert!(r.top.iter().all(|&(id, lp)| (lp as f64 - (logits[id as usize] as f64 - z.ln())).abs() < 1e-6));
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }

    fn stream(pieces: &[&str], stops: &[&str]) -> (String, Vec<String>, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStream::new(stops.clone());
        let mut chunks = Vec::new();
        let mut text = String::new();
        let mut stopped = false;
        for p in pieces {
            text.push_str(p);
            if s.push(&text, &mut |c| chunks.push(c.to_string())) {
                stopped = true;
                break;
            }
        }
        let fin = s.finish(&text, &mut |c| chunks.push(c.to_string()));
        (fin, chunks, stopped)
    }

    #[test]
    fn stop_strings_cut_the_text_and_are_never_streamed() {
        let (text, chunks, stopped) = stream(&["Hello", " wor", "ld\n\nUser:", " more"], &["\n\nUser:"]);
        assert!(stopped);
        assert_eq!(text, "Hello world");
        assert_eq!(chunks.concat(), "Hello world");
        assert!(chunks.iter().all(|c| !c.contains('\n')));
    }

    #[test]
    fn a_partial_stop_prefix_is_released_when_it_does_not_complete() {
        let (text, chunks, stopped) = stream(&["a\n", "b"], &["\nUser"]);
        assert!(!stopped);
        assert_eq!(text, "a\nb");
        assert_eq!(chunks, vec!["a", "\nb"]);
    }

    #[test]
    fn incremental_text_equals_the_full_decode_after_every_token() {
        // One token per byte: multi-byte characters arrive split over several tokens, and
        // invalid bytes (0xff, a lone continuation byte) never form one.
        let tok = Tokenizer::byte_level(300).unwrap();
        let mut cases: Vec<Vec<u8>> = ["plain ascii", "héllo wörld €uro 😀 end", "日本語のテキスト"]
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect();
        cases.push(vec![b'a', 0xe2, 0x82, b'b', 0xff, 0x80, 0xe2, 0x82, 0xac, b'c']);
        cases.push([0xe2u8; 40].to_vec()); // a long run that stays incomplete
        for bytes in cases {
            let ids: Vec<u32> = bytes.iter().map(|&b| b as u32).collect();
            let mut inc = IncrementalText::default();
            for n in 1..=ids.len() {
                let full = tok.decode(&ids[..n]).unwrap();
                assert_eq!(inc.update(&tok, &ids[..n]).unwrap(), full, "after {n} tokens of {bytes:?}");
            }
        }
    }

    #[test]
    fn nll_of_a_uniform_distribution_is_log_vocab() {
        let v = negative_log_likelihood(&[0.0; 8], 3);
        assert!((v - (8f64).ln()).abs() < 1e-12);
    }
}

#[cfg(feature = "cuda")]
impl Engine<Model<crate::backend::cuda::backend::Cuda>> {
    /// A model file's engine (loaded for the CPU) moved onto the GPU: the weights dequantised
    /// to f16, the tokenizer and metadata kept.
    pub fn from_cpu(cuda: crate::backend::cuda::backend::Cuda, cpu: Engine<Model<Cpu>>) -> Result<Self, ModelError> {
        let model = Model::<crate::backend::cuda::backend::Cuda>::from_cpu(cuda, &cpu.model)?;
        Ok(Engine { file: cpu.file, name: cpu.name, model, tokenizer: cpu.tokenizer })
    }

    /// Random weights at `shape` on the GPU, f16 or of a quantised `weight_type`, with the
    /// byte-level tokenizer of [`Engine::random`] (f16: the same weights as the CPU's random
    /// engine with the same seed).
    pub fn random(
        cuda: crate::backend::cuda::backend::Cuda,
        shape: &models::random::RandomShape,
        seed: u64,
        weight_type: crate::quant::GgmlType,
    ) -> Result<Self, ModelError> {
        let model = Model::<crate::backend::cuda::backend::Cuda>::random(cuda, shape, seed, weight_type)?;
        let tokenizer = crate::tokenizer::Tokenizer::byte_level(model.config.vocab_size)?;
        Ok(Engine { file: None, name: format!("random-{}", shape.name), model, tokenizer }.with_repeat_request())
    }
}

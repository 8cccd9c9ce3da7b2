//! Continuous batching: one thread owns the running sequences, admits queued requests between
//! decode steps while their KV memory fits, and steps every running sequence together.
//!
//! Admission is by KV memory, not by count alone: a request reserves the most its cache can
//! ever hold (the full cache: prompt + max_tokens; a budget: budget + 1 tokens once the prompt
//! is compressed, the whole prompt while it is prefilled), so a smaller budget lets more
//! sequences run in the same `--kv-memory`. Prefills run one at a time on this thread, so
//! only one prompt's transient full-size cache exists at once; it is counted while it lasts.
//! With `--prefix-cache-memory` that part of the memory is set apart for copies of prompt
//! prefixes ([`keyformer::prefix`]), which later prompts start from.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use keyformer::backend::SequenceCache;
use keyformer::engine::{GenerateRequest, Generation};
use keyformer::step_model::StepModel;
use keyformer::{Engine, GenerationOutput};
use tokio::sync::mpsc::UnboundedSender;

use crate::metrics::Metrics;

/// What a request's handler hears about its sequence.
#[derive(Debug)]
pub enum Event {
    /// Text that became final (stop strings and split characters are held back until known).
    Text(String),
    Done(Box<GenerationOutput>),
    /// The sequence failed or timed out; the handler answers with this status.
    Failed {
        status: u16,
        message: String,
    },
}

/// A request waiting for a place.
pub struct Job {
    /// The response's id (`cmpl-7`), for the log line.
    pub id: String,
    pub prompt: Vec<u32>,
    pub req: GenerateRequest,
    /// KV bytes the sequence holds at most once running, and while its prompt is prefilled.
    pub reserve_bytes: usize,
    pub prefill_bytes: usize,
    /// The request's KV settings, resolved when it arrived.
    pub plan: keyformer::models::decoder::KvPlan,
    pub events: UnboundedSender<Event>,
    pub deadline: Instant,
    pub enqueued: Instant,
}

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct Limits {
    /// KV bytes all running sequences may reserve together.
    pub kv_memory: usize,
    /// KV bytes set apart within `kv_memory` for kept prompt prefixes (0: none are kept).
    pub prefix_memory: usize,
    pub max_batch: usize,
    pub max_queue: usize,
}

impl Limits {
    /// What running sequences may reserve: `kv_memory` less the prefixes' part, which is set
    /// apart so that a full batch never pushes the kept prefixes out.
    pub fn sequence_memory(&self) -> usize {
        self.kv_memory.saturating_sub(self.prefix_memory)
    }
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
    #[error("the request needs {needed} bytes of KV cache, more than the {limit} bytes the server's --kv-memory leaves for requests (less --prefix-cache-memory); lower max_tokens or use a KV budget")]
    TooLarge { needed: usize, limit: usize },
    #[error("the server is shutting down")]
    ShuttingDown,
}

struct Queue {
    waiting: VecDeque<Job>,
    shutting_down: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The handle the HTTP side submits to.
#[derive(Clone)]
pub struct Scheduler {
    shared: Arc<Shared>,
    limits: Limits,
    pub metrics: Arc<Metrics>,
}

impl Scheduler {
    /// Start the scheduling thread.
    pub fn start<M: StepModel>(
        engine: Arc<Engine<M>>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { waiting: VecDeque::new(), shutting_down: false }),
            wake: Condvar::new(),
        });
        metrics.set_kv_limit(limits.kv_memory);
        let scheduler = Self { shared: shared.clone(), limits: limits.clone(), metrics: metrics.clone() };
        let thread = std::thread::Builder::new()
            .name("keyformer-scheduler".into())
            .spawn(move || run(&engine, &shared, &limits, &metrics))
            .expect("spawning the scheduler thread");
        (scheduler, thread)
    }

    /// Queue a request, or say at once why it cannot be.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        let needed = job.reserve_bytes.max(job.prefill_bytes);
        let limit = self.limits.sequence_memory();
        if needed > limit {
            return Err(SubmitError::TooLarge { needed, limit });
        }
        let mut q = self.shared.queue.lock().expect("scheduler lock");
        if q.shutting_down {
            return Err(SubmitError::ShuttingDown);
        }
        if q.waiting.len() >= self.limits.max_queue {
            return Err(SubmitError::QueueFull(q.waiting.len()));
        }
        q.waiting.push_back(job);
        self.metrics.set_queue_depth(q.waiting.len());
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stop taking requests; the thread ends once everything accepted has finished.
    pub fn shutdown(&self) {
        self.shared.queue.lock().expect("scheduler lock").shutting_down = true;
        self.shared.wake.notify_one();
    }
}

/// A sequence on the way.
struct Running<M: StepModel> {
    id: String,
    policy: String,
    generation: Generation<M>,
    events: UnboundedSender<Event>,
    reserve_bytes: usize,
    deadline: Instant,
    started: Instant,
    first_token: bool,
    /// The token to run at the next step.
    next: Option<u32>,
}

fn run<M: StepModel>(engine: &Engine<M>, shared: &Shared, limits: &Limits, metrics: &Metrics) {
    let mut running: Vec<Running<M>> = Vec::new();
    let mut reserved = 0usize;
    // Kept prompt prefixes hold at most their own part of the KV memory.
    let mut prefixes = keyformer::prefix::PrefixCache::new(limits.prefix_memory);
    loop {
        // Admit what fits, in arrival order (no overtaking: a large request at the head waits
        // for memory rather than starve).
        let mut admitted = Vec::new();
        {
            let mut q = shared.queue.lock().expect("scheduler lock");
            while let Some(job) = q.waiting.front() {
                let needed = job.reserve_bytes.max(job.prefill_bytes);
                let fits = reserved + needed <= limits.sequence_memory();
                if running.len() + admitted.len() >= limits.max_batch || !fits {
                    break;
                }
                let job = q.waiting.pop_front().expect("front exists");
                reserved += job.reserve_bytes;
                admitted.push(job);
            }
            metrics.set_queue_depth(q.waiting.len());
            if running.is_empty() && admitted.is_empty() {
                if q.shutting_down && q.waiting.is_empty() {
                    return;
                }
                // Nothing to do: sleep until a request (or the shutdown) arrives.
                let _unused = shared.wake.wait_timeout(q, Duration::from_millis(200)).expect("scheduler lock");
                continue;
            }
        }
        for job in admitted {
            metrics.observe_queue_wait(job.enqueued.elapsed());
            if job.events.is_closed() {
                // The client left while it waited.
                reserved -= job.reserve_bytes;
                metrics.cancelled();
                log_end(&job.id, job.prompt.len(), 0, job.enqueued, "cancelled while queued");
                continue;
            }
            // The prompt's full-size cache exists while it is prefilled.
            metrics.set_kv_reserved(reserved + job.prefill_bytes.saturating_sub(job.reserve_bytes));
            let started = engine.start_generation_reusing(&job.prompt, &job.req, job.plan, &mut prefixes);
            metrics.set_prefix_cache(prefixes.stats());
            match started {
                Ok(generation) => running.push(Running {
                    id: job.id,
                    policy: job.req.kv.label(),
                    generation,
                    events: job.events,
                    reserve_bytes: job.reserve_bytes,
                    deadline: job.deadline,
                    started: job.enqueued,
                    first_token: true,
                    next: None,
                }),
                Err(e) => {
                    reserved -= job.reserve_bytes;
                    metrics.failed();
                    log_end(&job.id, job.prompt.len(), 0, job.enqueued, &format!("failed: {e}"));
                    let _ = job.events.send(Event::Failed { status: 400, message: e.to_string() });
                }
            }
        }

        // Each sequence picks its next token (or ends); then one batched step for the rest.
        let now = Instant::now();
        for r in running.iter_mut() {
            r.next = None;
            if r.events.is_closed() {
                metrics.cancelled();
                r.log("cancelled (the client disconnected)");
                continue; // dropped by the sweep below
            }
            if now > r.deadline {
                // Ended like max_tokens: the client gets what was generated.
                r.generation.time_out();
                continue;
            }
            let events = &r.events;
            match r.generation.advance(engine, &mut |text| {
                let _ = events.send(Event::Text(text.to_string()));
            }) {
                Ok(next) => {
                    if r.first_token {
                        metrics.observe_first_token(r.started.elapsed());
                        r.first_token = false;
                    }
                    r.next = next; // None: finished, its output is sent by the sweep below
                }
                Err(e) => r.fail(metrics, 500, &e.to_string()),
            }
        }
        // Sweep the ended sequences (finished, failed, cancelled), freeing their memory.
        let mut i = 0;
        while i < running.len() {
            if running[i].next.is_some() {
                i += 1;
                continue;
            }
            let r = running.swap_remove(i);
            reserved -= r.reserve_bytes;
            if r.generation.stop_reason().is_some() && !r.events.is_closed() {
                let elapsed = r.started.elapsed();
                let (id, policy, started, events) = (r.id, r.policy, r.started, r.events);
                match r.generation.finish(engine, &mut |text| {
                    let _ = events.send(Event::Text(text.to_string()));
                }) {
                    Ok(out) => {
                        metrics.completed(out.prompt_tokens, out.generated_tokens, elapsed);
                        let kv = &out.kv_cache;
                        log_end(
                            &id,
                            out.prompt_tokens,
                            out.generated_tokens,
                            started,
                            &format!(
                                "{}; prefill {:.2} s, decode {:.2} s; KV {policy}: {} held at most",
                                out.stop_reason.describe(),
                                out.prefill_seconds,
                                out.decode_seconds,
                                keyformer::engine::human_bytes(kv.bytes_held_max),
                            ),
                        );
                        let _ = events.send(Event::Done(Box::new(out)));
                    }
                    Err(e) => {
                        metrics.failed();
                        log_end(&id, 0, 0, started, &format!("failed: {e}"));
                        let _ = events.send(Event::Failed { status: 500, message: e.to_string() });
                    }
                }
            }
        }
        metrics.set_kv_reserved(reserved);
        // One batched step; a sequence that cannot take its token (caught before anything
        // changes) ends alone and the step runs again for the others.
        while !running.is_empty() {
            let next: Vec<u32> = running.iter().map(|r| r.next.expect("kept only when it continues")).collect();
            let mut generations: Vec<&mut Generation<M>> = running.iter_mut().map(|r| &mut r.generation).collect();
            match engine.step_generations(&mut generations, &next) {
                Ok(()) => break,
                Err(keyformer::ModelError::InBatch { index, error }) => {
                    let r = running.swap_remove(index);
                    reserved -= r.reserve_bytes;
                    r.fail(metrics, 500, &error.to_string());
                }
                Err(e) => {
                    // A failure inside the pass leaves every cache in it half-stepped.
                    for r in running.drain(..) {
                        reserved -= r.reserve_bytes;
                        r.fail(metrics, 500, &e.to_string());
                    }
                }
            }
        }
        metrics.set_kv_reserved(reserved);
        let held: usize = running.iter().map(|r| r.generation.cache.bytes_held()).sum();
        let full: usize = running.iter().map(|r| r.generation.cache.stats().bytes_full_equivalent).sum();
        metrics.set_running(running.len(), held, full.saturating_sub(held));
    }
}

impl<M: StepModel> Running<M> {
    /// This sequence fails alone: its client hears why and the sweep drops it.
    fn fail(&self, metrics: &Metrics, status: u16, message: &str) {
        metrics.failed();
        self.log(&format!("failed: {message}"));
        let _ = self.events.send(Event::Failed { status, message: message.to_string() });
    }
    fn log(&self, outcome: &str) {
        log_end(&self.id, self.generation.prompt_tokens(), self.generation.generated_tokens(), self.started, outcome);
    }
}

/// The one log line of a request (stderr, as llama.cpp's server logs).
fn log_end(id: &str, prompt: usize, generated: usize, since: Instant, outcome: &str) {
    eprintln!(
        "request {id}: {prompt} prompt tokens, {generated} generated, {:.2} s; {outcome}",
        since.elapsed().as_secs_f64()
    );
}

//! Counters and gauges for `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A request being handled, from its arrival to its last byte (a gauge while it lives).
pub struct InFlight(std::sync::Arc<Metrics>);

impl InFlight {
    pub fn new(metrics: std::sync::Arc<Metrics>) -> Self {
        metrics.in_flight.fetch_add(1, Relaxed);
        Self(metrics)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Everything the server counts. Latencies are summaries (a sum and a count each).
#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    queue_depth: AtomicU64,
    in_flight: AtomicU64,
    running: AtomicU64,
    kv_bytes_held: AtomicU64,
    kv_bytes_saved: AtomicU64,
    kv_bytes_reserved: AtomicU64,
    kv_bytes_limit: AtomicU64,
    prefix_hits: AtomicU64,
    prefix_misses: AtomicU64,
    prefix_tokens_reused: AtomicU64,
    prefix_bytes: AtomicU64,
    request_us: AtomicU64,
    first_token_us: AtomicU64,
    first_token_count: AtomicU64,
    queue_wait_us: AtomicU64,
    queue_wait_count: AtomicU64,
}

impl Metrics {
    pub fn request(&self) {
        self.requests.fetch_add(1, Relaxed);
    }
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }
    pub fn failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Relaxed);
    }
    pub fn completed(&self, prompt_tokens: usize, generated: usize, latency: Duration) {
        self.completed.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        self.generated_tokens.fetch_add(generated as u64, Relaxed);
        self.request_us.fetch_add(latency.as_micros() as u64, Relaxed);
    }
    pub fn observe_first_token(&self, latency: Duration) {
        self.first_token_us.fetch_add(latency.as_micros() as u64, Relaxed);
        self.first_token_count.fetch_add(1, Relaxed);
    }
    pub fn observe_queue_wait(&self, wait: Duration) {
        self.queue_wait_us.fetch_add(wait.as_micros() as u64, Relaxed);
        self.queue_wait_count.fetch_add(1, Relaxed);
    }
    pub fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Relaxed);
    }
    /// After a step: sequences in the batch, KV bytes they hold, and bytes eviction saved them
    /// (what full caches would hold minus what they hold).
    pub fn set_running(&self, n: usize, held: usize, saved: usize) {
        self.running.store(n as u64, Relaxed);
        self.kv_bytes_held.store(held as u64, Relaxed);
        self.kv_bytes_saved.store(saved as u64, Relaxed);
    }
    pub fn set_kv_reserved(&self, bytes: usize) {
        self.kv_bytes_reserved.store(bytes as u64, Relaxed);
    }
    pub fn set_kv_limit(&self, bytes: usize) {
        self.kv_bytes_limit.store(bytes as u64, Relaxed);
    }
    pub fn set_prefix_cache(&self, stats: &keyformer::prefix::PrefixStats) {
        self.prefix_hits.store(stats.hits, Relaxed);
        self.prefix_misses.store(stats.misses, Relaxed);
        self.prefix_tokens_reused.store(stats.tokens_reused, Relaxed);
        self.prefix_bytes.store(stats.bytes_held as u64, Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: f64| {
            let _ = writeln!(
                out,
                "# HELP keyformer_{name} {help}\n# TYPE keyformer_{name} {kind}\nkeyformer_{name} {value}"
            );
        };
        let get = |a: &AtomicU64| a.load(Relaxed) as f64;
        metric("requests_total", "counter", "Generation requests received.", get(&self.requests));
        metric("requests_completed_total", "counter", "Requests answered in full.", get(&self.completed));
        metric(
            "requests_failed_total",
            "counter",
            "Requests that failed or timed out after being queued.",
            get(&self.failed),
        );
        metric(
            "requests_rejected_total",
            "counter",
            "Requests refused before queueing (bad input, queue full, too large).",
            get(&self.rejected),
        );
        metric("requests_cancelled_total", "counter", "Requests whose client disconnected.", get(&self.cancelled));
        metric("prompt_tokens_total", "counter", "Prompt tokens of completed requests.", get(&self.prompt_tokens));
        metric(
            "generated_tokens_total",
            "counter",
            "Tokens generated for completed requests.",
            get(&self.generated_tokens),
        );
        metric("queue_depth", "gauge", "Requests waiting for a place.", get(&self.queue_depth));
        metric(
            "requests_in_flight",
            "gauge",
            "Requests being handled: read, tokenised, queued, running or streaming.",
            get(&self.in_flight),
        );
        metric("requests_running", "gauge", "Sequences admitted and generating.", get(&self.running));
        metric("batch_size", "gauge", "Sequences in the last decode step.", get(&self.running));
        metric("kv_bytes_in_use", "gauge", "KV cache bytes held by running sequences.", get(&self.kv_bytes_held));
        metric(
            "kv_bytes_saved",
            "gauge",
            "KV bytes eviction saves the running sequences (full-cache size minus held).",
            get(&self.kv_bytes_saved),
        );
        metric(
            "kv_bytes_reserved",
            "gauge",
            "KV bytes reserved by admitted sequences (what admission counts).",
            get(&self.kv_bytes_reserved),
        );
        metric("kv_bytes_limit", "gauge", "The --kv-memory admission limit.", get(&self.kv_bytes_limit));
        metric("prefix_cache_hits_total", "counter", "Prompts started from a kept prefix.", get(&self.prefix_hits));
        metric(
            "prefix_cache_misses_total",
            "counter",
            "Prompts that could have started from a kept prefix but found none.",
            get(&self.prefix_misses),
        );
        metric(
            "prefix_cache_tokens_reused_total",
            "counter",
            "Prompt tokens not computed thanks to kept prefixes.",
            get(&self.prefix_tokens_reused),
        );
        metric(
            "prefix_cache_bytes",
            "gauge",
            "KV bytes the kept prefixes hold (counted in admission).",
            get(&self.prefix_bytes),
        );
        let secs = |a: &AtomicU64| a.load(Relaxed) as f64 / 1e6;
        metric(
            "request_seconds_sum",
            "counter",
            "Total latency of completed requests (arrival to last token).",
            secs(&self.request_us),
        );
        metric("request_seconds_count", "counter", "Completed requests in request_seconds_sum.", get(&self.completed));
        metric("first_token_seconds_sum", "counter", "Total time to first token.", secs(&self.first_token_us));
        metric(
            "first_token_seconds_count",
            "counter",
            "Requests in first_token_seconds_sum.",
            get(&self.first_token_count),
        );
        metric(
            "queue_wait_seconds_sum",
            "counter",
            "Total time requests waited in the queue.",
            secs(&self.queue_wait_us),
        );
        metric(
            "queue_wait_seconds_count",
            "counter",
            "Requests in queue_wait_seconds_sum.",
            get(&self.queue_wait_count),
        );
        out
    }
}

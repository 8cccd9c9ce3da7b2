//! `keyformer serve`: an OpenAI-compatible HTTP API over the engine.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (the model's chat template; `stream:
//!   true` gives server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`,
//!   `GET /metrics` (Prometheus text).
//! - Every request may carry `"kv_cache": {"policy", "budget", "recent"}` to override the
//!   server's KV compression; every response's `usage` carries the KV cache's report.
//! - Continuous batching ([`scheduler`]): running sequences step together, new ones join
//!   between steps when their KV reservation fits `--kv-memory`, the rest wait in a bounded
//!   queue (429 when it is full). A client that disconnects frees its sequence at the next step.
//! - Bad input gets a 4xx with OpenAI's error object; the server keeps serving the others.

pub mod api;
pub mod metrics;
pub mod scheduler;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use keyformer::chat::ChatMessage;
use keyformer::step_model::StepModel;
use keyformer::Engine;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use api::{ApiError, Defaults, Prompt};
use metrics::Metrics;
use scheduler::{Event, Job, Limits, Scheduler, SubmitError};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    pub defaults: Defaults,
    pub limits: Limits,
    /// Required as `Authorization: Bearer <key>` on /v1/ when set.
    pub api_key: Option<String>,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// From arrival to the last token.
    pub request_timeout: Duration,
}

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

struct App<M: StepModel> {
    engine: Arc<Engine<M>>,
    /// Bytes of text one token stands for at most (the bound checked before tokenising).
    max_token_bytes: usize,
    scheduler: Scheduler,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    created: u64,
    next_id: std::sync::atomic::AtomicU64,
}

/// Serve until `shutdown` resolves; then stop accepting, finish the requests already accepted,
/// and return. `on_ready` gets the bound address (port 0 picks a free one).
pub async fn serve<M: StepModel>(
    engine: Arc<Engine<M>>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let listener = tokio::net::TcpListener::bind(config.addr)
        .await
        .map_err(|source| ServerError::Bind { addr: config.addr, source })?;
    let metrics = Arc::new(Metrics::default());
    let (scheduler, thread) = Scheduler::start(engine.clone(), config.limits.clone(), metrics.clone());
    let app = Arc::new(App {
        max_token_bytes: engine.tokenizer.max_token_bytes(),
        engine,
        scheduler: scheduler.clone(),
        config,
        metrics,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        next_id: Default::default(),
    });
    let router = Router::new()
        .route("/v1/completions", post(completions::<M>).fallback(method_not_allowed))
        .route("/v1/chat/completions", post(chat_completions::<M>).fallback(method_not_allowed))
        .route("/v1/models", get(models::<M>).fallback(method_not_allowed))
        .route("/health", get(|| async { axum::Json(json!({"status": "ok"})) }).fallback(method_not_allowed))
        .route("/metrics", get(metrics_text::<M>).fallback(method_not_allowed))
        .fallback(|| async { error_response(&ApiError::with_status(404, "no such endpoint", None)) })
        .with_state(app);
    on_ready(listener.local_addr()?);
    let sched = scheduler.clone();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown.await;
            // No new requests; the accepted ones run to their end.
            sched.shutdown();
        })
        .await?;
    scheduler.shutdown();
    tokio::task::spawn_blocking(move || thread.join()).await.ok();
    Ok(())
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    error_response(&ApiError::with_status(405, format!("{method} is not allowed on {}", uri.path()), None))
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

async fn models<M: StepModel>(State(app): State<Arc<App<M>>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return error_response(&e);
    }
    axum::Json(json!({
        "object": "list",
        "data": [{"id": app.config.defaults.model_name, "object": "model", "created": app.created, "owned_by": "keyformer"}],
    }))
    .into_response()
}

async fn metrics_text<M: StepModel>(State(app): State<Arc<App<M>>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render()).into_response()
}

fn authorize<M: StepModel>(app: &App<M>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.config.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if g == key => Ok(()),
        Some(_) => Err(ApiError::with_status(401, "incorrect API key", Some("invalid_api_key"))),
        None => Err(ApiError::with_status(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            Some("invalid_api_key"),
        )),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Completions,
    Chat,
}

async fn completions<M: StepModel>(State(app): State<Arc<App<M>>>, request: Request) -> Response {
    handle(app, request, Endpoint::Completions).await.unwrap_or_else(|e| error_response(&e))
}

async fn chat_completions<M: StepModel>(State(app): State<Arc<App<M>>>, request: Request) -> Response {
    handle(app, request, Endpoint::Chat).await.unwrap_or_else(|e| error_response(&e))
}

async fn handle<M: StepModel>(app: Arc<App<M>>, request: Request, endpoint: Endpoint) -> Result<Response, ApiError> {
    app.metrics.request();
    let in_flight = metrics::InFlight::new(app.metrics.clone());
    let reject = |e: ApiError| {
        app.metrics.rejected();
        eprintln!("request refused: {} {}", e.status, e.message);
        e
    };
    authorize(&app, request.headers()).map_err(reject)?;
    let limit = app.config.max_body_bytes;
    let body = read_body(request.into_body(), limit).await.map_err(reject)?;
    let defaults = &app.config.defaults;
    let parsed = match endpoint {
        Endpoint::Completions => api::parse_completion(&body, defaults),
        Endpoint::Chat => api::parse_chat(&body, defaults),
    }
    .map_err(reject)?;
    drop(body);
    let id = app.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = match endpoint {
        Endpoint::Completions => format!("cmpl-{id}"),
        Endpoint::Chat => format!("chatcmpl-{id}"),
    };
    let (stream, include_usage) = (parsed.stream, parsed.include_usage);
    // Tokenising a long prompt takes a while: off the executor, so /health and the other
    // requests are not held up.
    let job_app = app.clone();
    let job_id = id.clone();
    let (job, rx) = tokio::task::spawn_blocking(move || make_job(&job_app, job_id, parsed))
        .await
        .map_err(|e| ApiError::with_status(500, format!("preparing the request: {e}"), None))?
        .map_err(reject)?;
    let prompt_tokens = job.prompt.len();
    let logprobs = job.req.logprobs.is_some();
    app.scheduler.submit(job).map_err(|e| {
        reject(match e {
            SubmitError::QueueFull(_) => ApiError::with_status(429, e.to_string(), Some("queue_full")),
            SubmitError::TooLarge { .. } => ApiError::bad(e.to_string(), Some("max_tokens")),
            SubmitError::ShuttingDown => ApiError::with_status(503, e.to_string(), None),
        })
    })?;
    let meta = ResponseMeta {
        id,
        created: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        model: defaults.model_name.clone(),
        endpoint,
        prompt_tokens,
    };
    if stream {
        Ok(sse_response(meta, rx, include_usage, in_flight))
    } else {
        whole_response(&app, meta, rx, logprobs).await
    }
}

/// An oversized body is still read (and dropped) up to this many bytes, so that the client,
/// still sending, hears the 413 instead of a broken pipe.
const DRAIN_BYTES: usize = 64 << 20;

/// The request body, at most `limit` bytes: 413 beyond, 400 when it is cut short or badly
/// chunked.
async fn read_body(mut body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    use http_body_util::BodyExt;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad(format!("could not read the request body: {e}"), None))?;
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if seen <= limit {
            bytes.extend_from_slice(&data);
        } else {
            bytes = Vec::new();
            if seen > limit + DRAIN_BYTES {
                break;
            }
        }
    }
    if seen > limit {
        return Err(ApiError::with_status(413, format!("the request body is larger than {limit} bytes"), None));
    }
    Ok(bytes)
}

/// Bound the prompt (by bytes before tokenising, then by tokens), tokenise it, fit max_tokens
/// to the context (and, when the request gave none, to the KV memory), and price the KV
/// reservation.
fn make_job<M: StepModel>(
    app: &App<M>,
    id: String,
    parsed: api::Parsed,
) -> Result<(Job, mpsc::UnboundedReceiver<Event>), ApiError> {
    let engine = &app.engine;
    let ctx = engine.context_length();
    let param = if matches!(parsed.prompt, Prompt::Chat(_)) { "messages" } else { "prompt" };
    let too_long = |message: String| ApiError {
        status: 400,
        message,
        param: Some(param.into()),
        code: Some("context_length_exceeded"),
    };
    let text_bytes = match &parsed.prompt {
        Prompt::Text(t) => t.len(),
        Prompt::Tokens(_) => 0,
        Prompt::Chat(messages) => messages.iter().map(|m| m.content.len() + m.role.len()).sum(),
    };
    if text_bytes > ctx.saturating_mul(app.max_token_bytes) {
        return Err(too_long(format!(
            "the prompt has {text_bytes} bytes, more than the model's context of {ctx} tokens can hold"
        )));
    }
    let mut req = parsed.req;
    let encode = |text: &str| engine.encode(text).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")));
    let tokens = match parsed.prompt {
        Prompt::Text(t) => encode(&t)?,
        Prompt::Tokens(ids) => {
            let vocab = engine.model.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::bad(
                    format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
                    Some("prompt"),
                ));
            }
            ids
        }
        Prompt::Chat(messages) => {
            let messages: Vec<ChatMessage> =
                messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect();
            let text =
                engine.chat_prompt_messages(&messages).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
            encode(&text)?
        }
    };
    match engine.check_prompt(tokens.len()) {
        Ok(()) => {}
        Err(e @ keyformer::ModelError::PromptTooLong { .. }) => return Err(too_long(e.to_string())),
        Err(e) => return Err(ApiError::bad(e.to_string(), Some("prompt"))),
    }
    // Never past the context: the answer ends with finish_reason "length".
    req.max_tokens = req.max_tokens.min(ctx - tokens.len());
    let plan_for = |steps: usize| {
        engine.model.plan_kv(&req.kv, tokens.len(), steps).map_err(|e| ApiError::bad(e.to_string(), Some("kv_cache")))
    };
    // The KV settings resolved once: the admission and the cache read the same plan.
    let mut plan = plan_for(req.max_tokens)?;
    let limit = app.config.limits.sequence_memory();
    let need = |p: &keyformer::models::decoder::KvPlan| p.bytes_steady.max(p.bytes_prefill);
    if !parsed.max_tokens_given && need(&plan) > limit {
        // No max_tokens: as many as the KV memory holds (the most steps whose plan fits).
        let (mut lo, mut hi) = (0usize, req.max_tokens);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if need(&plan_for(mid)?) <= limit {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        if lo > 0 {
            req.max_tokens = lo;
            plan = plan_for(lo)?;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let job = Job {
        id,
        reserve_bytes: plan.bytes_steady,
        prefill_bytes: plan.bytes_prefill,
        plan,
        prompt: tokens,
        req,
        events: tx,
        deadline: now + app.config.request_timeout,
        enqueued: now,
    };
    Ok((job, rx))
}

struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_tokens: usize,
}

impl ResponseMeta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }
    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
    /// A streamed piece of text (or the final, empty piece with its finish reason).
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
        };
        self.envelope(true, json!([choice]))
    }
}

/// Collect the whole answer.
async fn whole_response<M: StepModel>(
    app: &App<M>,
    meta: ResponseMeta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    logprobs: bool,
) -> Result<Response, ApiError> {
    loop {
        match rx.recv().await {
            Some(Event::Text(_)) => {} // the final text comes with Done
            Some(Event::Done(out)) => {
                let finish = api::finish_reason(out.stop_reason);
                let report = match (&out.logprobs, logprobs) {
                    (Some(lp), true) => api::logprobs_json(&app.engine.tokenizer, lp, meta.endpoint == Endpoint::Chat),
                    _ => Value::Null,
                };
                let choice = match meta.endpoint {
                    Endpoint::Completions => {
                        json!({"index": 0, "text": out.text, "finish_reason": finish, "logprobs": report})
                    }
                    Endpoint::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": out.text},
                        "finish_reason": finish,
                        "logprobs": report,
                    }),
                };
                let mut body = meta.envelope(false, json!([choice]));
                body["usage"] = api::usage(meta.prompt_tokens, out.generated_tokens, &out.kv_cache);
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Failed { status, message }) => return Err(ApiError::with_status(status, message, None)),
            None => return Err(ApiError::with_status(500, "the scheduler stopped", None)),
        }
    }
}

/// Server-sent events: a chunk per piece of text, a last chunk with the finish reason (and the
/// usage as its own chunk when asked), then `[DONE]`.
fn sse_response(
    meta: ResponseMeta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    in_flight: metrics::InFlight,
) -> Response {
    // The request stays in flight until its stream is dropped (sent or abandoned).
    let events = sse_events(meta, rx, include_usage).map(move |data| {
        let _held = &in_flight;
        Ok::<_, std::convert::Infallible>(format!("data: {data}\n\n"))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| error_response(&ApiError::with_status(500, "building the stream", None)))
}

fn sse_events(
    meta: ResponseMeta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = String> {
    // State: the receiver, whether the first chunk went out, and what is left to send.
    stream::unfold(
        (rx, meta, true, Vec::<String>::new(), false),
        move |(mut rx, meta, mut first, mut pending, mut ended)| async move {
            loop {
                if let Some(next) = pending.pop() {
                    return Some((next, (rx, meta, first, pending, ended)));
                }
                if ended {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Text(t)) => {
                        let chunk = meta.chunk(Some(&t), None, first).to_string();
                        first = false;
                        return Some((chunk, (rx, meta, first, pending, ended)));
                    }
                    Some(Event::Done(out)) => {
                        // Sent in reverse order of popping.
                        pending.push("[DONE]".into());
                        if include_usage {
                            let mut u = meta.envelope(true, json!([]));
                            u["usage"] = api::usage(meta.prompt_tokens, out.generated_tokens, &out.kv_cache);
                            pending.push(u.to_string());
                        }
                        let text = if first { Some("") } else { None };
                        pending.push(meta.chunk(text, Some(api::finish_reason(out.stop_reason)), first).to_string());
                        ended = true;
                    }
                    Some(Event::Failed { status, message }) => {
                        pending.push("[DONE]".into());
                        pending.push(ApiError::with_status(status, message, None).body().to_string());
                        ended = true;
                    }
                    None => return None,
                }
            }
        },
    )
}

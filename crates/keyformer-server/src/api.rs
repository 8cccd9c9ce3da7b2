//! The OpenAI request bodies we accept, checked into a [`GenerateRequest`], and the response
//! objects we send.

use keyformer::engine::{GenerateRequest, StopReason, TokenLogprob};
use keyformer::keyformer_kv::{Amount, PolicyConfig, PolicyError};
use keyformer::sampling::SamplingParams;
use keyformer::KvReport;
use serde::Deserialize;
use serde_json::{json, Value};

/// A client error: HTTP status, message, and the offending parameter if one.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            status: 400,
            message: keyformer::one_line(&message.into()),
            param: param.map(str::to_string),
            code: None,
        }
    }
    pub fn with_status(status: u16, message: impl Into<String>, code: Option<&'static str>) -> Self {
        Self { status, message: keyformer::one_line(&message.into()), param: None, code }
    }
    /// OpenAI's error object.
    pub fn body(&self) -> Value {
        let kind = match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        };
        json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}})
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion's `prompt`: text, or token ids (as OpenAI's API allows), alone or in a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum CompletionPrompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// `"kv_cache"`: this request's KV compression, overriding the server's defaults.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct KvOverride {
    policy: Option<String>,
    budget: Option<Value>,
    recent: Option<Value>,
    min_budget: Option<usize>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The fields both endpoints share. Unknown fields are ignored, as OpenAI's clients send some;
/// known ones this server cannot honour are refused by name ([`refuse_unsupported`]).
#[derive(Deserialize)]
struct Common {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Extensions that vLLM and llama.cpp's server also take.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<OneOrMany>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    kv_cache: Option<KvOverride>,
    /// Completions: an integer (alternatives per token); chat: a boolean with `top_logprobs`.
    logprobs: Option<Value>,
    top_logprobs: Option<u64>,
    response_format: Option<Value>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    logit_bias: Option<Value>,
    tools: Option<Value>,
    best_of: Option<u64>,
    #[serde(default)]
    echo: bool,
    suffix: Option<String>,
}

/// Most alternatives a request may ask for per token (OpenAI's limit for chat).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// A field the engine cannot honour is refused with a 400 that names it, never ignored.
fn refuse_unsupported(c: &Common) -> Result<(), ApiError> {
    let refuse = |param: &str, why: &str| Err(ApiError::bad(format!("{param}: {why}"), Some(param)));
    match &c.response_format {
        None => {}
        Some(f) if f.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(_) => return refuse("response_format", "only {\"type\": \"text\"} is supported (no JSON mode)"),
    }
    if c.frequency_penalty.is_some_and(|p| p != 0.0) {
        return refuse("frequency_penalty", "not supported; repeat_penalty is (1.0 = off)");
    }
    if c.presence_penalty.is_some_and(|p| p != 0.0) {
        return refuse("presence_penalty", "not supported; repeat_penalty is (1.0 = off)");
    }
    if c.logit_bias.as_ref().is_some_and(|b| !b.is_null() && b.as_object().is_none_or(|o| !o.is_empty())) {
        return refuse("logit_bias", "not supported");
    }
    if c.tools.as_ref().is_some_and(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty())) {
        return refuse("tools", "tool calls are not supported");
    }
    if c.best_of.is_some_and(|b| b != 1) {
        return refuse("best_of", "only 1 is supported");
    }
    if c.echo {
        return refuse("echo", "not supported");
    }
    if c.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return refuse("suffix", "not supported (no fill-in-the-middle)");
    }
    Ok(())
}

/// The alternatives per token a request asks for (`None`: no log-probabilities).
fn logprobs_asked(c: &Common, chat: bool) -> Result<Option<usize>, ApiError> {
    let top = |n: u64, param: &str| match n {
        n if n <= MAX_TOP_LOGPROBS => Ok(n as usize),
        _ => Err(ApiError::bad(format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}"), Some(param))),
    };
    let asked = match (&c.logprobs, chat) {
        (None | Some(Value::Null), _) | (Some(Value::Bool(false)), true) => None,
        (Some(Value::Bool(true)), true) => Some(top(c.top_logprobs.unwrap_or(0), "top_logprobs")?),
        (Some(Value::Number(n)), false) if n.is_u64() => Some(top(n.as_u64().unwrap_or(0), "logprobs")?),
        _ => {
            let want = if chat { "true or false" } else { "an integer" };
            return Err(ApiError::bad(format!("logprobs must be {want}"), Some("logprobs")));
        }
    };
    if asked.is_none() && c.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::bad("top_logprobs needs logprobs: true", Some("top_logprobs")));
    }
    if asked.is_some() && c.stream {
        return Err(ApiError::bad("logprobs are given with stream: false only", Some("logprobs")));
    }
    Ok(asked)
}

#[derive(Deserialize)]
struct CompletionBody {
    prompt: CompletionPrompt,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Vec<Message>,
    #[serde(flatten)]
    common: Common,
}

/// What the request asks for, checked.
pub struct Parsed {
    pub prompt: Prompt,
    pub req: GenerateRequest,
    /// Whether the request set max_tokens (if not, the server picks what fits).
    pub max_tokens_given: bool,
    pub stream: bool,
    pub include_usage: bool,
}

pub enum Prompt {
    Text(String),
    /// Token ids, used as they are (no BOS added).
    Tokens(Vec<u32>),
    Chat(Vec<Message>),
}

/// Defaults the server fills in.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub kv: PolicyConfig,
    pub model_name: String,
    /// `max_tokens` when a request gives none (OpenAI: 16 for completions; chat: up to the
    /// context).
    pub completion_max_tokens: usize,
}

fn parse_json<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the request body is not valid JSON: {e}"), None))?;
    if !value.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object", None));
    }
    serde_json::from_value(value).map_err(|e| ApiError::bad(format!("invalid request: {e}"), None))
}

pub fn parse_completion(body: &[u8], defaults: &Defaults) -> Result<Parsed, ApiError> {
    let b: CompletionBody = parse_json(body)?;
    let one = || ApiError::bad("only one prompt per request is supported", Some("prompt"));
    let prompt = match b.prompt {
        CompletionPrompt::Text(p) => Prompt::Text(p),
        CompletionPrompt::Tokens(ids) => Prompt::Tokens(ids),
        CompletionPrompt::Texts(mut ps) if ps.len() == 1 => Prompt::Text(ps.remove(0)),
        CompletionPrompt::TokenLists(mut ps) if ps.len() == 1 => Prompt::Tokens(ps.remove(0)),
        CompletionPrompt::Texts(_) | CompletionPrompt::TokenLists(_) => return Err(one()),
    };
    common(b.common, prompt, defaults, Some(defaults.completion_max_tokens), false)
}

pub fn parse_chat(body: &[u8], defaults: &Defaults) -> Result<Parsed, ApiError> {
    let b: ChatBody = parse_json(body)?;
    if b.messages.is_empty() {
        return Err(ApiError::bad("messages must not be empty", Some("messages")));
    }
    common(b.common, Prompt::Chat(b.messages), defaults, None, true)
}

fn common(
    c: Common,
    prompt: Prompt,
    defaults: &Defaults,
    default_max: Option<usize>,
    chat: bool,
) -> Result<Parsed, ApiError> {
    refuse_unsupported(&c)?;
    let logprobs = logprobs_asked(&c, chat)?;
    if let Some(model) = &c.model {
        if model != &defaults.model_name {
            return Err(ApiError {
                status: 404,
                message: keyformer::one_line(&format!(
                    "the model '{model}' does not exist; this server runs '{}'",
                    defaults.model_name
                )),
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("n > 1 is not supported: send one request per completion", Some("n")));
    }
    let asked_max = c.max_completion_tokens.or(c.max_tokens);
    let max_tokens = asked_max.map(|m| m.min(usize::MAX as u64) as usize).or(default_max).unwrap_or(usize::MAX);
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1", Some("max_tokens")));
    }
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_p: c.top_p.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0),
        min_p: c.min_p.unwrap_or(0.0),
        repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
        // A request without a seed samples differently each time, as OpenAI's does.
        seed: c.seed.unwrap_or_else(keyformer::sampling::clock_seed),
        ..SamplingParams::default()
    };
    sampling.validate().map_err(|e| ApiError::bad(e, None))?;
    let stop = match c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) if v.len() <= 4 => v,
        Some(OneOrMany::Many(_)) => return Err(ApiError::bad("at most 4 stop sequences", Some("stop"))),
    };
    let mut kv = kv_config(c.kv_cache, &defaults.kv)?;
    // As `keyformer run --seed`: a given seed drives sampling and Keyformer's noise; without
    // one, sampling takes the clock but the noise stays at seed 0, so that temperature 0
    // answers the same every time.
    kv.seed = c.seed.unwrap_or(0);
    Ok(Parsed {
        prompt,
        req: GenerateRequest { max_tokens, sampling, stop, kv, logprobs },
        max_tokens_given: asked_max.is_some(),
        stream: c.stream,
        include_usage: c.stream_options.is_some_and(|o| o.include_usage),
    })
}

fn amount(v: &Value, param: &str) -> Result<Amount, ApiError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => {
            return Err(ApiError::bad(
                format!("{param} must be a token count or a percentage such as \"50%\""),
                Some(param),
            ))
        }
    };
    text.parse().map_err(|e: keyformer::keyformer_kv::PolicyError| ApiError::bad(e.to_string(), Some(param)))
}

fn kv_config(o: Option<KvOverride>, default: &PolicyConfig) -> Result<PolicyConfig, ApiError> {
    let Some(o) = o else { return Ok(default.clone()) };
    let budget = o.budget.as_ref().map(|b| amount(b, "kv_cache.budget")).transpose()?;
    let mut defaults = default.clone();
    if let Some(r) = &o.recent {
        defaults.recent = Some(amount(r, "kv_cache.recent")?);
    }
    if let Some(m) = o.min_budget {
        defaults.min_budget = m;
    }
    // One parser with the command line: the policy may carry settings (keyformer:noise=none),
    // a budget alone means keyformer. Settings that are wrong whatever the prompt are refused
    // here, before it is tokenised; the rest when the request's KV plan meets its prompt.
    let kv = PolicyConfig::from_parts(o.policy.as_deref(), budget, &defaults).map_err(|e| {
        let param = match e {
            PolicyError::ZeroBudget(_) | PolicyError::BadAmount(_) => "kv_cache.budget",
            PolicyError::RecentOverBudget { .. } => "kv_cache.recent",
            PolicyError::UnknownPolicy(_) => "kv_cache.policy",
            PolicyError::Invalid(_) if o.policy.is_some() => "kv_cache.policy",
            PolicyError::Invalid(_) => "kv_cache",
        };
        ApiError::bad(e.to_string(), Some(param))
    })?;
    Ok(kv)
}

pub fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::ContextFull | StopReason::TimedOut | StopReason::Cancelled => "length",
    }
}

/// The `logprobs` object of a choice: chat's `{content: [{token, logprob, bytes,
/// top_logprobs}]}`, or the completions API's parallel lists.
pub fn logprobs_json(tokenizer: &keyformer::tokenizer::Tokenizer, report: &[TokenLogprob], chat: bool) -> Value {
    let text = |id: u32| tokenizer.decode(&[id]).unwrap_or_default();
    if chat {
        let entry = |id: u32, lp: f32| {
            let t = text(id);
            json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
        };
        let content: Vec<Value> = report
            .iter()
            .map(|r| {
                let mut e = entry(r.token, r.logprob);
                e["top_logprobs"] = r.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                e
            })
            .collect();
        return json!({"content": content});
    }
    let tokens: Vec<String> = report.iter().map(|r| text(r.token)).collect();
    let mut offset = 0;
    let offsets: Vec<usize> = tokens
        .iter()
        .map(|t| {
            offset += t.len();
            offset - t.len()
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": report.iter().map(|r| r.logprob).collect::<Vec<_>>(),
        "top_logprobs": report.iter().map(|r| {
            r.top.iter().map(|&(id, lp)| (text(id), json!(lp))).collect::<serde_json::Map<String, Value>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// `usage`, with the KV cache's report as an extension.
pub fn usage(prompt_tokens: usize, completion_tokens: usize, kv: &KvReport) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "kv_cache": kv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyformer::keyformer_kv::PolicyKind;

    fn defaults() -> Defaults {
        Defaults { kv: PolicyConfig::default(), model_name: "m".into(), completion_max_tokens: 16 }
    }

    #[test]
    fn bad_bodies_are_400s_with_the_offending_parameter() {
        let d = defaults();
        let cases: [(&str, Option<&str>); 15] = [
            ("{not json", None),
            ("[1, 2]", None),
            (r#"{"prompt": 5}"#, None),
            (r#"{"prompt": "x", "max_tokens": "many"}"#, None),
            (r#"{"prompt": "x", "n": 2}"#, Some("n")),
            (r#"{"prompt": "x", "max_tokens": 0}"#, Some("max_tokens")),
            (r#"{"prompt": "x", "kv_cache": {"policy": "lru"}}"#, Some("kv_cache.policy")),
            (r#"{"prompt": "x", "kv_cache": {"policy": "keyformer", "budget": 0}}"#, Some("kv_cache.budget")),
            (r#"{"prompt": "x", "kv_cache": {"policy": "h2o"}}"#, Some("kv_cache.policy")),
            (r#"{"prompt": "x", "kv_cache": {"budget": 8, "recent": 9}}"#, Some("kv_cache.recent")),
            (r#"{"prompt": "x", "response_format": {"type": "json_object"}}"#, Some("response_format")),
            (r#"{"prompt": "x", "logprobs": 1, "stream": true}"#, Some("logprobs")),
            (r#"{"prompt": "x", "logprobs": 21}"#, Some("logprobs")),
            (r#"{"prompt": "x", "presence_penalty": 1}"#, Some("presence_penalty")),
            (r#"{"prompt": "x", "top_logprobs": 2}"#, Some("top_logprobs")),
        ];
        for (body, param) in cases {
            let e = parse_completion(body.as_bytes(), &d).err().unwrap_or_else(|| panic!("{body} was accepted"));
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), param, "{body}: {}", e.message);
            assert_eq!(e.body()["error"]["type"], "invalid_request_error");
        }
        // Accepted as OpenAI's clients send them: a text response format, zero penalties.
        let ok = parse_completion(
            br#"{"prompt": "x", "response_format": {"type": "text"}, "frequency_penalty": 0, "logprobs": 2,
                 "top_k": 3, "min_p": 0.1, "repeat_penalty": 1.1}"#,
            &d,
        )
        .unwrap();
        assert_eq!(ok.req.logprobs, Some(2));
        assert_eq!((ok.req.sampling.top_k, ok.req.sampling.min_p, ok.req.sampling.repeat_penalty), (3, 0.1, 1.1));
        let chat =
            parse_chat(br#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 4}"#, &d);
        assert_eq!(chat.unwrap().req.logprobs, Some(4));
        let e = parse_completion(br#"{"prompt": "x", "model": "other"}"#, &d).err().unwrap();
        assert_eq!(e.status, 404);
        assert!(parse_chat(br#"{"messages": []}"#, &d).is_err());
    }

    #[test]
    fn fields_map_onto_the_engine_request() {
        let d = defaults();
        let p = parse_completion(
            br#"{"prompt": ["hi"], "max_tokens": 7, "temperature": 0, "stop": "\n", "seed": 3, "stream": true,
                 "kv_cache": {"policy": "keyformer", "budget": "50%", "recent": 8}, "logprobs": null}"#,
            &d,
        )
        .unwrap();
        assert!(matches!(p.prompt, Prompt::Text(ref t) if t == "hi"));
        assert_eq!((p.req.max_tokens, p.req.sampling.temperature, p.req.sampling.seed), (7, 0.0, 3));
        assert_eq!(p.req.stop, vec!["\n".to_string()]);
        assert_eq!(p.req.kv.kind, PolicyKind::Keyformer);
        assert_eq!((p.req.kv.budget, p.req.kv.recent), (Some(Amount::Percent(50.0)), Some(Amount::Tokens(8))));
        assert!(p.stream);
        // Token-id prompts, as OpenAI's API takes them.
        let ids = |body: &[u8]| match parse_completion(body, &d).map(|p| p.prompt) {
            Ok(Prompt::Tokens(t)) => Ok(t),
            Ok(_) => panic!("not a token prompt"),
            Err(e) => Err(e.status),
        };
        assert_eq!(ids(br#"{"prompt": [5, 0, 7]}"#), Ok(vec![5, 0, 7]));
        assert_eq!(ids(br#"{"prompt": [[9, 8]]}"#), Ok(vec![9, 8]));
        assert_eq!(ids(br#"{"prompt": [[1], [2]]}"#), Err(400));
        assert_eq!(ids(br#"{"prompt": [-1]}"#), Err(400));
        assert_eq!(ids(br#"{"prompt": [1.5]}"#), Err(400));
        // Defaults: 16 tokens for completions, the context for chat; the server's policy.
        assert_eq!(parse_completion(br#"{"prompt": "x"}"#, &d).unwrap().req.max_tokens, 16);
        let chat = parse_chat(br#"{"messages": [{"role": "user", "content": "x"}]}"#, &d).unwrap();
        assert_eq!((chat.req.max_tokens, chat.req.kv.kind), (usize::MAX, PolicyKind::Full));
    }
}

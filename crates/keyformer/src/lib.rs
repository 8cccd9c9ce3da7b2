//! keyformer: an LLM inference engine whose core is KV-cache compression by key-token
//! selection (Adnan et al., "Keyformer", MLSys 2024).
//!
//! Layers, bottom up:
//! - [`gguf`] reads model files; [`quant`] holds the tensor types and their kernels;
//! - [`kv`] stores keys and values in slots (bookkeeping in the `keyformer-kv` crate);
//! - [`backend`] implements the op set; [`models`] writes each architecture once against it;
//! - [`tokenizer`], [`chat`], [`sampling`] and [`engine`] make a model usable;
//! - [`registry`] resolves model aliases such as `smollm2-135m` to cached files.
//!
//! The CLI (crate `keyformer-cli`), the server (`keyformer-server`) and the evaluation and
//! benchmark tooling (`keyformer-eval`) are thin layers over [`engine::Engine`].

pub mod backend;
pub mod chat;
pub mod engine;
pub mod gguf;
pub mod hf;
pub mod kv;
pub mod kvzip;
pub mod models;
pub mod prefix;
pub mod quant;
pub mod registry;
pub mod sampling;
pub mod session;
pub mod step_model;
pub mod tensor_parallel;
pub mod tokenizer;

pub use engine::{Engine, GenerationOutput, KvReport, PerplexityReport};
pub use keyformer_kv;

/// `text` on one line: control characters (a newline in a file's tensor name, in a request's
/// model name) written as escapes, so that an error quoting them stays one line.
pub fn one_line(text: &str) -> String {
    text.chars().flat_map(|c| if c.is_control() { c.escape_default().collect() } else { vec![c] }).collect()
}

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Folder(#[from] hf::HfError),
    #[error("unsupported architecture '{0}' (supported: {supported})", supported = models::config::supported_architectures().join(", "))]
    UnsupportedArchitecture(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("token id {token} is outside the vocabulary ({vocab} tokens)")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("the context is full: {needed} tokens needed, the cache holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
    #[error("the prompt has {prompt} tokens; the model's context is {context} tokens (a prompt must leave room for a generated token)")]
    PromptTooLong { prompt: usize, context: usize },
    #[error("KV cache: {0}")]
    Slots(#[from] keyformer_kv::SlotError),
    #[error("KV policy: {0}")]
    Policy(keyformer_kv::PolicyError),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Input(String),
    #[error("GPU: {0}")]
    Gpu(String),
    /// One sequence of a batched step cannot take its token; nothing was changed, so the
    /// step can run again without it.
    #[error("sequence {index} of the batch: {error}")]
    InBatch { index: usize, error: Box<ModelError> },
}

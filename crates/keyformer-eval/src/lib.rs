//! Tooling over the keyformer engine, kept out of the core library: [`eval`] (the
//! task x policy x budget x seed quality matrix of `keyformer eval`, ROUGE, fidelity, plots)
//! and [`bench`] (llama-bench-style CPU timing of `keyformer bench`). Both use only the
//! engine's public API.

pub mod bench;
pub mod eval;

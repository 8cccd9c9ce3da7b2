//! The CPU backend: [`backend`] implements the op set ([`Cpu`], weights in the GGUF memory
//! map), [`ops`] holds its kernels (quantised matrix products, norms, RoPE, attention over the
//! slot cache), [`vmath`] the vectorised exp / noise / softmax helpers with scalar twins.
//! (The CUDA backend is laid out alike: `cuda/backend.rs` and the kernels in `cuda/mod.rs`.)

mod backend;
pub mod ops;
pub mod vmath;

pub use backend::{Cpu, GgufWeight, PREFILL_CHUNK};
pub use ops::PrefillActivations;

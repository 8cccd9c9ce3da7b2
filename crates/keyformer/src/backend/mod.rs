//! Backends implement the op set the models are written against: the CPU, and (cargo feature
//! `cuda`) an NVIDIA GPU. The CUDA ops exist and are checked against the CPU's
//! (`cuda::check`); the model does not run on them yet, so the trait that names the shared op
//! set is still to be extracted, when the Llama forward pass moves onto it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod pool;
pub mod vmath;

//! Backends implement the op set the models are written against. Today: the CPU.
//! (The CUDA backend of a later issue implements the same ops; the trait that names them is
//! extracted then, when there are two implementations to shape it.)

pub mod cpu;
pub mod pool;
pub mod vmath;

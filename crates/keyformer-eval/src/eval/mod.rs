//! Evaluation: quality measures for comparing a compressed cache with the full one. Today the
//! ROUGE scores and the KL-divergence fidelity of a compressed cache; the `keyformer eval`
//! tasks build on them.

pub mod fidelity;
pub mod plot;
pub mod rouge;
pub mod ruler;
pub mod suite;

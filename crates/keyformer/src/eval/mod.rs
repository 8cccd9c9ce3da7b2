//! Evaluation: quality measures for comparing a compressed cache with the full one. Today the
//! ROUGE scores; the `keyformer eval` tasks build on them.

pub mod rouge;

//! The KV cache's storage on the CPU: for each layer and KV head, a [`SlotTable`] (which slot
//! holds which original position) and the post-RoPE keys and values in slot order.
//!
//! In this version the cache only grows; the slot layout is what lets the eviction policies
//! free a token in place (its slot is reused by the next token, nothing is copied).

use keyformer_kv::{SlotError, SlotTable};

/// Keys and values of one (layer, KV head): `head_dim` floats per slot.
#[derive(Debug, Clone)]
pub struct HeadKv {
    pub table: SlotTable,
    head_dim: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl HeadKv {
    pub fn new(capacity: usize, head_dim: usize) -> Self {
        Self { table: SlotTable::new(capacity), head_dim, keys: Vec::new(), values: Vec::new() }
    }

    /// Store a token's key and value at a free slot; returns the slot.
    pub fn insert(&mut self, position: u32, key: &[f32], value: &[f32]) -> Result<usize, SlotError> {
        let slot = self.table.insert(position)?;
        let end = (slot + 1) * self.head_dim;
        if self.keys.len() < end {
            self.keys.resize(end, 0.0);
            self.values.resize(end, 0.0);
        }
        self.keys[slot * self.head_dim..end].copy_from_slice(key);
        self.values[slot * self.head_dim..end].copy_from_slice(value);
        Ok(slot)
    }

    pub fn key(&self, slot: usize) -> &[f32] {
        &self.keys[slot * self.head_dim..(slot + 1) * self.head_dim]
    }
    pub fn value(&self, slot: usize) -> &[f32] {
        &self.values[slot * self.head_dim..(slot + 1) * self.head_dim]
    }
    /// Bytes of key and value storage allocated.
    pub fn bytes_allocated(&self) -> usize {
        (self.keys.capacity() + self.values.capacity()) * std::mem::size_of::<f32>()
    }
    pub fn clear(&mut self) {
        self.table.clear();
    }
}

/// The KV cache of one sequence: `layers[layer][kv_head]`.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<Vec<HeadKv>>,
}

impl KvCache {
    /// An empty cache able to hold `capacity` tokens per (layer, KV head).
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, capacity: usize) -> Self {
        Self { layers: (0..n_layers).map(|_| (0..n_kv_heads).map(|_| HeadKv::new(capacity, head_dim)).collect()).collect() }
    }
    /// Position the next token takes: one past the last cached position.
    pub fn next_position(&self) -> u32 {
        self.layers[0][0].table.last_position().map_or(0, |p| p + 1)
    }
    /// Tokens held (in layer 0, head 0; equal everywhere while the cache only grows).
    pub fn len(&self) -> usize {
        self.layers[0][0].table.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn capacity(&self) -> usize {
        self.layers[0][0].table.capacity()
    }
    pub fn bytes_allocated(&self) -> usize {
        self.layers.iter().flatten().map(HeadKv::bytes_allocated).sum()
    }
    pub fn clear(&mut self) {
        self.layers.iter_mut().flatten().for_each(HeadKv::clear);
    }
}

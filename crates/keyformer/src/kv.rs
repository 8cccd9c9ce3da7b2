//! The KV cache's storage on the CPU: for each layer and KV head, a [`SlotTable`] (which slot
//! holds which original position) and the post-RoPE keys and values in slot order, driven by
//! the sequence's eviction policy ([`SequencePolicy`]).
//!
//! Capacity per (layer, KV head) is the prompt while it is processed, then budget + 1: each
//! decode step the new token joins, attention runs over budget + 1 entries, and the policy
//! evicts one (its slot is reused by the next token; nothing is copied). After the prompt is
//! compressed, the storage is compacted once so the memory held is the budget's.

use keyformer_kv::{SequencePolicy, Signal, SlotError, SlotTable};

use half::f16;

/// How keys and values are stored. f16 (the default, as in llama.cpp) halves the bytes every
/// decode step reads (attention converts to f32 on the fly) and moves perplexity by ~0.3%;
/// f32 is exact; q8_0 (ggml's block: 32 signed bytes and one f16 scale) reads 34 bytes per 32
/// values, 47% of f16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    F32,
    #[default]
    F16,
    Q8_0,
}

/// Values per q8_0 block.
pub const Q8_0_BLOCK: usize = 32;

impl KvType {
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }
    /// Key and value bytes of one token over `n_layers` x `n_kv_heads` heads: the one formula
    /// the caches, the server's admission and the benches use.
    pub fn token_bytes(self, n_layers: usize, n_kv_heads: usize, head_dim: usize) -> usize {
        n_layers * n_kv_heads * 2 * self.row_bytes(head_dim)
    }
    /// Bytes one key (or value) row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            KvType::F32 => 4 * head_dim,
            KvType::F16 => 2 * head_dim,
            KvType::Q8_0 => head_dim + 2 * head_dim.div_ceil(Q8_0_BLOCK),
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "q8_0" | "q8" => Ok(KvType::Q8_0),
            other => Err(format!("unknown KV cache type '{other}' (f32, f16, q8_0)")),
        }
    }
}

/// One head's keys (or values), slot after slot, `head_dim` values per slot.
#[derive(Debug, Clone)]
pub enum KvRows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Value `i` is `qs[i] * scales[i / 32]`: each row is cut into blocks of 32 values (the
    /// last one shorter when `head_dim` is not a multiple of 32), one scale per block.
    Q8_0 {
        qs: Vec<i8>,
        scales: Vec<f16>,
        head_dim: usize,
    },
}

impl KvRows {
    fn with_capacity(kv_type: KvType, head_dim: usize, n: usize) -> Self {
        match kv_type {
            KvType::F32 => KvRows::F32(Vec::with_capacity(n)),
            KvType::F16 => KvRows::F16(Vec::with_capacity(n)),
            KvType::Q8_0 => KvRows::Q8_0 {
                qs: Vec::with_capacity(n),
                scales: Vec::with_capacity(n / head_dim.max(1) * head_dim.div_ceil(Q8_0_BLOCK)),
                head_dim,
            },
        }
    }
    /// Rows of `head_dim` values stored as `kv_type` (tests and tools).
    pub fn from_f32(kv_type: KvType, head_dim: usize, values: &[f32]) -> Self {
        let mut rows = Self::with_capacity(kv_type, head_dim, values.len());
        rows.grow_to(values.len());
        for (i, row) in values.chunks(head_dim).enumerate() {
            rows.write(i * head_dim, row);
        }
        rows
    }
    fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::F16(v) => v.len(),
            KvRows::Q8_0 { qs, .. } => qs.len(),
        }
    }
    fn grow_to(&mut self, n: usize) {
        match self {
            KvRows::F32(v) => v.resize(n, 0.0),
            KvRows::F16(v) => v.resize(n, f16::ZERO),
            KvRows::Q8_0 { qs, scales, head_dim } => {
                qs.resize(n, 0);
                scales.resize(n / *head_dim * head_dim.div_ceil(Q8_0_BLOCK), f16::ZERO);
            }
        }
    }
    /// Store one row at `at` (a multiple of `head_dim`).
    fn write(&mut self, at: usize, row: &[f32]) {
        match self {
            KvRows::F32(v) => v[at..at + row.len()].copy_from_slice(row),
            KvRows::F16(v) => v[at..at + row.len()].iter_mut().zip(row).for_each(|(d, &x)| *d = f16::from_f32(x)),
            KvRows::Q8_0 { qs, scales, head_dim } => {
                let first_scale = at / *head_dim * head_dim.div_ceil(Q8_0_BLOCK);
                for (b, block) in row.chunks(Q8_0_BLOCK).enumerate() {
                    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                    // The stored (f16) scale is the one the codes are computed against.
                    let d = f16::from_f32(amax / 127.0);
                    let id = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
                    scales[first_scale + b] = d;
                    let out = &mut qs[at + b * Q8_0_BLOCK..at + b * Q8_0_BLOCK + block.len()];
                    out.iter_mut().zip(block).for_each(|(q, &x)| *q = (x * id).round().clamp(-127.0, 127.0) as i8);
                }
            }
        }
    }
    /// The `n` values at `at`, as f32.
    pub fn read(&self, at: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            KvRows::F32(v) => out.copy_from_slice(&v[at..at + n]),
            KvRows::F16(v) => out.iter_mut().zip(&v[at..at + n]).for_each(|(d, x)| *d = x.to_f32()),
            KvRows::Q8_0 { qs, scales, head_dim } => {
                let blocks = head_dim.div_ceil(Q8_0_BLOCK);
                for (i, o) in (at..at + n).zip(out.iter_mut()) {
                    let scale = scales[i / head_dim * blocks + (i % head_dim) / Q8_0_BLOCK];
                    *o = qs[i] as f32 * scale.to_f32();
                }
            }
        }
    }
}

/// Keys and values of one (layer, KV head): `head_dim` values per slot.
#[derive(Debug, Clone)]
pub struct HeadKv {
    pub table: SlotTable,
    head_dim: usize,
    kv_type: KvType,
    keys: KvRows,
    values: KvRows,
}

impl HeadKv {
    pub fn new(capacity: usize, head_dim: usize, kv_type: KvType) -> Self {
        // Reserved, not touched: pages become resident only as slots are written, and the
        // storage never reallocates (no doubling copies, no 2x over-allocation).
        Self {
            table: SlotTable::new(capacity),
            head_dim,
            kv_type,
            keys: KvRows::with_capacity(kv_type, head_dim, capacity * head_dim),
            values: KvRows::with_capacity(kv_type, head_dim, capacity * head_dim),
        }
    }

    /// Store a token's key and value at a free slot; returns the slot.
    pub fn insert(&mut self, position: u32, key: &[f32], value: &[f32]) -> Result<usize, SlotError> {
        let slot = self.table.insert(position)?;
        let end = (slot + 1) * self.head_dim;
        if self.keys.len() < end {
            self.keys.grow_to(end);
            self.values.grow_to(end);
        }
        self.keys.write(slot * self.head_dim, key);
        self.values.write(slot * self.head_dim, value);
        Ok(slot)
    }

    /// A slot's key as stored (after f16/q8_0 rounding), into `out` (`head_dim` values).
    pub fn read_key(&self, slot: usize, out: &mut [f32]) {
        self.keys.read(slot * self.head_dim, out);
    }

    pub fn read_value(&self, slot: usize, out: &mut [f32]) {
        self.values.read(slot * self.head_dim, out);
    }

    /// A slot's key (or value) as f32.
    pub fn key(&self, slot: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.head_dim];
        self.keys.read(slot * self.head_dim, &mut out);
        out
    }
    pub fn value(&self, slot: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.head_dim];
        self.values.read(slot * self.head_dim, &mut out);
        out
    }
    /// Every slot's key, slot after slot (`head_dim` values each; free slots hold stale data).
    pub fn keys(&self) -> &KvRows {
        &self.keys
    }
    pub fn values(&self) -> &KvRows {
        &self.values
    }
    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }
    /// Bytes of keys and values held by occupied slots.
    pub fn bytes_held(&self) -> usize {
        self.table.len() * 2 * self.kv_type.row_bytes(self.head_dim)
    }

    /// Rebuild with only the occupied slots, in position order, and room for `capacity`.
    /// Returns `(old_slot, new_slot)` pairs. (Stored values are re-encoded exactly: an f16
    /// value round-trips through f32.)
    fn compact(&mut self, capacity: usize) -> Vec<(usize, usize)> {
        let mut kept: Vec<(usize, u32)> = self.table.occupied().collect();
        kept.sort_unstable_by_key(|&(_, p)| p);
        let mut fresh = HeadKv::new(capacity.max(kept.len()), self.head_dim, self.kv_type);
        let mut mapping = Vec::with_capacity(kept.len());
        for (old, pos) in kept {
            let new = fresh.insert(pos, &self.key(old), &self.value(old)).expect("compaction fits");
            mapping.push((old, new));
        }
        // The newest token may have been evicted (a recent window of 0): positions still go on
        // from it.
        fresh.table.continue_after(self.table.last_position());
        *self = fresh;
        mapping
    }
}

/// What the cache held over a sequence's life (for `run --json` and the server).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct KvStats {
    /// The most entries any (layer, KV head) held after any step.
    pub tokens_held_max: usize,
    /// The most key + value bytes held (all layers and heads) after any step.
    pub bytes_held_max: usize,
    /// The most key + value bytes held at any moment: a prompt's cache before its trim too
    /// (the whole prompt, or budget + a chunk when it is trimmed chunk by chunk).
    pub bytes_peak: usize,
    /// What the full cache would hold for every token seen.
    pub bytes_full_equivalent: usize,
    /// Entries evicted, over all layers and KV heads.
    pub evictions: usize,
}

/// Prompt scores recorded for other policies during a shared prefill: for each extra signal,
/// the per-slot row sums of every (layer, KV head), indexed `[signal][layer * n_kv + head]`.
#[derive(Debug, Clone, Default)]
pub struct PromptScores {
    pub signals: Vec<Signal>,
    pub sums: Vec<Vec<Vec<f32>>>,
}

impl PromptScores {
    pub fn new(signals: Vec<Signal>, n_layers: usize, n_kv_heads: usize) -> Self {
        let sums = signals.iter().map(|_| vec![Vec::new(); n_layers * n_kv_heads]).collect();
        Self { signals, sums }
    }
}

/// The KV cache of one sequence: `layers[layer][kv_head]` and the policy that trims it.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<Vec<HeadKv>>,
    pub policy: SequencePolicy,
    pub stats: KvStats,
    /// Extra prompt signals to record (shared prefill); `None` in ordinary use.
    pub recorder: Option<PromptScores>,
    /// Per layer: the sliding window it attends over (`None`: a global layer). A sliding
    /// layer holds only its window, whatever the policy: a token older than the window is
    /// never seen again, so dropping it changes nothing; the policy trims the global layers.
    pub windows: Vec<Option<usize>>,
    head_dim: usize,
    tokens_seen: usize,
}

impl KvCache {
    /// An empty cache; `context` bounds the slots when the policy keeps everything.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        kv_type: KvType,
        policy: SequencePolicy,
        context: usize,
    ) -> Self {
        let capacity = policy.capacity(context);
        Self {
            layers: (0..n_layers)
                .map(|_| (0..n_kv_heads).map(|_| HeadKv::new(capacity, head_dim, kv_type)).collect())
                .collect(),
            policy,
            stats: KvStats::default(),
            recorder: None,
            windows: vec![None; n_layers],
            head_dim,
            tokens_seen: 0,
        }
    }

    /// The cache with sliding-window layers (`windows[layer]`; see [`KvCache::windows`]).
    pub fn with_windows(mut self, windows: Vec<Option<usize>>) -> Self {
        assert_eq!(windows.len(), self.layers.len(), "one window per layer");
        self.windows = windows;
        self
    }

    /// The layer whose slots bound the sequence: the first global one (a sliding layer holds
    /// less).
    fn reference_layer(&self) -> usize {
        self.windows.iter().position(Option::is_none).unwrap_or(0)
    }
    /// Position the next token takes: one past the last cached position.
    pub fn next_position(&self) -> u32 {
        self.layers[0][0].table.last_position().map_or(0, |p| p + 1)
    }
    /// Tokens held by head 0 of the first global layer.
    pub fn len(&self) -> usize {
        self.layers[self.reference_layer()][0].table.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Slots per KV head of the first global layer.
    pub fn capacity(&self) -> usize {
        self.layers[self.reference_layer()][0].table.capacity()
    }
    /// Key and value bytes held now, over all layers and heads.
    pub fn bytes_held(&self) -> usize {
        self.layers.iter().flatten().map(HeadKv::bytes_held).sum()
    }

    /// Evict from every KV head of `layer` down to the budget (a decode step's trim); a
    /// sliding layer drops what fell out of its window instead.
    pub fn evict_to_budget(&mut self, layer: usize) -> Result<(), SlotError> {
        if self.windows[layer].is_some() {
            return self.evict_outside_window(layer);
        }
        if self.policy.prompt_done() && !self.policy.evicts_while_decoding() {
            return Ok(());
        }
        for (h, head) in self.layers[layer].iter_mut().enumerate() {
            let budget = self.policy.head_budget(layer, h);
            for slot in self.policy.victims(layer, h, &head.table, budget) {
                head.table.evict(slot)?;
                self.policy.on_evict(layer, h, slot);
                self.stats.evictions += 1;
            }
        }
        Ok(())
    }

    /// In a sliding layer, drop the tokens the next query (at `newest + 1`, which sees
    /// positions from `newest + 2 - window` on) no longer sees.
    pub fn evict_outside_window(&mut self, layer: usize) -> Result<(), SlotError> {
        let Some(window) = self.windows[layer] else { return Ok(()) };
        for (h, head) in self.layers[layer].iter_mut().enumerate() {
            let Some(newest) = head.table.last_position() else { continue };
            let Some(oldest_kept) = (newest as usize + 2).checked_sub(window) else { continue };
            let gone: Vec<usize> =
                head.table.occupied().filter(|&(_, p)| (p as usize) < oldest_kept).map(|(slot, _)| slot).collect();
            for slot in gone {
                head.table.evict(slot)?;
                self.policy.on_evict(layer, h, slot);
                self.stats.evictions += 1;
            }
        }
        Ok(())
    }

    /// KeyDiff-style weights when the policy wants them: each held key of a global `layer`
    /// against its head's mean key.
    fn weigh_keys(&mut self, layer: usize) {
        if self.windows[layer].is_some() || !self.policy.wants_mean_keys() {
            return;
        }
        for h in 0..self.layers[layer].len() {
            let head = &self.layers[layer][h];
            let keys: Vec<(usize, Vec<f32>)> = head.table.occupied().map(|(s, _)| (s, head.key(s))).collect();
            let mut mean = vec![0f32; self.head_dim];
            for (_, k) in &keys {
                mean.iter_mut().zip(k).for_each(|(m, x)| *m += x);
            }
            self.policy.set_mean_key(layer, h, &mean);
            for (slot, k) in &keys {
                self.policy.weigh_key(layer, h, *slot, k);
            }
        }
    }

    /// A prompt chunk has gone through and more follows (the prompt is compressed as it goes,
    /// [`SequencePolicy::prompt_chunk`]): trim every global layer to its budget (a sliding
    /// layer already holds only its window) and let the policy score the next chunk, which ends
    /// at prompt position `next_end`. Freed slots take the next chunk's tokens.
    pub fn trim_prompt_chunk(&mut self, next_end: usize) -> Result<(), SlotError> {
        self.record_peak();
        for layer in 0..self.layers.len() {
            if self.windows[layer].is_none() {
                self.policy.fold_observation(layer);
                self.weigh_keys(layer);
                self.evict_to_budget(layer)?;
            }
        }
        self.policy.start_prompt_chunk(next_end);
        self.end_step();
        Ok(())
    }

    /// A cache whose prompt has been processed (and perhaps decoded after) takes `extra` more
    /// prompt tokens, then `steps` decode steps: the policy scores them as a prompt and trims at
    /// their end ([`SequencePolicy::reopen_prompt`]); each head's storage grows to what it
    /// holds plus the new tokens (a chunk at a time when trimmed chunk by chunk).
    pub fn reopen_prompt(&mut self, extra: usize, steps: usize) {
        let next = self.next_position() as usize;
        self.policy.reopen_prompt(next, next + extra, steps);
        let arriving = self.policy.config.prefill_chunk.map_or(extra, |c| c.min(extra));
        for layer in 0..self.layers.len() {
            for h in 0..self.layers[layer].len() {
                let head = &self.layers[layer][h];
                let needed = match self.windows[layer] {
                    // A sliding layer: its window and the tokens arriving before it slides.
                    Some(window) => window.saturating_add(arriving.max(steps)).saturating_add(1),
                    None => head.table.len().saturating_add(arriving).saturating_add(steps.max(1)),
                };
                if head.table.capacity() < needed {
                    let mapping = self.layers[layer][h].compact(needed);
                    self.policy.remap(layer, h, &mapping);
                }
            }
        }
    }

    /// This cache, kept at a prompt position, starts another sequence's prompt of `prompt_len`
    /// tokens and `steps` steps under the same policy ([`SequencePolicy::resume_prompt`]);
    /// storage grows (in position order, as a full cache holds it) when that sequence needs
    /// more slots.
    pub fn resume_prompt(&mut self, prompt_len: usize, steps: usize, context: usize) {
        let at = self.next_position() as usize;
        self.policy.resume_prompt(at, prompt_len, steps);
        let capacity = self.policy.capacity(context);
        for layer in 0..self.layers.len() {
            for h in 0..self.layers[layer].len() {
                if self.layers[layer][h].table.capacity() < capacity {
                    let mapping = self.layers[layer][h].compact(capacity);
                    self.policy.remap(layer, h, &mapping);
                }
            }
        }
    }

    /// The prompt has been processed: trim every head to the budget (sliding layers to their
    /// window), compact the storage to budget + 1 (window + 1) slots, and start decoding.
    pub fn finish_prompt(&mut self) -> Result<(), SlotError> {
        self.record_peak();
        for layer in 0..self.layers.len() {
            if self.windows[layer].is_none() {
                self.policy.fold_observation(layer);
            }
            self.weigh_keys(layer);
            if self.windows[layer].is_none() {
                let tables: Vec<&SlotTable> = self.layers[layer].iter().map(|h| &h.table).collect();
                self.policy.plan_adaptive(layer, &tables);
            }
            self.evict_to_budget(layer)?;
            let capacity = match self.windows[layer] {
                // Room for the window however short the prompt was (decode fills it up), but
                // no more than the sequence will ever hold.
                Some(window) => {
                    let lifetime = self.policy.prompt_len.saturating_add(self.policy.steps);
                    window.min(lifetime).saturating_add(1)
                }
                None if self.policy.budget != usize::MAX => usize::MAX, // per head, below
                None => continue,
            };
            for h in 0..self.layers[layer].len() {
                let capacity = match capacity {
                    // Each head's own budget + 1 (they differ with pyramid or adaptive budgets).
                    usize::MAX => {
                        let room = self.policy.decode_room();
                        self.policy
                            .head_budget(layer, h)
                            .saturating_add(room)
                            .min(self.layers[layer][h].table.capacity())
                    }
                    c => c,
                };
                let mapping = self.layers[layer][h].compact(capacity);
                self.policy.remap(layer, h, &mapping);
            }
        }
        let tables: Vec<&SlotTable> = self.layers.iter().flatten().map(|h| &h.table).collect();
        self.policy.finish_prompt(&tables);
        self.end_step();
        Ok(())
    }

    /// What is held now counts towards the peak.
    fn record_peak(&mut self) {
        self.stats.bytes_peak = self.stats.bytes_peak.max(self.bytes_held());
    }

    /// Book-keeping after a step (the prompt's compression or one decode step).
    pub fn end_step(&mut self) {
        self.record_peak();
        self.tokens_seen = self.tokens_seen.max(self.next_position() as usize);
        let held = self.layers.iter().flatten().map(|h| h.table.len()).max().unwrap_or(0);
        self.stats.tokens_held_max = self.stats.tokens_held_max.max(held);
        self.stats.bytes_held_max = self.stats.bytes_held_max.max(self.bytes_held());
        let per_token = self.layers[0][0].kv_type().token_bytes(self.layers.len(), self.layers[0].len(), self.head_dim);
        self.stats.bytes_full_equivalent = self.tokens_seen * per_token;
    }
}

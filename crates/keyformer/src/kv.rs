//! The KV cache's storage on the CPU: for each layer and KV head, a [`SlotTable`] (which slot
//! holds which original position) and the post-RoPE keys and values in slot order, driven by
//! the sequence's eviction policy ([`SequencePolicy`]).
//!
//! Capacity per (layer, KV head) is the prompt while it is processed, then budget + 1: each
//! decode step the new token joins, attention runs over budget + 1 entries, and the policy
//! evicts one (its slot is reused by the next token; nothing is copied). After the prompt is
//! compressed, the storage is compacted once so the memory held is the budget's.

use keyformer_kv::expected::{mean_rotation, rotate, rotate_covariance, QueryModel};
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
    /// Gather the prompt's query moments too (into the cache's `query_moments`), for
    /// expected attention.
    pub query_moments: bool,
}

impl PromptScores {
    pub fn new(signals: Vec<Signal>, n_layers: usize, n_kv_heads: usize) -> Self {
        let sums = signals.iter().map(|_| vec![Vec::new(); n_layers * n_kv_heads]).collect();
        Self { signals, sums, query_moments: false }
    }
}

/// The first prompt positions whose queries the moments leave out: the first tokens' queries
/// are outliers (attention sinks), as kvpress's expected attention leaves out its 4 sinks.
pub const MOMENT_SINKS: u32 = 4;
/// Positions after the prompt whose rotations expected attention averages (kvpress's default).
pub const FUTURE_POSITIONS: usize = 512;

/// The rotary embedding and logit scale of a layer, as the model of its queries needs them.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryRope {
    pub inv_freq: Vec<f32>,
    /// Rotated pairs are adjacent dimensions (else the two halves of the rotated part).
    pub adjacent: bool,
    pub mscale: f32,
    /// The attention's logit scale.
    pub scale: f32,
}

/// The prompt's queries of every layer (before rotary), summed per query head: a count, the
/// sums and the sums of outer products, in f64 so that the covariance of a long prompt does
/// not lose its small part to cancellation. Expected attention's input.
#[derive(Debug, Clone, Default)]
pub struct QueryMoments {
    layers: Vec<Option<LayerQueries>>,
}

#[derive(Debug, Clone)]
struct LayerQueries {
    n_heads: usize,
    head_dim: usize,
    count: f64,
    sums: Vec<f64>,
    /// Per head, the upper triangle's sums of `q_i q_j` (row-major, full square for simplicity).
    products: Vec<f64>,
    rope: QueryRope,
}

impl QueryMoments {
    /// Add `rows` (each `n_heads * head_dim` query values at `positions`) of `layer`.
    pub fn add(
        &mut self,
        layer: usize,
        rows: &[f32],
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        rope: &QueryRope,
    ) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let l = self.layers[layer].get_or_insert_with(|| LayerQueries {
            n_heads,
            head_dim,
            count: 0.0,
            sums: vec![0.0; n_heads * head_dim],
            products: vec![0.0; n_heads * head_dim * head_dim],
            rope: rope.clone(),
        });
        let d = head_dim;
        for (row, &pos) in rows.chunks_exact(n_heads * d).zip(positions) {
            if pos < MOMENT_SINKS {
                continue;
            }
            l.count += 1.0;
            for h in 0..n_heads {
                let q = &row[h * d..(h + 1) * d];
                let sums = &mut l.sums[h * d..(h + 1) * d];
                sums.iter_mut().zip(q).for_each(|(s, &x)| *s += x as f64);
                let products = &mut l.products[h * d * d..(h + 1) * d * d];
                for i in 0..d {
                    let qi = q[i] as f64;
                    // The upper triangle only; the model mirrors it.
                    for (p, &qj) in products[i * d + i..(i + 1) * d].iter_mut().zip(&q[i..]) {
                        *p += qi * qj as f64;
                    }
                }
            }
        }
    }

    /// The queries to come of query heads `heads` of `layer`, after a prompt whose next
    /// position is `next`: each head's mean and covariance rotated by the mean rotation of the
    /// [`FUTURE_POSITIONS`] positions from `next` on. `None` before any query was counted.
    pub fn model(&self, layer: usize, heads: std::ops::Range<usize>, next: usize) -> Option<QueryModel> {
        let l = self.layers.get(layer)?.as_ref()?;
        if l.count == 0.0 || heads.end > l.n_heads {
            return None;
        }
        let d = l.head_dim;
        let rot = mean_rotation(&l.rope.inv_freq, l.rope.mscale, next, FUTURE_POSITIONS);
        let (mut means, mut covs) = (Vec::new(), Vec::new());
        for h in heads {
            let mean: Vec<f64> = l.sums[h * d..(h + 1) * d].iter().map(|s| s / l.count).collect();
            let products = &l.products[h * d * d..(h + 1) * d * d];
            let mut cov = vec![0f32; d * d];
            for i in 0..d {
                for j in i..d {
                    let c = (products[i * d + j] / l.count - mean[i] * mean[j]) as f32;
                    cov[i * d + j] = c;
                    cov[j * d + i] = c;
                }
            }
            let mut mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
            rotate(&mut mean, &rot, l.rope.adjacent);
            rotate_covariance(&mut cov, d, &rot, l.rope.adjacent);
            means.push(mean);
            covs.push(cov);
        }
        Some(QueryModel::new(d, means, covs, l.rope.scale))
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
    /// The prompt's queries, gathered while the policy (or a shared prefill's recorder) needs
    /// them for expected attention; `None` otherwise.
    pub query_moments: Option<QueryMoments>,
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
        let query_moments = policy.wants_query_moments().then(QueryMoments::default);
        Self {
            layers: (0..n_layers)
                .map(|_| (0..n_kv_heads).map(|_| HeadKv::new(capacity, head_dim, kv_type)).collect())
                .collect(),
            policy,
            stats: KvStats::default(),
            recorder: None,
            windows: vec![None; n_layers],
            query_moments,
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

    /// Whether the forward pass must add the prompt's queries to [`KvCache::query_moments`]:
    /// the policy models the queries to come, or a shared prefill records them for one that does.
    pub fn gathers_query_moments(&self) -> bool {
        self.policy.wants_query_moments() || self.recorder.as_ref().is_some_and(|r| r.query_moments)
    }

    /// Expected attention's scores when the policy wants them: each KV head of a global `layer`
    /// gets the model of its query heads' queries to come, and its held tokens their scores.
    fn model_queries(&mut self, layer: usize) {
        if self.windows[layer].is_some() || !self.policy.wants_query_moments() {
            return;
        }
        let Some(moments) = &self.query_moments else { return };
        let Some(n_heads) = moments.layers.get(layer).and_then(|l| l.as_ref()).map(|l| l.n_heads) else { return };
        let n_kv = self.layers[layer].len();
        let group = n_heads / n_kv.max(1);
        let next = self.next_position() as usize;
        // Pinned sinks stay whatever their score: left out of the softmax, as kvpress leaves
        // its sinks out.
        let pinned = self.policy.pinned();
        for h in 0..n_kv {
            let Some(model) = moments.model(layer, h * group..(h + 1) * group, next) else { return };
            let head = &self.layers[layer][h];
            let held: Vec<(usize, u32, Vec<f32>, f32)> = head
                .table
                .occupied()
                .filter(|&(_, p)| p as u64 >= pinned)
                .map(|(slot, p)| (slot, p, head.key(slot), head.value(slot).iter().map(|v| v * v).sum::<f32>().sqrt()))
                .collect();
            let held: Vec<(usize, u32, &[f32], f32)> =
                held.iter().map(|(s, p, k, v)| (*s, *p, k.as_slice(), *v)).collect();
            self.policy.set_query_model(layer, h, h * group, model, &held);
        }
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
                self.model_queries(layer);
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

    /// Room for `extra` more tokens in every head without trimming (a copy that reads more
    /// tokens through the model, as KVzip's repetition does): storage grows where it must,
    /// slots keep position order.
    pub fn grow_for(&mut self, extra: usize) {
        for layer in 0..self.layers.len() {
            for h in 0..self.layers[layer].len() {
                let needed = self.layers[layer][h].table.len().saturating_add(extra);
                if self.layers[layer][h].table.capacity() < needed {
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
            self.model_queries(layer);
        }
        // A budget for the whole model is spread before any layer is trimmed.
        let budgeted: Vec<(usize, usize, &SlotTable)> = (0..self.layers.len())
            .filter(|&layer| self.windows[layer].is_none())
            .flat_map(|layer| self.layers[layer].iter().enumerate().map(move |(h, head)| (layer, h, &head.table)))
            .collect();
        self.policy.plan_global(&budgeted);
        for layer in 0..self.layers.len() {
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
                    // Each head's own budget + 1 (they differ with pyramid, adaptive or global
                    // budgets). A head given more than the uniform share (up to its whole
                    // prompt) grows past the storage the prompt was allotted, but never past
                    // what the sequence will ever hold.
                    usize::MAX => {
                        let room = self.policy.decode_room();
                        let lifetime = self.policy.prompt_len.saturating_add(self.policy.steps);
                        let allotted = self.layers[layer][h].table.capacity();
                        self.policy.head_budget(layer, h).saturating_add(room).min(lifetime.max(allotted))
                    }
                    c => c,
                };
                let mapping = self.layers[layer][h].compact(capacity);
                self.policy.remap(layer, h, &mapping);
            }
        }
        // The query models are made: their moments (up to tens of MB) go.
        self.query_moments = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The model's moments against a direct two-pass mean and covariance (rotation by a zero
    /// frequency is the identity): the first [`MOMENT_SINKS`] positions are left out, heads
    /// and layers stay apart, and chunks add up.
    #[test]
    fn query_moments_give_the_mean_and_covariance_of_the_counted_queries() {
        let (n_heads, d) = (2, 3);
        let rows: Vec<f32> = (0..10 * n_heads * d).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.1).collect();
        let positions: Vec<u32> = (0..10).collect();
        let rope = QueryRope { inv_freq: vec![0.0], adjacent: false, mscale: 1.0, scale: 0.5 };
        let mut m = QueryMoments::default();
        // Two chunks of the same prompt.
        m.add(1, &rows[..6 * n_heads * d], n_heads, d, &positions[..6], &rope);
        m.add(1, &rows[6 * n_heads * d..], n_heads, d, &positions[6..], &rope);
        assert!(m.model(0, 0..1, 10).is_none(), "layer 0 saw no query");
        let model = m.model(1, 1..2, 10).unwrap();
        let head = |t: usize| &rows[(t * n_heads + 1) * d..(t * n_heads + 2) * d];
        let counted: Vec<usize> = (MOMENT_SINKS as usize..10).collect();
        let n = counted.len() as f32;
        let mean: Vec<f32> = (0..d).map(|i| counted.iter().map(|&t| head(t)[i]).sum::<f32>() / n).collect();
        let cov = |i: usize, j: usize| {
            counted.iter().map(|&t| (head(t)[i] - mean[i]) * (head(t)[j] - mean[j])).sum::<f32>() / n
        };
        // The model's logit of a key is scale m.k + scale^2 k^T C k / 2: probe m and C with unit keys.
        let unit = |i: usize| (0..d).map(|j| if i == j { 1.0 } else { 0.0 }).collect::<Vec<f32>>();
        for i in 0..d {
            let want = 0.5 * mean[i] + 0.125 * cov(i, i);
            assert!((model.logit(0, &unit(i)) - want).abs() < 1e-5, "dimension {i}");
        }
        let both: Vec<f32> = (0..d).map(|j| if j < 2 { 1.0 } else { 0.0 }).collect();
        let want = 0.5 * (mean[0] + mean[1]) + 0.125 * (cov(0, 0) + cov(1, 1) + 2.0 * cov(0, 1));
        assert!((model.logit(0, &both) - want).abs() < 1e-5, "the off-diagonal term");
    }
}

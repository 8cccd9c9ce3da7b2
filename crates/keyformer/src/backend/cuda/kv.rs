//! One sequence's KV cache on the GPU. The policy ([`SequencePolicy`]: budget, recent window,
//! Keyformer's temperature schedule) stays on the host, as on the CPU; keys and values (f16),
//! slot positions and score rows live on the GPU, one set per layer, `[n_kv_heads][capacity]`.
//!
//! While the prompt is processed slots fill in position order. At its end the host reads the
//! scores once, lets the CPU policy choose what each KV head keeps (`SequencePolicy::victims`,
//! the same code the CPU cache runs) and the kept slots are gathered into budget + 1 slots.
//! Where heads keep budgets of their own (`adaptive`, `layers=global`: the budgets spread by
//! score at the prompt's end, as on the CPU), each global layer's heads are packed one after
//! another, head h in budget(h) + 1 slots, so the storage holds the total budget, not the
//! largest head's budget times the heads.
//! Each decode step the new token goes to the slot the previous step's victim freed, attention
//! adds its scores, and its combination pass picks the next victim on the GPU, so no score or
//! slot index crosses to the host while decoding.
//!
//! Sliding-window layers (Gemma 2/3) hold only their window, whatever the policy, as on the
//! CPU: they keep the whole prompt until its end (the prefill attention masks by the window),
//! then its last `window - 1` tokens, and each step drops the oldest; their own cursor plans
//! them. The policy's budget applies to the global layers.

use cudarc::driver::CudaSlice;
use keyformer_kv::{NoiseKind, PolicyKind, SequencePolicy, Signal, SlotCursor, SlotTable};

use super::{dev_addr, AttnRow, Gpu, GpuError, ScoreSignal, FREE_SLOT};
use crate::backend::SequenceCache;
use crate::kv::KvStats;
use crate::ModelError;

/// One layer's storage.
pub struct LayerKv {
    pub keys: CudaSlice<u16>,
    pub values: CudaSlice<u16>,
    pub positions: CudaSlice<u32>,
    /// `None` when the policy has no score (full, window, sink).
    pub scores: Option<CudaSlice<f32>>,
    /// Per KV head, the slot the next token takes once the cache evicts (counted from the
    /// head's first slot).
    pub victims: CudaSlice<u32>,
    /// Per KV head (first slot, slots) where the heads are packed with budgets of their own;
    /// empty where every head has the same slots (head h from h * capacity).
    pub head_slots: Vec<(u32, u32)>,
    /// `head_slots` on the device (the kernels' `AttnRow::heads`).
    head_slots_dev: Option<CudaSlice<i32>>,
}

impl LayerKv {
    pub(crate) fn new(
        gpu: &Gpu,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        scored: bool,
    ) -> Result<Self, GpuError> {
        Ok(Self {
            keys: gpu.zeros(n_kv_heads * capacity * head_dim)?,
            values: gpu.zeros(n_kv_heads * capacity * head_dim)?,
            positions: gpu.upload(&vec![FREE_SLOT; n_kv_heads * capacity])?,
            scores: if scored { Some(gpu.zeros(n_kv_heads * capacity)?) } else { None },
            victims: gpu.upload(&vec![FREE_SLOT; n_kv_heads])?,
            head_slots: Vec::new(),
            head_slots_dev: None,
        })
    }

    /// Storage for heads packed one after another, head h in `slots[h]` slots; each head's
    /// next token goes to its last slot (free until then).
    fn packed(gpu: &Gpu, head_dim: usize, slots: &[usize], scored: bool) -> Result<Self, GpuError> {
        let total: usize = slots.iter().sum();
        let mut head_slots = Vec::with_capacity(slots.len());
        let mut first = 0usize;
        for &n in slots {
            head_slots.push((first as u32, n as u32));
            first += n;
        }
        let flat: Vec<i32> = head_slots.iter().flat_map(|&(f, n)| [f as i32, n as i32]).collect();
        let last_slots: Vec<u32> = slots.iter().map(|&n| n.saturating_sub(1) as u32).collect();
        Ok(Self {
            keys: gpu.zeros(total * head_dim)?,
            values: gpu.zeros(total * head_dim)?,
            positions: gpu.upload(&vec![FREE_SLOT; total])?,
            scores: if scored { Some(gpu.zeros(total)?) } else { None },
            victims: gpu.upload(&last_slots)?,
            head_slots_dev: Some(gpu.upload(&flat)?),
            head_slots,
        })
    }

    /// Slots of each KV head in the storage, as (first slot, slots).
    fn head_ranges(&self, n_kv_heads: usize, capacity: usize) -> Vec<(usize, usize)> {
        match self.head_slots.is_empty() {
            true => (0..n_kv_heads).map(|h| (h * capacity, capacity)).collect(),
            false => self.head_slots.iter().map(|&(f, n)| (f as usize, n as usize)).collect(),
        }
    }

    /// The most slots any one KV head has (`capacity` unless packed).
    fn widest_head(&self, capacity: usize) -> usize {
        self.head_slots.iter().map(|&(_, n)| n as usize).max().unwrap_or(capacity)
    }
}

/// The KV cache of one sequence on the GPU.
pub struct GpuKvCache {
    pub policy: SequencePolicy,
    pub layers: Vec<LayerKv>,
    n_kv_heads: usize,
    head_dim: usize,
    /// Tokens held, slots in use, the next token's slot and position in the global layers
    /// (plain Rust, tested against the CPU policy in keyformer-kv).
    cursor: SlotCursor,
    /// Per layer, its sliding window (`None`: global).
    windows: Vec<Option<usize>>,
    /// The sliding layers' window and cursor (one window size per model).
    sliding: Option<(usize, SlotCursor)>,
    stats: KvStats,
}

/// Policies whose decode-time eviction the GPU runs.
pub const GPU_POLICIES: [PolicyKind; 6] =
    [PolicyKind::Full, PolicyKind::Window, PolicyKind::Sink, PolicyKind::H2o, PolicyKind::Keyformer, PolicyKind::Kvzip];

impl GpuKvCache {
    /// An empty cache for `policy`; `context` bounds it when the policy keeps everything.
    pub fn new(
        gpu: &Gpu,
        windows: Vec<Option<usize>>,
        n_kv_heads: usize,
        head_dim: usize,
        policy: SequencePolicy,
        context: usize,
    ) -> Result<Self, ModelError> {
        let mut sizes: Vec<usize> = windows.iter().flatten().copied().collect();
        sizes.sort_unstable();
        sizes.dedup();
        if sizes.len() > 1 {
            return Err(ModelError::Input(format!(
                "sliding-window layers of different windows ({sizes:?}) do not run on the CUDA backend yet: use the CPU"
            )));
        }
        let kind = policy.kind();
        let k = &policy.config.keyformer;
        let c = &policy.config;
        let composed = c.accumulate != keyformer_kv::Accumulate::Sum
            || c.value_weighted
            || c.grow
            || c.key_diversity
            || c.observe.is_some()
            || c.noisy_scores
            || c.layer_budgets == keyformer_kv::policy::LayerBudgets::Pyramid;
        if composed {
            return Err(ModelError::Input(
                "the settings accumulate=mean, value, layers=pyramid, grow, keydiff, observe= and gumbel do not run on \
                 the CUDA backend yet: use the CPU"
                    .into(),
            ));
        }
        if !GPU_POLICIES.contains(&kind)
            || (kind == PolicyKind::Keyformer && (k.frozen || k.noise != NoiseKind::Gumbel))
        {
            return Err(ModelError::Input(format!(
                "KV policy '{}'{} does not run on the CUDA backend yet (it runs full, window, sink, h2o, kvzip and \
                 keyformer with Gumbel noise)",
                kind.name(),
                if kind == PolicyKind::Keyformer { " with these keyformer options" } else { "" }
            )));
        }
        let capacity = policy.capacity(context);
        let scored = matches!(kind, PolicyKind::H2o | PolicyKind::Keyformer | PolicyKind::Kvzip);
        let layers = windows
            .iter()
            .map(|w| LayerKv::new(gpu, n_kv_heads, head_dim, capacity, scored && w.is_none()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(gpu_error)?;
        let sliding = sizes.first().map(|&w| (w, SlotCursor::new(capacity)));
        Ok(Self {
            policy,
            layers,
            n_kv_heads,
            head_dim,
            cursor: SlotCursor::new(capacity),
            windows,
            sliding,
            stats: KvStats::default(),
        })
    }

    /// The cursor of `layer`'s slots, and its window when it slides.
    fn layer_cursor(&self, layer: usize) -> (&SlotCursor, Option<usize>) {
        match (&self.sliding, self.windows[layer]) {
            (Some((w, cursor)), Some(_)) => (cursor, Some(*w)),
            _ => (&self.cursor, None),
        }
    }

    /// What the kernels compute for the scores of `layer` now (a sliding layer has none).
    pub(crate) fn layer_signal(&self, layer: usize) -> Option<ScoreSignal> {
        if self.windows[layer].is_some() {
            return None;
        }
        self.score_signal()
    }

    /// What the kernels compute for the scores now.
    fn score_signal(&self) -> Option<ScoreSignal> {
        match self.policy.signal() {
            Signal::None => None,
            Signal::Attention { .. } => Some(ScoreSignal::Attention),
            Signal::Noisy { tau, seed, .. } => Some(ScoreSignal::Keyformer { tau, seed }),
            // With noise it is refused when the cache is made.
            Signal::Reconstruction { from_position, first, end, sinks, .. } => {
                Some(ScoreSignal::Reconstruction { from_position, first, end, sinks })
            }
        }
    }

    /// Where a prompt chunk of `n` tokens goes: its first slot and first position (slots fill
    /// in position order while the prompt is processed).
    pub(crate) fn prompt_slots(&self, n: usize) -> Result<(usize, u32), ModelError> {
        if self.policy.prompt_done() {
            return Err(ModelError::Input("the prompt of this sequence was already processed".into()));
        }
        self.cursor.prompt_chunk(n).map_err(full)
    }

    /// The attention row of this sequence's next decode step at `layer`; `addrs` are the device
    /// addresses of its query, key, value and output rows.
    pub(crate) fn decode_row(&self, gpu: &Gpu, layer: usize, addrs: [u64; 4]) -> Result<AttnRow, ModelError> {
        if !self.policy.prompt_done() {
            return Err(ModelError::Input("a decode step before the prompt was finished".into()));
        }
        let (cursor, window) = self.layer_cursor(layer);
        let plan = match window {
            Some(w) => cursor.plan_window_step(w),
            None => cursor.plan_step(&self.policy),
        }
        .map_err(full)?;
        let capacity = cursor.capacity;
        let [q, k, v, out] = addrs;
        let l = &self.layers[layer];
        let scores = l.scores.as_ref().map_or(0, |s| dev_addr(gpu, s));
        let mut row = AttnRow {
            q,
            k,
            v,
            out,
            keys: dev_addr(gpu, &l.keys),
            values: dev_addr(gpu, &l.values),
            slot_pos: dev_addr(gpu, &l.positions),
            victims: dev_addr(gpu, &l.victims),
            capacity: capacity as i32,
            query_pos: cursor.next_position,
            ..AttnRow::default()
        }
        .with_signal(self.layer_signal(layer), scores, capacity);
        // Eviction ranks by the scores even when a policy no longer adds to them.
        row.scores = scores;
        row.store_slot = plan.store_slot.map_or(-1, |s| s as i32);
        row.width = plan.width as i32;
        if let Some(e) = plan.evict {
            row.evict = 1;
            row.first_recent = e.first_recent;
            row.sinks = e.sinks;
        }
        if let Some(heads) = &l.head_slots_dev {
            // Packed heads, each at its own budget since the prompt's end: every step's token
            // takes the slot its head's last victim freed (at first, the head's free last slot)
            // and each head evicts one.
            if plan.evict.is_none() {
                return Err(ModelError::Gpu("packed KV heads below their budgets".into()));
            }
            row.heads = dev_addr(gpu, heads);
            row.store_slot = -1;
            row.width = l.widest_head(capacity) as i32;
            row.capacity = row.width;
        }
        Ok(row)
    }

    /// Book-keeping after a forward pass of `n` tokens through every layer.
    pub(crate) fn advance(&mut self, n: usize) -> Result<(), ModelError> {
        let n_sliding = self.windows.iter().filter(|w| w.is_some()).count();
        if self.policy.prompt_done() {
            let plan = self.cursor.plan_step(&self.policy).map_err(full)?;
            self.cursor.step_done(&plan);
            if plan.evict.is_some() {
                self.stats.evictions += (self.layers.len() - n_sliding) * self.n_kv_heads;
            }
            if let Some((w, cursor)) = &mut self.sliding {
                let plan = cursor.plan_window_step(*w).map_err(full)?;
                cursor.step_done(&plan);
                if plan.evict.is_some() {
                    self.stats.evictions += n_sliding * self.n_kv_heads;
                }
            }
            self.record();
        } else {
            self.cursor.prompt_done(n);
            if let Some((_, cursor)) = &mut self.sliding {
                cursor.prompt_done(n);
            }
        }
        Ok(())
    }

    /// Book-keeping of what the cache held, after its prompt's compression and each step (as
    /// the CPU cache counts it).
    fn record(&mut self) {
        let widest = self.layers.iter().flat_map(|l| l.head_slots.iter().map(|&(_, n)| n as usize - 1)).max();
        self.stats.tokens_held_max = self.stats.tokens_held_max.max(widest.unwrap_or(self.cursor.len));
        self.stats.bytes_held_max = self.stats.bytes_held_max.max(self.bytes_held());
        self.stats.bytes_peak = self.stats.bytes_peak.max(self.stats.bytes_held_max);
        self.stats.bytes_full_equivalent = self.cursor.next_position as usize * self.bytes_per_token();
    }

    /// Key and value bytes of one token over all layers and KV heads (f16).
    fn bytes_per_token(&self) -> usize {
        crate::kv::KvType::F16.token_bytes(self.layers.len(), self.n_kv_heads, self.head_dim)
    }

    /// Tokens held summed over every (layer, KV head): a packed head holds its budget (its
    /// last slot is free between steps), the others what their layer's cursor says.
    fn head_tokens(&self) -> usize {
        (0..self.layers.len())
            .map(|l| match self.layers[l].head_slots.as_slice() {
                [] => self.layer_cursor(l).0.len * self.n_kv_heads,
                packed => packed.iter().map(|&(_, n)| n as usize - 1).sum(),
            })
            .sum()
    }

    /// The prompt has been processed: every KV head of a global layer keeps what the CPU policy
    /// keeps from the GPU's scores (its storage shrinks to budget + 1 slots, per head when the
    /// heads' budgets differ), every sliding layer its last `window - 1` tokens (window slots),
    /// and decoding starts.
    pub fn finish_prompt(&mut self, gpu: &Gpu) -> Result<(), ModelError> {
        // The whole prompt is held until it is trimmed.
        self.stats.bytes_peak = self.stats.bytes_peak.max(self.bytes_held());
        let budget = self.policy.budget;
        let (hd, n_kv) = (self.head_dim, self.n_kv_heads);
        let trim_global = budget < self.cursor.len && self.windows.iter().any(Option::is_none);
        let window_keep = self.sliding.as_ref().map(|(w, _)| SlotCursor::window_kept(*w));
        let trim_sliding = match (&self.sliding, window_keep) {
            (Some((_, cursor)), Some(keep)) => keep < cursor.len,
            _ => false,
        };
        if trim_global || trim_sliding {
            let global_kept = if trim_global { self.select_kept(gpu)? } else { Vec::new() };
            let global_layers: Vec<usize> = (0..self.layers.len()).filter(|&l| self.windows[l].is_none()).collect();
            // Heads whose budgets differ (spread by score) are packed, each in its own budget + 1.
            let packed = trim_global
                && global_layers.iter().any(|&l| (0..n_kv).any(|h| self.policy.head_budget(l, h) != budget));
            let held_before = self.cursor.len;
            let mut global_kept = global_kept.into_iter();
            let mut global_evicted = 0usize;
            // Every compact layer is allocated before any prompt-sized one is freed: freeing them
            // one by one let the next layer's smaller buffers be carved from the freed ones, and
            // the device pool fragmented until a batch of long prompts ran out of memory.
            let mut compact = Vec::with_capacity(self.layers.len());
            let old_cap = self.cursor.capacity;
            for (li, layer) in self.layers.iter().enumerate() {
                let kept: Vec<Vec<u32>> = match (self.windows[li], window_keep) {
                    (Some(_), Some(keep)) if trim_sliding => {
                        // The prompt filled the slots in position order: its last `keep` tokens.
                        let len = self.sliding.as_ref().map_or(0, |(_, c)| c.len) as u32;
                        vec![(len - keep as u32..len).collect(); n_kv]
                    }
                    (None, _) if trim_global => {
                        let kept = global_kept
                            .next()
                            .ok_or_else(|| ModelError::Gpu("a layer without its selection".into()))?;
                        global_evicted += kept.iter().map(|k| held_before - k.len()).sum::<usize>();
                        kept
                    }
                    _ => {
                        compact.push(None);
                        continue;
                    }
                };
                // One more slot per head: the next token's.
                let slots: Vec<usize> = kept.iter().map(|k| k.len() + 1).collect();
                let scored = layer.scores.is_some();
                let fresh = match packed && self.windows[li].is_none() {
                    true => LayerKv::packed(gpu, hd, &slots, scored),
                    false => LayerKv::new(gpu, n_kv, hd, slots[0], scored),
                };
                let mut fresh = fresh.map_err(gpu_error)?;
                let ranges = fresh.head_ranges(n_kv, slots[0]);
                let (mut from, mut to) = (Vec::new(), Vec::new());
                for (h, head_kept) in kept.iter().enumerate() {
                    from.extend(head_kept.iter().map(|&slot| (h * old_cap) as u32 + slot));
                    to.extend((0..head_kept.len()).map(|i| (ranges[h].0 + i) as u32));
                }
                gpu.gather_slots(layer, &mut fresh, &from, &to, hd).map_err(gpu_error)?;
                compact.push(Some(fresh));
            }
            for (layer, fresh) in self.layers.iter_mut().zip(compact) {
                if let Some(fresh) = fresh {
                    *layer = fresh;
                }
            }
            gpu.release_free_memory().map_err(gpu_error)?;
            let n_sliding = self.windows.iter().filter(|w| w.is_some()).count();
            if trim_global {
                self.stats.evictions += global_evicted;
                // Packed heads are each at their own budget: the cursor plans as for a cache at
                // the uniform share (every step evicts), the rows take each head's slots.
                self.cursor.compacted(budget, budget + 1);
            }
            if let (true, Some((_, cursor)), Some(keep)) = (trim_sliding, &mut self.sliding, window_keep) {
                self.stats.evictions += (cursor.len - keep) * n_sliding * n_kv;
                cursor.compacted(keep, keep + 1);
            }
        }
        self.policy.finish_prompt(&[]);
        self.record();
        Ok(())
    }

    /// What each KV head of each global layer keeps of the prompt (per layer, per head, its
    /// slots in position order), chosen by the CPU policy's own code from the GPU's scores: the
    /// budgets spread by score first (`layers=global`, `adaptive`), then each head's victims.
    fn select_kept(&mut self, gpu: &Gpu) -> Result<Vec<Vec<Vec<u32>>>, ModelError> {
        let (n_kv, old_cap, width) = (self.n_kv_heads, self.cursor.capacity, self.cursor.width);
        let mut tables: Vec<(usize, usize, SlotTable)> = Vec::new();
        for (li, layer) in self.layers.iter().enumerate().filter(|(li, _)| self.windows[*li].is_none()) {
            let positions = gpu.download(&layer.positions).map_err(gpu_error)?;
            let scores = layer.scores.as_ref().map(|s| gpu.download(s)).transpose().map_err(gpu_error)?;
            for h in 0..n_kv {
                let mut table = SlotTable::new(old_cap);
                for &p in &positions[h * old_cap..h * old_cap + width] {
                    table.insert(p)?;
                }
                if let Some(s) = &scores {
                    self.policy.observe(li, h, &s[h * old_cap..h * old_cap + width]);
                }
                tables.push((li, h, table));
            }
        }
        // A budget for the whole model is spread before any head is trimmed, as on the CPU.
        let heads: Vec<(usize, usize, &SlotTable)> = tables.iter().map(|(l, h, t)| (*l, *h, t)).collect();
        self.policy.plan_global(&heads);
        for layer in heads.chunks(n_kv) {
            let layer_tables: Vec<&SlotTable> = layer.iter().map(|&(_, _, t)| t).collect();
            self.policy.plan_adaptive(layer[0].0, &layer_tables);
        }
        // Layers in parallel, as a prompt's heads are thousands of selections.
        let n_global = tables.len() / n_kv.max(1);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(n_global.max(1));
        let per_thread = n_global.div_ceil(threads).max(1) * n_kv;
        let policy = &self.policy;
        let kept = std::thread::scope(|scope| {
            let tasks: Vec<_> = tables
                .chunks(per_thread.max(1))
                .map(|part| {
                    scope.spawn(move || -> Result<Vec<Vec<u32>>, ModelError> {
                        part.iter()
                            .map(|(li, h, table)| {
                                let budget = policy.head_budget(*li, *h);
                                let mut evicted = vec![false; width];
                                for slot in policy.victims(*li, *h, table, budget) {
                                    evicted[slot] = true;
                                }
                                let mut keep: Vec<(u32, u32)> = table
                                    .occupied()
                                    .filter(|&(slot, _)| !evicted[slot])
                                    .map(|(slot, p)| (p, slot as u32))
                                    .collect();
                                keep.sort_unstable();
                                if keep.len() != budget {
                                    return Err(ModelError::Gpu(format!(
                                        "KV head {h} of layer {li} kept {} tokens, budget {budget}",
                                        keep.len()
                                    )));
                                }
                                Ok(keep.iter().map(|&(_, s)| s).collect())
                            })
                            .collect()
                    })
                })
                .collect();
            let mut all = Vec::new();
            for task in tasks {
                all.extend(task.join().map_err(|_| ModelError::Gpu("selection thread panicked".into()))??);
            }
            Ok::<_, ModelError>(all)
        })?;
        // The scores live on the GPU from here on.
        self.policy.forget_scores();
        Ok(kept.chunks(n_kv).map(<[Vec<u32>]>::to_vec).collect())
    }

    /// A copy of this cache while its prompt is processed, under `policy` (a repetition's
    /// scorer), with room for `lifetime` tokens: the repetition is read through it, so this
    /// cache never holds the repetition.
    pub(crate) fn repetition_copy(
        &self,
        gpu: &Gpu,
        policy: SequencePolicy,
        lifetime: usize,
    ) -> Result<Self, ModelError> {
        let mut copy = Self::new(gpu, self.windows.clone(), self.n_kv_heads, self.head_dim, policy, lifetime)?;
        let (old_cap, new_cap, width) = (self.cursor.capacity, copy.cursor.capacity, self.cursor.width);
        if self.policy.prompt_done() || new_cap < width {
            return Err(ModelError::Gpu(format!("a repetition copy of {width} slots into {new_cap}")));
        }
        // Every layer filled its slots in position order while the prompt was read.
        let (mut from, mut to) = (Vec::new(), Vec::new());
        for g in 0..self.n_kv_heads {
            from.extend((0..width).map(|s| (g * old_cap + s) as u32));
            to.extend((0..width).map(|s| (g * new_cap + s) as u32));
        }
        if !from.is_empty() {
            for (src, dst) in self.layers.iter().zip(copy.layers.iter_mut()) {
                gpu.gather_slots(src, dst, &from, &to, self.head_dim).map_err(gpu_error)?;
            }
        }
        copy.cursor = SlotCursor { capacity: new_cap, ..self.cursor };
        if let (Some((_, mine)), Some((_, theirs))) = (&self.sliding, &mut copy.sliding) {
            *theirs = SlotCursor { capacity: new_cap, ..*mine };
        }
        Ok(copy)
    }

    /// Per (layer, KV head) of the global layers, the largest score of each position in
    /// `start..start + row length` seen so far: `rows[layer * n_kv_heads + head]`.
    pub(crate) fn max_scores_into(&self, gpu: &Gpu, start: u32, rows: &mut [Vec<f32>]) -> Result<(), ModelError> {
        let n_kv = self.n_kv_heads;
        for (li, layer) in self.layers.iter().enumerate().filter(|(li, _)| self.windows[*li].is_none()) {
            let Some(scores) = &layer.scores else { continue };
            let (positions, scores) = (gpu.download(&layer.positions), gpu.download(scores));
            let (positions, scores) = (positions.map_err(gpu_error)?, scores.map_err(gpu_error)?);
            let cap = positions.len() / n_kv;
            for g in 0..n_kv {
                let row = &mut rows[li * n_kv + g];
                for s in 0..cap {
                    let at = positions[g * cap + s].wrapping_sub(start) as usize;
                    if let Some(b) = row.get_mut(at) {
                        *b = b.max(scores[g * cap + s]);
                    }
                }
            }
        }
        Ok(())
    }

    /// Set the scores of the prompt's positions `start..` in the global layers to `rows`
    /// (as [`max_scores_into`](Self::max_scores_into) lays them out), before its end trims it.
    pub(crate) fn set_prompt_scores(&mut self, gpu: &Gpu, start: u32, rows: &[Vec<f32>]) -> Result<(), ModelError> {
        let n_kv = self.n_kv_heads;
        for (li, layer) in self.layers.iter_mut().enumerate().filter(|(li, _)| self.windows[*li].is_none()) {
            let Some(scores) = layer.scores.as_mut() else {
                return Err(ModelError::Gpu("prompt scores for a cache that keeps none".into()));
            };
            let positions = gpu.download(&layer.positions).map_err(gpu_error)?;
            let cap = positions.len() / n_kv;
            let mut host = vec![0f32; positions.len()];
            for g in 0..n_kv {
                for s in 0..cap {
                    let at = positions[g * cap + s].wrapping_sub(start) as usize;
                    host[g * cap + s] = rows[li * n_kv + g].get(at).copied().unwrap_or(0.0);
                }
            }
            gpu.upload_into(&host, scores).map_err(gpu_error)?;
        }
        Ok(())
    }

    /// The positions each KV head of `layer` holds, sorted (tests and tools).
    pub fn held_positions(&self, gpu: &Gpu, layer: usize) -> Result<Vec<Vec<u32>>, ModelError> {
        let all = gpu.download(&self.layers[layer].positions).map_err(gpu_error)?;
        let ranges = self.layers[layer].head_ranges(self.n_kv_heads, self.layer_cursor(layer).0.capacity);
        Ok(ranges
            .into_iter()
            .map(|(first, n)| &all[first..first + n])
            .map(|head| {
                let mut p: Vec<u32> = head.iter().copied().filter(|&p| p != FREE_SLOT).collect();
                p.sort_unstable();
                p
            })
            .collect())
    }

    /// Slots the storage has per KV head, the most over the layers and heads.
    pub fn capacity_now(&self) -> usize {
        let packed = self.layers.iter().map(|l| l.widest_head(0)).max().unwrap_or(0);
        let cursors = self.sliding.as_ref().map_or(self.cursor.capacity, |(_, c)| c.capacity.max(self.cursor.capacity));
        cursors.max(packed)
    }

    /// Slots allocated for `layer` over its KV heads (held tokens plus each head's free slot
    /// once the prompt is compressed).
    pub fn allocated_slots(&self, layer: usize) -> usize {
        self.layers[layer].positions.len()
    }

    /// Slots the storage of `layer` has per KV head.
    pub fn layer_capacity(&self, layer: usize) -> usize {
        self.layer_cursor(layer).0.capacity
    }
}

impl SequenceCache for GpuKvCache {
    fn next_position(&self) -> u32 {
        self.cursor.next_position
    }
    fn len(&self) -> usize {
        self.cursor.len
    }
    fn capacity(&self) -> usize {
        // A cache at its budget takes one more token per step (the victim's slot).
        if self.cursor.reuse_victim {
            self.cursor.capacity.max(self.cursor.len + 1)
        } else {
            self.cursor.capacity
        }
    }
    fn policy(&self) -> &SequencePolicy {
        &self.policy
    }
    fn bytes_held(&self) -> usize {
        self.head_tokens() * self.bytes_per_token() / (self.layers.len() * self.n_kv_heads).max(1)
    }
    fn stats(&self) -> KvStats {
        self.stats.clone()
    }
}

pub(crate) fn gpu_error(e: GpuError) -> ModelError {
    ModelError::Gpu(e.to_string())
}

fn full(e: keyformer_kv::CursorFull) -> ModelError {
    ModelError::ContextFull { needed: e.needed, capacity: e.capacity }
}

//! One sequence's KV cache on the GPU. The policy ([`SequencePolicy`]: budget, recent window,
//! Keyformer's temperature schedule) stays on the host, as on the CPU; keys and values (f16),
//! slot positions and score rows live on the GPU, one set per layer, `[n_kv_heads][capacity]`.
//!
//! While the prompt is processed slots fill in position order. At its end the host reads the
//! scores once, lets the CPU policy choose what each KV head keeps (`SequencePolicy::victims`,
//! the same code the CPU cache runs) and the kept slots are gathered into budget + 1 slots.
//! Each decode step the new token goes to the slot the previous step's victim freed, attention
//! adds its scores, and the GPU picks the next victim (`choose_victims`), so no score or slot
//! index crosses to the host while decoding.

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
    /// Per KV head, the slot the next token takes once the cache evicts.
    pub victims: CudaSlice<u32>,
}

impl LayerKv {
    fn new(gpu: &Gpu, n_kv_heads: usize, head_dim: usize, capacity: usize, scored: bool) -> Result<Self, GpuError> {
        Ok(Self {
            keys: gpu.zeros(n_kv_heads * capacity * head_dim)?,
            values: gpu.zeros(n_kv_heads * capacity * head_dim)?,
            positions: gpu.upload(&vec![FREE_SLOT; n_kv_heads * capacity])?,
            scores: if scored { Some(gpu.zeros(n_kv_heads * capacity)?) } else { None },
            victims: gpu.upload(&vec![FREE_SLOT; n_kv_heads])?,
        })
    }
}

/// The KV cache of one sequence on the GPU.
pub struct GpuKvCache {
    pub policy: SequencePolicy,
    pub layers: Vec<LayerKv>,
    n_kv_heads: usize,
    head_dim: usize,
    /// Tokens held, slots in use, the next token's slot and position (plain Rust, tested
    /// against the CPU policy in keyformer-kv).
    cursor: SlotCursor,
    stats: KvStats,
}

/// Policies whose decode-time eviction the GPU runs.
pub const GPU_POLICIES: [PolicyKind; 5] =
    [PolicyKind::Full, PolicyKind::Window, PolicyKind::Sink, PolicyKind::H2o, PolicyKind::Keyformer];

impl GpuKvCache {
    /// An empty cache for `policy`; `context` bounds it when the policy keeps everything.
    pub fn new(
        gpu: &Gpu,
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        policy: SequencePolicy,
        context: usize,
    ) -> Result<Self, ModelError> {
        let kind = policy.kind();
        let k = &policy.config.keyformer;
        let c = &policy.config;
        let composed = c.pinned_sinks > 0
            || c.accumulate != keyformer_kv::Accumulate::Sum
            || c.value_weighted
            || c.adaptive
            || c.grow
            || c.key_diversity
            || c.layer_budgets != keyformer_kv::policy::LayerBudgets::Uniform;
        if composed {
            return Err(ModelError::Input(
                "the settings sinks=, accumulate=mean, value, layers=pyramid, adaptive, grow and keydiff (on policies other \
                 than sink) do not run on the CUDA backend yet: use the CPU"
                    .into(),
            ));
        }
        if !GPU_POLICIES.contains(&kind)
            || (kind == PolicyKind::Keyformer && (k.frozen || k.noise != NoiseKind::Gumbel))
        {
            return Err(ModelError::Input(format!(
                "KV policy '{}'{} does not run on the CUDA backend yet (it runs full, window, sink, h2o and \
                 keyformer with Gumbel noise)",
                kind.name(),
                if kind == PolicyKind::Keyformer { " with these keyformer options" } else { "" }
            )));
        }
        let capacity = policy.capacity(context);
        let scored = matches!(kind, PolicyKind::H2o | PolicyKind::Keyformer);
        let layers = (0..n_layers)
            .map(|_| LayerKv::new(gpu, n_kv_heads, head_dim, capacity, scored))
            .collect::<Result<Vec<_>, _>>()
            .map_err(gpu_error)?;
        Ok(Self { policy, layers, n_kv_heads, head_dim, cursor: SlotCursor::new(capacity), stats: KvStats::default() })
    }

    /// What the kernels compute for the scores now.
    pub(crate) fn score_signal(&self) -> Option<ScoreSignal> {
        match self.policy.signal() {
            Signal::None => None,
            Signal::Attention { .. } => Some(ScoreSignal::Attention),
            Signal::Noisy { tau, seed, .. } => Some(ScoreSignal::Keyformer { tau, seed }),
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
        let plan = self.cursor.plan_step(&self.policy).map_err(full)?;
        let capacity = self.cursor.capacity;
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
            query_pos: self.cursor.next_position,
            ..AttnRow::default()
        }
        .with_signal(self.score_signal(), scores, capacity);
        // Eviction ranks by the scores even when a policy no longer adds to them.
        row.scores = scores;
        row.store_slot = plan.store_slot.map_or(-1, |s| s as i32);
        row.width = plan.width as i32;
        if let Some(e) = plan.evict {
            row.evict = 1;
            row.first_recent = e.first_recent;
            row.sinks = e.sinks;
        }
        Ok(row)
    }

    /// Book-keeping after a forward pass of `n` tokens through every layer.
    pub(crate) fn advance(&mut self, n: usize) -> Result<(), ModelError> {
        if self.policy.prompt_done() {
            let plan = self.cursor.plan_step(&self.policy).map_err(full)?;
            self.cursor.step_done(&plan);
            if plan.evict.is_some() {
                self.stats.evictions += self.layers.len() * self.n_kv_heads;
            }
            self.record();
        } else {
            self.cursor.prompt_done(n);
        }
        Ok(())
    }

    /// Book-keeping of what the cache held, after its prompt's compression and each step (as
    /// the CPU cache counts it).
    fn record(&mut self) {
        self.stats.tokens_held_max = self.stats.tokens_held_max.max(self.cursor.len);
        self.stats.bytes_held_max = self.stats.bytes_held_max.max(self.bytes_held());
        self.stats.bytes_peak = self.stats.bytes_peak.max(self.stats.bytes_held_max);
        self.stats.bytes_full_equivalent = self.cursor.next_position as usize * self.bytes_per_token();
    }

    /// Key and value bytes of one token over all layers and KV heads (f16).
    fn bytes_per_token(&self) -> usize {
        crate::kv::KvType::F16.token_bytes(self.layers.len(), self.n_kv_heads, self.head_dim)
    }

    /// The prompt has been processed: every KV head keeps what the CPU policy keeps from the
    /// GPU's scores, the storage shrinks to budget + 1 slots, and decoding starts.
    pub fn finish_prompt(&mut self, gpu: &Gpu) -> Result<(), ModelError> {
        // The whole prompt is held until it is trimmed.
        self.stats.bytes_peak = self.stats.bytes_peak.max(self.bytes_held());
        let budget = self.policy.budget;
        if budget < self.cursor.len {
            let (hd, n_kv, old_cap) = (self.head_dim, self.n_kv_heads, self.cursor.capacity);
            let new_cap = budget + 1;
            let width = self.cursor.width;
            let mut host = Vec::with_capacity(self.layers.len());
            for layer in &self.layers {
                let positions = gpu.download(&layer.positions).map_err(gpu_error)?;
                let scores = layer.scores.as_ref().map(|s| gpu.download(s)).transpose().map_err(gpu_error)?;
                host.push((positions, scores));
            }
            // What each (layer, KV head) keeps, chosen by the CPU policy's own code: layers in
            // parallel (each thread with its own copy of the policy, whose score rows are empty:
            // the scores live on the GPU), as a prompt's heads are thousands of selections.
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(host.len().max(1));
            let per_thread = host.len().div_ceil(threads);
            let policy = &self.policy;
            let kept_all: Vec<Vec<u32>> = std::thread::scope(|scope| {
                let tasks: Vec<_> = host
                    .chunks(per_thread)
                    .enumerate()
                    .map(|(t, layers)| {
                        let mut policy = policy.clone();
                        scope.spawn(move || -> Result<Vec<Vec<u32>>, ModelError> {
                            let mut out = Vec::with_capacity(layers.len());
                            for (i, (positions, scores)) in layers.iter().enumerate() {
                                let li = t * per_thread + i;
                                let mut kept = Vec::with_capacity(n_kv * budget);
                                for h in 0..n_kv {
                                    let mut table = SlotTable::new(old_cap);
                                    for &p in &positions[h * old_cap..h * old_cap + width] {
                                        table.insert(p)?;
                                    }
                                    if let Some(s) = scores {
                                        policy.observe(li, h, &s[h * old_cap..h * old_cap + width]);
                                    }
                                    let mut evicted = vec![false; width];
                                    for slot in policy.victims(li, h, &table, budget) {
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
                                            "KV head kept {} tokens, budget {budget}",
                                            keep.len()
                                        )));
                                    }
                                    kept.extend(keep.iter().map(|&(_, s)| s));
                                }
                                out.push(kept);
                            }
                            Ok(out)
                        })
                    })
                    .collect();
                let mut all = Vec::new();
                for task in tasks {
                    all.extend(task.join().map_err(|_| ModelError::Gpu("selection thread panicked".into()))??);
                }
                Ok::<_, ModelError>(all)
            })?;
            // Every compact layer is allocated before any prompt-sized one is freed: freeing them
            // one by one let the next layer's smaller buffers be carved from the freed ones, and
            // the device pool fragmented until a batch of long prompts ran out of memory.
            let mut compact = Vec::with_capacity(self.layers.len());
            for (layer, kept) in self.layers.iter().zip(kept_all) {
                let mut fresh = LayerKv::new(gpu, n_kv, hd, new_cap, layer.scores.is_some()).map_err(gpu_error)?;
                gpu.gather_slots(layer, &mut fresh, &kept, budget, old_cap, new_cap, hd).map_err(gpu_error)?;
                compact.push(fresh);
            }
            self.layers = compact;
            gpu.release_free_memory().map_err(gpu_error)?;
            self.stats.evictions += (self.cursor.len - budget) * self.layers.len() * n_kv;
            self.cursor.compacted(budget, new_cap);
        }
        self.policy.finish_prompt(&[]);
        self.record();
        Ok(())
    }

    /// The positions each KV head of `layer` holds, sorted (tests and tools).
    pub fn held_positions(&self, gpu: &Gpu, layer: usize) -> Result<Vec<Vec<u32>>, ModelError> {
        let all = gpu.download(&self.layers[layer].positions).map_err(gpu_error)?;
        Ok(all
            .chunks(self.cursor.capacity)
            .map(|head| {
                let mut p: Vec<u32> = head.iter().copied().filter(|&p| p != FREE_SLOT).collect();
                p.sort_unstable();
                p
            })
            .collect())
    }

    /// Slots the storage has per (layer, KV head).
    pub fn capacity_now(&self) -> usize {
        self.cursor.capacity
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
        self.cursor.len * self.bytes_per_token()
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

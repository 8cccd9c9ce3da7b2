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
use keyformer_kv::{NoiseKind, PolicyKind, SequencePolicy, Signal, SlotTable};

use super::{dev_addr, AttnRow, Gpu, GpuError, ScoreSignal, FREE_SLOT};
use crate::backend::SequenceCache;
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
    capacity: usize,
    /// Tokens held by every (layer, KV head).
    len: usize,
    next_position: u32,
    /// Slots `0..width` may hold tokens.
    width: usize,
    /// The next token takes the slot the last victim freed (the cache is at its budget).
    reuse_victim: bool,
    /// The most tokens held after any step.
    pub tokens_held_max: usize,
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
        Ok(Self {
            policy,
            layers,
            n_kv_heads,
            head_dim,
            capacity,
            len: 0,
            next_position: 0,
            width: 0,
            reuse_victim: false,
            tokens_held_max: 0,
        })
    }

    /// What the kernels compute for the scores now.
    fn score_signal(&self) -> Option<ScoreSignal> {
        match self.policy.signal() {
            Signal::None => None,
            Signal::Attention { .. } => Some(ScoreSignal::Attention),
            Signal::Noisy { tau, seed, .. } => Some(ScoreSignal::Keyformer { tau, seed }),
        }
    }

    /// The attention rows of tokens `start..start + n` of a forward pass (at this cache's next
    /// positions) at `layer`. `q`, `k`, `v`, `out` are the device addresses of token `start`'s
    /// rows; `row_scores` (prompt rows only): where each row writes its own scores, `stride`
    /// floats per KV head and `n_kv_heads` rows per token, from token `start` on.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rows(
        &self,
        gpu: &Gpu,
        layer: usize,
        start: usize,
        n: usize,
        strides: (usize, usize),
        addrs: [u64; 4],
        row_scores: Option<(u64, usize)>,
        out: &mut Vec<AttnRow>,
    ) -> Result<(), ModelError> {
        let (q_dim, kv_dim) = strides;
        let [q, k, v, o] = addrs;
        let l = &self.layers[layer];
        let signal = self.score_signal();
        let base = AttnRow {
            keys: dev_addr(gpu, &l.keys),
            values: dev_addr(gpu, &l.values),
            slot_pos: dev_addr(gpu, &l.positions),
            victims: dev_addr(gpu, &l.victims),
            capacity: self.capacity as i32,
            ..AttnRow::default()
        };
        let at = |r: usize| AttnRow {
            q: q + (r * q_dim * 4) as u64,
            k: k + (r * kv_dim * 4) as u64,
            v: v + (r * kv_dim * 4) as u64,
            out: o + (r * q_dim * 4) as u64,
            query_pos: self.next_position + (start + r) as u32,
            ..base
        };
        if !self.policy.prompt_done() {
            // Prompt rows: slots fill in position order, so token t sees slots 0..=len + t.
            if self.len + start + n > self.capacity {
                return Err(ModelError::ContextFull { needed: self.len + start + n, capacity: self.capacity });
            }
            for r in 0..n {
                let mut row = at(r);
                row.store_slot = (self.len + start + r) as i32;
                row.width = (self.len + start + r + 1) as i32;
                row = match (signal, row_scores) {
                    (Some(_), Some((addr, stride))) => {
                        let mut row = row.with_signal(signal, addr + (r * self.n_kv_heads * stride * 4) as u64, stride);
                        row.score_assign = 1;
                        row
                    }
                    _ => row.with_signal(None, 0, 0),
                };
                out.push(row);
            }
            return Ok(());
        }
        if n != 1 || start != 0 {
            return Err(ModelError::Input(format!(
                "the CUDA cache takes decode steps one token at a time after the prompt ({n} given)"
            )));
        }
        if !self.reuse_victim && self.len >= self.capacity {
            return Err(ModelError::ContextFull { needed: self.len + 1, capacity: self.capacity });
        }
        let scores = l.scores.as_ref().map_or(0, |s| dev_addr(gpu, s));
        let mut row = at(0).with_signal(signal, scores, self.capacity);
        if scores != 0 && signal.is_none() {
            row.scores = scores; // kept for eviction: a policy that stopped scoring still ranks by them
        }
        let held = self.len + usize::from(!self.reuse_victim);
        row.store_slot = if self.reuse_victim { -1 } else { self.len as i32 };
        row.width = if self.reuse_victim { self.width as i32 } else { (self.len + 1) as i32 };
        if held > self.policy.budget {
            let keep_recent = self.policy.recent.min(held) as u32;
            row.evict = 1;
            row.first_recent = (self.next_position + 1).saturating_sub(keep_recent);
            row.sinks = if self.policy.kind() == PolicyKind::Sink { self.policy.config.sinks as u32 } else { 0 };
        }
        out.push(row);
        Ok(())
    }

    /// Book-keeping after a forward pass of `n` tokens through every layer.
    pub(crate) fn advance(&mut self, n: usize) {
        if self.policy.prompt_done() {
            let held = self.len + usize::from(!self.reuse_victim);
            if !self.reuse_victim {
                self.width = self.len + 1;
            }
            if held > self.policy.budget {
                self.reuse_victim = true;
                self.len = held - 1;
            } else {
                self.len = held;
            }
        } else {
            self.len += n;
            self.width = self.len;
        }
        self.next_position += n as u32;
        self.tokens_held_max = self.tokens_held_max.max(self.len);
    }

    /// The prompt has been processed: every KV head keeps what the CPU policy keeps from the
    /// GPU's scores, the storage shrinks to budget + 1 slots, and decoding starts.
    pub fn finish_prompt(&mut self, gpu: &Gpu) -> Result<(), ModelError> {
        let budget = self.policy.budget;
        if budget < self.len {
            let (hd, n_kv, old_cap) = (self.head_dim, self.n_kv_heads, self.capacity);
            let new_cap = budget + 1;
            let mut kept_all = Vec::with_capacity(self.layers.len());
            for (li, layer) in self.layers.iter().enumerate() {
                let positions = gpu.download(&layer.positions).map_err(gpu_error)?;
                let scores = layer.scores.as_ref().map(|s| gpu.download(s)).transpose().map_err(gpu_error)?;
                let mut kept = Vec::with_capacity(n_kv * budget);
                for h in 0..n_kv {
                    let mut table = SlotTable::new(old_cap);
                    for &p in &positions[h * old_cap..h * old_cap + self.width] {
                        table.insert(p)?;
                    }
                    if let Some(s) = &scores {
                        self.policy.observe(li, h, &s[h * old_cap..h * old_cap + self.width]);
                    }
                    let victims = self.policy.victims(li, h, &table, budget);
                    let mut keep: Vec<(u32, u32)> = table
                        .occupied()
                        .filter(|(slot, _)| !victims.contains(slot))
                        .map(|(slot, p)| (p, slot as u32))
                        .collect();
                    keep.sort_unstable();
                    if keep.len() != budget {
                        return Err(ModelError::Input(format!("KV head kept {} tokens, budget {budget}", keep.len())));
                    }
                    kept.extend(keep.iter().map(|&(_, s)| s));
                }
                kept_all.push(kept);
            }
            for (layer, kept) in self.layers.iter_mut().zip(kept_all) {
                let mut fresh = LayerKv::new(gpu, n_kv, hd, new_cap, layer.scores.is_some()).map_err(gpu_error)?;
                gpu.gather_slots(layer, &mut fresh, &kept, budget, old_cap, new_cap, hd).map_err(gpu_error)?;
                *layer = fresh;
            }
            self.capacity = new_cap;
            self.len = budget;
            self.width = budget;
        }
        self.policy.finish_prompt(&[]);
        self.tokens_held_max = self.tokens_held_max.max(self.len);
        Ok(())
    }

    /// The positions each KV head of `layer` holds, sorted (tests and tools).
    pub fn held_positions(&self, gpu: &Gpu, layer: usize) -> Result<Vec<Vec<u32>>, ModelError> {
        let all = gpu.download(&self.layers[layer].positions).map_err(gpu_error)?;
        Ok(all
            .chunks(self.capacity)
            .map(|head| {
                let mut p: Vec<u32> = head.iter().copied().filter(|&p| p != FREE_SLOT).collect();
                p.sort_unstable();
                p
            })
            .collect())
    }

    /// Key and value bytes held now (f16), over all layers and KV heads.
    pub fn bytes_held(&self) -> usize {
        self.len * self.layers.len() * self.n_kv_heads * self.head_dim * 2 * 2
    }
    /// Bytes of the storage allocated (capacity, not what is held).
    pub fn bytes_reserved(&self) -> usize {
        self.capacity * self.layers.len() * self.n_kv_heads * self.head_dim * 2 * 2
    }
    /// Slots per (layer, KV head) now.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Slots the storage has per (layer, KV head).
    pub fn capacity_now(&self) -> usize {
        self.capacity
    }
}

impl SequenceCache for GpuKvCache {
    fn next_position(&self) -> u32 {
        self.next_position
    }
    fn len(&self) -> usize {
        self.len
    }
    fn capacity(&self) -> usize {
        // A cache at its budget takes one more token per step (the victim's slot).
        if self.reuse_victim {
            self.capacity.max(self.len + 1)
        } else {
            self.capacity
        }
    }
}

pub(crate) fn gpu_error(e: GpuError) -> ModelError {
    ModelError::Gpu(e.to_string())
}

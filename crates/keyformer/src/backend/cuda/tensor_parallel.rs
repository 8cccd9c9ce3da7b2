//! Tensor parallelism over GPUs (issue 23): a model split by [`ShardPlan`] over `N` shards,
//! one thread and one CUDA context each, the partial products of the attention output and
//! down projections summed after every layer by a [`Collective`] (NCCL's all-reduce; or
//! through the host, for several shards on one GPU, where NCCL refuses), the logits gathered
//! by vocabulary part on the host. Each shard's KV cache holds its own KV heads and its policy
//! scores and evicts them with the same seed and the heads' global indices, so the kept tokens
//! are the one-device model's with no communication for the policy.
//!
//! TOVA, the one policy scoring across a layer's heads, does not run on the GPU (one device or
//! several); its sum over shards is the CPU reference's `shard_sum_scores`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use cudarc::driver::CudaSlice;
use keyformer_kv::PolicyConfig;

use super::backend::{Cuda, WeightFormat};
use super::check::CheckRow;
use super::kv::GpuKvCache;
use super::{Gpu, GpuError};
use crate::backend::{Backend, Cpu, SequenceCache};
use crate::engine::{Engine, GenerateRequest};
use crate::kv::KvStats;
use crate::models::config::{ModelConfig, PositionKind};
use crate::models::decoder::{KvPlan, Logits, Model, Out};
use crate::models::random::RandomShape;
use crate::quant::GgmlType;
use crate::step_model::StepModel;
use crate::tensor_parallel::{HostGroup, ShardPlan};
use crate::ModelError;
use keyformer_kv::SequencePolicy;

/// How the shards of a group sum their partial products.
pub enum Collective {
    /// NCCL's in-place all-reduce on the shard's stream (so it is captured in a step's graph).
    Nccl { comm: Arc<NcclComm>, group: Arc<NcclGroup> },
    /// Each partial copied to the host, summed there in shard order, copied back: several
    /// shards on one GPU (NCCL takes one rank per device), for checks. Not capturable.
    Host { group: Arc<HostGroup>, rank: usize },
}

/// An NCCL communicator, used only by the thread of the shard that owns it.
/// `None` once aborted.
pub struct NcclComm(Mutex<Option<cudarc::nccl::safe::Comm>>);

/// Every shard's communicator, so that a shard that fails can abort them all: NCCL's sums wait
/// on the GPU for every rank, and a rank that never comes would hold the others there (their
/// threads in a synchronisation) for ever; an aborted communicator ends those operations.
#[derive(Default)]
pub struct NcclGroup(Mutex<Vec<Arc<NcclComm>>>);

impl NcclComm {
    /// Dropping a communicator is NCCL's abort (cudarc's Drop, which panics if NCCL refuses:
    /// caught, the shard is failing already).
    fn abort(&self) {
        let comm = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(comm)));
    }
}

impl NcclGroup {
    fn abort(&self) {
        for comm in self.0.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            comm.abort();
        }
    }
}

// SAFETY: an NCCL communicator is a handle with no thread affinity; cudarc leaves it !Send only
// because it is a raw pointer. The mutex makes one thread at a time use it.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl Collective {
    /// `x` summed over the group, on every shard.
    pub fn all_reduce(&self, gpu: &Gpu, x: &mut CudaSlice<f32>, capturing: bool) -> Result<(), GpuError> {
        match self {
            Collective::Nccl { comm, .. } => {
                let comm = comm.0.lock().unwrap_or_else(|e| e.into_inner());
                let Some(comm) = comm.as_ref() else {
                    return Err(GpuError::Collective("NCCL: the group was aborted after a shard failed".into()));
                };
                if comm.world_size() == 1 {
                    return Ok(()); // nothing to add (and a launch a sum less)
                }
                comm.all_reduce_in_place(x, &cudarc::nccl::safe::ReduceOp::Sum)
                    .map_err(|e| GpuError::Collective(format!("NCCL all-reduce: {e:?}")))?;
                Ok(())
            }
            Collective::Host { group, rank } => {
                if capturing {
                    return Err(GpuError::Collective("a sum through the host cannot be captured in a graph".into()));
                }
                let sum = group.sum(*rank, gpu.download(x)?).map_err(|e| GpuError::Collective(e.to_string()))?;
                gpu.upload_into(&sum, x)
            }
        }
    }

    /// A shard's loop has ended: its own communicator goes (on its thread, while its GPU is
    /// open); a group through the host is closed, so no shard waits for it.
    fn release(&self) {
        match self {
            Collective::Host { group, .. } => group.abort(),
            Collective::Nccl { comm, .. } => comm.abort(),
        }
    }

    /// Let the other shards stop waiting (a shard failed).
    fn abort(&self) {
        match self {
            Collective::Host { group, .. } => group.abort(),
            Collective::Nccl { group, .. } => group.abort(),
        }
    }
}

/// Where a sharded model's weights come from.
#[derive(Clone)]
pub enum ShardSource {
    /// A GGUF file loaded for the CPU (each shard uploads its part).
    File(Arc<Model<Cpu>>),
    /// Random weights at a shape, each tensor drawn whole on every shard and cut.
    Random { shape: RandomShape, seed: u64, weight_type: GgmlType },
}

/// How the shards of a [`ShardedModel`] sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// NCCL, one GPU per shard (ordinals 0..N).
    Nccl,
    /// Through the host, every shard on GPU 0 (checks on one GPU).
    HostOnOneGpu,
}

/// A loaded shard: its GPU and weights.
#[derive(Debug, Clone)]
pub struct ShardInfo {
    pub device: String,
    /// Bytes of its weight matrices, the embedding (whole on every shard) among them.
    pub matrix_bytes: usize,
    pub embedding_bytes: usize,
    /// `F16 x 225`, ...
    pub matrix_types: String,
    /// Matrices held in f16 (a quantised matrix whose part is not whole blocks among them).
    pub f16_matrices: usize,
}

/// What the host keeps of a sequence: an id the shards know it by.
pub type SequenceId = u64;

enum Job {
    Plan { kv: PolicyConfig, prompt: usize, gen: usize },
    NewSequence { id: SequenceId, kv: PolicyConfig, prompt: usize, gen: usize },
    Prefill { id: SequenceId, tokens: Vec<u32>, which: Logits },
    Reopen { id: SequenceId, extra: usize, steps: usize },
    Decode { ids: Vec<SequenceId>, tokens: Vec<u32> },
    Drop { id: SequenceId },
    Held { id: SequenceId },
    MaxBatch { kv: PolicyConfig, prompt: usize, gen: usize },
    Memory,
    ReleaseMemory,
}

enum Reply {
    Done,
    Plan(Box<KvPlan>),
    /// A new sequence's cache on this shard.
    Cache(ShardCacheState),
    /// The shard's vocabulary part of each row's logits, and each sequence's cache after the step.
    Logits(Vec<f32>, Vec<ShardCacheState>),
    Held(Vec<Vec<Vec<u32>>>),
    Count(usize),
    Memory(usize, usize),
}

/// What a shard's cache of a sequence says after a step (the host's handle keeps it, so that
/// asking a cache its length costs no round trip).
#[derive(Debug, Clone, Default)]
struct ShardCacheState {
    next_position: u32,
    len: usize,
    capacity: usize,
    bytes_held: usize,
    stats: KvStats,
}

impl ShardCacheState {
    fn of(cache: &GpuKvCache) -> Self {
        Self {
            next_position: cache.next_position(),
            len: cache.len(),
            capacity: cache.capacity(),
            bytes_held: cache.bytes_held(),
            stats: cache.stats(),
        }
    }

    /// The whole sequence's state from every shard's (each holds its own KV heads).
    fn merge(shards: &[ShardCacheState]) -> Self {
        let mut all = shards.first().cloned().unwrap_or_default();
        for s in shards.iter().skip(1) {
            all.len = all.len.max(s.len);
            all.bytes_held += s.bytes_held;
            all.stats.tokens_held_max = all.stats.tokens_held_max.max(s.stats.tokens_held_max);
            all.stats.bytes_held_max += s.stats.bytes_held_max;
            all.stats.bytes_peak += s.stats.bytes_peak;
            all.stats.bytes_full_equivalent += s.stats.bytes_full_equivalent;
            all.stats.evictions += s.stats.evictions;
        }
        all
    }
}

/// The host's ends of the shards' channels: one round trip (a job to every shard, a reply from
/// each) at a time, whichever thread asks.
struct ShardLinks {
    links: Mutex<Vec<Link>>,
}

struct Link {
    jobs: Option<mpsc::Sender<Job>>,
    replies: mpsc::Receiver<Result<Reply, ModelError>>,
}

impl ShardLinks {
    /// The same job to every shard; every shard's reply, or the first error.
    fn each(&self, job: impl Fn() -> Job) -> Result<Vec<Reply>, ModelError> {
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        for (s, w) in links.iter().enumerate() {
            let sent = w.jobs.as_ref().is_some_and(|j| j.send(job()).is_ok());
            if !sent {
                return Err(ModelError::Gpu(format!("shard {s}'s thread has ended")));
            }
        }
        let mut replies = Vec::with_capacity(links.len());
        let mut first_error = None;
        for (s, w) in links.iter().enumerate() {
            match w.replies.recv() {
                Ok(Ok(r)) => replies.push(r),
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(ModelError::Gpu(format!("shard {s}'s thread has ended")));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(replies),
        }
    }

    /// Close every shard's channel: their loops end.
    fn close(&self) {
        for w in self.links.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            w.jobs = None;
        }
    }
}

/// A sequence of a [`ShardedModel`]: its id on the shards (whose caches hold its keys and
/// values, each its own KV heads) and what they said of them after the last step. Dropping it
/// drops the shards' caches.
pub struct ShardedCache {
    id: SequenceId,
    links: Arc<ShardLinks>,
    policy: SequencePolicy,
    state: ShardCacheState,
}

impl ShardedCache {
    pub fn id(&self) -> SequenceId {
        self.id
    }
}

impl SequenceCache for ShardedCache {
    fn next_position(&self) -> u32 {
        self.state.next_position
    }
    fn len(&self) -> usize {
        self.state.len
    }
    fn capacity(&self) -> usize {
        self.state.capacity
    }
    fn policy(&self) -> &SequencePolicy {
        &self.policy
    }
    fn bytes_held(&self) -> usize {
        self.state.bytes_held
    }
    fn stats(&self) -> KvStats {
        self.state.stats.clone()
    }
}

impl Drop for ShardedCache {
    fn drop(&mut self) {
        // A shard that has ended has nothing left to free.
        let id = self.id;
        let _ = self.links.each(|| Job::Drop { id });
    }
}

/// A model split over `N` shards, each on a thread of its own with its GPU.
pub struct ShardedModel {
    /// The whole model's configuration.
    pub config: ModelConfig,
    pub plan: ShardPlan,
    pub transport: Transport,
    /// What each shard loaded.
    pub shards: Vec<ShardInfo>,
    output_bias: Option<Vec<f32>>,
    links: Arc<ShardLinks>,
    threads: Vec<JoinHandle<()>>,
    next_id: AtomicU64,
}

/// The libraries NCCL needs; a clear error where they are missing.
fn nccl_present() -> Result<(), GpuError> {
    // SAFETY: this only tries to load the shared library.
    if unsafe { cudarc::nccl::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(GpuError::Collective(
            "NCCL (libnccl.so) could not be loaded: tensor parallelism over GPUs needs it on the library path \
             (pip's nvidia-nccl wheels ship libnccl.so.2: link it as libnccl.so in a folder on LD_LIBRARY_PATH)"
                .into(),
        ))
    }
}

impl ShardedModel {
    /// Split the model of `source` over `shards` shards and load each on its GPU. Refused
    /// where the heads or features do not divide, where the model uses ALiBi (its slopes
    /// depend on the whole model's head count), and, with NCCL, where there are fewer GPUs.
    pub fn open(
        source: ShardSource,
        shards: usize,
        transport: Transport,
        weight_format: WeightFormat,
    ) -> Result<Self, ModelError> {
        let (config, output_bias) = match &source {
            ShardSource::File(m) => (m.config.clone(), m.output_bias.clone()),
            ShardSource::Random { shape, .. } => (shape.config(), None),
        };
        let plan = ShardPlan::new(&config, shards)?;
        if matches!(config.positions, PositionKind::Alibi { .. }) {
            return Err(ModelError::Input("tensor parallel: models with ALiBi (MPT) run on one device".into()));
        }
        let nccl_id = match transport {
            Transport::Nccl => {
                nccl_present()?;
                let count = cudarc::driver::CudaContext::device_count().map_err(GpuError::from)? as usize;
                if count < shards {
                    return Err(ModelError::Input(format!(
                        "tensor parallel over {shards} GPUs: this machine has {count}"
                    )));
                }
                Some(cudarc::nccl::safe::Id::new().map_err(|e| GpuError::Collective(format!("NCCL: {e:?}")))?)
            }
            Transport::HostOnOneGpu => None,
        };
        let host = HostGroup::new(shards);
        let nccl_group = Arc::new(NcclGroup::default());
        let gate = HostGroup::new(shards);
        let (mut links, mut threads) = (Vec::with_capacity(shards), Vec::with_capacity(shards));
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<ShardInfo, ModelError>)>();
        for s in 0..shards {
            let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
            let (replies_tx, replies_rx) = mpsc::channel();
            let source = source.clone();
            let host = host.clone();
            let gate = gate.clone();
            let nccl_group = nccl_group.clone();
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keyformer-shard-{s}"))
                .spawn(move || {
                    let ordinal = if transport == Transport::Nccl { s } else { 0 };
                    let sums = match nccl_id {
                        Some(id) => Sums::Nccl(id, nccl_group.clone()),
                        None => Sums::Host(host.clone()),
                    };
                    // A panic while loading is an error like any other (the host waits for
                    // every shard's word).
                    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        load_shard(&source, &plan, s, ordinal, sums, &gate, weight_format)
                    }))
                    .unwrap_or_else(|_| Err(ModelError::Gpu("loading panicked".into())));
                    let model = match loaded {
                        Ok(m) => {
                            let info = ShardInfo {
                                device: m.backend.gpu.info.name.clone(),
                                matrix_bytes: m.matrix_bytes(),
                                embedding_bytes: m.token_embd.bytes(),
                                matrix_types: m.matrix_types(),
                                f16_matrices: f16_matrices(&m),
                            };
                            ready.send((s, Ok(info))).ok();
                            drop(ready);
                            m
                        }
                        Err(e) => {
                            host.abort();
                            gate.abort();
                            ready.send((s, Err(e))).ok();
                            return;
                        }
                    };
                    serve_shard(&model, jobs_rx, replies_tx);
                    if let Some(c) = &model.backend.collective {
                        c.release();
                    }
                })
                .map_err(|e| ModelError::Gpu(format!("starting shard {s}'s thread: {e}")))?;
            links.push(Link { jobs: Some(jobs_tx), replies: replies_rx });
            threads.push(thread);
        }
        drop(ready_tx);
        let mut infos = vec![None; shards];
        let mut first_error = None;
        // One message from each shard (a shard's thread lives on after its own).
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok((s, Ok(info))) => infos[s] = Some(info),
                Ok((s, Err(e))) => {
                    first_error.get_or_insert(ModelError::Gpu(format!("shard {s}: {e}")));
                }
                Err(_) => {
                    first_error.get_or_insert(ModelError::Gpu("a shard's thread ended while loading".into()));
                    break;
                }
            }
        }
        let shards: Vec<ShardInfo> = infos.into_iter().flatten().collect();
        let links = Arc::new(ShardLinks { links: Mutex::new(links) });
        let model = Self { config, plan, transport, shards, output_bias, links, threads, next_id: AtomicU64::new(0) };
        match first_error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }

    /// Bytes of weights a decode step reads over all shards (the embedding is only looked up).
    pub fn step_weight_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.matrix_bytes - s.embedding_bytes).sum()
    }

    fn each(&self, job: impl Fn() -> Job) -> Result<Vec<Reply>, ModelError> {
        self.links.each(job)
    }

    /// Refused here: budgets spread by score across heads (`adaptive`, `layers=global`) would
    /// need every shard's scores; KVzip's repetition needs the request in the shards' tokens,
    /// which they are not given.
    fn check_policy(kv: &PolicyConfig) -> Result<(), ModelError> {
        if kv.adaptive || kv.layer_budgets == keyformer_kv::policy::LayerBudgets::Global {
            return Err(ModelError::Input(format!(
                "KV policy '{}': budgets spread across heads (adaptive, layers=global) need every shard's scores \
                 and run on one device",
                kv.label()
            )));
        }
        if kv.kind == keyformer_kv::PolicyKind::Kvzip {
            return Err(ModelError::Input("KV policy 'kvzip' runs on one device (-tp 1) for now".into()));
        }
        Ok(())
    }

    /// A new sequence's caches on every shard (each holds its KV heads), as
    /// [`Model::new_sequence_cache`] plans them.
    pub fn new_sequence(&self, kv: &PolicyConfig, prompt: usize, gen: usize) -> Result<ShardedCache, ModelError> {
        let plan = StepModel::plan_kv(self, kv, prompt, gen)?;
        StepModel::new_planned_cache(self, plan)
    }

    /// The prompt through every shard, then its end; the logits `which` asks for.
    pub fn prefill_rows(
        &self,
        cache: &mut ShardedCache,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>, ModelError> {
        let id = cache.id;
        let rows = if which == Logits::All { tokens.len() } else { 1 };
        let (logits, states) = self.gather(self.each(|| Job::Prefill { id, tokens: tokens.to_vec(), which })?, rows);
        cache.state = states.into_iter().next().unwrap_or_default();
        Ok(logits)
    }

    /// One decode step of a batch (token i joins sequence i); each row's logits.
    pub fn decode(&self, caches: &mut [&mut ShardedCache], tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if tokens.len() != caches.len() {
            return Err(ModelError::Input(format!("{} tokens for {} sequences", tokens.len(), caches.len())));
        }
        let ids: Vec<SequenceId> = caches.iter().map(|c| c.id).collect();
        let parts = self.each(|| Job::Decode { ids: ids.clone(), tokens: tokens.to_vec() })?;
        let (logits, states) = self.gather(parts, ids.len());
        for (c, state) in caches.iter_mut().zip(states) {
            c.state = state;
        }
        Ok(logits)
    }

    /// The positions each (layer, KV head) holds, the heads in the whole model's order.
    pub fn held_positions(&self, cache: &ShardedCache) -> Result<Vec<Vec<Vec<u32>>>, ModelError> {
        let id = cache.id;
        let mut layers: Vec<Vec<Vec<u32>>> = vec![Vec::new(); self.config.n_layers];
        for reply in self.each(|| Job::Held { id })? {
            let Reply::Held(shard) = reply else { unreachable!("held positions answer Held") };
            for (all, mine) in layers.iter_mut().zip(shard) {
                all.extend(mine);
            }
        }
        Ok(layers)
    }

    /// The most sequences of this plan that fit: the fewest any shard has room for.
    pub fn max_batch(&self, kv: &PolicyConfig, prompt: usize, gen: usize) -> Result<usize, ModelError> {
        let replies = self.each(|| Job::MaxBatch { kv: kv.clone(), prompt, gen })?;
        Ok(replies.iter().map(|r| if let Reply::Count(n) = r { *n } else { 0 }).min().unwrap_or(0))
    }

    /// Device memory in use and in all, summed over the shards' GPUs (each counted once).
    pub fn memory_used(&self) -> Result<(usize, usize), ModelError> {
        let replies = self.each(|| Job::Memory)?;
        let mut seen = Vec::new();
        let (mut used, mut total) = (0, 0);
        for (s, r) in replies.iter().enumerate() {
            let ordinal = if self.transport == Transport::Nccl { s } else { 0 };
            if let Reply::Memory(u, t) = r {
                if !seen.contains(&ordinal) {
                    seen.push(ordinal);
                    used += u;
                    total += t;
                }
            }
        }
        Ok((used, total))
    }

    pub fn release_free_memory(&self) -> Result<(), ModelError> {
        self.each(|| Job::ReleaseMemory).map(|_| ())
    }

    /// Each row's logits: the shards' vocabulary parts one after another, then the output
    /// bias and the final soft-cap the shards left out; and each sequence's cache state.
    fn gather(&self, parts: Vec<Reply>, rows: usize) -> (Vec<f32>, Vec<ShardCacheState>) {
        let (parts, states): (Vec<Vec<f32>>, Vec<Vec<ShardCacheState>>) = parts
            .into_iter()
            .map(|r| if let Reply::Logits(l, s) = r { (l, s) } else { (Vec::new(), Vec::new()) })
            .unzip();
        let vocab = self.config.vocab_size;
        let mut logits = Vec::with_capacity(rows * vocab);
        for r in 0..rows {
            for (s, part) in parts.iter().enumerate() {
                let width = self.plan.vocab_rows(s).len();
                logits.extend_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        if let Some(bias) = &self.output_bias {
            logits.chunks_exact_mut(vocab).for_each(|row| row.iter_mut().zip(bias).for_each(|(l, b)| *l += b));
        }
        if let Some(cap) = self.config.final_softcap {
            logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
        }
        let sequences = states.first().map_or(0, Vec::len);
        let merged = (0..sequences)
            .map(|i| ShardCacheState::merge(&states.iter().filter_map(|s| s.get(i).cloned()).collect::<Vec<_>>()))
            .collect();
        (logits, merged)
    }
}

impl StepModel for ShardedModel {
    type Cache = ShardedCache;

    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn set_context_length(&mut self, tokens: usize) {
        self.config.context_length = tokens;
    }
    fn kv_bytes_per_token(&self) -> usize {
        let c = &self.config;
        crate::kv::KvType::F16.token_bytes(c.n_layers, c.n_kv_heads, c.head_dim)
    }
    /// Each shard plans its own KV heads; the bytes are their sum, the policy shard 0's (every
    /// shard has as many heads, so the same budgets).
    fn plan_kv(&self, kv: &PolicyConfig, prompt_len: usize, steps: usize) -> Result<KvPlan, ModelError> {
        Self::check_policy(kv)?;
        let replies = self.each(|| Job::Plan { kv: kv.clone(), prompt: prompt_len, gen: steps })?;
        let mut plans = replies.into_iter().filter_map(|r| if let Reply::Plan(p) = r { Some(*p) } else { None });
        let mut plan = plans.next().ok_or_else(|| ModelError::Gpu("no shard planned the sequence".into()))?;
        for p in plans {
            plan.bytes_steady += p.bytes_steady;
            plan.bytes_prefill += p.bytes_prefill;
        }
        Ok(plan)
    }
    fn new_planned_cache(&self, plan: KvPlan) -> Result<ShardedCache, ModelError> {
        Self::check_policy(&plan.kv)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (kv, prompt, gen) = (&plan.kv, plan.prompt_len, plan.steps);
        let made = self.each(|| Job::NewSequence { id, kv: kv.clone(), prompt, gen });
        // The handle owns the shards' caches from here: dropped on an error, it frees those made.
        let mut cache =
            ShardedCache { id, links: self.links.clone(), policy: plan.policy, state: ShardCacheState::default() };
        let states: Vec<ShardCacheState> =
            made?.into_iter().filter_map(|r| if let Reply::Cache(s) = r { Some(s) } else { None }).collect();
        cache.state = ShardCacheState::merge(&states);
        Ok(cache)
    }
    fn prefill(
        &self,
        tokens: &[u32],
        cache: &mut ShardedCache,
        which: Logits,
        on_rows: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), ModelError> {
        let logits = self.prefill_rows(cache, tokens, which)?;
        on_rows(0, &logits);
        Ok(())
    }
    fn reopen_prompt(&self, cache: &mut ShardedCache, extra: usize, steps: usize) -> Result<(), ModelError> {
        let id = cache.id;
        self.each(|| Job::Reopen { id, extra, steps }).map(|_| ())
    }
    fn decode_step_into(&self, token: u32, cache: &mut ShardedCache, logits: &mut Vec<f32>) -> Result<(), ModelError> {
        *logits = self.decode(&mut [cache], &[token])?;
        Ok(())
    }
    fn decode_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut ShardedCache],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        *logits = self.decode(caches, tokens)?;
        Ok(())
    }
}

impl Drop for ShardedModel {
    fn drop(&mut self) {
        // The shards' loops end when their channels close (a sequence still held only finds
        // them ended), taking their caches with them.
        self.links.close();
        for t in self.threads.drain(..) {
            t.join().ok();
        }
    }
}

/// How a shard will sum: NCCL's group to join, or the host's.
enum Sums {
    Nccl(cudarc::nccl::safe::Id, Arc<NcclGroup>),
    Host(Arc<HostGroup>),
}

/// Shard `s` of `source` on GPU `ordinal`, with its collective (NCCL's communicator made here,
/// once the GPU's context is current on this thread); `gate` holds the shards together until
/// every GPU is open.
fn load_shard(
    source: &ShardSource,
    plan: &ShardPlan,
    s: usize,
    ordinal: usize,
    sums: Sums,
    gate: &HostGroup,
    weight_format: WeightFormat,
) -> Result<Model<Cuda>, ModelError> {
    // Every shard's GPU opens before any joins NCCL (whose set-up waits for all of them): a
    // shard that cannot open its GPU releases the others instead of leaving them waiting.
    let opened = Gpu::open(ordinal);
    if opened.is_err() {
        gate.abort();
    }
    let gpu = opened?;
    gate.sum(s, Vec::new()).map_err(|e| GpuError::Collective(format!("shard {s} waited for the others: {e}")))?;
    let collective = match sums {
        Sums::Nccl(id, group) => {
            let stream = gpu.stream.clone();
            stream.context().bind_to_thread().map_err(GpuError::from)?;
            let comm = cudarc::nccl::safe::Comm::from_rank(stream, s, plan.shards, id)
                .map_err(|e| GpuError::Collective(format!("NCCL communicator of shard {s}: {e:?}")))?;
            let comm = Arc::new(NcclComm(Mutex::new(Some(comm))));
            group.0.lock().unwrap_or_else(|e| e.into_inner()).push(comm.clone());
            Collective::Nccl { comm, group }
        }
        Sums::Host(group) => Collective::Host { group, rank: s },
    };
    let mut cuda = Cuda::new(gpu);
    cuda.weight_format = weight_format;
    cuda.first_head = plan.query_heads(s).start;
    // A sum through the host waits for the device: it cannot be part of a captured graph.
    if matches!(collective, Collective::Host { .. }) {
        cuda.use_graphs = false;
    }
    cuda.collective = Some(collective);
    let shard = Some((plan, s));
    match source {
        ShardSource::File(cpu) => Model::<Cuda>::from_cpu_shard(cuda, cpu, shard),
        ShardSource::Random { shape, seed, weight_type } => {
            Model::<Cuda>::random_shard(cuda, shape, *seed, *weight_type, shard)
        }
    }
}

/// A shard's loop: jobs in, replies out, until the host closes the channel. A forward pass
/// that fails lets the other shards stop waiting on this one's sums (and ends the group).
fn serve_shard(model: &Model<Cuda>, jobs: mpsc::Receiver<Job>, replies: mpsc::Sender<Result<Reply, ModelError>>) {
    let mut caches: HashMap<SequenceId, GpuKvCache> = HashMap::new();
    let free_at_load = cudarc::driver::result::mem_get_info().map_or(0, |(free, _)| free);
    for job in jobs {
        // Only a forward pass sums with the other shards: one that fails may leave them waiting
        // in a sum. (A refused plan or a cache that does not fit fails on its own.)
        let sums = matches!(job, Job::Prefill { .. } | Job::Decode { .. });
        let reply = run_job(model, &mut caches, free_at_load, job);
        if reply.is_err() && sums {
            if let Some(c) = &model.backend.collective {
                c.abort();
            }
        }
        if replies.send(reply).is_err() {
            return;
        }
    }
}

fn run_job(
    model: &Model<Cuda>,
    caches: &mut HashMap<SequenceId, GpuKvCache>,
    free_at_load: usize,
    job: Job,
) -> Result<Reply, ModelError> {
    let unknown = |id: SequenceId| ModelError::Input(format!("no sequence {id} on this shard"));
    match job {
        Job::Plan { kv, prompt, gen } => Ok(Reply::Plan(Box::new(model.plan_kv(&kv, prompt, gen)?))),
        Job::NewSequence { id, kv, prompt, gen } => {
            let cache = model.new_sequence_cache(&kv, prompt, gen)?;
            let state = ShardCacheState::of(&cache);
            caches.insert(id, cache);
            Ok(Reply::Cache(state))
        }
        Job::Prefill { id, tokens, which } => {
            let cache = caches.get_mut(&id).ok_or_else(|| unknown(id))?;
            let mut rows = Vec::new();
            model.prefill(&tokens, cache, which, &mut |_, l| {
                if which != Logits::All {
                    rows.clear();
                }
                rows.extend_from_slice(l);
            })?;
            Ok(Reply::Logits(rows, vec![ShardCacheState::of(cache)]))
        }
        Job::Reopen { id, extra, steps } => {
            let cache = caches.get_mut(&id).ok_or_else(|| unknown(id))?;
            model.backend.reopen_prompt(cache, extra, steps)?;
            Ok(Reply::Done)
        }
        Job::Decode { ids, tokens } => {
            let mut taken = Vec::with_capacity(ids.len());
            for id in &ids {
                match caches.remove(id) {
                    Some(c) => taken.push((*id, c)),
                    None => {
                        caches.extend(taken);
                        return Err(unknown(*id));
                    }
                }
            }
            let mut refs: Vec<&mut GpuKvCache> = taken.iter_mut().map(|(_, c)| c).collect();
            let mut logits = Vec::new();
            let result = match model.replay_step(&tokens, &mut refs, &mut Out::Logits(&mut logits)) {
                Ok(true) => Ok(()),
                Ok(false) => model.forward_batch(&tokens, &mut refs, &mut logits),
                Err(e) => Err(e),
            };
            if result.is_ok() {
                for c in refs {
                    model.backend.end_step(c);
                }
            }
            let states = taken.iter().map(|(_, c)| ShardCacheState::of(c)).collect();
            caches.extend(taken);
            result.map(|()| Reply::Logits(logits, states))
        }
        Job::Drop { id } => {
            caches.remove(&id);
            Ok(Reply::Done)
        }
        Job::Held { id } => {
            let cache = caches.get(&id).ok_or_else(|| unknown(id))?;
            let gpu = &model.backend.gpu;
            let layers = (0..model.config.n_layers).map(|l| cache.held_positions(gpu, l)).collect::<Result<_, _>>()?;
            Ok(Reply::Held(layers))
        }
        Job::MaxBatch { kv, prompt, gen } => {
            Ok(Reply::Count(super::bench::max_batch(model, prompt, gen, &kv, free_at_load)?))
        }
        Job::Memory => {
            let (used, total) = model.backend.memory_used()?;
            Ok(Reply::Memory(used, total))
        }
        Job::ReleaseMemory => {
            model.backend.gpu.release_free_memory()?;
            Ok(Reply::Done)
        }
    }
}

fn f16_matrices(model: &Model<Cuda>) -> usize {
    model.matrix_type_counts().iter().filter(|(t, _)| *t == GgmlType::F16).map(|(_, n)| n).sum()
}

/// A run's logits at every step (the prompt's last row first), the tokens fed to its steps,
/// and the positions each (layer, KV head) holds after the prompt and after every step.
pub struct GreedyRun {
    pub logits: Vec<Vec<f32>>,
    pub fed: Vec<u32>,
    pub held: Vec<Vec<Vec<Vec<u32>>>>,
}

/// A run through a sharded model: the prompt, then a step for each token of `feed` (the whole
/// model's greedy tokens, so that both read the same input whatever their argmax).
pub fn greedy_run(
    model: &ShardedModel,
    kv: &PolicyConfig,
    prompt: &[u32],
    feed: &[u32],
) -> Result<GreedyRun, ModelError> {
    let mut cache = model.new_sequence(kv, prompt.len(), feed.len())?;
    let mut logits = vec![model.prefill_rows(&mut cache, prompt, Logits::Last)?];
    let mut held = vec![model.held_positions(&cache)?];
    for &next in feed {
        logits.push(model.decode(&mut [&mut cache], &[next])?);
        held.push(model.held_positions(&cache)?);
    }
    Ok(GreedyRun { logits, fed: feed.to_vec(), held })
}

/// A greedy run on the model whole, on one GPU, through the same calls the shards make: the
/// prompt, then `steps` steps fed their own argmax.
pub fn greedy_run_whole(
    model: &Model<Cuda>,
    kv: &PolicyConfig,
    prompt: &[u32],
    steps: usize,
) -> Result<GreedyRun, ModelError> {
    let mut caches = HashMap::new();
    let free = 0;
    let logits_of = |r: Result<Reply, ModelError>| match r? {
        Reply::Logits(l, _) => Ok(l),
        _ => Err(ModelError::Gpu("a step gave no logits".into())),
    };
    let held_now =
        |caches: &mut HashMap<SequenceId, GpuKvCache>| match run_job(model, caches, free, Job::Held { id: 0 })? {
            Reply::Held(h) => Ok(h),
            _ => Err(ModelError::Gpu("no held positions".into())),
        };
    run_job(model, &mut caches, free, Job::NewSequence { id: 0, kv: kv.clone(), prompt: prompt.len(), gen: steps })?;
    let mut logits = vec![logits_of(run_job(
        model,
        &mut caches,
        free,
        Job::Prefill { id: 0, tokens: prompt.to_vec(), which: Logits::Last },
    ))?];
    let mut held = vec![held_now(&mut caches)?];
    let mut fed = Vec::with_capacity(steps);
    for _ in 0..steps {
        let next = crate::sampling::argmax(logits.last().expect("the prompt's"));
        fed.push(next);
        let step = run_job(model, &mut caches, free, Job::Decode { ids: vec![0], tokens: vec![next] });
        logits.push(logits_of(step)?);
        held.push(held_now(&mut caches)?);
    }
    Ok(GreedyRun { logits, fed, held })
}

/// gpu-check's rows for tensor parallelism at `shape` (random weights of `weight_type`, a
/// quantised type kept in its blocks where a shard's part is whole blocks): the model split
/// over 2 shards on this one GPU (sums through the host), over 1 shard through NCCL and, where
/// the machine has 2 GPUs, over 2 through NCCL, each against the whole model on GPU 0: logits
/// within f16 reduction-order error and the same tokens kept by Keyformer (same seed).
pub fn check(
    shape: &RandomShape,
    weight_type: GgmlType,
    prompt_len: usize,
    steps: usize,
) -> Result<Vec<CheckRow>, ModelError> {
    let seed = 23;
    let source = ShardSource::Random { shape: *shape, seed, weight_type };
    let whole = Model::<Cuda>::random(Cuda::new(Gpu::open(0)?), shape, seed, weight_type)?;
    let whole_f16 = f16_matrices(&whole);
    let shape_name = match weight_type {
        GgmlType::F16 => shape.name.to_string(),
        t => format!("{} {t}", shape.name),
    };
    let vocab = shape.vocab_size as u64;
    let prompt: Vec<u32> =
        (0..prompt_len as u64).map(|i| (crate::models::random::mix64(i ^ 0x7A11) % vocab) as u32).collect();
    let defaults = PolicyConfig { seed: 5, min_budget: 1, ..PolicyConfig::default() };
    let specs = ["full", "keyformer:budget=50%", "h2o:budget=50%"];
    let mut wants = Vec::new();
    for spec in specs {
        let kv = PolicyConfig::parse_spec(spec, &defaults).map_err(ModelError::Policy)?;
        wants.push((kv.clone(), greedy_run_whole(&whole, &kv, &prompt, steps)?));
    }
    // The engine's generation (what run and serve do) on the whole model, for the same on the shards.
    let request = GenerateRequest {
        max_tokens: steps,
        kv: PolicyConfig::parse_spec("keyformer:budget=50%", &defaults).map_err(ModelError::Policy)?,
        ..GenerateRequest::default()
    };
    let engine = Engine {
        file: None,
        name: shape_name.clone(),
        model: whole,
        tokenizer: crate::tokenizer::Tokenizer::byte_level(shape.vocab_size)?,
    };
    let want_generation = engine.generate(&prompt, &request, &mut |_| {})?;
    drop(engine);
    let gpus = cudarc::driver::CudaContext::device_count().map_err(GpuError::from)? as usize;
    let mut groups = vec![(2, Transport::HostOnOneGpu)];
    let mut rows = Vec::new();
    match nccl_present() {
        Ok(()) => {
            groups.push((1, Transport::Nccl));
            if gpus >= 2 {
                groups.push((2, Transport::Nccl));
            }
        }
        Err(e) => rows.push(CheckRow {
            op: format!("{shape_name}: tensor parallel through NCCL"),
            max_error: 1.0,
            tolerance: 0.0,
            passed: false,
            note: e.to_string(),
        }),
    }
    for (n, transport) in groups {
        let sharded = ShardedModel::open(source.clone(), n, transport, WeightFormat::Native)?;
        let engine = Engine {
            file: None,
            name: shape_name.clone(),
            model: sharded,
            tokenizer: crate::tokenizer::Tokenizer::byte_level(shape.vocab_size)?,
        };
        let sharded = &engine.model;
        let how = match transport {
            Transport::HostOnOneGpu => format!("{n} shards on one GPU, sums through the host"),
            Transport::Nccl => format!("{n} shard{} through NCCL", if n > 1 { "s" } else { "" }),
        };
        // A quantised matrix whose part is not whole blocks (the attention output of a small
        // shape: a shard's heads are half a K-quant super-block) is dequantised on the shards,
        // where the whole model multiplies its blocks by 8-bit activations: a different
        // arithmetic, so the full cache's logits are compared within that quantisation's error
        // and the runs that evict (where a flipped near-tie sends them apart) are not compared.
        let dequantised = sharded.shards.iter().map(|s| s.f16_matrices).max().unwrap_or(0) > whole_f16;
        if dequantised {
            rows.push(row(
                &format!("{shape_name}: {how}: evicting runs not compared"),
                0.0,
                0.0,
                "parts of quantised matrices that are not whole blocks are dequantised on the shards",
            ));
        }
        for (kv, want) in &wants {
            if dequantised && kv.kind != keyformer_kv::PolicyKind::Full {
                continue;
            }
            let got = greedy_run(sharded, kv, &prompt, &want.fed)?;
            let scale = want.logits.iter().flatten().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            // The prompt's logits, and each step's whose cache held the same tokens on both
            // sides before it: once a near-tie of scores kept another token on one side, the
            // two attend to different tokens (the kept-token row bounds how many).
            let mut alike = 0;
            let mut worst = 0f32;
            for (i, (a, b)) in want.logits.iter().zip(&got.logits).enumerate() {
                if i > 0 && super::model_check::held_difference(&want.held[i - 1], &got.held[i - 1]) != 0 {
                    continue;
                }
                alike += 1;
                let error = if a.len() != b.len() {
                    f32::INFINITY
                } else {
                    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
                };
                worst = worst.max(error / scale);
            }
            // The shards sum partial products the whole model sums in one GEMM: f16 rounding in
            // another order, ~1e-3 of the logits' range; a wrong head or part moves them by
            // their own size.
            rows.push(row(
                &format!("{shape_name}: {how}, {}: logits, {prompt_len}-token prompt + {steps} steps", kv.label()),
                worst as f64,
                match (n, dequantised) {
                    (1, _) => 0.0,
                    (_, false) => 1e-2,
                    (_, true) => 3e-2,
                },
                &format!(
                    "largest |sharded - whole| over the largest |whole logit|, worst of the {alike} of {} passes \
                     whose caches held the same tokens",
                    steps + 1
                ),
            ));
            if kv.kind != keyformer_kv::PolicyKind::Full {
                let (want_held, got_held) =
                    (want.held.last().expect("the prompt's"), got.held.last().expect("the prompt's"));
                let held: usize = want_held.iter().flatten().map(Vec::len).sum();
                rows.push(row(
                    &format!("{shape_name}: {how}, {}: the same tokens kept", kv.label()),
                    super::model_check::held_difference(want_held, got_held) as f64,
                    (held / 100) as f64,
                    &format!("tokens kept by one and not the other, of {held} (near-ties may flip)"),
                ));
            }
        }
        if dequantised {
            continue;
        }
        // Through the engine's step protocol (StepModel: prefill, decode steps, the caches' state
        // kept on the host): the same tokens generated, the same cache reported.
        let got = engine.generate(&prompt, &request, &mut |_| {})?;
        let differ = want_generation.token_ids.iter().zip(&got.token_ids).filter(|(a, b)| a != b).count()
            + want_generation.token_ids.len().abs_diff(got.token_ids.len());
        let (w, g) = (&want_generation.kv_cache, &got.kv_cache);
        let report_differs = usize::from(w.bytes_held_max != g.bytes_held_max)
            + usize::from(w.tokens_held_max != g.tokens_held_max)
            + usize::from(w.evictions != g.evictions)
            + usize::from(want_generation.stop_reason != got.stop_reason);
        rows.push(row(
            &format!("{shape_name}: {how}, engine generation ({}), {steps} tokens", request.kv.label()),
            (differ + report_differs) as f64,
            if n == 1 { 0.0 } else { 1.0 },
            "greedy tokens that differ from the whole model's engine + cache report fields (bytes, tokens, \
             evictions, stop) that differ",
        ));
    }
    Ok(rows)
}

fn row(op: &str, max_error: f64, tolerance: f64, note: &str) -> CheckRow {
    CheckRow { op: op.into(), max_error, tolerance, passed: max_error <= tolerance, note: note.into() }
}

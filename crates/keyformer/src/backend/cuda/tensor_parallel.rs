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
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use cudarc::driver::CudaSlice;
use keyformer_kv::PolicyConfig;

use super::backend::{Cuda, WeightFormat};
use super::check::CheckRow;
use super::kv::GpuKvCache;
use super::{Gpu, GpuError};
use crate::backend::{Backend, Cpu, SequenceCache};
use crate::models::config::{ModelConfig, PositionKind};
use crate::models::decoder::{Logits, Model, Out};
use crate::models::random::RandomShape;
use crate::quant::GgmlType;
use crate::tensor_parallel::{HostGroup, ShardPlan};
use crate::ModelError;

/// How the shards of a group sum their partial products.
pub enum Collective {
    /// NCCL's in-place all-reduce on the shard's stream (so it is captured in a step's graph).
    Nccl(NcclComm),
    /// Each partial copied to the host, summed there in shard order, copied back: several
    /// shards on one GPU (NCCL takes one rank per device), for checks. Not capturable.
    Host { group: Arc<HostGroup>, rank: usize },
}

/// An NCCL communicator, used only by the thread of the shard that owns it.
pub struct NcclComm(Mutex<cudarc::nccl::safe::Comm>);

// SAFETY: an NCCL communicator is a handle with no thread affinity; cudarc leaves it !Send only
// because it is a raw pointer. The mutex makes one thread at a time use it.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl Collective {
    /// `x` summed over the group, on every shard.
    pub fn all_reduce(&self, gpu: &Gpu, x: &mut CudaSlice<f32>, capturing: bool) -> Result<(), GpuError> {
        match self {
            Collective::Nccl(comm) => {
                let comm = comm.0.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Let the other shards stop waiting (a shard failed).
    fn abort(&self) {
        if let Collective::Host { group, .. } = self {
            group.abort();
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
}

/// What the host keeps of a sequence: an id the shards know it by.
pub type SequenceId = u64;

enum Job {
    NewSequence { id: SequenceId, kv: PolicyConfig, prompt: usize, gen: usize },
    Prefill { id: SequenceId, tokens: Vec<u32> },
    Decode { ids: Vec<SequenceId>, tokens: Vec<u32> },
    Drop { id: SequenceId },
    Held { id: SequenceId },
    Bytes { id: SequenceId },
    MaxBatch { kv: PolicyConfig, prompt: usize, gen: usize },
    Memory,
    ReleaseMemory,
}

enum Reply {
    Done,
    /// The shard's vocabulary part of each row's logits.
    Logits(Vec<f32>),
    Held(Vec<Vec<Vec<u32>>>),
    Count(usize),
    Memory(usize, usize),
}

struct Worker {
    jobs: Option<mpsc::Sender<Job>>,
    replies: mpsc::Receiver<Result<Reply, ModelError>>,
    thread: Option<JoinHandle<()>>,
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
    workers: Vec<Worker>,
    next_id: SequenceId,
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
        let gate = HostGroup::new(shards);
        let mut workers = Vec::with_capacity(shards);
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<ShardInfo, ModelError>)>();
        for s in 0..shards {
            let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
            let (replies_tx, replies_rx) = mpsc::channel();
            let source = source.clone();
            let host = host.clone();
            let gate = gate.clone();
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("keyformer-shard-{s}"))
                .spawn(move || {
                    let ordinal = if transport == Transport::Nccl { s } else { 0 };
                    let sums = match nccl_id {
                        Some(id) => Sums::Nccl(id),
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
                        c.abort();
                    }
                })
                .map_err(|e| ModelError::Gpu(format!("starting shard {s}'s thread: {e}")))?;
            workers.push(Worker { jobs: Some(jobs_tx), replies: replies_rx, thread: Some(thread) });
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
        let model = Self { config, plan, transport, shards, output_bias, workers, next_id: 0 };
        match first_error {
            Some(e) => Err(e),
            None => Ok(model),
        }
    }

    /// Bytes of weights a decode step reads over all shards (the embedding is only looked up).
    pub fn step_weight_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.matrix_bytes - s.embedding_bytes).sum()
    }

    /// The same job to every shard; every shard's reply, or the first error.
    fn each(&self, job: impl Fn() -> Job) -> Result<Vec<Reply>, ModelError> {
        for (s, w) in self.workers.iter().enumerate() {
            let sent = w.jobs.as_ref().is_some_and(|j| j.send(job()).is_ok());
            if !sent {
                return Err(ModelError::Gpu(format!("shard {s}'s thread has ended")));
            }
        }
        let mut replies = Vec::with_capacity(self.workers.len());
        let mut first_error = None;
        for (s, w) in self.workers.iter().enumerate() {
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

    /// A new sequence's caches on every shard (each holds its KV heads), as
    /// [`Model::new_sequence_cache`] plans them. Budgets spread by score across heads
    /// (`adaptive`, `layers=global`) would need every shard's scores: refused.
    pub fn new_sequence(&mut self, kv: &PolicyConfig, prompt: usize, gen: usize) -> Result<SequenceId, ModelError> {
        if kv.adaptive || kv.layer_budgets == keyformer_kv::policy::LayerBudgets::Global {
            return Err(ModelError::Input(format!(
                "KV policy '{}': budgets spread across heads (adaptive, layers=global) need every shard's scores \
                 and run on one device",
                kv.label()
            )));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.each(|| Job::NewSequence { id, kv: kv.clone(), prompt, gen })?;
        Ok(id)
    }

    /// The whole prompt through every shard; the last row's logits.
    pub fn prefill(&self, id: SequenceId, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let parts = self.each(|| Job::Prefill { id, tokens: tokens.to_vec() })?;
        Ok(self.gather(parts, 1))
    }

    /// One decode step of a batch (token i joins sequence i); each row's logits.
    pub fn decode(&self, ids: &[SequenceId], tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let parts = self.each(|| Job::Decode { ids: ids.to_vec(), tokens: tokens.to_vec() })?;
        Ok(self.gather(parts, ids.len()))
    }

    pub fn drop_sequence(&self, id: SequenceId) -> Result<(), ModelError> {
        self.each(|| Job::Drop { id }).map(|_| ())
    }

    /// The positions each (layer, KV head) holds, the heads in the whole model's order.
    pub fn held_positions(&self, id: SequenceId) -> Result<Vec<Vec<Vec<u32>>>, ModelError> {
        let mut layers: Vec<Vec<Vec<u32>>> = vec![Vec::new(); self.config.n_layers];
        for reply in self.each(|| Job::Held { id })? {
            let Reply::Held(shard) = reply else { unreachable!("held positions answer Held") };
            for (all, mine) in layers.iter_mut().zip(shard) {
                all.extend(mine);
            }
        }
        Ok(layers)
    }

    /// Key and value bytes the sequence holds, over every shard.
    pub fn bytes_held(&self, id: SequenceId) -> Result<usize, ModelError> {
        self.sum_counts(|| Job::Bytes { id })
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

    fn sum_counts(&self, job: impl Fn() -> Job) -> Result<usize, ModelError> {
        Ok(self.each(job)?.iter().map(|r| if let Reply::Count(n) = r { *n } else { 0 }).sum())
    }

    /// Each row's logits: the shards' vocabulary parts one after another, then the output
    /// bias and the final soft-cap the shards left out.
    fn gather(&self, parts: Vec<Reply>, rows: usize) -> Vec<f32> {
        let parts: Vec<Vec<f32>> =
            parts.into_iter().map(|r| if let Reply::Logits(l) = r { l } else { Vec::new() }).collect();
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
        logits
    }
}

impl Drop for ShardedModel {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.jobs = None; // the shard's loop ends when its channel closes
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                t.join().ok();
            }
        }
    }
}

/// How a shard will sum: NCCL's group to join, or the host's.
enum Sums {
    Nccl(cudarc::nccl::safe::Id),
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
        Sums::Nccl(id) => {
            let stream = gpu.stream.clone();
            stream.context().bind_to_thread().map_err(GpuError::from)?;
            let comm = cudarc::nccl::safe::Comm::from_rank(stream, s, plan.shards, id)
                .map_err(|e| GpuError::Collective(format!("NCCL communicator of shard {s}: {e:?}")))?;
            Collective::Nccl(NcclComm(Mutex::new(comm)))
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

/// A shard's loop: jobs in, replies out, until the host closes the channel. A failed job
/// lets the other shards stop waiting on this one's sums.
fn serve_shard(model: &Model<Cuda>, jobs: mpsc::Receiver<Job>, replies: mpsc::Sender<Result<Reply, ModelError>>) {
    let mut caches: HashMap<SequenceId, GpuKvCache> = HashMap::new();
    let free_at_load = cudarc::driver::result::mem_get_info().map_or(0, |(free, _)| free);
    for job in jobs {
        let reply = run_job(model, &mut caches, free_at_load, job);
        if reply.is_err() {
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
        Job::NewSequence { id, kv, prompt, gen } => {
            caches.insert(id, model.new_sequence_cache(&kv, prompt, gen)?);
            Ok(Reply::Done)
        }
        Job::Prefill { id, tokens } => {
            let cache = caches.get_mut(&id).ok_or_else(|| unknown(id))?;
            let mut last = Vec::new();
            model.prefill(&tokens, cache, Logits::Last, &mut |_, l| {
                last.clear();
                last.extend_from_slice(l);
            })?;
            Ok(Reply::Logits(last))
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
            caches.extend(taken);
            result.map(|()| Reply::Logits(logits))
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
        Job::Bytes { id } => Ok(Reply::Count(caches.get(&id).ok_or_else(|| unknown(id))?.bytes_held())),
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

/// A greedy run's logits at every step, and the positions each (layer, KV head) holds at its end.
pub type GreedyRun = (Vec<Vec<f32>>, Vec<Vec<Vec<u32>>>);

/// A greedy run through a sharded model: the prompt, then `steps` steps fed their own argmax;
/// every step's logits and the positions each (layer, KV head) holds at the end.
pub fn greedy_run(
    model: &mut ShardedModel,
    kv: &PolicyConfig,
    prompt: &[u32],
    steps: usize,
) -> Result<GreedyRun, ModelError> {
    let id = model.new_sequence(kv, prompt.len(), steps)?;
    let mut logits = vec![model.prefill(id, prompt)?];
    for _ in 0..steps {
        let next = crate::sampling::argmax(logits.last().expect("the prompt's"));
        logits.push(model.decode(&[id], &[next])?);
    }
    let held = model.held_positions(id)?;
    model.drop_sequence(id)?;
    Ok((logits, held))
}

/// The same run on the model whole, on one GPU, through the same calls the shards make.
pub fn greedy_run_whole(
    model: &Model<Cuda>,
    kv: &PolicyConfig,
    prompt: &[u32],
    steps: usize,
) -> Result<GreedyRun, ModelError> {
    let mut caches = HashMap::new();
    let free = 0;
    let logits_of = |r: Result<Reply, ModelError>| match r? {
        Reply::Logits(l) => Ok(l),
        _ => Err(ModelError::Gpu("a step gave no logits".into())),
    };
    run_job(model, &mut caches, free, Job::NewSequence { id: 0, kv: kv.clone(), prompt: prompt.len(), gen: steps })?;
    let mut logits =
        vec![logits_of(run_job(model, &mut caches, free, Job::Prefill { id: 0, tokens: prompt.to_vec() }))?];
    for _ in 0..steps {
        let next = crate::sampling::argmax(logits.last().expect("the prompt's"));
        let step = run_job(model, &mut caches, free, Job::Decode { ids: vec![0], tokens: vec![next] });
        logits.push(logits_of(step)?);
    }
    let Reply::Held(held) = run_job(model, &mut caches, free, Job::Held { id: 0 })? else {
        return Err(ModelError::Gpu("no held positions".into()));
    };
    Ok((logits, held))
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
    drop(whole);
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
        let mut sharded = ShardedModel::open(source.clone(), n, transport, WeightFormat::Native)?;
        let how = match transport {
            Transport::HostOnOneGpu => format!("{n} shards on one GPU, sums through the host"),
            Transport::Nccl => format!("{n} shard{} through NCCL", if n > 1 { "s" } else { "" }),
        };
        for (kv, (want_logits, want_held)) in &wants {
            let (got_logits, got_held) = greedy_run(&mut sharded, kv, &prompt, steps)?;
            let scale = want_logits.iter().flatten().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = want_logits
                .iter()
                .zip(&got_logits)
                .map(|(a, b)| {
                    if a.len() != b.len() {
                        return f32::INFINITY;
                    }
                    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
                })
                .fold(0f32, f32::max)
                / scale;
            // The shards sum partial products the whole model sums in one GEMM: f16 rounding in
            // another order, ~1e-3 of the logits' range; a wrong head or part moves them by
            // their own size.
            rows.push(row(
                &format!("{shape_name}: {how}, {}: logits, {prompt_len}-token prompt + {steps} steps", kv.label()),
                worst as f64,
                if n == 1 { 0.0 } else { 1e-2 },
                "largest |sharded - whole| over the largest |whole logit|, worst step",
            ));
            if kv.kind != keyformer_kv::PolicyKind::Full {
                let held: usize = want_held.iter().flatten().map(Vec::len).sum();
                rows.push(row(
                    &format!("{shape_name}: {how}, {}: the same tokens kept", kv.label()),
                    super::model_check::held_difference(want_held, &got_held) as f64,
                    (held / 100) as f64,
                    &format!("tokens kept by one and not the other, of {held} (near-ties may flip)"),
                ));
            }
        }
    }
    Ok(rows)
}

fn row(op: &str, max_error: f64, tolerance: f64, note: &str) -> CheckRow {
    CheckRow { op: op.into(), max_error, tolerance, passed: max_error <= tolerance, note: note.into() }
}

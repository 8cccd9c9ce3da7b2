//! The CUDA backend (cargo feature `cuda`): the CPU backend's ops on an NVIDIA GPU.
//!
//! Built with cudarc's dynamic loading, so a binary needs no CUDA at build time and runs
//! anywhere: [`Gpu::open`] says plainly when there is no driver, no GPU or no NVRTC. The
//! kernels ([`KERNEL_SOURCES`]) are compiled at run time by NVRTC for the GPU found; the matrix
//! products go through our GEMVs (one row of f16 weights; up to 8 rows of quantised weights
//! with 8-bit activations) and cuBLAS (f16 weights, or quantised ones dequantised tile by
//! tile, and f16 activations, f32 accumulation and output).
//!
//! Decode attention ([`Gpu::attention_rows`]) works on the same slot layout as the CPU's KV
//! cache (a KV head's slots, each with its position or free), one row per sequence of a batch,
//! and gives, besides the output, a policy's scores in the same pass over the keys and values:
//! the plain probabilities (H2O) or Keyformer's `softmax((x + g) / tau)`, with `g` drawn
//! exactly as the CPU draws it (the row key of [`noise::NoiseRow`] computed on the GPU, the
//! per-position hash and the same quantile table), so both backends select the same tokens.
//! A prompt's attention is flash.cu's ([`Gpu::flash_prefill_attention`]: tensor cores, the
//! softmax online, scores from each row's statistics in a second pass), or for Keyformer's
//! scores and head sizes flash.cu lacks, cuBLAS blocks ([`Gpu::prefill_attention`]).
//!
//! Modules: [`backend`] (the `Backend` implementation and `Model<Cuda>`), [`kv`] (a sequence's
//! cache on the GPU), [`bench`] (the paper's throughput protocol), [`check`] and
//! [`model_check`] (every op, and the whole model, against the CPU).

pub mod backend;
pub mod bench;
pub mod check;
pub mod kv;
pub mod model_check;
pub mod tensor_parallel;

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchConfig,
    PushKernelArg, SyncOnDrop,
};
use keyformer_kv::noise;

use crate::quant::GgmlType;

/// The kernels' sources, compiled as one program in this order (NVRTC is given no headers).
pub const KERNEL_SOURCES: [(&str, &str); 4] = [
    ("kernels.cu", include_str!("kernels.cu")),
    ("quant_blocks.cuh", include_str!("quant_blocks.cuh")),
    ("quant.cu", include_str!("quant.cu")),
    ("flash.cu", include_str!("flash.cu")),
];

/// Why the GPU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver found (libcuda could not be loaded): this machine has no NVIDIA GPU driver")]
    NoDriver,
    #[error("no CUDA GPU found: {0}")]
    NoDevice(String),
    #[error("NVRTC (libnvrtc) could not be loaded: the CUDA runtime compiler is needed to build the kernels")]
    NoNvrtc,
    #[error("cuBLAS (libcublas) could not be loaded")]
    NoCublas,
    #[error("the kernels did not compile: {0}")]
    Compile(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0:?}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("{0}")]
    Shape(String),
    /// Tensor parallelism's sums over the shards.
    #[error("tensor parallel: {0}")]
    Collective(String),
}

/// What was found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
}

struct Kernels {
    rms_norm: CudaFunction,
    rope: CudaFunction,
    layer_norm: CudaFunction,
    rms_norm_in_place: CudaFunction,
    add_bias: CudaFunction,
    scale_assign: CudaFunction,
    gelu_mul: CudaFunction,
    gelu_erf: CudaFunction,
    clamp_values: CudaFunction,
    silu_mul: CudaFunction,
    f32_to_f16: CudaFunction,
    copy_columns_f16: CudaFunction,
    gemv_f16: CudaFunction,
    /// One per bound on the query heads per KV head: 1, 2, 4, 8 (kernels.cu).
    attn_decode_partial: [CudaFunction; 4],
    /// The same for heads of 129-256 values.
    attn_decode_partial_hd256: [CudaFunction; 4],
    attn_decode_one_pass: [CudaFunction; 4],
    attn_decode_combine: CudaFunction,
    choose_victims: CudaFunction,
    kv_store: CudaFunction,
    gather_slots: CudaFunction,
    embed_rows: CudaFunction,
    add_assign: CudaFunction,
    add_rms_norm: CudaFunction,
    argmax_rows: CudaFunction,
    kv_append: CudaFunction,
    prefill_softmax: CudaFunction,
    prefill_scores: CudaFunction,
    /// flash.cu's prompt attention, its compilation without Keyformer's and KVzip's sums, the
    /// lean kernel at 128 rows a block, and the score pass, one per head size in
    /// [`FLASH_HEAD_DIMS`].
    flash_prefill: Vec<CudaFunction>,
    flash_prefill_lean: Vec<CudaFunction>,
    flash_prefill_wide: Vec<CudaFunction>,
    flash_scores: Vec<CudaFunction>,
    fill_random_f16: CudaFunction,
    read_sum: CudaFunction,
    quantize_q8: CudaFunction,
    /// The kernels of each type in [`QUANTISED_ON_GPU`], in its order.
    quant: Vec<QuantKernels>,
}

/// A quantised type's kernels (quant.cu `QUANT_KERNELS`).
struct QuantKernels {
    gemv: CudaFunction,
    /// The same for one activation row.
    gemv1: CudaFunction,
    dequant_f16: CudaFunction,
    embed: CudaFunction,
}

/// The ggml types the GPU keeps in their block layout (`--gpu-weights native`); others are
/// dequantised to f16 at load.
pub const QUANTISED_ON_GPU: [GgmlType; 8] = crate::models::random::QUANTISED_TYPES;

/// Bytes of one activation block quantised for the integer products (quant::dot::Q8Block).
pub const Q8_BLOCK_BYTES: usize = std::mem::size_of::<crate::quant::dot::Q8Block>();

/// Activation rows up to which a quantised product goes through the GEMV (quant.cu
/// `GEMV_Q_MAX_N`, each weight read once for all rows); more rows dequantise the weight tile
/// by tile into f16 for cuBLAS.
pub const QUANT_GEMV_MAX_ROWS: usize = 8;

/// Activation rows up to which a quantised product still goes through the GEMV, in groups of
/// [`QUANT_GEMV_MAX_ROWS`]: each group reads the weight once more, but the dequantised tiles
/// cost about a whole model's f16 writes and reads per step (on an H100, Q4_K at the llama2-7b
/// shape: a batch of 16 took 101 ms a step through tiles, one of 8 14 ms through the GEMV).
pub const QUANT_GEMV_GROUPED_ROWS: usize = 32;

/// Weights one GEMV launch takes (kernels.cu `GEMV_WEIGHTS`): Q, K and V share their input.
pub const GEMV_WEIGHTS: usize = 3;

/// The weights of one GEMV launch (kernels.cu `GemvWeights`): device addresses of each weight
/// and its output, and its rows; `blockIdx.y` picks one.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvWeights {
    w: [u64; GEMV_WEIGHTS],
    y: [u64; GEMV_WEIGHTS],
    rows: [i32; GEMV_WEIGHTS],
}

// SAFETY: plain old data with the kernel's layout (repr(C): 3 + 3 addresses, 3 ints, padded).
unsafe impl cudarc::driver::DeviceRepr for GemvWeights {}
const _: () = assert!(std::mem::size_of::<GemvWeights>() == 64);

/// f16 values of one dequantised tile: 8 Mi (16 MiB), so that a tile written by the
/// dequantiser is still in L2 (50 MiB on an H100) when cuBLAS reads it.
pub const QUANT_TILE_VALUES: usize = 8 << 20;

/// One GPU with its stream, cuBLAS handle, compiled kernels and the Gumbel quantile table.
pub struct Gpu {
    pub info: GpuInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    gumbel_table: CudaSlice<f32>,
    sm_count: usize,
    /// Decode attentions of at most this many rows choose their victims in the combination
    /// pass; larger batches in a kernel of their own (`KEYFORMER_VICTIM_FOLD_ROWS` overrides).
    pub victim_fold_rows: usize,
    /// Decode attentions of at least this many (row, KV head) pairs run in one pass
    /// ([`DecodePass`]).
    pub one_pass_heads: usize,
    /// Every decode attention laid out so (`KEYFORMER_DECODE_PASS=ranges|ranges-own-kernel|
    /// whole-heads|one-pass`, for comparisons and checks).
    pub forced_pass: Option<DecodePass>,
    /// Bytes of logits each one-pass entry point (by group) has room for in shared memory.
    one_pass_logit_room: [usize; 4],
    /// Prompts go through flash.cu where the head size allows (tensor-core mma needs sm_80;
    /// `KEYFORMER_FLASH_PREFILL=0` keeps the cuBLAS path, for comparisons).
    pub flash_prefill: bool,
    /// Which compilation of the flash prefill runs a prompt that needs no Keyformer or KVzip
    /// sums ([`FlashKernel`] as its index; `KEYFORMER_FLASH_KERNEL=general|lean|wide`; gpu-check
    /// runs each).
    pub flash_kernel: std::sync::atomic::AtomicUsize,
    /// Whether the GPU gave the 128-row flash kernels their shared memory (else prompts take
    /// the 64-row ones whatever `flash_kernel` says).
    pub flash_wide: bool,
}

/// Head sizes flash.cu is instantiated for (multiples of 16 up to 128); prompts of other
/// head sizes (Gemma's 256) go through cuBLAS ([`Gpu::prefill_attention`]).
pub const FLASH_HEAD_DIMS: [usize; 6] = [16, 32, 64, 80, 96, 128];

/// Query rows per block of the flash prefill (flash.cu `FLASH_ROWS`).
const FLASH_ROWS: usize = 64;

/// The compilations of flash.cu's prompt kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlashKernel {
    /// Every score mode.
    General = 0,
    /// No score or H2O's: Keyformer's noisy sums and KVzip's restricted ones compiled out.
    Lean = 1,
    /// Lean, 128 query rows a block (two 16-row tiles a warp, the queries in shared memory).
    Wide = 2,
}

/// Query rows per block of [`FlashKernel::Wide`] (flash.cu `FLASH_WIDE_ROWS`).
const FLASH_WIDE_ROWS: usize = 128;

/// Dynamic shared memory of [`FlashKernel::Wide`] at head size `hd`: 128 query rows and a
/// 64-slot tile of keys and one of values, rows of hd + 8 halves.
fn flash_wide_shared_bytes(hd: usize) -> usize {
    (FLASH_WIDE_ROWS + 2 * 64) * (hd + 8) * 2
}

/// The compilation a prompt without Keyformer's or KVzip's sums runs by default (an H100,
/// llama2-7b's 4096-token prompt: 789 us a layer against the lean 64-row kernel's 897 and the
/// general one's 1050).
const FLASH_KERNEL: FlashKernel = FlashKernel::Wide;

/// The largest batch whose victims are chosen in the attention's combination pass. Measured on
/// an H100 (llama2-7b shape, 4096 + 128, budget 50%, docs/gpu.md): at batch 1 the fold saves a
/// launch a layer (h2o 157.0 -> 160.3 t/s, keyformer 156.7 -> 160.0), at 8 the two are level
/// (within 1%), at 56 the fold cost 4% of a step.
const VICTIM_FOLD_ROWS: usize = 4;

/// Decode attentions with at least this many (row, KV head) pairs per SM give each pair a
/// block of its own (`DecodePass::OnePass`), when [`ONE_PASS_BY_DEFAULT`].
const ONE_PASS_BLOCKS_PER_SM: usize = 4;

/// Whether large batches take the one pass without being asked: no. On an H200 at batch 56
/// (llama2-7b shape, 4096 + 64, budget 50%) it made the scores cheapest (Keyformer +2.1% over
/// window in the same layout) but every step slower (window 27.91 against 24.88 ms with whole
/// heads: one block per head walks 2049 slots alone); `KEYFORMER_DECODE_PASS=one-pass` runs it.
const ONE_PASS_BY_DEFAULT: bool = false;

/// Shared memory a block gets without opting in to more: the one-pass attention's static
/// arrays and its logits (one float per slot and query head of the group) share it.
const BLOCK_SHARED_BYTES: usize = 48 << 10;

/// How a batch of decode attentions is laid out on the GPU (the same outputs, scores and
/// victims from each, up to the order of float operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodePass {
    /// Chunks of ATTN_CHUNK slots in parallel, then their combination in blocks of
    /// COMBINE_SLOTS slots (small batches: many blocks); the victims chosen in the combination
    /// (the last range of a head to finish takes the best) or in a kernel of their own.
    Ranges { fold_victims: bool },
    /// Chunks, then one combining block per (row, KV head), which also chooses the victim from
    /// the scores it has just summed.
    WholeHeads,
    /// One block per (row, KV head) over all its slots with an online softmax, the logits kept
    /// in shared memory for the scores and the victim (large batches: no scratch in global
    /// memory, one launch). Head sizes up to 128 whose logits fit beside the kernel's own
    /// shared arrays in BLOCK_SHARED_BYTES; others take `WholeHeads`.
    OnePass,
}

impl DecodePass {
    /// The pass for `heads` (row, KV head) pairs: one pass from `one_pass_heads` pairs on (the
    /// SMs have enough blocks without splitting a head's slots); small batches (`fold_small`)
    /// ranges with the victims folded in; larger ones whole heads where there is a combining
    /// block for every SM (`sms`), else ranges with the victims in a kernel of their own.
    pub fn for_batch(heads: usize, sms: usize, one_pass_heads: usize, fold_small: bool) -> Self {
        if heads >= one_pass_heads {
            Self::OnePass
        } else if !fold_small && heads >= sms {
            Self::WholeHeads
        } else {
            Self::Ranges { fold_victims: fold_small }
        }
    }
}

/// Whether a product of `n` rows of `cols` values goes through our GEMV (kernels.cu
/// `gemv_f16`): one row only; with more, cuBLAS was faster (measured at 4 rows on an H100).
pub fn uses_gemv(n: usize, cols: usize) -> bool {
    n == 1 && cols % 8 == 0
}

/// Scratch of [`Gpu::matmul_quantised`]: the activations quantised (or as f16), a weight tile.
#[derive(Default)]
pub struct QuantBuffers {
    pub xq: Option<CudaSlice<u8>>,
    pub x16: Option<CudaSlice<u16>>,
    pub tile: Option<CudaSlice<u16>>,
}

impl QuantBuffers {
    /// Device addresses of the buffers (a captured graph is valid while they stay).
    pub fn addresses(&self, gpu: &Gpu) -> Vec<u64> {
        let mut out = Vec::new();
        out.extend(self.xq.as_ref().map(|b| dev_addr(gpu, b)));
        out.extend(self.x16.as_ref().map(|b| dev_addr(gpu, b)));
        out.extend(self.tile.as_ref().map(|b| dev_addr(gpu, b)));
        out
    }
}

/// `slot` holding at least `n` values (reallocated, contents lost, when smaller).
pub fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    gpu: &Gpu,
    slot: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<(), GpuError> {
    if slot.as_ref().is_none_or(|s| s.len() < n) {
        *slot = None; // free first: the old and new buffers need not fit together
        *slot = Some(gpu.zeros::<T>(n.max(1))?);
    }
    Ok(())
}

/// Slots per block of the attention's first kernel, and the limits of its shared memory (as
/// `kernels.cu` defines them).
const ATTN_CHUNK: usize = 128;
const ATTN_WARPS: u32 = 8;
const COMBINE_SLOTS: usize = 512;
// The logits pass gives each slot of a chunk two threads of the block.
const _: () = assert!(2 * ATTN_CHUNK == 32 * ATTN_WARPS as usize);
pub const ATTN_MAX_GROUP: usize = 8;
pub const ATTN_MAX_HEAD_DIM: usize = 256;
const ATTN_CHUNKS: usize = 256;

/// Scratch of [`Gpu::attention_rows`] for up to `max_rows` rows of `n_heads` query heads of
/// `head_dim` over `max_width` slots: the chunks' partial outputs and softmax statistics, and
/// the scored softmax's exponentials.
pub struct AttentionScratch {
    part_out: CudaSlice<f32>,
    part_stats: CudaSlice<f32>,
    score_exps: CudaSlice<f32>,
    /// Per (row, KV head, range of COMBINE_SLOTS slots), the range's best victim candidate
    /// (key and slot), and per (row, KV head) how many ranges have been looked at (zero
    /// between launches: the last range resets it).
    victim_keys: CudaSlice<u64>,
    victim_slots: CudaSlice<u32>,
    victim_count: CudaSlice<u32>,
    pub max_rows: usize,
    pub max_width: usize,
}

impl AttentionScratch {
    /// Where its buffers are (a captured graph holds these addresses).
    pub fn addresses(&self) -> [u64; 6] {
        let at = |b: &CudaSlice<f32>| b.device_ptr(b.stream()).0;
        let at_u32 = |b: &CudaSlice<u32>| b.device_ptr(b.stream()).0;
        [
            at(&self.part_out),
            at(&self.part_stats),
            at(&self.score_exps),
            self.victim_keys.device_ptr(self.victim_keys.stream()).0,
            at_u32(&self.victim_slots),
            at_u32(&self.victim_count),
        ]
    }

    pub fn new(
        gpu: &Gpu,
        max_rows: usize,
        n_heads: usize,
        head_dim: usize,
        max_width: usize,
    ) -> Result<Self, GpuError> {
        let chunks = max_width.div_ceil(ATTN_CHUNK).max(1);
        let rh = max_rows.max(1) * n_heads;
        // KV heads number at most the query heads.
        let ranges = max_width.div_ceil(COMBINE_SLOTS).max(1);
        Ok(Self {
            part_out: gpu.zeros(rh * chunks * head_dim)?,
            part_stats: gpu.zeros(rh * chunks * 4)?,
            score_exps: gpu.zeros(rh * max_width.max(1))?,
            victim_keys: gpu.zeros(rh * ranges)?,
            victim_slots: gpu.zeros(rh * ranges)?,
            victim_count: gpu.zeros(rh)?,
            max_rows: max_rows.max(1),
            max_width,
        })
    }
}

/// A KV head's slots on the GPU, as `kv::HeadKv` holds them on the CPU: f16 keys and values
/// `[capacity][head_dim]` and each slot's position (`FREE_SLOT` when empty). Several heads are
/// stored back to back (`[n_kv_heads][capacity]...`).
pub struct DeviceKv {
    pub keys: CudaSlice<u16>,
    pub values: CudaSlice<u16>,
    pub positions: CudaSlice<u32>,
    pub capacity: usize,
}

/// The position of a free slot.
pub const FREE_SLOT: u32 = u32::MAX;

/// Which of the policies' scores an attention row adds up (per KV head and slot).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreSignal {
    /// Plain attention probabilities (H2O).
    Attention,
    /// Keyformer: Gumbel noise under `seed`, temperature `tau`.
    Keyformer { tau: f32, seed: u64 },
    /// KVzip's reconstruction maxima (prompt rows only: a repetition is read as a prompt): each
    /// slot of positions `first..end` keeps its largest probability under the softmax over the
    /// sinks, that part and the positions from `from_position` on.
    Reconstruction { from_position: u32, first: u32, end: u32, sinks: u32 },
}

/// A prompt's score signal as the prefill kernels take it (kernels.cu `SCORE_*` modes).
struct PrefillScoring {
    mode: i32,
    inv_tau: f32,
    seed: u64,
    /// Merge rows by maximum (KVzip's), else by sum.
    by_max: i32,
    /// KVzip's restricted softmax: [sinks, first, end, from_position] (else no restriction).
    restriction: [u32; 4],
}

impl PrefillScoring {
    fn of(signal: Option<ScoreSignal>) -> Self {
        let (mode, inv_tau, seed) = match signal {
            None => (0, 1.0, 0),
            Some(ScoreSignal::Attention) => (1, 1.0, 0),
            Some(ScoreSignal::Keyformer { tau, seed }) => (2, 1.0 / tau, seed),
            Some(ScoreSignal::Reconstruction { .. }) => (3, 1.0, 0),
        };
        let restriction = match signal {
            Some(ScoreSignal::Reconstruction { from_position, first, end, sinks }) => {
                [sinks, first, end, from_position]
            }
            _ => [0, 0, 0, u32::MAX],
        };
        Self { mode, inv_tau, seed, by_max: i32::from(mode == 3), restriction }
    }
}

/// One row of a batched attention (the kernels' `AttnRow`, field for field): a query token
/// with its sequence's KV storage for one layer. Pointers are device addresses; the buffers
/// they point into must outlive the launches that read the row.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnRow {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub out: u64,
    pub keys: u64,
    pub values: u64,
    pub slot_pos: u64,
    /// 0: no scores.
    pub scores: u64,
    pub victims: u64,
    pub capacity: i32,
    pub width: i32,
    pub query_pos: u32,
    /// The new token's slot; -1: the slot the last victim freed (`victims[g]`).
    pub store_slot: i32,
    pub score_mode: i32,
    pub inv_tau: f32,
    pub seed: u64,
    pub score_stride: i32,
    pub pad0: i32,
    pub first_recent: u32,
    pub sinks: u32,
    pub evict: i32,
    pub pad: i32,
    /// 0, or the address of `[n_kv_heads][2]` i32 (first slot, slots): the layer's heads packed
    /// one after another, each with its own budget (per-head budgets after the prompt).
    pub heads: u64,
}

// SAFETY: plain old data with the kernels' layout (repr(C), no padding the kernel reads).
unsafe impl cudarc::driver::DeviceRepr for AttnRow {}
// SAFETY: all zeros is a valid row (null pointers, zero sizes).
unsafe impl cudarc::driver::ValidAsZeroBits for AttnRow {}
const _: () = assert!(std::mem::size_of::<AttnRow>() == 136);

impl AttnRow {
    /// Score the row under `signal` (or not), into rows of `stride` floats.
    pub fn with_signal(mut self, signal: Option<ScoreSignal>, scores: u64, stride: usize) -> Self {
        // A repetition (KVzip's) is read as a prompt, never as decode rows.
        let signal = signal.filter(|s| !matches!(s, ScoreSignal::Reconstruction { .. }));
        let (mode, inv_tau, seed) = match signal {
            None | Some(ScoreSignal::Reconstruction { .. }) => (0, 1.0, 0),
            Some(ScoreSignal::Attention) => (1, 1.0, 0),
            Some(ScoreSignal::Keyformer { tau, seed }) => (2, 1.0 / tau, seed),
        };
        self.score_mode = mode;
        self.inv_tau = inv_tau;
        self.seed = seed;
        self.scores = if signal.is_some() { scores } else { 0 };
        self.score_stride = stride as i32;
        self
    }
}

/// The device address of a buffer (for [`AttnRow`]s).
pub fn dev_addr<T>(gpu: &Gpu, buf: &CudaSlice<T>) -> u64 {
    let (p, _sync) = buf.device_ptr(&gpu.stream);
    p
}

/// Shapes shared by the rows of one attention launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q.k.
    pub scale: f32,
    /// Soft-cap of the logits; 0: none.
    pub softcap: f32,
    /// Sliding window in tokens; 0: none.
    pub window: u32,
    /// ALiBi's largest bias; 0: none.
    pub alibi_max: f32,
    /// The widest row's slots.
    pub max_width: usize,
    pub layer: usize,
    /// The first query head's index in the whole model (a tensor-parallel shard's heads are
    /// a slice of the model's; Keyformer's noise is keyed by the global index). 0 on one device.
    pub first_head: usize,
}

impl AttentionShape {
    /// The scoring kernels' `layer` argument: the layer, and the first head in the top 16 bits
    /// (`noise_row_key` in kernels.cu takes them apart).
    fn noise_layer_arg(&self) -> u32 {
        debug_assert!(self.layer < 1 << 16 && self.first_head < 1 << 16);
        self.layer as u32 | (self.first_head as u32) << 16
    }
}

fn grid(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(block).max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl Gpu {
    /// Open GPU `ordinal`: load the driver, compile the kernels for its architecture.
    pub fn open(ordinal: usize) -> Result<Self, GpuError> {
        // SAFETY: these only try to load the shared libraries.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(GpuError::NoDriver);
        }
        let count = CudaContext::device_count().map_err(|e| GpuError::NoDevice(e.to_string()))?;
        if count as usize <= ordinal {
            return Err(GpuError::NoDevice(format!("{count} CUDA devices, asked for device {ordinal}")));
        }
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(GpuError::NoNvrtc);
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(GpuError::NoCublas);
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let info =
            GpuInfo { name: ctx.name()?, compute_capability: (major, minor), total_memory_bytes: ctx.total_mem()? };
        let opts = cudarc::nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++17".into()],
            ..Default::default()
        };
        let source: String = KERNEL_SOURCES.iter().map(|(_, text)| *text).collect::<Vec<_>>().join("\n");
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(source, opts).map_err(|e| GpuError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let kernels = Kernels {
            rms_norm: f("rms_norm")?,
            rope: f("rope")?,
            layer_norm: f("layer_norm")?,
            rms_norm_in_place: f("rms_norm_in_place")?,
            add_bias: f("add_bias")?,
            scale_assign: f("scale_assign")?,
            gelu_mul: f("gelu_mul")?,
            gelu_erf: f("gelu_erf")?,
            clamp_values: f("clamp_values")?,
            silu_mul: f("silu_mul")?,
            f32_to_f16: f("f32_to_f16")?,
            copy_columns_f16: f("copy_columns_f16")?,
            gemv_f16: f("gemv_f16")?,
            attn_decode_partial: [
                f("attn_decode_partial_g1")?,
                f("attn_decode_partial_g2")?,
                f("attn_decode_partial_g4")?,
                f("attn_decode_partial_g8")?,
            ],
            attn_decode_partial_hd256: [
                f("attn_decode_partial_g1_hd256")?,
                f("attn_decode_partial_g2_hd256")?,
                f("attn_decode_partial_g4_hd256")?,
                f("attn_decode_partial_g8_hd256")?,
            ],
            attn_decode_one_pass: [
                f("attn_decode_one_pass_g1")?,
                f("attn_decode_one_pass_g2")?,
                f("attn_decode_one_pass_g4")?,
                f("attn_decode_one_pass_g8")?,
            ],
            attn_decode_combine: f("attn_decode_combine")?,
            choose_victims: f("choose_victims")?,
            kv_store: f("kv_store")?,
            gather_slots: f("gather_slots")?,
            embed_rows: f("embed_rows")?,
            add_assign: f("add_assign")?,
            add_rms_norm: f("add_rms_norm")?,
            argmax_rows: f("argmax_rows")?,
            kv_append: f("kv_append")?,
            prefill_softmax: f("prefill_softmax")?,
            prefill_scores: f("prefill_scores")?,
            flash_prefill: FLASH_HEAD_DIMS
                .iter()
                .map(|hd| f(&format!("flash_prefill_hd{hd}")))
                .collect::<Result<_, _>>()?,
            flash_prefill_lean: FLASH_HEAD_DIMS
                .iter()
                .map(|hd| f(&format!("flash_prefill_lean_hd{hd}")))
                .collect::<Result<_, _>>()?,
            flash_prefill_wide: FLASH_HEAD_DIMS
                .iter()
                .map(|hd| f(&format!("flash_prefill_wide_hd{hd}")))
                .collect::<Result<_, _>>()?,
            flash_scores: FLASH_HEAD_DIMS
                .iter()
                .map(|hd| f(&format!("flash_scores_hd{hd}")))
                .collect::<Result<_, _>>()?,
            fill_random_f16: f("fill_random_f16")?,
            read_sum: f("read_sum")?,
            quantize_q8: f("quantize_q8")?,
            quant: QUANTISED_ON_GPU
                .iter()
                .map(|t| {
                    let name = t.name().to_lowercase();
                    Ok(QuantKernels {
                        gemv: f(&format!("gemv_{name}"))?,
                        gemv1: f(&format!("gemv1_{name}"))?,
                        dequant_f16: f(&format!("dequant_f16_{name}"))?,
                        embed: f(&format!("embed_{name}"))?,
                    })
                })
                .collect::<Result<Vec<_>, cudarc::driver::DriverError>>()?,
        };
        // One stream of our own for all work: the legacy default stream cannot be captured into
        // a graph. Every buffer is used on this stream only, so cudarc's per-buffer events (for
        // ordering across streams) are turned off before any is made.
        // SAFETY: nothing was allocated in this context yet, and all work stays on one stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let gumbel_table = stream.clone_htod(noise::gumbel_table())?;
        let sm_count =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        let victim_fold_rows =
            std::env::var("KEYFORMER_VICTIM_FOLD_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(VICTIM_FOLD_ROWS);
        let flash_prefill = major >= 8 && std::env::var("KEYFORMER_FLASH_PREFILL").map_or(true, |v| v != "0");
        let mut flash_kernel = match std::env::var("KEYFORMER_FLASH_KERNEL").as_deref() {
            Ok("general") => FlashKernel::General,
            Ok("lean") => FlashKernel::Lean,
            Ok("wide") => FlashKernel::Wide,
            _ => FLASH_KERNEL,
        };
        let one_pass_heads = if ONE_PASS_BY_DEFAULT { ONE_PASS_BLOCKS_PER_SM * sm_count } else { usize::MAX };
        // The 128-row flash kernels' shared memory is dynamic, past the 48 KiB a block gets
        // unasked at the larger head sizes; a GPU that refuses it runs the 64-row kernel.
        let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        let wide_allowed = major >= 8
            && kernels
                .flash_prefill_wide
                .iter()
                .zip(FLASH_HEAD_DIMS)
                .all(|(f, hd)| f.set_attribute(attr, flash_wide_shared_bytes(hd) as i32).is_ok());
        if !wide_allowed && flash_kernel == FlashKernel::Wide {
            flash_kernel = FlashKernel::Lean;
        }
        let mut one_pass_logit_room = [0usize; 4];
        for (room, f) in one_pass_logit_room.iter_mut().zip(&kernels.attn_decode_one_pass) {
            *room = BLOCK_SHARED_BYTES.saturating_sub(f.shared_size_bytes()?.max(0) as usize);
        }
        let forced_pass = match std::env::var("KEYFORMER_DECODE_PASS").as_deref() {
            Ok("ranges") => Some(DecodePass::Ranges { fold_victims: true }),
            Ok("ranges-own-kernel") => Some(DecodePass::Ranges { fold_victims: false }),
            Ok("whole-heads") => Some(DecodePass::WholeHeads),
            Ok("one-pass") => Some(DecodePass::OnePass),
            _ => None,
        };
        Ok(Self {
            info,
            stream,
            blas,
            kernels,
            gumbel_table,
            sm_count,
            victim_fold_rows,
            one_pass_heads,
            forced_pass,
            one_pass_logit_room,
            flash_prefill,
            flash_kernel: (flash_kernel as usize).into(),
            flash_wide: wide_allowed,
        })
    }

    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.clone_htod(host)?)
    }

    pub fn upload_into<T: cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
        dev: &mut CudaSlice<T>,
    ) -> Result<(), GpuError> {
        if host.len() != dev.len() {
            return Err(GpuError::Shape(format!("{} values into a buffer of {}", host.len(), dev.len())));
        }
        Ok(self.stream.memcpy_htod(host, dev)?)
    }

    pub fn download<T: cudarc::driver::DeviceRepr>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>, GpuError> {
        Ok(self.stream.clone_dtoh(dev)?)
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        Ok(self.stream.alloc_zeros(n)?)
    }

    /// Hand memory that was freed back to the device (the stream-ordered allocator keeps it
    /// pooled otherwise, and the device's free memory would not show it).
    pub fn release_free_memory(&self) -> Result<(), GpuError> {
        self.synchronize()?;
        let dev = self.stream.context().cu_device();
        // SAFETY: the device comes from a live context; trimming only releases unused blocks.
        unsafe {
            let pool = cudarc::driver::result::device::get_mem_pool(dev)?;
            cudarc::driver::result::mem_pool::trim_to(pool, 0)?;
        }
        Ok(())
    }

    /// Make this GPU's context current on the calling thread.
    pub fn bind_to_thread(&self) -> Result<(), GpuError> {
        Ok(self.stream.context().bind_to_thread()?)
    }

    /// Wait for everything queued.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// `out[r] = x[r] / rms(x[r]) * weight` for every row of `weight.len()` values (and an f16
    /// copy into `out16` when given).
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
        out16: Option<&mut CudaSlice<u16>>,
    ) -> Result<(), GpuError> {
        let dim = weight.len();
        if dim == 0 || x.len() % dim != 0 || out.len() < x.len() || out16.as_ref().is_some_and(|o| o.len() < x.len()) {
            return Err(GpuError::Shape(format!("rms_norm of {} values by rows of {dim}", x.len())));
        }
        let rows = x.len() / dim;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let dim_i = dim as i32;
        let null = 0u64;
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(x).arg(weight).arg(out);
        match out16 {
            Some(o) => b.arg(o),
            None => b.arg(&null),
        };
        b.arg(&dim_i).arg(&eps);
        // SAFETY: the kernel reads rows * dim values of x and dim of weight, writes rows * dim
        // (and as many f16 values, or none through a null address).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x += y`, then `out` = the RMS norm of x (as [`rms_norm`](Self::rms_norm)), in one pass
    /// over rows of `weight.len()` values (and an f16 copy of `out` into `out16` when given).
    pub fn add_rms_norm(
        &self,
        x: &mut CudaViewMut<f32>,
        y: &CudaView<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaViewMut<f32>,
        out16: Option<&mut CudaViewMut<u16>>,
    ) -> Result<(), GpuError> {
        let dim = weight.len();
        let short16 = out16.as_ref().is_some_and(|o| o.len() < x.len());
        if dim == 0 || x.len() % dim != 0 || y.len() < x.len() || out.len() < x.len() || short16 {
            let (n, m) = (x.len(), y.len());
            return Err(GpuError::Shape(format!("add and rms_norm of {n} + {m} values by rows of {dim}")));
        }
        let rows = x.len() / dim;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let dim_i = dim as i32;
        let null = 0u64;
        let mut b = self.stream.launch_builder(&self.kernels.add_rms_norm);
        b.arg(&mut *x).arg(y).arg(weight).arg(out);
        match out16 {
            Some(o) => b.arg(o),
            None => b.arg(&null),
        };
        b.arg(&dim_i).arg(&eps);
        // SAFETY: block r reads and writes row r of x, reads row r of y and the weight, writes
        // row r of out (and of out16, or nothing through a null address); rows * dim values in
        // each (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Rotary embedding, as `cpu::rope`: `x` holds `positions.len()` rows of
    /// `n_heads * head_dim`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        n_heads: usize,
        head_dim: usize,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        style: crate::backend::RopeStyle,
        mscale: f32,
    ) -> Result<(), GpuError> {
        self.rope_launch(x, n_heads, None, head_dim, positions, inv_freq, style, mscale, None)
    }

    /// [`rope`](Self::rope) on `q` (`n_heads` heads a row) and `k` (`n_kv_heads`) in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn rope_qk(
        &self,
        q: &mut CudaSlice<f32>,
        k: &mut CudaSlice<f32>,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        style: crate::backend::RopeStyle,
        mscale: f32,
        q16: Option<&mut CudaSlice<u16>>,
    ) -> Result<(), GpuError> {
        self.rope_launch(q, n_heads, Some((k, n_kv_heads)), head_dim, positions, inv_freq, style, mscale, q16)
    }

    /// One launch of the `rope` kernel over `x` and, when given, a second tensor of the same
    /// rows; `x16` receives an f16 copy of x (only where every value turns: 2 * pairs = head_dim).
    #[allow(clippy::too_many_arguments)]
    fn rope_launch(
        &self,
        x: &mut CudaSlice<f32>,
        n_heads: usize,
        second: Option<(&mut CudaSlice<f32>, usize)>,
        head_dim: usize,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
        style: crate::backend::RopeStyle,
        mscale: f32,
        x16: Option<&mut CudaSlice<u16>>,
    ) -> Result<(), GpuError> {
        let (rows, pairs) = (positions.len(), inv_freq.len());
        let n_heads2 = second.as_ref().map_or(0, |(_, h)| *h);
        let second_fits = second.as_ref().is_none_or(|(k, h)| k.len() == rows * h * head_dim);
        let copy_fits = x16.as_ref().is_none_or(|c| c.len() >= x.len() && 2 * pairs == head_dim);
        if x.len() != rows * n_heads * head_dim || !second_fits || 2 * pairs > head_dim || !copy_fits {
            return Err(GpuError::Shape(format!(
                "rope on {} values ({n_heads} heads, and {n_heads2} more heads a row), {rows} rows of {head_dim}",
                x.len()
            )));
        }
        let n = rows * (n_heads + n_heads2) * pairs;
        let halves = (style == crate::backend::RopeStyle::Halves) as i32;
        let dims = [rows as i32, n_heads as i32, head_dim as i32, pairs as i32, n_heads2 as i32];
        let mut b = self.stream.launch_builder(&self.kernels.rope);
        b.arg(&mut *x).arg(positions).arg(inv_freq);
        b.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&halves).arg(&mscale);
        let none = 0u64;
        match second {
            Some((k, _)) => b.arg(k),
            None => b.arg(&none),
        };
        b.arg(&dims[4]);
        match x16 {
            Some(c) => b.arg(c),
            None => b.arg(&none),
        };
        // SAFETY: one thread per (row, head, pair) of x, then of the second tensor (a null
        // address with no heads when there is none), all within them, and x's f16 copy as long
        // as x or a null address (checked above).
        unsafe { b.launch(grid(n, 256)) }?;
        Ok(())
    }

    /// `out[r] = LayerNorm(x[r]) * weight (+ bias)` for `rows` rows of `weight.len()` values.
    pub fn layer_norm(
        &self,
        x: &CudaView<f32>,
        weight: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        eps: f32,
        out: &mut CudaViewMut<f32>,
    ) -> Result<(), GpuError> {
        let dim = weight.len();
        if dim == 0 || x.len() % dim != 0 || out.len() < x.len() || bias.is_some_and(|b| b.len() != dim) {
            return Err(GpuError::Shape(format!("layer_norm of {} values by rows of {dim}", x.len())));
        }
        let rows = x.len() / dim;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (dim_i, has_bias) = (dim as i32, bias.is_some() as i32);
        let mut b = self.stream.launch_builder(&self.kernels.layer_norm);
        b.arg(x).arg(weight).arg(bias.unwrap_or(weight)).arg(&has_bias).arg(out).arg(&dim_i).arg(&eps);
        // SAFETY: one block per row of dim values, within both views (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// RMSNorm in place of the first `pieces` pieces of `weight.len()` values of `x`.
    pub fn rms_norm_in_place(
        &self,
        x: &mut CudaSlice<f32>,
        pieces: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<(), GpuError> {
        let dim = weight.len();
        if dim == 0 || x.len() < pieces * dim {
            return Err(GpuError::Shape(format!("rms_norm of {pieces} x {dim} in {} values", x.len())));
        }
        if pieces == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig { grid_dim: (pieces as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let dim_i = dim as i32;
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm_in_place);
        b.arg(x).arg(weight).arg(&dim_i).arg(&eps);
        // SAFETY: one block per piece, within x (checked above).
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `x[r] += bias` for the first `rows` rows of `bias.len()` values.
    pub fn add_bias(&self, x: &mut CudaSlice<f32>, rows: usize, bias: &CudaSlice<f32>) -> Result<(), GpuError> {
        let dim = bias.len();
        if dim == 0 || x.len() < rows * dim {
            return Err(GpuError::Shape(format!("bias of {dim} on {rows} rows of {} values", x.len())));
        }
        let (n, dim_i) = ((rows * dim) as i64, dim as i32);
        let mut b = self.stream.launch_builder(&self.kernels.add_bias);
        b.arg(x).arg(bias).arg(&n).arg(&dim_i);
        // SAFETY: one thread per value of the rows, within x (checked above).
        unsafe { b.launch(grid(n as usize, 256)) }?;
        Ok(())
    }

    /// `x *= s`.
    pub fn scale(&self, x: &mut CudaSlice<f32>, s: f32) -> Result<(), GpuError> {
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(&self.kernels.scale_assign);
        b.arg(x).arg(&s).arg(&n);
        // SAFETY: one thread per value of x.
        unsafe { b.launch(grid(n as usize, 256)) }?;
        Ok(())
    }

    /// `gate = gelu_tanh(gate) * up`, or `gelu_tanh(gate)` without `up`.
    pub fn gelu_mul(&self, gate: &mut CudaSlice<f32>, up: Option<&CudaSlice<f32>>) -> Result<(), GpuError> {
        if up.is_some_and(|u| u.len() != gate.len()) {
            return Err(GpuError::Shape(format!("gelu_mul of {} values", gate.len())));
        }
        let n = gate.len() as i64;
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(&self.kernels.gelu_mul);
        b.arg(&mut *gate);
        match up {
            Some(u) => b.arg(u),
            None => b.arg(&null),
        };
        b.arg(&n);
        // SAFETY: one thread per value of gate (and of up, the same length, when given).
        unsafe { b.launch(grid(n as usize, 256)) }?;
        Ok(())
    }

    /// `x = gelu(x)`, exact.
    pub fn gelu_erf(&self, x: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(&self.kernels.gelu_erf);
        b.arg(&mut *x).arg(&n);
        // SAFETY: one thread per value of x.
        unsafe { b.launch(grid(n as usize, 256)) }?;
        Ok(())
    }

    /// Every value of `x` into `[-limit, limit]`.
    pub fn clamp(&self, x: &mut CudaSlice<f32>, limit: f32) -> Result<(), GpuError> {
        let n = x.len() as i64;
        let mut b = self.stream.launch_builder(&self.kernels.clamp_values);
        b.arg(&mut *x).arg(&n).arg(&limit);
        // SAFETY: one thread per value of x.
        unsafe { b.launch(grid(n as usize, 256)) }?;
        Ok(())
    }

    /// `gate = silu(gate) * up` (and its f16 copy into `gate16` when given).
    pub fn silu_mul(
        &self,
        gate: &mut CudaSlice<f32>,
        up: &CudaSlice<f32>,
        gate16: Option<&mut CudaSlice<u16>>,
    ) -> Result<(), GpuError> {
        if gate.len() != up.len() || gate16.as_ref().is_some_and(|g| g.len() < gate.len()) {
            return Err(GpuError::Shape(format!("silu_mul of {} and {} values", gate.len(), up.len())));
        }
        let n = gate.len();
        let n_i = n as i64;
        let null = 0u64;
        let mut b = self.stream.launch_builder(&self.kernels.silu_mul);
        b.arg(gate).arg(up).arg(&n_i);
        match gate16 {
            Some(g) => b.arg(g),
            None => b.arg(&null),
        };
        // The kernel takes four values a thread when n allows.
        let threads = if n % 4 == 0 { n / 4 } else { n };
        // SAFETY: one thread per element (or per four) of both (equal lengths) and of the copy
        // (as long, or a null address).
        unsafe { b.launch(grid(threads, 256)) }?;
        Ok(())
    }

    /// `y[t] = W x[t]` for the `n` rows of `x`: `w` f16 `[rows][cols]` (as GGUF stores a
    /// weight), `x` f32 `[n][cols]`, `y` f32 `[n][rows]`, f32 accumulation. One row through
    /// our GEMV (x as it is); more through cuBLAS (x converted to f16 in `x16`).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_f16(
        &self,
        w: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        x: &CudaSlice<f32>,
        n: usize,
        x16: &mut CudaSlice<u16>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if uses_gemv(n, cols) {
            return self.gemv_f16(w, rows, cols, x, y);
        }
        self.to_f16(x, n * cols, x16)?;
        self.gemm_f16(w, rows, cols, x16, n, y)
    }

    /// The kernel parameter of one GEMV launch over the weights `ws` (`(weight, rows)`) into
    /// `ys`, and the guards that keep those buffers borrowed until the launch is queued.
    fn gemv_params<'a, T, W: DevicePtr<T>, Y: DevicePtrMut<f32>>(
        &'a self,
        ws: &'a [(&W, usize)],
        ys: &'a mut [&mut Y],
    ) -> (GemvWeights, Vec<SyncOnDrop<'a>>) {
        let mut params = GemvWeights::default();
        let mut guards = Vec::with_capacity(2 * ws.len() + 1);
        for (i, ((w, rows), y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
            let (wp, gw) = w.device_ptr(&self.stream);
            let (yp, gy) = y.device_ptr_mut(&self.stream);
            (params.w[i], params.y[i], params.rows[i]) = (wp, yp, *rows as i32);
            guards.extend([gw, gy]);
        }
        (params, guards)
    }

    /// [`matmul_f16`](Self::matmul_f16) of one row ([`uses_gemv`]): a warp per pair of output
    /// features (kernels.cu `gemv_f16`).
    pub fn gemv_f16(
        &self,
        w: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.gemv_f16_many(&[(w, rows)], cols, x, &mut [y])
    }

    /// [`gemv_f16`](Self::gemv_f16) of up to [`GEMV_WEIGHTS`] weights (`(weight, rows)`) that
    /// share the input `x`, into `ys`, in one launch.
    pub fn gemv_f16_many(
        &self,
        ws: &[(&CudaSlice<u16>, usize)],
        cols: usize,
        x: &CudaSlice<f32>,
        ys: &mut [&mut CudaSlice<f32>],
    ) -> Result<(), GpuError> {
        let shapes_fit = ws.iter().zip(ys.iter()).all(|((w, rows), y)| w.len() == rows * cols && y.len() >= *rows);
        if ws.is_empty()
            || ws.len() > GEMV_WEIGHTS
            || ws.len() != ys.len()
            || !uses_gemv(1, cols)
            || !shapes_fit
            || x.len() < cols
        {
            let shapes: Vec<String> =
                ws.iter().map(|(w, rows)| format!("{rows} x {cols} ({} values)", w.len())).collect();
            return Err(GpuError::Shape(format!(
                "GEMV of weights [{}] with {} values into {} outputs",
                shapes.join(", "),
                x.len(),
                ys.len()
            )));
        }
        let max_rows = ws.iter().map(|(_, rows)| *rows).max().unwrap_or(0);
        let cols_i = cols as i32;
        let (params, guards) = self.gemv_params(ws, ys);
        let mut cfg = grid(max_rows.div_ceil(2) * 32, 256);
        cfg.grid_dim.1 = ws.len() as u32;
        let mut b = self.stream.launch_builder(&self.kernels.gemv_f16);
        b.arg(&params).arg(x).arg(&cols_i);
        // SAFETY: block (i, j) is a warp per pair of rows of weight j (blocks past its rows
        // return); each reads its weight rows in 16-byte pieces (cols % 8 == 0, aligned
        // allocations) and x's cols values, and writes y_j's rows; all checked above. The
        // guards keep the addresses' buffers borrowed until the launch is queued.
        unsafe { b.launch(cfg) }?;
        drop(guards);
        Ok(())
    }

    /// The first `m` values of `x` as f16 into `x16`.
    pub fn to_f16(&self, x: &CudaSlice<f32>, m: usize, x16: &mut CudaSlice<u16>) -> Result<(), GpuError> {
        if x.len() < m || x16.len() < m {
            return Err(GpuError::Shape(format!("{m} values to f16 from {} into {}", x.len(), x16.len())));
        }
        let m_i = m as i64;
        let mut b = self.stream.launch_builder(&self.kernels.f32_to_f16);
        b.arg(x).arg(&mut *x16).arg(&m_i);
        // SAFETY: converts the first m values (both hold at least that many).
        unsafe { b.launch(grid(m, 256)) }?;
        Ok(())
    }

    /// `y[t] = W x16[t]` (f16 inputs, f32 accumulation and output) for `n` rows.
    pub fn gemm_f16(
        &self,
        w: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        x16: &CudaSlice<u16>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if w.len() != rows * cols {
            return Err(GpuError::Shape(format!("a {rows} x {cols} weight of {} values", w.len())));
        }
        self.gemm_f16_rows(w, rows, cols, x16, n, y, 0, rows)
    }

    /// Rows `row0 .. row0 + rows` of a product whose output has `out_rows` features:
    /// `y[t][row0 + r] = W[r] x16[t]` for a weight tile `w` of `rows` x `cols`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_f16_rows(
        &self,
        w: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        x16: &CudaSlice<u16>,
        n: usize,
        y: &mut CudaSlice<f32>,
        row0: usize,
        out_rows: usize,
    ) -> Result<(), GpuError> {
        if w.len() < rows * cols || row0 + rows > out_rows || y.len() < n * out_rows || x16.len() < n * cols {
            return Err(GpuError::Shape(format!(
                "matmul of a {rows} x {cols} weight ({} values) with {n} rows ({} f16 values) into {} at row {row0} \
                 of {out_rows}",
                w.len(),
                x16.len(),
                y.len()
            )));
        }
        // Row-major W [rows][cols] is column-major W^T: C (rows x n, column-major = y row-major
        // with out_rows per row) = op(A) B with A = W^T stored (lda = cols), op = transpose,
        // B = x^T (ldb = cols).
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.device_ptr(&self.stream);
        let (bx, _gb) = x16.device_ptr(&self.stream);
        let (c, _gc) = y.device_ptr_mut(&self.stream);
        let c = c + (row0 * 4) as u64;
        // SAFETY: pointers and leading dimensions describe the buffers checked above.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                rows as i32,
                n as i32,
                cols as i32,
                &alpha as *const f32 as *const _,
                a as *const _,
                blas_sys::cudaDataType::CUDA_R_16F,
                cols as i32,
                bx as *const _,
                blas_sys::cudaDataType::CUDA_R_16F,
                cols as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                blas_sys::cudaDataType::CUDA_R_32F,
                out_rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )?;
        }
        Ok(())
    }

    fn quant_kernels(&self, t: GgmlType) -> Result<&QuantKernels, GpuError> {
        QUANTISED_ON_GPU
            .iter()
            .position(|q| *q == t)
            .map(|i| &self.kernels.quant[i])
            .ok_or_else(|| GpuError::Shape(format!("{t} weights are not kept quantised on the GPU")))
    }

    /// Check a quantised weight's bytes against its shape.
    fn check_quantised(t: GgmlType, blocks: &CudaSlice<u8>, rows: usize, cols: usize) -> Result<(), GpuError> {
        if cols % t.block_size() != 0 || blocks.len() != rows * t.row_bytes(cols) {
            return Err(GpuError::Shape(format!(
                "a {rows} x {cols} {t} weight in {} bytes (rows of whole {}-value blocks expected)",
                blocks.len(),
                t.block_size()
            )));
        }
        Ok(())
    }

    /// The first `values` activations (a multiple of 32) quantised as the CPU's integer
    /// products quantise them (quant::dot::quantize_q8) into `xq`: [`Q8_BLOCK_BYTES`] per 32.
    pub fn quantize_q8(&self, x: &CudaSlice<f32>, values: usize, xq: &mut CudaSlice<u8>) -> Result<(), GpuError> {
        let blocks = values / 32;
        if values % 32 != 0 || x.len() < values || xq.len() < blocks * Q8_BLOCK_BYTES {
            return Err(GpuError::Shape(format!(
                "{values} activations to Q8 from {} into {} bytes",
                x.len(),
                xq.len()
            )));
        }
        let blocks_i = blocks as i32;
        let mut b = self.stream.launch_builder(&self.kernels.quantize_q8);
        b.arg(x).arg(&mut *xq).arg(&blocks_i);
        // SAFETY: a warp per block of 32 values, each within x and xq (checked above).
        unsafe { b.launch(grid(blocks * 32, 256)) }?;
        Ok(())
    }

    /// `y[t] = W xq[t]` for `n` ([`QUANT_GEMV_MAX_ROWS`] at most) activation rows quantised by
    /// [`quantize_q8`](Self::quantize_q8), `W` a quantised `rows` x `cols` weight: a warp per
    /// output feature.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_quantised(
        &self,
        t: GgmlType,
        w: &CudaSlice<u8>,
        rows: usize,
        cols: usize,
        xq: &CudaSlice<u8>,
        n: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.gemv_quantised_many(t, &[(w, rows)], cols, xq, n, &mut [y])
    }

    /// [`gemv_quantised`](Self::gemv_quantised) of up to [`GEMV_WEIGHTS`] weights of one type
    /// (`(blocks, rows)`) that share the activations `xq`, into `ys`, in one launch.
    pub fn gemv_quantised_many<X: DevicePtr<u8>, Y: DevicePtrMut<f32>>(
        &self,
        t: GgmlType,
        ws: &[(&CudaSlice<u8>, usize)],
        cols: usize,
        xq: &X,
        n: usize,
        ys: &mut [&mut Y],
    ) -> Result<(), GpuError> {
        for (w, rows) in ws {
            Self::check_quantised(t, w, *rows, cols)?;
        }
        let outputs_fit = ws.iter().zip(ys.iter()).all(|((_, rows), y)| y.len() >= n * rows);
        if ws.is_empty()
            || ws.len() > GEMV_WEIGHTS
            || ws.len() != ys.len()
            || !outputs_fit
            || n == 0
            || n > QUANT_GEMV_MAX_ROWS
            || xq.len() < n * cols / 32 * Q8_BLOCK_BYTES
        {
            return Err(GpuError::Shape(format!(
                "quantised GEMV of {} weights and {n} rows ({} activation bytes) into {} outputs",
                ws.len(),
                xq.len(),
                ys.len()
            )));
        }
        let max_rows = ws.iter().map(|(_, rows)| *rows).max().unwrap_or(0);
        let (cols_i, n_i) = (cols as i32, n as i32);
        let (params, mut guards) = self.gemv_params(ws, ys);
        let (xp, gx) = xq.device_ptr(&self.stream);
        guards.push(gx);
        let kernels = self.quant_kernels(t)?;
        // quant.cu's one-row Q4_K / Q5_K GEMV takes two output rows a warp.
        let rows_per_warp = if n == 1 && matches!(t, GgmlType::Q4K | GgmlType::Q5K) { 2 } else { 1 };
        let mut cfg = grid(max_rows.div_ceil(rows_per_warp) * 32, 256);
        cfg.grid_dim.1 = ws.len() as u32;
        let mut b = self.stream.launch_builder(if n == 1 { &kernels.gemv1 } else { &kernels.gemv });
        b.arg(&params).arg(&xp).arg(&cols_i).arg(&n_i);
        // SAFETY: block (i, j) is a warp per output row (or two) of weight j (blocks past its
        // rows return), reading that row's blocks and the n activation rows' blocks and writing
        // y_j[t][row] for t < n (all checked above); the guards hold the buffers until queued.
        unsafe { b.launch(cfg) }?;
        drop(guards);
        Ok(())
    }

    /// Rows `row0 .. row0 + n_rows` of a quantised weight as f16 into `out` (`[n_rows][cols]`).
    #[allow(clippy::too_many_arguments)]
    pub fn dequantise_f16(
        &self,
        t: GgmlType,
        w: &CudaSlice<u8>,
        rows: usize,
        cols: usize,
        row0: usize,
        n_rows: usize,
        out: &mut CudaSlice<u16>,
    ) -> Result<(), GpuError> {
        Self::check_quantised(t, w, rows, cols)?;
        if row0 + n_rows > rows || out.len() < n_rows * cols {
            return Err(GpuError::Shape(format!("rows {row0}..{} of {rows} into {} values", row0 + n_rows, out.len())));
        }
        let (cols_i, row0_i, n_i) = (cols as i32, row0 as i32, n_rows as i32);
        let mut b = self.stream.launch_builder(&self.quant_kernels(t)?.dequant_f16);
        b.arg(w).arg(&mut *out).arg(&cols_i).arg(&row0_i).arg(&n_i);
        // SAFETY: a thread per 32-value sub-block of the rows asked, within w and out (checked).
        unsafe { b.launch(grid(n_rows * cols / 32, 256)) }?;
        Ok(())
    }

    /// `out[i] = W[tokens[i]]` (f32) for the first `n` tokens, `W` a quantised table whose
    /// rows the caller has checked the tokens against.
    pub fn embed_quantised(
        &self,
        t: GgmlType,
        w: &CudaSlice<u8>,
        rows: usize,
        cols: usize,
        tokens: &CudaSlice<u32>,
        n: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        Self::check_quantised(t, w, rows, cols)?;
        if tokens.len() < n || out.len() < n * cols {
            return Err(GpuError::Shape(format!("{n} embedding rows of {cols} into {} values", out.len())));
        }
        let cols_i = cols as i32;
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(&self.quant_kernels(t)?.embed);
        b.arg(w).arg(tokens).arg(&mut *out).arg(&cols_i);
        // SAFETY: block i reads row tokens[i] (< rows, the caller's check) and writes out row i.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// `y[t] = W x[t]` for `n` rows of f32 activations and a quantised weight: up to
    /// [`QUANT_GEMV_MAX_ROWS`] rows through [`gemv_quantised`](Self::gemv_quantised) (`x`
    /// quantised into `xq`, unless `x_quantised` says it already is), more through cuBLAS on
    /// f16 tiles of [`QUANT_TILE_VALUES`] (`x16` and `tile` are grown as needed; `x_f16`, an
    /// f16 copy of x written by the op that wrote it, is read in place of converting x).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_quantised(
        &self,
        t: GgmlType,
        w: &CudaSlice<u8>,
        rows: usize,
        cols: usize,
        x: &CudaSlice<f32>,
        n: usize,
        buffers: &mut QuantBuffers,
        x_quantised: bool,
        x_f16: Option<&CudaSlice<u16>>,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        if n <= QUANT_GEMV_GROUPED_ROWS {
            grow(self, &mut buffers.xq, n * cols / 32 * Q8_BLOCK_BYTES)?;
            let xq = buffers.xq.as_mut().expect("grown");
            if !x_quantised {
                self.quantize_q8(x, n * cols, xq)?;
            }
            if n <= QUANT_GEMV_MAX_ROWS {
                return self.gemv_quantised(t, w, rows, cols, xq, n, y);
            }
            let row_bytes = cols / 32 * Q8_BLOCK_BYTES;
            for first in (0..n).step_by(QUANT_GEMV_MAX_ROWS) {
                let group = QUANT_GEMV_MAX_ROWS.min(n - first);
                let xs = xq.slice(first * row_bytes..(first + group) * row_bytes);
                let mut ys = y.slice_mut(first * rows..(first + group) * rows);
                self.gemv_quantised_many(t, &[(w, rows)], cols, &xs, group, &mut [&mut ys])?;
            }
            return Ok(());
        }
        let tile_rows = crate::quant::row_tiles(rows, cols, QUANT_TILE_VALUES).map(|r| r.len()).max().unwrap_or(1);
        grow(self, &mut buffers.tile, tile_rows * cols)?;
        let tile = buffers.tile.as_mut().expect("grown");
        let x16 = match x_f16.filter(|c| c.len() >= n * cols) {
            Some(copy) => copy,
            None => {
                grow(self, &mut buffers.x16, n * cols)?;
                let x16 = buffers.x16.as_mut().expect("grown");
                if !x_quantised {
                    self.to_f16(x, n * cols, x16)?;
                }
                x16
            }
        };
        for r in crate::quant::row_tiles(rows, cols, QUANT_TILE_VALUES) {
            self.dequantise_f16(t, w, rows, cols, r.start, r.len(), tile)?;
            self.gemm_f16_rows(tile, r.len(), cols, x16, n, y, r.start, rows)?;
        }
        Ok(())
    }

    /// Fill `w` with tensor `tensor`'s random weights (`models::random::value`).
    pub fn fill_random_f16(&self, w: &mut CudaSlice<u16>, seed: u64, tensor: u32, scale: f32) -> Result<(), GpuError> {
        let n = w.len();
        let n_i = n as i64;
        let mut b = self.stream.launch_builder(&self.kernels.fill_random_f16);
        b.arg(&mut *w).arg(&n_i).arg(&seed).arg(&tensor).arg(&scale);
        // SAFETY: one thread per element of w.
        unsafe { b.launch(grid(n, 256)) }?;
        Ok(())
    }

    /// Columns `columns` of every row of a `rows` x `cols` f16 matrix, as a new matrix.
    pub fn copy_columns_f16(
        &self,
        src: &CudaSlice<u16>,
        rows: usize,
        cols: usize,
        columns: std::ops::Range<usize>,
    ) -> Result<CudaSlice<u16>, GpuError> {
        if src.len() != rows * cols || columns.end > cols || columns.is_empty() {
            return Err(GpuError::Shape(format!("columns {columns:?} of a {rows} x {cols} matrix")));
        }
        let width = columns.len();
        let mut dst = self.zeros::<u16>(rows * width)?;
        let ints = [rows as i64, cols as i64, columns.start as i64, width as i64];
        let mut b = self.stream.launch_builder(&self.kernels.copy_columns_f16);
        b.arg(src).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&mut dst);
        let cfg = LaunchConfig { grid_dim: (1024, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: a grid-stride loop over dst's rows x width values, each read inside src.
        unsafe { b.launch(cfg) }?;
        Ok(dst)
    }

    /// Compaction: slot `to_slots[i]` of `to` takes slot `from_slots[i]` of `from` (slots counted
    /// over the whole layer, heads one after another).
    pub fn gather_slots(
        &self,
        from: &kv::LayerKv,
        to: &mut kv::LayerKv,
        from_slots: &[u32],
        to_slots: &[u32],
        head_dim: usize,
    ) -> Result<(), GpuError> {
        let (old_slots, new_slots) = (from.positions.len(), to.positions.len());
        let bad = from_slots.len() != to_slots.len()
            || from_slots.is_empty()
            || from_slots.iter().any(|&s| s as usize >= old_slots)
            || to_slots.iter().any(|&s| s as usize >= new_slots);
        if bad {
            return Err(GpuError::Shape(format!(
                "gather of {} slots of {old_slots} into {} of {new_slots}",
                from_slots.len(),
                to_slots.len()
            )));
        }
        let (from_dev, to_dev) = (self.upload(from_slots)?, self.upload(to_slots)?);
        let hd = head_dim as i32;
        let null = 0u64;
        let cfg = LaunchConfig {
            grid_dim: (from_slots.len() as u32, 1, 1),
            block_dim: (head_dim.clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.gather_slots);
        b.arg(&from_dev).arg(&to_dev).arg(&hd).arg(&from.keys).arg(&from.values).arg(&from.positions);
        // Scores are copied where both sides keep them.
        match (&from.scores, &to.scores) {
            (Some(s), Some(_)) => b.arg(s),
            _ => b.arg(&null),
        };
        b.arg(&mut to.keys).arg(&mut to.values).arg(&mut to.positions);
        match &mut to.scores {
            Some(s) => b.arg(s),
            None => b.arg(&null),
        };
        // SAFETY: block i copies old slot from[i] (below the old storage's slots, checked) to
        // new slot to[i] (below the new storage's, checked); scores are read only where both
        // sides keep them.
        unsafe { b.launch(cfg) }?;
        self.synchronize()?; // the index arrays are freed on return
        Ok(())
    }

    /// Attention of `n_rows` rows (the first of `rows`; see [`AttnRow`]), in two kernels
    /// (flash-decoding: chunks of slots in parallel, then their combination): each row's `out`
    /// gets `[n_heads][head_dim]`; a scored row adds each slot's
    /// probability under its signal, summed over the query heads of its KV head, to `scores`.
    /// Rows that evict choose their victims too ([`DecodePass::for_batch`] says how).
    pub fn attention_rows(
        &self,
        rows: &CudaView<AttnRow>,
        n_rows: usize,
        shape: AttentionShape,
        scratch: &mut AttentionScratch,
    ) -> Result<(), GpuError> {
        let pass = self.forced_pass.unwrap_or_else(|| {
            let heads = n_rows * shape.n_kv_heads;
            DecodePass::for_batch(heads, self.sm_count, self.one_pass_heads, n_rows <= self.victim_fold_rows)
        });
        self.attention_rows_as(rows, n_rows, shape, scratch, pass)
    }

    /// Whether a decode attention of this shape can run in one pass (else `OnePass` runs as
    /// `WholeHeads`): head sizes up to 128, the group's logits within the entry point's room.
    pub fn one_pass_fits(&self, n_heads: usize, n_kv_heads: usize, head_dim: usize, max_width: usize) -> bool {
        let group = n_heads / n_kv_heads.max(1);
        let entry = group.next_power_of_two().trailing_zeros() as usize;
        let logit_bytes = group * max_width * std::mem::size_of::<f32>();
        head_dim <= 128 && entry < 4 && logit_bytes <= self.one_pass_logit_room[entry]
    }

    /// [`attention_rows`](Self::attention_rows) laid out as `pass` says.
    pub fn attention_rows_as(
        &self,
        rows: &CudaView<AttnRow>,
        n_rows: usize,
        shape: AttentionShape,
        scratch: &mut AttentionScratch,
        pass: DecodePass,
    ) -> Result<(), GpuError> {
        let AttentionShape { n_heads, n_kv_heads, head_dim: hd, max_width, scale, softcap, window, alibi_max, .. } =
            shape;
        // Fixed chunks: halving them down to 32 slots where few KV heads leave SMs idle was
        // tried and was slower (llama3-8b shape, 4096 slots: 63.9 against 32.3 us), the
        // combination's work growing with the number of chunks.
        let chunks = max_width.div_ceil(ATTN_CHUNK).max(1);
        let group = if n_kv_heads == 0 { 0 } else { n_heads / n_kv_heads };
        let bad = n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || group > ATTN_MAX_GROUP
            || hd > ATTN_MAX_HEAD_DIM
            || hd % 16 != 0
            || chunks > ATTN_CHUNKS
            || n_rows > rows.len()
            || n_rows > scratch.max_rows
            || max_width > scratch.max_width
            || scratch.part_out.len() < n_rows * n_heads * chunks * hd;
        if bad {
            return Err(GpuError::Shape(format!(
                "attention of {n_rows} rows, {n_heads} heads / {n_kv_heads} KV heads x {hd} over {max_width} slots \
                 (at most {ATTN_MAX_GROUP} query heads per KV head, a head size that is a multiple of 16 up to \
                 {ATTN_MAX_HEAD_DIM}, {} slots, the scratch's {} rows)",
                ATTN_CHUNKS * ATTN_CHUNK,
                scratch.max_rows
            )));
        }
        if n_rows == 0 {
            return Ok(());
        }
        let ints = [n_heads as i32, n_kv_heads as i32, hd as i32, max_width as i32, chunks as i32];
        let (layer, bits) = (shape.noise_layer_arg(), noise::GUMBEL_TABLE_BITS as i32);
        // The entry points whose accumulators fit the group (fewer registers, more blocks per SM).
        let group_entry = group.next_power_of_two().trailing_zeros() as usize;
        let logit_bytes = group * max_width * std::mem::size_of::<f32>();
        let pass = match pass {
            DecodePass::OnePass if !self.one_pass_fits(n_heads, n_kv_heads, hd, max_width) => DecodePass::WholeHeads,
            pass => pass,
        };
        if pass == DecodePass::OnePass {
            let cfg = LaunchConfig {
                grid_dim: (n_rows as u32, n_kv_heads as u32, 1),
                block_dim: (32 * ATTN_WARPS, 1, 1),
                shared_mem_bytes: logit_bytes as u32,
            };
            let mut b = self.stream.launch_builder(&self.kernels.attn_decode_one_pass[group_entry]);
            b.arg(rows).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&scale).arg(&softcap);
            b.arg(&window).arg(&alibi_max).arg(&layer).arg(&self.gumbel_table).arg(&bits);
            // SAFETY: block (row, KV head g) reads its row's slots of g (< width <= max_width <=
            // capacity, as the rows promise; its logits fit the shared memory asked for), writes
            // g's query heads' outputs and g's scores, and frees at most one slot of g's.
            unsafe { b.launch(cfg) }?;
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (n_rows as u32, n_kv_heads as u32, chunks as u32),
            block_dim: (32 * ATTN_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let AttentionScratch { part_out, part_stats, score_exps, victim_keys, victim_slots, victim_count, .. } =
            scratch;
        let entries =
            if hd > 128 { &self.kernels.attn_decode_partial_hd256 } else { &self.kernels.attn_decode_partial };
        let partial = &entries[group_entry];
        let mut b = self.stream.launch_builder(partial);
        b.arg(rows).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&scale).arg(&softcap).arg(&window);
        b.arg(&alibi_max);
        b.arg(&layer).arg(&self.gumbel_table).arg(&bits);
        b.arg(&mut *part_out).arg(&mut *part_stats).arg(&mut *score_exps);
        // SAFETY: block (row, KV head, chunk) reads its row's slots (< width <= capacity, as the
        // rows promise) and writes its own entries of the scratch (sized above).
        unsafe { b.launch(cfg) }?;
        let range_slots = if pass == DecodePass::WholeHeads { max_width.max(1) } else { COMBINE_SLOTS };
        let ranges = max_width.div_ceil(range_slots).max(1) as u32;
        let cfg = LaunchConfig {
            grid_dim: (n_kv_heads as u32, ranges, n_rows as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.kernels.attn_decode_combine);
        b.arg(rows).arg(&*part_out).arg(&*part_stats).arg(&*score_exps);
        b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]);
        let range_slots = range_slots as i32;
        let fold = i32::from(!matches!(pass, DecodePass::Ranges { fold_victims: false }));
        b.arg(&range_slots);
        b.arg(&fold).arg(&mut *victim_keys).arg(&mut *victim_slots).arg(&mut *victim_count);
        // SAFETY: block (g, 0, row) writes g's query heads' outputs of the row; block (g, y, row),
        // when scoring, its range of KV head g's score row, and for a row that evicts its entry
        // of the victim scratch ((row, g, y) < rows x KV heads x ranges, at most the scratch's
        // ranges of COMBINE_SLOTS); the last range of (row, g) frees one slot of g's (below its
        // width).
        unsafe { b.launch(cfg) }?;
        if fold == 0 {
            let cfg = LaunchConfig {
                grid_dim: (n_kv_heads as u32, n_rows as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.kernels.choose_victims);
            b.arg(rows);
            // SAFETY: block (g, row) of a row that evicts reads KV head g's first `width` slots
            // and frees one of them.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// Store each row's new key and value (`k`, `v`: `[n_kv_heads][head_dim]` f32) at the row's
    /// slot, with its position.
    pub fn store_rows(
        &self,
        rows: &CudaView<AttnRow>,
        n_rows: usize,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(), GpuError> {
        if n_rows == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: (n_rows as u32, n_kv_heads as u32, 1),
            block_dim: (head_dim.clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let hd = head_dim as i32;
        let mut b = self.stream.launch_builder(&self.kernels.kv_store);
        b.arg(rows).arg(&hd);
        // SAFETY: block (row, g) writes slot store_slot (or victims[g]) of KV head g of its row's
        // storage, which the row says is below its capacity.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Append `n` rows' keys and values (`k`, `v`: `[n][n_kv_heads][head_dim]` f32) to `kv` at
    /// slots `start..start + n`, positions `first_pos..` (a prompt fills slots in order).
    #[allow(clippy::too_many_arguments)]
    pub fn kv_append(
        &self,
        k: &CudaView<f32>,
        v: &CudaView<f32>,
        kv: &mut kv::LayerKv,
        n: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        start: usize,
        first_pos: u32,
    ) -> Result<(), GpuError> {
        if start + n > capacity || k.len() < n * n_kv_heads * head_dim || v.len() < n * n_kv_heads * head_dim {
            return Err(GpuError::Shape(format!("append of {n} rows at slot {start} of {capacity}")));
        }
        let cfg = LaunchConfig {
            grid_dim: (n as u32, n_kv_heads as u32, 1),
            block_dim: (head_dim.clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ints = [start as i32, head_dim as i32, capacity as i32];
        let mut b = self.stream.launch_builder(&self.kernels.kv_append);
        b.arg(k).arg(v).arg(&mut kv.keys).arg(&mut kv.values).arg(&mut kv.positions);
        b.arg(&ints[0]).arg(&first_pos).arg(&ints[1]).arg(&ints[2]);
        // SAFETY: block (r, g) writes slot start + r (< capacity, checked) of KV head g.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Whether prompts of this head size go through [`Gpu::flash_prefill_attention`].
    pub fn flash_handles(&self, head_dim: usize) -> bool {
        self.flash_prefill && FLASH_HEAD_DIMS.contains(&head_dim)
    }

    /// [`Gpu::prefill_attention`]'s result by flash.cu: the softmax online over tiles of 64
    /// slots with tensor cores, nothing of size rows x width stored. With a signal, each row's
    /// statistics go to `stats` (4 floats per query head and row) and a second kernel adds
    /// each slot's scored probability to the layer's scores.
    #[allow(clippy::too_many_arguments)]
    pub fn flash_prefill_attention(
        &self,
        q16: &CudaView<u16>,
        kv: &mut kv::LayerKv,
        out: &mut CudaViewMut<f32>,
        out16: Option<&mut CudaViewMut<u16>>,
        shape: AttentionShape,
        rows: usize,
        width: usize,
        capacity: usize,
        first_qpos: u32,
        signal: Option<ScoreSignal>,
        stats: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let AttentionShape { n_heads, n_kv_heads, head_dim: hd, scale, softcap, window, alibi_max, .. } = shape;
        let which = FLASH_HEAD_DIMS.iter().position(|&d| d == hd);
        let q_dim = n_heads * hd;
        let Some(which) = which.filter(|_| self.flash_prefill) else {
            return Err(GpuError::Shape(format!("no flash prefill for head size {hd}")));
        };
        if n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || width > capacity
            || rows == 0
            || q16.len() < rows * q_dim
            || out.len() < rows * q_dim
            || out16.as_ref().is_some_and(|o| o.len() < rows * q_dim)
            || kv.keys.len() < n_kv_heads * capacity * hd
            || kv.positions.len() < n_kv_heads * capacity
            || (signal.is_some() && stats.len() < 4 * n_heads * rows)
            || !kv.head_slots.is_empty()
        {
            return Err(GpuError::Shape(format!("flash prefill of {rows} rows over {width} of {capacity} slots")));
        }
        let PrefillScoring { mode, inv_tau, seed, by_max, restriction: [sinks, first, end, from_pos] } =
            PrefillScoring::of(signal);
        let ints = [n_heads as i32, n_kv_heads as i32, rows as i32, width as i32, capacity as i32];
        let (layer_u, bits) = (shape.noise_layer_arg(), noise::GUMBEL_TABLE_BITS as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(FLASH_ROWS) as u32, n_heads as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // Keyformer's and KVzip's sums need the general compilation.
        let chosen = self.flash_kernel.load(std::sync::atomic::Ordering::Relaxed);
        if chosen == FlashKernel::Wide as usize && mode <= 1 && self.flash_wide {
            let cfg = LaunchConfig {
                grid_dim: (rows.div_ceil(FLASH_WIDE_ROWS) as u32, n_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: flash_wide_shared_bytes(hd) as u32,
            };
            let null = 0u64;
            let mut b = self.stream.launch_builder(&self.kernels.flash_prefill_wide[which]);
            b.arg(q16).arg(&kv.keys).arg(&kv.values).arg(&kv.positions).arg(&mut *out);
            match out16 {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            b.arg(&mut *stats);
            b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&first_qpos);
            b.arg(&mode).arg(&scale).arg(&softcap).arg(&window).arg(&alibi_max);
            // SAFETY: as the 64-row kernels below, by blocks of 128 rows; the dynamic shared
            // memory was allowed at load (Gpu::new).
            unsafe { b.launch(cfg) }?;
        } else {
            let kernel = match chosen {
                1 | 2 if mode <= 1 => &self.kernels.flash_prefill_lean[which],
                _ => &self.kernels.flash_prefill[which],
            };
            let null = 0u64;
            let mut b = self.stream.launch_builder(kernel);
            b.arg(q16).arg(&kv.keys).arg(&kv.values).arg(&kv.positions).arg(&mut *out);
            match out16 {
                Some(o) => b.arg(o),
                None => b.arg(&null),
            };
            b.arg(&mut *stats);
            b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&first_qpos);
            b.arg(&mode).arg(&scale).arg(&inv_tau).arg(&seed).arg(&layer_u).arg(&self.gumbel_table).arg(&bits);
            b.arg(&softcap).arg(&window).arg(&alibi_max).arg(&sinks).arg(&first).arg(&end).arg(&from_pos);
            // SAFETY: block (t, h) reads query rows 64t.. (< rows) of head h, slots < width of
            // its KV head, and writes those rows' outputs (and f16 copies, or a null address)
            // and statistics (sizes checked above).
            unsafe { b.launch(cfg) }?;
        }
        if let (Some(_), Some(scores)) = (signal, kv.scores.as_mut()) {
            let cfg = LaunchConfig {
                grid_dim: (width.div_ceil(64) as u32, n_kv_heads as u32, 1),
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.kernels.flash_scores[which]);
            b.arg(q16).arg(&kv.keys).arg(&kv.positions).arg(&*stats).arg(scores);
            b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&first_qpos);
            b.arg(&mode).arg(&scale).arg(&inv_tau).arg(&seed).arg(&layer_u).arg(&self.gumbel_table).arg(&bits);
            b.arg(&softcap).arg(&window).arg(&alibi_max).arg(&sinks).arg(&first).arg(&end).arg(&from_pos);
            b.arg(&by_max);
            // SAFETY: block (t, g) reads the rows' queries and statistics and slots 64t.. (<
            // width) of KV head g, and writes only those slots' scores.
            unsafe { b.launch(cfg) }?;
        }
        Ok(())
    }

    /// Attention of `rows` consecutive prompt rows (positions `first_qpos..`) over slots
    /// `0..width` of `kv` (which already holds them), through cuBLAS: S = Q K^T per query head,
    /// a masked softmax per row (probabilities to f16), O = P V; with a signal, each slot's
    /// scored probability summed over the rows and the KV head's query heads is added to the
    /// layer's scores. Nothing of size prompt x prompt: S is rows x width per head.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention(
        &self,
        q16: &CudaView<u16>,
        kv: &mut kv::LayerKv,
        out: &mut CudaViewMut<f32>,
        shape: AttentionShape,
        rows: usize,
        width: usize,
        capacity: usize,
        first_qpos: u32,
        signal: Option<ScoreSignal>,
        s_buf: &mut CudaSlice<f32>,
        p_buf: &mut CudaSlice<u16>,
    ) -> Result<(), GpuError> {
        let AttentionShape { n_heads, n_kv_heads, head_dim: hd, scale, softcap, window, alibi_max, .. } = shape;
        let group = n_heads / n_kv_heads.max(1);
        let q_dim = n_heads * hd;
        if n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || width > capacity
            || q16.len() < rows * q_dim
            || out.len() < rows * q_dim
            || s_buf.len() < n_heads * rows * width
            || p_buf.len() < n_heads * rows * width
        {
            return Err(GpuError::Shape(format!("prefill attention of {rows} rows over {width} of {capacity} slots")));
        }
        let f16 = blas_sys::cudaDataType::CUDA_R_16F;
        let f32t = blas_sys::cudaDataType::CUDA_R_32F;
        let (t, nop) = (blas_sys::cublasOperation_t::CUBLAS_OP_T, blas_sys::cublasOperation_t::CUBLAS_OP_N);
        let (one, zero) = (1.0f32, 0.0f32);
        let head_elems = (capacity * hd) as i64;
        // MHA: one batched product over all heads; GQA: one per KV head over its group.
        let calls: Vec<(usize, usize, i64)> =
            if group == 1 { vec![(0, n_heads, head_elems)] } else { (0..n_kv_heads).map(|g| (g, group, 0)).collect() };
        {
            let (qp, _g1) = q16.device_ptr(&self.stream);
            let (kp, _g2) = kv.keys.device_ptr(&self.stream);
            let (sp, _g3) = s_buf.device_ptr_mut(&self.stream);
            for &(g, batch, stride_a) in &calls {
                let h0 = if group == 1 { 0 } else { g * group };
                // S_h (width x rows, column-major = [row][slot]) = K_g^T-as-stored (hd x width,
                // lda hd, transposed) times Q_h (hd x rows, ldb q_dim).
                // SAFETY: every matrix lies within the buffers checked above.
                unsafe {
                    blas::gemm_strided_batched_ex(
                        *self.blas.handle(),
                        t,
                        nop,
                        width as i32,
                        rows as i32,
                        hd as i32,
                        &scale as *const f32 as *const _,
                        (kp + (g * capacity * hd * 2) as u64) as *const _,
                        f16,
                        hd as i32,
                        stride_a,
                        (qp + (h0 * hd * 2) as u64) as *const _,
                        f16,
                        q_dim as i32,
                        hd as i64,
                        &zero as *const f32 as *const _,
                        (sp + (h0 * rows * width * 4) as u64) as *mut _,
                        f32t,
                        width as i32,
                        (rows * width) as i64,
                        batch as i32,
                        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                    )?;
                }
            }
        }
        let PrefillScoring { mode, inv_tau, seed, by_max, restriction: [sinks, first, end, from_pos] } =
            PrefillScoring::of(signal);
        let ints = [n_heads as i32, n_kv_heads as i32, rows as i32, width as i32, capacity as i32];
        let (layer_u, bits) = (shape.noise_layer_arg(), noise::GUMBEL_TABLE_BITS as i32);
        let cfg =
            LaunchConfig { grid_dim: (rows as u32, n_heads as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(&self.kernels.prefill_softmax);
        b.arg(&mut *s_buf).arg(&mut *p_buf).arg(&kv.positions);
        b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&first_qpos);
        b.arg(&mode).arg(&inv_tau).arg(&seed).arg(&layer_u).arg(&self.gumbel_table).arg(&bits);
        b.arg(&softcap).arg(&window).arg(&alibi_max).arg(&sinks).arg(&first).arg(&end).arg(&from_pos);
        // SAFETY: block (r, h) reads and writes row r of head h of S and P (sizes checked above).
        unsafe { b.launch(cfg) }?;
        if let (Some(_), Some(scores)) = (signal, kv.scores.as_mut()) {
            let cfg = LaunchConfig {
                grid_dim: (n_kv_heads as u32, width.div_ceil(256) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.stream.launch_builder(&self.kernels.prefill_scores);
            b.arg(&*s_buf).arg(scores).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]);
            b.arg(&by_max);
            // SAFETY: thread (g, s < width) reads column s of g's heads' rows and writes scores[g][s].
            unsafe { b.launch(cfg) }?;
        }
        let (vp, _g1) = kv.values.device_ptr(&self.stream);
        let (pp, _g2) = p_buf.device_ptr(&self.stream);
        let (op, _g3) = out.device_ptr_mut(&self.stream);
        for &(g, batch, stride_a) in &calls {
            let h0 = if group == 1 { 0 } else { g * group };
            // O_h (hd x rows, column-major = out[row][h * hd..], ldc q_dim) = V_g (hd x width,
            // lda hd) times P_h (width x rows, ldb width).
            // SAFETY: every matrix lies within the buffers checked above.
            unsafe {
                blas::gemm_strided_batched_ex(
                    *self.blas.handle(),
                    nop,
                    nop,
                    hd as i32,
                    rows as i32,
                    width as i32,
                    &one as *const f32 as *const _,
                    (vp + (g * capacity * hd * 2) as u64) as *const _,
                    f16,
                    hd as i32,
                    stride_a,
                    (pp + (h0 * rows * width * 2) as u64) as *const _,
                    f16,
                    width as i32,
                    (rows * width) as i64,
                    &zero as *const f32 as *const _,
                    (op + (h0 * hd * 4) as u64) as *mut _,
                    f32t,
                    q_dim as i32,
                    hd as i64,
                    batch as i32,
                    blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                )?;
            }
        }
        Ok(())
    }

    /// Read bandwidth in GB/s: the best of a few sums over `bytes` of device memory.
    pub fn read_bandwidth_gb_s(&self, bytes: usize) -> Result<f64, GpuError> {
        let n4 = bytes / 16;
        let buf = self.stream.alloc_zeros::<f32>(n4 * 4)?;
        let mut total = self.stream.alloc_zeros::<f32>(1)?;
        let sms = (4 * self.sm_count) as u32;
        let mut best = 0f64;
        for _ in 0..6 {
            self.stream.synchronize()?;
            let t = std::time::Instant::now();
            let mut b = self.stream.launch_builder(&self.kernels.read_sum);
            let n4_i = n4 as i64;
            b.arg(&buf).arg(&n4_i).arg(&mut total);
            let cfg = LaunchConfig { grid_dim: (sms, 1, 1), block_dim: (512, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the kernel reads n4 float4s of `buf` (n4 * 4 floats allocated).
            unsafe { b.launch(cfg) }?;
            self.stream.synchronize()?;
            best = best.max((n4 * 16) as f64 / t.elapsed().as_secs_f64() / 1e9);
        }
        Ok(best)
    }
}

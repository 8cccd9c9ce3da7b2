//! The CUDA backend (cargo feature `cuda`): the CPU backend's ops on an NVIDIA GPU.
//!
//! Built with cudarc's dynamic loading, so a binary needs no CUDA at build time and runs
//! anywhere: [`Gpu::open`] says plainly when there is no driver, no GPU or no NVRTC. The
//! kernels (`kernels.cu`) are compiled at run time by NVRTC for the GPU found; the matrix
//! products go through cuBLAS (f16 weights and activations, f32 accumulation and output).
//!
//! Decode attention ([`Gpu::attention_decode`]) works on the same slot layout as the CPU's
//! KV cache (a KV head's slots, each with its position or free) and gives, besides the output,
//! a policy's scores in the same pass over the keys and values: the plain probabilities (H2O)
//! or Keyformer's `softmax((x + g) / tau)`, with `g` drawn exactly as the CPU draws it (the row
//! key of [`noise::NoiseRow`] computed on the GPU, the per-position hash and the same quantile
//! table), so both backends select the same tokens. `check` compares every op with the CPU.

pub mod check;

use std::sync::Arc;

use cudarc::cublas::{result as blas, sys as blas_sys, CudaBlas};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use keyformer_kv::noise;

const KERNELS: &str = include_str!("kernels.cu");

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
    rope_adjacent_pairs: CudaFunction,
    silu_mul: CudaFunction,
    f32_to_f16: CudaFunction,
    attn_decode_partial: CudaFunction,
    attn_decode_combine: CudaFunction,
    choose_victims: CudaFunction,
    read_sum: CudaFunction,
}

/// One GPU with its stream, cuBLAS handle, compiled kernels and the Gumbel quantile table.
pub struct Gpu {
    pub info: GpuInfo,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    gumbel_table: CudaSlice<f32>,
    sm_count: usize,
}

/// Slots per block of the attention's first kernel, and the limits of its shared memory (as
/// `kernels.cu` defines them).
const ATTN_CHUNK: usize = 128;
const ATTN_WARPS: u32 = 8;
const COMBINE_SLOTS: usize = 512;
// The logits pass gives each slot of a chunk two threads of the block.
const _: () = assert!(2 * ATTN_CHUNK == 32 * ATTN_WARPS as usize);
pub const ATTN_MAX_GROUP: usize = 8;
pub const ATTN_MAX_HEAD_DIM: usize = 128;
const ATTN_CHUNKS: usize = 256;

/// Scratch of [`Gpu::attention_decode`] for up to `n_heads` query heads of `head_dim` over
/// `max_width` slots: the chunks' partial outputs and softmax statistics, and the scored
/// softmax's exponentials.
pub struct AttentionScratch {
    part_out: CudaSlice<f32>,
    part_stats: CudaSlice<f32>,
    score_exps: CudaSlice<f32>,
}

impl AttentionScratch {
    pub fn new(gpu: &Gpu, n_heads: usize, head_dim: usize, max_width: usize) -> Result<Self, GpuError> {
        let chunks = max_width.div_ceil(ATTN_CHUNK).max(1);
        Ok(Self {
            part_out: gpu.zeros(n_heads * chunks * head_dim)?,
            part_stats: gpu.zeros(n_heads * chunks * 4)?,
            score_exps: gpu.zeros(n_heads * max_width.max(1))?,
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

/// Which of the policies' scores a decode attention adds up (per KV head and slot).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreSignal {
    /// Plain attention probabilities (H2O).
    Attention,
    /// Keyformer: Gumbel noise under `seed`, temperature `tau`.
    Keyformer { tau: f32, seed: u64 },
}

/// Shapes of one decode attention.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Slots examined (slot indices `0..width` of every KV head).
    pub width: usize,
    pub layer: usize,
    /// The query's position (slots after it are masked).
    pub position: u32,
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
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts).map_err(|e| GpuError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let kernels = Kernels {
            rms_norm: f("rms_norm")?,
            rope_adjacent_pairs: f("rope_adjacent_pairs")?,
            silu_mul: f("silu_mul")?,
            f32_to_f16: f("f32_to_f16")?,
            attn_decode_partial: f("attn_decode_partial")?,
            attn_decode_combine: f("attn_decode_combine")?,
            choose_victims: f("choose_victims")?,
            read_sum: f("read_sum")?,
        };
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone())?;
        let gumbel_table = stream.clone_htod(noise::gumbel_table())?;
        let sm_count =
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize;
        Ok(Self { info, stream, blas, kernels, gumbel_table, sm_count })
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

    /// Wait for everything queued.
    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// `out[r] = x[r] / rms(x[r]) * weight` for every row of `weight.len()` values.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let dim = weight.len();
        if dim == 0 || x.len() % dim != 0 || out.len() < x.len() {
            return Err(GpuError::Shape(format!("rms_norm of {} values by rows of {dim}", x.len())));
        }
        let rows = x.len() / dim;
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let dim_i = dim as i32;
        let mut b = self.stream.launch_builder(&self.kernels.rms_norm);
        b.arg(x).arg(weight).arg(out).arg(&dim_i).arg(&eps);
        // SAFETY: the kernel reads rows * dim values of x and dim of weight, writes rows * dim.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Rotary embedding on adjacent pairs, as `cpu::rope_adjacent_pairs`: `x` holds
    /// `positions.len()` rows of `n_heads * head_dim`.
    pub fn rope_adjacent_pairs(
        &self,
        x: &mut CudaSlice<f32>,
        n_heads: usize,
        head_dim: usize,
        positions: &CudaSlice<u32>,
        inv_freq: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        let rows = positions.len();
        let pairs = inv_freq.len();
        if x.len() != rows * n_heads * head_dim || 2 * pairs > head_dim {
            return Err(GpuError::Shape(format!("rope on {} values, {rows} rows of {n_heads} x {head_dim}", x.len())));
        }
        let n = rows * n_heads * pairs;
        let dims = [rows as i32, n_heads as i32, head_dim as i32, pairs as i32];
        let mut b = self.stream.launch_builder(&self.kernels.rope_adjacent_pairs);
        b.arg(x).arg(positions).arg(inv_freq);
        b.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]);
        // SAFETY: one thread per (row, head, pair), all within x (checked above).
        unsafe { b.launch(grid(n, 256)) }?;
        Ok(())
    }

    /// `gate = silu(gate) * up`.
    pub fn silu_mul(&self, gate: &mut CudaSlice<f32>, up: &CudaSlice<f32>) -> Result<(), GpuError> {
        if gate.len() != up.len() {
            return Err(GpuError::Shape(format!("silu_mul of {} and {} values", gate.len(), up.len())));
        }
        let n = gate.len();
        let n_i = n as i64;
        let mut b = self.stream.launch_builder(&self.kernels.silu_mul);
        b.arg(gate).arg(up).arg(&n_i);
        // SAFETY: one thread per element of both (equal lengths).
        unsafe { b.launch(grid(n, 256)) }?;
        Ok(())
    }

    /// `y[t] = W x[t]` for the `n` rows of `x`: `w` f16 `[rows][cols]` (as GGUF stores a
    /// weight), `x` f32 `[n][cols]` (converted to f16 in `x16`, grown as needed), `y` f32
    /// `[n][rows]`; cuBLAS with f32 accumulation.
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
        if w.len() != rows * cols || x.len() < n * cols || y.len() < n * rows || x16.len() < n * cols {
            return Err(GpuError::Shape(format!(
                "matmul of a {rows} x {cols} weight ({} values) with {n} rows ({} values, {} f16 scratch) into {}",
                w.len(),
                x.len(),
                x16.len(),
                y.len()
            )));
        }
        let m = n * cols;
        let m_i = m as i64;
        let mut b = self.stream.launch_builder(&self.kernels.f32_to_f16);
        b.arg(x).arg(&mut *x16).arg(&m_i);
        // SAFETY: converts the first n * cols values (both hold at least that many).
        unsafe { b.launch(grid(m, 256)) }?;
        // Row-major W [rows][cols] is column-major W^T: C (rows x n, column-major = y row-major)
        // = op(A) B with A = W^T stored (lda = cols), op = transpose, B = x^T (ldb = cols).
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (a, _ga) = w.device_ptr(&self.stream);
        let (bx, _gb) = x16.device_ptr(&self.stream);
        let (c, _gc) = y.device_ptr_mut(&self.stream);
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
                rows as i32,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            )?;
        }
        Ok(())
    }

    /// Decode attention of one query position over `kv` (see [`AttentionShape`]), in two
    /// kernels (flash-decoding: chunks of slots in parallel, then their combination): `out`
    /// gets `[n_heads][head_dim]`; with a `signal`, each slot's probability under it, summed
    /// over the query heads of its KV head, is added to `scores` (`[n_kv_heads][capacity]`).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_decode(
        &self,
        q: &CudaSlice<f32>,
        kv: &DeviceKv,
        shape: AttentionShape,
        signal: Option<ScoreSignal>,
        out: &mut CudaSlice<f32>,
        scores: Option<&mut CudaSlice<f32>>,
        scratch: &mut AttentionScratch,
    ) -> Result<(), GpuError> {
        let AttentionShape { n_heads, n_kv_heads, head_dim: hd, width, layer, position } = shape;
        let cap = kv.capacity;
        // Fixed chunks: halving them down to 32 slots where few KV heads leave SMs idle was
        // tried and was slower (llama3-8b shape, 4096 slots: 63.9 against 32.3 us), the
        // combination's work growing with the number of chunks.
        let chunks = width.div_ceil(ATTN_CHUNK);
        let group = if n_kv_heads == 0 { 0 } else { n_heads / n_kv_heads };
        let bad = n_kv_heads == 0
            || n_heads % n_kv_heads != 0
            || group > ATTN_MAX_GROUP
            || hd > ATTN_MAX_HEAD_DIM
            || hd % 16 != 0
            || chunks > ATTN_CHUNKS
            || width > cap
            || q.len() != n_heads * hd
            || out.len() != n_heads * hd
            || kv.keys.len() != n_kv_heads * cap * hd
            || kv.values.len() != n_kv_heads * cap * hd
            || kv.positions.len() != n_kv_heads * cap
            || scratch.part_out.len() < n_heads * chunks * hd
            || scratch.part_stats.len() < n_heads * chunks * 4
            || scratch.score_exps.len() < n_heads * width
            || signal.is_some() != scores.is_some()
            || scores.as_ref().is_some_and(|s| s.len() != n_kv_heads * cap);
        if bad {
            return Err(GpuError::Shape(format!(
                "attention of {n_heads} heads / {n_kv_heads} KV heads x {hd} over {width} of {cap} slots \
                 (at most {ATTN_MAX_GROUP} query heads per KV head, a head size that is a multiple of 16 up to {ATTN_MAX_HEAD_DIM}, \
                 {} slots)",
                ATTN_CHUNKS * ATTN_CHUNK
            )));
        }
        if width == 0 {
            self.stream.memset_zeros(out)?;
            return Ok(());
        }
        let (mode, inv_tau, seed) = match signal {
            None => (0i32, 1.0f32, 0u64),
            Some(ScoreSignal::Attention) => (1, 1.0, 0),
            Some(ScoreSignal::Keyformer { tau, seed }) => (2, 1.0 / tau, seed),
        };
        let ints = [n_heads as i32, n_kv_heads as i32, hd as i32, cap as i32, width as i32, chunks as i32];
        let (scale, layer, bits) = (1.0 / (hd as f32).sqrt(), layer as u32, noise::GUMBEL_TABLE_BITS as i32);
        let cfg = LaunchConfig {
            grid_dim: (chunks as u32, n_kv_heads as u32, 1),
            block_dim: (32 * ATTN_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let AttentionScratch { part_out, part_stats, score_exps } = scratch;
        let mut b = self.stream.launch_builder(&self.kernels.attn_decode_partial);
        b.arg(q).arg(&kv.keys).arg(&kv.values).arg(&kv.positions);
        b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&position).arg(&scale);
        b.arg(&mode).arg(&inv_tau).arg(&seed).arg(&layer).arg(&self.gumbel_table).arg(&bits);
        b.arg(&mut *part_out).arg(&mut *part_stats).arg(&mut *score_exps);
        // SAFETY: block (chunk, KV head) reads its slots (< width <= capacity) and writes its own
        // entries of the scratch (sizes checked above).
        unsafe { b.launch(cfg) }?;
        let ranges = if mode == 0 { 1 } else { width.div_ceil(COMBINE_SLOTS) as u32 };
        let cfg =
            LaunchConfig { grid_dim: (n_kv_heads as u32, ranges, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(&self.kernels.attn_decode_combine);
        let null = 0u64; // no score row: the kernel does not touch it without a signal
        b.arg(&*part_out).arg(&*part_stats).arg(&*score_exps).arg(out);
        match scores {
            Some(row) => b.arg(row),
            None => b.arg(&null),
        };
        b.arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&ints[5]).arg(&mode);
        // SAFETY: block (g, 0) writes g's query heads' outputs; block (g, y), when scoring, its
        // range of KV head g's row.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// A decode step's eviction on the GPU: for each KV head the occupied slot among the first
    /// `width` whose position is below `first_recent` (the recent window is kept) and at least
    /// `sinks`, with the lowest score, ties to the oldest; `FREE_SLOT` where none may go. As
    /// keyformer_kv's `SequencePolicy::victims` picks one victim; only these indices need to
    /// reach the host's slot tables.
    pub fn choose_victims(
        &self,
        scores: &CudaSlice<f32>,
        kv: &DeviceKv,
        width: usize,
        first_recent: u32,
        sinks: u32,
        victims: &mut CudaSlice<u32>,
    ) -> Result<(), GpuError> {
        let n_kv_heads = victims.len();
        let cap = kv.capacity;
        if n_kv_heads == 0 || width > cap || scores.len() != n_kv_heads * cap || kv.positions.len() != n_kv_heads * cap
        {
            return Err(GpuError::Shape(format!(
                "victims of {n_kv_heads} KV heads over {width} of {cap} slots ({} scores)",
                scores.len()
            )));
        }
        let (cap_i, width_i) = (cap as i32, width as i32);
        let cfg = LaunchConfig { grid_dim: (n_kv_heads as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.stream.launch_builder(&self.kernels.choose_victims);
        b.arg(scores).arg(&kv.positions).arg(&cap_i).arg(&width_i).arg(&first_recent).arg(&sinks).arg(victims);
        // SAFETY: block g reads KV head g's first `width` slots and writes victims[g].
        unsafe { b.launch(cfg) }?;
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

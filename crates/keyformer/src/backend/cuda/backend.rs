//! [`Backend`] on the GPU: weights in f16 or in their GGUF block layout ([`WeightFormat`];
//! random weights drawn at a known shape), f32 activations, our GEMVs and cuBLAS for the
//! products, and the attention kernels over [`GpuKvCache`]. One forward pass queues everything
//! on one stream and waits only when the logits come back.

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::kv::GpuKvCache;
use super::tensor_parallel::Collective;
use super::{
    grid, grow, AttentionScratch, AttentionShape, AttnRow, Gpu, GpuError, QuantBuffers, ScoreSignal, QUANTISED_ON_GPU,
};
use crate::backend::cpu::GgufWeight;
use crate::backend::{AttentionSpec, Backend, CacheShape, Cpu, ForwardBuffers, RopeStyle, SequenceCache};
use crate::models::decoder::{Layer, Logits, Model, Norm, Out, Rope};
use crate::models::random::{self, RandomShape};
use crate::quant::{dequantize_row, GgmlType};
use crate::tensor_parallel::{part_blocks, LayerParts, Part, ShardPlan};
use crate::ModelError;

/// Prompt rows per block of the prefill attention (its S is rows x width per head).
const PREFILL_ROWS: usize = 256;

/// A weight matrix on the GPU, `[rows][cols]`.
pub struct GpuMatrix {
    pub weights: GpuWeights,
    pub rows: usize,
    pub cols: usize,
}

/// How a matrix's values are held.
pub enum GpuWeights {
    F16(CudaSlice<u16>),
    /// Whole blocks of a type in [`QUANTISED_ON_GPU`], rows as the GGUF file stores them.
    Quantised {
        ggml_type: GgmlType,
        blocks: CudaSlice<u8>,
    },
}

impl GpuMatrix {
    /// Bytes on the device.
    pub fn bytes(&self) -> usize {
        match &self.weights {
            GpuWeights::F16(d) => d.len() * 2,
            GpuWeights::Quantised { blocks, .. } => blocks.len(),
        }
    }

    /// The values' type: F16 or the quantised type.
    pub fn ggml_type(&self) -> GgmlType {
        match &self.weights {
            GpuWeights::F16(_) => GgmlType::F16,
            GpuWeights::Quantised { ggml_type, .. } => *ggml_type,
        }
    }
}

/// How a GGUF file's quantised matrices go to the GPU (`--gpu-weights`).
///
/// Native by default since every quantised row of `gpu-check` passed on an H100 (2026-12-06):
/// the block decoding is checked on the host against the CPU (tests/cuda_blocks_host.rs), the
/// kernels around it (launches, warp sums, the activations' Q8 kernel, f16 tiles) on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Everything dequantised to f16 at load (cuBLAS for every product of several rows).
    F16,
    /// Types in [`QUANTISED_ON_GPU`] stay in their block layout, dequantised in the products'
    /// registers: a quarter to a half of f16's bytes read per decode step. Others become f16.
    #[default]
    Native,
}

/// Activations on the GPU (exactly `len` f32 values once sized).
#[derive(Default)]
pub struct DeviceRows {
    buf: Option<CudaSlice<f32>>,
    /// An f16 copy of the first `half_len` values, written beside them by the op that wrote
    /// them (a norm, SwiGLU, RoPE, the prompt's attention) when a product through cuBLAS or
    /// flash.cu will read them as f16: the product then skips its conversion kernel (10 ms of
    /// a 4096-token llama2-7b prompt on an H100). Any other write clears it.
    half: Option<CudaSlice<u16>>,
    half_len: usize,
}

/// Rows from which an op writes the f16 copy of its output ([`DeviceRows::half`]): prompt
/// chunks; decode steps (CUDA graphs, GEMVs that read f32) never do.
const HALF_COPY_MIN_ROWS: usize = 64;

/// [`Cuda::half_rows`] for a caller that holds the scratch lock. `KEYFORMER_HALF_COPIES=0`
/// turns the copies off (each product then converts its input), for comparisons.
fn half_copy_rows(capturing: bool, rows: usize) -> usize {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("KEYFORMER_HALF_COPIES").map_or(true, |v| v != "0"));
    if on && !capturing {
        rows
    } else {
        0
    }
}

impl DeviceRows {
    fn get(&self) -> Result<&CudaSlice<f32>, ModelError> {
        self.buf.as_ref().ok_or_else(|| ModelError::Gpu("activation buffer used before it was sized".into()))
    }
    /// The values, to be written: the f16 copy no longer matches them.
    fn get_mut(&mut self) -> Result<&mut CudaSlice<f32>, ModelError> {
        self.half_len = 0;
        self.buf.as_mut().ok_or_else(|| ModelError::Gpu("activation buffer used before it was sized".into()))
    }
    /// The values and, for an op writing `rows` rows of which the first `len` values will be
    /// written, an f16 buffer for their copy (grown as needed; `None` for few rows). The copy
    /// counts as written: the op must write it.
    fn get_mut_with_half(
        &mut self,
        gpu: &Gpu,
        rows: usize,
        len: usize,
    ) -> Result<(&mut CudaSlice<f32>, Option<&mut CudaSlice<u16>>), ModelError> {
        self.half_len = 0;
        if rows < HALF_COPY_MIN_ROWS {
            return Ok((self.get_mut()?, None));
        }
        grow(gpu, &mut self.half, len)?;
        self.half_len = len;
        let buf =
            self.buf.as_mut().ok_or_else(|| ModelError::Gpu("activation buffer used before it was sized".into()))?;
        Ok((buf, self.half.as_mut()))
    }
    /// The f16 copy of the first `len` values, where one was written with them.
    fn half(&self, len: usize) -> Option<&CudaSlice<u16>> {
        self.half.as_ref().filter(|_| len > 0 && self.half_len >= len)
    }
}

/// Buffers the ops share, grown as needed.
#[derive(Default)]
struct Scratch {
    x16: Option<CudaSlice<u16>>,
    tokens: Option<CudaSlice<u32>>,
    positions: Option<CudaSlice<u32>>,
    logits: Option<CudaSlice<f32>>,
    attention: Option<AttentionScratch>,
    rows: Option<CudaSlice<AttnRow>>,
    prefill_s: Option<CudaSlice<f32>>,
    prefill_p: Option<CudaSlice<u16>>,
    /// The flash prefill's per-row statistics (4 floats per query head and row).
    prefill_stats: Option<CudaSlice<f32>>,
    host_rows: Vec<AttnRow>,
    /// What `positions` holds.
    sent_positions: Vec<u32>,
    /// Greedy tokens found on the device.
    next_tokens: Option<CudaSlice<u32>>,
    /// Quantised products' activations and weight tiles.
    quant: QuantBuffers,
    /// A decode step is being captured into a graph: the step's inputs were sent beforehand
    /// (tokens, positions, attention rows) and nothing may wait for the device.
    capturing: bool,
}

/// A decode step captured as a CUDA graph, and the buffers it was captured with (replaying it
/// is valid while they are the same).
struct StepGraph {
    graph: cudarc::driver::CudaGraph,
    key: Vec<u64>,
}

// SAFETY: a graph and its executable instance are driver handles with no thread affinity (the
// driver API may use them from any thread whose context is current: `with_buffers` makes it
// so); cudarc leaves them !Send only because they are raw pointers. The backend keeps its graph
// behind a mutex, so one thread uses it at a time.
unsafe impl Send for StepGraph {}

/// The CUDA backend: one GPU and the buffers its forward passes reuse.
pub struct Cuda {
    pub gpu: Gpu,
    scratch: Mutex<Scratch>,
    buffers: Mutex<ForwardBuffers<DeviceRows>>,
    step_graph: Mutex<Option<StepGraph>>,
    /// Replay decode steps as CUDA graphs (on by default; `KEYFORMER_CUDA_GRAPHS=0` turns it off).
    pub use_graphs: bool,
    /// How [`Model::from_cpu`] uploads quantised matrices.
    pub weight_format: WeightFormat,
    /// Prompt rows per forward pass ([`PREFILL_CHUNK`]; `KEYFORMER_PREFILL_CHUNK` overrides).
    pub prefill_rows: usize,
    /// A tensor-parallel shard's: the sum over the shards after the row-split products, and
    /// the first query head's global index (the noise is keyed by it). `None` and 0 alone.
    pub collective: Option<Collective>,
    pub first_head: usize,
}

/// Prompt rows per forward pass on the GPU (1024 rows of llama2-7b's gate and up activations
/// are 90 MB in f32).
const PREFILL_CHUNK: usize = 1024;

/// Prompt rows per forward pass of the backends made from now on, when chosen
/// ([`Cuda::set_default_prefill_rows`]; 0: not chosen).
static CHOSEN_PREFILL_ROWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl From<GpuError> for ModelError {
    fn from(e: GpuError) -> Self {
        ModelError::Gpu(e.to_string())
    }
}

impl Cuda {
    /// Prompt rows per forward pass of every backend made from now on (`-ub N`; a tensor-
    /// parallel model's shards included): above `KEYFORMER_PREFILL_CHUNK` and the default.
    pub fn set_default_prefill_rows(rows: usize) {
        CHOSEN_PREFILL_ROWS.store(rows, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn new(gpu: Gpu) -> Self {
        let use_graphs = std::env::var("KEYFORMER_CUDA_GRAPHS").map_or(true, |v| v != "0");
        let chosen = CHOSEN_PREFILL_ROWS.load(std::sync::atomic::Ordering::Relaxed);
        let prefill_rows = std::env::var("KEYFORMER_PREFILL_CHUNK")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &usize| n > 0 && chosen == 0)
            .unwrap_or(if chosen > 0 { chosen } else { PREFILL_CHUNK });
        Self {
            gpu,
            scratch: Mutex::default(),
            buffers: Mutex::default(),
            step_graph: Mutex::default(),
            use_graphs,
            weight_format: WeightFormat::default(),
            prefill_rows,
            collective: None,
            first_head: 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Device memory in use (all of it, not only this process's), and the total.
    pub fn memory_used(&self) -> Result<(usize, usize), ModelError> {
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(GpuError::from)?;
        Ok((total - free, total))
    }
}

impl Cuda {
    /// The rows for which an op writes its output's f16 copy ([`DeviceRows::half`]): none while
    /// a step is captured into a graph (a graph may not allocate).
    fn half_rows(&self, rows: usize) -> usize {
        half_copy_rows(self.lock().capturing, rows)
    }

    /// Send a decode step's inputs (tokens, positions, every layer's attention rows) and return
    /// the addresses of the buffers a captured step uses; `None` while the forward buffers are
    /// not sized for this batch (the step then runs without a graph and sizes them).
    fn prepare_decode(
        &self,
        tokens: &[u32],
        caches: &[&mut GpuKvCache],
        shape: AttentionSpec,
    ) -> Result<Option<Vec<u64>>, ModelError> {
        let m = tokens.len();
        let (q_dim, kv_dim) = (shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim);
        let buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        let sized = |a: &DeviceRows, len: usize| a.buf.as_ref().is_some_and(|b| b.len() == len);
        if !(sized(&buffers.q, m * q_dim) && sized(&buffers.k, m * kv_dim) && sized(&buffers.attn, m * q_dim)) {
            return Ok(None);
        }
        let gpu = &self.gpu;
        let addr = |a: &DeviceRows| -> Result<u64, ModelError> { Ok(super::dev_addr(gpu, a.get()?)) };
        let (qa, ka, va, oa) = (addr(&buffers.q)?, addr(&buffers.k)?, addr(&buffers.v)?, addr(&buffers.attn)?);
        let mut key = vec![m as u64];
        for b in [&buffers.x, &buffers.normed, &buffers.q, &buffers.k, &buffers.v, &buffers.attn, &buffers.proj] {
            key.push(addr(b)?);
        }
        key.push(addr(&buffers.gate)?);
        key.push(addr(&buffers.up)?);
        drop(buffers);
        let mut sc = self.lock();
        // Only a greedy step sizes the device's token output: a run that only ever asks for
        // logits (sampling; a tensor-parallel shard) would otherwise never be replayed.
        grow(gpu, &mut sc.next_tokens, m)?;
        let n_layers = caches[0].layers.len();
        let max_width = caches.iter().map(|c| c.capacity_now()).max().unwrap_or(0);
        let ready = sc.attention.as_ref().is_some_and(|a| a.max_rows >= m && a.max_width >= max_width)
            && sc.tokens.as_ref().is_some_and(|t| t.len() >= m)
            && sc.rows.as_ref().is_some_and(|r| r.len() >= n_layers * m)
            && sc.positions.as_ref().is_some_and(|p| p.len() == m);
        if !ready {
            return Ok(None);
        }
        key.push(max_width as u64);
        let Scratch {
            tokens: tok,
            positions,
            sent_positions,
            rows,
            host_rows,
            attention,
            x16,
            logits,
            next_tokens,
            quant,
            ..
        } = &mut *sc;
        let stream = &gpu.stream;
        stream.memcpy_htod(tokens, &mut tok.as_mut().expect("ready").slice_mut(0..m)).map_err(GpuError::from)?;
        sent_positions.clear();
        sent_positions.extend(caches.iter().map(|c| c.next_position()));
        stream.memcpy_htod(sent_positions.as_slice(), positions.as_mut().expect("ready")).map_err(GpuError::from)?;
        host_rows.clear();
        for li in 0..n_layers {
            for (i, cache) in caches.iter().enumerate() {
                let off = |dim: usize| (i * dim * 4) as u64;
                let a = [qa + off(q_dim), ka + off(kv_dim), va + off(kv_dim), oa + off(q_dim)];
                host_rows.push(cache.decode_row(gpu, li, a)?);
            }
        }
        let dev_rows = rows.as_mut().expect("ready");
        stream
            .memcpy_htod(host_rows.as_slice(), &mut dev_rows.slice_mut(0..host_rows.len()))
            .map_err(GpuError::from)?;
        key.push(super::dev_addr(gpu, tok.as_ref().expect("ready")));
        key.push(super::dev_addr(gpu, positions.as_ref().expect("ready")));
        key.push(super::dev_addr(gpu, next_tokens.as_ref().expect("ready")));
        key.push(super::dev_addr(gpu, rows.as_ref().expect("ready")));
        key.extend(x16.as_ref().map(|b| super::dev_addr(gpu, b)));
        key.extend(logits.as_ref().map(|b| super::dev_addr(gpu, b)));
        key.extend(attention.as_ref().map(|a| a.addresses()).into_iter().flatten());
        key.extend(quant.addresses(gpu));
        Ok(Some(key))
    }

    /// The output projection of `n` rows into the scratch's logits, on the device.
    fn project_logits(&self, sc: &mut Scratch, w: &GpuMatrix, x: &DeviceRows, n: usize) -> Result<(), ModelError> {
        grow(&self.gpu, &mut sc.logits, n * w.rows)?;
        let logits = sc.logits.as_mut().expect("sized");
        match &w.weights {
            GpuWeights::F16(data) => {
                grow(&self.gpu, &mut sc.x16, n * w.cols)?;
                let x16 = sc.x16.as_mut().expect("sized");
                self.gpu.matmul_f16(data, w.rows, w.cols, x.get()?, n, x16, logits)?;
            }
            GpuWeights::Quantised { ggml_type, blocks } => {
                let quant = &mut sc.quant;
                self.gpu.matmul_quantised(
                    *ggml_type,
                    blocks,
                    w.rows,
                    w.cols,
                    x.get()?,
                    n,
                    quant,
                    false,
                    None,
                    logits,
                )?;
            }
        }
        Ok(())
    }

    /// The first `len` values a replayed step left in a scratch buffer (`which` picks it;
    /// `what` names it in the error when the step never made it).
    /// The rows' positions on the device (Q and K of a pass, and every layer, share them: sent
    /// once, as a copy makes the host wait).
    fn send_positions(&self, sc: &mut Scratch, positions: &[u32]) -> Result<(), ModelError> {
        if sc.positions.as_ref().is_none_or(|p| p.len() != positions.len()) {
            sc.positions = Some(self.gpu.upload(positions)?);
            sc.sent_positions = positions.to_vec();
        } else if sc.sent_positions != positions {
            self.gpu.upload_into(positions, sc.positions.as_mut().expect("sized"))?;
            sc.sent_positions.clear();
            sc.sent_positions.extend_from_slice(positions);
        }
        Ok(())
    }

    /// A single row through up to [`GEMV_WEIGHTS`](super::GEMV_WEIGHTS) weights of one kind
    /// (all f16, or all of one quantised type) in one GEMV launch; false (nothing done) for
    /// anything else, which `matmul` takes weight by weight.
    fn gemv_in_one_launch(
        &self,
        ws: &[&GpuMatrix],
        x: &DeviceRows,
        n: usize,
        ys: &mut [&mut DeviceRows],
    ) -> Result<bool, ModelError> {
        let cols = ws[0].cols;
        if n != 1 || ws.len() < 2 || ws.len() > super::GEMV_WEIGHTS || ws.iter().any(|w| w.cols != cols) {
            return Ok(false);
        }
        let mut outs: Vec<&mut CudaSlice<f32>> = ys.iter_mut().map(|y| y.get_mut()).collect::<Result<_, _>>()?;
        match &ws[0].weights {
            GpuWeights::F16(_) if super::uses_gemv(1, cols) => {
                let f16: Option<Vec<(&CudaSlice<u16>, usize)>> = ws
                    .iter()
                    .map(|w| match &w.weights {
                        GpuWeights::F16(data) => Some((data, w.rows)),
                        GpuWeights::Quantised { .. } => None,
                    })
                    .collect();
                let Some(f16) = f16 else { return Ok(false) };
                self.gpu.gemv_f16_many(&f16, cols, x.get()?, &mut outs)?;
                Ok(true)
            }
            GpuWeights::Quantised { ggml_type: t, .. } => {
                let same: Option<Vec<(&CudaSlice<u8>, usize)>> = ws
                    .iter()
                    .map(|w| match &w.weights {
                        GpuWeights::Quantised { ggml_type, blocks } if ggml_type == t => Some((blocks, w.rows)),
                        _ => None,
                    })
                    .collect();
                let Some(same) = same else { return Ok(false) };
                let mut sc = self.lock();
                grow(&self.gpu, &mut sc.quant.xq, cols / 32 * super::Q8_BLOCK_BYTES)?;
                let xq = sc.quant.xq.as_mut().expect("grown");
                self.gpu.quantize_q8(x.get()?, cols, xq)?;
                self.gpu.gemv_quantised_many(*t, &same, cols, &*xq, 1, &mut outs)?;
                Ok(true)
            }
            GpuWeights::F16(_) => Ok(false),
        }
    }

    fn read_back<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        which: for<'a> fn(&'a Scratch) -> Option<&'a CudaSlice<T>>,
        what: &str,
        len: usize,
        out: &mut Vec<T>,
    ) -> Result<(), ModelError> {
        let sc = self.lock();
        let buffer = which(&sc).ok_or_else(|| ModelError::Gpu(format!("no {what} on the device")))?;
        out.resize(len, T::default());
        self.gpu.stream.memcpy_dtoh(&buffer.slice(0..len), out.as_mut_slice()).map_err(GpuError::from)?;
        self.gpu.synchronize()?;
        Ok(())
    }
}

impl Backend for Cuda {
    type Matrix = GpuMatrix;
    type Vector = CudaSlice<f32>;
    type Act = DeviceRows;
    type Cache = GpuKvCache;

    fn resize(&self, a: &mut DeviceRows, len: usize) -> Result<(), ModelError> {
        if a.buf.as_ref().is_none_or(|b| b.len() != len) {
            (a.buf, a.half, a.half_len) = (None, None, 0);
            a.buf = Some(self.gpu.zeros(len.max(1))?);
        }
        Ok(())
    }

    fn embed(&self, table: &GpuMatrix, tokens: &[u32], out: &mut DeviceRows) -> Result<(), ModelError> {
        let mut sc = self.lock();
        let capturing = sc.capturing;
        grow(&self.gpu, &mut sc.tokens, tokens.len())?;
        let dev = sc.tokens.as_mut().expect("sized");
        if !capturing {
            self.gpu.stream.memcpy_htod(tokens, &mut dev.slice_mut(0..tokens.len())).map_err(GpuError::from)?;
        }
        let data = match &table.weights {
            GpuWeights::F16(data) => data,
            GpuWeights::Quantised { ggml_type, blocks } => {
                let (rows, cols) = (table.rows, table.cols);
                self.gpu.embed_quantised(*ggml_type, blocks, rows, cols, dev, tokens.len(), out.get_mut()?)?;
                return Ok(());
            }
        };
        let dim = table.cols as i32;
        let cfg = LaunchConfig { grid_dim: (tokens.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.embed_rows);
        b.arg(data).arg(&*dev).arg(out.get_mut()?).arg(&dim);
        // SAFETY: one block per token (ids checked against the vocabulary by the model), each
        // reading its table row and writing its output row.
        unsafe { b.launch(cfg) }.map_err(GpuError::from)?;
        Ok(())
    }

    fn rms_norm(
        &self,
        x: &DeviceRows,
        first_row: usize,
        rows: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut DeviceRows,
    ) -> Result<(), ModelError> {
        let d = weight.len();
        let x = x.get()?.slice(first_row * d..(first_row + rows) * d);
        let (out, out16) = out.get_mut_with_half(&self.gpu, self.half_rows(rows), rows * d)?;
        let mut out = out.slice_mut(0..rows * d);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let dim = d as i32;
        let null = 0u64;
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.rms_norm);
        b.arg(&x).arg(weight).arg(&mut out);
        match out16 {
            Some(h) => b.arg(h),
            None => b.arg(&null),
        };
        b.arg(&dim).arg(&eps);
        // SAFETY: one block per row of d values, within both views and the f16 copy (grown to
        // rows * d) or a null address.
        unsafe { b.launch(cfg) }.map_err(GpuError::from)?;
        Ok(())
    }

    fn matmul(
        &self,
        ws: &[&GpuMatrix],
        x: &DeviceRows,
        n: usize,
        _per_token: bool,
        ys: &mut [&mut DeviceRows],
    ) -> Result<(), ModelError> {
        let cols = ws[0].cols;
        if self.gemv_in_one_launch(ws, x, n, ys)? {
            return Ok(());
        }
        let mut sc = self.lock();
        // The input is converted (to f16, or to Q8 blocks) once for all the weights that share it.
        let (mut have_x16, mut have_xq) = (false, false);
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            match &w.weights {
                // One row (a single sequence's decode step): our GEMV, the f32 input as it is.
                GpuWeights::F16(data) if super::uses_gemv(n, cols) => {
                    self.gpu.gemv_f16(data, w.rows, w.cols, x.get()?, y.get_mut()?)?
                }
                GpuWeights::F16(data) => {
                    if let Some(x16) = x.half(n * cols) {
                        self.gpu.gemm_f16(data, w.rows, w.cols, x16, n, y.get_mut()?)?;
                        continue;
                    }
                    grow(&self.gpu, &mut sc.x16, n * cols)?;
                    let x16 = sc.x16.as_mut().expect("sized");
                    if !have_x16 {
                        self.gpu.to_f16(x.get()?, n * cols, x16)?;
                        have_x16 = true;
                    }
                    self.gpu.gemm_f16(data, w.rows, w.cols, x16, n, y.get_mut()?)?;
                }
                GpuWeights::Quantised { ggml_type, blocks } => {
                    let quant = &mut sc.quant;
                    let (t, rows) = (*ggml_type, w.rows);
                    let x_f16 = x.half(n * cols);
                    self.gpu.matmul_quantised(
                        t,
                        blocks,
                        rows,
                        cols,
                        x.get()?,
                        n,
                        quant,
                        have_xq,
                        x_f16,
                        y.get_mut()?,
                    )?;
                    have_xq = true;
                }
            }
        }
        Ok(())
    }

    fn logits(
        &self,
        w: &GpuMatrix,
        x: &DeviceRows,
        n: usize,
        _per_token: bool,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let mut sc = self.lock();
        self.project_logits(&mut sc, w, x, n)?;
        if sc.capturing {
            return Ok(()); // read after the replay (Model::replay_step)
        }
        let logits = sc.logits.as_ref().expect("sized");
        out.resize(n * w.rows, 0.0);
        self.gpu.stream.memcpy_dtoh(&logits.slice(0..n * w.rows), out.as_mut_slice()).map_err(GpuError::from)?;
        self.gpu.synchronize()?;
        Ok(())
    }

    fn greedy(
        &self,
        w: &GpuMatrix,
        x: &DeviceRows,
        n: usize,
        _per_token: bool,
        out: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        let mut sc = self.lock();
        self.project_logits(&mut sc, w, x, n)?;
        grow(&self.gpu, &mut sc.next_tokens, n)?;
        let Scratch { logits, next_tokens, capturing, .. } = &mut *sc;
        let (logits, next) = (logits.as_ref().expect("sized"), next_tokens.as_mut().expect("sized"));
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        let vocab = w.rows as i32;
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.argmax_rows);
        b.arg(logits).arg(&vocab).arg(&mut *next);
        // SAFETY: block r reads row r of n rows of `vocab` logits and writes next[r] (n allocated).
        unsafe { b.launch(cfg) }.map_err(GpuError::from)?;
        if !*capturing {
            out.resize(n, 0);
            self.gpu.stream.memcpy_dtoh(&next.slice(0..n), out.as_mut_slice()).map_err(GpuError::from)?;
            self.gpu.synchronize()?;
        }
        Ok(())
    }

    fn layer_norm(
        &self,
        x: &DeviceRows,
        first_row: usize,
        rows: usize,
        weight: &CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        eps: f32,
        out: &mut DeviceRows,
    ) -> Result<(), ModelError> {
        let d = weight.len();
        let x = x.get()?.slice(first_row * d..(first_row + rows) * d);
        let mut out = out.get_mut()?.slice_mut(0..rows * d);
        Ok(self.gpu.layer_norm(&x, weight, bias, eps, &mut out)?)
    }

    fn rms_norm_heads(
        &self,
        x: &mut DeviceRows,
        rows: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
    ) -> Result<(), ModelError> {
        Ok(self.gpu.rms_norm_in_place(x.get_mut()?, rows, weight, eps)?)
    }

    fn add_bias(&self, x: &mut DeviceRows, rows: usize, bias: &CudaSlice<f32>) -> Result<(), ModelError> {
        Ok(self.gpu.add_bias(x.get_mut()?, rows, bias)?)
    }

    fn scale(&self, x: &mut DeviceRows, s: f32) -> Result<(), ModelError> {
        Ok(self.gpu.scale(x.get_mut()?, s)?)
    }

    fn observe_queries(
        &self,
        _layer: usize,
        _q: &DeviceRows,
        _n_heads: usize,
        _head_dim: usize,
        _positions: &[u32],
        _inv_freq: &CudaSlice<f32>,
        _style: RopeStyle,
        _mscale: f32,
        _scale: f32,
        caches: &mut [&mut GpuKvCache],
    ) -> Result<(), ModelError> {
        // new_cache refuses such a policy; this only guards a cache made some other way.
        match caches.iter().any(|c| c.policy.wants_query_moments()) {
            true => Err(expected_on_cpu_only()),
            false => Ok(()),
        }
    }

    fn rope(
        &self,
        x: &mut DeviceRows,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &CudaSlice<f32>,
        style: RopeStyle,
        mscale: f32,
    ) -> Result<(), ModelError> {
        let mut sc = self.lock();
        self.send_positions(&mut sc, positions)?;
        let positions = sc.positions.as_ref().expect("sent");
        self.gpu.rope(x.get_mut()?, n_heads, head_dim, positions, inv_freq, style, mscale)?;
        Ok(())
    }

    fn rope_qk(
        &self,
        q: &mut DeviceRows,
        k: &mut DeviceRows,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &CudaSlice<f32>,
        style: RopeStyle,
        mscale: f32,
    ) -> Result<(), ModelError> {
        let mut sc = self.lock();
        self.send_positions(&mut sc, positions)?;
        let positions = sc.positions.as_ref().expect("sent");
        // The queries' f16 copy (flash.cu's input) only where every value of a head turns.
        let rows = half_copy_rows(sc.capturing, if 2 * inv_freq.len() == head_dim { positions.len() } else { 0 });
        let (q, q16) = q.get_mut_with_half(&self.gpu, rows, positions.len() * n_heads * head_dim)?;
        let k = k.get_mut()?;
        self.gpu.rope_qk(q, k, n_heads, n_kv_heads, head_dim, positions, inv_freq, style, mscale, q16)?;
        Ok(())
    }

    fn silu_mul(&self, gate: &mut DeviceRows, up: &DeviceRows) -> Result<(), ModelError> {
        let len = up.get()?.len();
        // The rows of the forward pass under way (those whose positions RoPE was sent).
        let rows = {
            let sc = self.lock();
            half_copy_rows(sc.capturing, sc.sent_positions.len())
        };
        let (gate, gate16) = gate.get_mut_with_half(&self.gpu, rows, len)?;
        Ok(self.gpu.silu_mul(gate, up.get()?, gate16)?)
    }

    fn gelu_mul(&self, gate: &mut DeviceRows, up: &DeviceRows) -> Result<(), ModelError> {
        Ok(self.gpu.gelu_mul(gate.get_mut()?, Some(up.get()?))?)
    }

    fn gelu(&self, x: &mut DeviceRows) -> Result<(), ModelError> {
        Ok(self.gpu.gelu_mul(x.get_mut()?, None)?)
    }

    fn clamp(&self, x: &mut DeviceRows, limit: f32) -> Result<(), ModelError> {
        Ok(self.gpu.clamp(x.get_mut()?, limit)?)
    }

    fn gelu_erf(&self, x: &mut DeviceRows) -> Result<(), ModelError> {
        Ok(self.gpu.gelu_erf(x.get_mut()?)?)
    }

    fn add_rms_norm(
        &self,
        x: &mut DeviceRows,
        y: &DeviceRows,
        rows: usize,
        weight: &CudaSlice<f32>,
        eps: f32,
        out: &mut DeviceRows,
    ) -> Result<(), ModelError> {
        let d = weight.len();
        let (x, y) = (x.get_mut()?, y.get()?);
        let mut x = x.slice_mut(0..rows * d);
        let (out, out16) = out.get_mut_with_half(&self.gpu, self.half_rows(rows), rows * d)?;
        let mut out = out.slice_mut(0..rows * d);
        let mut out16 = out16.map(|h| h.slice_mut(0..rows * d));
        Ok(self.gpu.add_rms_norm(&mut x, &y.slice(0..rows * d), weight, eps, &mut out, out16.as_mut())?)
    }

    fn add(&self, x: &mut DeviceRows, y: &DeviceRows) -> Result<(), ModelError> {
        let (x, y) = (x.get_mut()?, y.get()?);
        let n = x.len() as i64;
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.add_assign);
        b.arg(&mut *x).arg(y).arg(&n);
        // SAFETY: one thread per element of x; y has as many (same-shaped activations).
        unsafe { b.launch(grid(n as usize, 256)) }.map_err(GpuError::from)?;
        Ok(())
    }

    fn all_reduce(&self, x: &mut DeviceRows) -> Result<(), ModelError> {
        match &self.collective {
            None => Ok(()),
            Some(c) => {
                // Only a sum through the host must know (it cannot be captured); NCCL's sums
                // are on the hot path and need no lock.
                let capturing = matches!(c, Collective::Host { .. }) && self.lock().capturing;
                Ok(c.all_reduce(&self.gpu, x.get_mut()?, capturing)?)
            }
        }
    }

    fn attend(
        &self,
        layer: usize,
        spec: AttentionSpec,
        q: &DeviceRows,
        k: &DeviceRows,
        v: &DeviceRows,
        positions: &[u32],
        caches: &mut [&mut GpuKvCache],
        out: &mut DeviceRows,
    ) -> Result<(), ModelError> {
        let AttentionSpec { n_heads, n_kv_heads, head_dim, .. } = spec;
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let gpu = &self.gpu;
        let addr = |a: &DeviceRows| -> Result<u64, ModelError> { Ok(super::dev_addr(gpu, a.get()?)) };
        let (qa, ka, va, oa) = (addr(q)?, addr(k)?, addr(v)?, addr(out)?);
        let mut sc = self.lock();
        let n = positions.len();
        let batch = caches.len() > 1;
        let prompt = !batch && !caches[0].policy.prompt_done();
        let max_width = caches.iter().map(|c| c.capacity_now()).max().unwrap_or(0);
        let attn_shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim,
            max_width,
            layer,
            scale: spec.scale,
            softcap: spec.softcap.unwrap_or(0.0),
            window: spec.window.unwrap_or(0),
            alibi_max: spec.alibi.unwrap_or(0.0),
            first_head: self.first_head,
        };
        let n_layers = caches[0].layers.len();
        if prompt {
            // A prompt chunk: its keys and values join the cache, then attention by flash.cu
            // (all rows at once), or, for Keyformer's scores and head sizes flash.cu lacks, in
            // blocks of PREFILL_ROWS query rows through cuBLAS, scores added block by block.
            let cache = &mut *caches[0];
            let (start, first_pos) = cache.prompt_slots(n)?;
            let signal = cache.layer_signal(layer);
            let cap = cache.layer_capacity(layer);
            let kv_layer = &mut cache.layers[layer];
            let (k, v) = (k.get()?.slice(0..n * kv_dim), v.get()?.slice(0..n * kv_dim));
            gpu.kv_append(&k, &v, kv_layer, n, n_kv_heads, head_dim, cap, start, first_pos)?;
            // The queries as f16: RoPE's copy, or converted here.
            let q16_copy = q.half(n * q_dim);
            if q16_copy.is_none() {
                grow(gpu, &mut sc.x16, n * q_dim)?;
                gpu.to_f16(q.get()?, n * q_dim, sc.x16.as_mut().expect("sized"))?;
            }
            // Keyformer's noisy scores keep the cuBLAS blocks: there each noise value is drawn
            // once, where flash.cu draws it twice (for the rows' noisy sums, then for the
            // scores), and the draws (random reads of a 256 KiB table) cost more than the
            // blocks' matrix (an H100, 4096 tokens of llama2-7b: 0.33 s against 0.38 s).
            let keyformer = matches!(signal, Some(ScoreSignal::Keyformer { .. }));
            if gpu.flash_handles(head_dim) && !keyformer {
                grow(gpu, &mut sc.prefill_stats, if signal.is_some() { 4 * n_heads * n } else { 1 })?;
                let Scratch { x16, prefill_stats, .. } = &mut *sc;
                let q16 = q16_copy.unwrap_or_else(|| x16.as_ref().expect("sized")).slice(0..n * q_dim);
                let stats = prefill_stats.as_mut().expect("sized");
                // The output's f16 copy is the output projection's input.
                let (out, out16) = out.get_mut_with_half(gpu, half_copy_rows(false, n), n * q_dim)?;
                let out = &mut out.slice_mut(0..n * q_dim);
                let mut out16 = out16.map(|o| o.slice_mut(0..n * q_dim));
                let (width, rows) = (start + n, n);
                gpu.flash_prefill_attention(
                    &q16,
                    kv_layer,
                    out,
                    out16.as_mut(),
                    attn_shape,
                    rows,
                    width,
                    cap,
                    first_pos,
                    signal,
                    stats,
                )?;
            } else {
                let out = out.get_mut()?;
                let block = n.min(PREFILL_ROWS);
                let width_max = start + n;
                grow(gpu, &mut sc.prefill_s, n_heads * block * width_max)?;
                grow(gpu, &mut sc.prefill_p, n_heads * block * width_max)?;
                let Scratch { x16, prefill_s, prefill_p, .. } = &mut *sc;
                let q16 = q16_copy.unwrap_or_else(|| x16.as_ref().expect("sized"));
                let (s_buf, p_buf) = (prefill_s.as_mut().expect("sized"), prefill_p.as_mut().expect("sized"));
                for r0 in (0..n).step_by(block) {
                    let rows = block.min(n - r0);
                    gpu.prefill_attention(
                        &q16.slice(r0 * q_dim..(r0 + rows) * q_dim),
                        kv_layer,
                        &mut out.slice_mut(r0 * q_dim..(r0 + rows) * q_dim),
                        attn_shape,
                        rows,
                        start + r0 + rows,
                        cap,
                        first_pos + r0 as u32,
                        signal,
                        s_buf,
                        p_buf,
                    )?;
                }
            }
        } else {
            // Decode steps (one token per sequence): every layer's rows are built and sent at
            // the first layer, so the step queues its kernels without waiting on a copy.
            let m = caches.len();
            if n != m {
                return Err(ModelError::Input(format!(
                    "after its prompt a sequence on the GPU takes one token per step ({n} given)"
                )));
            }
            if sc.attention.as_ref().is_none_or(|a| a.max_rows < m || a.max_width < max_width) {
                let rows = m.max(sc.attention.as_ref().map_or(0, |a| a.max_rows));
                let width = max_width.max(sc.attention.as_ref().map_or(0, |a| a.max_width));
                sc.attention = None;
                sc.attention = Some(AttentionScratch::new(gpu, rows, n_heads, head_dim, width)?);
            }
            let Scratch { attention, rows, host_rows, capturing, .. } = &mut *sc;
            let scratch = attention.as_mut().expect("sized");
            if layer == 0 && !*capturing {
                host_rows.clear();
                for li in 0..n_layers {
                    for (i, cache) in caches.iter().enumerate() {
                        let off = |dim: usize| (i * dim * 4) as u64;
                        let a = [qa + off(q_dim), ka + off(kv_dim), va + off(kv_dim), oa + off(q_dim)];
                        host_rows.push(cache.decode_row(gpu, li, a)?);
                    }
                }
                grow(gpu, rows, host_rows.len())?;
                let dev_rows = rows.as_mut().expect("sized");
                gpu.stream
                    .memcpy_htod(host_rows.as_slice(), &mut dev_rows.slice_mut(0..host_rows.len()))
                    .map_err(GpuError::from)?;
            }
            if host_rows.len() != n_layers * m {
                return Err(ModelError::Gpu("decode rows were not built at the first layer".into()));
            }
            // The kernels write `out` through the rows' addresses: its f16 copy is stale.
            out.get_mut()?;
            let view = rows.as_ref().expect("sized").slice(layer * m..(layer + 1) * m);
            gpu.store_rows(&view, m, n_kv_heads, head_dim)?;
            // Rows that evict choose their victims there too (Gpu::attention_rows).
            gpu.attention_rows(&view, m, attn_shape, scratch)?;
        }
        // After the last layer the step is done for every sequence.
        if layer + 1 == caches[0].layers.len() {
            for cache in caches.iter_mut() {
                cache.advance(if batch { 1 } else { n })?;
            }
        }
        Ok(())
    }

    fn new_cache(
        &self,
        config: CacheShape,
        _kv_type: crate::kv::KvType,
        policy: keyformer_kv::SequencePolicy,
        context: usize,
    ) -> Result<GpuKvCache, ModelError> {
        if policy.kind() == keyformer_kv::PolicyKind::Expected {
            return Err(expected_on_cpu_only());
        }
        // Keys and values are always f16 on the GPU.
        GpuKvCache::new(&self.gpu, config.windows, config.n_kv_heads, config.head_dim, policy, context)
    }

    fn finish_prompt(&self, cache: &mut GpuKvCache) -> Result<(), ModelError> {
        cache.finish_prompt(&self.gpu)
    }

    fn before_prompt_end(&self, model: &Model<Self>, tokens: &[u32], cache: &mut GpuKvCache) -> Result<(), ModelError> {
        if cache.policy.wants_reconstruction() {
            score_by_repetition(model, tokens, cache)?;
        }
        Ok(())
    }

    fn replay_decode_step(
        &self,
        model: &Model<Self>,
        tokens: &[u32],
        caches: &mut [&mut GpuKvCache],
        out: &mut Out<'_>,
    ) -> Result<bool, ModelError> {
        model.replay_step(tokens, caches, out)
    }

    fn end_step(&self, cache: &mut GpuKvCache) {
        cache.policy.next_step();
    }

    fn trims_windows_during_prompt(&self) -> bool {
        false // a sliding layer holds the whole prompt (masked by the window) until its end
    }

    fn prefill_chunk(&self) -> usize {
        self.prefill_rows
    }

    fn with_buffers<R>(&self, f: impl FnOnce(&mut ForwardBuffers<DeviceRows>) -> R) -> R {
        // The calling thread (a server's scheduler, say) may not be the one that opened the
        // GPU: make its context current there (a failure shows at the first launch).
        let _ = self.gpu.bind_to_thread();
        f(&mut self.buffers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Model<Cuda> {
    /// The model of a GGUF file (already loaded for the CPU) on the GPU: quantised matrices
    /// as `cuda.weight_format` says, everything else dequantised to f16.
    pub fn from_cpu(cuda: Cuda, cpu: &Model<Cpu>) -> Result<Self, ModelError> {
        Self::from_cpu_shard(cuda, cpu, None)
    }

    /// As [`from_cpu`](Self::from_cpu), or with `shard` (a plan and a shard's index) only the
    /// part of every tensor that shard holds: its heads, KV heads and features, its rows of
    /// the output projection (the tied embedding's where there is none), the embedding whole.
    /// A quantised matrix split by columns stays in its blocks where the part is whole blocks,
    /// else becomes f16. The shard's logits get the output bias and the final soft-cap once
    /// they are gathered ([`ShardedModel`](super::tensor_parallel::ShardedModel)).
    pub fn from_cpu_shard(
        cuda: Cuda,
        cpu: &Model<Cpu>,
        shard: Option<(&ShardPlan, usize)>,
    ) -> Result<Self, ModelError> {
        let gpu = &cuda.gpu;
        let native = cuda.weight_format == WeightFormat::Native;
        let matrix = |w: &GgufWeight, part: &Part| -> Result<GpuMatrix, ModelError> {
            let view = cpu.backend.view(w);
            let t = view.ggml_type;
            let (rows, cols) = match part {
                Part::Whole => (0..w.rows, 0..w.cols),
                Part::Rows(r) => (r.clone(), 0..w.cols),
                Part::Cols(c) => (0..w.rows, c.clone()),
            };
            if native && QUANTISED_ON_GPU.contains(&t) && w.cols % t.block_size() == 0 {
                let blocks = match part {
                    Part::Whole => Some(gpu.upload(view.bytes)?),
                    _ => part_blocks(t, w.rows, w.cols, part, |r| view.row(r)).map(|b| gpu.upload(&b)).transpose()?,
                };
                if let Some(blocks) = blocks {
                    let weights = GpuWeights::Quantised { ggml_type: t, blocks };
                    return Ok(GpuMatrix { weights, rows: rows.len(), cols: cols.len() });
                }
            }
            let mut row = vec![0f32; w.cols];
            let mut data = Vec::with_capacity(rows.len() * cols.len());
            for r in rows.clone() {
                dequantize_row(view.ggml_type, view.row(r), &mut row);
                data.extend(row[cols.clone()].iter().map(|v| half::f16::from_f32(*v).to_bits()));
            }
            Ok(GpuMatrix { weights: GpuWeights::F16(gpu.upload(&data)?), rows: rows.len(), cols: cols.len() })
        };
        let vector = |v: &Vec<f32>, part: &Part| -> Result<CudaSlice<f32>, ModelError> {
            Ok(gpu.upload(&v[part.of_len(v.len())])?)
        };
        let whole = |v: &Vec<f32>| vector(v, &Part::Whole);
        let layers = cpu
            .layers
            .iter()
            .map(|l| {
                let parts = shard.map_or_else(LayerParts::whole, |(plan, s)| plan.layer_parts(s));
                l.try_map_parts(&parts, &matrix, &vector)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let ropes = cpu
            .ropes
            .iter()
            .map(|r| Ok(Rope { inv_freq: whole(&r.inv_freq)?, mscale: r.mscale }))
            .collect::<Result<Vec<_>, ModelError>>()?;
        let (config, output, output_bias) = match shard {
            None => (
                cpu.config.clone(),
                cpu.output.as_ref().map(|w| matrix(w, &Part::Whole)).transpose()?,
                cpu.output_bias.clone(),
            ),
            Some((plan, s)) => {
                let vocab = Part::Rows(plan.vocab_rows(s));
                let output = matrix(cpu.output.as_ref().unwrap_or(&cpu.token_embd), &vocab)?;
                (plan.shard_config(&cpu.config, s), Some(output), None)
            }
        };
        Ok(Model {
            config,
            token_embd: matrix(&cpu.token_embd, &Part::Whole)?,
            output,
            output_bias,
            output_norm: cpu.output_norm.try_map(&whole)?,
            pos_embd: cpu.pos_embd.as_ref().map(|w| matrix(w, &Part::Whole)).transpose()?,
            ropes,
            layers,
            kv_type: crate::kv::KvType::F16,
            repeat_request: cpu.repeat_request.clone(),
            backend: cuda,
        })
    }

    /// Random weights at `shape`: f16 drawn on the GPU ([`random::value`]), or blocks of a
    /// quantised type drawn on the host ([`random::quantised_blocks`]; a matrix whose rows are
    /// not whole blocks stays f16), the same weights as [`random::write_gguf_typed`] writes.
    pub fn random(cuda: Cuda, shape: &RandomShape, seed: u64, weight_type: GgmlType) -> Result<Self, ModelError> {
        Self::random_shard(cuda, shape, seed, weight_type, None)
    }

    /// As [`random`](Self::random), or with `shard` only that shard's part of each tensor (as
    /// [`from_cpu_shard`](Self::from_cpu_shard) takes it): every tensor is drawn whole and cut,
    /// so the shards together hold the one-device model's weights bit for bit (a quantised
    /// matrix whose part is not whole blocks is dequantised to f16: the same values).
    pub fn random_shard(
        cuda: Cuda,
        shape: &RandomShape,
        seed: u64,
        weight_type: GgmlType,
        shard: Option<(&ShardPlan, usize)>,
    ) -> Result<Self, ModelError> {
        let gpu = &cuda.gpu;
        random::check_weight_type(weight_type)?;
        let part_of = |name: &str| shard.map_or(Part::Whole, |(plan, s)| plan.tensor_part(name, s));
        let mut matrices = std::collections::HashMap::new();
        for (name, rows, cols, t) in shape.matrices() {
            let scale = random::scale(&name, cols);
            let part = part_of(&name);
            let (part_rows, part_cols) = match &part {
                Part::Whole => (rows, cols),
                Part::Rows(r) => (r.len(), cols),
                Part::Cols(c) => (rows, c.len()),
            };
            let quantised = (weight_type != GgmlType::F16 && random::fits_blocks(weight_type, cols))
                .then(|| random::quantised_blocks(weight_type, rows, cols, seed, t, scale));
            let row_bytes = weight_type.row_bytes(cols);
            let blocks = quantised.as_deref().and_then(|all| match &part {
                Part::Whole => Some(std::borrow::Cow::Borrowed(all)),
                _ => part_blocks(weight_type, rows, cols, &part, |r| &all[r * row_bytes..(r + 1) * row_bytes])
                    .map(std::borrow::Cow::Owned),
            });
            let matrix = if let Some(bytes) = blocks {
                GpuMatrix {
                    weights: GpuWeights::Quantised { ggml_type: weight_type, blocks: gpu.upload(&bytes)? },
                    rows: part_rows,
                    cols: part_cols,
                }
            } else if let Some(all) = &quantised {
                // A part that is not whole blocks: the same values, dequantised (as from_cpu_shard).
                let (row_range, col_range) = match &part {
                    Part::Whole => (0..rows, 0..cols),
                    Part::Rows(r) => (r.clone(), 0..cols),
                    Part::Cols(c) => (0..rows, c.clone()),
                };
                let mut row = vec![0f32; cols];
                let mut data = Vec::with_capacity(part_rows * part_cols);
                for r in row_range {
                    crate::quant::dequantize_row(weight_type, &all[r * row_bytes..(r + 1) * row_bytes], &mut row);
                    data.extend(row[col_range.clone()].iter().map(|v| half::f16::from_f32(*v).to_bits()));
                }
                GpuMatrix { weights: GpuWeights::F16(gpu.upload(&data)?), rows: part_rows, cols: part_cols }
            } else {
                let mut data = gpu.zeros::<u16>(rows * cols)?;
                gpu.fill_random_f16(&mut data, seed, t, scale)?;
                let (data, rows, cols) = match &part {
                    Part::Whole => (data, rows, cols),
                    Part::Rows(r) => {
                        let cut =
                            gpu.stream.clone_dtod(&data.slice(r.start * cols..r.end * cols)).map_err(GpuError::from)?;
                        (cut, r.len(), cols)
                    }
                    Part::Cols(c) => (gpu.copy_columns_f16(&data, rows, cols, c.clone())?, rows, c.len()),
                };
                GpuMatrix { weights: GpuWeights::F16(data), rows, cols }
            };
            matrices.insert(name, matrix);
        }
        // Every matrix drawn is taken once; a family without one (a gate, positions) drew none.
        let mut maybe = |name: String| matrices.remove(&name);
        let ones = || -> Result<Norm<Cuda>, GpuError> {
            Ok(Norm { weight: gpu.upload(&vec![1f32; shape.n_embd])?, bias: None })
        };
        // The family's biases and extra norms, as the CPU's file holds them.
        let mut extra = std::collections::HashMap::new();
        for (name, len, value) in shape.extra_vectors() {
            let values = part_of(&name).of_len(len).len();
            extra.insert(name, gpu.upload(&vec![value; values])?);
        }
        let layers = (0..shape.n_layers)
            .map(|l| {
                let p = |s: &str| format!("blk.{l}.{s}");
                let mut vector = |s: &str| extra.remove(&p(s));
                Ok(Layer {
                    attn_norm: ones()?,
                    wq: maybe(p("attn_q.weight")).expect("drawn"),
                    wk: maybe(p("attn_k.weight")).expect("drawn"),
                    wv: maybe(p("attn_v.weight")).expect("drawn"),
                    q_bias: vector("attn_q.bias"),
                    k_bias: vector("attn_k.bias"),
                    v_bias: vector("attn_v.bias"),
                    q_norm: vector("attn_q_norm.weight"),
                    k_norm: vector("attn_k_norm.weight"),
                    wo: maybe(p("attn_output.weight")).expect("drawn"),
                    o_bias: None,
                    post_attn_norm: vector("post_attention_norm.weight").map(|weight| Norm { weight, bias: None }),
                    ffn_norm: if shape.has_ffn_norm() { Some(ones()?) } else { None },
                    w_gate: maybe(p("ffn_gate.weight")),
                    w_up: maybe(p("ffn_up.weight")).expect("drawn"),
                    up_bias: None,
                    w_down: maybe(p("ffn_down.weight")).expect("drawn"),
                    down_bias: None,
                    post_ffn_norm: vector("post_ffw_norm.weight").map(|weight| Norm { weight, bias: None }),
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let config = shape.config();
        config.validate()?;
        let config = shard.map_or(config.clone(), |(plan, s)| plan.shard_config(&config, s));
        Ok(Model {
            token_embd: maybe("token_embd.weight".into()).expect("drawn"),
            output: Some(maybe("output.weight".into()).expect("drawn")),
            output_bias: None,
            output_norm: ones()?,
            pos_embd: maybe("position_embd.weight".into()),
            ropes: config
                .ropes
                .iter()
                .map(|r| {
                    let (inv_freq, mscale) = r.frequencies(None);
                    Ok(Rope { inv_freq: gpu.upload(&inv_freq)?, mscale })
                })
                .collect::<Result<Vec<_>, GpuError>>()?,
            layers,
            config,
            kv_type: crate::kv::KvType::F16,
            repeat_request: None,
            backend: cuda,
        })
    }

    /// One greedy decode step of a batch (as [`Model::forward_batch_greedy`]), replayed as a
    /// CUDA graph where it can be (see [`replay_step`](Self::replay_step)).
    pub fn decode_step_greedy(
        &self,
        tokens: &[u32],
        caches: &mut [&mut GpuKvCache],
        next: &mut Vec<u32>,
    ) -> Result<(), ModelError> {
        if !self.replay_step(tokens, caches, &mut Out::Greedy(next))? {
            self.forward_batch_greedy(tokens, caches, next)?;
        }
        Ok(())
    }

    /// One decode step of a batch (token i joins cache i) replayed as a CUDA graph: a step is
    /// hundreds of small kernels whose launches cost more host time than their work at small
    /// batches. The first step of a batch runs as usual (`false`: the caller runs it, and it
    /// sizes every buffer); the next is captured; later ones only send their inputs (tokens,
    /// positions, attention rows) and replay. A step whose buffers differ from the captured
    /// ones (another batch size, a reallocated scratch) or that wants the other output (greedy
    /// tokens or logits) is captured again. Logits come back from the device after the replay
    /// and get the output bias and soft-cap on the host, as the op-by-op pass gives them.
    pub fn replay_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut GpuKvCache],
        out: &mut Out<'_>,
    ) -> Result<bool, ModelError> {
        let be = &self.backend;
        let c = &self.config;
        let greedy = matches!(out, Out::Greedy(_));
        // A learned-position lookup would be captured with one step's positions; an output
        // bias moves the argmax, which is then taken on the host.
        if !be.use_graphs
            || self.pos_embd.is_some()
            || (greedy && self.output_bias.is_some())
            || tokens.is_empty()
            || tokens.len() != caches.len()
            || caches.iter().any(|k| !k.policy.prompt_done())
        {
            return Ok(false);
        }
        // A step that cannot run (a full cache, a token past the vocabulary) goes the plain
        // way, which names the error as a single sequence's or a batch's.
        if caches.iter().any(|k| k.len() + 1 > k.capacity()) || tokens.iter().any(|&t| t as usize >= c.vocab_size) {
            return Ok(false);
        }
        let shape = AttentionSpec::causal(c.n_heads, c.n_kv_heads, c.head_dim);
        let Some(mut key) = be.prepare_decode(tokens, caches, shape)? else {
            return Ok(false); // buffers not sized yet
        };
        key.push(u64::from(greedy));
        let mut graph = be.step_graph.lock().unwrap_or_else(|e| e.into_inner());
        match graph.as_ref() {
            Some(g) if g.key == key => {
                g.graph.launch().map_err(GpuError::from)?;
                for k in caches.iter_mut() {
                    k.advance(1)?;
                }
            }
            _ => {
                *graph = None;
                let stream = &be.gpu.stream;
                be.lock().capturing = true;
                stream
                    .begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .map_err(GpuError::from)?;
                let result =
                    be.with_buffers(|buffers| self.forward_with(tokens, caches, Logits::All, out.reborrow(), buffers));
                be.lock().capturing = false;
                let captured = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
                result?;
                let g =
                    captured.map_err(GpuError::from)?.ok_or_else(|| ModelError::Gpu("empty decode graph".into()))?;
                g.launch().map_err(GpuError::from)?;
                *graph = Some(StepGraph { graph: g, key });
            }
        }
        match out {
            Out::Greedy(next) => be.read_back(|sc| sc.next_tokens.as_ref(), "greedy tokens", tokens.len(), next)?,
            Out::Logits(logits) => {
                // The output matrix's rows: the vocabulary, or a tensor-parallel shard's part of it.
                let vocab_rows = self.output.as_ref().unwrap_or(&self.token_embd).rows;
                be.read_back(|sc| sc.logits.as_ref(), "logits", tokens.len() * vocab_rows, logits)?;
                self.finish_logits(logits);
            }
        }
        Ok(true)
    }

    /// Bytes of all the weight matrices on the device.
    pub fn matrix_bytes(&self) -> usize {
        let layer = |l: &Layer<Cuda>| l.matrices().iter().map(|m| m.bytes()).sum::<usize>();
        self.layers.iter().map(layer).sum::<usize>()
            + self.token_embd.bytes()
            + self.output.as_ref().map_or(0, |m| m.bytes())
    }

    /// The weight matrices' types and how many of each (`Q4_K x 224, F16 x 1`), for reports.
    pub fn matrix_types(&self) -> String {
        self.matrix_type_counts().iter().map(|(t, n)| format!("{t} x {n}")).collect::<Vec<_>>().join(", ")
    }

    /// How many weight matrices each storage type holds, in the order first met.
    pub fn matrix_type_counts(&self) -> Vec<(GgmlType, usize)> {
        let mut counts: Vec<(GgmlType, usize)> = Vec::new();
        let all = self.layers.iter().flat_map(|l| l.matrices()).chain([&self.token_embd]).chain(self.output.as_ref());
        for m in all {
            match counts.iter_mut().find(|(t, _)| *t == m.ggml_type()) {
                Some((_, n)) => *n += 1,
                None => counts.push((m.ggml_type(), 1)),
            }
        }
        counts
    }
}

/// The expected-attention policy gathers the prompt's queries on the CPU only, for now.
fn expected_on_cpu_only() -> ModelError {
    ModelError::Input(
        "the 'expected' KV policy runs on the CPU only for now: use --device cpu or another policy".into(),
    )
}

/// KVzip's scores on the GPU (`crate::kvzip` has the method): the prompt `prompt` (the cache's
/// last positions) is repeated, part by part, through a copy of `cache` whose prefill keeps
/// each prompt slot's largest reconstruction probability; the maxima become `cache`'s scores
/// before its end trims it.
fn score_by_repetition(model: &Model<Cuda>, prompt: &[u32], cache: &mut GpuKvCache) -> Result<(), ModelError> {
    use crate::backend::SequenceCache;
    use crate::kvzip::{passes, repeat_request, scorer_policy, RepetitionNoise};
    let request = repeat_request(model)?;
    let gpu = &model.backend.gpu;
    let noise = RepetitionNoise::of(&cache.policy.config);
    let end = cache.next_position();
    let start = end - prompt.len() as u32;
    let (n_layers, n_kv) = (model.config.n_layers, model.config.n_kv_heads);
    let mut rows = vec![vec![0f32; prompt.len()]; n_layers * n_kv];
    let mut logits = Vec::new();
    for (first, part_end, tokens) in passes(request, prompt, start) {
        let lifetime = end as usize + tokens.len();
        let mut copy = cache.repetition_copy(gpu, scorer_policy(lifetime, &noise, n_layers, n_kv)?, lifetime)?;
        copy.policy.begin_reconstruction(first, part_end, end);
        for piece in tokens.chunks(model.backend.prefill_chunk()) {
            model.forward_into(piece, &mut copy, Logits::Last, &mut logits)?;
        }
        copy.max_scores_into(gpu, start, &mut rows)?;
    }
    cache.set_prompt_scores(gpu, start, &rows)
}

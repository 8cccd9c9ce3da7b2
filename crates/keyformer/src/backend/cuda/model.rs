//! [`Backend`] on the GPU: f16 weights (GGUF types dequantised at load, or random weights
//! drawn on the device), f32 activations, cuBLAS for the products, and the attention kernels
//! over [`GpuKvCache`]. One forward pass queues everything on one stream and waits only when
//! the logits come back.

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::kv::GpuKvCache;
use super::{grid, AttentionScratch, AttentionShape, AttnRow, Gpu, GpuError, ATTN_MAX_ROWS};
use crate::backend::cpu_backend::GgufWeight;
use crate::backend::{Backend, Cpu, ForwardBuffers, HeadShape};
use crate::models::llama::{Layer, Llama, LlamaConfig};
use crate::models::random::{self, RandomShape};
use crate::quant::dequantize_row;
use crate::ModelError;

/// A weight matrix on the GPU: f16 `[rows][cols]`.
pub struct GpuMatrix {
    pub data: CudaSlice<u16>,
    pub rows: usize,
    pub cols: usize,
}

/// Activations on the GPU (exactly `len` f32 values once sized).
#[derive(Default)]
pub struct DeviceRows {
    buf: Option<CudaSlice<f32>>,
}

impl DeviceRows {
    fn get(&self) -> Result<&CudaSlice<f32>, ModelError> {
        self.buf.as_ref().ok_or_else(|| ModelError::Gpu("activation buffer used before it was sized".into()))
    }
    fn get_mut(&mut self) -> Result<&mut CudaSlice<f32>, ModelError> {
        self.buf.as_mut().ok_or_else(|| ModelError::Gpu("activation buffer used before it was sized".into()))
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
    row_scores: Option<CudaSlice<f32>>,
    host_rows: Vec<AttnRow>,
}

/// The CUDA backend: one GPU and the buffers its forward passes reuse.
pub struct Cuda {
    pub gpu: Gpu,
    scratch: Mutex<Scratch>,
    buffers: Mutex<ForwardBuffers<DeviceRows>>,
}

impl From<GpuError> for ModelError {
    fn from(e: GpuError) -> Self {
        ModelError::Gpu(e.to_string())
    }
}

/// `slot` holding at least `n` values (reallocated, contents lost, when smaller).
fn at_least<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
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

impl Cuda {
    pub fn new(gpu: Gpu) -> Self {
        Self { gpu, scratch: Mutex::default(), buffers: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Scratch> {
        self.scratch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty KV cache for `policy` (see [`GpuKvCache`]).
    pub fn new_cache(
        &self,
        config: &LlamaConfig,
        policy: keyformer_kv::SequencePolicy,
        context: usize,
    ) -> Result<GpuKvCache, ModelError> {
        GpuKvCache::new(&self.gpu, config.n_layers, config.n_kv_heads, config.head_dim, policy, context)
    }

    /// Device memory in use (all of it, not only this process's), and the total.
    pub fn memory_used(&self) -> Result<(usize, usize), ModelError> {
        let (free, total) = cudarc::driver::result::mem_get_info().map_err(GpuError::from)?;
        Ok((total - free, total))
    }
}

impl Backend for Cuda {
    type Matrix = GpuMatrix;
    type Vector = CudaSlice<f32>;
    type Act = DeviceRows;
    type Cache = GpuKvCache;

    fn resize(&self, a: &mut DeviceRows, len: usize) -> Result<(), ModelError> {
        if a.buf.as_ref().is_none_or(|b| b.len() != len) {
            a.buf = None;
            a.buf = Some(self.gpu.zeros(len.max(1))?);
        }
        Ok(())
    }

    fn embed(&self, table: &GpuMatrix, tokens: &[u32], out: &mut DeviceRows) -> Result<(), ModelError> {
        let mut sc = self.lock();
        at_least(&self.gpu, &mut sc.tokens, tokens.len())?;
        let dev = sc.tokens.as_mut().expect("sized");
        self.gpu.stream.memcpy_htod(tokens, &mut dev.slice_mut(0..tokens.len())).map_err(GpuError::from)?;
        let dim = table.cols as i32;
        let cfg = LaunchConfig { grid_dim: (tokens.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.embed_rows);
        b.arg(&table.data).arg(&*dev).arg(out.get_mut()?).arg(&dim);
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
        let mut out = out.get_mut()?.slice_mut(0..rows * d);
        let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let dim = d as i32;
        let mut b = self.gpu.stream.launch_builder(&self.gpu.kernels.rms_norm);
        b.arg(&x).arg(weight).arg(&mut out).arg(&dim).arg(&eps);
        // SAFETY: one block per row of d values, within both views.
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
        let mut sc = self.lock();
        let cols = ws[0].cols;
        at_least(&self.gpu, &mut sc.x16, n * cols)?;
        let x16 = sc.x16.as_mut().expect("sized");
        // The input is converted to f16 once for all the weights that share it.
        self.gpu.to_f16(x.get()?, n * cols, x16)?;
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            self.gpu.gemm_f16(&w.data, w.rows, w.cols, x16, n, y.get_mut()?)?;
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
        at_least(&self.gpu, &mut sc.x16, n * w.cols)?;
        at_least(&self.gpu, &mut sc.logits, n * w.rows)?;
        let Scratch { x16, logits, .. } = &mut *sc;
        let (x16, logits) = (x16.as_mut().expect("sized"), logits.as_mut().expect("sized"));
        self.gpu.to_f16(x.get()?, n * w.cols, x16)?;
        self.gpu.gemm_f16(&w.data, w.rows, w.cols, x16, n, logits)?;
        out.resize(n * w.rows, 0.0);
        self.gpu.stream.memcpy_dtoh(&logits.slice(0..n * w.rows), out.as_mut_slice()).map_err(GpuError::from)?;
        self.gpu.synchronize()?;
        Ok(())
    }

    fn rope(
        &self,
        x: &mut DeviceRows,
        n_heads: usize,
        head_dim: usize,
        positions: &[u32],
        inv_freq: &CudaSlice<f32>,
    ) -> Result<(), ModelError> {
        let mut sc = self.lock();
        if sc.positions.as_ref().is_none_or(|p| p.len() != positions.len()) {
            sc.positions = Some(self.gpu.upload(positions)?);
        } else {
            self.gpu.upload_into(positions, sc.positions.as_mut().expect("sized"))?;
        }
        self.gpu.rope_adjacent_pairs(
            x.get_mut()?,
            n_heads,
            head_dim,
            sc.positions.as_ref().expect("sized"),
            inv_freq,
        )?;
        Ok(())
    }

    fn silu_mul(&self, gate: &mut DeviceRows, up: &DeviceRows) -> Result<(), ModelError> {
        Ok(self.gpu.silu_mul(gate.get_mut()?, up.get()?)?)
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

    fn attend(
        &self,
        layer: usize,
        shape: HeadShape,
        q: &DeviceRows,
        k: &DeviceRows,
        v: &DeviceRows,
        positions: &[u32],
        caches: &mut [&mut GpuKvCache],
        out: &mut DeviceRows,
    ) -> Result<(), ModelError> {
        let HeadShape { n_heads, n_kv_heads, head_dim } = shape;
        let (q_dim, kv_dim) = (n_heads * head_dim, n_kv_heads * head_dim);
        let gpu = &self.gpu;
        let addr = |a: &DeviceRows| -> Result<u64, ModelError> { Ok(super::dev_addr(gpu, a.get()?)) };
        let (qa, ka, va, oa) = (addr(q)?, addr(k)?, addr(v)?, addr(out)?);
        let mut sc = self.lock();
        let n = positions.len();
        let batch = caches.len() > 1;
        let prompt = !batch && !caches[0].policy.prompt_done();
        let max_width = caches.iter().map(|c| c.capacity_now()).max().unwrap_or(0);
        let launch_rows = if batch { n } else { n.min(ATTN_MAX_ROWS) };
        if sc.attention.as_ref().is_none_or(|a| a.max_rows < launch_rows || a.max_width < max_width) {
            sc.attention = None;
            let rows = launch_rows.max(sc.attention.as_ref().map_or(0, |a| a.max_rows));
            sc.attention = Some(AttentionScratch::new(gpu, rows, n_heads, head_dim, max_width)?);
        }
        // A prompt chunk's rows each write their own scores, added in row order afterwards.
        let scored_prompt = prompt && caches[0].layers[layer].scores.is_some();
        if scored_prompt {
            at_least(gpu, &mut sc.row_scores, launch_rows * n_kv_heads * max_width)?;
        }
        let row_scores = sc.row_scores.as_ref().filter(|_| scored_prompt).map(|s| super::dev_addr(gpu, s));
        let attn_shape = AttentionShape { n_heads, n_kv_heads, head_dim, max_width, layer };
        let Scratch { attention, rows, row_scores: _, host_rows, .. } = &mut *sc;
        let scratch = attention.as_mut().expect("sized");
        let strides = (q_dim, kv_dim);
        // Rows in launches of at most `launch_rows`.
        let groups: Vec<(usize, usize)> = if batch {
            vec![(0, n)]
        } else {
            (0..n).step_by(launch_rows).map(|s| (s, (s + launch_rows).min(n))).collect()
        };
        for (start, end) in groups {
            host_rows.clear();
            if batch {
                for (i, cache) in caches.iter().enumerate() {
                    let off = |dim: usize| (i * dim * 4) as u64;
                    let a = [qa + off(q_dim), ka + off(kv_dim), va + off(kv_dim), oa + off(q_dim)];
                    cache.rows(gpu, layer, 0, 1, strides, a, None, host_rows)?;
                }
            } else {
                let cache = &caches[0];
                let off = |dim: usize| (start * dim * 4) as u64;
                let a = [qa + off(q_dim), ka + off(kv_dim), va + off(kv_dim), oa + off(q_dim)];
                let stride = max_width;
                cache.rows(gpu, layer, start, end - start, strides, a, row_scores.map(|s| (s, stride)), host_rows)?;
            }
            let m = host_rows.len();
            at_least(gpu, rows, m)?;
            let dev_rows = rows.as_mut().expect("sized");
            gpu.stream.memcpy_htod(host_rows.as_slice(), &mut dev_rows.slice_mut(0..m)).map_err(GpuError::from)?;
            let view = dev_rows.slice(0..m);
            gpu.store_rows(&view, m, n_kv_heads, head_dim)?;
            gpu.attention_rows(&view, m, attn_shape, scratch)?;
            if scored_prompt {
                let cache = &mut caches[0];
                let cap = cache.capacity_now();
                let scores = cache.layers[layer].scores.as_mut().expect("scored");
                gpu.add_row_scores(&view, m, scores, n_kv_heads, cap)?;
            }
            if host_rows.iter().any(|r| r.evict != 0) {
                gpu.choose_victims(&view, m, n_kv_heads)?;
            }
        }
        // After the last layer the step is done for every sequence.
        if layer + 1 == caches[0].layers.len() {
            for cache in caches.iter_mut() {
                cache.advance(if batch { 1 } else { n });
            }
        }
        Ok(())
    }

    fn with_buffers<R>(&self, f: impl FnOnce(&mut ForwardBuffers<DeviceRows>) -> R) -> R {
        f(&mut self.buffers.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Llama<Cuda> {
    /// The model of a GGUF file (already loaded for the CPU) on the GPU: every matrix
    /// dequantised to f16.
    pub fn from_cpu(cuda: Cuda, cpu: &Llama<Cpu>) -> Result<Self, ModelError> {
        let gpu = &cuda.gpu;
        let matrix = |w: &GgufWeight| -> Result<GpuMatrix, ModelError> {
            let view = cpu.backend.view(w);
            let mut row = vec![0f32; w.cols];
            let mut data = Vec::with_capacity(w.rows * w.cols);
            for r in 0..w.rows {
                dequantize_row(view.ggml_type, view.row(r), &mut row);
                data.extend(row.iter().map(|v| half::f16::from_f32(*v).to_bits()));
            }
            Ok(GpuMatrix { data: gpu.upload(&data)?, rows: w.rows, cols: w.cols })
        };
        let vector = |v: &Vec<f32>| -> Result<CudaSlice<f32>, ModelError> { Ok(gpu.upload(v)?) };
        let layers = cpu
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    attn_norm: vector(&l.attn_norm)?,
                    wq: matrix(&l.wq)?,
                    wk: matrix(&l.wk)?,
                    wv: matrix(&l.wv)?,
                    wo: matrix(&l.wo)?,
                    ffn_norm: vector(&l.ffn_norm)?,
                    w_gate: matrix(&l.w_gate)?,
                    w_up: matrix(&l.w_up)?,
                    w_down: matrix(&l.w_down)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        Ok(Llama {
            config: cpu.config.clone(),
            token_embd: matrix(&cpu.token_embd)?,
            output: cpu.output.as_ref().map(matrix).transpose()?,
            output_norm: vector(&cpu.output_norm)?,
            inv_freq: vector(&cpu.inv_freq)?,
            layers,
            kv_type: crate::kv::KvType::F16,
            backend: cuda,
        })
    }

    /// Random weights at `shape` drawn on the GPU ([`random::value`]: the same weights as
    /// [`random::write_gguf`] writes for the CPU).
    pub fn random(cuda: Cuda, shape: &RandomShape, seed: u64) -> Result<Self, ModelError> {
        let gpu = &cuda.gpu;
        let mut matrices = std::collections::HashMap::new();
        for (name, rows, cols, t) in shape.matrices() {
            let mut data = gpu.zeros::<u16>(rows * cols)?;
            gpu.fill_random_f16(&mut data, seed, t, random::scale(&name, cols))?;
            matrices.insert(name, GpuMatrix { data, rows, cols });
        }
        let mut take = |name: String| matrices.remove(&name).expect("every matrix was drawn");
        let ones = || gpu.upload(&vec![1f32; shape.n_embd]);
        let layers = (0..shape.n_layers)
            .map(|l| {
                let p = |s: &str| format!("blk.{l}.{s}");
                Ok(Layer {
                    attn_norm: ones()?,
                    wq: take(p("attn_q.weight")),
                    wk: take(p("attn_k.weight")),
                    wv: take(p("attn_v.weight")),
                    wo: take(p("attn_output.weight")),
                    ffn_norm: ones()?,
                    w_gate: take(p("ffn_gate.weight")),
                    w_up: take(p("ffn_up.weight")),
                    w_down: take(p("ffn_down.weight")),
                })
            })
            .collect::<Result<Vec<_>, GpuError>>()?;
        let config = shape.config();
        config.validate()?;
        Ok(Llama {
            token_embd: take("token_embd.weight".into()),
            output: Some(take("output.weight".into())),
            output_norm: ones()?,
            inv_freq: gpu.upload(&config.inv_freq(None))?,
            layers,
            config,
            kv_type: crate::kv::KvType::F16,
            backend: cuda,
        })
    }

    /// A new, empty KV cache for a prompt of `prompt_len` tokens and `steps` decode steps.
    pub fn new_gpu_cache(
        &self,
        kv: &keyformer_kv::PolicyConfig,
        prompt_len: usize,
        steps: usize,
    ) -> Result<GpuKvCache, ModelError> {
        let c = &self.config;
        let policy = kv.resolve(prompt_len, steps, c.n_layers, c.n_kv_heads).map_err(ModelError::Policy)?;
        self.backend.new_cache(c, policy, (prompt_len + steps).min(c.context_length).max(prompt_len))
    }
}

//! The CPU implementation of the backend op set: quantised matrix products, RMSNorm, RoPE,
//! SwiGLU and attention over the slot cache. Work is split across [`pool`], the process's one
//! worker team (`--threads` sizes it).

use keyformer_kv::{noise, NoiseKind, ScoreNoise, Signal};

use super::vmath;
use crate::backend::{pool, AttentionSpec, RopeStyle};

use crate::kv::{HeadKv, KvRows};
use crate::quant::dot::{dot_q8_tokens, dot_row, has_dot_q8_tokens, quantize_q8, PreparedActivations, Q8Block};
use crate::quant::gemm_q8::{self, PackedRows, TokenActs};
use crate::quant::{dequantize_row, GgmlType};

/// How a product of several tokens (a prompt chunk) with quantised weights treats the
/// activations. `F32`: dequantised weights times f32 activations, as transformers computes
/// with the same file's weights (the parity tests' setting). `Q8`: activations quantised to
/// 8 bits as a decode step's are, multiplied in integers (llama.cpp's prefill does the same):
/// faster, and a prompt token's numbers are then what a decode step would give it. Float
/// weights and Q2_K/Q3_K always take the f32 path, and so does every type on a CPU without
/// AVX-512 VNNI. `Exact`: as F32, and a single token too (whose decode products otherwise
/// quantise its activations to 8 bits): not a speed setting but a reference, by which
/// gpu-check measures what the 8-bit activations alone do to a quantised model's logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillActivations {
    F32,
    #[default]
    Q8,
    Exact,
}

impl std::str::FromStr for PrefillActivations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "q8" => Ok(Self::Q8),
            other => Err(format!("unknown prefill activations '{other}' (f32, q8)")),
        }
    }
}

/// A weight matrix as stored in the file: `rows` output features of `cols` inputs each,
/// row-major, in its ggml type (usually quantised). The bytes stay in the memory map.
#[derive(Clone, Copy)]
pub struct WeightView<'a> {
    pub ggml_type: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
}

impl WeightView<'_> {
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.ggml_type.row_bytes(self.cols);
        &self.bytes[r * rb..(r + 1) * rb]
    }
}

/// Token counts at or above this use dequantise-then-GEMM (f32 activations, exact to the
/// stored weights); a single token uses row dots with 8-bit activations, which read 4x fewer
/// activation bytes but add rounding: on SmolLM2's first parity prompt the 8-bit path moved
/// the top logit by 0.09 where the GEMM path equals transformers on the F32 copy to 1e-4.
const GEMM_MIN_TOKENS: usize = 2;
/// Weights one [`matmul_many`] call takes (Q, K, V is the most the models use).
const MAX_FUSED: usize = 4;
/// Output rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// A raw pointer that may cross threads: every task writes a disjoint part of the output.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `y[n x rows] = x[n x cols] * W^T`.
pub fn matmul(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    matmul_many(&[*w], x, n, PrefillActivations::F32, &mut [y]);
}

/// `ys[i] = x * ws[i]^T` for weights that share their input (Q, K and V; gate and up): one
/// parallel loop over all their rows, and the activations are quantised once for all of them.
pub fn matmul_many(ws: &[WeightView], x: &[f32], n: usize, acts: PrefillActivations, ys: &mut [&mut [f32]]) {
    if n >= GEMM_MIN_TOKENS || (acts == PrefillActivations::Exact && n > 0) {
        check_matmul_shapes(ws, x, n, ys);
        let integer = |w: &WeightView| {
            acts == PrefillActivations::Q8 && gemm_q8::available() && gemm_q8::group_len(w.ggml_type).is_some()
        };
        if ws.iter().any(integer) {
            SCRATCH_Q8.with(|q8| {
                let mut q8 = q8.borrow_mut();
                quantize_q8(x, &mut q8);
                for (w, y) in ws.iter().zip(ys.iter_mut()) {
                    if integer(w) {
                        matmul_gemm_q8(w, &q8, n, y);
                    } else {
                        matmul_gemm(w, x, n, y);
                    }
                }
            });
            return;
        }
        for (w, y) in ws.iter().zip(ys.iter_mut()) {
            matmul_gemm(w, x, n, y);
        }
        return;
    }
    matmul_many_per_token(ws, x, n, ys)
}

/// Tokens per integer tile (each row group's weights are loaded once for them).
const Q8_TILE_TOKENS: usize = 8;
/// Bytes of unpacked weights a task aims for, so that they stay in its core's L2 cache while
/// every token tile passes over them.
const Q8_TASK_BYTES: usize = 256 << 10;

/// Many tokens with 8-bit activations (`q8`: `n` tokens' blocks, token after token): each task
/// unpacks a block of rows into the interleaved integer form once ([`gemm_q8`]) and runs every
/// token over it, [`Q8_TILE_TOKENS`] at a time.
fn matmul_gemm_q8(w: &WeightView, q8: &[Q8Block], n: usize, y: &mut [f32]) {
    let group = gemm_q8::group_len(w.ggml_type).expect("checked by the caller");
    let blocks_per_token = q8.len() / n;
    let mut scales = Vec::new();
    gemm_q8::group_scales(q8, group, &mut scales);
    let groups_per_token = scales.len() / n;
    let tasks = pool::threads().max(1).max((w.rows * w.cols).div_ceil(Q8_TASK_BYTES));
    let block = w.rows.div_ceil(tasks).next_multiple_of(gemm_q8::ROWS);
    let n_tasks = w.rows.div_ceil(block);
    let out = SharedOut(y.as_mut_ptr());
    let token = |t: usize| TokenActs {
        blocks: &q8[t * blocks_per_token..(t + 1) * blocks_per_token],
        scales: &scales[t * groups_per_token..(t + 1) * groups_per_token],
    };
    pool::for_each(n_tasks, |task| {
        SCRATCH_PACKED.with(|packed| {
            let mut packed = packed.borrow_mut();
            let r0 = task * block;
            let rows = block.min(w.rows - r0);
            let rb = w.ggml_type.row_bytes(w.cols);
            packed.pack(w.ggml_type, &w.bytes[r0 * rb..(r0 + rows) * rb], rows, w.cols);
            let out = &out;
            // SAFETY (both writers): rows r0..r0+rows of every token's output belong to this
            // task alone; `y` outlives the parallel loop.
            let write = |t: usize, rg: usize, vals: &[f32; gemm_q8::ROWS]| {
                let first = rg * gemm_q8::ROWS;
                for (lane, &v) in vals.iter().enumerate().take(rows - first.min(rows)) {
                    unsafe { *out.0.add(t * w.rows + r0 + first + lane) = v };
                }
            };
            let mut t0 = 0;
            while t0 + Q8_TILE_TOKENS <= n {
                let acts: [TokenActs; Q8_TILE_TOKENS] = std::array::from_fn(|k| token(t0 + k));
                let mut vals = [[0f32; gemm_q8::ROWS]; Q8_TILE_TOKENS];
                for rg in 0..packed.row_groups() {
                    gemm_q8::tile(&packed, rg, &acts, &mut vals);
                    for (k, v) in vals.iter().enumerate() {
                        write(t0 + k, rg, v);
                    }
                }
                t0 += Q8_TILE_TOKENS;
            }
            for t in t0..n {
                let mut vals = [[0f32; gemm_q8::ROWS]; 1];
                for rg in 0..packed.row_groups() {
                    gemm_q8::tile(&packed, rg, &[token(t)], &mut vals);
                    write(t, rg, &vals[0]);
                }
            }
        })
    });
}

fn check_matmul_shapes(ws: &[WeightView], x: &[f32], n: usize, ys: &[&mut [f32]]) {
    assert_eq!(ws.len(), ys.len(), "one output per weight");
    assert!(ws.len() <= MAX_FUSED, "at most {MAX_FUSED} weights per call");
    for (w, y) in ws.iter().zip(ys.iter()) {
        assert_eq!(x.len(), n * w.cols, "matmul input shape");
        assert_eq!(y.len(), n * w.rows, "matmul output shape");
    }
}

/// [`matmul_many`] through the single-token dot kernels for each of the `n` tokens, whatever
/// `n` is: each token's outputs are bit for bit what a call with that token alone gives, while
/// every weight row is read from memory once for all of them (a batch of decode steps of
/// different sequences).
pub fn matmul_many_per_token(ws: &[WeightView], x: &[f32], n: usize, ys: &mut [&mut [f32]]) {
    check_matmul_shapes(ws, x, n, ys);
    if n == 0 {
        return;
    }
    let cols = x.len() / n;
    SCRATCH_Q8.with(|q8| {
        let mut q8 = q8.borrow_mut();
        if ws.iter().any(|w| w.ggml_type.uses_q8_activations()) {
            // Each token's row quantised on its own, as a single-token call does.
            quantize_q8(x, &mut q8);
        }
        let blocks_per_token = q8.len() / n;
        // Tasks: ROWS_PER_TASK rows of one weight, numbered across the weights in turn.
        let mut outs = [SharedOut(std::ptr::null_mut()); MAX_FUSED];
        let mut first_task = [usize::MAX; MAX_FUSED + 1];
        first_task[0] = 0;
        for (i, (w, y)) in ws.iter().zip(ys.iter_mut()).enumerate() {
            outs[i] = SharedOut(y.as_mut_ptr());
            first_task[i + 1] = first_task[i] + w.rows.div_ceil(ROWS_PER_TASK);
        }
        let q8: &[Q8Block] = &q8;
        pool::for_each(first_task[ws.len()], |task| {
            let wi = first_task.partition_point(|&f| f <= task) - 1;
            let w = &ws[wi];
            let r0 = (task - first_task[wi]) * ROWS_PER_TASK;
            let rows = ROWS_PER_TASK.min(w.rows - r0);
            // Groups of 4 and 2 tokens through the several-token kernels (a weight block
            // unpacked once for all of them; the same bits as one token at a time). Groups of 8
            // were 1.5-1.8x slower than two of 4 at batch 8 (on Zen 4; register pressure), and
            // a task's rows stay in cache between the two groups.
            let mut done = 0;
            if has_dot_q8_tokens(w.ggml_type) {
                let act = |t: usize| &q8[t * blocks_per_token..(t + 1) * blocks_per_token];

                done = dot_token_group::<4>(w, r0, rows, n, done, &act, outs[wi]);
                done = dot_token_group::<2>(w, r0, rows, n, done, &act, outs[wi]);
            }
            for t in done..n {
                let act = if w.ggml_type.uses_q8_activations() {
                    PreparedActivations::Q8(&q8[t * blocks_per_token..(t + 1) * blocks_per_token])
                } else {
                    PreparedActivations::F32(&x[t * cols..(t + 1) * cols])
                };
                // SAFETY: rows r0..r0+rows of token t's part of output wi are written by this
                // task only; the outputs outlive the loop.
                let ys = unsafe { std::slice::from_raw_parts_mut(outs[wi].0.add(t * w.rows + r0), rows) };
                for (k, out) in ys.iter_mut().enumerate() {
                    *out = dot_row(w.ggml_type, w.row(r0 + k), &act);
                }
            }
        });
    });
}

/// Rows `r0..r0 + rows` of `w` for tokens `done..`, `T` at a time while `T` remain; returns
/// the first token not done. `out` is the weight's output (token-major, `w.rows` per token).
fn dot_token_group<'a, const T: usize>(
    w: &WeightView,
    r0: usize,
    rows: usize,
    n: usize,
    mut done: usize,
    act: &impl Fn(usize) -> &'a [Q8Block],
    out: SharedOut,
) -> usize {
    while done + T <= n {
        let acts: [&[Q8Block]; T] = std::array::from_fn(|k| act(done + k));
        let mut dots = [0f32; T];
        for k in 0..rows {
            dot_q8_tokens(w.ggml_type, w.row(r0 + k), &acts, &mut dots);
            for (j, &v) in dots.iter().enumerate() {
                // SAFETY: the caller's task owns rows r0..r0 + rows of every token's output.
                unsafe { *out.0.add((done + j) * w.rows + r0 + k) = v };
            }
        }
        done += T;
    }
    done
}

thread_local! {
    /// Per-thread scratch reused across calls: quantised activations (the dispatching thread)
    /// and dequantised weight blocks (every thread), so the hot path does not allocate.
    static SCRATCH_Q8: std::cell::RefCell<Vec<Q8Block>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH_F32: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// A task's weight rows unpacked for the integer prefill (every thread).
    static SCRATCH_PACKED: std::cell::RefCell<PackedRows> = std::cell::RefCell::new(PackedRows::default());
}

/// Many tokens: dequantise a block of weight rows to f32 once, then an f32 GEMM against all
/// tokens; each task owns a disjoint column block of `y`. The GEMM packs the tokens' rows
/// again for every block, so blocks are as large as keeps every thread busy (two per thread,
/// 64 to 512 rows): at 64 rows the packing was a quarter of Qwen2.5-0.5B's prefill. (The
/// output's numbers do not depend on the block: each is a dot over the same k-blocks.)
fn matmul_gemm(w: &WeightView, x: &[f32], n: usize, y: &mut [f32]) {
    let out = SharedOut(y.as_mut_ptr());
    let block = w.rows.div_ceil(pool::threads().max(1)).next_multiple_of(16).clamp(ROWS_PER_TASK, 32 * ROWS_PER_TASK);
    let n_tasks = w.rows.div_ceil(block);
    pool::for_each(n_tasks, |task| {
        SCRATCH_F32.with(|buf| {
            let mut buf = buf.borrow_mut();
            let r0 = task * block;
            let rows = block.min(w.rows - r0);
            buf.resize(rows * w.cols, 0.0);
            let rb = w.ggml_type.row_bytes(w.cols);
            dequantize_row(w.ggml_type, &w.bytes[r0 * rb..(r0 + rows) * rb], &mut buf);
            let out = &out;
            // SAFETY: a (n x w.cols) row-major, b = buf^T viewed with strides (1, cols), c is the
            // column block r0..r0+rows of y (row stride w.rows); blocks of different tasks are
            // disjoint and y outlives the parallel loop.
            unsafe {
                matrixmultiply::sgemm(
                    n,
                    w.cols,
                    rows,
                    1.0,
                    x.as_ptr(),
                    w.cols as isize,
                    1,
                    buf.as_ptr(),
                    1,
                    w.cols as isize,
                    0.0,
                    out.0.add(r0),
                    w.rows as isize,
                    1,
                );
            }
        })
    });
}

/// `out = x / rms(x) * weight` for each row of `x`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// `out = (x - mean) / sqrt(var + eps) * weight (+ bias)` for each row of `x`.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = xr.iter().sum::<f32>() / d as f32;
        let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (i, (o, &v)) in or.iter_mut().zip(xr).enumerate() {
            *o = (v - mean) * inv * weight[i] + bias.map_or(0.0, |b| b[i]);
        }
    }
}

/// [`rms_norm`] in place, for each `weight.len()`-sized piece of `x` (one per head).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for xr in x.chunks_exact_mut(d) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        xr.iter_mut().zip(weight).for_each(|(v, &w)| *v = *v * inv * w);
    }
}

/// GELU, tanh approximation (Gemma's `gelu_pytorch_tanh`, GPT-2's `gelu_new`).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// The exact GELU, `x Phi(x) = x (1 + erf(x / sqrt 2)) / 2` (PyTorch's default `gelu`).
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x as f64 * std::f64::consts::FRAC_1_SQRT_2) as f32)
}

/// erf to ~1e-7 (Abramowitz and Stegun 7.1.26 in f64), below f32's resolution of the result.
fn erf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
    let poly =
        t * (0.254_829_592 + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x * x).exp();
    if x >= 0.0 {
        y
    } else {
        -y
    }
}

/// Rotary embedding of each row by its position: pair i of every head turns by
/// `pos * inv_freq[i]`. [`RopeStyle::AdjacentPairs`] pairs dimensions (2i, 2i+1) (ggml's
/// "normal" mode, which Llama GGUF files expect: the converter permutes Q and K rows so this
/// layout equals Hugging Face's rotate-half); [`RopeStyle::Halves`] pairs (i, i + d/2) with
/// d = `2 * inv_freq.len()` (NeoX). Dimensions past d are left as they are (partial rotary).
/// cos and sin are multiplied by `mscale` (YaRN).
pub fn rope(
    x: &mut [f32],
    n_heads: usize,
    head_dim: usize,
    positions: &[u32],
    inv_freq: &[f32],
    style: RopeStyle,
    mscale: f32,
) {
    let stride = n_heads * head_dim;
    let half = inv_freq.len();
    for (row, &pos) in x.chunks_exact_mut(stride).zip(positions) {
        for (i, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (pos as f32 * f).sin_cos();
            let (sin, cos) = (sin * mscale, cos * mscale);
            let (ia, ib) = match style {
                RopeStyle::AdjacentPairs => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            for h in 0..n_heads {
                let (ia, ib) = (h * head_dim + ia, h * head_dim + ib);
                let (a, b) = (row[ia], row[ib]);
                row[ia] = a * cos - b * sin;
                row[ib] = a * sin + b * cos;
            }
        }
    }
}

/// SwiGLU: `gate = silu(gate) * up`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Query rows per attention task.
const QUERIES_PER_TASK: usize = 32;

/// Slots per task of single-query attention.
const SLOTS_PER_TASK: usize = 256;

/// Buffers of [`attention_one_query`], kept by the calling thread across layers and steps.
#[derive(Default)]
struct OneQueryScratch {
    /// Per (softmax, query head, slot): exp(logit - the chunk's reference: its max, or for
    /// Gumbel noise a bound of it). Softmax 0 is the plain one; 1.. are the noisy ones of the
    /// Keyformer signals, in order.
    exps: Vec<f32>,
    /// Per (softmax, query head, chunk): [reference, sum]; the combine step overwrites the reference with
    /// the chunk's normalising factor.
    stats: Vec<f32>,
    /// Per (query head, chunk): the chunk's unnormalised output row.
    partial: Vec<f32>,
}

thread_local! {
    static ONE_QUERY_SCRATCH: std::cell::RefCell<OneQueryScratch> = std::cell::RefCell::new(OneQueryScratch::default());
}

/// [`attention`] for a single query row (a decode step), split across the pool by KV head and
/// by ranges of [`SLOTS_PER_TASK`] slots, as flash-decoding splits a long sequence: every core
/// works however few heads there are. A task scores its slots for all query heads of its
/// group (the keys come from memory once for the group, then from cache), keeps a partial
/// softmax (max, sum, unnormalised output) and the exponentials; the partials combine exactly
/// (softmax = sum_c e^(m_c - M) o_c / sum_c e^(m_c - M) l_c), and the policies' probabilities
/// are one more pass over the kept exponentials, never over the cache. Equal to the general
/// path up to float summation order.
#[allow(clippy::too_many_arguments)]
fn attention_one_query(
    q: &[f32],
    pos: u32,
    heads: &[HeadKv],
    spec: &AttentionSpec,
    layer: usize,
    signals: &[Signal],
    out: &mut [f32],
    sums: &mut [&mut [Vec<f32>]],
) {
    const NEG_INF: f32 = f32::NEG_INFINITY;
    let (n_heads, head_dim, scale) = (spec.n_heads, spec.head_dim, spec.scale);
    let group = n_heads / heads.len();
    let visible = Visibility::of(spec, pos);
    let width = heads.iter().map(|h| h.table.positions().len()).max().unwrap_or(0);
    let chunks = width.div_ceil(SLOTS_PER_TASK).max(1);
    // Which softmax each signal reads (0: plain; k: the k-th noisy one), None when it does
    // not score this row.
    let mut noisy: Vec<(f32, NoiseKind, u64)> = Vec::new();
    let source: Vec<Option<usize>> = signals
        .iter()
        .map(|signal| match *signal {
            Signal::None => None,
            Signal::Attention { from_position } => (pos >= from_position).then_some(0),
            Signal::Reconstruction { .. } => unreachable!("attention_into sends these rows to attention_rows"),
            Signal::Noisy { from_position, tau, noise, seed } => (pos >= from_position).then(|| {
                noisy.push((tau, noise, seed));
                noisy.len()
            }),
        })
        .collect();
    let n_softmax = 1 + noisy.len();
    ONE_QUERY_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        let OneQueryScratch { exps, stats, partial } = &mut *scratch;
        exps.resize(n_softmax * n_heads * width, 0.0);
        stats.resize(n_softmax * n_heads * chunks * 2, 0.0);
        partial.resize(n_heads * chunks * head_dim, 0.0);
        let (e_out, st_out, pa_out) =
            (SharedOut(exps.as_mut_ptr()), SharedOut(stats.as_mut_ptr()), SharedOut(partial.as_mut_ptr()));
        let noisy = &noisy;

        pool::for_each(heads.len() * chunks, |task| {
            let (g, c) = (task / chunks, task % chunks);
            let kv = &heads[g];
            let slots = kv.table.positions();
            let (lo, hi) = ((c * SLOTS_PER_TASK).min(slots.len()), ((c + 1) * SLOTS_PER_TASK).min(slots.len()));
            let m = hi - lo;
            let (e_out, st_out, pa_out) = (&e_out, &st_out, &pa_out);
            // SAFETY (all three): slots lo..hi of every (softmax, head h of group g) and entries
            // (softmax, h, c) belong to this task alone; the buffers outlive the loop.
            let exps_of = |k: usize, h: usize| unsafe {
                std::slice::from_raw_parts_mut(e_out.0.add((k * n_heads + h) * width + lo), m)
            };
            let stats_of = |k: usize, h: usize| unsafe {
                std::slice::from_raw_parts_mut(st_out.0.add(((k * n_heads + h) * chunks + c) * 2), 2)
            };
            for h in g * group..(g + 1) * group {
                for k in 0..n_softmax {
                    stats_of(k, h).copy_from_slice(&[NEG_INF, 0.0]);
                }
            }
            // In steady decoding every slot holds a token at or before `pos`: no mask needed
            // (unless a sliding window hides the older ones).
            let all_visible = spec.window.is_none()
                && kv.table.len() == slots.len()
                && kv.table.last_position().is_some_and(|l| l <= pos);
            let mut raw_positions = [0u32; SLOTS_PER_TASK];
            if noisy.iter().any(|n| n.1 == NoiseKind::Gumbel) {
                // Free slots read as 0: their logits are -inf, so their noise is never used.
                raw_positions.iter_mut().zip(&slots[lo..hi]).for_each(|(r, s)| *r = s.unwrap_or(0));
            }
            let mut noise_row = [0f32; SLOTS_PER_TASK];
            let noise_row = &mut noise_row[..m];
            for h in g * group..(g + 1) * group {
                let x = exps_of(0, h);
                let o = unsafe { std::slice::from_raw_parts_mut(pa_out.0.add((h * chunks + c) * head_dim), head_dim) };
                o.fill(0.0);
                if m == 0 {
                    continue;
                }
                key_scores(&q[h * head_dim..(h + 1) * head_dim], kv.keys(), lo, scale, x);
                if let Some(cap) = spec.softcap {
                    soft_cap(x, cap);
                }
                if spec.alibi.is_some() {
                    alibi(x, &slots[lo..hi], pos, spec.alibi_slope(h));
                }
                if !all_visible {
                    for (v, sp) in x.iter_mut().zip(&slots[lo..hi]) {
                        if !visible.sees(*sp) {
                            *v = NEG_INF;
                        }
                    }
                }
                let max = vmath::row_max(x);
                for (k, &(tau, kind, seed)) in noisy.iter().enumerate() {
                    // Keyformer's noise: one draw per (layer, query head, step, position), as
                    // each head of the paper's models gets its own. (A draw per KV head shared
                    // by its query heads costs a third but measurably worsened fidelity:
                    // mean KL at 30% 0.0710 against 0.0671 on the Brown documents.)
                    let row = noise::NoiseRow::new(kind, seed, layer as u32, h as u32, pos);
                    let y = exps_of(k + 1, h);
                    if kind == NoiseKind::Gumbel {
                        // One pass: noise, (x + g) / tau and exp, shifted by a bound of the
                        // max (the largest logit plus the largest draw) instead of the max.
                        if max == NEG_INF {
                            y.fill(0.0);
                        } else {
                            let shift = (max + noise::GUMBEL_TABLE_MAX) / tau;
                            let sum = vmath::gumbel_exp_sum(x, row.key[0], &raw_positions[..m], 1.0 / tau, shift, y);
                            stats_of(k + 1, h).copy_from_slice(&[shift, sum]);
                        }
                        continue;
                    }
                    noise_row.iter_mut().zip(&slots[lo..hi]).for_each(|(n, s)| *n = s.map_or(0.0, |p| row.sample(p)));
                    // (x + g) / tau, -inf staying -inf.
                    let nmax = vmath::add_scale_max(x, noise_row, 1.0 / tau, y);
                    if nmax == NEG_INF {
                        y.fill(0.0);
                    } else {
                        let sum = vmath::exp_shifted_sum(y, nmax);
                        stats_of(k + 1, h).copy_from_slice(&[nmax, sum]);
                    }
                }
                if max == NEG_INF {
                    x.fill(0.0); // nothing visible in this range
                    continue;
                }
                let sum = vmath::exp_shifted_sum(x, max);
                stats_of(0, h).copy_from_slice(&[max, sum]);
                weighted_sum(x, kv.values(), lo, o);
            }
        });

        // Combine the chunks of each softmax and query head; leave each chunk's factor in
        // `stats`, and the plain softmax's output in `out`.
        for k in 0..n_softmax {
            for h in 0..n_heads {
                let st = &mut stats[(k * n_heads + h) * chunks * 2..(k * n_heads + h + 1) * chunks * 2];
                let gmax = st.chunks_exact(2).map(|s| s[0]).fold(NEG_INF, f32::max);
                if k == 0 {
                    out[h * head_dim..(h + 1) * head_dim].fill(0.0);
                }
                if gmax == NEG_INF {
                    st.chunks_exact_mut(2).for_each(|s| s[0] = 0.0);
                    continue;
                }
                let denom: f32 = st.chunks_exact(2).map(|s| (s[0] - gmax).exp() * s[1]).sum();
                for (c, s) in st.chunks_exact_mut(2).enumerate() {
                    let weight = (s[0] - gmax).exp();
                    if k == 0 && weight != 0.0 {
                        let part = &partial[(h * chunks + c) * head_dim..(h * chunks + c + 1) * head_dim];
                        let o = &mut out[h * head_dim..(h + 1) * head_dim];
                        o.iter_mut().zip(part).for_each(|(a, &b)| *a += weight * b);
                    }
                    s[0] = weight / denom;
                }
                if k == 0 {
                    let inv = 1.0 / denom;
                    out[h * head_dim..(h + 1) * head_dim].iter_mut().for_each(|v| *v *= inv);
                }
            }
        }

        // Each signal's per-slot sums over the group's query heads, added where the caller
        // keeps them (for H2O and Keyformer: the policy's own scores).
        let (exps, stats) = (&*exps, &*stats);
        for ((signal, source), rows) in signals.iter().zip(&source).zip(sums.iter_mut()) {
            if *signal == Signal::None {
                continue;
            }
            let rows_out = grow_rows(rows, heads);
            let Some(k) = *source else { continue };
            pool::for_each(heads.len() * chunks, |task| {
                let (g, c) = (task / chunks, task % chunks);
                let len = heads[g].table.positions().len();
                let (lo, hi) = ((c * SLOTS_PER_TASK).min(len), ((c + 1) * SLOTS_PER_TASK).min(len));
                // SAFETY: slots lo..hi of KV head g belong to this task alone; the rows hold at
                // least `len` slots (grown above) and outlive the loop.
                let acc = unsafe { std::slice::from_raw_parts_mut(rows_out[g].0.add(lo), hi - lo) };
                for h in g * group..(g + 1) * group {
                    let f = stats[((k * n_heads + h) * chunks + c) * 2];
                    let e = &exps[(k * n_heads + h) * width + lo..(k * n_heads + h) * width + hi];
                    acc.iter_mut().zip(e).for_each(|(a, &e)| *a += e * f);
                }
            });
        }
    })
}

/// Grow each KV head's score row to its slots (new slots start at 0) and hand out pointers
/// for tasks that write disjoint ranges. A stack array: no allocation per layer and step.
fn grow_rows(rows: &mut [Vec<f32>], heads: &[HeadKv]) -> [SharedOut; MAX_KV_HEADS] {
    assert_eq!(rows.len(), heads.len(), "one score row per KV head");
    assert!(heads.len() <= MAX_KV_HEADS, "at most {MAX_KV_HEADS} KV heads");
    let mut out = [const { SharedOut(std::ptr::null_mut()) }; MAX_KV_HEADS];
    for ((row, kv), o) in rows.iter_mut().zip(heads).zip(&mut out) {
        let len = kv.table.positions().len();
        if row.len() < len {
            row.resize(len, 0.0);
        }
        *o = SharedOut(row.as_mut_ptr());
    }
    out
}

/// KV heads per layer that [`attention`] handles (the largest models have 8 to 16).
pub const MAX_KV_HEADS: usize = 128;

/// Attention of `n` query rows over one layer's slot cache, grouped-query: query head `h`
/// reads KV head `h / (n_heads / n_kv_heads)`; the cache is never expanded to query heads.
/// A query at position p sees the cached tokens with original position <= p.
///
/// The same pass produces the eviction policy's scores ([`Signal`]): for each query row at or
/// after `from_position`, that row's probabilities (plain, or Keyformer's noisy softmax at
/// temperature tau) are ADDED per slot into `sums[signal][kv_head][slot]` (rows shorter than
/// the KV head's slots are grown with zeros), so a policy whose score is a running sum passes
/// its own rows and nothing is allocated or copied per step. Only a row of logits per query
/// is ever held, never an n x n matrix.
///
/// Several signals are served by the one pass (a shared prefill records every policy's prompt
/// scores at once): `sums[i]` belongs to `signals[i]` and is left alone for [`Signal::None`].
///
/// `q`: n x (n_heads * head_dim); `out`: same shape.
#[allow(clippy::too_many_arguments)]
pub fn attention_into(
    q: &[f32],
    positions: &[u32],
    heads: &[HeadKv],
    spec: &AttentionSpec,
    layer: usize,
    signals: &[Signal],
    out: &mut [f32],
    sums: &mut [&mut [Vec<f32>]],
) {
    assert_eq!(sums.len(), signals.len(), "one score destination per signal");
    if let [pos] = positions {
        // (A repetition's rows are prompt rows: its one-row pieces are rare, and take the
        // general path, which computes its restricted softmax.)
        if !signals.iter().any(Signal::merges_by_max) {
            return attention_one_query(q, *pos, heads, spec, layer, signals, out, sums);
        }
    }
    attention_rows(q, positions, heads, spec, layer, signals, out, sums)
}

/// Which cached positions a query at `pos` sees: those at or before it, and within its
/// sliding window if the layer has one.
#[derive(Clone, Copy)]
struct Visibility {
    pos: u32,
    /// The oldest visible position.
    oldest: u32,
}

impl Visibility {
    fn of(spec: &AttentionSpec, pos: u32) -> Self {
        let oldest = spec.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        Self { pos, oldest }
    }
    #[inline]
    fn sees(self, slot: Option<u32>) -> bool {
        slot.is_some_and(|sp| sp <= self.pos && sp >= self.oldest)
    }
}

/// ALiBi: each logit gets `slope * (key position - query position)` from the slots' ORIGINAL
/// positions (free slots, masked anyway, are left alone).
fn alibi(x: &mut [f32], slots: &[Option<u32>], pos: u32, slope: f32) {
    for (v, sp) in x.iter_mut().zip(slots) {
        if let Some(sp) = sp {
            *v += slope * (*sp as f32 - pos as f32);
        }
    }
}

/// Gemma 2's soft-capping of attention logits: `cap * tanh(x / cap)` (-inf stays -inf).
fn soft_cap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    x.iter_mut().for_each(|v| *v = cap * (*v * inv).tanh());
}

/// [`attention_into`] for plain causal attention scaled by 1/sqrt(head_dim), with fresh score
/// rows: `result[i]` holds `signals[i]`'s sums per KV head and slot, `None` for
/// [`Signal::None`].
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    positions: &[u32],
    heads: &[HeadKv],
    n_heads: usize,
    head_dim: usize,
    layer: usize,
    signals: &[Signal],
    out: &mut [f32],
) -> Vec<Option<Vec<Vec<f32>>>> {
    let spec = AttentionSpec::causal(n_heads, heads.len(), head_dim);
    with_fresh_rows(signals, heads.len(), |dest| attention_into(q, positions, heads, &spec, layer, signals, out, dest))
}

/// Run `attend` with empty score rows (one per KV head) for every signal, and hand them back,
/// `None` for [`Signal::None`].
fn with_fresh_rows(
    signals: &[Signal],
    n_kv_heads: usize,
    attend: impl FnOnce(&mut [&mut [Vec<f32>]]),
) -> Vec<Option<Vec<Vec<f32>>>> {
    let mut rows: Vec<Vec<Vec<f32>>> = signals.iter().map(|_| vec![Vec::new(); n_kv_heads]).collect();
    let mut dest: Vec<&mut [Vec<f32>]> = rows.iter_mut().map(|r| r.as_mut_slice()).collect();
    attend(&mut dest);
    signals.iter().zip(rows).map(|(s, r)| (*s != Signal::None).then_some(r)).collect()
}

/// The general case of [`attention`]: tasks of [`QUERIES_PER_TASK`] query rows of one head.
#[allow(clippy::too_many_arguments)]
fn attention_rows(
    q: &[f32],
    positions: &[u32],
    heads: &[HeadKv],
    spec: &AttentionSpec,
    layer: usize,
    signals: &[Signal],
    out: &mut [f32],
    sums: &mut [&mut [Vec<f32>]],
) {
    let n = positions.len();
    let (n_heads, head_dim, scale) = (spec.n_heads, spec.head_dim, spec.scale);
    let group = n_heads / heads.len();
    let stride = n_heads * head_dim;
    let outp = SharedOut(out.as_mut_ptr());
    let from_positions: Vec<Option<u32>> = signals
        .iter()
        .map(|signal| match *signal {
            Signal::None => None,
            Signal::Attention { from_position }
            | Signal::Noisy { from_position, .. }
            | Signal::Reconstruction { from_position, .. } => Some(from_position),
        })
        .collect();
    let blocks = n.div_ceil(QUERIES_PER_TASK);
    let partial: Vec<(usize, Vec<Option<Vec<f32>>>)> = pool::map(n_heads * blocks, |task| {
        let (h, b) = (task / blocks, task % blocks);
        let kv = &heads[h / group];
        let slots = kv.table.positions();
        // Row buffers: attention weights, the noisy score's logits, Gumbel noise, and the
        // slots' positions as plain integers for the vectorised noise.
        let mut weights = Vec::with_capacity(slots.len());
        let mut raw_logits = Vec::new();
        let mut noisy = Vec::new();
        let mut gumbel = Vec::new();
        // Per task (one KV head): whether any signal needs the raw logits, and the slots'
        // positions as integers for the vectorised noise (free slots read as 0; their
        // logits are -inf, so their noise is never used).
        let logits_noisy =
            signals.iter().any(|s| matches!(s, Signal::Noisy { .. } | Signal::Reconstruction { noise: Some(_), .. }));
        let raw_positions: Vec<u32> =
            if logits_noisy { slots.iter().map(|s| s.unwrap_or(0)).collect() } else { Vec::new() };
        let mut sums: Vec<Option<Vec<f32>>> = vec![None; signals.len()];
        for i in b * QUERIES_PER_TASK..((b + 1) * QUERIES_PER_TASK).min(n) {
            let qi = &q[i * stride + h * head_dim..i * stride + (h + 1) * head_dim];
            let p = positions[i];
            // Slots past the last one this query sees are left out: while a prompt is processed
            // slots are mostly in position order (a sliding layer reuses freed ones), so a row
            // sees little past its last visible slot and the causal mask would
            // otherwise cost half of every chunk's work. (Leaving out masked slots changes no
            // bit: each would add an exact zero at the end of every sum.)
            let width = slots.iter().rposition(|sp| sp.is_some_and(|sp| sp <= p)).map_or(0, |s| s + 1);
            let slots = &slots[..width];
            weights.resize(width, 0.0);
            key_scores(qi, kv.keys(), 0, scale, &mut weights);
            if let Some(cap) = spec.softcap {
                soft_cap(&mut weights, cap);
            }
            if spec.alibi.is_some() {
                alibi(&mut weights, slots, p, spec.alibi_slope(h));
            }
            let visible = Visibility::of(spec, p);
            let mut max = f32::NEG_INFINITY;
            for (x, sp) in weights.iter_mut().zip(slots) {
                if !visible.sees(*sp) {
                    *x = f32::NEG_INFINITY;
                }
                max = max.max(*x);
            }
            let outp = outp;
            // SAFETY: each (query, head) pair is written by exactly one task.
            let o = unsafe { std::slice::from_raw_parts_mut(outp.0.add(i * stride + h * head_dim), head_dim) };
            o.fill(0.0);
            if max == f32::NEG_INFINITY {
                continue; // nothing visible (cannot happen once the query's own token is cached)
            }
            // The logits keep their -inf where a slot is masked, which exp maps to 0.
            if logits_noisy {
                raw_logits.clear();
                raw_logits.extend_from_slice(&weights);
            }
            weights.iter_mut().for_each(|x| *x -= max);
            vmath::exp_in_place(&mut weights);
            let denom: f32 = weights.iter().sum();
            weighted_sum(&weights, kv.values(), 0, o);
            let inv = 1.0 / denom;
            o.iter_mut().for_each(|v| *v *= inv);

            for ((signal, from), sums) in signals.iter().zip(&from_positions).zip(sums.iter_mut()) {
                if !from.is_some_and(|f| p >= f) {
                    continue;
                }
                let acc = sums.get_or_insert_with(|| vec![0.0; kv.table.positions().len()]);
                match *signal {
                    Signal::Noisy { tau, noise: kind, seed, .. } => {
                        // softmax((x + g) / tau) over the visible slots: a second pass over
                        // this row of logits, not over the cache.
                        let row = noise::NoiseRow::new(kind, seed, layer as u32, h as u32, p);
                        noisy.clear();
                        noisy.extend_from_slice(&raw_logits);
                        row_noise(&row, &raw_positions[..width], slots, &mut gumbel);
                        let inv_tau = 1.0 / tau;
                        let mut nmax = f32::NEG_INFINITY;
                        for (v, &g) in noisy.iter_mut().zip(&gumbel) {
                            *v = (*v + g) * inv_tau; // -inf stays -inf
                            nmax = nmax.max(*v);
                        }
                        noisy.iter_mut().for_each(|v| *v -= nmax);
                        vmath::exp_in_place(&mut noisy);
                        let inv_nsum = 1.0 / noisy.iter().sum::<f32>();
                        acc.iter_mut().zip(&noisy).for_each(|(a, &e)| *a += e * inv_nsum);
                    }
                    Signal::Reconstruction { from_position, first, end, sinks, noise } => {
                        // The softmax over the sinks, the part repeated and the repetition
                        // (the exponentials' common factor cancels); the part's slots keep
                        // their largest probability.
                        let counted = |sp: &Option<u32>| {
                            sp.is_some_and(|q| q < sinks || (first..end).contains(&q) || q >= from_position)
                        };
                        // Keyformer's variant: the same softmax of (logit + noise) / tau.
                        let weights: &[f32] = match noise {
                            None => &weights,
                            Some(ScoreNoise { kind, tau, seed }) => {
                                let row = noise::NoiseRow::new(kind, seed, layer as u32, h as u32, p);
                                row_noise(&row, &raw_positions[..width], slots, &mut gumbel);
                                noisy.clear();
                                noisy.extend(raw_logits.iter().zip(slots).zip(&gumbel).map(|((&x, sp), &g)| {
                                    match counted(sp) {
                                        true => (x + g) / tau,
                                        false => f32::NEG_INFINITY,
                                    }
                                }));
                                let nmax = noisy.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                                noisy.iter_mut().for_each(|v| *v -= nmax);
                                vmath::exp_in_place(&mut noisy);
                                &noisy
                            }
                        };
                        let denom: f32 = weights.iter().zip(slots).filter(|(_, sp)| counted(sp)).map(|(w, _)| w).sum();
                        if denom > 0.0 {
                            let inv = 1.0 / denom;
                            for ((a, &w), sp) in acc.iter_mut().zip(weights).zip(slots) {
                                if sp.is_some_and(|q| (first..end).contains(&q)) {
                                    *a = a.max(w * inv);
                                }
                            }
                        }
                    }
                    _ => acc.iter_mut().zip(&weights).for_each(|(a, &e)| *a += e * inv),
                }
            }
        }
        sums.iter().any(Option::is_some).then_some((h, sums))
    })
    .into_iter()
    .flatten()
    .collect();
    for (k, (from, rows)) in from_positions.iter().zip(sums.iter_mut()).enumerate() {
        if from.is_none() {
            continue;
        }
        grow_rows(rows, heads);
        let by_max = signals[k].merges_by_max();
        for (h, task_sums) in &partial {
            if let Some(s) = &task_sums[k] {
                let row = rows[h / group].iter_mut().zip(s);
                match by_max {
                    true => row.for_each(|(a, b)| *a = a.max(*b)),
                    false => row.for_each(|(a, b)| *a += b),
                }
            }
        }
    }
}

/// `row`'s noise for each slot (`positions`: the slots' positions as integers, free slots 0):
/// Gumbel vectorised, the other kinds one by one (free slots get 0; their logits are -inf).
fn row_noise(row: &noise::NoiseRow, positions: &[u32], slots: &[Option<u32>], out: &mut Vec<f32>) {
    if row.kind == NoiseKind::Gumbel {
        out.resize(positions.len(), 0.0);
        vmath::gumbel_row(row.key[0], positions, out);
    } else {
        out.clear();
        out.extend(slots.iter().map(|s| s.map_or(0.0, |pos| row.sample(pos))));
    }
}

/// f32 dot product: AVX2/FMA where the CPU has it, NEON on aarch64, else [`dot_scalar`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        // SAFETY: AVX2 and FMA are present (checked at run time).
        return unsafe { x86::dot(a, b) };
    }
    #[cfg(target_arch = "aarch64")]
    return crate::quant::dot::neon::dot_f32(a, b);
    #[allow(unreachable_code)]
    dot_scalar(a, b)
}

/// The scalar twin of [`dot`], written so the compiler vectorises it (eight running sums).
pub fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += alpha * x` (the vector twin is `x86::axpy`, used by [`weighted_sum`]).
fn axpy_scalar(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// `out[i] = scale * q . keys[first_slot + i]` for `out.len()` slots of a head's key storage
/// (`q.len()` values per slot), f16 keys converted on the fly.
pub fn key_scores(q: &[f32], keys: &KvRows, first_slot: usize, scale: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        let (lo, hi) = (first_slot * q.len(), (first_slot + out.len()) * q.len());
        // SAFETY: AVX2, FMA and F16C are present (checked at run time); slices checked by the
        // indexing below.
        unsafe {
            return match keys {
                KvRows::F32(k) => x86::key_scores(q, &k[lo..hi], scale, out),
                KvRows::F16(k) if q.len() % 8 == 0 => x86::key_scores_f16(q, &k[lo..hi], scale, out),
                KvRows::Q8_0 { qs, scales, head_dim } if *head_dim == q.len() && q.len() % 32 == 0 => {
                    let nb = q.len() / 32;
                    let sc = &scales[first_slot * nb..(first_slot + out.len()) * nb];
                    x86::key_scores_q8_0(q, &qs[lo..hi], sc, scale, out)
                }
                KvRows::F16(_) | KvRows::Q8_0 { .. } => key_scores_scalar(q, keys, first_slot, scale, out),
            };
        }
    }
    key_scores_scalar(q, keys, first_slot, scale, out)
}

/// The scalar twin of [`key_scores`]: decode each key to f32, then [`dot_scalar`].
pub fn key_scores_scalar(q: &[f32], keys: &KvRows, first_slot: usize, scale: f32, out: &mut [f32]) {
    let mut k = vec![0f32; q.len()];
    for (s, o) in out.iter_mut().enumerate() {
        keys.read((first_slot + s) * q.len(), &mut k);
        *o = dot_scalar(q, &k) * scale;
    }
}

/// `out += sum_i weights[i] * values[first_slot + i]` (`out.len()` values per slot); zero
/// weights are skipped, so masked slots cost nothing and their storage may hold anything.
pub fn weighted_sum(weights: &[f32], values: &KvRows, first_slot: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::dot::simd_available() {
        let (lo, hi) = (first_slot * out.len(), (first_slot + weights.len()) * out.len());
        // SAFETY: AVX2, FMA and F16C are present (checked at run time); slices checked by the
        // indexing below.
        unsafe {
            return match values {
                KvRows::F32(v) => x86::weighted_sum(weights, &v[lo..hi], out),
                KvRows::F16(v) if out.len() % 8 == 0 && out.len() <= 128 => {
                    x86::weighted_sum_f16(weights, &v[lo..hi], out)
                }
                KvRows::Q8_0 { qs, scales, head_dim }
                    if *head_dim == out.len() && out.len() % 32 == 0 && out.len() <= 128 =>
                {
                    let nb = out.len() / 32;
                    let sc = &scales[first_slot * nb..(first_slot + weights.len()) * nb];
                    x86::weighted_sum_q8_0(weights, &qs[lo..hi], sc, out)
                }
                KvRows::F16(_) | KvRows::Q8_0 { .. } => weighted_sum_scalar(weights, values, first_slot, out),
            };
        }
    }
    weighted_sum_scalar(weights, values, first_slot, out)
}

pub fn weighted_sum_scalar(weights: &[f32], values: &KvRows, first_slot: usize, out: &mut [f32]) {
    let mut v = vec![0f32; out.len()];
    for (s, &w) in weights.iter().enumerate() {
        if w != 0.0 {
            values.read((first_slot + s) * out.len(), &mut v);
            axpy_scalar(w, &v, out);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::quant::dot::x86::hsum;
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn key_scores(q: &[f32], keys: &[f32], scale: f32, out: &mut [f32]) {
        let d = q.len();
        for (s, o) in out.iter_mut().enumerate() {
            *o = dot(q, keys.get_unchecked(s * d..(s + 1) * d)) * scale;
        }
    }

    /// Eight f16 values at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16x8(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn key_scores_f16(q: &[f32], keys: &[f16], scale: f32, out: &mut [f32]) {
        let d = q.len(); // a multiple of 8 (the caller checks)
        for (s, o) in out.iter_mut().enumerate() {
            let pk = keys.as_ptr().add(s * d);
            let mut acc = _mm256_setzero_ps();
            for c in (0..d).step_by(8) {
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(c)), load_f16x8(pk.add(c)), acc);
            }
            *o = hsum(acc) * scale;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_f16(weights: &[f32], values: &[f16], out: &mut [f32]) {
        // d: a multiple of 8, at most 128 (the caller checks). The output row lives in
        // registers across all slots.
        let d = out.len();
        let po = out.as_mut_ptr();
        let mut acc = [_mm256_setzero_ps(); 16];
        for (k, a) in acc.iter_mut().enumerate().take(d / 8) {
            *a = _mm256_loadu_ps(po.add(8 * k));
        }
        for (s, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                let (vw, pv) = (_mm256_set1_ps(w), values.as_ptr().add(s * d));
                for (k, a) in acc.iter_mut().enumerate().take(d / 8) {
                    *a = _mm256_fmadd_ps(vw, load_f16x8(pv.add(8 * k)), *a);
                }
            }
        }
        for (k, a) in acc.iter().enumerate().take(d / 8) {
            _mm256_storeu_ps(po.add(8 * k), *a);
        }
    }

    /// Eight signed bytes at `p` as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_i8x8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_to_f32(h: f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    /// q8_0 keys: per 32-value block, an f32 dot with the codes, then times the block's scale.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn key_scores_q8_0(q: &[f32], qs: &[i8], scales: &[f16], scale: f32, out: &mut [f32]) {
        let d = q.len(); // a multiple of 32 (the caller checks)
        let nb = d / 32;
        let pq = q.as_ptr();
        for (s, o) in out.iter_mut().enumerate() {
            let pk = qs.as_ptr().add(s * d);
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let mut block = _mm256_mul_ps(_mm256_loadu_ps(pq.add(32 * b)), load_i8x8(pk.add(32 * b)));
                for c in 1..4 {
                    let at = 32 * b + 8 * c;
                    block = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(at)), load_i8x8(pk.add(at)), block);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(f16_to_f32(*scales.get_unchecked(s * nb + b))), block, acc);
            }
            *o = hsum(acc) * scale;
        }
    }

    /// q8_0 values: each block's codes times weight x scale, accumulated in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_q8_0(weights: &[f32], qs: &[i8], scales: &[f16], out: &mut [f32]) {
        let d = out.len(); // a multiple of 32, at most 128 (the caller checks)
        let nb = d / 32;
        let po = out.as_mut_ptr();
        let mut acc = [_mm256_setzero_ps(); 16];
        for (k, a) in acc.iter_mut().enumerate().take(d / 8) {
            *a = _mm256_loadu_ps(po.add(8 * k));
        }
        for (s, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                let pv = qs.as_ptr().add(s * d);
                for b in 0..nb {
                    let coef = _mm256_set1_ps(w * f16_to_f32(*scales.get_unchecked(s * nb + b)));
                    for c in 0..4 {
                        let k = 4 * b + c;
                        acc[k] = _mm256_fmadd_ps(coef, load_i8x8(pv.add(8 * k)), acc[k]);
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate().take(d / 8) {
            _mm256_storeu_ps(po.add(8 * k), *a);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(weights: &[f32], values: &[f32], out: &mut [f32]) {
        let d = out.len();
        if d == 64 {
            // The common head size: the output row lives in eight registers across all slots.
            let po = out.as_mut_ptr();
            let mut acc: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(po.add(8 * k)));
            for (s, &w) in weights.iter().enumerate() {
                if w != 0.0 {
                    let (vw, pv) = (_mm256_set1_ps(w), values.as_ptr().add(s * 64));
                    for (k, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(vw, _mm256_loadu_ps(pv.add(8 * k)), *a);
                    }
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(po.add(8 * k), *a);
            }
            return;
        }
        for (s, &w) in weights.iter().enumerate() {
            if w != 0.0 {
                axpy(w, values.get_unchecked(s * d..(s + 1) * d), out);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            i += 16;
        }
        if i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut total = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            total += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        total
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len().min(y.len());
        let (px, py) = (x.as_ptr(), y.as_mut_ptr());
        let va = _mm256_set1_ps(alpha);
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))));
            i += 8;
        }
        while i < n {
            *py.add(i) += alpha * *px.add(i);
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::dot::tests::{random_row, Lcg};
    use keyformer_kv::NoiseKind;

    #[test]
    fn gemm_and_rowdot_paths_match_the_reference_product() {
        let mut rng = Lcg(11);
        let types = [GgmlType::F32, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::Q4K];
        for t in types.into_iter().chain([GgmlType::Q5K, GgmlType::Q6K, GgmlType::Q3K, GgmlType::F16]) {
            let (rows, cols) = (70, 256);
            let bytes = random_row(t, rows * cols, &mut rng);
            let w = WeightView { ggml_type: t, rows, cols, bytes: &bytes };
            let mut wf = vec![0f32; rows * cols];
            dequantize_row(t, &bytes, &mut wf);
            for n in [1usize, 3, 9, 21] {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
                for acts in [PrefillActivations::F32, PrefillActivations::Q8, PrefillActivations::Exact] {
                    let mut y = vec![0f32; n * rows];
                    matmul_many(&[w], &x, n, acts, &mut [&mut y]);
                    // One token at a time through the decode kernels.
                    let mut decode = vec![0f32; n * rows];
                    for i in 0..n {
                        matmul_many(
                            &[w],
                            &x[i * cols..(i + 1) * cols],
                            1,
                            acts,
                            &mut [&mut decode[i * rows..(i + 1) * rows]],
                        );
                    }
                    for i in 0..n {
                        for r in 0..rows {
                            let xr = &x[i * cols..(i + 1) * cols];
                            let wr = &wf[r * cols..(r + 1) * cols];
                            let want: f32 = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                            let mag: f32 = xr.iter().zip(wr).map(|(a, b)| (a * b).abs()).sum();
                            let got = y[i * rows + r];
                            assert!((got - want).abs() <= 0.01 * mag + 1e-5, "{t} {acts:?} n={n} r={r}");
                            // Exact: f32 activations whatever the tokens, one at a time included
                            // (the same sums as the reference, in another order).
                            if acts == PrefillActivations::Exact {
                                let step = decode[i * rows + r];
                                assert!((step - want).abs() <= 1e-5 * mag + 1e-6, "{t} exact, one token, r={r}");
                            }
                            // With 8-bit activations a prompt token gets the numbers a decode step
                            // gives it (the same integer sums; only the float order differs).
                            if acts == PrefillActivations::Q8 && t.uses_q8_activations() && gemm_q8::available() {
                                let step = decode[i * rows + r];
                                assert!((got - step).abs() <= 1e-5 * mag + 1e-6, "{t} n={n} r={r}: {got} vs {step}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// One KV head with keys at positions 0..3, two query heads sharing it, one query at
    /// position 2: outputs and score rows worked out by hand.
    #[test]
    fn attention_outputs_and_scores_match_a_hand_computation() {
        let mut kv = HeadKv::new(8, 2, crate::kv::KvType::F32);
        let keys = [[0.0f32, 0.0], [2.0, 0.0], [0.0, 2.0], [9.0, 9.0]];
        for (p, k) in keys.iter().enumerate() {
            kv.insert(p as u32, k, &[p as f32, 1.0]).unwrap();
        }
        // Query head 0 = (1, 0), head 1 = (0, 1); scale 1/sqrt(2). Position 3 is in the future.
        let q = [1.0f32, 0.0, 0.0, 1.0];
        let heads = [kv];
        let softmax = |x: &[f32]| {
            let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = x.iter().map(|v| (v - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|v| v / s).collect::<Vec<f32>>()
        };
        let c = 2.0 / 2f32.sqrt();
        let logits = [[0.0, c, 0.0], [0.0, 0.0, c]];
        let probs: Vec<Vec<f32>> = logits.iter().map(|l| softmax(l)).collect();

        let mut out = vec![0f32; 4];
        let sums = attention(&q, &[2], &heads, 2, 2, 0, &[Signal::Attention { from_position: 0 }], &mut out)[0]
            .clone()
            .unwrap();
        for h in 0..2 {
            let want: f32 = (0..3).map(|j| probs[h][j] * j as f32).sum();
            assert!((out[2 * h] - want).abs() < 1e-6 && (out[2 * h + 1] - 1.0).abs() < 1e-6);
        }
        for j in 0..3 {
            assert!((sums[0][j] - (probs[0][j] + probs[1][j])).abs() < 1e-6, "slot {j}");
        }
        assert_eq!(sums[0][3], 0.0, "a future token gets no score");

        // Keyformer: softmax((x + g) / tau) with the counter-based Gumbel noise.
        let (tau, seed) = (1.5, 9);
        let signal = Signal::Noisy { from_position: 0, tau, noise: NoiseKind::Gumbel, seed };
        let sums = attention(&q, &[2], &heads, 2, 2, 4, &[signal], &mut out)[0].clone().unwrap();
        let mut want = [0f32; 3];
        for h in 0..2 {
            let y: Vec<f32> = (0..3)
                .map(|j| (logits[h][j] + noise::sample(NoiseKind::Gumbel, seed, 4, h as u32, 2, j as u32)) / tau)
                .collect();
            softmax(&y).iter().zip(want.iter_mut()).for_each(|(p, w)| *w += p);
        }
        for j in 0..3 {
            assert!((sums[0][j] - want[j]).abs() < 1e-5, "slot {j}: {} vs {}", sums[0][j], want[j]);
        }
        // Rows before from_position do not count.
        assert!(attention(&q, &[2], &heads, 2, 2, 0, &[Signal::Attention { from_position: 3 }], &mut out)[0]
            .clone()
            .unwrap()[0]
            .iter()
            .all(|&v| v == 0.0));
    }

    /// KVzip's reconstruction signal against a direct computation: rows of two query heads
    /// sharing a KV head, the softmax restricted to the sinks, the repeated part and the
    /// repetition, each repeated slot's largest probability over rows and heads; rows before
    /// the repetition, slots outside the part and a single row alone are checked too.
    #[test]
    fn reconstruction_scores_are_maxima_of_the_restricted_softmax() {
        let (hd, n_heads, ctx, reps) = (4, 2, 12u32, 5u32);
        let mut rng = Lcg(5);
        let mut kv = HeadKv::new((ctx + reps) as usize, hd, crate::kv::KvType::F32);
        let mut keys = Vec::new();
        for p in 0..ctx + reps {
            let k: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
            kv.insert(p, &k, &[p as f32; 4]).unwrap();
            keys.push(k);
        }
        let heads = [kv];
        let positions: Vec<u32> = (ctx - 2..ctx + reps).collect(); // two prompt rows first
        let q: Vec<f32> = (0..positions.len() * n_heads * hd).map(|_| rng.f32() * 2.0).collect();
        let (first, end, sinks, layer) = (3u32, 8u32, 2u32, 3usize);
        let scale = 1.0 / (hd as f32).sqrt();
        // KVzip's plain softmax, and Keyformer's variants (`kvzip:gumbel`): Gumbel noise over a
        // temperature, and no noise at temperature 1 (which must equal the plain softmax).
        let gumbel = ScoreNoise { kind: NoiseKind::Gumbel, tau: 1.5, seed: 7 };
        let plain_at_one = ScoreNoise { kind: NoiseKind::None, tau: 1.0, seed: 7 };
        let mut plain_scores = Vec::new();
        for noise in [None, Some(gumbel), Some(plain_at_one)] {
            let signal = Signal::Reconstruction { from_position: ctx, first, end, sinks, noise };
            let mut want = vec![0f32; (ctx + reps) as usize];
            for (i, &p) in positions.iter().enumerate().filter(|(_, &p)| p >= ctx) {
                for h in 0..n_heads {
                    let qi = &q[(i * n_heads + h) * hd..(i * n_heads + h + 1) * hd];
                    let counted: Vec<u32> =
                        (0..=p).filter(|&s| s < sinks || (first..end).contains(&s) || s >= ctx).collect();
                    let logit = |s: u32| {
                        let x = scale * qi.iter().zip(&keys[s as usize]).map(|(a, b)| a * b).sum::<f32>();
                        match noise {
                            None => x,
                            Some(n) => (x + noise::sample(n.kind, n.seed, layer as u32, h as u32, p, s)) / n.tau,
                        }
                    };
                    let m = counted.iter().map(|&s| logit(s)).fold(f32::NEG_INFINITY, f32::max);
                    let denom: f32 = counted.iter().map(|&s| (logit(s) - m).exp()).sum();
                    for s in first..end {
                        want[s as usize] = want[s as usize].max((logit(s) - m).exp() / denom);
                    }
                }
            }
            let mut out = vec![0f32; q.len()];
            let got = attention(&q, &positions, &heads, n_heads, hd, layer, &[signal], &mut out)[0].clone().unwrap();
            for (s, w) in want.iter().enumerate() {
                let g = got[0].get(s).copied().unwrap_or(0.0);
                assert!((g - w).abs() < 1e-6, "{noise:?}, slot {s}: {g} against {w}");
                if !(first as usize..end as usize).contains(&s) {
                    assert_eq!(g, 0.0, "slot {s} lies outside the repeated part");
                }
            }
            assert!(want[first as usize..end as usize].iter().all(|&w| w > 0.0));
            plain_scores.push(got[0].clone());
            // One row alone (the general path serves it too) gives that row's maxima.
            let last = positions.len() - 1;
            let rows = (&q[last * n_heads * hd..], &positions[last..]);
            let one = attention(rows.0, rows.1, &heads, n_heads, hd, layer, &[signal], &mut out)[0].clone().unwrap();
            assert!(one[0][first as usize..end as usize].iter().all(|&v| v > 0.0 && v <= 1.0));
        }
        assert_ne!(plain_scores[0], plain_scores[1], "the noise moves the scores");
    }

    /// The split single-query path against the general path (forced by asking for two signals)
    /// on GQA heads with several slot ranges, freed slots and a future token.
    #[test]
    fn single_query_attention_equals_the_general_path() {
        let mut rng = Lcg(21);
        let (n_kv, group, hd, n) = (3usize, 3usize, 64usize, 700usize);
        for kv_type in [crate::kv::KvType::F32, crate::kv::KvType::F16] {
            let mut heads: Vec<HeadKv> = (0..n_kv).map(|_| HeadKv::new(n + 1, hd, kv_type)).collect();
            for (g, head) in heads.iter_mut().enumerate() {
                for p in 0..n as u32 + 1 {
                    let k: Vec<f32> = (0..hd).map(|_| rng.f32() * 2.0).collect();
                    let v: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
                    head.insert(p, &k, &v).unwrap();
                }
                for slot in (g..n).step_by(7) {
                    head.table.evict(slot).unwrap();
                }
            }
            let q: Vec<f32> = (0..n_kv * group * hd).map(|_| rng.f32()).collect();
            let pos = n as u32 - 1; // the token at position n is in the future
            let all = [
                Signal::None,
                Signal::Attention { from_position: 0 },
                Signal::Attention { from_position: pos + 1 },
                Signal::Noisy { from_position: 0, tau: 1.3, noise: NoiseKind::Gumbel, seed: 5 },
                Signal::Noisy { from_position: 0, tau: 1.0, noise: NoiseKind::None, seed: 5 },
                Signal::Noisy { from_position: 0, tau: 1.7, noise: NoiseKind::Gumbel, seed: 6 },
            ];
            // Each signal alone, and all at once (a shared prefill's last row).
            let sets: Vec<Vec<Signal>> = all.iter().map(|&s| vec![s]).chain([all.to_vec(), Vec::new()]).collect();
            for signals in sets {
                let (mut fast, mut general) = (vec![0f32; q.len()], vec![0f32; q.len()]);
                let a = attention(&q, &[pos], &heads, n_kv * group, hd, 3, &signals, &mut fast);
                let b = with_fresh_rows(&signals, n_kv, |dest| {
                    attention_rows(
                        &q,
                        &[pos],
                        &heads,
                        &AttentionSpec::causal(n_kv * group, n_kv, hd),
                        3,
                        &signals,
                        &mut general,
                        dest,
                    )
                });
                for (x, y) in fast.iter().zip(&general) {
                    assert!((x - y).abs() <= 1e-5, "{kv_type:?} {signals:?}: output {x} vs {y}");
                }
                assert_eq!(a.len(), signals.len());
                for ((a, b), signal) in a.iter().zip(&b).zip(&signals) {
                    match (a, b) {
                        (None, None) => assert_eq!(*signal, Signal::None),
                        (Some(a), Some(b)) => {
                            for (ha, hb) in a.iter().zip(b) {
                                assert_eq!(ha.len(), hb.len());
                                for (x, y) in ha.iter().zip(hb) {
                                    assert!((x - y).abs() <= 1e-5, "{kv_type:?} {signal:?}: score {x} vs {y}");
                                }
                                assert_eq!(ha[n], 0.0, "the future token");
                            }
                        }
                        _ => panic!("{signal:?}: one path scored, the other did not"),
                    }
                }
            }
        }
    }

    /// `attention_into` adds to the rows it is given (a policy's running scores), growing
    /// short rows with zeros, on both paths.
    #[test]
    fn scores_are_added_into_the_given_rows() {
        let mut rng = Lcg(4);
        let (n_kv, group, hd, n) = (2usize, 2usize, 16usize, 300usize);
        let mut heads: Vec<HeadKv> = (0..n_kv).map(|_| HeadKv::new(n, hd, crate::kv::KvType::F32)).collect();
        for head in heads.iter_mut() {
            for p in 0..n as u32 {
                let k: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
                head.insert(p, &k, &k).unwrap();
            }
        }
        let signals = [Signal::Noisy { from_position: 0, tau: 1.2, noise: NoiseKind::Gumbel, seed: 1 }];
        for positions in [vec![n as u32 - 1], vec![n as u32 - 2, n as u32 - 1]] {
            let q: Vec<f32> = (0..positions.len() * n_kv * group * hd).map(|_| rng.f32()).collect();
            let mut out = vec![0f32; q.len()];
            let fresh = attention(&q, &positions, &heads, n_kv * group, hd, 0, &signals, &mut out)[0].clone().unwrap();
            // Rows already holding scores, one of them shorter than the slots.
            let mut rows: Vec<Vec<f32>> = vec![(0..n).map(|i| i as f32).collect(), vec![5.0; 10]];
            let before = rows.clone();
            let spec = AttentionSpec::causal(n_kv * group, n_kv, hd);
            attention_into(&q, &positions, &heads, &spec, 0, &signals, &mut out, &mut [&mut rows]);
            for g in 0..n_kv {
                assert_eq!(rows[g].len(), n);
                for i in 0..n {
                    let want = before[g].get(i).copied().unwrap_or(0.0) + fresh[g][i];
                    assert!((rows[g][i] - want).abs() <= 1e-5 * want.abs().max(1.0), "kv {g} slot {i}");
                }
            }
        }
    }

    #[test]
    fn batched_key_scores_and_weighted_sums_match_their_scalar_twins() {
        let mut rng = Lcg(8);
        for d in [7usize, 40, 64, 96, 128] {
            for n in [0usize, 1, 13, 100] {
                let q: Vec<f32> = (0..d).map(|_| rng.f32()).collect();
                let raw: Vec<f32> = (0..n * d).map(|_| rng.f32()).collect();
                let kinds = crate::kv::KvType::ALL;
                for kv in kinds.map(|t| KvRows::from_f32(t, d, &raw)) {
                    let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                    key_scores(&q, &kv, 0, 0.125, &mut a);
                    key_scores_scalar(&q, &kv, 0, 0.125, &mut b);
                    // A range of slots gives the same scores as the whole row.
                    if n > 13 {
                        let mut part = vec![0f32; 7];
                        key_scores(&q, &kv, 5, 0.125, &mut part);
                        assert_eq!(&part[..], &a[5..12]);
                    }
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "scores d={d} n={n} {kv:.8?}");
                    }
                    let mut w: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
                    if n > 2 {
                        w[1] = 0.0;
                    }
                    let start: Vec<f32> = (0..d).map(|_| rng.f32()).collect();
                    let (mut o1, mut o2) = (start.clone(), start.clone());
                    weighted_sum(&w, &kv, 0, &mut o1);
                    weighted_sum_scalar(&w, &kv, 0, &mut o2);
                    if n > 13 {
                        let (mut p1, mut p2) = (start.clone(), start.clone());
                        weighted_sum(&w[5..12], &kv, 5, &mut p1);
                        weighted_sum_scalar(&w[5..12], &kv, 5, &mut p2);
                        for (x, y) in p1.iter().zip(&p2) {
                            assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "weighted sum of a range d={d} n={n}");
                        }
                    }
                    for (x, y) in o1.iter().zip(&o2) {
                        assert!((x - y).abs() <= 1e-4 * (1.0 + y.abs()), "weighted sum d={d} n={n}");
                    }
                }
            }
        }
    }

    #[test]
    fn simd_dot_matches_its_scalar_twin() {
        let mut rng = Lcg(5);
        for n in [1usize, 7, 8, 15, 16, 17, 64, 100] {
            let a: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let mag: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
            assert!((dot(&a, &b) - dot_scalar(&a, &b)).abs() <= 1e-5 * mag.max(1.0), "n={n}");
        }
    }

    #[test]
    fn rope_rotates_pairs_and_preserves_norm() {
        let mut x = vec![1.0f32, 0.0, 0.0, 1.0];
        rope(&mut x, 1, 4, &[1], &[std::f32::consts::FRAC_PI_2, 0.0], RopeStyle::AdjacentPairs, 1.0);
        // First pair rotated by 90 degrees; second pair (frequency 0) unchanged.
        assert!((x[0] - 0.0).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 1.0]);
    }
}

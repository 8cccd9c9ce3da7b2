//! Every CUDA op against the CPU backend on random inputs at a model's shapes, and the GPU's
//! speed at those shapes (`keyformer gpu-check`). Each check states its tolerance, derived from
//! the arithmetic both sides do, so that a wrong kernel fails it.

use cudarc::driver::CudaSlice;
use keyformer_kv::{noise::NoiseKind, Amount, PolicyConfig, PolicyKind, Signal};

use super::{
    dev_addr, AttentionScratch, AttentionShape, AttnRow, DecodePass, DeviceKv, Gpu, GpuError, GpuInfo, ScoreSignal,
    FREE_SLOT,
};
use crate::backend::cpu::ops::{self as cpu, WeightView};
use crate::kv::{HeadKv, KvType};
use crate::quant::GgmlType;

/// The sizes the checks run at.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct CheckShape {
    pub name: &'static str,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_embd: usize,
    pub n_ff: usize,
}

/// Shapes of the models the issue names, and the default model's.
pub const SHAPES: [CheckShape; 4] = [
    CheckShape { name: "llama2-7b", n_heads: 32, n_kv_heads: 32, head_dim: 128, n_embd: 4096, n_ff: 11008 },
    CheckShape { name: "llama3-8b", n_heads: 32, n_kv_heads: 8, head_dim: 128, n_embd: 4096, n_ff: 14336 },
    CheckShape { name: "gemma2-9b", n_heads: 16, n_kv_heads: 8, head_dim: 256, n_embd: 3584, n_ff: 14336 },
    CheckShape { name: "smollm2-135m", n_heads: 9, n_kv_heads: 3, head_dim: 64, n_embd: 576, n_ff: 1536 },
];

/// One comparison: the largest error against the tolerance it must stay under.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckRow {
    pub op: String,
    pub max_error: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// What the error is measured against.
    pub note: String,
}

/// A timed op at the check's shapes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    pub op: String,
    pub microseconds: f64,
    /// Bytes the op must read, over its time.
    pub read_gb_s: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub gpu: GpuInfo,
    pub shape: CheckShape,
    pub slots: usize,
    pub checks: Vec<CheckRow>,
    pub timings: Vec<Timing>,
    pub read_bandwidth_gb_s: f64,
}

impl CheckReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }
}

/// Deterministic uniform values in [-scale, scale).
struct Lcg(u64);
impl Lcg {
    fn f32(&mut self, scale: f32) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32(scale)).collect()
    }
}

/// max |a - b| / bound, with `bound[i]` what element i's error is allowed to scale with.
fn worst(a: &[f32], b: &[f32], bound: impl Fn(usize) -> f64) -> f64 {
    a.iter().zip(b).enumerate().map(|(i, (x, y))| (*x as f64 - *y as f64).abs() / bound(i)).fold(0.0, f64::max)
}

pub(crate) fn row(op: &str, max_error: f64, tolerance: f64, note: &str) -> CheckRow {
    CheckRow { op: op.into(), max_error, tolerance, passed: max_error <= tolerance, note: note.into() }
}

fn max_abs(v: &[f32]) -> f64 {
    v.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-30)
}

/// Run every check at `shape` with `slots` KV slots per head, and time the ops.
pub fn run(gpu: &Gpu, shape: CheckShape, slots: usize) -> Result<CheckReport, GpuError> {
    let CheckShape { n_heads, n_kv_heads, head_dim: hd, n_embd: d, n_ff, .. } = shape;
    let mut rng = Lcg(0x5EED);
    let mut checks = Vec::new();
    let mut timings = Vec::new();

    // RMSNorm over 4 rows.
    let rows = 4;
    let x = rng.vec(rows * d, 2.0);
    let w = rng.vec(d, 1.0);
    let mut want = vec![0f32; rows * d];
    cpu::rms_norm(&x, &w, 1e-5, &mut want);
    let mut out = gpu.zeros::<f32>(rows * d)?;
    let mut out16 = gpu.zeros::<u16>(rows * d)?;
    gpu.rms_norm(&gpu.upload(&x)?, &gpu.upload(&w)?, 1e-5, &mut out, Some(&mut out16))?;
    let got = gpu.download(&out)?;
    let scale = max_abs(&want);
    checks.push(row("rms_norm", worst(&got, &want, |_| scale), 1e-5, "relative to the largest output"));
    checks.push(f16_copy_row(gpu, "rms_norm", &got, &out16)?);

    // RoPE at positions near and far.
    let positions = [0u32, 17, 1000, 8191];
    let inv_freq: Vec<f32> = (0..hd / 2).map(|i| 10_000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
    let q = rng.vec(positions.len() * n_heads * hd, 1.0);
    let mut want = q.clone();
    let style = crate::backend::RopeStyle::AdjacentPairs;
    cpu::rope(&mut want, n_heads, hd, &positions, &inv_freq, style, 1.0);
    let mut dev = gpu.upload(&q)?;
    gpu.rope(&mut dev, n_heads, hd, &gpu.upload(&positions)?, &gpu.upload(&inv_freq)?, style, 1.0)?;
    let got = gpu.download(&dev)?;
    // Angles up to 8191 rad in f32: both sides' sin/cos are within a few ulp of the f32 angle.
    checks.push(row("rope_adjacent_pairs", worst(&got, &want, |_| 1.0), 1e-5, "absolute (inputs in [-1, 1])"));
    // Queries and keys in one launch: each bit-identical to its own launch.
    let k = rng.vec(positions.len() * n_kv_heads * hd, 1.0);
    let (pos_dev, freq_dev) = (gpu.upload(&positions)?, gpu.upload(&inv_freq)?);
    let (mut q_alone, mut k_alone) = (gpu.upload(&q)?, gpu.upload(&k)?);
    gpu.rope(&mut q_alone, n_heads, hd, &pos_dev, &freq_dev, style, 1.0)?;
    gpu.rope(&mut k_alone, n_kv_heads, hd, &pos_dev, &freq_dev, style, 1.0)?;
    let (mut q_both, mut k_both) = (gpu.upload(&q)?, gpu.upload(&k)?);
    let mut q16 = gpu.zeros::<u16>(q.len())?;
    gpu.rope_qk(&mut q_both, &mut k_both, n_heads, n_kv_heads, hd, &pos_dev, &freq_dev, style, 1.0, Some(&mut q16))?;
    checks.push(f16_copy_row(gpu, "rope's queries", &gpu.download(&q_both)?, &q16)?);
    let differ = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    let n_differ = differ(gpu.download(&q_both)?, gpu.download(&q_alone)?)
        + differ(gpu.download(&k_both)?, gpu.download(&k_alone)?);
    checks.push(row(
        "rope of queries and keys in one launch",
        n_differ as f64,
        0.0,
        "values that differ from two launches",
    ));

    // SwiGLU's product.
    let gate = rng.vec(rows * n_ff, 6.0);
    let up = rng.vec(rows * n_ff, 1.0);
    let mut want = gate.clone();
    cpu::silu_mul(&mut want, &up);
    let mut dev = gpu.upload(&gate)?;
    let mut gate16 = gpu.zeros::<u16>(gate.len())?;
    gpu.silu_mul(&mut dev, &gpu.upload(&up)?, Some(&mut gate16))?;
    let got = gpu.download(&dev)?;
    let scale = max_abs(&want);
    checks.push(row("silu_mul", worst(&got, &want, |_| scale), 1e-6, "relative to the largest output"));
    checks.push(f16_copy_row(gpu, "silu_mul", &got, &gate16)?);
    // A length that is not a multiple of 4 takes the kernel's one-value-a-thread path.
    let odd = gate.len() - 1;
    let mut dev = gpu.upload(&gate[..odd])?;
    gpu.silu_mul(&mut dev, &gpu.upload(&up[..odd])?, None)?;
    let got = gpu.download(&dev)?;
    checks.push(row(
        &format!("silu_mul of {odd} values"),
        worst(&got, &want[..odd], |_| scale),
        1e-6,
        "relative to the largest output",
    ));

    // The exact GELU (GPT-NeoX, MPT): CUDA's erff against the CPU's erf.
    let mut want = gate.clone();
    want.iter_mut().for_each(|v| *v = cpu::gelu_erf(*v));
    let mut dev = gpu.upload(&gate)?;
    gpu.gelu_erf(&mut dev)?;
    let got = gpu.download(&dev)?;
    let scale = max_abs(&want);
    checks.push(row("gelu_erf", worst(&got, &want, |_| scale), 1e-6, "relative to the largest output"));

    // MPT's clip_qkv: exactly the CPU's clamp.
    let mut want = gate.clone();
    want.iter_mut().for_each(|v| *v = v.clamp(-0.5, 0.5));
    let mut dev = gpu.upload(&gate)?;
    gpu.clamp(&mut dev, 0.5)?;
    let got = gpu.download(&dev)?;
    checks.push(row("clamp", worst(&got, &want, |_| 1.0), 0.0, "absolute"));

    // An f16 weight times 1 activation row (our GEMV) and 3 and 12 (cuBLAS), against the
    // CPU's F16 row dots.
    let (wr, wc) = (n_ff, d);
    let w32 = rng.vec(wr * wc, 0.05);
    let w16: Vec<u16> = w32.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
    let w_bytes: Vec<u8> = w16.iter().flat_map(|b| b.to_le_bytes()).collect();
    let view = WeightView { ggml_type: GgmlType::F16, rows: wr, cols: wc, bytes: &w_bytes };
    let w_dev = gpu.upload(&w16)?;
    let mut x16 = gpu.zeros::<u16>(12 * wc)?;
    let mut y_dev = gpu.zeros::<f32>(12 * wr)?;
    for n in [1usize, 3, 12] {
        let x = rng.vec(n * wc, 1.0);
        let mut want = vec![0f32; n * wr];
        cpu::matmul(&view, &x, n, &mut want);
        gpu.matmul_f16(&w_dev, wr, wc, &gpu.upload(&x)?, n, &mut x16, &mut y_dev)?;
        let got = gpu.download(&y_dev)?;
        // cuBLAS gets the activations rounded to f16 (relative error <= 2^-11 each): the error
        // is bounded by 2^-11 * sum |w x| (plus summation order, far smaller); the GEMV keeps
        // them in f32, so only the summation order differs.
        let magnitude: Vec<f64> = (0..n * wr)
            .map(|i| {
                let (t, r) = (i / wr, i % wr);
                let wrow = &w32[r * wc..(r + 1) * wc];
                wrow.iter().zip(&x[t * wc..(t + 1) * wc]).map(|(a, b)| (a * b).abs() as f64).sum::<f64>() + 1e-12
            })
            .collect();
        checks.push(row(
            &format!("matmul_f16 {wr}x{wc}, {n} rows"),
            worst(&got[..n * wr], &want, |i| magnitude[i]),
            1.0 / 1024.0,
            "relative to sum |w x| of each output",
        ));
    }
    // Three weights of different heights in one launch (Q, K and V): each output is
    // bit-identical to its own launch's (the same warp sums per row).
    let x1 = gpu.upload(&rng.vec(wc, 1.0))?;
    gpu.gemv_f16(&w_dev, wr, wc, &x1, &mut y_dev)?;
    let alone = gpu.download(&y_dev)?;
    let heights = [wr, 1000.min(wr), 64.min(wr)];
    let parts: Vec<CudaSlice<u16>> = heights.iter().map(|&h| gpu.upload(&w16[..h * wc])).collect::<Result<_, _>>()?;
    let mut outs: Vec<CudaSlice<f32>> = heights.iter().map(|&h| gpu.zeros::<f32>(h)).collect::<Result<_, _>>()?;
    let ws: Vec<(&CudaSlice<u16>, usize)> = parts.iter().zip(heights).collect();
    gpu.gemv_f16_many(&ws, wc, &x1, &mut outs.iter_mut().collect::<Vec<_>>())?;
    let differ = differing_outputs(gpu, &outs, &alone)?;
    checks.push(row(
        &format!("gemv f16, weights of {heights:?} rows in one launch"),
        differ as f64,
        0.0,
        "outputs that differ from each weight's own launch",
    ));

    // An RMS norm after a residual add, in one pass: x + y normed, and x left holding the sum.
    let (rows, xs, ys, w) = (4, rng.vec(4 * d, 2.0), rng.vec(4 * d, 2.0), rng.vec(d, 1.0));
    let sum: Vec<f32> = xs.iter().zip(&ys).map(|(a, b)| a + b).collect();
    let mut want = vec![0f32; rows * d];
    cpu::rms_norm(&sum, &w, 1e-5, &mut want);
    let (mut x_dev, y_dev_rows, mut out) = (gpu.upload(&xs)?, gpu.upload(&ys)?, gpu.zeros::<f32>(rows * d)?);
    let mut out16 = gpu.zeros::<u16>(rows * d)?;
    let norm_w = gpu.upload(&w)?;
    gpu.add_rms_norm(
        &mut x_dev.slice_mut(..),
        &y_dev_rows.slice(..),
        &norm_w,
        1e-5,
        &mut out.slice_mut(..),
        Some(&mut out16.slice_mut(..)),
    )?;
    let (got, got_sum) = (gpu.download(&out)?, gpu.download(&x_dev)?);
    let scale = max_abs(&want);
    checks.push(row("add_rms_norm", worst(&got, &want, |_| scale), 1e-5, "relative to the largest output"));
    checks.push(f16_copy_row(gpu, "add_rms_norm", &got, &out16)?);
    checks.push(row("add_rms_norm's residual", worst(&got_sum, &sum, |_| 1.0), 0.0, "absolute (x + y exactly)"));

    // Decode-time speed of that product (one row: the weight read once), ours and cuBLAS's.
    let micros = time_us(gpu, 50, || gpu.matmul_f16(&w_dev, wr, wc, &x1, 1, &mut x16, &mut y_dev))?;
    timings.push(Timing {
        op: format!("matmul_f16 {wr}x{wc}, 1 row (GEMV)"),
        microseconds: micros,
        read_gb_s: Some((wr * wc * 2) as f64 / micros / 1e3),
    });
    let micros = time_us(gpu, 50, || {
        gpu.to_f16(&x1, wc, &mut x16)?;
        gpu.gemm_f16(&w_dev, wr, wc, &x16, 1, &mut y_dev)
    })?;
    timings.push(Timing {
        op: format!("matmul_f16 {wr}x{wc}, 1 row (cuBLAS)"),
        microseconds: micros,
        read_gb_s: Some((wr * wc * 2) as f64 / micros / 1e3),
    });

    quantised_checks(gpu, n_ff, d, &mut rng, &mut checks, &mut timings)?;

    // Decode attention with both scores, over slots with holes (evicted tokens) and two slots
    // after the query's position (masked).
    let mut heads: Vec<HeadKv> = (0..n_kv_heads).map(|_| HeadKv::new(slots, hd, KvType::F16)).collect();
    for head in heads.iter_mut() {
        for p in 0..slots as u32 {
            head.insert(p, &rng.vec(hd, 1.0), &rng.vec(hd, 1.0)).map_err(|e| GpuError::Shape(e.to_string()))?;
        }
        for s in (3..slots).step_by(11) {
            head.table.evict(s).map_err(|e| GpuError::Shape(e.to_string()))?;
        }
    }
    let position = slots as u32 - 3;
    let layer = 5;
    let (tau, seed) = (1.7f32, 42u64);
    let q = rng.vec(n_heads * hd, 4.0);
    let signals = [
        Signal::Noisy { from_position: 0, tau, noise: NoiseKind::Gumbel, seed },
        Signal::Attention { from_position: 0 },
    ];
    let mut want_out = vec![0f32; n_heads * hd];
    let want_scores = cpu::attention(&q, &[position], &heads, n_heads, hd, layer, &signals, &mut want_out);

    let kv = device_kv(gpu, &heads, slots, hd)?;
    let shape_a = AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        max_width: slots,
        layer,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        alibi_max: 0.0,
        first_head: 0,
    };
    let q_dev = gpu.upload(&q)?;
    let out_dev = gpu.zeros::<f32>(n_heads * hd)?;
    let mut scratch = AttentionScratch::new(gpu, 1, n_heads, hd, slots)?;
    let mut score_dev = gpu.zeros::<f32>(n_kv_heads * slots)?;
    let victims_dev = gpu.zeros::<u32>(n_kv_heads)?;
    let keyformer = ScoreSignal::Keyformer { tau, seed };
    // The decode step as one attention row (the kernels' descriptor) over the CPU's slots.
    let base_row = AttnRow {
        q: dev_addr(gpu, &q_dev),
        out: dev_addr(gpu, &out_dev),
        keys: dev_addr(gpu, &kv.keys),
        values: dev_addr(gpu, &kv.values),
        slot_pos: dev_addr(gpu, &kv.positions),
        victims: dev_addr(gpu, &victims_dev),
        capacity: slots as i32,
        width: slots as i32,
        query_pos: position,
        ..AttnRow::default()
    };
    let score_addr = dev_addr(gpu, &score_dev);
    let row_for = |signal: Option<ScoreSignal>| gpu.upload(&[base_row.with_signal(signal, score_addr, slots)]);
    // The ranges layout whatever KEYFORMER_DECODE_PASS forces: the other layouts below are
    // checked against it.
    let attend = |row: &cudarc::driver::CudaSlice<AttnRow>, scratch: &mut AttentionScratch| {
        gpu.attention_rows_as(&row.slice(0..1), 1, shape_a, scratch, DecodePass::Ranges { fold_victims: true })
    };
    for (name, signal, want) in
        [("keyformer scores", keyformer, &want_scores[0]), ("h2o scores", ScoreSignal::Attention, &want_scores[1])]
    {
        let want = want.as_ref().expect("scored signal");
        gpu.upload_into(&vec![0.0f32; n_kv_heads * slots], &mut score_dev)?;
        let scored_row = row_for(Some(signal))?;
        attend(&scored_row, &mut scratch)?;
        let got = gpu.download(&score_dev)?;
        // Scores are added to what is there, and a step gives the same sums every time: a
        // second call must double every score exactly.
        attend(&scored_row, &mut scratch)?;
        let twice = gpu.download(&score_dev)?;
        let not_doubled = got.iter().zip(&twice).filter(|(a, b)| (*a * 2.0).to_bits() != b.to_bits()).count();
        checks.push(row(
            &format!("{name} added, repeatably"),
            not_doubled as f64,
            0.0,
            "slots whose score a second step did not exactly double",
        ));
        let got_out = gpu.download(&out_dev)?;
        // A layout's output and scores against the CPU's, as two rows named after `layout`.
        let against_cpu = |checks: &mut Vec<CheckRow>, layout: &str, out: &[f32], scores: &[f32]| {
            let scale = max_abs(&want_out);
            checks.push(row(
                &format!("attention output (with {name}){layout}"),
                worst(out, &want_out, |_| scale),
                1e-4,
                "relative to the largest output",
            ));
            let mut err = 0f64;
            for (g, w) in want.iter().enumerate() {
                // Probabilities summed over a group: against the head's largest.
                err = err.max(worst(&scores[g * slots..g * slots + w.len()], w, |_| max_abs(w)));
            }
            checks.push(row(&format!("{name}{layout}"), err, 1e-4, "relative to the largest score of the KV head"));
        };
        against_cpu(&mut checks, "", &got_out, &got);
        // Large batches combine each head in one block (the same sums in the same order as
        // the ranges), or attend in one pass (another order: against the CPU again).
        gpu.upload_into(&vec![0.0f32; n_kv_heads * slots], &mut score_dev)?;
        gpu.attention_rows_as(&scored_row.slice(0..1), 1, shape_a, &mut scratch, DecodePass::WholeHeads)?;
        let (whole_scores, whole_out) = (gpu.download(&score_dev)?, gpu.download(&out_dev)?);
        let differ = whole_scores.iter().zip(&got).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
            + whole_out.iter().zip(&got_out).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        checks.push(row(
            &format!("{name} and output, whole heads per combining block"),
            differ as f64,
            0.0,
            "scores and outputs not bit-equal to the ranges' (the same sums in the same order)",
        ));
        // A batch of rows (here over one shared cache, each with its own query, output and
        // scores) in whole heads against ranges: the layout large batches take by default.
        {
            let n_rows = 6;
            let (q_len, s_len) = (n_heads * hd, n_kv_heads * slots);
            let qs = gpu.upload(&rng.vec(n_rows * q_len, 4.0))?;
            let mut batch_scratch = AttentionScratch::new(gpu, n_rows, n_heads, hd, slots)?;
            let mut results = Vec::new();
            for pass in [DecodePass::Ranges { fold_victims: false }, DecodePass::WholeHeads] {
                let (outs, scores) = (gpu.zeros::<f32>(n_rows * q_len)?, gpu.zeros::<f32>(n_rows * s_len)?);
                let rows: Vec<AttnRow> = (0..n_rows)
                    .map(|i| AttnRow {
                        q: dev_addr(gpu, &qs) + (i * q_len * 4) as u64,
                        out: dev_addr(gpu, &outs) + (i * q_len * 4) as u64,
                        ..base_row.with_signal(Some(signal), dev_addr(gpu, &scores) + (i * s_len * 4) as u64, slots)
                    })
                    .collect();
                let rows_dev = gpu.upload(&rows)?;
                gpu.attention_rows_as(&rows_dev.slice(0..n_rows), n_rows, shape_a, &mut batch_scratch, pass)?;
                results.push((gpu.download(&outs)?, gpu.download(&scores)?));
            }
            let bits = |a: &[f32], b: &[f32]| a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
            let differ = bits(&results[0].0, &results[1].0) + bits(&results[0].1, &results[1].1);
            let unscored = results[0].1.iter().all(|&v| v == 0.0);
            checks.push(row(
                &format!("{name} and output, {n_rows} rows, whole heads against ranges"),
                (differ + usize::from(unscored)) as f64,
                0.0,
                "values of the rows' outputs and scores not bit-equal (+1 if nothing was scored)",
            ));
        }
        gpu.upload_into(&vec![0.0f32; n_kv_heads * slots], &mut score_dev)?;
        gpu.attention_rows_as(&scored_row.slice(0..1), 1, shape_a, &mut scratch, DecodePass::OnePass)?;
        let (one_scores, one_out) = (gpu.download(&score_dev)?, gpu.download(&out_dev)?);
        // (Where the group's logits do not fit its shared memory, the one pass is whole heads.)
        let one_pass = if gpu.one_pass_fits(n_heads, n_kv_heads, hd, slots) {
            ", one pass"
        } else {
            ", one pass asked, whole heads run"
        };
        against_cpu(&mut checks, one_pass, &one_out, &one_scores);
        if name == "keyformer scores" {
            // A decode step's eviction: the GPU's victims from its scores against the CPU
            // policy's (`SequencePolicy::victims`) from the CPU's.
            let recent = (slots / 4).clamp(1, 64);
            let config = PolicyConfig {
                kind: PolicyKind::Keyformer,
                budget: Some(Amount::Tokens(slots / 2)),
                recent: Some(Amount::Tokens(recent)),
                seed,
                ..PolicyConfig::default()
            };
            let mut policy = config
                .resolve(slots, 1, layer + 1, n_kv_heads)
                .map_err(|e| GpuError::Shape(format!("policy for the victim check: {e}")))?;
            let mut cpu_victims = Vec::new();
            let mut first_recent = Vec::new();
            for (h, head) in heads.iter().enumerate() {
                for (slot, _) in head.table.occupied() {
                    policy.on_insert(layer, h, slot, &head.key(slot));
                }
                policy.observe(layer, h, &want[h]);
                let victims = policy.victims(layer, h, &head.table, head.table.len() - 1);
                cpu_victims.push(victims.first().map_or(FREE_SLOT, |&v| v as u32));
                // The recent window: the `recent` newest tokens held.
                let mut held: Vec<u32> = head.table.occupied().map(|(_, p)| p).collect();
                held.sort_unstable_by(|a, b| b.cmp(a));
                first_recent.push(held.get(recent - 1).copied().unwrap_or(0));
            }
            // Every head holds the same positions here, so one window bound serves all.
            let bound = first_recent[0];
            // The kernel frees the victim's slot: choose on a copy of the positions.
            let mut positions_copy = gpu.upload(&gpu.download(&kv.positions)?)?;
            let victim_row = AttnRow {
                evict: 1,
                first_recent: bound,
                slot_pos: dev_addr(gpu, &positions_copy),
                ..base_row.with_signal(Some(signal), score_addr, slots)
            };
            let victim_row = gpu.upload(&[victim_row])?;
            // The step again from zero scores, the victims chosen in the combination pass (over
            // ranges of a head's slots, or whole heads), in the one pass and in a kernel of
            // their own, each on fresh positions.
            let passes = [
                (DecodePass::Ranges { fold_victims: true }, "in the combination pass"),
                (DecodePass::WholeHeads, "in the combination pass, whole heads"),
                (DecodePass::OnePass, "in one pass"),
                (DecodePass::Ranges { fold_victims: false }, "a kernel of its own"),
            ];
            for (pass, where_chosen) in passes {
                gpu.upload_into(&vec![0.0f32; n_kv_heads * slots], &mut score_dev)?;
                gpu.upload_into(&gpu.download(&kv.positions)?, &mut positions_copy)?;
                gpu.attention_rows_as(&victim_row.slice(0..1), 1, shape_a, &mut scratch, pass)?;
                let gpu_victims = gpu.download(&victims_dev)?;
                let freed = gpu.download(&positions_copy)?;
                let differ = cpu_victims.iter().zip(&gpu_victims).filter(|(a, b)| a != b).count()
                    + first_recent.iter().filter(|&&f| f != bound).count()
                    + gpu_victims
                        .iter()
                        .enumerate()
                        .filter(|&(g, &v)| v != FREE_SLOT && freed[g * slots + v as usize] != FREE_SLOT)
                        .count();
                checks.push(row(
                    &format!("eviction picks the same victim ({where_chosen})"),
                    differ as f64,
                    0.0,
                    "KV heads whose decode-step victim differs between the CPU policy and the GPU (+1 per victim \
                     not freed)",
                ));
            }
            // (Each call frees one more slot: 100 of the slots by the end.)
            let micros = time_us(gpu, 100, || attend(&victim_row, &mut scratch))?;
            timings.push(Timing {
                op: format!("attention + keyformer score + victim, {slots} slots"),
                microseconds: micros,
                read_gb_s: None,
            });

            // What eviction would keep at half the slots: the same tokens on both.
            let keep = slots / 2;
            let mut differ = 0usize;
            for (g, w) in want.iter().enumerate() {
                let kept = |s: &[f32]| {
                    let mut idx: Vec<usize> = (0..s.len()).collect();
                    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                    let mut top = idx[..keep].to_vec();
                    top.sort_unstable();
                    top
                };
                let (a, b) = (kept(w), kept(&got[g * slots..g * slots + w.len()]));
                differ += a.iter().filter(|s| b.binary_search(s).is_err()).count();
            }
            checks.push(row(
                "keyformer keeps the same tokens",
                differ as f64,
                0.0,
                "slots kept at a 50% budget that differ between CPU and GPU",
            ));
        }
    }

    // The same step over heads packed one after another with slots of their own (a cache
    // compacted to per-head budgets): head g examines only its first widths[g] slots, which start
    // at no multiple of anything (three unused slots between heads); against the CPU over the
    // same heads with their other slots evicted.
    {
        let widths: Vec<usize> = (0..n_kv_heads).map(|g| slots - (37 * g) % (slots / 2).max(1)).collect();
        for (head, &w) in heads.iter_mut().zip(&widths) {
            let held: Vec<usize> = head.table.occupied().map(|(s, _)| s).filter(|&s| s >= w).collect();
            for s in held {
                head.table.evict(s).map_err(|e| GpuError::Shape(e.to_string()))?;
            }
        }
        let mut want_out = vec![0f32; n_heads * hd];
        let want = cpu::attention(&q, &[position], &heads, n_heads, hd, layer, &signals[..1], &mut want_out);
        let want = want[0].as_ref().expect("scored signal");
        let mut ranges = Vec::new();
        let mut total = 0;
        for &w in &widths {
            ranges.push((total, w));
            total += w + 3;
        }
        let packed = device_kv_in(gpu, &heads, &ranges, total, hd, 0)?;
        let head_slots: Vec<i32> = ranges.iter().flat_map(|&(f, n)| [f as i32, n as i32]).collect();
        let head_slots = gpu.upload(&head_slots)?;
        let packed_scores = gpu.zeros::<f32>(total)?;
        let packed_row = AttnRow {
            keys: dev_addr(gpu, &packed.keys),
            values: dev_addr(gpu, &packed.values),
            slot_pos: dev_addr(gpu, &packed.positions),
            heads: dev_addr(gpu, &head_slots),
            ..base_row
        }
        .with_signal(Some(keyformer), dev_addr(gpu, &packed_scores), 0);
        let packed_row = gpu.upload(&[packed_row])?;
        attend(&packed_row, &mut scratch)?;
        let (got_out, got) = (gpu.download(&out_dev)?, gpu.download(&packed_scores)?);
        let scale = max_abs(&want_out);
        let mut err = worst(&got_out, &want_out, |_| scale);
        for (g, (w, &(first, n))) in want.iter().zip(&ranges).enumerate() {
            let n = n.min(w.len());
            err = err.max(worst(&got[first..first + n], &w[..n], |_| max_abs(w)));
            // Nothing outside a head's slots is scored.
            let end = ranges.get(g + 1).map_or(total, |r| r.0);
            err = err.max(max_abs(&got[first + n..end]) as f64);
        }
        checks.push(row(
            "attention over packed heads of their own widths (keyformer scores)",
            err,
            1e-4,
            "output and scores against the CPU's, relative to the largest of each",
        ));
    }

    // Attention's speed without a score, with H2O's and with Keyformer's (the scoring cost).
    for (label, signal) in [
        ("attention (no score)", None),
        ("attention + h2o score", Some(ScoreSignal::Attention)),
        ("attention + keyformer score", Some(keyformer)),
    ] {
        let timed_row = row_for(signal)?;
        let micros = time_us(gpu, 100, || attend(&timed_row, &mut scratch))?;
        let kv_bytes = 2 * n_kv_heads * slots * hd * 2;
        timings.push(Timing {
            op: format!("{label}, {slots} slots"),
            microseconds: micros,
            read_gb_s: Some(kv_bytes as f64 / micros / 1e3),
        });
    }

    prefill_checks(gpu, shape, slots, &mut rng, &mut checks, &mut timings)?;

    let read_bandwidth_gb_s = gpu.read_bandwidth_gb_s(1 << 30)?;
    Ok(CheckReport { gpu: gpu.info.clone(), shape, slots, checks, timings, read_bandwidth_gb_s })
}

/// The CPU heads' slots as the GPU stores them.
fn device_kv(gpu: &Gpu, heads: &[HeadKv], capacity: usize, hd: usize) -> Result<DeviceKv, GpuError> {
    let ranges: Vec<(usize, usize)> = (0..heads.len()).map(|g| (g * capacity, capacity)).collect();
    device_kv_in(gpu, heads, &ranges, heads.len() * capacity, hd, capacity)
}

/// The CPU heads' first slots in a storage of `total` slots: head g's first `ranges[g].1` slots
/// from slot `ranges[g].0` on (`capacity`: what the result says each head has).
fn device_kv_in(
    gpu: &Gpu,
    heads: &[HeadKv],
    ranges: &[(usize, usize)],
    total: usize,
    hd: usize,
    capacity: usize,
) -> Result<DeviceKv, GpuError> {
    let mut keys = vec![0u16; total * hd];
    let mut values = keys.clone();
    let mut positions = vec![FREE_SLOT; total];
    for (head, &(first, n)) in heads.iter().zip(ranges) {
        for (s, p) in head.table.positions().iter().enumerate().take(n) {
            let at = (first + s) * hd;
            for (dst, v) in keys[at..at + hd].iter_mut().zip(head.key(s)) {
                *dst = half::f16::from_f32(v).to_bits();
            }
            for (dst, v) in values[at..at + hd].iter_mut().zip(head.value(s)) {
                *dst = half::f16::from_f32(v).to_bits();
            }
            positions[first + s] = p.unwrap_or(FREE_SLOT);
        }
    }
    Ok(DeviceKv {
        keys: gpu.upload(&keys)?,
        values: gpu.upload(&values)?,
        positions: gpu.upload(&positions)?,
        capacity,
    })
}

/// Mean microseconds of `f` over `reps` calls (after two warm-ups), the GPU drained each side.
/// Every type the GPU keeps quantised, as a `wr` x `wc` weight of random blocks (every bit
/// pattern), against the CPU: the activations' Q8 blocks (bit for bit), the GEMV of 1 and 4
/// rows against the CPU's integer row dots, 12 rows (groups of 8), 40 rows (f16 tiles through cuBLAS) and the
/// dequantiser and embedding lookup against the CPU's dequantiser; and the GEMV's speed.
fn quantised_checks(
    gpu: &Gpu,
    wr: usize,
    wc: usize,
    rng: &mut Lcg,
    checks: &mut Vec<CheckRow>,
    timings: &mut Vec<Timing>,
) -> Result<(), GpuError> {
    use crate::quant::dequantize_row;
    use crate::quant::dot::{dot_q8_scalar, quantize_q8_scalar, Q8Block};

    // The activations' Q8 blocks: exactly the CPU's (the same rounding, the same division).
    let max_n = 40;
    let xs = rng.vec(max_n * wc, 1.0);
    let x_dev = gpu.upload(&xs)?;
    let mut xq = gpu.zeros::<u8>(max_n * wc / 32 * super::Q8_BLOCK_BYTES)?;
    gpu.quantize_q8(&x_dev, max_n * wc, &mut xq)?;
    let got = gpu.download(&xq)?;
    let mut blocks: Vec<Q8Block> = Vec::new();
    quantize_q8_scalar(&xs, &mut blocks);
    let differ = blocks
        .iter()
        .zip(got.chunks_exact(super::Q8_BLOCK_BYTES))
        .filter(|(b, g)| {
            let f = |i: usize| f32::from_le_bytes([g[i], g[i + 1], g[i + 2], g[i + 3]]);
            f(0).to_bits() != b.d.to_bits()
                || f(4).to_bits() != b.sum.to_bits()
                || b.qs.iter().zip(&g[8..40]).any(|(q, v)| *q as u8 != *v)
        })
        .count();
    checks.push(row(
        &format!("quantize_q8 {max_n}x{wc}"),
        differ as f64,
        0.0,
        "blocks that differ from quant::dot::quantize_q8_scalar",
    ));

    for (k, t) in super::QUANTISED_ON_GPU.into_iter().enumerate() {
        if wc % t.block_size() != 0 {
            continue;
        }
        let name = t.name();
        let rb = t.row_bytes(wc);
        // The host's f64 references are the cost here: the checks take the first 1024 rows,
        // the timing below the whole weight.
        let (full_rows, wr) = (wr, wr.min(1024));
        let bytes = crate::models::random::quantised_blocks(t, wr, wc, 7, k as u32, 0.05);
        let w_dev = gpu.upload(&bytes)?;
        let mut w32 = vec![0f32; wr * wc];
        for (r, out) in w32.chunks_exact_mut(wc).enumerate() {
            dequantize_row(t, &bytes[r * rb..(r + 1) * rb], out);
        }
        // Each output's sum |w x| in f64, what its errors scale with.
        let magnitude = |n: usize| -> Vec<f64> {
            (0..n * wr)
                .map(|i| {
                    let (tk, r) = (i / wr, i % wr);
                    let (wrow, x) = (&w32[r * wc..(r + 1) * wc], &xs[tk * wc..(tk + 1) * wc]);
                    wrow.iter().zip(x).map(|(a, b)| (a * b).abs() as f64).sum::<f64>() + 1e-12
                })
                .collect()
        };
        let mut y_dev = gpu.zeros::<f32>(max_n * wr)?;
        let mut buffers = super::QuantBuffers::default();
        for n in [1usize, 4, 12, 40] {
            gpu.matmul_quantised(t, &w_dev, wr, wc, &x_dev, n, &mut buffers, false, None, &mut y_dev)?;
            let got = gpu.download(&y_dev)?;
            let mag = magnitude(n);
            // f32 activations and dequantised weights, in f64: the exact product.
            let exact: Vec<f32> = (0..n * wr)
                .map(|i| {
                    let (tk, r) = (i / wr, i % wr);
                    let (wrow, x) = (&w32[r * wc..(r + 1) * wc], &xs[tk * wc..(tk + 1) * wc]);
                    wrow.iter().zip(x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32
                })
                .collect();
            if n <= super::QUANT_GEMV_GROUPED_ROWS {
                // The CPU's integer products: the same integer sums, combined in another order.
                let want: Vec<f32> = (0..n * wr)
                    .map(|i| {
                        let (tk, r) = (i / wr, i % wr);
                        let a = &blocks[tk * wc / 32..(tk + 1) * wc / 32];
                        dot_q8_scalar(t, &bytes[r * rb..(r + 1) * rb], a)
                    })
                    .collect();
                checks.push(row(
                    &format!("gemv {name} {wr}x{wc}, {n} rows"),
                    worst(&got[..n * wr], &want, |i| mag[i]),
                    1e-5,
                    "against the CPU's Q8 row dots, relative to sum |w x|",
                ));
                // Rounding the activations to 8 bits moves each by at most half a step
                // (max |x| / 254 of its block): at most ~1/127 of sum |w x| for these inputs.
                checks.push(row(
                    &format!("gemv {name} {wr}x{wc}, {n} rows, against f32 activations"),
                    worst(&got[..n * wr], &exact, |i| mag[i]),
                    2.0 / 127.0,
                    "the activations' 8-bit rounding, relative to sum |w x|",
                ));
            } else {
                // f16 activations and f16 weights (each within 2^-11), f32 sums.
                checks.push(row(
                    &format!("matmul {name} {wr}x{wc}, {n} rows (f16 tiles, cuBLAS)"),
                    worst(&got[..n * wr], &exact, |i| mag[i]),
                    2.0 / 1024.0,
                    "against dequantised weights x f32 activations, relative to sum |w x|",
                ));
                // Given the activations' f16 copy (as a norm writes it), the same product.
                let copy: Vec<u16> = xs[..n * wc].iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
                let copy = gpu.upload(&copy)?;
                let mut fresh = super::QuantBuffers::default();
                gpu.matmul_quantised(t, &w_dev, wr, wc, &x_dev, n, &mut fresh, false, Some(&copy), &mut y_dev)?;
                let differ = differing_outputs(gpu, std::slice::from_ref(&y_dev), &got[..n * wr])?;
                checks.push(row(
                    &format!("matmul {name} {wr}x{wc}, {n} rows, reading an f16 copy of the activations"),
                    differ as f64,
                    0.0,
                    "outputs that differ from converting the activations itself",
                ));
            }
        }
        // Three weights of one type in one launch: each output bit-identical to its own launch's.
        let mut xq1 = gpu.zeros::<u8>(wc / 32 * super::Q8_BLOCK_BYTES)?;
        gpu.quantize_q8(&x_dev, wc, &mut xq1)?;
        gpu.gemv_quantised(t, &w_dev, wr, wc, &xq1, 1, &mut y_dev)?;
        let alone = gpu.download(&y_dev)?;
        let heights = [wr, 301.min(wr), 64.min(wr)]; // an odd one: the pair GEMV's last warp has one row
        let parts: Vec<CudaSlice<u8>> =
            heights.iter().map(|&h| gpu.upload(&bytes[..h * rb])).collect::<Result<_, _>>()?;
        let mut outs: Vec<CudaSlice<f32>> = heights.iter().map(|&h| gpu.zeros::<f32>(h)).collect::<Result<_, _>>()?;
        let ws: Vec<(&CudaSlice<u8>, usize)> = parts.iter().zip(heights).collect();
        gpu.gemv_quantised_many(t, &ws, wc, &xq1, 1, &mut outs.iter_mut().collect::<Vec<_>>())?;
        let differ = differing_outputs(gpu, &outs, &alone)?;
        checks.push(row(
            &format!("gemv {name}, weights of {heights:?} rows in one launch"),
            differ as f64,
            0.0,
            "outputs that differ from each weight's own launch",
        ));

        // The dequantiser (rows 5..9) and the embedding lookup (4 rows) against the CPU's.
        let (row0, n_rows) = (5usize, 4usize);
        let mut tile = gpu.zeros::<u16>(n_rows * wc)?;
        gpu.dequantise_f16(t, &w_dev, wr, wc, row0, n_rows, &mut tile)?;
        let got: Vec<f32> = gpu.download(&tile)?.iter().map(|h| half::f16::from_bits(*h).to_f32()).collect();
        let want = &w32[row0 * wc..(row0 + n_rows) * wc];
        let scale = max_abs(want);
        checks.push(row(
            &format!("dequantise {name} to f16"),
            worst(&got, want, |_| scale),
            1.0 / 1024.0,
            "against quant::dequantize_row, relative to the largest value",
        ));
        let tokens = [3u32, 0, (wr - 1) as u32, 3];
        let mut out = gpu.zeros::<f32>(tokens.len() * wc)?;
        gpu.embed_quantised(t, &w_dev, wr, wc, &gpu.upload(&tokens)?, tokens.len(), &mut out)?;
        let got = gpu.download(&out)?;
        let want: Vec<f32> =
            tokens.iter().flat_map(|&r| w32[r as usize * wc..(r as usize + 1) * wc].to_vec()).collect();
        checks.push(row(
            &format!("embedding rows {name}"),
            worst(&got, &want, |_| scale),
            1e-6,
            "against quant::dequantize_row, relative to the largest value",
        ));
        // Decode-time speed: one activation row, the whole weight read once.
        let wr = full_rows;
        let bytes = crate::models::random::quantised_blocks(t, wr, wc, 7, k as u32, 0.05);
        let w_dev = gpu.upload(&bytes)?;
        let mut y_dev = gpu.zeros::<f32>(wr)?;
        let micros = time_us(gpu, 50, || {
            gpu.matmul_quantised(t, &w_dev, wr, wc, &x_dev, 1, &mut buffers, false, None, &mut y_dev)
        })?;
        timings.push(Timing {
            op: format!("gemv {name} {wr}x{wc}, 1 row ({:.2} bytes/value)", bytes.len() as f64 / (wr * wc) as f64),
            microseconds: micros,
            read_gb_s: Some(bytes.len() as f64 / micros / 1e3),
        });
    }
    Ok(())
}

/// Values of the outputs of a GEMV of several weights in one launch that are not bit-identical
/// to the first rows of `alone` (the tallest weight's own launch; the others are its first rows).
/// The row for an op's f16 copy of its output `got`: every value must be `got` rounded to
/// nearest f16 (what the products through cuBLAS then read in place of a conversion).
fn f16_copy_row(gpu: &Gpu, op: &str, got: &[f32], copy: &CudaSlice<u16>) -> Result<CheckRow, GpuError> {
    let copy = gpu.download(copy)?;
    let differ = got.iter().zip(&copy).filter(|(v, c)| half::f16::from_f32(**v).to_bits() != **c).count();
    Ok(row(&format!("{op}: its f16 copy"), differ as f64, 0.0, "values that differ from the output rounded to f16"))
}

fn differing_outputs(gpu: &Gpu, outs: &[CudaSlice<f32>], alone: &[f32]) -> Result<usize, GpuError> {
    let mut differ = 0;
    for out in outs {
        differ += gpu.download(out)?.iter().zip(alone).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    }
    Ok(differ)
}

fn time_us(gpu: &Gpu, reps: usize, mut f: impl FnMut() -> Result<(), GpuError>) -> Result<f64, GpuError> {
    f()?;
    f()?;
    gpu.synchronize()?;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        f()?;
    }
    gpu.synchronize()?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / reps as f64)
}

/// The prompt's attention (a chunk of rows over the slots before and of it) by flash.cu and by
/// the cuBLAS blocks, against the CPU's `attention_into`: the output and each score signal's
/// per-slot sums (KVzip's maxima), under plain causal masking, a soft-cap with a sliding
/// window, and ALiBi; slots with holes (evicted tokens). Then both timed on a long chunk.
fn prefill_checks(
    gpu: &Gpu,
    shape: CheckShape,
    slots: usize,
    rng: &mut Lcg,
    checks: &mut Vec<CheckRow>,
    timings: &mut Vec<Timing>,
) -> Result<(), GpuError> {
    use crate::backend::AttentionSpec;
    let CheckShape { n_heads, n_kv_heads, head_dim: hd, .. } = shape;
    let flash = gpu.flash_handles(hd);
    // 200 rows (not a multiple of the flash tiles) after `prior` earlier prompt positions.
    let n = 200.min(slots / 2);
    let prior = slots.min(1200) - n;
    let width = prior + n;
    let mut heads: Vec<HeadKv> = (0..n_kv_heads).map(|_| HeadKv::new(width, hd, KvType::F16)).collect();
    for head in heads.iter_mut() {
        for p in 0..width as u32 {
            head.insert(p, &rng.vec(hd, 1.0), &rng.vec(hd, 1.0)).map_err(|e| GpuError::Shape(e.to_string()))?;
        }
        for s in (5..prior).step_by(37) {
            head.table.evict(s).map_err(|e| GpuError::Shape(e.to_string()))?;
        }
    }
    let positions: Vec<u32> = (prior as u32..width as u32).collect();
    let q = rng.vec(n * n_heads * hd, 3.0);
    let q16: Vec<u16> = q.iter().map(|v| half::f16::from_f32(*v).to_bits()).collect();
    let q16_dev = gpu.upload(&q16)?;
    let (tau, seed, layer) = (1.3f32, 7u64, 3usize);
    let (first, end, from_position, sinks) = (10u32, prior as u32 / 2 + 3, prior as u32 + 50, 4u32);
    let signals: [(&str, Signal, Option<ScoreSignal>); 4] = [
        ("no score", Signal::None, None),
        ("h2o", Signal::Attention { from_position: 0 }, Some(ScoreSignal::Attention)),
        (
            "keyformer",
            Signal::Noisy { from_position: 0, tau, noise: NoiseKind::Gumbel, seed },
            Some(ScoreSignal::Keyformer { tau, seed }),
        ),
        (
            "kvzip",
            Signal::Reconstruction { from_position, first, end, sinks, noise: None },
            Some(ScoreSignal::Reconstruction { from_position, first, end, sinks }),
        ),
    ];
    let causal = AttentionSpec::causal(n_heads, n_kv_heads, hd);
    let specs = [
        ("causal", causal),
        ("soft-cap 20, window 300", AttentionSpec { softcap: Some(20.0), window: Some(300), ..causal }),
        ("alibi 8", AttentionSpec { alibi: Some(8.0), ..causal }),
    ];
    let kv = device_kv(gpu, &heads, width, hd)?;
    for (spec_name, spec) in specs {
        let cpu_signals: Vec<Signal> = signals.iter().map(|s| s.1).collect();
        let mut want_out = vec![0f32; n * n_heads * hd];
        let mut rows: Vec<Vec<Vec<f32>>> = signals.iter().map(|_| vec![Vec::new(); n_kv_heads]).collect();
        let mut dest: Vec<&mut [Vec<f32>]> = rows.iter_mut().map(|r| r.as_mut_slice()).collect();
        cpu::attention_into(&q, &positions, &heads, &spec, layer, &cpu_signals, &mut want_out, &mut dest);
        let attn_shape = AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim: hd,
            max_width: width,
            layer,
            scale: spec.scale,
            softcap: spec.softcap.unwrap_or(0.0),
            window: spec.window.unwrap_or(0),
            alibi_max: spec.alibi.unwrap_or(0.0),
            first_head: 0,
        };
        use super::FlashKernel::{General, Lean, Wide};
        // (The lean compilations run only where the signal allows: Keyformer's and KVzip's rows
        // take the general one whatever is asked.)
        let mut paths: Vec<(&str, Option<super::FlashKernel>)> = Vec::new();
        if flash {
            paths.extend([("flash", Some(General)), ("flash, lean", Some(Lean))]);
            if gpu.flash_wide {
                paths.push(("flash, 128 rows", Some(Wide)));
            }
        }
        paths.push(("cuBLAS blocks", None));
        for &(path, flash_kernel) in &paths {
            for (i, (signal_name, _, signal)) in signals.iter().enumerate() {
                let mut layer_kv = super::kv::LayerKv::new(gpu, n_kv_heads, hd, width, signal.is_some())?;
                layer_kv.keys = gpu.upload(&gpu.download(&kv.keys)?)?;
                layer_kv.values = gpu.upload(&gpu.download(&kv.values)?)?;
                layer_kv.positions = gpu.upload(&gpu.download(&kv.positions)?)?;
                let mut out = gpu.zeros::<f32>(n * n_heads * hd)?;
                let q16 = q16_dev.slice(..);
                let chunk = PromptChunk {
                    q16: &q16,
                    shape: attn_shape,
                    rows: n,
                    width,
                    first_qpos: prior as u32,
                    signal: *signal,
                };
                let out16 = chunk.attend(gpu, flash_kernel, &mut layer_kv, &mut out)?;
                // The queries and the probabilities go to f16 (2^-11 each) on both GPU paths:
                // the outputs move by about 1e-3 of the values' scale (1).
                let got = gpu.download(&out)?;
                if let Some(copy) = out16 {
                    let op = format!("prefill attention ({path}), {spec_name}, {signal_name}");
                    checks.push(f16_copy_row(gpu, &op, &got, &copy)?);
                }
                checks.push(row(
                    &format!("prefill attention ({path}), {spec_name}, {signal_name}: output"),
                    worst(&got, &want_out, |_| 1.0),
                    5e-3,
                    "absolute (values in [-1, 1]), against the CPU's f32 attention",
                ));
                if let Some(scores) = layer_kv.scores.as_ref() {
                    let got = gpu.download(scores)?;
                    let mut want = vec![0f32; n_kv_heads * width];
                    for (g, r) in rows[i].iter().enumerate() {
                        want[g * width..g * width + r.len()].copy_from_slice(r);
                    }
                    // Each probability within ~1e-3 of itself (the f16 queries move the logits by
                    // about 1e-3): relative to the largest score.
                    let scale = max_abs(&want);
                    checks.push(row(
                        &format!("prefill attention ({path}), {spec_name}, {signal_name}: scores"),
                        worst(&got, &want, |_| scale),
                        5e-3,
                        "against the CPU's sums (kvzip: maxima), relative to the largest",
                    ));
                }
            }
        }
    }

    // A 1024-row chunk over `slots` (the last quarter of a 4096-token prompt at 4096 slots):
    // the flash kernels against the cuBLAS blocks of 256 rows the backend used before.
    let (rows_t, width_t) = (1024.min(slots), slots);
    let q_t = gpu.upload(&vec![half::f16::from_f32(0.1).to_bits(); rows_t * n_heads * hd])?;
    let mut layer_kv = super::kv::LayerKv::new(gpu, n_kv_heads, hd, width_t, true)?;
    let pos: Vec<u32> = (0..n_kv_heads).flat_map(|_| 0..width_t as u32).collect();
    layer_kv.positions = gpu.upload(&pos)?;
    let mut out = gpu.zeros::<f32>(rows_t * n_heads * hd)?;
    let shape_t = AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim: hd,
        max_width: width_t,
        layer: 0,
        scale: 1.0 / (hd as f32).sqrt(),
        softcap: 0.0,
        window: 0,
        alibi_max: 0.0,
        first_head: 0,
    };
    let first_t = (width_t - rows_t) as u32;
    let block = 256.min(rows_t);
    let (mut s_buf, mut p_buf) =
        (gpu.zeros::<f32>(n_heads * block * width_t)?, gpu.zeros::<u16>(n_heads * block * width_t)?);
    let mut stats = gpu.zeros::<f32>(4 * n_heads * rows_t)?;
    for (label, signal) in [("no score", None), ("keyformer score", Some(ScoreSignal::Keyformer { tau: 1.0, seed: 1 }))]
    {
        if flash {
            let micros = time_us(gpu, 10, || {
                gpu.flash_prefill_attention(
                    &q_t.slice(..),
                    &mut layer_kv,
                    &mut out.slice_mut(..),
                    None,
                    shape_t,
                    rows_t,
                    width_t,
                    width_t,
                    first_t,
                    signal,
                    &mut stats,
                )
            })?;
            timings.push(Timing {
                op: format!("prefill attention (flash), {label}, {rows_t} rows over {width_t} slots"),
                microseconds: micros,
                read_gb_s: None,
            });
        }
        let micros = time_us(gpu, 10, || {
            for r0 in (0..rows_t).step_by(block) {
                let (q_dim, rows) = (n_heads * hd, block.min(rows_t - r0));
                gpu.prefill_attention(
                    &q_t.slice(r0 * q_dim..(r0 + rows) * q_dim),
                    &mut layer_kv,
                    &mut out.slice_mut(r0 * q_dim..(r0 + rows) * q_dim),
                    shape_t,
                    rows,
                    first_t as usize + r0 + rows,
                    width_t,
                    first_t + r0 as u32,
                    signal,
                    &mut s_buf,
                    &mut p_buf,
                )?;
            }
            Ok(())
        })?;
        timings.push(Timing {
            op: format!("prefill attention (cuBLAS blocks of {block}), {label}, {rows_t} rows over {width_t} slots"),
            microseconds: micros,
            read_gb_s: None,
        });
    }
    Ok(())
}

/// A prompt chunk for the checks: `rows` queries from position `first_qpos` over slots
/// 0..width of a storage of `width` slots.
struct PromptChunk<'a> {
    q16: &'a cudarc::driver::CudaView<'a, u16>,
    shape: AttentionShape,
    rows: usize,
    width: usize,
    first_qpos: u32,
    signal: Option<ScoreSignal>,
}

impl PromptChunk<'_> {
    /// Its attention by flash.cu (the `flash` compilation; the output's f16 copy returned) or,
    /// without one, by the cuBLAS blocks, each with scratch of its own.
    fn attend(
        &self,
        gpu: &Gpu,
        flash: Option<super::FlashKernel>,
        kv: &mut super::kv::LayerKv,
        out: &mut CudaSlice<f32>,
    ) -> Result<Option<CudaSlice<u16>>, GpuError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Self { q16, shape, rows, width, first_qpos, signal } = *self;
        let out = &mut out.slice_mut(..);
        if let Some(kernel) = flash {
            let mut stats = gpu.zeros::<f32>(4 * shape.n_heads * rows)?;
            let mut out16 = gpu.zeros::<u16>(out.len())?;
            let chosen = gpu.flash_kernel.swap(kernel as usize, Relaxed);
            let done = gpu.flash_prefill_attention(
                q16,
                kv,
                out,
                Some(&mut out16.slice_mut(..)),
                shape,
                rows,
                width,
                width,
                first_qpos,
                signal,
                &mut stats,
            );
            gpu.flash_kernel.store(chosen, Relaxed);
            return done.map(|()| Some(out16));
        }
        let cells = shape.n_heads * rows * width;
        let (mut s_buf, mut p_buf) = (gpu.zeros::<f32>(cells)?, gpu.zeros::<u16>(cells)?);
        gpu.prefill_attention(q16, kv, out, shape, rows, width, width, first_qpos, signal, &mut s_buf, &mut p_buf)?;
        Ok(None)
    }
}

//! Tensor parallelism's plan (issue 23): how a decoder splits over `N` devices, and a CPU
//! reference that runs the split on one device, shard after shard, with the all-reduce as a
//! sum, so that the sharding's arithmetic is proven in CI before any GPU runs it.
//!
//! The split is Megatron-LM's: each shard holds a contiguous group of query heads and the KV
//! heads they read (so attention, its cache and the KV policy stay on one shard with no
//! communication: selection is per KV head), the rows of Q, K, V, gate and up that produce its
//! heads and its share of the feed-forward features, and the matching columns of the
//! attention output and down projections, whose partial products are summed over the shards
//! (one all-reduce each per layer); the output projection is split by vocabulary rows and the
//! logits gathered. Norms, biases added after a reduce and the residual stream are replicated.
//! TOVA is the one policy that scores across heads (the last query's attention summed over a
//! layer's heads): its scores need one small all-reduce per layer and step, the sum of each
//! shard's partial (`shard_sum_scores` shows it is the same sum). Keyformer's Gumbel noise is
//! keyed by the layer and the query head: a shard draws it with its heads' GLOBAL indices, so
//! each shard's policy scores (and keeps) what the whole model's does (`reference_scores`).

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};

use crate::backend::cpu::{ops, GgufWeight};
use crate::backend::{AttentionSpec, Cpu};
use crate::models::config::{FfnKind, ModelConfig, NormKind, PositionKind};
use crate::models::decoder::{Model, Norm};
use crate::quant::{dequantize_row, GgmlType};
use crate::ModelError;
use keyformer_kv::noise::NoiseRow;
use keyformer_kv::Signal;

/// How a model's heads, feed-forward features and vocabulary split over `shards` devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPlan {
    pub shards: usize,
    /// Query heads and KV heads per shard.
    pub heads: usize,
    pub kv_heads: usize,
    /// The model's feed-forward features, and the unit their split is a multiple of.
    pub n_ff: usize,
    pub ff_unit: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl ShardPlan {
    /// The plan for `shards` devices, or why the model does not split that way.
    pub fn new(config: &ModelConfig, shards: usize) -> Result<Self, ModelError> {
        let refuse = |what: String| Err(ModelError::Input(format!("tensor parallel over {shards} devices: {what}")));
        if shards == 0 {
            return refuse("at least one device is needed".into());
        }
        let parts = [("attention heads", config.n_heads), ("KV heads", config.n_kv_heads)];
        for (what, count) in parts {
            if count % shards != 0 {
                return refuse(format!("the model's {count} {what} do not divide into {shards} equal parts"));
            }
        }
        // The features split on whole quantisation blocks where they can (256 values: the
        // K-quants' super-block; 32: the others'), so that a quantised down projection's parts
        // keep their blocks and its activations quantise as on one device; shards may then
        // differ by a block.
        let ff_unit = [256, 32, 1]
            .into_iter()
            .find(|&u| config.n_ff.is_multiple_of(u) && config.n_ff / u >= shards)
            .ok_or_else(|| {
                ModelError::Input(format!(
                    "tensor parallel over {shards} devices: the model's {} feed-forward features are fewer",
                    config.n_ff
                ))
            })?;
        Ok(Self {
            shards,
            heads: config.n_heads / shards,
            kv_heads: config.n_kv_heads / shards,
            n_ff: config.n_ff,
            ff_unit,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
        })
    }

    /// Query heads of shard `s` (global indices).
    pub fn query_heads(&self, s: usize) -> Range<usize> {
        s * self.heads..(s + 1) * self.heads
    }

    /// KV heads of shard `s`: exactly those its query heads read.
    pub fn kv_heads_of(&self, s: usize) -> Range<usize> {
        s * self.kv_heads..(s + 1) * self.kv_heads
    }

    /// Rows of Q (and its bias) that shard `s` computes; columns of the attention output.
    pub fn q_rows(&self, s: usize) -> Range<usize> {
        let h = self.query_heads(s);
        h.start * self.head_dim..h.end * self.head_dim
    }

    /// Rows of K and V (and their biases) that shard `s` computes.
    pub fn kv_rows(&self, s: usize) -> Range<usize> {
        let h = self.kv_heads_of(s);
        h.start * self.head_dim..h.end * self.head_dim
    }

    /// Rows of gate and up that shard `s` computes; columns of the down projection: whole
    /// units of `ff_unit` features, as even as those allow (equal parts where they divide).
    pub fn ff_rows(&self, s: usize) -> Range<usize> {
        let units = self.n_ff / self.ff_unit;
        let start = |s: usize| s * units / self.shards * self.ff_unit;
        start(s)..start(s + 1)
    }

    /// Rows of the output projection (vocabulary entries) shard `s` computes: equal parts, the
    /// first `vocab % shards` shards one more.
    pub fn vocab_rows(&self, s: usize) -> Range<usize> {
        let (base, extra) = (self.vocab / self.shards, self.vocab % self.shards);
        let start = s * base + s.min(extra);
        start..start + base + usize::from(s < extra)
    }
}

/// What part of a whole-model tensor a shard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Whole,
    /// These rows (output features) of a matrix, or these values of a vector.
    Rows(Range<usize>),
    /// These columns (input features) of every row of a matrix.
    Cols(Range<usize>),
}

impl Part {
    /// Values of a vector of `len` this part keeps.
    pub fn of_len(&self, len: usize) -> Range<usize> {
        match self {
            Part::Rows(r) => r.clone(),
            Part::Whole | Part::Cols(_) => 0..len,
        }
    }
}

/// The part of each of a layer's split tensors one shard holds (`Part::Whole` on one device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerParts {
    /// Q's rows and bias; K's and V's; the attention output's columns.
    pub q: Part,
    pub kv: Part,
    pub attn_output: Part,
    /// Gate's and up's rows and up's bias; the down projection's columns.
    pub ff: Part,
    pub down: Part,
}

impl LayerParts {
    /// Every tensor whole: the model on one device.
    pub fn whole() -> Self {
        Self { q: Part::Whole, kv: Part::Whole, attn_output: Part::Whole, ff: Part::Whole, down: Part::Whole }
    }
}

impl ShardPlan {
    /// The parts of a layer shard `s` holds. Norms, the biases added after a reduce (attention
    /// output, down) and per-head norms are whole on every shard.
    pub fn layer_parts(&self, s: usize) -> LayerParts {
        LayerParts {
            q: Part::Rows(self.q_rows(s)),
            kv: Part::Rows(self.kv_rows(s)),
            attn_output: Part::Cols(self.q_rows(s)),
            ff: Part::Rows(self.ff_rows(s)),
            down: Part::Cols(self.ff_rows(s)),
        }
    }

    /// The part of the GGUF tensor `name` shard `s` holds (the output projection: its
    /// vocabulary rows; embeddings and norms whole).
    pub fn tensor_part(&self, name: &str, s: usize) -> Part {
        let Some((_, tensor)) = name.strip_prefix("blk.").and_then(|rest| rest.split_once('.')) else {
            return match name {
                "output.weight" | "output.bias" => Part::Rows(self.vocab_rows(s)),
                _ => Part::Whole,
            };
        };
        let parts = self.layer_parts(s);
        match tensor {
            "attn_q.weight" | "attn_q.bias" => parts.q,
            "attn_k.weight" | "attn_k.bias" | "attn_v.weight" | "attn_v.bias" => parts.kv,
            "attn_output.weight" => parts.attn_output,
            "ffn_gate.weight" | "ffn_up.weight" | "ffn_up.bias" => parts.ff,
            "ffn_down.weight" => parts.down,
            _ => Part::Whole,
        }
    }

    /// The configuration shard `s`'s forward pass runs with: its heads, KV heads and
    /// features. The vocabulary stays whole (the embedding is on every shard); the final
    /// soft-cap is applied once the logits are gathered.
    pub fn shard_config(&self, config: &ModelConfig, s: usize) -> ModelConfig {
        let mut c = config.clone();
        c.n_heads = self.heads;
        c.n_kv_heads = self.kv_heads;
        c.n_ff = self.ff_rows(s).len();
        c.final_softcap = None;
        c
    }
}

/// The bytes of `part` of a `rows` x `cols` matrix stored in ggml blocks of type `t`, row
/// after row as the file holds them (`row(r)` gives row r's bytes), still in blocks; `None`
/// where a column part does not start and end on whole blocks (the shard then takes it
/// dequantised).
pub fn part_blocks<'a>(
    t: GgmlType,
    rows: usize,
    cols: usize,
    part: &Part,
    row: impl Fn(usize) -> &'a [u8],
) -> Option<Vec<u8>> {
    let (bs, bb) = (t.block_size(), t.block_bytes());
    let (rows, cols) = match part {
        Part::Whole => (0..rows, 0..cols),
        Part::Rows(r) => (r.clone(), 0..cols),
        Part::Cols(c) => (0..rows, c.clone()),
    };
    if cols.start % bs != 0 || cols.end % bs != 0 {
        return None;
    }
    let (first, last) = (cols.start / bs * bb, cols.end / bs * bb);
    Some(rows.flat_map(|r| &row(r)[first..last]).copied().collect())
}

/// Sums over a group of shards through the host (tensor parallelism's all-reduce where NCCL
/// cannot run, as several shards on one GPU): each round, every shard's partial in, their sum
/// out to every shard. A shard that fails aborts the group, so none waits forever.
pub struct HostGroup {
    shards: usize,
    state: Mutex<HostRound>,
    done: Condvar,
}

#[derive(Default)]
struct HostRound {
    parts: Vec<Option<Vec<f32>>>,
    arrived: usize,
    round: u64,
    sum: Arc<Vec<f32>>,
    aborted: bool,
}

/// Why a [`HostGroup`] sum gave nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroupError {
    #[error("another shard failed")]
    Aborted,
    #[error("shards summed buffers of different sizes ({0} and {1} values)")]
    Sizes(usize, usize),
}

impl HostGroup {
    pub fn new(shards: usize) -> Arc<Self> {
        let state = HostRound { parts: vec![None; shards], ..Default::default() };
        Arc::new(Self { shards, state: Mutex::new(state), done: Condvar::new() })
    }

    /// Shard `rank`'s partial in; once every shard's is in, their sum, added in shard order so
    /// that every shard gets the same values.
    pub fn sum(&self, rank: usize, part: Vec<f32>) -> Result<Vec<f32>, GroupError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.aborted {
            return Err(GroupError::Aborted);
        }
        st.parts[rank] = Some(part);
        st.arrived += 1;
        let round = st.round;
        if st.arrived == self.shards {
            let parts: Vec<Vec<f32>> = st.parts.iter_mut().map(|p| p.take().expect("every shard arrived")).collect();
            let mut total = parts[0].clone();
            for p in &parts[1..] {
                if p.len() != total.len() {
                    st.aborted = true;
                    self.done.notify_all();
                    return Err(GroupError::Sizes(total.len(), p.len()));
                }
                total.iter_mut().zip(p).for_each(|(t, v)| *t += v);
            }
            st.sum = Arc::new(total);
            st.arrived = 0;
            st.round += 1;
            self.done.notify_all();
        } else {
            while st.round == round && !st.aborted {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.aborted {
                return Err(GroupError::Aborted);
            }
        }
        Ok(st.sum.as_ref().clone())
    }

    /// Every shard waiting now or later gets [`GroupError::Aborted`].
    pub fn abort(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).aborted = true;
        self.done.notify_all();
    }
}

/// TOVA's cross-head score on a sharded layer: the sum over the layer's heads of the last
/// query's attention per slot, computed as each shard's partial sum over its own heads, then
/// summed over the shards (the all-reduce). `per_head[h][slot]` are every head's
/// probabilities in global head order.
pub fn shard_sum_scores(plan: &ShardPlan, per_head: &[Vec<f32>]) -> Vec<f32> {
    let slots = per_head.first().map_or(0, Vec::len);
    let mut total = vec![0f32; slots];
    for s in 0..plan.shards {
        let mut partial = vec![0f32; slots];
        for h in plan.query_heads(s) {
            partial.iter_mut().zip(&per_head[h]).for_each(|(p, v)| *p += v);
        }
        total.iter_mut().zip(&partial).for_each(|(t, p)| *t += p);
    }
    total
}

/// A weight dequantised to f32, `[rows][cols]`.
struct Dense {
    values: Vec<f32>,
    cols: usize,
}

impl Dense {
    fn of(model: &Model<Cpu>, w: &GgufWeight) -> Self {
        let view = model.backend.view(w);
        let mut values = vec![0f32; w.rows * w.cols];
        for (r, out) in values.chunks_exact_mut(w.cols).enumerate() {
            dequantize_row(view.ggml_type, view.row(r), out);
        }
        Self { values, cols: w.cols }
    }

    /// `y[t][i] = W[rows.start + i][cols] . x[t]` for the `n` rows of `x` (each `cols.len()`
    /// long): a block of the weight, rows and columns, times the activations.
    fn product(&self, rows: Range<usize>, cols: Range<usize>, x: &[f32], n: usize) -> Vec<f32> {
        let k = cols.len();
        let mut y = vec![0f32; n * rows.len()];
        for t in 0..n {
            let xt = &x[t * k..(t + 1) * k];
            for (i, r) in rows.clone().enumerate() {
                let w = &self.values[r * self.cols + cols.start..r * self.cols + cols.end];
                y[t * rows.len() + i] = w.iter().zip(xt).map(|(a, b)| a * b).sum();
            }
        }
        y
    }
}

fn add_rows(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(a, b)| *a += b);
    }
}

/// `x += y`, or `x += norm(y)` (Gemma's norms after attention and MLP: on the summed output).
fn residual_add(config: &ModelConfig, x: &mut [f32], y: &[f32], post_norm: Option<&Norm<Cpu>>) {
    match post_norm {
        None => x.iter_mut().zip(y).for_each(|(a, b)| *a += b),
        Some(norm) => {
            let mut normed = vec![0f32; y.len()];
            norm_rows(config, y, norm, &mut normed);
            x.iter_mut().zip(&normed).for_each(|(a, b)| *a += b);
        }
    }
}

fn norm_rows(config: &ModelConfig, x: &[f32], norm: &Norm<Cpu>, out: &mut [f32]) {
    let d = norm.weight.len();
    for (row, o) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        match config.norm {
            NormKind::Rms => ops::rms_norm(row, &norm.weight, config.norm_eps, o),
            NormKind::Layer => ops::layer_norm(row, &norm.weight, norm.bias.as_deref(), config.norm_eps, o),
        }
    }
}

/// The last token's logits of `tokens` (a prompt, the full cache, causal attention in f32
/// over the f32 dequantised weights) computed as `plan` shards it: each shard's heads and
/// features one shard after another, partial products summed over the shards where the
/// devices would all-reduce, the output rows of each shard's vocabulary gathered. Every
/// family's pieces: biases (sliced with their rows, or added once after a sum), Q/K norms,
/// sliding windows, soft-caps, ALiBi (each shard's slopes those of its heads' global
/// indices), learned positions, parallel residuals and Gemma's norms after attention and MLP
/// (applied after the sum, never to a partial).
pub fn reference_logits(model: &Model<Cpu>, plan: &ShardPlan, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
    sharded_logits(model, plan, tokens, None, None)
}

/// The scores a prompt gives Keyformer's policy (`signal`, a [`Signal::Noisy`] from position
/// 0), each shard computing its own KV heads' from its own query heads, the noise drawn with
/// the heads' global indices: per (layer, KV head), a row indexed by position, as the whole
/// model's prefill accumulates them.
pub fn reference_scores(
    model: &Model<Cpu>,
    plan: &ShardPlan,
    tokens: &[u32],
    signal: Signal,
) -> Result<Vec<Vec<f32>>, ModelError> {
    shard_scores(model, plan, tokens, signal, NoiseHeads::Global)
}

/// Which head index a shard keys its noise by: the model's (right) or its own (the mistake
/// the tests show is seen).
#[derive(Debug, Clone, Copy, PartialEq)]
enum NoiseHeads {
    Global,
    #[cfg(test)]
    Local,
}

/// Per-(layer, KV head) score rows being accumulated, the signal and how noise is keyed.
struct ScoreSink {
    rows: Vec<Vec<f32>>,
    tau: f32,
    noise: keyformer_kv::NoiseKind,
    seed: u64,
    heads: NoiseHeads,
}

fn shard_scores(
    model: &Model<Cpu>,
    plan: &ShardPlan,
    tokens: &[u32],
    signal: Signal,
    heads: NoiseHeads,
) -> Result<Vec<Vec<f32>>, ModelError> {
    let Signal::Noisy { from_position: 0, tau, noise, seed } = signal else {
        return Err(ModelError::Input(format!("the sharded reference scores Keyformer's prompt, not {signal:?}")));
    };
    let c = &model.config;
    let mut sink =
        ScoreSink { rows: vec![vec![0f32; tokens.len()]; c.n_layers * c.n_kv_heads], tau, noise, seed, heads };
    sharded_logits(model, plan, tokens, None, Some(&mut sink))?;
    Ok(sink.rows)
}

/// [`reference_logits`], leaving out shard `left_out`'s partial products where they are
/// summed (what a missing all-reduce contribution does), for the tests to see it fail; with
/// `scores`, each shard's Keyformer scores added to it.
fn sharded_logits(
    model: &Model<Cpu>,
    plan: &ShardPlan,
    tokens: &[u32],
    left_out: Option<usize>,
    mut scores: Option<&mut ScoreSink>,
) -> Result<Vec<f32>, ModelError> {
    let c = &model.config;
    if *plan != ShardPlan::new(c, plan.shards)? {
        return Err(ModelError::Input("the shard plan was made for another model".into()));
    }
    let (n, d, hd) = (tokens.len(), c.n_embd, c.head_dim);
    if n == 0 || n > c.context_length {
        return Err(ModelError::Input(format!("{n} tokens for a context of {}", c.context_length)));
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(ModelError::TokenOutOfRange { token: *t, vocab: c.vocab_size });
    }
    let positions: Vec<u32> = (0..n as u32).collect();
    let embd = Dense::of(model, &model.token_embd);
    let mut x: Vec<f32> =
        tokens.iter().flat_map(|&t| embd.values[t as usize * d..(t as usize + 1) * d].to_vec()).collect();
    if let Some(s) = c.embedding_scale {
        x.iter_mut().for_each(|v| *v *= s);
    }
    if let Some(table) = &model.pos_embd {
        let table = Dense::of(model, table);
        for (t, row) in x.chunks_exact_mut(d).enumerate() {
            row.iter_mut().zip(&table.values[t * d..(t + 1) * d]).for_each(|(a, b)| *a += b);
        }
    }
    let group = c.n_heads / c.n_kv_heads;
    let mut normed = vec![0f32; n * d];
    for (layer_index, (layer, la)) in model.layers.iter().zip(&c.layers).enumerate() {
        let (wq, wk, wv, wo) = (
            Dense::of(model, &layer.wq),
            Dense::of(model, &layer.wk),
            Dense::of(model, &layer.wv),
            Dense::of(model, &layer.wo),
        );
        let (rope, style) = (&model.ropes[la.rope], c.ropes[la.rope].style);
        norm_rows(c, &x, &layer.attn_norm, &mut normed);
        let attn_normed = normed.clone();
        // The attention block: each shard's heads, its partial output projection summed.
        let mut attn_out = vec![0f32; n * d];
        for s in 0..plan.shards {
            let (qr, kr) = (plan.q_rows(s), plan.kv_rows(s));
            let mut q = wq.product(qr.clone(), 0..d, &normed, n);
            let mut k = wk.product(kr.clone(), 0..d, &normed, n);
            let mut v = wv.product(kr.clone(), 0..d, &normed, n);
            for (act, bias, rows) in
                [(&mut q, &layer.q_bias, &qr), (&mut k, &layer.k_bias, &kr), (&mut v, &layer.v_bias, &kr)]
            {
                if let Some(b) = bias {
                    add_rows(act, &b[rows.clone()]);
                }
                if let Some(limit) = c.clamp_kqv {
                    act.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
                }
            }
            if let Some(w) = &layer.q_norm {
                ops::rms_norm_in_place(&mut q, w, c.norm_eps);
            }
            if let Some(w) = &layer.k_norm {
                ops::rms_norm_in_place(&mut k, w, c.norm_eps);
            }
            // (ALiBi and learned positions have no frequencies: no rotation.)
            ops::rope(&mut q, plan.heads, hd, &positions, &rope.inv_freq, style, rope.mscale);
            ops::rope(&mut k, plan.kv_heads, hd, &positions, &rope.inv_freq, style, rope.mscale);
            let shard = Shard { plan, s, group, layer: layer_index };
            let heads = attend(c, la.window, &shard, &q, &k, &v, n, scores.as_deref_mut());
            let partial = wo.product(0..d, qr.clone(), &heads, n);
            if left_out != Some(s) {
                attn_out.iter_mut().zip(&partial).for_each(|(a, p)| *a += p); // the all-reduce
            }
        }
        if let Some(b) = &layer.o_bias {
            add_rows(&mut attn_out, b);
        }
        // The MLP's input: with a parallel residual the block's input (normed by its own norm,
        // or the attention's normed input); else the residual after attention, normed.
        let ffn_input = if c.parallel_residual {
            match &layer.ffn_norm {
                Some(norm) => {
                    norm_rows(c, &x, norm, &mut normed);
                    normed.clone()
                }
                None => attn_normed,
            }
        } else {
            residual_add(c, &mut x, &attn_out, layer.post_attn_norm.as_ref());
            let norm = layer.ffn_norm.as_ref().expect("a sequential block has its norm");
            norm_rows(c, &x, norm, &mut normed);
            normed.clone()
        };
        let (w_gate, w_up, w_down) = (
            layer.w_gate.as_ref().map(|w| Dense::of(model, w)),
            Dense::of(model, &layer.w_up),
            Dense::of(model, &layer.w_down),
        );
        let mut ffn_out = vec![0f32; n * d];
        for s in 0..plan.shards {
            let fr = plan.ff_rows(s);
            let mut up = w_up.product(fr.clone(), 0..d, &ffn_input, n);
            if let Some(b) = &layer.up_bias {
                add_rows(&mut up, &b[fr.clone()]);
            }
            let hidden = match &w_gate {
                Some(w_gate) => {
                    let mut gate = w_gate.product(fr.clone(), 0..d, &ffn_input, n);
                    match c.ffn {
                        FfnKind::GeGlu => gate.iter_mut().zip(&up).for_each(|(g, u)| *g = ops::gelu_tanh(*g) * u),
                        _ => ops::silu_mul(&mut gate, &up),
                    }
                    gate
                }
                None => {
                    let act = if c.ffn == FfnKind::GeluErf { ops::gelu_erf } else { ops::gelu_tanh };
                    up.iter_mut().for_each(|v| *v = act(*v));
                    up
                }
            };
            let partial = w_down.product(0..d, fr, &hidden, n);
            if left_out != Some(s) {
                ffn_out.iter_mut().zip(&partial).for_each(|(a, p)| *a += p); // the all-reduce
            }
        }
        if let Some(b) = &layer.down_bias {
            add_rows(&mut ffn_out, b);
        }
        if c.parallel_residual {
            x.iter_mut().zip(&attn_out).for_each(|(a, b)| *a += b);
        }
        residual_add(c, &mut x, &ffn_out, layer.post_ffn_norm.as_ref());
    }
    // The last row's logits: each shard's vocabulary rows, gathered in order.
    let last = &x[(n - 1) * d..];
    let mut out_normed = vec![0f32; d];
    norm_rows(c, last, &model.output_norm, &mut out_normed);
    let output = Dense::of(model, model.output.as_ref().unwrap_or(&model.token_embd));
    let mut logits = Vec::with_capacity(c.vocab_size);
    for s in 0..plan.shards {
        logits.extend(output.product(plan.vocab_rows(s), 0..d, &out_normed, 1));
    }
    if let Some(bias) = &model.output_bias {
        logits.iter_mut().zip(bias).for_each(|(l, b)| *l += b);
    }
    if let Some(cap) = c.final_softcap {
        logits.iter_mut().for_each(|l| *l = cap * (*l / cap).tanh());
    }
    Ok(logits)
}

/// Shard `s` of `plan` at `layer` (`group`: query heads per KV head).
struct Shard<'a> {
    plan: &'a ShardPlan,
    s: usize,
    group: usize,
    layer: usize,
}

/// Causal attention of the shard's query heads over its KV heads (rows `[n][heads * hd]`
/// and `[n][kv_heads * hd]`), the output `[n][heads * hd]`; with `scores`, each row's
/// `softmax((logits + g) / tau)` added to its KV head's score row (Keyformer's prompt scores).
#[allow(clippy::too_many_arguments)]
fn attend(
    c: &ModelConfig,
    window: Option<usize>,
    shard: &Shard,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    mut scores: Option<&mut ScoreSink>,
) -> Vec<f32> {
    let (plan, s, group) = (shard.plan, shard.s, shard.group);
    let hd = plan.head_dim;
    let (qw, kw) = (plan.heads * hd, plan.kv_heads * hd);
    let mut out = vec![0f32; n * qw];
    // ALiBi's slopes over the model's heads: a shard's head takes its global index's.
    let alibi = AttentionSpec {
        alibi: match c.positions {
            PositionKind::Alibi { max_bias } => Some(max_bias),
            _ => None,
        },
        ..AttentionSpec::causal(c.n_heads, c.n_kv_heads, hd)
    };
    for (local, global) in plan.query_heads(s).enumerate() {
        let slope = alibi.alibi_slope(global);
        // The head's KV head, as an index within this shard's KV heads.
        let kv = global / group - plan.kv_heads_of(s).start;
        for t in 0..n {
            let qh = &q[t * qw + local * hd..t * qw + (local + 1) * hd];
            let first = window.map_or(0, |w| (t + 1).saturating_sub(w));
            let mut logits: Vec<f32> = (first..=t)
                .map(|j| {
                    let kh = &k[j * kw + kv * hd..j * kw + (kv + 1) * hd];
                    let x = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * c.attention_scale;
                    let x = c.attention_softcap.map_or(x, |cap| cap * (x / cap).tanh());
                    x + slope * (j as f32 - t as f32)
                })
                .collect();
            if let Some(sink) = scores.as_deref_mut() {
                let head = match sink.heads {
                    NoiseHeads::Global => global,
                    #[cfg(test)]
                    NoiseHeads::Local => local,
                };
                let row = NoiseRow::new(sink.noise, sink.seed, shard.layer as u32, head as u32, t as u32);
                let noisy: Vec<f32> =
                    logits.iter().zip(first..=t).map(|(x, j)| (x + row.sample(j as u32)) / sink.tau).collect();
                let max = noisy.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let total: f32 = noisy.iter().map(|x| (x - max).exp()).sum();
                let dest = &mut sink.rows[shard.layer * c.n_kv_heads + global / group];
                for (x, j) in noisy.iter().zip(first..=t) {
                    dest[j] += (x - max).exp() / total;
                }
            }
            let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            logits.iter_mut().for_each(|x| *x = (*x - max).exp());
            let total: f32 = logits.iter().sum();
            let o = &mut out[t * qw + local * hd..t * qw + (local + 1) * hd];
            for (p, j) in logits.iter().zip(first..=t) {
                let vh = &v[j * kw + kv * hd..j * kw + (kv + 1) * hd];
                o.iter_mut().zip(vh).for_each(|(a, b)| *a += p / total * b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::random::{write_gguf, RandomShape};

    #[test]
    fn shards_hold_the_parts_of_each_tensor() {
        let config = RandomShape::by_name("tiny").unwrap().config(); // 4 heads, 2 KV heads of 64, ff 512
        let plan = ShardPlan::new(&config, 2).unwrap();
        assert_eq!(plan.tensor_part("blk.0.attn_q.weight", 1), Part::Rows(128..256));
        assert_eq!(plan.tensor_part("blk.1.attn_q.bias", 0), Part::Rows(0..128));
        assert_eq!(plan.tensor_part("blk.0.attn_k.weight", 1), Part::Rows(64..128));
        assert_eq!(plan.tensor_part("blk.0.attn_v.bias", 1), Part::Rows(64..128));
        assert_eq!(plan.tensor_part("blk.0.attn_output.weight", 1), Part::Cols(128..256));
        assert_eq!(plan.tensor_part("blk.0.ffn_gate.weight", 1), Part::Rows(256..512));
        assert_eq!(plan.tensor_part("blk.0.ffn_up.weight", 0), Part::Rows(0..256));
        assert_eq!(plan.tensor_part("blk.0.ffn_down.weight", 1), Part::Cols(256..512));
        assert_eq!(plan.tensor_part("output.weight", 1), Part::Rows(500..1000));
        for whole in ["token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.0.attn_q_norm.weight"] {
            assert_eq!(plan.tensor_part(whole, 1), Part::Whole, "{whole}");
        }
        // The parts of a tensor over the shards cover it once.
        for name in ["blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.ffn_down.weight", "output.weight"] {
            let mut covered = Vec::new();
            for s in 0..plan.shards {
                match plan.tensor_part(name, s) {
                    Part::Rows(r) | Part::Cols(r) => covered.extend(r),
                    Part::Whole => panic!("{name} is split"),
                }
            }
            let n = covered.len();
            covered.dedup();
            assert_eq!(
                (covered.len(), covered.first(), covered.last().map(|l| l + 1)),
                (n, Some(&0), Some(n)),
                "{name}"
            );
        }
        let shard = plan.shard_config(&config, 1);
        assert_eq!((shard.n_heads, shard.n_kv_heads, shard.n_ff, shard.vocab_size), (2, 1, 256, 1000));
        assert_eq!(Part::Rows(3..5).of_len(9), 3..5);
        assert_eq!(Part::Cols(3..5).of_len(9), 0..9);
    }

    #[test]
    fn a_part_of_quantised_blocks_is_the_part_of_the_values() {
        use crate::models::random::{quantised_blocks, QUANTISED_TYPES};
        let (rows, cols) = (6, 1024);
        for &t in QUANTISED_TYPES.iter() {
            let bytes = quantised_blocks(t, rows, cols, 3, 7, 0.5);
            let row_bytes = t.row_bytes(cols);
            let row = |r: usize| &bytes[r * row_bytes..(r + 1) * row_bytes];
            let values = |b: &[u8], width: usize| {
                let mut out = vec![0f32; width];
                dequantize_row(t, b, &mut out);
                out
            };
            let bs = t.block_size();
            let parts = [Part::Whole, Part::Rows(2..5), Part::Cols(bs..3 * bs), Part::Cols(0..cols / 2)];
            for part in parts {
                let got = part_blocks(t, rows, cols, &part, row).unwrap();
                let (rs, cs) = match &part {
                    Part::Whole => (0..rows, 0..cols),
                    Part::Rows(r) => (r.clone(), 0..cols),
                    Part::Cols(c) => (0..rows, c.clone()),
                };
                assert_eq!(got.len(), rs.len() * t.row_bytes(cs.len()), "{t} {part:?}");
                for (i, r) in rs.enumerate() {
                    let want = values(row(r), cols)[cs.clone()].to_vec();
                    let mine = &got[i * t.row_bytes(cs.len())..(i + 1) * t.row_bytes(cs.len())];
                    assert_eq!(values(mine, cs.len()), want, "{t} {part:?} row {r}");
                }
            }
            // A column part that cuts a block is not taken in blocks.
            assert_eq!(part_blocks(t, rows, cols, &Part::Cols(1..bs + 1), row), None, "{t}");
        }
    }

    #[test]
    fn a_host_group_sums_in_shard_order_every_round() {
        let group = HostGroup::new(3);
        let threads: Vec<_> = (0..3)
            .map(|rank| {
                let group = group.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|round| group.sum(rank, vec![(rank * 100 + round) as f32, 1.0]).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let sums: Vec<Vec<Vec<f32>>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        for round in 0..50 {
            let want = vec![(300 + 3 * round) as f32, 3.0];
            for rank in 0..3 {
                assert_eq!(sums[rank][round], want, "rank {rank}, round {round}");
            }
        }
    }

    #[test]
    fn a_failed_shard_releases_the_others() {
        let group = HostGroup::new(2);
        let waiting = {
            let group = group.clone();
            std::thread::spawn(move || group.sum(0, vec![1.0]))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        group.abort();
        assert_eq!(waiting.join().unwrap(), Err(GroupError::Aborted));
        assert_eq!(group.sum(1, vec![1.0]), Err(GroupError::Aborted));
        // Buffers of different sizes are an error for every shard, not a wrong sum.
        let group = HostGroup::new(2);
        let other = {
            let group = group.clone();
            std::thread::spawn(move || group.sum(0, vec![1.0, 2.0]))
        };
        let mine = group.sum(1, vec![1.0]);
        let theirs = other.join().unwrap();
        assert!(mine.is_err() && theirs.is_err(), "{mine:?} {theirs:?}");
    }

    fn tiny(name: &str) -> Model<Cpu> {
        random_model(RandomShape::by_name(name).unwrap())
    }

    fn random_model(shape: RandomShape) -> Model<Cpu> {
        let name = shape.name;
        // A folder per call: the tests run in parallel threads of one process.
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let nth = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("keyformer-tp-{}-{name}-{nth}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.gguf");
        write_gguf(&path, &shape, 3).unwrap();
        let (_, model) = crate::models::load(&path, crate::gguf::LoadMode::Mmap).unwrap();
        std::fs::remove_dir_all(&dir).ok();
        model
    }

    #[test]
    fn plans_split_heads_evenly_features_on_blocks_and_refuse_what_does_not_divide() {
        let model = tiny("tiny"); // 4 heads, 2 KV heads, 512 features, 1000 tokens
        let p = ShardPlan::new(&model.config, 2).unwrap();
        assert_eq!((p.heads, p.kv_heads, p.ff_unit), (2, 1, 256));
        assert_eq!((p.q_rows(1), p.kv_rows(1), p.ff_rows(1)), (128..256, 64..128, 256..512));
        // Features split on whole K-quant blocks where they can: Llama 2 7B's 11008 (43 blocks
        // of 256) as 21 and 22 blocks; 96 (three blocks of 32) over 2 as 32 and 64.
        let halves = |n_ff: usize, shards: usize| {
            let config = ModelConfig { n_ff, n_heads: 4, n_kv_heads: 4, ..model.config.clone() };
            let p = ShardPlan::new(&config, shards).unwrap();
            (0..shards).map(|s| p.ff_rows(s)).collect::<Vec<_>>()
        };
        assert_eq!(halves(11008, 2), vec![0..5376, 5376..11008]);
        assert_eq!(halves(96, 2), vec![0..32, 32..96]);
        assert_eq!(halves(6, 4), vec![0..1, 1..3, 3..4, 4..6]);
        let p3 = ShardPlan { shards: 3, vocab: 1000, ..p };
        assert_eq!((p3.vocab_rows(0), p3.vocab_rows(1), p3.vocab_rows(2)), (0..334, 334..667, 667..1000));
        for (n, want) in [(0, "at least one"), (4, "2 KV heads"), (3, "4 attention heads")] {
            let err = ShardPlan::new(&model.config, n).unwrap_err().to_string();
            assert!(err.contains(want), "{n}: {err}");
        }
    }

    /// Every query head's KV head lies on its own shard (no attention crosses devices).
    #[test]
    fn each_shard_holds_the_kv_heads_its_query_heads_read() {
        let model = tiny("tiny");
        let c = &model.config;
        let group = c.n_heads / c.n_kv_heads;
        for shards in [1, 2] {
            let p = ShardPlan::new(c, shards).unwrap();
            for s in 0..shards {
                assert!(p.query_heads(s).all(|h| p.kv_heads_of(s).contains(&(h / group))));
            }
        }
    }

    /// `model`'s last logits of a 24-token prompt through its own forward pass (f32 KV cache)
    /// against the sharded reference for every shard count its heads allow (1, 2, 4):
    /// returns the counts checked.
    fn check_against_forward(name: &str, mut model: Model<Cpu>) -> Vec<usize> {
        model.kv_type = crate::kv::KvType::F32;
        let vocab = model.config.vocab_size as u32;
        let tokens: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % vocab).collect();
        let mut cache = model.new_cache(64);
        let want = model.forward(&tokens, &mut cache, crate::models::decoder::Logits::Last).unwrap();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        let one = reference_logits(&model, &ShardPlan::new(&model.config, 1).unwrap(), &tokens).unwrap();
        assert!(worst(&one, &want) < 1e-4, "{name}: one shard against the forward pass {}", worst(&one, &want));
        let mut checked = vec![1];
        for shards in [2, 4] {
            let Ok(plan) = ShardPlan::new(&model.config, shards) else { continue };
            let got = reference_logits(&model, &plan, &tokens).unwrap();
            // Only the order of the partial sums differs from one shard.
            assert!(worst(&got, &one) < 1e-5, "{name}: {shards} shards against one {}", worst(&got, &one));
            assert_eq!(crate::sampling::argmax(&got), crate::sampling::argmax(&want), "{name}, {shards} shards");
            checked.push(shards);
        }
        checked
    }

    /// The sharded arithmetic equals the model's own forward pass for every family's random
    /// shape (Qwen2's biases, Gemma's sandwich norms, soft-caps and windows, GPT-J's parallel
    /// block and partial rotary, MPT's ALiBi, GPT-2's learned positions and LayerNorm).
    #[test]
    fn sharded_reference_equals_the_forward_pass() {
        let mut split = 0;
        for name in ["tiny", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3", "tiny-gptj", "tiny-mpt", "tiny-gpt2"] {
            let checked = check_against_forward(name, tiny(name));
            split += checked.len() - 1;
        }
        assert!(split >= 8, "too few shard counts were possible: {split}");
    }

    /// The same on the tiny models that transformers made for every family (converted by
    /// llama.cpp's converter; tests/golden/families/).
    #[test]
    fn sharded_reference_equals_the_forward_pass_on_every_family_file() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/families");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
            .collect();
        files.sort();
        assert!(files.len() >= 8, "{} family files in {}", files.len(), dir.display());
        for path in files {
            let (_, model) = crate::models::load(&path, crate::gguf::LoadMode::Mmap).unwrap();
            check_against_forward(&path.display().to_string(), model);
        }
    }

    /// Features that split on whole blocks but not evenly (768 = 3 x 256: 256 and 512 on
    /// two shards) give the whole model's logits too.
    #[test]
    fn an_uneven_feature_split_equals_the_forward_pass() {
        let shape = RandomShape { n_ff: 768, ..RandomShape::by_name("tiny").unwrap() };
        let model = random_model(shape);
        let plan = ShardPlan::new(&model.config, 2).unwrap();
        assert_eq!((plan.ff_rows(0), plan.ff_rows(1)), (0..256, 256..768));
        assert!(check_against_forward("tiny, 768 features", model).contains(&2));
    }

    /// The comparison above can fail: leaving out one shard's partial products (a missing
    /// all-reduce contribution) moves the logits far past its tolerance.
    #[test]
    fn a_shard_left_out_of_the_sum_is_seen() {
        let model = tiny("tiny");
        let tokens: Vec<u32> = (0..8u32).collect();
        let plan = ShardPlan::new(&model.config, 2).unwrap();
        let whole = sharded_logits(&model, &plan, &tokens, None, None).unwrap();
        let missing = sharded_logits(&model, &plan, &tokens, Some(1), None).unwrap();
        let scale = whole.iter().fold(0f32, |m, x| m.max(x.abs()));
        let worst = whole.iter().zip(&missing).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
        assert!(worst > 1e-2, "a missing shard moved the logits by only {worst}");
    }

    /// Keyformer per shard: each shard's own policy (over its KV heads only, the same seed),
    /// fed the scores its heads compute with the noise drawn by their global indices, keeps
    /// exactly what the whole model's prefill keeps in every layer and KV head; noise drawn by
    /// the shard's local indices changes the kept tokens (the check can fail).
    #[test]
    fn each_shards_keyformer_policy_keeps_what_the_whole_model_keeps() {
        use keyformer_kv::{Amount, PolicyConfig, PolicyKind, SlotTable};
        let mut model = tiny("tiny"); // 4 heads, 2 KV heads
        model.kv_type = crate::kv::KvType::F32;
        let c = model.config.clone();
        let tokens: Vec<u32> = (0..48u32).map(|i| (i * 37 + 5) % c.vocab_size as u32).collect();
        let n = tokens.len();
        let kv = PolicyConfig {
            kind: PolicyKind::Keyformer,
            budget: Some(Amount::Tokens(16)),
            recent: Some(Amount::Tokens(4)),
            seed: 11,
            ..Default::default()
        };
        let policy = kv.resolve(n, 0, c.n_layers, c.n_kv_heads).unwrap();
        let signal = policy.signal();
        let mut cache = model.new_cache_with(policy, n);
        model.prefill(&tokens, &mut cache, crate::models::decoder::Logits::Last, &mut |_, _| {}).unwrap();
        let whole: Vec<Vec<u32>> = cache.layers.iter().flatten().map(|h| h.table.held_positions()).collect();
        let mut table = SlotTable::new(n);
        for p in 0..n as u32 {
            table.insert(p).unwrap();
        }
        let plan = ShardPlan::new(&c, 2).unwrap();
        let kept_by_shards = |heads: NoiseHeads| -> Vec<Vec<u32>> {
            let rows = shard_scores(&model, &plan, &tokens, signal, heads).unwrap();
            let mut kept = vec![Vec::new(); c.n_layers * c.n_kv_heads];
            for s in 0..plan.shards {
                // The shard's own policy over its own KV heads.
                let mut own = kv.resolve(n, 0, c.n_layers, plan.kv_heads).unwrap();
                for layer in 0..c.n_layers {
                    for (local, global) in plan.kv_heads_of(s).enumerate() {
                        own.observe(layer, local, &rows[layer * c.n_kv_heads + global]);
                        let victims = own.victims(layer, local, &table, own.head_budget(layer, local));
                        kept[layer * c.n_kv_heads + global] =
                            (0..n as u32).filter(|p| !victims.contains(&(*p as usize))).collect();
                    }
                }
            }
            kept
        };
        assert_eq!(kept_by_shards(NoiseHeads::Global), whole, "each shard keeps what the whole model keeps");
        assert_ne!(kept_by_shards(NoiseHeads::Local), whole, "noise keyed by local heads went unseen");
        // The kept tokens are the scores' choice, not just the newest.
        assert!(whole.iter().any(|k| k.first() != Some(&((n - 16) as u32))));
    }

    /// TOVA's cross-head score, summed per shard then over the shards, is the sum over all
    /// heads; one shard's part alone is not.
    #[test]
    fn tova_scores_need_the_sum_over_shards() {
        let model = tiny("tiny");
        let plan = ShardPlan::new(&model.config, 2).unwrap();
        let per_head: Vec<Vec<f32>> =
            (0..4).map(|h| (0..5).map(|s| ((h * 5 + s) % 7) as f32 * 0.1).collect()).collect();
        let direct: Vec<f32> = (0..5).map(|s| per_head.iter().map(|h| h[s]).sum()).collect();
        let sharded = shard_sum_scores(&plan, &per_head);
        assert!(direct.iter().zip(&sharded).all(|(a, b)| (a - b).abs() < 1e-6), "{direct:?} {sharded:?}");
        let first_shard: Vec<f32> = (0..5).map(|s| per_head[plan.query_heads(0)].iter().map(|h| h[s]).sum()).collect();
        assert!(first_shard.iter().zip(&sharded).any(|(a, b)| (a - b).abs() > 1e-3));
    }

    #[test]
    fn bad_prompts_are_refused() {
        let model = tiny("tiny");
        let plan = ShardPlan::new(&model.config, 2).unwrap();
        assert!(reference_logits(&model, &plan, &[]).is_err());
        assert!(reference_logits(&model, &plan, &[1, 5000]).unwrap_err().to_string().contains("5000"));
        let other = ShardPlan { vocab: 7, ..plan };
        assert!(reference_logits(&model, &other, &[1]).unwrap_err().to_string().contains("another model"));
    }
}

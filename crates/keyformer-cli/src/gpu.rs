//! `keyformer gpu-check` and `--device cuda` for `bench`, `run` and `serve`: thin layers over
//! `keyformer::backend::cuda` (builds without the `cuda` feature say so and stop).

#[cfg(not(feature = "cuda"))]
use crate::{BenchArgs, GpuCheckArgs, RunArgs, ServeArgs};
#[cfg(not(feature = "cuda"))]
use anyhow::Result;

#[cfg(not(feature = "cuda"))]
const NO_CUDA: &str =
    "this keyformer was built without the CUDA backend: build it with `cargo build --release --features cuda`";

#[cfg(not(feature = "cuda"))]
pub(crate) fn check(_: GpuCheckArgs) -> Result<()> {
    anyhow::bail!(NO_CUDA)
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn bench(_: BenchArgs) -> Result<()> {
    anyhow::bail!("--device cuda: {NO_CUDA}")
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn run(_: RunArgs) -> Result<()> {
    anyhow::bail!("--device cuda: {NO_CUDA}")
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn serve(_: ServeArgs) -> Result<()> {
    anyhow::bail!("--device cuda: {NO_CUDA}")
}

#[cfg(feature = "cuda")]
pub(crate) use with_cuda::{bench, check, run, serve};

#[cfg(feature = "cuda")]
mod with_cuda {
    use std::io::Write;

    use anyhow::{bail, Context, Result};
    use keyformer::backend::cuda::backend::{Cuda, WeightFormat};
    use keyformer::backend::cuda::bench::{self as gpu_bench, GpuBenchRow};
    use keyformer::backend::cuda::check::{self, CheckRow};
    use keyformer::backend::cuda::tensor_parallel::{ShardSource, ShardedModel, Transport};
    use keyformer::backend::cuda::{model_check, Gpu};
    use keyformer::models::decoder::Model;
    use keyformer::models::random::RandomShape;
    use keyformer::quant::GgmlType;
    use serde_json::json;

    use keyformer::kv::KvType;
    use keyformer::Engine;

    use crate::{bench_policies, BatchSize, BenchArgs, GpuCheckArgs, RunArgs, ServeArgs};

    const GIB: f64 = (1u64 << 30) as f64;

    fn print_checks(rows: &[CheckRow]) {
        println!("| check | max error | tolerance | result | error of |\n|---|---:|---:|---|---|");
        for c in rows {
            let verdict = if c.passed { "pass" } else { "FAIL" };
            println!("| {} | {:.3e} | {:.1e} | {verdict} | {} |", c.op, c.max_error, c.tolerance, c.note);
        }
    }

    pub(crate) fn check(a: GpuCheckArgs) -> Result<()> {
        let mut shapes = Vec::new();
        for name in a.shape.iter().filter(|s| s.as_str() != "none") {
            let shape = check::SHAPES.iter().find(|s| s.name == name.as_str()).with_context(|| {
                let known: Vec<&str> = check::SHAPES.iter().map(|s| s.name).collect();
                format!("unknown shape '{name}' (known: {})", known.join(", "))
            })?;
            shapes.push(*shape);
        }
        let model_shapes = a
            .model_shape
            .iter()
            .filter(|s| s.as_str() != "none")
            .map(|s| RandomShape::by_name(s))
            .collect::<Result<Vec<_>, _>>()?;
        let model_types = a
            .model_type
            .iter()
            .map(|name| keyformer::models::random::weight_type_by_name(name).context("--model-type"))
            .collect::<Result<Vec<_>>>()?;
        if a.slots < 8 {
            bail!("--slots must be at least 8");
        }
        let gpu = Gpu::open(a.device)?;
        let mut reports = Vec::new();
        for shape in shapes {
            reports.push(
                check::run(&gpu, shape, a.slots).with_context(|| format!("checking at the {} shape", shape.name))?,
            );
        }
        let dir = std::env::temp_dir().join(format!("keyformer-gpu-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut model_rows = Vec::new();
        for shape in &model_shapes {
            for &t in &model_types {
                model_rows.extend(
                    model_check::run(shape, t, a.model_prompt, a.model_steps, &dir)
                        .with_context(|| format!("whole-model check at the {} shape in {t}", shape.name))?,
                );
            }
        }
        std::fs::remove_dir_all(&dir).ok();
        for path in &a.model_file {
            model_rows.extend(
                model_check::run_file(path, weight_format(), a.model_prompt, a.model_steps)
                    .with_context(|| format!("whole-model check of {}", path.display()))?,
            );
        }
        for name in a.tp_shape.iter().filter(|s| s.as_str() != "none") {
            let shape = RandomShape::by_name(name)?;
            for &t in &model_types {
                model_rows.extend(
                    keyformer::backend::cuda::tensor_parallel::check(&shape, t, a.model_prompt, a.model_steps)
                        .with_context(|| format!("tensor-parallel check at the {name} shape in {t}"))?,
                );
            }
        }
        let passed = reports.iter().all(|r| r.passed()) && model_rows.iter().all(|r| r.passed);
        if a.json {
            println!("{}", json!({ "ops": reports, "model": model_rows }));
        } else {
            let g = &gpu.info;
            println!(
                "GPU: {} (compute capability {}.{}, {:.1} GiB)",
                g.name,
                g.compute_capability.0,
                g.compute_capability.1,
                g.total_memory_bytes as f64 / GIB
            );
            for r in &reports {
                println!(
                    "\n## {} ({} slots); device read bandwidth {:.0} GB/s\n",
                    r.shape.name, r.slots, r.read_bandwidth_gb_s
                );
                print_checks(&r.checks);
                println!("\n| op | us | GB/s read | of read bandwidth |\n|---|---:|---:|---:|");
                for t in &r.timings {
                    let gbs = t.read_gb_s.map_or(String::new(), |g| format!("{g:.0}"));
                    let frac =
                        t.read_gb_s.map_or(String::new(), |g| format!("{:.0}%", 100.0 * g / r.read_bandwidth_gb_s));
                    println!("| {} | {:.1} | {gbs} | {frac} |", t.op, t.microseconds);
                }
            }
            if !model_rows.is_empty() {
                println!("\n## Whole model, GPU against CPU\n");
                print_checks(&model_rows);
            }
        }
        if !passed {
            bail!("a GPU check failed");
        }
        Ok(())
    }

    /// `--gpu-weights`.
    fn weight_format() -> WeightFormat {
        if crate::NATIVE_GPU_WEIGHTS.get().copied().unwrap_or(true) {
            WeightFormat::Native
        } else {
            WeightFormat::F16
        }
    }

    fn check_kv_type() -> Result<()> {
        if crate::KV_TYPE.get().is_some_and(|t| *t != KvType::F16) {
            bail!("--device cuda keeps keys and values in f16: leave --kv-type at f16");
        }
        Ok(())
    }

    /// The engine of `--model` or `--random-weights` on GPU 0.
    fn load_engine(model: &str, random_weights: Option<&str>) -> Result<Engine<Model<Cuda>>> {
        check_kv_type()?;
        let mut cuda = Cuda::new(Gpu::open(0)?);
        cuda.weight_format = weight_format();
        let engine = match random_weights {
            Some(name) => {
                let shape = RandomShape::by_name(name)?;
                let t = crate::RANDOM_TYPE.get().copied().unwrap_or(GgmlType::F16);
                eprintln!("drawing {name} random {t} weights for the GPU");
                Engine::<Model<Cuda>>::random(cuda, &shape, crate::RANDOM_WEIGHTS_SEED, t)?
            }
            None => {
                // Mapped: the weights go to the GPU, a resident copy would only hold memory.
                let cpu = crate::load_held(model, keyformer::gguf::LoadMode::Mmap)?;
                eprintln!("loading {} onto the GPU", cpu.model.backend.file.path.display());
                Engine::<Model<Cuda>>::from_cpu(cuda, cpu)?
            }
        };
        let m = &engine.model;
        eprintln!("weights on the GPU: {:.2} GiB ({})", m.matrix_bytes() as f64 / GIB, m.matrix_types());
        Ok(engine)
    }

    /// The engine of `--model` or `--random-weights` split over `shards` GPUs (-tp N): the
    /// tokenizer on the host, each shard's weights on its GPU. `KEYFORMER_TP_TRANSPORT=host`
    /// puts every shard on GPU 0 and sums through the host (checks on one GPU).
    fn load_sharded(model: &str, random_weights: Option<&str>, shards: usize) -> Result<Engine<ShardedModel>> {
        check_kv_type()?;
        let transport = match std::env::var("KEYFORMER_TP_TRANSPORT").as_deref() {
            Ok("host") => Transport::HostOnOneGpu,
            _ => Transport::Nccl,
        };
        let (source, file, name, tokenizer) = match random_weights {
            Some(name) => {
                let shape = RandomShape::by_name(name)?;
                let weight_type = crate::RANDOM_TYPE.get().copied().unwrap_or(GgmlType::F16);
                eprintln!("drawing {name} random {weight_type} weights, split over {shards} GPUs");
                let tokenizer = keyformer::tokenizer::Tokenizer::byte_level(shape.vocab_size)?;
                let source = ShardSource::Random { shape, seed: crate::RANDOM_WEIGHTS_SEED, weight_type };
                (source, None, format!("random-{name}"), tokenizer)
            }
            None => {
                let cpu = crate::load_held(model, keyformer::gguf::LoadMode::Mmap)?;
                eprintln!("loading {} onto {shards} GPUs", cpu.model.backend.file.path.display());
                (ShardSource::File(std::sync::Arc::new(cpu.model)), cpu.file, cpu.name, cpu.tokenizer)
            }
        };
        let model = ShardedModel::open(source, shards, transport, weight_format())?;
        eprintln!(
            "weights on the GPUs: {:.2} GiB in all ({} each)",
            model.shards.iter().map(|s| s.matrix_bytes).sum::<usize>() as f64 / GIB,
            model.shards[0].matrix_types
        );
        Ok(Engine { file, name, model, tokenizer })
    }

    pub(crate) fn run(a: RunArgs) -> Result<()> {
        let (model, random) = (&a.engine.model.model, a.engine.random_weights.as_deref());
        if a.engine.tensor_parallel > 1 {
            let mut engine = load_sharded(model, random, a.engine.tensor_parallel)?;
            a.engine.limit_context(&mut engine)?;
            return crate::run_on(&engine, &a);
        }
        let mut engine = load_engine(model, random)?;
        a.engine.limit_context(&mut engine)?;
        crate::run_on(&engine, &a)
    }

    /// `serve --device cuda`: the KV memory by default all the GPUs have free after the weights.
    pub(crate) fn serve(a: ServeArgs) -> Result<()> {
        let (model, random) = (&a.engine.model.model, a.engine.random_weights.as_deref());
        if a.engine.tensor_parallel > 1 {
            let mut engine = load_sharded(model, random, a.engine.tensor_parallel)?;
            a.engine.limit_context(&mut engine)?;
            let (used, total) = engine.model.memory_used()?;
            let kv_memory = crate::parse_memory("--kv-memory", &a.kv_memory, Some(total - used))?;
            return crate::serve_on(engine, a, kv_memory);
        }
        let mut engine = load_engine(model, random)?;
        a.engine.limit_context(&mut engine)?;
        let (used, total) = engine.model.backend.memory_used()?;
        let kv_memory = crate::parse_memory("--kv-memory", &a.kv_memory, Some(total - used))?;
        crate::serve_on(engine, a, kv_memory)
    }

    /// What `bench --device cuda` measures: the model on one GPU, or split over several.
    #[allow(clippy::large_enum_variant)] // one a run
    enum BenchModel {
        One(Engine<Model<Cuda>>),
        Sharded(ShardedModel),
    }

    impl BenchModel {
        fn load(a: &BenchArgs) -> Result<Self> {
            let sharded = a.tensor_parallel > 1 || std::env::var("KEYFORMER_TP_SHARDED").is_ok_and(|v| v == "1");
            if !sharded {
                return Ok(BenchModel::One(load_engine(&a.model.model, a.random_weights.as_deref())?));
            }
            let model = load_sharded(&a.model.model, a.random_weights.as_deref(), a.tensor_parallel)?.model;
            Ok(BenchModel::Sharded(model))
        }
    }

    pub(crate) fn bench(a: BenchArgs) -> Result<()> {
        let policies = bench_policies(&a)?;
        if a.n_prompt.len() != a.n_gen.len() {
            bail!("with --device cuda, -p and -n pair up: give as many prompt sizes as generation lengths");
        }
        let pairs: Vec<(usize, usize)> = a.n_prompt.iter().copied().zip(a.n_gen.iter().copied()).collect();
        if pairs.iter().any(|&(p, n)| p == 0 || n == 0) {
            bail!("with --device cuda every test needs a prompt and a generation (-p and -n at least 1)");
        }
        let bench_model = BenchModel::load(&a)?;
        // The read bandwidth of the model's GPU, or of GPU 0 for a split (each GPU taken to
        // read as fast; the shards' GPUs live on threads of their own).
        let read_gb_s = match &bench_model {
            BenchModel::One(engine) => engine.model.backend.gpu.read_bandwidth_gb_s(1 << 30)?,
            BenchModel::Sharded(_) => Gpu::open(0)?.read_bandwidth_gb_s(1 << 30)?,
        };
        let (gpu_name, shards, free_at_start, config, weights, matrix_bytes, matrix_types) = match &bench_model {
            BenchModel::One(engine) => {
                let model = &engine.model;
                let (used, total) = model.backend.memory_used()?;
                let types = model.matrix_types();
                // Bytes a decode step must read besides the KV: every matrix but the embedding table.
                let weights = model.matrix_bytes() - model.token_embd.bytes();
                (
                    model.backend.gpu.info.name.clone(),
                    1,
                    total - used,
                    model.config.clone(),
                    weights,
                    model.matrix_bytes(),
                    types,
                )
            }
            BenchModel::Sharded(m) => {
                let all = m.shards.iter().map(|s| s.matrix_bytes).sum();
                let name = format!("{} x {}", m.shards.len(), m.shards[0].device);
                (
                    name,
                    m.shards.len(),
                    0,
                    m.config.clone(),
                    m.step_weight_bytes(),
                    all,
                    m.shards[0].matrix_types.clone(),
                )
            }
        };
        let model_name = match &a.random_weights {
            Some(name) => format!("{name} (random weights)"),
            None => a.model.model.clone(),
        };
        let c = &config;
        for &(p, n) in &pairs {
            if p + n > c.context_length {
                bail!("{p} + {n} tokens exceed the model's context of {} tokens", c.context_length);
            }
        }
        let per_token = KvType::F16.token_bytes(c.n_layers, c.n_kv_heads, c.head_dim);
        let mut rows: Vec<(GpuBenchRow, BatchSize)> = Vec::new();
        if !a.json {
            let split = if shards > 1 { format!(", split over {shards} GPUs") } else { String::new() };
            println!(
                "GPU: {gpu_name}; model {model_name}{split}; weights {:.2} GiB ({matrix_types}); read bandwidth {read_gb_s:.0} GB/s\n",
                matrix_bytes as f64 / GIB,
            );
            println!("| prompt+gen | kv | batch | t/s (decode) | t/s (total) | ms/step | first | last | prefill s | warm prefill s | KV GiB/seq | peak GiB | of floor | vs full (decode) | vs full (total) |");
            println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        }
        for &(p, n) in &pairs {
            for (label, kv) in &policies {
                for &b in &a.batch {
                    let batch = match (b, &bench_model) {
                        (BatchSize::Fixed(k), _) => k,
                        (BatchSize::Max, BenchModel::One(e)) => {
                            gpu_bench::max_batch(&e.model, p, n, kv, free_at_start)?
                        }
                        (BatchSize::Max, BenchModel::Sharded(m)) => m.max_batch(kv, p, n)?,
                    };
                    eprintln!("{p}+{n} {label} batch {batch}");
                    let progress = |m: &str| eprintln!("  {m}");
                    let r = match &bench_model {
                        BenchModel::One(e) => gpu_bench::run(&e.model, p, n, kv, batch, &progress),
                        BenchModel::Sharded(m) => gpu_bench::run_sharded(m, p, n, kv, batch, &progress),
                    };
                    let mut r = r.with_context(|| format!("{p}+{n}, {label}, batch {batch}"))?;
                    r.kv = label.clone();
                    // The floor: weights once per step plus each sequence's KV held on average.
                    let held = if r.kv_bytes_per_sequence < r.kv_bytes_full && kv.budget.is_some() {
                        r.kv_bytes_per_sequence as f64
                    } else {
                        ((p + n.div_ceil(2)) * per_token) as f64
                    };
                    // Split over GPUs, each reads its part of the weights and the caches.
                    let floor_ms = (weights as f64 + batch as f64 * held) / (shards as f64 * read_gb_s * 1e9) * 1e3;
                    let of_floor = floor_ms / r.ms_per_step;
                    // Against the full cache at the same batch setting (a fixed size, or each its largest).
                    let full = rows.iter().find(|(f, fb)| f.prompt == p && f.gen == n && f.kv == "full" && *fb == b);
                    let vs_full = |pick: fn(&GpuBenchRow) -> f64| {
                        full.map_or(String::new(), |(f, _)| format!("{:.2}x", pick(&r) / pick(f)))
                    };
                    if a.json {
                        let mut v = serde_json::to_value(&r)?;
                        v["fraction_of_floor"] = json!(of_floor);
                        v["gpu"] = json!(gpu_name);
                        v["model"] = json!(model_name);
                        v["weights"] = json!(matrix_types);
                        v["tensor_parallel"] = json!(shards);
                        v["read_gb_s"] = json!(read_gb_s);
                        v["batch_setting"] =
                            json!(if b == BatchSize::Max { "max".to_string() } else { batch.to_string() });
                        println!("{v}");
                    } else {
                        println!(
                            "| {p}+{n} | {} | {batch}{} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.3} | {:.2} | {:.1} | {:.0}% | {} | {} |",
                            r.kv,
                            if b == BatchSize::Max { " (max)" } else { "" },
                            r.decode_tok_s,
                            r.total_tok_s,
                            r.ms_per_step,
                            r.ms_per_step_first,
                            r.ms_per_step_last,
                            r.prefill_s,
                            r.prefill_warm_s,
                            r.kv_bytes_per_sequence as f64 / GIB,
                            r.peak_gpu_bytes as f64 / GIB,
                            100.0 * of_floor,
                            vs_full(|x| x.decode_tok_s),
                            vs_full(|x| x.total_tok_s)
                        );
                    }
                    std::io::stdout().flush().ok();
                    rows.push((r, b));
                }
            }
        }
        Ok(())
    }
}

//! `keyformer-fuzz`: run the fuzz targets (see the library) and report what they found.

use std::path::PathBuf;

use clap::Parser;
use keyformer_fuzz::{run, RunOptions, Seeds, Target, BOUND_FIXED, BOUND_PER_INPUT_BYTE};

#[global_allocator]
static ALLOC: keyformer_fuzz::alloc::Counting = keyformer_fuzz::alloc::Counting;

/// Fuzz keyformer's inputs: GGUF files, tokenizers, chat templates and server requests.
///
/// Each case is a structured mutation of the corpus (tests/golden/families, tests/data,
/// tests/fuzz/request, and llama.cpp's vocabulary files when KEYFORMER_VOCAB_DIR names them),
/// made from the seed and the case number alone. A case fails when it panics, runs past
/// --hang-seconds, grows the heap past 16 MiB + 64 x its input's bytes, or is refused with an
/// error of more than one line; failing inputs are written to --out. Exit status: 0 clean,
/// 1 failures, 2 a bad corpus or argument, 3 a hang.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Targets, comma-separated: gguf, tokenizer, chat, request, or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    target: Vec<String>,
    /// Cases per target.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    /// Stop each target after this many seconds, whatever --cases says.
    #[arg(long)]
    seconds: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// Where failing inputs go.
    #[arg(long, default_value = "target/fuzz-failures")]
    out: PathBuf,
    #[arg(long, default_value_t = 10.0)]
    hang_seconds: f64,
    /// The repository (its tests/ folder holds the corpus).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))]
    repo: PathBuf,
    /// Print one JSON report per target.
    #[arg(long)]
    json: bool,
}

fn main() {
    // One `error:` line, as the keyformer binary writes it.
    if let Err(e) = real_main() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

fn real_main() -> anyhow::Result<()> {
    let a = Args::parse();
    let targets: Vec<Target> = if a.target.iter().any(|t| t == "all") {
        Target::ALL.to_vec()
    } else {
        a.target.iter().map(|t| t.parse()).collect::<Result<_, String>>().map_err(anyhow::Error::msg)?
    };
    let vocab_dir = std::env::var_os("KEYFORMER_VOCAB_DIR").map(PathBuf::from);
    let seeds = Seeds::load(&a.repo, vocab_dir.as_deref())?;
    eprintln!("corpus: {}", seeds.describe());
    let opts = RunOptions {
        cases: a.cases,
        seconds: a.seconds,
        seed: a.seed,
        threads: a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        out: a.out.clone(),
        hang_seconds: a.hang_seconds,
        progress_seconds: 30.0,
    };
    let mut clean = true;
    for target in targets {
        let r = run(target, &seeds, &opts);
        clean &= r.clean();
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
            continue;
        }
        println!(
            "{:<10} {:>9} cases in {:>7.1} s: {} accepted, {} refused; {} panics, {} violations, {} over the heap bound; \
             slowest case {:.1} ms (#{}), most heap {:.1} MiB (#{})",
            r.target,
            r.cases,
            r.seconds,
            r.accepted,
            r.refused,
            r.panics.len(),
            r.violations.len(),
            r.over_bound.len(),
            r.slowest_ms,
            r.slowest_case,
            r.max_heap_growth as f64 / (1 << 20) as f64,
            r.max_heap_growth_case
        );
        for (case, msg) in r.panics.iter().take(5) {
            println!("  panic at case {case}: {msg}");
        }
        for (case, msg) in r.violations.iter().take(5) {
            println!("  violation at case {case}: {msg}");
        }
        for (case, bytes) in r.over_bound.iter().take(5) {
            println!("  case {case} grew the heap by {bytes} bytes");
        }
    }
    eprintln!(
        "heap bound per case: {} MiB + {BOUND_PER_INPUT_BYTE} x the input's bytes; failing inputs: {}",
        BOUND_FIXED >> 20,
        a.out.display()
    );
    if !clean {
        std::process::exit(1);
    }
    Ok(())
}

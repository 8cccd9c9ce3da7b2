//! The fuzz targets in CI: a few thousand cases each (scripts/fuzz.sh runs millions), and the
//! harness's own guarantees (cases are reproducible from their number; a violation is seen).

use std::path::Path;

use keyformer_fuzz::{run, run_case, Input, RunOptions, Seeds, Target};

#[global_allocator]
static ALLOC: keyformer_fuzz::alloc::Counting = keyformer_fuzz::alloc::Counting;

fn seeds() -> Seeds {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let vocab = std::env::var_os("KEYFORMER_VOCAB_DIR").map(std::path::PathBuf::from);
    Seeds::load(&repo, vocab.as_deref()).unwrap()
}

#[test]
fn every_target_runs_clean_for_a_few_thousand_cases() {
    let seeds = seeds();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    for target in Target::ALL {
        let opts = RunOptions {
            cases: 3000,
            seconds: None,
            seed: 7,
            threads: 2,
            out: out.clone(),
            hang_seconds: 30.0,
            progress_seconds: 0.0,
        };
        let r = run(target, &seeds, &opts);
        assert_eq!(r.cases, 3000);
        assert!(r.clean(), "{}: {:?} {:?} {:?}", r.target, r.panics, r.violations, r.over_bound);
        // The mutations reach both sides: inputs accepted and inputs refused.
        assert!(r.accepted > 0, "{}: nothing accepted", r.target);
        if target != Target::Tokenizer {
            assert!(r.refused > 0, "{}: nothing refused", r.target);
        }
    }
}

#[test]
fn a_case_is_made_from_its_number_alone() {
    let seeds = seeds();
    for target in Target::ALL {
        let a = Input::make(target, &seeds, 3, 12345).to_file_bytes();
        let b = Input::make(target, &seeds, 3, 12345).to_file_bytes();
        let c = Input::make(target, &seeds, 3, 12346).to_file_bytes();
        assert_eq!(a, b, "{target:?}");
        assert_ne!(a, c, "{target:?}");
    }
}

#[test]
fn a_multi_line_error_is_a_violation_and_a_good_model_is_accepted() {
    let seeds = seeds();
    // A model name with a newline is quoted back on one line (it was not, before the fuzzer).
    let body = br#"{"prompt": "x", "model": "a\nb"}"#.to_vec();
    let refused = run_case(&seeds, &Input::Request(body)).unwrap().unwrap();
    assert!(refused.contains("a\\nb") && !refused.contains('\n'), "{refused}");
    // The unmutated tiny model loads, tokenises and renders its chat prompt.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let bytes = std::fs::read(repo.join("tests/golden/families/qwen2.gguf")).unwrap();
    assert!(run_case(&seeds, &Input::Gguf(bytes)).unwrap().is_none());
}

//! ROUGE against vectors made by Google's `rouge-score` (tools/reference/golden_rouge.py).

// The core crate's test helpers (model paths, golden files), shared rather than copied.
#[path = "../../keyformer/tests/common/mod.rs"]
mod common;

use keyformer_eval::eval::rouge;

#[test]
fn rouge_equals_the_rouge_score_package() {
    let g = common::golden_json("golden/rouge.json");
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let (r, p) = (c["reference"].as_str().unwrap(), c["prediction"].as_str().unwrap());
        let got = rouge::score(r, p);
        for (name, s) in [("rouge1", got.rouge1), ("rouge2", got.rouge2), ("rougeL", got.rouge_l)] {
            let want: Vec<f64> = c["scores"][name].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            for (g, w) in [s.precision, s.recall, s.f1].iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{name} of {p:?} vs {r:?}: {g} vs {w}");
            }
        }
    }
}

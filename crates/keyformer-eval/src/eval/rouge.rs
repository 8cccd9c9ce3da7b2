//! ROUGE-1, ROUGE-2 and ROUGE-L (Lin, 2004) as Google's `rouge-score` computes them without
//! stemming: text lowercased, every run of characters outside [a-z0-9] is a separator; n-gram
//! overlap clipped by counts; ROUGE-L from the longest common subsequence of the two token
//! lists. Checked against vectors made by `rouge-score` itself (tests/golden/rouge.json).

use std::collections::HashMap;

/// Precision, recall and F1 of one ROUGE variant.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Score {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

impl Score {
    fn new(overlap: usize, predicted: usize, reference: usize) -> Self {
        let precision = overlap as f64 / predicted.max(1) as f64;
        let recall = overlap as f64 / reference.max(1) as f64;
        let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        Self { precision, recall, f1 }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of `prediction` against `reference`.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Rouge {
    pub rouge1: Score,
    pub rouge2: Score,
    pub rouge_l: Score,
}

/// rouge-score's default tokenizer (no stemming).
pub fn tokenize(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for w in tokens.windows(n) {
            *counts.entry(w).or_insert(0) += 1;
        }
    }
    counts
}

fn rouge_n(reference: &[String], prediction: &[String], n: usize) -> Score {
    let r = ngram_counts(reference, n);
    let p = ngram_counts(prediction, n);
    let overlap: usize = p.iter().map(|(g, &c)| c.min(r.get(g).copied().unwrap_or(0))).sum();
    Score::new(overlap, p.values().sum(), r.values().sum())
}

/// Length of the longest common subsequence (two rows of the DP table).
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Score `prediction` against `reference`.
pub fn score(reference: &str, prediction: &str) -> Rouge {
    let (r, p) = (tokenize(reference), tokenize(prediction));
    Rouge {
        rouge1: rouge_n(&r, &p, 1),
        rouge2: rouge_n(&r, &p, 2),
        rouge_l: Score::new(lcs_len(&r, &p), p.len(), r.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_computed_case() {
        // Reference tokens: the cat sat on the mat (6); prediction: a cat was sitting on a mat (7).
        // Unigram overlap: cat, on, mat = 3; no common bigram; LCS "cat on mat" = 3.
        let s = score("The cat sat on the mat.", "A cat was sitting on a mat");
        assert_eq!(s.rouge1.precision, 3.0 / 7.0);
        assert_eq!(s.rouge1.recall, 0.5);
        assert_eq!(s.rouge2.f1, 0.0);
        assert_eq!(s.rouge_l, s.rouge1);
        assert_eq!(score("", "x").rouge1, Score::default());
    }
}

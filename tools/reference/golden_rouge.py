#!/usr/bin/env python3
"""ROUGE test vectors from Google's `rouge-score` package (the reference everyone quotes).

Writes tests/golden/rouge.json: pairs of (reference, prediction) and rouge1/rouge2/rougeL
precision, recall and F1 without stemming. Usage: golden_rouge.py OUT.json
"""
import json
import sys

from rouge_score import rouge_scorer

PAIRS = [
    ("The cat sat on the mat.", "The cat sat on the mat."),
    ("The cat sat on the mat.", "A cat was sitting on a mat"),
    ("the quick brown fox jumps over the lazy dog", "the lazy dog jumps over the quick brown fox"),
    ("Police killed the gunman.", "The gunman was shot down by police."),
    ("", "something"),
    ("something", ""),
    ("Numbers: 3.14, 42 and 1e-9; CAPS and lower!", "numbers 3 14 42 and 1e 9 caps AND Lower"),
    ("Ünïcödé naïve café, Straße", "naive cafe strasse"),
    ("a a a b b", "a b b b b a"),
    ("It was the best of times, it was the worst of times, it was the age of wisdom, "
     "it was the age of foolishness", "it was the age of wisdom and the best of times"),
    ("Keyformer keeps a recent window plus key tokens.", "key tokens and a recent window are kept by Keyformer"),
]


def main(out):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    cases = []
    for ref, pred in PAIRS:
        s = scorer.score(ref, pred)
        cases.append({"reference": ref, "prediction": pred,
                      "scores": {k: [v.precision, v.recall, v.fmeasure] for k, v in s.items()}})
    json.dump({"use_stemmer": False, "cases": cases}, open(out, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(sys.argv[1])

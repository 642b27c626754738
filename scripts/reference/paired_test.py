#!/usr/bin/env python3
"""Paired comparison of runs on the VADER recipe's test split (standard library only).

The test split has 1,056 snippets, so one run's accuracy has a standard error of about 1.1 points;
two runs on the *same* snippets are compared better pairwise: McNemar's exact test counts the
snippets only one of the two gets right.

Runs, each NAME=FILE:
* a `tpeft eval --predictions` file of a saved adapter, evaluated on the test split written by
  `python scripts/reference/vader_split.py --write-test test.jsonl` (or on
  `builtin:vader-movie-reviews`, the whole corpus);
* the JSON report of scripts/reference/vader_peft_lora.py (its `test_predictions`).
Each run's accuracy is recomputed from its predictions against the gold labels of vader_split.py.

Usage:
    python scripts/reference/vader_split.py --write-test /tmp/test.jsonl
    tpeft eval --model assets/all-minilm-l6-v2 --adapter runs/vader/lora --task classification \
        --data /tmp/test.jsonl --predictions /tmp/lora.jsonl          # the same for each adapter
    python scripts/reference/paired_test.py lora=/tmp/lora.jsonl tt-lora=/tmp/tt.jsonl \
        peft-lora=docs/results/vader_peft_lora.json [--json out.json]
"""

import argparse
import itertools
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vader_split import DATA, SEED, load_examples, split_indices  # noqa: E402


def mcnemar_exact(b, c):
    """Two-sided exact McNemar p-value for b and c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def read_run(path, test_idx, labels):
    """Predicted label (1 = positive) per test snippet, by corpus index."""
    if path.endswith(".json"):
        report = json.load(open(path, encoding="utf-8"))
        if "test_predictions" not in report:
            sys.exit(f"{path}: no `test_predictions` (written by vader_peft_lora.py since session 5)")
        pred = {i: int(p) for i, p in report["test_predictions"]}
        if sorted(pred) != sorted(test_idx):
            sys.exit(f"{path}: its test snippets are not the recipe's split")
        return pred
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    if len(rows) == len(test_idx):  # evaluated on the test split file, in split order
        corpus_index = test_idx
    elif len(rows) == len(labels):  # evaluated on the whole corpus
        corpus_index = list(range(len(labels)))
    else:
        sys.exit(f"{path}: {len(rows)} rows, expected {len(test_idx)} (test split) or {len(labels)} (corpus)")
    pred = {}
    for row in rows:
        i = corpus_index[row["index"]]
        if int(row["expected"]) != labels[i]:
            sys.exit(f"{path}: row {row['index']} has gold label {row['expected']}, the split says {labels[i]}")
        pred[i] = int(row["predicted"])
    return {i: pred[i] for i in test_idx}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("runs", nargs="+", help="NAME=FILE (tpeft predictions .jsonl or PEFT report .json)")
    args = ap.parse_args()

    _, labels = load_examples(DATA)
    _, _, test_idx = split_indices(len(labels), SEED)
    preds = {}
    for spec in args.runs:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"{spec}: expected NAME=FILE")
        preds[name] = read_run(path, test_idx, labels)

    n = len(test_idx)
    result = {"n_test": n, "accuracy": {}, "pairs": []}
    print(f"test snippets: {n}")
    for name, p in preds.items():
        acc = sum(p[i] == labels[i] for i in test_idx) / n
        result["accuracy"][name] = acc
        print(f"{name:>16}  accuracy {100 * acc:6.2f} %")
    for a, b in itertools.combinations(preds, 2):
        only_a = sum(preds[a][i] == labels[i] != preds[b][i] for i in test_idx)
        only_b = sum(preds[b][i] == labels[i] != preds[a][i] for i in test_idx)
        p = mcnemar_exact(only_a, only_b)
        result["pairs"].append({"a": a, "b": b, "only_a_right": only_a, "only_b_right": only_b,
                                "mcnemar_exact_p": p})
        print(f"{a} vs {b}: only {a} right {only_a}, only {b} right {only_b} "
              f"({100 * (only_a - only_b) / n:+.2f} points), McNemar exact p = {p:.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()

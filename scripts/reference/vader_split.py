#!/usr/bin/env python3
"""The VADER movie-review data and the recipe's seeded 80/10/10 split (standard library only).

The same parsing as `tpeft`'s `builtin:vader-movie-reviews` (snippets rated exactly 0 dropped,
label = rating > 0) and the same SplitMix64 Fisher-Yates shuffle (training/tests checks the
indices), shared by vader_peft_lora.py and paired_test.py.

    python scripts/reference/vader_split.py --write-test test.jsonl   # the test split as JSONL
"""

import argparse
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "assets/vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
SEED = 1234
M64 = 0xFFFFFFFFFFFFFFFF


def load_examples(path):
    texts, labels = [], []
    with open(path, "r", encoding="utf-8", newline="") as f:
        for raw in f:
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t", 2)
            if len(parts) < 3:
                raise ValueError(f"malformed line: {line!r}")
            rating = float(parts[1].strip())
            if rating == 0.0:
                continue
            texts.append(parts[2].strip())
            labels.append(1 if rating > 0 else 0)
    return texts, labels


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & M64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & M64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)


def split_indices(n, seed=SEED):
    rng = SplitMix64(seed)
    idx = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.next() % (i + 1)
        idx[i], idx[j] = idx[j], idx[i]
    n_valid = n * 10 // 100
    n_test = n * 10 // 100
    n_train = n - n_valid - n_test
    return idx[:n_train], idx[n_train:n_train + n_valid], idx[n_train + n_valid:]


# ----------------------------------------------------------------------------- metrics


def main():
    ap = argparse.ArgumentParser(description="Write a split of the VADER recipe as JSONL")
    ap.add_argument("--write-test", required=True, help="output JSONL: {text, label} per test snippet")
    args = ap.parse_args()
    texts, labels = load_examples(DATA)
    _, _, test_idx = split_indices(len(texts), SEED)
    with open(args.write_test, "w", encoding="utf-8") as f:
        for i in test_idx:
            # Labels as strings "0"/"1": the names `tpeft` gives the builtin loader's classes.
            f.write(json.dumps({"text": texts[i], "label": str(labels[i])}) + "\n")
    print(f"wrote {len(test_idx)} test snippets to {args.write_test}")


if __name__ == "__main__":
    main()

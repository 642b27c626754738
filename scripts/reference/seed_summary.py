#!/usr/bin/env python3
"""Mean and spread of test accuracy over seeds, and the gaps between groups of runs.

Each argument is GROUP=FILE[,FILE...]: a `tpeft finetune` report (train_report.json, as copied to
docs/results/) or a result of scripts/reference/vader_peft_lora.py. Standard library only.

    python3 scripts/reference/seed_summary.py \\
        "PEFT LoRA=docs/results/vader_peft_lora.json,docs/results/vader-seeds/peft-lora-s1.json" \\
        "our TT-LoRA (k)=docs/results/vader-tt-lora-k.json,docs/results/vader-seeds/tt-lora-k-s1.json"

Prints one row per group (n, mean, sample std, min, max, in %) and every pairwise gap of the
means, with the standard error of that difference (Welch, sqrt(s1²/n1 + s2²/n2)).
"""
import json
import math
import statistics
import sys


def test_accuracy(path):
    with open(path) as f:
        d = json.load(f)
    t = d.get("test")
    if not isinstance(t, dict) or "accuracy" not in t:
        sys.exit(f"{path}: no test.accuracy (expected a tpeft train_report.json or a "
                 f"vader_peft_lora.py result)")
    return 100.0 * t["accuracy"]


def main(argv):
    if not argv:
        sys.exit(__doc__)
    groups = []
    for arg in argv:
        name, sep, files = arg.partition("=")
        if not sep or not files:
            sys.exit(f"bad argument {arg!r}: expected GROUP=FILE[,FILE...]")
        groups.append((name, [test_accuracy(p) for p in files.split(",")]))
    print(f"{'group':24s} {'n':>2s} {'mean':>6s} {'std':>5s} {'min':>6s} {'max':>6s}  runs")
    for name, accs in groups:
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        runs = " ".join(f"{a:.2f}" for a in accs)
        print(f"{name:24s} {len(accs):2d} {statistics.mean(accs):6.2f} {sd:5.2f} "
              f"{min(accs):6.2f} {max(accs):6.2f}  {runs}")
    for i, (a, xa) in enumerate(groups):
        for b, xb in groups[i + 1:]:
            gap = statistics.mean(xa) - statistics.mean(xb)
            var = sum(statistics.variance(x) / len(x) for x in (xa, xb) if len(x) > 1)
            print(f"gap {a} - {b}: {gap:+.2f} points (s.e. {math.sqrt(var):.2f})")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Writes a small DPO preference file from the English chatterbot corpus (deterministic).

Each conversation's first user turn is the prompt and its own reply is `chosen`; `rejected` is
the first reply of the conversation half the corpus away (files sorted by name, conversations in
file order), which is almost always another topic. Pairs whose two replies are equal, or whose
replies are longer than --max-chars, are left out. Rows are plain text, as `tpeft finetune --task
dpo` takes them (no chat template): `{"prompt": "Question: …\\nAnswer:", "chosen": " …",
"rejected": " …"}`.

    python3 scripts/data/chatterbot_dpo.py assets/chatterbot/chatterbot_corpus/data/english \
        runs/chatterbot-dpo.jsonl
"""

import argparse
import json
import pathlib

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", type=pathlib.Path, help="chatterbot_corpus/data/english")
    parser.add_argument("output", type=pathlib.Path, help="the JSONL file to write")
    parser.add_argument("--max-chars", type=int, default=160, help="longest reply kept [160]")
    args = parser.parse_args()

    firsts = []  # (question, reply) of every conversation with at least two turns
    for path in sorted(args.corpus.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        for conversation in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if isinstance(t, (str, int, float))]
            if len(turns) >= 2 and turns[0] and turns[1]:
                firsts.append((turns[0], turns[1]))

    n = len(firsts)
    rows = []
    for i, (question, reply) in enumerate(firsts):
        other = firsts[(i + n // 2) % n][1]
        if other == reply or max(len(reply), len(other)) > args.max_chars:
            continue
        rows.append({"prompt": f"Question: {question}\nAnswer:", "chosen": f" {reply}", "rejected": f" {other}"})

    args.output.parent.mkdir(parents=True, exist_ok=True)
    with args.output.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} pairs from {n} conversations -> {args.output}")


if __name__ == "__main__":
    main()

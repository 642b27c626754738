#!/usr/bin/env python3
"""transformers + PEFT reference for the VADER movie-review LoRA fine-tuning recipe.

This script is the reference implementation for `tpeft finetune` on the same
recipe; the Rust side must reproduce the data split bit-exactly (see the
`split` section of the results JSON) and should land close on the metrics.

Recipe
------
* Data: assets/vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
  (tab-separated id, rating, text; each line split on the first two tabs only,
  CR/LF line endings stripped, text whitespace-trimmed, blank lines skipped).
  Rows with rating == 0.0 are dropped; label = 1 if rating > 0 else 0; file
  order is kept.
* Split: splitmix64(seed=1234) Fisher-Yates shuffle of 0..N-1, then
  train / valid (10%) / test (10%) in that order (N*10//100 each).
* Model: assets/all-minilm-l6-v2 (BERT) via AutoModelForSequenceClassification
  (num_labels=2, all dropout 0; pooler tanh(W h_CLS) -> Linear classifier),
  tokenizer truncation max_length=64, dynamic padding per batch.
* PEFT: LoRA r=8, alpha=16, dropout 0, targets query/value, bias none,
  modules_to_save=["classifier"].
* Training: plain PyTorch loop, torch.manual_seed(1234), 2 threads, AdamW
  (lr 1e-3, wd 0.01, betas (0.9, 0.999), eps 1e-8), batch 32, per-epoch batch
  order from torch.Generator seeded 1234+epoch, linear warmup over the first
  6% of optimizer steps then linear decay to 0, global grad-norm clip 1.0.
  Best-valid-accuracy epoch's weights are used for test accuracy / F1 / MCC.

Exact command (from the repository root)
----------------------------------------
    /tmp/venv/bin/python scripts/reference/vader_peft_lora.py --epochs 2 \
        --output docs/results/vader_peft_lora.json

Quick check:
    /tmp/venv/bin/python scripts/reference/vader_peft_lora.py --max-train 256 \
        --epochs 1 --output /tmp/vader_peft_quick.json
"""

import argparse
import copy
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time

import torch

from vader_split import SEED, load_examples, split_indices

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(REPO, "assets/vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
MODEL_DIR = os.path.join(REPO, "assets/all-minilm-l6-v2")


# ----------------------------------------------------------------------------- metrics
def metrics(preds, golds):
    tp = sum(1 for p, g in zip(preds, golds) if p == 1 and g == 1)
    tn = sum(1 for p, g in zip(preds, golds) if p == 0 and g == 0)
    fp = sum(1 for p, g in zip(preds, golds) if p == 1 and g == 0)
    fn = sum(1 for p, g in zip(preds, golds) if p == 0 and g == 1)
    n = len(golds)
    acc = (tp + tn) / n if n else 0.0
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = (tp * tn - fp * fn) / den if den else 0.0
    return {"accuracy": acc, "f1_positive": f1, "mcc": mcc, "precision": prec, "recall": rec,
            "tp": tp, "tn": tn, "fp": fp, "fn": fn, "n": n}


def peak_rss_mb():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024.0 * 1024.0) if sys.platform == "darwin" else r / 1024.0


def write_json_atomic(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None,
                    help="use only the first N examples of the train split")
    ap.add_argument("--output", default=os.path.join(REPO, "docs/results/vader_peft_lora.json"))
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(2)

    import transformers
    import peft
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # ---- data & split
    texts, labels = load_examples(DATA)
    n = len(texts)
    train_idx, valid_idx, test_idx = split_indices(n, SEED)
    n_train_full = len(train_idx)
    if args.max_train is not None:
        train_idx = train_idx[:args.max_train]
    print(f"N={n} (pos={sum(labels)}, neg={n - sum(labels)})")
    print(f"n_train={n_train_full} n_valid={len(valid_idx)} n_test={len(test_idx)}"
          f" (training on {len(train_idx)})")
    print(f"train[:5]={train_idx[:5]} valid[:5]={valid_idx[:5]} test[:5]={test_idx[:5]}")

    # ---- model
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model, loading_info = AutoModelForSequenceClassification.from_pretrained(
        MODEL_DIR, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0, output_loading_info=True)
    missing = list(loading_info.get("missing_keys", []))
    pooler_loaded = not any("pooler" in k for k in missing)
    print(f"missing (newly initialised) keys: {missing}")
    print(f"pooler: {'loaded from checkpoint' if pooler_loaded else 'NEWLY INITIALISED'}")

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                     modules_to_save=["classifier"], task_type=TaskType.SEQ_CLS, bias="none")
    model = get_peft_model(model, cfg)
    model.print_trainable_parameters()
    trainable = [(nme, p) for nme, p in model.named_parameters() if p.requires_grad]
    n_lora = sum(p.numel() for nme, p in trainable if "lora_A" in nme or "lora_B" in nme)
    n_head = sum(p.numel() for nme, p in trainable if "classifier" in nme)
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    other = [nme for nme, _ in trainable if not ("lora_" in nme or "classifier" in nme)]
    print(f"trainable: lora(A+B)={n_lora} head={n_head} total_trainable={n_trainable} "
          f"all_params={n_total} other_trainable={other}")

    # ---- batching
    def encode(ids):
        enc = tok([texts[i] for i in ids], truncation=True, max_length=64, padding=True,
                  return_tensors="pt")
        y = torch.tensor([labels[i] for i in ids], dtype=torch.long)
        return enc, y

    bs = 32
    n_batches = math.ceil(len(train_idx) / bs)
    total_steps = n_batches * args.epochs
    warmup = int(0.06 * total_steps)
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-3, weight_decay=0.01,
                            betas=(0.9, 0.999), eps=1e-8)

    def lr_lambda(step):  # same shape as transformers.get_linear_schedule_with_warmup
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    @torch.no_grad()
    def predict(ids):
        model.eval()
        preds = []
        for s in range(0, len(ids), 64):
            enc, _ = encode(ids[s:s + 64])
            preds.extend(model(**enc).logits.argmax(-1).tolist())
        return preds

    history = []
    best_acc, best_epoch, best_state = -1.0, None, None
    train_seconds, train_tokens, train_examples, step = 0.0, 0, 0, 0
    for epoch in range(args.epochs):
        model.train()
        g = torch.Generator().manual_seed(SEED + epoch)
        # fixed contiguous batches of the train split, visited in shuffled order
        order = torch.randperm(n_batches, generator=g).tolist()
        t0 = time.perf_counter()
        loss_sum, loss_n = 0.0, 0
        for bi, b in enumerate(order):
            ids = train_idx[b * bs:(b + 1) * bs]
            enc, y = encode(ids)
            out = model(**enc)
            loss = torch.nn.functional.cross_entropy(out.logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            opt.step()
            sched.step()
            step += 1
            train_tokens += int(enc["attention_mask"].sum())
            train_examples += len(ids)
            loss_sum += loss.item() * len(ids)
            loss_n += len(ids)
            if (bi + 1) % 20 == 0 or bi + 1 == n_batches:
                el = train_seconds + time.perf_counter() - t0
                print(f"epoch {epoch + 1} step {bi + 1}/{n_batches} loss {loss_sum / loss_n:.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} {train_examples / el:.1f} ex/s", flush=True)
        ep_secs = time.perf_counter() - t0
        train_seconds += ep_secs
        vm = metrics(predict(valid_idx), [labels[i] for i in valid_idx])
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / max(1, loss_n),
                        "valid_accuracy": vm["accuracy"], "epoch_seconds": ep_secs})
        print(f"epoch {epoch + 1}: train_loss {loss_sum / max(1, loss_n):.4f} "
              f"valid_acc {vm['accuracy']:.4f} ({ep_secs:.1f}s)", flush=True)
        if vm["accuracy"] > best_acc:
            best_acc, best_epoch = vm["accuracy"], epoch + 1
            best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})

    model.load_state_dict(best_state)
    test_preds = predict(test_idx)
    tm = metrics(test_preds, [labels[i] for i in test_idx])
    print(f"best epoch {best_epoch} valid_acc {best_acc:.4f} | test acc {tm['accuracy']:.4f} "
          f"f1 {tm['f1_positive']:.4f} mcc {tm['mcc']:.4f}")
    tps = train_tokens / train_seconds if train_seconds else 0.0
    print(f"train {train_seconds:.1f}s, {train_tokens} tokens, {tps:.1f} tok/s, "
          f"{train_examples / train_seconds:.2f} ex/s, peak RSS {peak_rss_mb():.0f} MiB")

    results = {
        "recipe": "vader_movie_reviews_lora_r8_qv",
        "reference_for": "tpeft finetune",
        "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        "data": {"path": os.path.relpath(DATA, REPO), "n": n, "n_pos": sum(labels),
                 "n_neg": n - sum(labels)},
        "split": {"seed": SEED, "n_train": n_train_full, "n_valid": len(valid_idx),
                  "n_test": len(test_idx), "train_used": len(train_idx),
                  "train_first5": train_idx[:5], "valid_first5": valid_idx[:5],
                  "test_first5": test_idx[:5]},
        "model": {"path": os.path.relpath(MODEL_DIR, REPO), "pooler_loaded": pooler_loaded,
                  "newly_initialised_keys": missing},
        "params": {"lora_ab": n_lora, "head": n_head, "trainable_total": n_trainable,
                   "all": n_total},
        "hyper": {"r": 8, "alpha": 16, "targets": ["query", "value"], "lr": 1e-3,
                  "weight_decay": 0.01, "batch_size": bs, "epochs": args.epochs,
                  "max_length": 64, "warmup_steps": warmup, "total_steps": total_steps,
                  "grad_clip": 1.0, "threads": 2, "max_train": args.max_train},
        "history": history,
        "best_epoch": best_epoch,
        "best_valid_accuracy": best_acc,
        "test": tm,
        # Per-snippet test predictions [index among the kept snippets in file order, predicted label],
        # the order `tpeft eval --data builtin:vader-movie-reviews` uses too; for
        # paired comparisons with other runs on the same split (scripts/reference/paired_test.py).
        "test_predictions": [[i, p] for i, p in zip(test_idx, test_preds)],
        "train_seconds": train_seconds,
        "train_tokens": train_tokens,
        "train_tokens_per_s": tps,
        "train_examples_per_s": train_examples / train_seconds if train_seconds else 0.0,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_json_atomic(args.output, results)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

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

Other seeds and TT-LoRA
-----------------------
``--init-seed S`` changes the initialisation and batch order only (the split stays seed 1234, like
``tpeft finetune --seed S --split-seed 1234``). ``--method tt-lora`` replaces PEFT's LoRA by
``TtLoraLinear`` below (PEFT has no TT-LoRA): tpeft's TT-LoRA math and initialisation in torch, for
the cross-check of our TT-LoRA and for seed studies at torch speed, e.g. the README's TT-LoRA (k):

    /tmp/venv/bin/python scripts/reference/vader_peft_lora.py --method tt-lora --rank 4 --alpha 16 \
        --tt-shape 8,6,8,8,6,8 --lr 5e-3 --head-lr 1e-3 --loraplus-lr-ratio 4 --init-seed 1 \
        --output docs/results/vader-seeds/torch-tt-lora-k-s1.json

Ablations of the differences between this script and tpeft (docs/results/vader-seeds/README.md):
``--head-init uniform`` initialises the classifier like tpeft's head until 2026-11-23 (PyTorch's
nn.Linear default: uniform +-1/sqrt(fan_in) for weight and bias; tpeft now uses transformers'
N(0, 0.02) with zero bias, this script's default); ``--batching examples`` reshuffles the examples
every epoch, as tpeft does, instead of visiting fixed batches in a shuffled order.

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


# ----------------------------------------------------------------------------- TT-LoRA
class TtLoraLinear(torch.nn.Module):
    """A frozen nn.Linear plus a TT-LoRA update, the math and initialisation of tpeft's `tt_lora.rs`.

    Cores [r_{k-1}, n_k, r_k] over `input_factors ++ reversed(output_factors)`, every core uniform
    in [-1, 1] rescaled to unit Frobenius norm (LANL's `direct_init`), except the last core, which
    starts at zero so that ΔW_0 = 0. The forward contracts the two half-trains A [d_in, r] and
    B [r, d_out] and adds alpha * x A B, as tpeft's planner does at these token counts.
    """

    def __init__(self, base, tt_shape, rank, alpha):
        super().__init__()
        self.base, self.alpha = base, alpha
        d_in, d_out = base.in_features, base.out_features
        prod, split = 1, None
        for k, n in enumerate(tt_shape):
            prod *= n
            if prod == d_in:
                split = k + 1
                break
        assert split is not None and math.prod(tt_shape[split:]) == d_out, (tt_shape, d_in, d_out)
        self.split = split
        ranks = [1] + [rank] * (len(tt_shape) - 1) + [1]
        cores = []
        for k, n in enumerate(tt_shape):
            if k + 1 == len(tt_shape):
                core = torch.zeros(ranks[k], n, ranks[k + 1])
            else:
                core = torch.rand(ranks[k], n, ranks[k + 1]) * 2 - 1
                core = core / core.norm()
            cores.append(torch.nn.Parameter(core))
        self.cores = torch.nn.ParameterList(cores)

    def half_trains(self):
        a = self.cores[0].reshape(-1, self.cores[0].shape[-1])  # [n_0, r]
        for core in self.cores[1:self.split]:
            a = (a @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
        b = self.cores[-1].reshape(self.cores[-1].shape[0], -1)  # [r, n_last]
        for core in reversed(list(self.cores)[self.split:-1]):
            b = (core.reshape(-1, core.shape[-1]) @ b).reshape(core.shape[0], -1)
        return a, b

    def forward(self, x):
        a, b = self.half_trains()
        return self.base(x) + self.alpha * ((x @ a) @ b)


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=None,
                    help="use only the first N examples of the train split")
    ap.add_argument("--output", default=os.path.join(REPO, "docs/results/vader_peft_lora.json"))
    ap.add_argument("--method", choices=["lora", "tt-lora"], default="lora",
                    help="lora: HF PEFT's LoRA; tt-lora: the TT-LoRA module below (PEFT has none)")
    ap.add_argument("--init-seed", type=int, default=SEED,
                    help="seed of the adapter/head initialisation and batch order; the split "
                         "always uses seed 1234")
    ap.add_argument("--rank", type=int, default=None, help="LoRA r (8) or TT rank (4)")
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--tt-shape", default="8,6,8,8,6,8",
                    help="input_factors ++ reversed(output_factors), as tpeft's --tt-shape")
    ap.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate")
    ap.add_argument("--head-lr", type=float, default=None, help="classifier lr (default: --lr)")
    ap.add_argument("--loraplus-lr-ratio", type=float, default=None,
                    help="LoRA+: the zero-initialised factor (lora_B / last TT core) at ratio x lr")
    ap.add_argument("--head-init", choices=["hf", "uniform"], default="hf",
                    help="classifier init: transformers' N(0, 0.02) with zero bias (hf), or "
                         "nn.Linear's default uniform(+-1/sqrt(fan_in)) for weight and bias "
                         "(Burn's LinearConfig default, tpeft's head init until 2026-11-23)")
    ap.add_argument("--batching", choices=["fixed", "examples"], default="fixed",
                    help="fixed: contiguous batches of the train split visited in shuffled order; "
                         "examples: the train examples reshuffled every epoch, as tpeft does")
    args = ap.parse_args()
    rank = args.rank or (8 if args.method == "lora" else 4)
    head_lr = args.head_lr if args.head_lr is not None else args.lr
    seed = args.init_seed
    tt_shape = [int(v) for v in args.tt_shape.split(",")]

    torch.manual_seed(seed)
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

    if args.method == "lora":
        cfg = LoraConfig(r=rank, lora_alpha=args.alpha, lora_dropout=0.0,
                         target_modules=["query", "value"], modules_to_save=["classifier"],
                         task_type=TaskType.SEQ_CLS, bias="none")
        model = get_peft_model(model, cfg)
        model.print_trainable_parameters()
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.bert.encoder.layer:
            att = layer.attention.self
            att.query = TtLoraLinear(att.query, tt_shape, rank, args.alpha)
            att.value = TtLoraLinear(att.value, tt_shape, rank, args.alpha)
        for p in model.classifier.parameters():
            p.requires_grad_(True)
    if args.head_init == "uniform":
        torch.manual_seed(seed)
        model_classifier = (model.base_model.model.classifier.modules_to_save["default"]
                            if args.method == "lora" else model.classifier)
        model_classifier.reset_parameters()
    trainable = [(nme, p) for nme, p in model.named_parameters() if p.requires_grad]
    n_lora = sum(p.numel() for nme, p in trainable
                 if "lora_A" in nme or "lora_B" in nme or ".cores." in nme)
    n_head = sum(p.numel() for nme, p in trainable if "classifier" in nme)
    n_trainable = sum(p.numel() for _, p in trainable)
    n_total = sum(p.numel() for p in model.parameters())
    other = [nme for nme, _ in trainable
             if not ("lora_" in nme or ".cores." in nme or "classifier" in nme)]
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
    # Parameter groups as tpeft builds them: head, adapter, and (LoRA+) the zero-initialised factor.
    def is_zero_factor(nme):
        return "lora_B" in nme or nme.endswith(f".cores.{len(tt_shape) - 1}")
    ratio = args.loraplus_lr_ratio or 1.0
    groups = [
        {"params": [p for nme, p in trainable if "classifier" in nme], "lr": head_lr},
        {"params": [p for nme, p in trainable if "classifier" not in nme and not is_zero_factor(nme)],
         "lr": args.lr},
        {"params": [p for nme, p in trainable if "classifier" not in nme and is_zero_factor(nme)],
         "lr": args.lr * ratio},
    ]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01,
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
        g = torch.Generator().manual_seed(seed + epoch)
        # fixed contiguous batches of the train split, visited in shuffled order
        order = torch.randperm(n_batches, generator=g).tolist()
        if args.batching == "examples":
            # a fresh permutation of the examples every epoch, cut into consecutive batches
            perm = torch.randperm(len(train_idx), generator=g).tolist()
            shuffled = [train_idx[i] for i in perm]
            order = list(range(n_batches))
        else:
            shuffled = train_idx
        t0 = time.perf_counter()
        loss_sum, loss_n = 0.0, 0
        for bi, b in enumerate(order):
            ids = shuffled[b * bs:(b + 1) * bs]
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
        "method": args.method,
        "init_seed": seed,
        "head_init": args.head_init,
        "batching": args.batching,
        "hyper": {"r": rank, "alpha": args.alpha, "targets": ["query", "value"], "lr": args.lr,
                  "head_lr": head_lr, "loraplus_lr_ratio": args.loraplus_lr_ratio,
                  "tt_shape": args.tt_shape if args.method == "tt-lora" else None,
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

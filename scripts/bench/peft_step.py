"""What the transformers + PEFT sides of `tpeft bench --suite train-step` share: the step the Rust
suite times (forward, causal-LM loss on every next token, backward, global-norm clipping at 1.0,
AdamW with lr 1e-4, weight decay 0.01, eps 1e-8) and the peak-RSS counter it reads."""
import statistics
import time

import torch


def peak_rss_mib():
    """The process's peak resident set (VmHWM) in MiB, or None off Linux."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def reset_peak_rss():
    """Resets the kernel's peak-RSS counter (Linux >= 4.0); whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def token_ids(batch, seq, vocab, device=None):
    """The Rust suite's deterministic ids."""
    rows = [[((row * seq + i) * 7919 + 13) % vocab for i in range(seq)] for row in range(batch)]
    return torch.tensor(rows, device=device)


def train_step(model, ids):
    """A function running one step of `model` (a PEFT model) on `ids`, returning the loss tensor,
    and its trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01, eps=1e-8)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, trainable


def time_steps(step, repeats):
    """Runs `step` once to warm up, then `repeats` timed times, then once more with the peak-RSS
    counter reset before it (as the Rust suite measures). Returns the last timed step's result,
    the median and all step times in ms, and that step's peak RSS (None where it cannot be reset)."""
    times, result = [], None
    for k in range(repeats + 1):
        start = time.perf_counter()
        result = step()
        if k > 0:
            times.append((time.perf_counter() - start) * 1e3)
    reset = reset_peak_rss()
    step()
    return result, statistics.median(times), times, peak_rss_mib() if reset else None

//! The causal-LM loss fused with the output head ("linear cross-entropy").
//!
//! The plain loss, `log_softmax(h·Wᵀ)` gathered at the targets, keeps the `[rows, vocab]` logits
//! and several vocabulary-sized intermediates in the autodiff graph: with a large vocabulary each is
//! tens of megabytes, and the loss's time goes into allocating and passing over those buffers.
//!
//! Here the logits are computed outside the graph, a chunk of rows at a time, and the gradient
//! is handed to the graph directly: for `G = w·(softmax(z) − onehot(target))/count` the gradient
//! of the loss is `G·W` with respect to the hidden states and `Gᵀ·h` with respect to the head, so
//! the loss returned is `value + s − detach(s)` with the surrogate `s = Σ h ⊙ detach(G·W)` (plus
//! `Σ W ⊙ detach(Gᵀ·h)` when the head is trained). Its value is exactly `value` and its gradient
//! is the cross-entropy's, the same `softmax − onehot` that autodiff would derive, on
//! every backend. The graph holds only `[rows, d]` tensors (and `[vocab, d]` when the head trains).

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use tensor_peft_models::fused;

/// Logits held at once per chunk of rows: 16 Mi entries (64 MiB in f32), all 256 rows of a
/// SmolLM2 batch of 4×64. Smaller chunks cost more than they save: at 85 rows flex's two head
/// GEMMs ran at 90 GMAC/s instead of 125–140, which made the step 50 ms slower.
const CHUNK_ELEMENTS: usize = 1 << 24;

/// Weighted mean next-token cross-entropy of the logits `hidden · headᵀ`:
/// `−Σ_i weights_i · log softmax(hidden_i · headᵀ)[targets_i] / count`.
///
/// - `hidden`: `[rows, d]`, the final hidden states (tracked by autodiff when training);
/// - `head`: `[vocab, d]`, the output head ([`Llama::output_head`](tensor_peft_models::Llama::output_head));
/// - `train_head`: whether the head takes a gradient too (its parameter requires one, see
///   [`Llama::output_head_is_trainable`](tensor_peft_models::Llama::output_head_is_trainable));
///   a frozen head, as in PEFT, costs no extra product;
/// - `targets`: `[rows]` token ids; `weights`: `[rows]` (1 = supervised, 0 = ignored);
/// - `count`: the divisor (the number of supervised rows; 0 is taken as 1).
///
/// - `rows_per_chunk`: how many rows' logits are formed at a time (at least 1; the loss's peak
///   memory is about four `[rows_per_chunk, vocab]` buffers); `None`: up to 16 Mi logits.
///
/// Returns a `[1]` tensor. On a backend without autodiff (evaluation) only the value is computed.
pub fn linear_cross_entropy<B: Backend>(
    hidden: Tensor<B, 2>,
    head: Tensor<B, 2>,
    train_head: bool,
    targets: Tensor<B, 1, Int>,
    weights: Tensor<B, 1>,
    count: usize,
    rows_per_chunk: Option<usize>,
) -> Tensor<B, 1> {
    let rows_per_chunk = rows_per_chunk.unwrap_or(CHUNK_ELEMENTS / head.dims()[0].max(1));
    let [rows, _] = hidden.dims();
    // Autodiff tracks computed tensors without marking them `require_grad` (only leaves are), so
    // the hidden states' gradient is computed whenever the backend differentiates.
    let grad_hidden = B::ad_enabled(&hidden.device());
    let grad_head = train_head && grad_hidden;
    let (h, w) = (hidden.clone().detach(), head.clone().detach());
    let scaled = weights.div_scalar(count.max(1) as f32);
    let chunk = rows_per_chunk.clamp(1, rows.max(1));

    let mut value = Tensor::<B, 1>::zeros([1], &hidden.device());
    let mut hidden_grads = Vec::new();
    let mut head_grad: Option<Tensor<B, 2>> = None;
    for start in (0..rows).step_by(chunk) {
        let n = chunk.min(rows - start);
        let h_chunk = h.clone().narrow(0, start, n);
        let target = targets.clone().narrow(0, start, n);
        let weight = scaled.clone().narrow(0, start, n);

        let logits = fused::linear(h_chunk.clone(), w.clone().transpose(), None);
        let (chunk_value, g) = fused::softmax_cross_entropy(logits, target, weight, grad_hidden || grad_head);
        value = value + chunk_value;

        // G = w·softmax − w·onehot: the gradient of the loss with respect to these logits.
        if let Some(g) = g {
            if grad_hidden {
                hidden_grads.push(fused::linear(g.clone(), w.clone(), None));
            }
            if grad_head {
                let part = g.transpose().matmul(h_chunk);
                head_grad = Some(match head_grad {
                    Some(acc) => acc + part,
                    None => part,
                });
            }
        }
    }

    let mut surrogate: Option<Tensor<B, 1>> = None;
    if grad_hidden && !hidden_grads.is_empty() {
        surrogate = Some((hidden * Tensor::cat(hidden_grads, 0)).sum());
    }
    if let Some(g) = head_grad {
        let s = (head * g).sum();
        surrogate = Some(match surrogate {
            Some(acc) => acc + s,
            None => s,
        });
    }
    match surrogate {
        // Zero in value (x − x), the surrogate's gradient in the graph.
        Some(s) => value + s.clone() - s.detach(),
        None => value,
    }
}

//! Gradient checkpointing (`--gradient-checkpointing`) by per-block recompute: the training step
//! keeps only each block's input instead of every activation of every block, and recomputes one
//! block at a time in the backward pass.
//!
//! 1. **Forward.** The embedding stage runs with autodiff (it is tracked only when something in it
//!    trains, e.g. BERT's embedding LayerNorm under `--train-norms`); the blocks run on the inner
//!    backend ([`AutodiffModule::valid`]: no graph at all), keeping each block's input. The last
//!    block's output becomes a fresh leaf that requires a gradient, and the output stage (final
//!    norm) and the task's loss run on it with autodiff.
//! 2. **Backward.** `loss.backward()` gives the gradients of the head and output stage and `g`, the
//!    gradient of the loss with respect to the last block's output. Then, from the last block to the
//!    first, the block is run again with autodiff from its saved input (a leaf that requires a
//!    gradient) and `(y · g).sum()` is differentiated: its gradient with respect to the block's
//!    parameters is the loss's, and its gradient with respect to the input is the next `g`.
//!    Finally `g` is pushed through the embedding stage when it is tracked.
//! 3. The parameter gradients of every backward are summed per parameter
//!    ([`GradientsAccumulator`]), so factors that every block shares (LoTR, LoRTA) get the sum of
//!    every block's contribution, once each, as the plain backward gives it.
//!
//! Peak memory holds the block inputs (`blocks × [B, T, d]`) plus one block's activations, instead
//! of every block's; the price is a second forward of every block (about a third more compute).
//!
//! Not Burn's own checkpointing (`BalancedCheckpointing`): it decides per operation what to keep,
//! while the project's fused CPU kernels are custom autodiff operations written for
//! `Autodiff<Flex, NoCheckpointing>` only, and it would not bound the memory by blocks.
//!
//! **Dropout** is drawn at random on every forward under autodiff and not at all on the inner
//! backend, so the recomputed blocks would not match the first pass: a configuration with adapter
//! dropout is refused ([`crate::config::validate`]).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use tensor_peft_models::{BlockStack, StackInput};

/// The inner (non-differentiating) backend of `B`.
type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What the first pass of a checkpointed step keeps for the backward: each block's input and the
/// forward's context ([module documentation](self)).
pub struct Recompute<B: AutodiffBackend, S: BlockStack<B>> {
    /// The embedding stage's output (tracked when something in it trains). It shares its buffer
    /// with the first block's saved input.
    embedded: Tensor<B, 3>,
    /// The per-forward context the blocks share.
    context: S::Context,
    /// Each block's input, first block first.
    inputs: Vec<Tensor<Inner<B>, 3>>,
    /// The last block's output, as a leaf that requires a gradient.
    last: Tensor<B, 3>,
}

impl<B, S> Recompute<B, S>
where
    B: AutodiffBackend,
    S: BlockStack<B> + AutodiffModule<B>,
    S::InnerModule: BlockStack<Inner<B>>,
{
    /// The first pass over `input`: the stack's hidden states (the output stage applied to the last
    /// block's output, which is a leaf of the autodiff graph), and what the backward needs.
    pub fn forward(stack: &S, input: &StackInput<B>) -> (Self, Tensor<B, 3>) {
        let embedded = stack.stack_input(input);
        let context = stack.stack_context(input);
        let inner = stack.valid();
        let inner_input = StackInput {
            ids: input.ids.clone().inner(),
            types: input.types.clone().map(Tensor::inner),
            mask: input.mask.clone().map(Tensor::inner),
        };
        let inner_context = inner.stack_context(&inner_input);
        let n = inner.num_blocks();
        let mut inputs = Vec::with_capacity(n);
        let mut x = embedded.clone().inner();
        for i in 0..n {
            inputs.push(x.clone());
            x = inner.block_forward(i, x, &inner_context);
        }
        let last = Tensor::from_inner(x).require_grad();
        let hidden = stack.stack_output(last.clone());
        (Self { embedded, context, inputs, last }, hidden)
    }

    /// The gradients of `loss` (computed from [`Self::forward`]'s hidden states) with respect to
    /// every trainable parameter of `module`, the task model that holds `stack`: the same
    /// [`GradientsParams`] `loss.backward()` gives without checkpointing, up to float rounding.
    pub fn backward<M: AutodiffModule<B>>(self, stack: &S, loss: Tensor<B, 1>, module: &M) -> GradientsParams {
        let mut total = GradientsAccumulator::<M>::new();
        let mut grads = loss.backward();
        let mut upstream = self.last.grad_remove(&mut grads);
        total.accumulate(module, GradientsParams::from_grads(grads, module));
        for (i, input) in self.inputs.into_iter().enumerate().rev() {
            // A loss that does not read the hidden states trains nothing below them.
            let Some(g) = upstream else { return total.grads() };
            let x = Tensor::<B, 3>::from_inner(input).require_grad();
            let y = stack.block_forward(i, x.clone(), &self.context);
            let mut grads = (y * Tensor::from_inner(g)).sum().backward();
            upstream = x.grad_remove(&mut grads);
            total.accumulate(module, GradientsParams::from_grads(grads, module));
        }
        // Burn says whether a leaf requires a gradient, not whether a computed tensor is tracked:
        // differentiate the embedding stage in any case (nothing when it is not tracked).
        if let Some(g) = upstream {
            let grads = (self.embedded * Tensor::from_inner(g)).sum().backward();
            total.accumulate(module, GradientsParams::from_grads(grads, module));
        }
        total.grads()
    }
}

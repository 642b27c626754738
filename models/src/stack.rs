//! The block-wise view of a model's forward pass: an embedding stage, a stack of blocks that
//! each map hidden states `[B, T, d]` to hidden states of the same shape, and an output stage.
//!
//! [`Llama`](crate::Llama) and [`Bert`](crate::Bert) run their forward through it, so there is one
//! forward; a trainer that recomputes each block's activations in the backward pass (gradient
//! checkpointing, `tensor_peft_training::recompute`) runs the same pieces one block at a time.
//! Nothing here knows which adapter method the blocks hold.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// What a stack's embedding stage reads: token ids `[B, T]`, and for encoders the token types
/// and the attention mask (`[B, T]`, 1 = token, 0 = padding). Decoders ignore `types` and `mask`.
#[derive(Debug, Clone)]
pub struct StackInput<B: Backend> {
    /// Token ids `[B, T]`.
    pub ids: Tensor<B, 2, Int>,
    /// Token types `[B, T]` (sentence A / B); `None`: all 0.
    pub types: Option<Tensor<B, 2, Int>>,
    /// Attention mask `[B, T]`; `None`: every position is a token.
    pub mask: Option<Tensor<B, 2>>,
}

impl<B: Backend> StackInput<B> {
    /// Token ids alone (a decoder's input).
    pub fn ids(ids: Tensor<B, 2, Int>) -> Self {
        Self { ids, types: None, mask: None }
    }
}

/// A model whose forward is `output(block_{n-1}(… block_0(embed(input)) …))`, every block
/// reading the same per-forward [`Context`](BlockStack::Context).
///
/// The context must not depend on trainable parameters: a block-wise backward computes it once
/// and differentiates each block on its own (RoPE tables, masks and DeBERTa's relative embeddings
/// are all frozen).
pub trait BlockStack<B: Backend> {
    /// What every block of one forward shares (RoPE tables, masks, relative embeddings).
    type Context;

    /// The embedding stage: the first block's input `[B, T, d]`.
    fn stack_input(&self, input: &StackInput<B>) -> Tensor<B, 3>;

    /// The context of a forward over `input`.
    fn stack_context(&self, input: &StackInput<B>) -> Self::Context;

    /// Number of blocks.
    fn num_blocks(&self) -> usize;

    /// Block `i` applied to `x` (`[B, T, d]` to `[B, T, d]`).
    fn block_forward(&self, i: usize, x: Tensor<B, 3>, context: &Self::Context) -> Tensor<B, 3>;

    /// The output stage applied to the last block's output (LLaMA's final norm; the identity for
    /// encoders).
    fn stack_output(&self, x: Tensor<B, 3>) -> Tensor<B, 3>;

    /// The whole forward: the stack's hidden states `[B, T, d]`.
    fn stack_forward(&self, input: &StackInput<B>) -> Tensor<B, 3> {
        let context = self.stack_context(input);
        let mut x = self.stack_input(input);
        for i in 0..self.num_blocks() {
            x = self.block_forward(i, x, &context);
        }
        self.stack_output(x)
    }
}

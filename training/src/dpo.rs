//! Direct preference optimisation (DPO; Rafailov et al., 2023), as TRL's `DPOTrainer` computes it
//! and as LoRTA's preference experiments ran it.
//!
//! A row is a `prompt` with a `chosen` and a `rejected` response. The loss of a pair is
//! `−log σ(β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))))`, where `log π(y)` is the
//! trained model's log-probability of response `y` given the prompt, summed over the response's
//! tokens (the prompt is not scored), and `π_ref` is the base model with its adapters removed.
//!
//! **Reference.** The reference log-probabilities are computed once, before the first step
//! ([`fill_reference`], TRL's `precompute_ref_log_probs`), with a clone of the model whose adapter
//! slots were emptied ([`strip_adapters`]). Burn's tensors are reference-counted, so the clone shares
//! the frozen weights: no second copy of the model is held. Precomputing was chosen over a
//! per-batch forward with the adapters disabled because it is cheaper (one forward per pair in
//! all, instead of one per pair, epoch and validation pass: a step costs about a third less) and
//! because it stays right when the run also trains something that is not an adapter (`--train-norms`):
//! emptying the adapter slots in the middle of training would leave the trained norms in the
//! "reference". It is computed before a resumed run restores its checkpoint, so a resumed run uses
//! the base too. Removing the adapters (rather than relying on ΔW = 0 at initialisation) keeps the
//! reference the base with `--init paper` and `--init-from`, which start from ΔW ≠ 0.
//!
//! **Tokens.** As `causal-lm`'s `prompt`/`completion` rows (and TRL for rows that are plain text),
//! the prompt and each response are tokenised on their own and concatenated, EOS is appended to
//! both responses and no chat template is applied. Both sequences of a pair go in the same batch
//! (the chosen sequences, then the rejected ones: one forward scores both, as TRL's
//! `concatenated_forward`), right-padded to the batch's longest.
//!
//! **Truncation** (`--max-len`), as TRL's `truncation_mode = "keep_end"` at tokenisation: when the
//! prompt and the longer response exceed `max_len`, the prompt keeps its last `max_len / 2` tokens
//! (TRL's default `max_prompt_length` is half its `max_length`; a leading BOS is kept), then both
//! responses are cut to the room left. No pair is dropped.

use crate::error::Result;
use crate::loss::linear_cross_entropy;
use crate::metrics::{PairOutcome, StepStats};
use crate::task::{Batch, Encoded, Target, TaskModel, TaskOutput, scalar};
use burn::module::{AutodiffModule, Module};
use burn::tensor::activation::log_sigmoid;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use burn::train::{InferenceStep, TrainOutput, TrainStep};
use tensor_peft_models::{BlockStack, Llama, StackInput, strip_adapters};

/// β of the DPO loss when none is given: TRL's default, and what LoRTA's experiments used.
pub const DEFAULT_BETA: f64 = 0.1;

/// The rejected half of a tokenised DPO pair (the chosen half is the [`Encoded`]'s `ids`).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// The prompt followed by the rejected response (and EOS).
    pub rejected: Vec<u32>,
    /// Index of the first scored token, in both sequences: the prompt's length (at least 1,
    /// since the first token of a sequence is not predicted).
    pub from: usize,
    /// `[log π_ref(chosen), log π_ref(rejected)]`, summed over the response tokens; filled by
    /// [`fill_reference`] before training or evaluation.
    pub reference: Option<[f64; 2]>,
}

/// A DPO pair as an [`Encoded`] example: `prompt` then each response, truncated to `max_len` as
/// the [module documentation](self) says (`keep_bos`: the prompt starts with a BOS to keep).
/// Returns the example and whether anything was cut.
pub fn encode_pair(
    mut prompt: Vec<u32>,
    mut chosen: Vec<u32>,
    mut rejected: Vec<u32>,
    keep_bos: bool,
    max_len: usize,
) -> (Encoded, bool) {
    let mut cut = false;
    if prompt.len() + chosen.len().max(rejected.len()) > max_len {
        let keep = (max_len / 2).max(1);
        if prompt.len() > keep {
            let bos = usize::from(keep_bos && keep > 1);
            let tail = prompt.split_off(prompt.len() - (keep - bos));
            prompt.truncate(bos);
            prompt.extend(tail);
        }
        let room = max_len.saturating_sub(prompt.len());
        chosen.truncate(room);
        rejected.truncate(room);
        cut = true;
    }
    let from = prompt.len().max(1);
    let mut ids = prompt.clone();
    ids.extend(chosen);
    prompt.extend(rejected);
    let types = vec![0; ids.len()];
    let pair = Pair { rejected: prompt, from, reference: None };
    (Encoded { ids, types, target: Target::Preference(Box::new(pair)) }, cut)
}

/// What a DPO [`Batch`] carries besides the token ids.
#[derive(Debug, Clone)]
pub struct PairBatch<B: Backend> {
    /// Next-token targets `[2n, T]`: position `t` of a sequence holds its token `t + 1`.
    pub targets: Tensor<B, 2, Int>,
    /// `(first position, count)` of the scored positions of each of the `2n` sequences (chosen,
    /// then rejected): positions `first..first + count` predict their response tokens.
    pub spans: Vec<(usize, usize)>,
    /// Each pair's reference log-probabilities ([`Pair::reference`]), when filled.
    pub reference: Option<Vec<[f64; 2]>>,
}

/// Pads DPO pairs into a batch on `device`: the `n` chosen sequences, then the `n` rejected ones,
/// right-padded with `pad` to the longest of the `2n`.
///
/// # Panics
/// If an item is not a DPO pair.
pub fn make_pair_batch<B: Backend>(items: &[&Encoded], pad: u32, device: &B::Device) -> Batch<B> {
    let pairs: Vec<&Pair> = items
        .iter()
        .map(|e| match &e.target {
            Target::Preference(pair) => pair.as_ref(),
            other => panic!("a DPO batch holds only preference pairs, not {other:?}"),
        })
        .collect();
    let sequences: Vec<(&[u32], usize)> = items
        .iter()
        .zip(&pairs)
        .map(|(e, p)| (e.ids.as_slice(), p.from))
        .chain(pairs.iter().map(|p| (p.rejected.as_slice(), p.from)))
        .collect();
    let rows = sequences.len();
    let t = sequences.iter().map(|(s, _)| s.len()).max().unwrap_or(1).max(1);
    let mut ids = vec![pad as i64; rows * t];
    let mut mask = vec![0f32; rows * t];
    let mut targets = vec![0i64; rows * t];
    let mut spans = Vec::with_capacity(rows);
    let mut last = Vec::with_capacity(rows);
    let mut tokens = 0;
    for (row, (seq, from)) in sequences.iter().enumerate() {
        for (k, &id) in seq.iter().enumerate() {
            ids[row * t + k] = id as i64;
            mask[row * t + k] = 1.0;
            if k > 0 {
                targets[row * t + k - 1] = id as i64;
            }
        }
        let first = from.saturating_sub(1);
        spans.push((first, seq.len().saturating_sub(1).saturating_sub(first)));
        last.push(seq.len().saturating_sub(1) as i64);
        tokens += seq.len();
    }
    let reference = pairs.iter().map(|p| p.reference).collect::<Option<Vec<_>>>();
    Batch {
        ids: Tensor::from_data(TensorData::new(ids, [rows, t]), device),
        types: Tensor::zeros([rows, t], device),
        mask: Tensor::from_data(TensorData::new(mask, [rows, t]), device),
        classes: None,
        scores: None,
        next_tokens: None,
        last: Tensor::from_data(TensorData::new(last, [rows]), device),
        tokens,
        choices: None,
        generation: Vec::new(),
        shard: None,
        pairs: Some(PairBatch {
            targets: Tensor::from_data(TensorData::new(targets, [rows, t]), device),
            spans,
            reference,
        }),
    }
}

/// `log π(response | prompt)` of every sequence of a DPO batch under `net`: the log-probabilities
/// of the scored tokens, summed per sequence, `[2n]` (chosen sequences first).
///
/// Each sequence's sum is the negated [`linear_cross_entropy`] of its scored positions (count 1),
/// so the `[positions, vocab]` logits are formed outside the autodiff graph and only the scored
/// positions are multiplied by the output head.
pub fn sequence_log_probs<B: Backend>(net: &Llama<B>, ids: Tensor<B, 2, Int>, pairs: &PairBatch<B>) -> Tensor<B, 1> {
    log_probs_of_hidden(net, net.hidden(ids), pairs)
}

/// [`sequence_log_probs`] from the model's final hidden states `[2n, T, d]`.
fn log_probs_of_hidden<B: Backend>(net: &Llama<B>, hidden: Tensor<B, 3>, pairs: &PairBatch<B>) -> Tensor<B, 1> {
    let [_, t, d] = hidden.dims();
    let device = hidden.device();
    let head = net.output_head();
    let train_head = net.output_head_is_trainable();
    let sums: Vec<Tensor<B, 1>> = pairs
        .spans
        .iter()
        .enumerate()
        .map(|(row, &(first, count))| {
            if count == 0 {
                return Tensor::zeros([1], &device);
            }
            let h = hidden.clone().narrow(0, row, 1).reshape([t, d]).narrow(0, first, count);
            let targets = pairs.targets.clone().narrow(0, row, 1).reshape([t]).narrow(0, first, count);
            let weights = Tensor::ones([count], &device);
            linear_cross_entropy(h, head.clone(), train_head, targets, weights, 1, None).neg()
        })
        .collect();
    Tensor::cat(sums, 0)
}

/// The DPO loss of a batch: `policy` holds `log π` of the `n` chosen then the `n` rejected
/// sequences (`[2n]`), `reference` the pairs' `[log π_ref(chosen), log π_ref(rejected)]`.
/// Returns the mean of `−log σ(β·((π_c − ref_c) − (π_r − ref_r)))` over the pairs (`[1]`) and
/// each pair's outcome (rewards `β·(π − ref)` and policy log-probabilities).
///
/// # Panics
/// If `policy` does not hold two values per pair.
pub fn dpo_loss<B: Backend>(
    policy: Tensor<B, 1>,
    reference: &[[f64; 2]],
    beta: f64,
) -> (Tensor<B, 1>, Vec<PairOutcome>) {
    let n = reference.len();
    assert_eq!(policy.dims(), [2 * n], "two log-probabilities per pair");
    let device = policy.device();
    let side = |k: usize| {
        let values: Vec<f32> = reference.iter().map(|r| r[k] as f32).collect();
        Tensor::<B, 1>::from_data(TensorData::new(values, [n]), &device)
    };
    let chosen = policy.clone().narrow(0, 0, n);
    let rejected = policy.clone().narrow(0, n, n);
    let chosen_rewards = (chosen - side(0)).mul_scalar(beta);
    let rejected_rewards = (rejected - side(1)).mul_scalar(beta);
    let loss = log_sigmoid(chosen_rewards.clone() - rejected_rewards.clone()).mean().neg().reshape([1]);
    let host = |t: Tensor<B, 1>| t.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
    let (rc, rr, lp) = (host(chosen_rewards), host(rejected_rewards), host(policy));
    let outcomes = (0..n)
        .map(|i| PairOutcome {
            reward_chosen: rc[i],
            reward_rejected: rr[i],
            logp_chosen: lp[i],
            logp_rejected: lp[n + i],
        })
        .collect();
    (loss, outcomes)
}

/// Fills [`Pair::reference`] of every DPO item with the log-probabilities of `net` without its
/// adapters (a clone with its adapter slots emptied by [`strip_adapters`]: the frozen weights are
/// shared, not copied), `batch_size` pairs at a time. Items that are not pairs are left alone.
pub fn fill_reference<B: Backend>(
    net: &Llama<B>,
    items: &mut [Encoded],
    batch_size: usize,
    pad: u32,
    device: &B::Device,
) -> Result<()> {
    let mut base = net.clone();
    strip_adapters(&mut base)?;
    for chunk in items.chunks_mut(batch_size.max(1)) {
        if !chunk.iter().all(|e| matches!(e.target, Target::Preference(_))) {
            continue;
        }
        let n = chunk.len();
        let refs: Vec<&Encoded> = chunk.iter().collect();
        let batch = make_pair_batch::<B>(&refs, pad, device);
        let pairs = batch.pairs.as_ref().expect("a pair batch");
        let logps = sequence_log_probs(&base, batch.ids.clone(), pairs)
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .unwrap_or_default();
        for (k, item) in chunk.iter_mut().enumerate() {
            if let Target::Preference(pair) = &mut item.target {
                pair.reference = Some([logps[k], logps[n + k]]);
            }
        }
    }
    Ok(())
}

/// A causal LM trained with DPO against its own base ([module documentation](self)).
#[derive(Module, Debug)]
pub struct DpoTask<B: Backend> {
    /// The (adapted) model.
    pub net: Llama<B>,
    /// β, the strength of the implicit KL penalty towards the reference.
    pub beta: f64,
    /// Train with gradient checkpointing ([`crate::recompute`]).
    pub gradient_checkpointing: bool,
}

impl<B: Backend> DpoTask<B> {
    /// Loss and statistics of a batch of pairs.
    ///
    /// # Panics
    /// If the batch is not a DPO batch or its reference log-probabilities were not filled
    /// ([`fill_reference`]).
    pub fn run(&self, batch: Batch<B>) -> (Tensor<B, 1>, StepStats) {
        self.run_with(batch, |input| self.net.stack_forward(&input))
    }

    /// [`Self::run`] with the model's final hidden states computed by `hidden`.
    fn run_with(
        &self,
        batch: Batch<B>,
        hidden: impl FnOnce(StackInput<B>) -> Tensor<B, 3>,
    ) -> (Tensor<B, 1>, StepStats) {
        let pairs = batch.pairs.expect("DPO batches carry pairs");
        let reference = pairs.reference.clone().expect("the reference log-probabilities are filled before training");
        let policy = log_probs_of_hidden(&self.net, hidden(StackInput::ids(batch.ids)), &pairs);
        let (loss, outcomes) = dpo_loss(policy, &reference, self.beta);
        let stats = StepStats {
            loss: scalar(&loss),
            units: reference.len(),
            tokens: batch.tokens,
            pairs: outcomes,
            ..Default::default()
        };
        (loss, stats)
    }
}

crate::task::steps!(DpoTask, Llama at net);

impl<B: AutodiffBackend> TaskModel<B> for DpoTask<B> {
    type Adapted = Llama<B>;
    fn adapted(&self) -> &Llama<B> {
        &self.net
    }

    /// The reference log-probabilities of every pair, from the model without adapters.
    fn prepare_items(&self, items: &mut [Encoded], batch_size: usize, pad: u32, device: &B::Device) -> Result<()> {
        fill_reference(&self.net.valid(), items, batch_size, pad, device)
    }
}

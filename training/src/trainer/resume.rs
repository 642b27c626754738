//! Resuming a run: the newest complete checkpoint of `<output>/checkpoint` gives back the trained
//! tensors, the optimizer state and the loop's position; a run that does not resume starts from a
//! fresh [`TrainerState`].

use crate::checkpoint::{self, TrainerState};
use crate::config::{TrainConfig, fingerprint};
use crate::error::{Result, TrainError};
use crate::optim::PeftOptimizer;
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::tensor::backend::AutodiffBackend;

/// `--resume` needs a complete checkpoint in the output directory.
pub(crate) fn check_resumable(cfg: &TrainConfig) -> Result<()> {
    let root = cfg.output.join("checkpoint");
    if checkpoint::list_checkpoints(&root).is_empty() {
        return Err(TrainError::Checkpoint { path: root, reason: "no complete checkpoint to resume from".into() });
    }
    Ok(())
}

/// Where training starts: with `cfg.resume`, the model, optimizer and loop state of the newest
/// checkpoint (written by a run with the same options, which its fingerprint shows); otherwise
/// `model` and `optimizer` as given, at step 0 of epoch 1.
pub(crate) fn start<B, M>(
    cfg: &TrainConfig,
    model: M,
    optimizer: PeftOptimizer<M, B>,
    device: &B::Device,
) -> Result<(M, PeftOptimizer<M, B>, TrainerState)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let fingerprint = fingerprint(cfg);
    if !cfg.resume {
        let state = TrainerState {
            fingerprint,
            epoch: 1,
            batches_done: 0,
            step: 0,
            epoch_finished: false,
            history: Vec::new(),
            best: None,
            epochs_without_improvement: 0,
            partial_train: None,
        };
        return Ok((model, optimizer, state));
    }
    let (_, dir) =
        checkpoint::list_checkpoints(&cfg.output.join("checkpoint")).pop().expect("checked by check_resumable");
    let state = checkpoint::read_state(&dir)?;
    if state.fingerprint != fingerprint {
        return Err(TrainError::Checkpoint {
            path: dir,
            reason: "was written by a run with other data, model, method or hyper-parameters; resume with the same options (only --epochs, --max-steps, --early-stopping-patience and --save-every-steps may change)".into(),
        });
    }
    let model = checkpoint::restore_trainable(
        model,
        checkpoint::read_safetensors(&dir.join(checkpoint::TRAINABLE_FILE))?,
        &dir,
    )?;
    let optimizer = if dir.join(checkpoint::OPTIMIZER_FILE).exists() {
        optimizer.load_record(checkpoint::read_optimizer::<B>(&dir, device)?)
    } else {
        optimizer
    };
    eprintln!("resuming from {} (epoch {}, step {})", dir.display(), state.epoch, state.step);
    Ok((model, optimizer, state))
}

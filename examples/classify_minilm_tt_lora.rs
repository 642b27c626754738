//! Library example: sentiment classification of the VADER movie-review snippets with
//! all-MiniLM-L6-v2 and TT-LoRA on query and value, through `tensor_peft::training::finetune`
//! (no CLI). A short run on 600 training examples (~2 minutes on 2 CPU cores, flex backend).
//!
//! ```sh
//! bash scripts/fetch-assets.sh
//! cargo run --example classify_minilm_tt_lora
//! ```

use burn::backend::{Autodiff, Flex};
use tensor_peft::adapters::MethodConfig;
use tensor_peft::training::{TaskKind, TrainConfig, finetune};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Reuse freed activation buffers instead of faulting in fresh pages every step (glibc).
    tensor_peft::allocator::keep_freed_memory();
    let mut method = MethodConfig::from_name("tt-lora")?;
    if let MethodConfig::TtLora(c) = &mut method {
        c.rank = 4;
        c.alpha = 16.0;
        c.tt_shape = Some(vec![4, 4, 4, 6, 6, 4, 4, 4]); // 384×384 as (4·4·4·6)×(6·4·4·4)
    }
    let config = TrainConfig {
        model: "assets/all-minilm-l6-v2".into(),
        task: TaskKind::Classification,
        train: "builtin:vader-movie-reviews".into(),
        valid_percent: 5,
        test_percent: 5,
        max_train_examples: Some(600),
        target_modules: Some(vec!["query".into(), "value".into()]),
        method,
        epochs: 1,
        batch_size: 32,
        lr: Some(5e-3),
        head_lr: Some(1e-3),
        max_len: 64,
        seed: 1234,
        output: "runs/example-minilm-tt-lora".into(),
        overwrite: true,
        ..TrainConfig::default()
    };
    let report = finetune::<Autodiff<Flex>>(&config, &Default::default())?;
    println!(
        "{} adapter parameters ({} with the head), test accuracy {:.4}, adapter written to {}",
        report.adapter_params,
        report.trainable_params,
        report.test.as_ref().and_then(|t| t.get("accuracy").copied()).unwrap_or(f64::NAN),
        report.output.display()
    );
    Ok(())
}

//! Library example: instruction tuning of SmolLM2-135M-Instruct (GGUF) on the chatterbot-corpus
//! conversations with LoRETTA_rep on q_proj and v_proj (loss on the assistant turns only), then a
//! generation with the trained adapter. A short run: 20 optimizer steps.
//!
//! ```sh
//! bash scripts/fetch-assets.sh
//! cargo run --example instruct_smollm2_loretta
//! ```

use burn::backend::{Autodiff, Flex};
use tensor_peft::adapters::MethodConfig;
use tensor_peft::training::{GenerateOptions, TaskKind, TrainConfig, finetune, generate};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Reuse freed activation buffers instead of faulting in fresh pages every step (glibc).
    tensor_peft::allocator::keep_freed_memory();
    let model = std::path::PathBuf::from("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let config = TrainConfig {
        model: model.clone(),
        task: TaskKind::CausalLm,
        train: "builtin:chatterbot".into(),
        valid_percent: 5,
        method: MethodConfig::from_name("loretta-rep")?,
        output: "runs/example-smollm2-loretta".into(),
        overwrite: true,
        // 20 optimizer steps, well inside the first epoch.
        max_steps: Some(20),
        batch_size: 4,
        lr: Some(2e-3),
        max_len: 96,
        seed: 7,
        ..TrainConfig::default()
    };
    let report = finetune::<Autodiff<Flex>>(&config, &Default::default())?;
    println!("{} trained parameters; validation history: {:?}", report.trainable_params, report.history);
    let options = GenerateOptions {
        base_dtype: Default::default(),
        prompt: "Hello, how are you?".into(),
        chat: true,
        max_new_tokens: 24,
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        adapters: tensor_peft::training::AdapterSelection::single(&report.output.join("last")),
    };
    println!("{}", generate::<Flex>(&model, &options, &Default::default())?);
    Ok(())
}

//! Library example: the same fine-tuning code on any Burn backend, picked at run time.
//! A tiny LLaMA (from the test fixtures) learns a copy task for 2 epochs on the chosen backend.
//!
//! ```sh
//! cargo run --example backend_switch -- flex        # or ndarray
//! cargo run --features wgpu --example backend_switch -- wgpu
//! cargo run --features cuda --example backend_switch -- cuda
//! ```

use burn::tensor::backend::AutodiffBackend;
use tensor_peft::adapters::MethodConfig;
use tensor_peft::training::{TaskKind, TrainConfig, finetune};

/// The backend-independent part: a function generic over the (autodiff) backend.
fn train<B: AutodiffBackend>(name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let fixtures = std::path::Path::new("tests/fixtures");
    let config = TrainConfig {
        model: fixtures.join("tiny-llama-words"),
        task: TaskKind::CausalLm,
        train: fixtures.join("lm-copy-train.jsonl"),
        valid: Some(fixtures.join("lm-copy-valid.jsonl")),
        method: MethodConfig::from_name("tt-lora")?,
        epochs: 2,
        batch_size: 8,
        lr: Some(5e-2),
        max_len: 32,
        output: format!("runs/example-backend-{name}").into(),
        overwrite: true,
        ..TrainConfig::default()
    };
    let report = finetune::<B>(&config, &Default::default())?;
    println!("{name}: best validation loss {:?}", report.best);
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Reuse freed activation buffers instead of faulting in fresh pages every step (glibc).
    tensor_peft::allocator::keep_freed_memory();
    let backend = std::env::args().nth(1).unwrap_or_else(|| "flex".into());
    match backend.as_str() {
        "flex" => train::<burn::backend::Autodiff<burn::backend::Flex>>("flex"),
        "ndarray" => train::<burn::backend::Autodiff<burn::backend::NdArray>>("ndarray"),
        #[cfg(feature = "wgpu")]
        "wgpu" => train::<burn::backend::Autodiff<burn::backend::Wgpu>>("wgpu"),
        #[cfg(feature = "cuda")]
        "cuda" => train::<burn::backend::Autodiff<burn::backend::Cuda>>("cuda"),
        other => Err(format!("backend `{other}` is unknown or not compiled in (see the cargo features)").into()),
    }
}

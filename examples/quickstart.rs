//! Library quick-start: adapt one frozen linear layer with TT-LoRA, train it a few steps toward a
//! target, then merge it for inference.
//!
//! `cargo run --example quickstart`

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module};
use burn::nn::LinearConfig;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::{Distribution, Tensor};
use tensor_peft::adapters::{AdaptedLinear, LinearAdapter, SharedFactors, TtLoraConfig};

type B = Autodiff<NdArray>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let device = Default::default();
    // Adapters draw their initial values from the run's generator (the same on every backend).
    tensor_peft::kernels::rng::seed::<B>(&device, 0);
    // A frozen 64→32 layer and a TT-LoRA update over the shape [8, 8 | 4, 8] (rank 4).
    let base = LinearConfig::new(64, 32).init::<B>(&device);
    let tt = TtLoraConfig::new().with_rank(4).with_tt_shape(Some(vec![8, 8, 4, 8])).init(64, 32, &device)?;
    let mut layer = AdaptedLinear::new(base, Some(LinearAdapter::TtLora(tt)))?;
    let shared = SharedFactors::empty();
    println!("trainable parameters: {}", layer.num_params() - layer.base.num_params());

    // Fit a target that differs from the base layer by a rank-2 update.
    let target_update = Tensor::<B, 2>::random([64, 2], Distribution::Normal(0.0, 0.2), &device)
        .matmul(Tensor::random([2, 32], Distribution::Normal(0.0, 0.2), &device));
    let mut optim = AdamConfig::new().init::<B, AdaptedLinear<B>>();
    for step in 0..=100 {
        let x = Tensor::<B, 2>::random([32, 64], Distribution::Normal(0.0, 1.0), &device);
        let target = layer.base.forward(x.clone()) + x.clone().matmul(target_update.clone());
        let loss = (layer.forward(x, &shared) - target).powf_scalar(2.0).mean();
        if step % 25 == 0 {
            println!("step {step:3}: loss {:.5}", loss.clone().into_scalar());
        }
        let grads = GradientsParams::from_grads(loss.backward(), &layer);
        layer = optim.step(1e-2, layer, grads);
    }

    // Merge for zero-overhead inference: same outputs, plain linear layer cost.
    let layer = layer.valid();
    let x = Tensor::<NdArray, 2>::random([4, 64], Distribution::Normal(0.0, 1.0), &device);
    let adapted = layer.forward(x.clone(), &SharedFactors::empty());
    let merged = layer.merge(&SharedFactors::empty())?;
    let diff = (merged.forward(x, &SharedFactors::empty()) - adapted).abs().max().into_scalar();
    println!("max |merged - adapted| = {diff:.2e}");
    Ok(())
}

//! GFLOP/s of the frozen base's products at LLaMA-2-7B shapes, `--compute-dtype f32` (today's
//! path: the weight widened a panel at a time, `gemm`'s f32 kernels) against `bf16` (the
//! AVX512-BF16 GEMM of `bf16_gemm`), back to back in one process so that the machine's load
//! affects both alike. Forward `y = x·W` through `fused::linear` on flex; backward `dX = dY·Wᵀ`
//! as the autodiff step of the same op (the rest of that backward is a sum's broadcast).
//!
//! `cargo run --release -p tensor-peft-kernels --features flex --example bf16_linear_bench -- [q8_0|bf16] [rows,...] [repeats] [bf16-only]`
//!
//! With `bf16-only` the f32 products are skipped (their column prints 0): quicker, for comparing
//! two builds of the bf16 GEMM.

use burn::backend::{Autodiff, Flex};
use burn::tensor::{DType, Tensor, TensorData};
use std::time::Instant;
use tensor_peft_kernels::fused::{BlockMatrix, FrozenMatrix, linear};
use tensor_peft_kernels::quant::BlockFormat;
use tensor_peft_kernels::{ComputeDType, with_compute_dtype};

type B = Autodiff<Flex>;

mod common;

/// The examples' deterministic values at this benchmark's scale.
fn values(n: usize, seed: u64) -> Vec<f32> {
    common::values(n, seed, 0.1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let storage = args.first().map(String::as_str).unwrap_or("q8_0").to_string();
    let rows: Vec<usize> =
        args.get(1).map(|s| s.split(',').map(|r| r.parse().expect("rows")).collect()).unwrap_or(vec![128, 512]);
    let repeats: usize = args.get(2).map(|r| r.parse().expect("repeats")).unwrap_or(3);
    let dtypes: &[ComputeDType] = match args.get(3).map(String::as_str) {
        Some("bf16-only") => &[ComputeDType::Bf16],
        None => &[ComputeDType::F32, ComputeDType::Bf16],
        Some(other) => panic!("fourth argument {other}: bf16-only or nothing"),
    };
    let device = Default::default();
    println!(
        "storage {storage}; kernel {:?}; threads {}",
        tensor_peft_kernels::bf16_gemm::Kernel::detect(),
        rayon::current_num_threads()
    );
    println!(
        "{:>5} {:>6} {:>6} {:>4} {:>12} {:>12} {:>7}",
        "m", "d_in", "d_out", "dir", "f32 GFLOP/s", "bf16 GFLOP/s", "ratio"
    );
    for (d_in, d_out) in [(4096, 4096), (4096, 11008), (11008, 4096)] {
        let w_rows = values(d_in * d_out, 7); // Wᵀ: [d_out, d_in]
        let weight: FrozenMatrix<B> = match storage.as_str() {
            "q8_0" => BlockMatrix::quantize_rows(&w_rows, BlockFormat::Q8_0, d_in, d_out, &device).unwrap().into(),
            "bf16" => Tensor::<B, 2>::from_data(TensorData::new(w_rows.clone(), [d_out, d_in]), &device)
                .cast(DType::BF16)
                .transpose()
                .into(),
            other => panic!("storage {other}: q8_0 or bf16"),
        };
        drop(w_rows);
        for &m in &rows {
            let x = Tensor::<B, 2>::from_data(TensorData::new(values(m * d_in, 3), [m, d_in]), &device);
            let flops = 2.0 * (m * d_in * d_out) as f64;
            // (forward, backward) best seconds for each dtype, alternating.
            let mut best = [[f64::INFINITY; 2]; 2];
            for _ in 0..repeats {
                for &dtype in dtypes {
                    let i = usize::from(dtype == ComputeDType::Bf16);
                    with_compute_dtype(dtype, || {
                        let x = x.clone().require_grad();
                        let start = Instant::now();
                        let y = linear(x.clone(), weight.clone(), None);
                        let _ = y.clone().inner().into_data();
                        best[i][0] = best[i][0].min(start.elapsed().as_secs_f64());
                        let loss = y.sum();
                        let start = Instant::now();
                        let grads = loss.backward();
                        let _ = x.grad(&grads).expect("dX").into_data();
                        best[i][1] = best[i][1].min(start.elapsed().as_secs_f64());
                    });
                }
            }
            for (dir, name) in ["fwd", "bwd"].into_iter().enumerate() {
                // An untimed dtype's best stays infinite: 0 GFLOP/s.
                let (old, new) = (flops / best[0][dir] / 1e9, flops / best[1][dir] / 1e9);
                println!("{m:>5} {d_in:>6} {d_out:>6} {name:>4} {old:>12.1} {new:>12.1} {:>6.2}x", new / old);
            }
        }
    }
}

//! GFLOP/s of `bf16_gemm::matmul` alone (no Burn op around it) at LLaMA-2-7B shapes over a Q8_0
//! weight: the forward product `x·W` (the weight's stored rows are columns of `B`) and the
//! backward `dY·Wᵀ` (stored rows are rows of `B`), best of `repeats`. For comparing builds of the
//! GEMM back to back.
//!
//! `cargo run --release -p tensor-peft-kernels --example bf16_gemm_bench -- [rows,...] [repeats]`

use std::time::Instant;
use tensor_peft_kernels::bf16_gemm::{Kernel, Lhs, Weight, matmul};
use tensor_peft_kernels::quant::BlockFormat;

mod common;

/// The examples' deterministic values at this benchmark's scale.
fn values(n: usize, seed: u64) -> Vec<f32> {
    common::values(n, seed, 0.1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows: Vec<usize> =
        args.first().map(|s| s.split(',').map(|r| r.parse().expect("rows")).collect()).unwrap_or(vec![128, 512]);
    let repeats: usize = args.get(1).map(|r| r.parse().expect("repeats")).unwrap_or(3);
    let kernel = Kernel::detect();
    println!("kernel {kernel:?}; threads {}", rayon::current_num_threads());
    println!("{:>5} {:>6} {:>6} {:>4} {:>10}", "m", "d_in", "d_out", "dir", "GFLOP/s");
    let mut total = [0.0f64; 2];
    for (d_in, d_out) in [(4096, 4096), (4096, 11008), (11008, 4096)] {
        // The weight as `[d_out, d_in]` rows of Q8_0 blocks (as GGUF stores `W`).
        let w = values(d_in * d_out, 7);
        let mut bytes = vec![0u8; BlockFormat::Q8_0.row_bytes(d_in) * d_out];
        BlockFormat::Q8_0.quantize(&w, &mut bytes).expect("quantize");
        drop(w);
        for &m in &rows {
            let flops = 2.0 * (m * d_in * d_out) as f64;
            // Forward: x [m, d_in] · W [d_in, d_out]; backward: dY [m, d_out] · Wᵀ [d_out, d_in].
            for (dir, (k, n, rows_are_columns)) in [(d_in, d_out, true), (d_out, d_in, false)].into_iter().enumerate() {
                let a = values(m * k, 3);
                let lhs = Lhs { data: &a, offset: 0, rows: m, cols: k, row_stride: k, col_stride: 1 };
                let b = Weight::Blocks { bytes: &bytes, format: BlockFormat::Q8_0, rows_are_columns };
                let mut out = vec![0.0f32; m * n];
                let mut best = f64::INFINITY;
                for _ in 0..repeats {
                    let start = Instant::now();
                    matmul(kernel, lhs, b, n, &mut out, false);
                    best = best.min(start.elapsed().as_secs_f64());
                }
                total[dir] += best;
                let name = ["fwd", "bwd"][dir];
                println!("{m:>5} {d_in:>6} {d_out:>6} {name:>4} {:>10.1}", flops / best / 1e9);
            }
        }
    }
    println!("total seconds: fwd {:.4} bwd {:.4}", total[0], total[1]);
}

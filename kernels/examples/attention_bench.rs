//! Milliseconds of the causal attention kernel, forward and backward, at LLaMA-2-7B's shape (32
//! heads of 128, one sequence) with f32 products against bf16 products (`--compute-dtype bf16`),
//! alternated in one process so that the machine's load affects both alike; best of the repeats.
//!
//! `cargo run --release -p tensor-peft-kernels --example attention_bench -- [tokens,...] [repeats]`

use std::time::Instant;
use tensor_peft_kernels::ComputeDType;
use tensor_peft_kernels::attention::{AttentionShape, Mask, attention_backward, attention_forward};

mod common;

/// The examples' deterministic values at this benchmark's scale.
fn values(n: usize, seed: u64) -> Vec<f32> {
    common::values(n, seed, 2.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let tokens: Vec<usize> =
        args.first().map(|s| s.split(',').map(|t| t.parse().expect("tokens")).collect()).unwrap_or(vec![128, 512]);
    let repeats: usize = args.get(1).map(|r| r.parse().expect("repeats")).unwrap_or(5);
    let (heads, head_dim) = (32, 128);
    println!("threads {}", rayon::current_num_threads());
    println!("{:>6} {:>4} {:>9} {:>9} {:>7}", "tokens", "dir", "f32 ms", "bf16 ms", "ratio");
    for &t in &tokens {
        let s = AttentionShape { batch: 1, q_len: t, kv_len: t, heads, kv_heads: heads, head_dim };
        let n = t * heads * head_dim;
        let (q, k, v, grad) = (values(n, 1), values(n, 2), values(n, 3), values(n, 4));
        let mask = Mask::Causal { offset: 0, window: None };
        let scale = 1.0 / (head_dim as f32).sqrt();
        let (mut out, mut lse) = (vec![0.0; n], vec![0.0; heads * t]);
        let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        // (forward, backward) best seconds for f32, bf16.
        let mut best = [[f64::INFINITY; 2]; 2];
        for _ in 0..repeats {
            for (i, dtype) in [ComputeDType::F32, ComputeDType::Bf16].into_iter().enumerate() {
                let start = Instant::now();
                attention_forward(&q, &k, &v, s, mask, scale, dtype, &mut out, &mut lse);
                best[i][0] = best[i][0].min(start.elapsed().as_secs_f64());
                let start = Instant::now();
                attention_backward(&q, &k, &v, &lse, &grad, s, mask, scale, dtype, &mut dq, &mut dk, &mut dv);
                best[i][1] = best[i][1].min(start.elapsed().as_secs_f64());
            }
        }
        for (dir, name) in ["fwd", "bwd"].into_iter().enumerate() {
            let (old, new) = (best[0][dir] * 1e3, best[1][dir] * 1e3);
            println!("{t:>6} {name:>4} {old:>9.2} {new:>9.2} {:>6.2}x", old / new);
        }
    }
}

//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling with a
//! seeded generator (the same seed gives the same text).

use burn::tensor::{Tensor, backend::Backend};

/// Decoding strategy.
#[derive(Debug, Clone)]
pub struct Sampler {
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (1.0 keeps all).
    pub top_p: f64,
    state: u64,
}

impl Sampler {
    /// A sampler; `temperature = 0` is greedy decoding.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Self { temperature, top_p, state: seed ^ 0x9E37_79B9_7F4A_7C15 }
    }

    fn uniform(&mut self) -> f64 {
        // SplitMix64.
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token id for logits `[vocab]`.
    pub fn pick<B: Backend>(&mut self, logits: Tensor<B, 1>) -> u32 {
        let values: Vec<f64> = logits.into_data().convert::<f64>().to_vec::<f64>().unwrap_or_default();
        self.pick_from(&values)
    }

    /// The next token id for logits given as numbers.
    pub fn pick_from(&mut self, logits: &[f64]) -> u32 {
        let argmax = || logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i as u32);
        if self.temperature <= 0.0 {
            return argmax();
        }
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(usize, f64)> =
            logits.iter().enumerate().map(|(i, &l)| (i, ((l - max) / self.temperature).exp())).collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (k, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.top_p {
                cut = k + 1;
                break;
            }
        }
        let probs = &probs[..cut];
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.uniform() * mass;
        for &(i, p) in probs {
            r -= p;
            if r <= 0.0 {
                return i as u32;
            }
        }
        probs.last().map_or_else(argmax, |p| p.0 as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_p_and_seeds() {
        let logits = [0.0, 3.0, 1.0, 2.9];
        assert_eq!(Sampler::new(0.0, 1.0, 1).pick_from(&logits), 1);
        // top-p small enough keeps only the best token.
        assert!((0..50).all(|s| Sampler::new(1.0, 0.01, s).pick_from(&logits) == 1));
        // With top-p 1 both near-best tokens are drawn, reproducibly per seed.
        let draws: Vec<u32> = (0..200).map(|s| Sampler::new(1.0, 1.0, s).pick_from(&logits)).collect();
        assert!(draws.contains(&1) && draws.contains(&3));
        assert_eq!(draws, (0..200).map(|s| Sampler::new(1.0, 1.0, s).pick_from(&logits)).collect::<Vec<_>>());
    }
}

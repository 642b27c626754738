//! An estimate of a fine-tuning run's peak memory from the architecture alone, without building
//! the model (`tpeft plan`, and the check `tpeft finetune` makes before it loads a model).
//!
//! The components are counted exactly where they can be (frozen weights at the base dtype,
//! adapter state) and modelled where they cannot (the activations the backward pass keeps, the
//! loss's logits chunk, the process's own overhead). The activation model and the overhead were
//! fitted to peak RSS measured on this project's CPU runs (docs/design.md lists them); on those the
//! estimate is within 15 % (most within 10 %).

use tensor_peft_models::precision::{Held, StoredDType};
use tensor_peft_models::{ArchSpec, BaseDType, Family};

/// f32 activations and adapter state.
const F32: u64 = 4;
/// The chunked loss's logits chunk (elements), as `linear_cross_entropy` takes it.
const LOSS_CHUNK_ELEMENTS: u64 = 1 << 24;
/// The f32 panel a half-precision or quantized weight is widened into per product (bytes).
const PANEL_BYTES: u64 = 16 << 20;
/// The process itself: code, tokenizer, data, allocator slack (fitted).
const RUNTIME_BYTES: u64 = 40 << 20;

/// One line of the estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRow {
    /// What it is.
    pub component: String,
    /// Bytes.
    pub bytes: u64,
}

/// The estimate: its components and their sum.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    /// The components, in the order they are printed.
    pub rows: Vec<PlanRow>,
}

impl MemoryPlan {
    /// The estimated peak in bytes.
    pub fn total(&self) -> u64 {
        self.rows.iter().map(|r| r.bytes).sum()
    }

    /// The estimated peak in MiB, rounded up.
    pub fn total_mib(&self) -> u64 {
        self.total().div_ceil(1 << 20)
    }

    /// The table `tpeft plan` prints, ending with `estimated peak memory: N MiB`.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.component.len()).max().unwrap_or(9).max(9);
        let mut out = format!("{:<width$}  {:>10}\n", "component", "MiB");
        for row in &self.rows {
            out.push_str(&format!("{:<width$}  {:>10.1}\n", row.component, row.bytes as f64 / (1 << 20) as f64));
        }
        out.push_str(&format!("estimated peak memory: {} MiB\n", self.total_mib()));
        out
    }
}

/// What a run is planned for.
#[derive(Debug, Clone)]
pub struct PlanRequest<'a> {
    /// The architecture.
    pub spec: &'a ArchSpec,
    /// The base dtype asked for.
    pub base: BaseDType,
    /// What the checkpoint stores the projections as (for `native`).
    pub stored: StoredDType,
    /// Trainable parameters (adapters, and a task head or norms if trained).
    pub trainable_params: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Tokens per example.
    pub max_len: usize,
    /// Whether the loss is over the vocabulary (causal LM) rather than a small head.
    pub vocabulary_loss: bool,
    /// Gradient checkpointing ([`crate::recompute`]): the backward keeps each block's input and
    /// one block's activations at a time instead of every block's.
    pub gradient_checkpointing: bool,
}

/// Bytes of one weight held as `held`.
fn weight_bytes(held: Held, weights: u64) -> u64 {
    match held {
        Held::Values(dtype) => weights * dtype.size() as u64,
        Held::Blocks(format) => weights / format.block_len() as u64 * format.block_bytes() as u64,
    }
}

/// The estimate for `request`; an error says why the base cannot be held so (rows that are not
/// whole blocks).
pub fn plan(request: &PlanRequest) -> Result<MemoryPlan, String> {
    let spec = request.spec;
    let held = request.base.projection(request.stored);
    let embedding_dtype = request.base.embedding(request.stored, true);
    let sites = spec.linear_sites();
    // Only blocks quantized here can fail to fit the rows: `native` keeps a GGUF file's own blocks,
    // which the reader has checked, and a file may store other sites in other formats (llama.cpp
    // falls back from a K-quant to a 32-weight format where rows are not whole 256-weight blocks).
    let quantized_here = request.base != BaseDType::Native;
    if let (true, Held::Blocks(format)) = (quantized_here, held)
        && let Some(site) = sites.iter().find(|s| !s.d_in.is_multiple_of(format.block_len()))
    {
        return Err(format!(
            "--base-dtype {}: {} has rows of {} weights, not whole {}-weight {} blocks",
            request.base,
            site.name,
            site.d_in,
            format.block_len(),
            format.name()
        ));
    }
    let projections: u64 = sites.iter().map(|s| (s.d_in * s.d_out) as u64).sum();
    let (d, layers, vocab) = (spec.hidden as u64, spec.layers as u64, spec.vocab as u64);
    let embeddings: u64 = match spec.family {
        Family::Llama => vocab * d * if spec.tie_embeddings { 1 } else { 2 },
        Family::Bert => (vocab + spec.positions as u64 + spec.type_vocab as u64) * d + d * d,
        Family::Deberta => {
            let relative = spec.relative.as_ref().map_or(0, |r| 2 * r.span as u64);
            (vocab + spec.positions as u64 + spec.type_vocab as u64 + relative) * d
        }
    };
    let other = spec.base_num_params() as u64 - projections - embeddings;
    let tokens = (request.batch_size * request.max_len) as u64;
    // Per token and block, what the backward keeps (f32): the block's inputs and normed inputs,
    // the attention's queries, keys and values and the MLP's gate and up outputs. The CPU
    // attention kernel keeps one log-sum-exp per query and head, not the probabilities (its
    // backward recomputes them).
    let kv_width = (spec.kv_heads * spec.head_dim) as u64;
    let (heads, intermediate, len) = (spec.heads as u64, spec.intermediate as u64, request.max_len as u64);
    let per_token = match spec.family {
        Family::Llama => 4 * d + 2 * kv_width + 2 * intermediate + heads,
        Family::Bert => 6 * d + 2 * intermediate + heads,
        // Disentangled attention also keeps the c2p and p2c scores, gathered and not.
        Family::Deberta => 6 * d + 2 * intermediate + 5 * heads * len,
    };
    let mut rows = vec![
        PlanRow {
            component: format!("frozen projections ({})", held_name(held)),
            bytes: weight_bytes(held, projections),
        },
        PlanRow {
            component: format!("embeddings and output head ({})", format!("{embedding_dtype:?}").to_lowercase()),
            bytes: embeddings * embedding_dtype.size() as u64,
        },
        PlanRow { component: "norms and biases (f32)".into(), bytes: other * F32 },
        PlanRow {
            component: "trainable parameters, gradients, AdamW state (f32)".into(),
            bytes: request.trainable_params as u64 * F32 * 4,
        },
        if request.gradient_checkpointing {
            PlanRow {
                component: format!("activations, checkpointed: block inputs + one block ({tokens} tokens)"),
                bytes: tokens * (layers * d + per_token) * F32,
            }
        } else {
            PlanRow {
                component: format!("activations kept for the backward ({tokens} tokens)"),
                bytes: tokens * layers * per_token * F32,
            }
        },
    ];
    if request.vocabulary_loss {
        let chunk_rows = (LOSS_CHUNK_ELEMENTS / vocab.max(1)).max(1).min(tokens);
        rows.push(PlanRow {
            component: "loss: logits chunk and its gradient".into(),
            bytes: chunk_rows * vocab * F32 * 2,
        });
    }
    if held != Held::Values(burn::tensor::DType::F32) {
        rows.push(PlanRow { component: "dequantized weight panel".into(), bytes: PANEL_BYTES });
    }
    rows.push(PlanRow { component: "process (code, tokenizer, data)".into(), bytes: RUNTIME_BYTES });
    Ok(MemoryPlan { rows })
}

fn held_name(held: Held) -> String {
    match held {
        Held::Values(dtype) => format!("{dtype:?}").to_lowercase(),
        Held::Blocks(format) => format.name().to_lowercase(),
    }
}

/// Memory the OS reports available (`MemAvailable`), in bytes; `None` where it cannot be read.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(spec: &ArchSpec, base: BaseDType) -> PlanRequest<'_> {
        PlanRequest {
            spec,
            base,
            stored: StoredDType::F32,
            trainable_params: 4_194_304,
            batch_size: 1,
            max_len: 128,
            vocabulary_loss: true,
            gradient_checkpointing: false,
        }
    }

    #[test]
    fn weights_are_counted_exactly_at_the_base_dtype() {
        let spec = ArchSpec::preset("llama2-7b").unwrap();
        let f32_plan = plan(&request(&spec, BaseDType::F32)).unwrap();
        let weights: u64 = f32_plan.rows[..3].iter().map(|r| r.bytes).sum();
        assert_eq!(weights, spec.base_num_params() as u64 * 4);
        let q8 = plan(&request(&spec, BaseDType::Q8_0)).unwrap();
        let projections: u64 = spec.linear_sites().iter().map(|s| (s.d_in * s.d_out) as u64).sum();
        assert_eq!(q8.rows[0].bytes, projections / 32 * 34);
        assert_eq!(q8.rows[1].bytes, 2 * 32_000 * 4096 * 2, "bf16 embeddings and head");
        assert_eq!(q8.rows[3].bytes, 4_194_304 * 16);
        assert!(q8.render().ends_with(&format!("estimated peak memory: {} MiB\n", q8.total_mib())));
        // The measured 7B q8_0 step (8,601 MiB, BENCHMARKS.md) within 15 %.
        let measured = 8601.0;
        assert!((q8.total_mib() as f64 / measured - 1.0).abs() < 0.15, "{}", q8.total_mib());
        // Rows that are not whole blocks are refused.
        let mut odd = spec.clone();
        odd.intermediate = 11000;
        let err = plan(&request(&odd, BaseDType::Q4_0)).unwrap_err();
        assert!(err.contains("down_proj") && err.contains("11000"), "{err}");
        // `native` of a Q4_K file: 144 bytes a 256-weight super-block, and no refusal of rows
        // that a file would store in another format (the reader has checked its own blocks).
        let q4_k = StoredDType::Blocks(tensor_peft_adapters::BlockFormat::Q4_K);
        let native = plan(&PlanRequest { stored: q4_k, ..request(&spec, BaseDType::Native) }).unwrap();
        assert_eq!(native.rows[0].bytes, projections / 256 * 144);
        assert!(plan(&PlanRequest { stored: q4_k, ..request(&odd, BaseDType::Native) }).is_ok());
    }

    #[test]
    fn checkpointing_keeps_the_block_inputs_and_one_block() {
        let spec = ArchSpec::preset("llama2-7b").unwrap();
        let long = PlanRequest { max_len: 512, ..request(&spec, BaseDType::Q8_0) };
        let plain = plan(&long).unwrap();
        let checkpointed = plan(&PlanRequest { gradient_checkpointing: true, ..long }).unwrap();
        let (a, b) = (&plain.rows[4], &checkpointed.rows[4]);
        assert!(b.component.contains("checkpointed"), "{}", b.component);
        // 512 tokens × (32 blocks × 4096 + one block's 4·4096 + 2·4096 + 2·11008 + 32) × 4 bytes.
        let per_block = 4 * 4096 + 2 * 4096 + 2 * 11008 + 32;
        assert_eq!(b.bytes, 512 * (32 * 4096 + per_block) * 4);
        assert_eq!(a.bytes, 512 * 32 * per_block * 4);
        assert_eq!(plain.total() - checkpointed.total(), a.bytes - b.bytes);
        assert!(checkpointed.render().ends_with(&format!("estimated peak memory: {} MiB\n", checkpointed.total_mib())));
    }
}

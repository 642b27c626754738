//! Architecture descriptions: enough of a transformer's shape to name its modules, place adapters
//! and count parameters, without allocating weights (a 70B count takes microseconds).

use crate::error::ModelError;
use crate::layout::{Projection, residual_name};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tensor_peft_adapters::{AttentionGeometry, AttentionMatrix, LinearSite, ResidualPosition, ResidualSite};
use tensor_peft_kernels::rope::{RopeConfig, RopeScaling};

/// Model family: which module names and block layout apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaMA-2/3 style decoder (RMSNorm, SwiGLU MLP, GQA, no biases).
    Llama,
    /// BERT/RoBERTa encoder (post-LN blocks, biases, pooler).
    Bert,
    /// DeBERTa-v2/v3 encoder: BERT's blocks with disentangled (content/relative-position)
    /// attention ([`DisentangledAttention`]) and a GELU context pooler.
    Deberta,
}

impl Family {
    /// Lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::Deberta => "deberta-v2",
        }
    }

    /// Whether the family is an encoder (classification and regression heads).
    pub fn is_encoder(&self) -> bool {
        matches!(self, Family::Bert | Family::Deberta)
    }

    /// The family's layout table: the adaptable projections of one block.
    pub fn layout(&self) -> &'static [Projection] {
        match self {
            Family::Llama => crate::llama::LAYOUT,
            Family::Bert => crate::bert::LAYOUT,
            Family::Deberta => crate::deberta::LAYOUT,
        }
    }

    /// The positions in a block where the family's forward applies a residual adapter.
    pub fn residual_positions(&self) -> &'static [ResidualPosition] {
        match self {
            Family::Llama => crate::llama::RESIDUAL_POSITIONS,
            Family::Bert | Family::Deberta => crate::bert::RESIDUAL_POSITIONS,
        }
    }

    /// The HF path of block `layer` (`model.layers.3`, `encoder.layer.3`).
    pub fn block_path(&self, layer: usize) -> String {
        match self {
            Family::Llama => format!("model.layers.{layer}"),
            Family::Bert | Family::Deberta => format!("encoder.layer.{layer}"),
        }
    }
}

/// The shape of a transformer, from a preset or an HF `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSpec {
    /// Family (module layout).
    pub family: Family,
    /// Where the description came from (preset name or file).
    pub source: String,
    /// Model width `d`.
    pub hidden: usize,
    /// Feed-forward width.
    pub intermediate: usize,
    /// Number of blocks `L`.
    pub layers: usize,
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads (GQA when fewer than `heads`).
    pub kv_heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// Learned position embeddings (BERT family); 0 for rotary models.
    pub positions: usize,
    /// Token-type vocabulary (BERT family).
    pub type_vocab: usize,
    /// Whether `lm_head` shares the embedding matrix (LLaMA family).
    pub tie_embeddings: bool,
    /// Width of one attention head: `hidden / heads` unless the checkpoint says otherwise
    /// (`head_dim`, a GGUF file's `rope.dimension_count`).
    pub head_dim: usize,
    /// Rotary embedding: base θ and scaling (LLaMA family; unused by BERT).
    pub rope: RopeConfig,
    /// Mistral's sliding attention window: a query sees only the last this-many positions
    /// (itself included). `None`: every earlier position.
    pub sliding_window: Option<usize>,
    /// DeBERTa's relative-position attention (`None` for the other families, and for a DeBERTa
    /// config with `relative_attention` off).
    pub relative: Option<DisentangledAttention>,
    /// Where transformers' task models hold this base model, as a module-name prefix
    /// (`BertForSequenceClassification.bert` → `bert.`; `roberta.`, `deberta.`): PEFT names adapter
    /// tensors of encoders with it. Empty for the LLaMA family, whose names start with `model.`.
    pub base_prefix: &'static str,
    /// Epsilon of the RMSNorm (LLaMA) or LayerNorm (BERT) layers.
    pub norm_eps: f64,
    /// Settings of the checkpoint that change the computation in ways these models do not
    /// implement (RoPE scaling, another activation, …): the models refuse to load it
    /// ([`ArchSpec::require_implemented`]), while counting parameters is unaffected.
    pub unimplemented: Vec<Unimplemented>,
}

/// DeBERTa's disentangled attention: content-to-position (`c2p`) and position-to-content (`p2c`)
/// scores from learned relative-position embeddings, as transformers' `DebertaV2` computes them
/// with `share_att_key` (the positions go through the layer's own query/key projections).
#[derive(Debug, Clone, PartialEq)]
pub struct DisentangledAttention {
    /// Relative distances `−span..span` have embeddings (`2·span` rows): `position_buckets`
    /// when bucketed, else `max_relative_positions`.
    pub span: usize,
    /// `position_buckets`: distances past half of them are log-bucketed up to `max_relative`.
    pub buckets: Option<usize>,
    /// `max_relative_positions` (`max_position_embeddings` when not set).
    pub max_relative: usize,
    /// Content-to-position scores (`"c2p"` in `pos_att_type`).
    pub c2p: bool,
    /// Position-to-content scores (`"p2c"`).
    pub p2c: bool,
    /// Whether the relative embeddings pass a LayerNorm (`norm_rel_ebd` has `layer_norm`).
    pub norm_embeddings: bool,
}

/// A checkpoint setting the models do not implement: loading would compute something else than
/// transformers does, so it is refused instead of silently ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct Unimplemented {
    /// The `config.json` field or GGUF metadata key.
    pub field: &'static str,
    /// Its value, as written.
    pub value: String,
    /// What is not implemented.
    pub reason: &'static str,
}

/// The largest size a `config.json` or GGUF field may give: far above any real model, it keeps
/// every size product inside `usize` and the per-layer site lists small, so a file claiming
/// billions of layers is refused instead of allocated.
pub(crate) fn size_limit(field: &str) -> u64 {
    if field.ends_with("num_hidden_layers") || field.ends_with("block_count") { 1 << 12 } else { 1 << 24 }
}

/// The RoPE settings as transformers reads them: the scaling dict is `rope_scaling` (the ≤ 4
/// spelling, which wins) or `rope_parameters` (≥ 5); θ is the dict's `rope_theta`, else the
/// top-level one, else 10000. A `rope_type` not implemented here is recorded in `unimplemented`;
/// a malformed value of an implemented one is an error.
fn rope_config(json: &Value, path: &Path, unimplemented: &mut Vec<Unimplemented>) -> Result<RopeConfig, ModelError> {
    let (field, params) = match json.get("rope_scaling").filter(|v| v.as_object().is_some_and(|o| !o.is_empty())) {
        Some(v) => ("rope_scaling", v),
        None => ("rope_parameters", json.get("rope_parameters").unwrap_or(&Value::Null)),
    };
    let err = |problem: String| ModelError::Field { path: path.to_path_buf(), field, problem };
    let params = match params {
        Value::Null => &serde_json::Map::new(),
        Value::Object(o) => o,
        v => return Err(err(format!("is {v}, expected an object"))),
    };
    let number = |key: &str, v: &Value| {
        v.as_f64()
            .filter(|x| x.is_finite() && *x > 0.0)
            .ok_or_else(|| err(format!("`{key}` is {v}, expected a positive number")))
    };
    let top_theta = match json.get("rope_theta") {
        None | Some(Value::Null) => 10000.0,
        Some(v) => v.as_f64().filter(|x| x.is_finite() && *x > 0.0).ok_or_else(|| ModelError::Field {
            path: path.to_path_buf(),
            field: "rope_theta",
            problem: format!("is {v}, expected a positive number"),
        })?,
    };
    let theta = match params.get("rope_theta").filter(|v| !v.is_null()) {
        Some(v) => number("rope_theta", v)?,
        None => top_theta,
    };
    let kind = match params.get("rope_type").or_else(|| params.get("type")).unwrap_or(&Value::Null) {
        Value::Null => "default",
        Value::String(s) => s.as_str(),
        v => return Err(err(format!("`rope_type` is {v}, expected a string"))),
    };
    // The keys each implemented type reads; any other key would be ignored, so it is refused.
    let keys: &[&str] = match kind {
        "default" => &[],
        "linear" | "dynamic" => &["factor"],
        "yarn" => &[
            "factor",
            "original_max_position_embeddings",
            "beta_fast",
            "beta_slow",
            "attention_factor",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ],
        "llama3" => &["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"],
        _ => {
            unimplemented.push(Unimplemented {
                field,
                value: Value::Object(params.clone()).to_string(),
                reason: "this RoPE type is not implemented (implemented: default, linear, dynamic, yarn, llama3)",
            });
            return Ok(RopeConfig { theta, scaling: RopeScaling::None });
        }
    };
    if let Some(key) = params
        .keys()
        .find(|k| !["rope_type", "type", "rope_theta"].contains(&k.as_str()) && !keys.contains(&k.as_str()))
    {
        if key == "partial_rotary_factor" && params[key].as_f64() == Some(1.0) {
            // Rotating the whole head is what the models do.
        } else {
            return Err(err(format!(
                "has `{key}` = {}, which the \"{kind}\" RoPE type here does not implement",
                params[key]
            )));
        }
    }
    let get = |key: &str| params.get(key).filter(|v| !v.is_null());
    let required = |key: &str| match get(key) {
        Some(v) => number(key, v),
        None => Err(err(format!("has no `{key}`, which the \"{kind}\" RoPE type requires"))),
    };
    let optional = |key: &str, default: f64| get(key).map_or(Ok(default), |v| number(key, v));
    let positions = |key: &'static str, v: &Value| {
        v.as_u64().filter(|&n| n > 0 && n <= 1 << 32).map(|n| n as usize).ok_or_else(|| ModelError::Field {
            path: path.to_path_buf(),
            field: key,
            problem: format!("is {v}, expected a positive integer"),
        })
    };
    let max_positions = match json.get("max_position_embeddings").filter(|v| !v.is_null()) {
        Some(v) => positions("max_position_embeddings", v)?,
        // transformers' defaults.
        None if json.get("model_type").and_then(Value::as_str) == Some("mistral") => 131072,
        None => 2048,
    };
    // transformers prefers a top-level `original_max_position_embeddings`, then the dict's, then
    // `max_position_embeddings`.
    let original = || match json.get("original_max_position_embeddings").filter(|v| !v.is_null()) {
        Some(v) => positions("original_max_position_embeddings", v),
        None => get("original_max_position_embeddings")
            .map_or(Ok(max_positions), |v| positions("original_max_position_embeddings", v)),
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: required("factor")? },
        "dynamic" => RopeScaling::Dynamic { factor: required("factor")?, max_positions },
        "yarn" => {
            let original_max_positions = original()?;
            let factor = match get("factor") {
                Some(v) => number("factor", v)?,
                None => max_positions as f64 / original_max_positions as f64,
            };
            let mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
            let attention_factor = match (get("attention_factor"), get("mscale"), get("mscale_all_dim")) {
                (Some(v), _, _) => number("attention_factor", v)?,
                (None, Some(m), Some(all)) if m.as_f64() != Some(0.0) && all.as_f64() != Some(0.0) => {
                    mscale(number("mscale", m)?) / mscale(number("mscale_all_dim", all)?)
                }
                _ => mscale(1.0),
            };
            let truncate = match get("truncate") {
                None => true,
                Some(v) => v.as_bool().ok_or_else(|| err(format!("`truncate` is {v}, expected true or false")))?,
            };
            RopeScaling::Yarn {
                factor,
                original_max_positions,
                beta_fast: optional("beta_fast", 32.0)?,
                beta_slow: optional("beta_slow", 1.0)?,
                attention_factor,
                truncate,
            }
        }
        _ => RopeScaling::Llama3 {
            factor: required("factor")?,
            low_freq_factor: required("low_freq_factor")?,
            high_freq_factor: required("high_freq_factor")?,
            original_max_positions: original()?,
        },
    };
    Ok(RopeConfig { theta, scaling })
}

/// The `config.json` fields that describe `rope` to transformers (`rope_scaling`, and
/// `max_position_embeddings` where the scaling reads it); an error for a GGUF file's per-frequency
/// factors, which no transformers RoPE type expresses.
pub fn rope_config_json(rope: &RopeConfig) -> Result<Vec<(&'static str, Value)>, String> {
    use serde_json::json;
    Ok(match &rope.scaling {
        RopeScaling::None => Vec::new(),
        RopeScaling::Linear { factor } => vec![("rope_scaling", json!({"rope_type": "linear", "factor": factor}))],
        RopeScaling::Dynamic { factor, max_positions } => vec![
            ("rope_scaling", json!({"rope_type": "dynamic", "factor": factor})),
            ("max_position_embeddings", json!(max_positions)),
        ],
        RopeScaling::Yarn { factor, original_max_positions, beta_fast, beta_slow, attention_factor, truncate } => {
            vec![(
                "rope_scaling",
                json!({"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original_max_positions,
                    "beta_fast": beta_fast, "beta_slow": beta_slow, "attention_factor": attention_factor,
                    "truncate": truncate}),
            )]
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => vec![(
            "rope_scaling",
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_positions}),
        )],
        RopeScaling::FrequencyFactors(_) => {
            return Err("the GGUF file's `rope_freqs` per-frequency RoPE factors have no transformers config \
                        equivalent, so the model cannot be exported as an HF directory"
                .into());
        }
    })
}

/// A DeBERTa-v2 `config.json`'s absolute positions, token types and disentangled attention, read
/// with `DebertaV2Config`'s defaults; settings these models do not implement go to `unimplemented`.
fn deberta_settings(
    json: &Value,
    path: &Path,
    hidden: usize,
    heads: usize,
    unimplemented: &mut Vec<Unimplemented>,
) -> Result<(usize, usize, Option<DisentangledAttention>), ModelError> {
    let field_err =
        |field: &'static str, problem: String| ModelError::Field { path: path.to_path_buf(), field, problem };
    let get = |field: &str| json.get(field).filter(|v| !v.is_null());
    let integer = |field: &'static str, default: i64| -> Result<i64, ModelError> {
        get(field).map_or(Ok(default), |v| {
            v.as_i64()
                .filter(|n| (-1..=1 << 24).contains(n))
                .ok_or_else(|| field_err(field, format!("is {v}, expected an integer (-1 for none)")))
        })
    };
    let flag = |field: &'static str, default: bool| -> Result<bool, ModelError> {
        get(field).map_or(Ok(default), |v| {
            v.as_bool().ok_or_else(|| field_err(field, format!("is {v}, expected true or false")))
        })
    };
    let mut refuse = |field: &'static str, value: &Value, reason: &'static str| {
        unimplemented.push(Unimplemented { field, value: value.to_string(), reason })
    };
    let max_positions = integer("max_position_embeddings", 512)?.max(0) as usize;
    let positions = if flag("position_biased_input", true)? { max_positions } else { 0 };
    let type_vocab = integer("type_vocab_size", 0)?.max(0) as usize;
    for (field, expected) in
        [("embedding_size", hidden), ("pooler_hidden_size", hidden), ("attention_head_size", hidden / heads)]
    {
        if let Some(v) = get(field).filter(|v| v.as_u64() != Some(expected as u64)) {
            refuse(field, v, "only the default width (hidden_size, or hidden_size / heads for a head) is implemented");
        }
    }
    if let Some(v) = get("conv_kernel_size").filter(|v| v.as_u64() != Some(0)) {
        refuse("conv_kernel_size", v, "DeBERTa-v2's convolution after the first layer is not implemented");
    }
    if let Some(v) = get("pooler_hidden_act").filter(|v| v.as_str() != Some("gelu")) {
        refuse("pooler_hidden_act", v, "the context pooler computes exact (erf) GELU only");
    }
    if !flag("relative_attention", false)? {
        return Ok((positions, type_vocab, None));
    }
    let kinds: Vec<String> = match get("pos_att_type") {
        None => Vec::new(),
        Some(Value::String(s)) => s.to_lowercase().split('|').map(|k| k.trim().to_string()).collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|k| k.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| field_err("pos_att_type", format!("is {a:?}, expected strings")))?,
        Some(v) => return Err(field_err("pos_att_type", format!("is {v}, expected e.g. \"p2c|c2p\""))),
    };
    if let Some(v) = get("pos_att_type").filter(|_| kinds.iter().any(|k| k != "c2p" && k != "p2c")) {
        refuse("pos_att_type", v, "only the c2p and p2c relative attention terms are implemented");
    }
    let (c2p, p2c) = (kinds.iter().any(|k| k == "c2p"), kinds.iter().any(|k| k == "p2c"));
    if (c2p || p2c) && !flag("share_att_key", false)? {
        let value = get("share_att_key").cloned().unwrap_or(Value::Bool(false));
        refuse("share_att_key", &value, "separate positional key/query projections are not implemented");
    }
    let max_relative = match integer("max_relative_positions", -1)? {
        n if n < 1 => max_positions,
        n => n as usize,
    };
    let buckets = match integer("position_buckets", -1)? {
        n if n > 0 => Some(n as usize),
        _ => None,
    };
    let norm_rel = get("norm_rel_ebd").map_or(Ok("none".to_string()), |v| {
        v.as_str().map(str::to_lowercase).ok_or_else(|| field_err("norm_rel_ebd", format!("is {v}, expected a string")))
    })?;
    let norm_kinds: Vec<&str> = norm_rel.split('|').map(str::trim).collect();
    if let Some(v) = get("norm_rel_ebd").filter(|_| norm_kinds.iter().any(|k| *k != "none" && *k != "layer_norm")) {
        refuse("norm_rel_ebd", v, "only `layer_norm` (or none) is implemented for the relative embeddings");
    }
    let span = buckets.unwrap_or(max_relative);
    if span == 0 || buckets.is_some_and(|b| b < 2 || max_relative < 2) {
        return Err(field_err(
            "position_buckets",
            format!("{buckets:?} buckets over {max_relative} positions cannot be bucketed"),
        ));
    }
    let relative = DisentangledAttention {
        span,
        buckets,
        max_relative,
        c2p,
        p2c,
        norm_embeddings: norm_kinds.contains(&"layer_norm"),
    };
    Ok((positions, type_vocab, Some(relative)))
}

/// The rotary embedding and the `config.json` settings that change the computation in ways the
/// models do not implement.
fn computation_settings(
    json: &Value,
    path: &Path,
    family: Family,
) -> Result<(RopeConfig, Vec<Unimplemented>), ModelError> {
    let mut unimplemented = Vec::new();
    let mut rope = RopeConfig::default();
    let mut refuse = |field: &'static str, value: &Value, reason: &'static str| {
        unimplemented.push(Unimplemented { field, value: value.to_string(), reason })
    };
    match family {
        Family::Llama => {
            if let Some(v) = json.get("hidden_act").filter(|v| v.as_str() != Some("silu")) {
                refuse("hidden_act", v, "LLaMA-family blocks compute SwiGLU with SiLU only");
            }
            rope = rope_config(json, path, &mut unimplemented)?;
        }
        Family::Bert | Family::Deberta => {
            if let Some(v) = json.get("hidden_act").filter(|v| v.as_str() != Some("gelu")) {
                refuse("hidden_act", v, "BERT-family blocks compute exact (erf) GELU only");
            }
            if let Some(v) = json.get("position_embedding_type").filter(|v| v.as_str() != Some("absolute")) {
                refuse("position_embedding_type", v, "only absolute position embeddings are implemented");
            }
        }
    }
    Ok((rope, unimplemented))
}

/// Preset names accepted by [`ArchSpec::preset`].
pub const PRESETS: [&str; 10] = [
    "llama2-7b",
    "llama2-13b",
    "llama2-70b",
    "llama3-8b",
    "llama3.2-1b",
    "mistral-7b",
    "roberta-base",
    "bert-base",
    "minilm-l6",
    "deberta-v3-base",
];

impl ArchSpec {
    /// A preset with the published HF `config.json` values.
    pub fn preset(name: &str) -> Option<Self> {
        let llama = |hidden, intermediate, layers, heads, kv_heads| ArchSpec {
            family: Family::Llama,
            source: name.to_string(),
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            vocab: 32000,
            positions: 0,
            type_vocab: 0,
            tie_embeddings: false,
            head_dim: hidden / heads,
            rope: RopeConfig::default(),
            sliding_window: None,
            relative: None,
            base_prefix: "",
            norm_eps: 1e-5,
            unimplemented: Vec::new(),
        };
        let bert = |hidden, intermediate, layers, heads, vocab, positions, type_vocab| ArchSpec {
            family: Family::Bert,
            base_prefix: if name == "roberta-base" { "roberta." } else { "bert." },
            vocab,
            positions,
            type_vocab,
            norm_eps: 1e-12,
            unimplemented: Vec::new(),
            ..llama(hidden, intermediate, layers, heads, heads)
        };
        Some(match name {
            "llama2-7b" => llama(4096, 11008, 32, 32, 32),
            "llama2-13b" => llama(5120, 13824, 40, 40, 40),
            "llama2-70b" => llama(8192, 28672, 80, 64, 8),
            // Meta-Llama-3-8B: 128K vocabulary, θ = 500000, 8K context without scaling.
            "llama3-8b" => ArchSpec {
                vocab: 128256,
                rope: RopeConfig { theta: 500000.0, scaling: RopeScaling::None },
                ..llama(4096, 14336, 32, 32, 8)
            },
            // Llama-3.2-1B: tied head, llama3 RoPE scaling for its 128K context.
            "llama3.2-1b" => ArchSpec {
                vocab: 128256,
                tie_embeddings: true,
                rope: RopeConfig {
                    theta: 500000.0,
                    scaling: RopeScaling::Llama3 {
                        factor: 32.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_positions: 8192,
                    },
                },
                ..llama(2048, 8192, 16, 32, 8)
            },
            // Mistral-7B-v0.1: GQA and a 4096-position sliding window.
            "mistral-7b" => ArchSpec { sliding_window: Some(4096), ..llama(4096, 14336, 32, 32, 8) },
            "roberta-base" => bert(768, 3072, 12, 12, 50265, 514, 1),
            "bert-base" => bert(768, 3072, 12, 12, 30522, 512, 2),
            "minilm-l6" => bert(384, 1536, 6, 12, 30522, 512, 2),
            // microsoft/deberta-v3-base: relative positions only (256 log buckets over 512).
            "deberta-v3-base" => ArchSpec {
                family: Family::Deberta,
                base_prefix: "deberta.",
                norm_eps: 1e-7,
                relative: Some(DisentangledAttention {
                    span: 256,
                    buckets: Some(256),
                    max_relative: 512,
                    c2p: true,
                    p2c: true,
                    norm_embeddings: true,
                }),
                ..bert(768, 3072, 12, 12, 128100, 0, 0)
            },
            _ => return None,
        })
    }

    /// A preset name, an HF model directory (its `config.json`), a `config.json` path, or a GGUF file.
    pub fn from_model_arg(arg: &str) -> Result<Self, ModelError> {
        if let Some(spec) = Self::preset(arg) {
            return Ok(spec);
        }
        let path = Path::new(arg);
        if path.is_dir() {
            Self::from_config_file(&path.join("config.json"))
        } else if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            crate::gguf::Gguf::open(path)?.arch_spec()
        } else if path.is_file() {
            Self::from_config_file(path)
        } else {
            Err(ModelError::UnknownModel(arg.to_string()))
        }
    }

    /// Reads an HF `config.json` (`model_type` llama/mistral or bert/roberta/xlm-roberta).
    pub fn from_config_file(path: &Path) -> Result<Self, ModelError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_path_buf(), source })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::Json { path: path.to_path_buf(), reason: e.to_string() })?;
        Self::from_config_json(&json, path)
    }

    /// Parses a `config.json` value; `path` is used in error messages.
    pub fn from_config_json(json: &Value, path: &Path) -> Result<Self, ModelError> {
        let field_err =
            |field: &'static str, problem: String| ModelError::Field { path: PathBuf::from(path), field, problem };
        let count = |field: &'static str| -> Result<usize, ModelError> {
            let max = size_limit(field);
            match json.get(field) {
                None => Err(field_err(field, "is missing (expected a positive integer)".into())),
                Some(v) => v
                    .as_u64()
                    .filter(|&n| n > 0 && n <= max)
                    .map(|n| n as usize)
                    .ok_or_else(|| field_err(field, format!("is {v}, expected a positive integer up to {max}"))),
            }
        };
        let optional = |field: &'static str, default: usize| -> Result<usize, ModelError> {
            if json.get(field).is_none_or(Value::is_null) { Ok(default) } else { count(field) }
        };
        let float = |field: &'static str, default: f64| -> Result<f64, ModelError> {
            match json.get(field) {
                None | Some(Value::Null) => Ok(default),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| field_err(field, format!("is {v}, expected a positive number"))),
            }
        };
        let model_type = match json.get("model_type") {
            Some(Value::String(s)) => s.as_str(),
            Some(v) => {
                return Err(field_err("model_type", format!("is {v}, expected a string")));
            }
            None => {
                return Err(field_err("model_type", "is missing (expected e.g. \"llama\" or \"bert\")".into()));
            }
        };
        let family = match model_type {
            "llama" | "mistral" => Family::Llama,
            "bert" | "roberta" | "xlm-roberta" => Family::Bert,
            "deberta-v2" => Family::Deberta,
            other => {
                return Err(field_err(
                    "model_type",
                    format!("is \"{other}\", expected one of llama, mistral, bert, roberta, xlm-roberta, deberta-v2"),
                ));
            }
        };
        let hidden = count("hidden_size")?;
        let heads = count("num_attention_heads")?;
        let kv_heads = optional("num_key_value_heads", heads)?;
        let explicit_head_dim = family == Family::Llama && json.get("head_dim").is_some_and(|v| !v.is_null());
        if hidden % heads != 0 && !explicit_head_dim {
            return Err(field_err(
                "num_attention_heads",
                format!("is {heads}, which does not divide hidden_size {hidden}"),
            ));
        }
        if heads % kv_heads != 0 {
            return Err(field_err(
                "num_key_value_heads",
                format!("is {kv_heads}, which does not divide num_attention_heads {heads}"),
            ));
        }
        for field in ["attention_bias", "mlp_bias"] {
            match json.get(field) {
                None | Some(Value::Null) | Some(Value::Bool(false)) => {}
                Some(v) => {
                    return Err(field_err(field, format!("is {v}; projections with biases are not implemented")));
                }
            }
        }
        let head_dim = match family {
            Family::Llama => optional("head_dim", hidden / heads)?,
            Family::Bert | Family::Deberta => hidden / heads,
        };
        if head_dim % 2 != 0 {
            return Err(field_err("head_dim", format!("is {head_dim}; rotary heads need an even width")));
        }
        let (rope, mut unimplemented) = computation_settings(json, path, family)?;
        let (positions, type_vocab, relative) = match family {
            Family::Llama => (0, 0, None),
            Family::Bert => (count("max_position_embeddings")?, optional("type_vocab_size", 2)?, None),
            Family::Deberta => deberta_settings(json, path, hidden, heads, &mut unimplemented)?,
        };
        // transformers' LlamaConfig has no window (a `sliding_window` there is never read);
        // MistralConfig defaults it to 4096 when absent, and null turns it off.
        let sliding_window = match (model_type, json.get("sliding_window")) {
            ("mistral", None) => Some(4096),
            ("mistral", Some(Value::Null)) => None,
            ("mistral", Some(v)) => {
                Some(v.as_u64().filter(|&w| w > 0).map(|w| w.min(usize::MAX as u64) as usize).ok_or_else(|| {
                    field_err("sliding_window", format!("is {v}, expected a positive integer or null"))
                })?)
            }
            _ => None,
        };
        let tie_embeddings = match json.get("tie_word_embeddings") {
            None | Some(Value::Null) => family.is_encoder(),
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(field_err("tie_word_embeddings", format!("is {v}, expected true or false")));
            }
        };
        Ok(ArchSpec {
            family,
            source: path.display().to_string(),
            hidden,
            intermediate: count("intermediate_size")?,
            layers: count("num_hidden_layers")?,
            heads,
            kv_heads,
            vocab: count("vocab_size")?,
            positions,
            type_vocab,
            tie_embeddings,
            head_dim,
            rope,
            sliding_window,
            relative,
            base_prefix: match model_type {
                "bert" => "bert.",
                "roberta" | "xlm-roberta" => "roberta.",
                "deberta-v2" => "deberta.",
                _ => "",
            },
            norm_eps: match family {
                Family::Llama => float("rms_norm_eps", 1e-6)?,
                Family::Bert => float("layer_norm_eps", 1e-12)?,
                // DebertaV2Config's default.
                Family::Deberta => float("layer_norm_eps", 1e-7)?,
            },
            unimplemented,
        })
    }

    /// Errors naming the first setting the models do not implement, if any
    /// ([`ArchSpec::unimplemented`]).
    pub fn require_implemented(&self) -> Result<(), ModelError> {
        match self.unimplemented.first() {
            None => Ok(()),
            Some(u) => Err(ModelError::Field {
                path: PathBuf::from(&self.source),
                field: u.field,
                problem: format!("is {}; {}", u.value, u.reason),
            }),
        }
    }

    /// The attention geometry LoRTA and the counters use.
    pub fn geometry(&self) -> AttentionGeometry {
        AttentionGeometry::new(self.layers, self.hidden, self.heads, self.kv_heads)
    }

    /// Parameters of the normalisation layers that `--train-norms` (LoRETTA's extra trainables)
    /// makes trainable: every RMSNorm scale of a LLaMA-family model (two per block and the final
    /// one), every LayerNorm scale and bias of an encoder (the embeddings' and two per block).
    pub fn norm_params(&self) -> usize {
        match self.family {
            Family::Llama => (2 * self.layers + 1) * self.hidden,
            Family::Bert | Family::Deberta => (2 * self.layers + 1) * 2 * self.hidden,
        }
    }

    /// Every linear projection of every block, in checkpoint order, with HF module names.
    pub fn linear_sites(&self) -> Vec<LinearSite> {
        (0..self.layers)
            .flat_map(|layer| {
                let block = self.family.block_path(layer);
                self.family.layout().iter().enumerate().map(move |(projection, row)| {
                    let (d_in, d_out) = (row.shape)(self);
                    LinearSite { name: format!("{block}.{}", row.name), layer, projection, role: row.role, d_in, d_out }
                })
            })
            .collect()
    }

    /// Every position of every block where the family's forward applies a residual adapter
    /// ([`Family::residual_positions`]); a method picks its own among them.
    pub fn residual_sites(&self) -> Vec<ResidualSite> {
        (0..self.layers)
            .flat_map(|layer| {
                self.family.residual_positions().iter().map(move |&position| ResidualSite {
                    name: format!("{}.{}", self.family.block_path(layer), residual_name(position)),
                    layer,
                    position,
                    hidden: self.hidden,
                })
            })
            .collect()
    }

    /// Sites matching `targets` with PEFT's list semantics: a target matches a module whose name
    /// equals it or ends with `.{target}` (so `output.dense` also matches `attention.output.dense`,
    /// as in PEFT). Every target must match something.
    pub fn select(&self, targets: &[String]) -> Result<Vec<LinearSite>, ModelError> {
        let sites = self.linear_sites();
        let matches = |name: &str, t: &str| name == t || name.ends_with(&format!(".{t}"));
        for t in targets {
            if !sites.iter().any(|s| matches(&s.name, t)) {
                return Err(ModelError::UnmatchedTarget {
                    target: t.clone(),
                    family: self.family.name(),
                    available: self.short_names().join(", "),
                });
            }
        }
        Ok(sites.into_iter().filter(|s| targets.iter().any(|t| matches(&s.name, t))).collect())
    }

    /// Sites whose full name matches `pattern` entirely (PEFT's regex targets).
    pub fn select_regex(&self, pattern: &str) -> Result<Vec<LinearSite>, ModelError> {
        let re = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| ModelError::BadTarget { target: pattern.to_string(), reason: e.to_string() })?;
        let sites: Vec<_> = self.linear_sites().into_iter().filter(|s| re.is_match(&s.name)).collect();
        if sites.is_empty() {
            return Err(ModelError::UnmatchedTarget {
                target: pattern.to_string(),
                family: self.family.name(),
                available: self.short_names().join(", "),
            });
        }
        Ok(sites)
    }

    /// Sites with the given attention roles (a method's defaults).
    pub fn select_roles(&self, roles: &[AttentionMatrix]) -> Vec<LinearSite> {
        self.linear_sites().into_iter().filter(|s| s.role.is_some_and(|r| roles.contains(&r))).collect()
    }

    /// The distinct per-layer module names (`q_proj`, `attention.output.dense`, …).
    pub fn short_names(&self) -> Vec<String> {
        self.family.layout().iter().map(|row| row.name.to_string()).collect()
    }

    /// Parameters of the base model (HF base model: LLaMA with `lm_head`, BERT with pooler).
    pub fn base_num_params(&self) -> usize {
        let d = self.hidden;
        let linear: usize = self.linear_sites().iter().map(|s| s.d_in * s.d_out).sum();
        match self.family {
            Family::Llama => {
                let embeddings = self.vocab * d * if self.tie_embeddings { 1 } else { 2 };
                embeddings + linear + self.layers * 2 * d + d
            }
            Family::Bert | Family::Deberta => {
                let biases: usize = self.linear_sites().iter().map(|s| s.d_out).sum();
                let embeddings = (self.vocab + self.positions + self.type_vocab) * d + 2 * d;
                let layer_norms = self.layers * 2 * 2 * d;
                // BertModel has a pooler; DebertaV2Model has the relative embeddings instead (its
                // context pooler belongs to the classification model).
                let extra = match &self.relative {
                    None if self.family == Family::Deberta => 0,
                    None => d * d + d,
                    Some(r) => 2 * r.span * d + if r.norm_embeddings { 2 * d } else { 0 },
                };
                embeddings + linear + biases + layer_norms + extra
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_parameter_counts_match_hf() {
        // Published totals: LLaMA-2-7B 6,738,415,616; RoBERTa-base 124,645,632; BERT-base
        // 109,482,240; all-MiniLM-L6-v2 22,713,216 (with pooler).
        assert_eq!(ArchSpec::preset("llama2-7b").unwrap().base_num_params(), 6_738_415_616);
        assert_eq!(ArchSpec::preset("llama2-13b").unwrap().base_num_params(), 13_015_864_320);
        assert_eq!(ArchSpec::preset("llama2-70b").unwrap().base_num_params(), 68_976_648_192);
        // transformers' models built from the same configs (on the meta device) count these.
        assert_eq!(ArchSpec::preset("llama3-8b").unwrap().base_num_params(), 8_030_261_248);
        assert_eq!(ArchSpec::preset("llama3.2-1b").unwrap().base_num_params(), 1_235_814_400);
        assert_eq!(ArchSpec::preset("mistral-7b").unwrap().base_num_params(), 7_241_732_096);
        assert_eq!(ArchSpec::preset("deberta-v3-base").unwrap().base_num_params(), 183_831_552);
        assert_eq!(ArchSpec::preset("roberta-base").unwrap().base_num_params(), 124_645_632);
        assert_eq!(ArchSpec::preset("bert-base").unwrap().base_num_params(), 109_482_240);
        assert_eq!(ArchSpec::preset("minilm-l6").unwrap().base_num_params(), 22_713_216);
    }

    #[test]
    fn target_selection_follows_peft() {
        let bert = ArchSpec::preset("bert-base").unwrap();
        assert_eq!(bert.select(&["query".into(), "value".into()]).unwrap().len(), 24);
        // `output.dense` is a suffix of `attention.output.dense` too.
        assert_eq!(bert.select(&["output.dense".into()]).unwrap().len(), 24);
        let err = bert.select(&["q_proj".into()]).unwrap_err().to_string();
        assert!(err.contains("attention.self.query"), "{err}");
        let llama = ArchSpec::preset("llama2-70b").unwrap();
        let v = llama.select(&["v_proj".into()]).unwrap();
        assert_eq!((v.len(), v[0].d_out), (80, 1024));
    }

    #[test]
    fn config_json_errors_name_the_field() {
        let p = Path::new("m/config.json");
        let ok = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100});
        let spec = ArchSpec::from_config_json(&ok, p).unwrap();
        assert_eq!((spec.kv_heads, spec.head_dim), (2, 16));
        for (field, value) in [
            ("hidden_size", Value::Null),
            ("num_attention_heads", 3.into()),
            ("model_type", "gpt2".into()),
            ("vocab_size", (-1).into()),
            // Absurd sizes are refused before anything is sized by them.
            ("num_hidden_layers", 3_000_000_000u64.into()),
            ("intermediate_size", (1u64 << 40).into()),
        ] {
            let mut bad = ok.clone();
            if value.is_null() {
                bad.as_object_mut().unwrap().remove(field);
            } else {
                bad[field] = value;
            }
            let err = ArchSpec::from_config_json(&bad, p).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("m/config.json"), "{err}");
        }
    }

    /// Settings that change the computation are implemented or refused, never ignored: shapes the
    /// models cannot hold are errors at once; computations they do not implement are recorded, so
    /// that counting still works and loading refuses them.
    #[test]
    fn settings_the_models_do_not_implement_are_refused_naming_the_field() {
        let p = Path::new("m/config.json");
        let llama = serde_json::json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 8192,
            "hidden_act": "silu", "rope_scaling": null, "attention_bias": false, "mlp_bias": false, "head_dim": 16,
            "sliding_window": null});
        let with = |base: &Value, field: &str, value: Value| {
            let mut c = base.clone();
            c[field] = value;
            ArchSpec::from_config_json(&c, p)
        };
        let spec = ArchSpec::from_config_json(&llama, p).unwrap();
        assert!(spec.unimplemented.is_empty() && spec.require_implemented().is_ok());
        // transformers >= 5 spells θ inside `rope_parameters`; the ≤ 4 `rope_scaling` spelling wins.
        let v5 = with(&llama, "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 5e5}));
        assert_eq!(v5.unwrap().rope, RopeConfig { theta: 5e5, scaling: RopeScaling::None });
        let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut both = llama.clone();
        both["rope_scaling"] = llama3.clone();
        both["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
        let spec = ArchSpec::from_config_json(&both, p).unwrap();
        assert!(matches!(spec.rope.scaling, RopeScaling::Llama3 { original_max_positions: 8192, .. }));
        // Types not implemented are recorded (counting works, loading refuses).
        for (field, value) in [
            ("rope_scaling", serde_json::json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})),
            ("rope_parameters", serde_json::json!({"rope_type": "proportional", "rope_theta": 1e4})),
            ("hidden_act", "gelu".into()),
        ] {
            let spec = with(&llama, field, value.clone()).unwrap();
            assert_eq!(spec.unimplemented.len(), 1, "{field}: {value}");
            let err = spec.require_implemented().unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("m/config.json") && err.contains(&value.to_string()), "{err}");
        }
        // Malformed settings of implemented types are errors naming the key.
        for (value, named) in [
            (serde_json::json!({"rope_type": "linear"}), "`factor`"),
            (serde_json::json!({"rope_type": "linear", "factor": "2"}), "`factor`"),
            (serde_json::json!({"rope_type": "dynamic", "factor": 2.0, "low_freq_factor": 1.0}), "`low_freq_factor`"),
            (serde_json::json!({"rope_type": "default", "partial_rotary_factor": 0.5}), "`partial_rotary_factor`"),
            (serde_json::json!({"rope_type": "yarn", "factor": 2.0, "truncate": 1}), "`truncate`"),
            (serde_json::json!({"rope_type": 3}), "`rope_type`"),
        ] {
            let err = with(&llama, "rope_scaling", value).unwrap_err().to_string();
            assert!(err.contains("rope_scaling") && err.contains(named), "{err}");
        }
        // transformers' LLaMA never reads a window; its Mistral defaults one to 4096.
        assert_eq!(with(&llama, "sliding_window", 4096.into()).unwrap().sliding_window, None);
        let mistral = with(&llama, "model_type", "mistral".into()).unwrap();
        assert_eq!(mistral.sliding_window, None, "the base config says null");
        let mut no_key = llama.clone();
        no_key["model_type"] = "mistral".into();
        no_key.as_object_mut().unwrap().remove("sliding_window");
        assert_eq!(ArchSpec::from_config_json(&no_key, p).unwrap().sliding_window, Some(4096));
        no_key["sliding_window"] = "wide".into();
        assert!(ArchSpec::from_config_json(&no_key, p).unwrap_err().to_string().contains("sliding_window"));
        for (field, value) in [("attention_bias", true.into()), ("mlp_bias", true.into())] {
            let err = with(&llama, field, value).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("not implemented"), "{err}");
        }
        // An explicit head width wider than hidden_size / heads is read; an odd one refused.
        let wide = with(&llama, "head_dim", 32.into()).unwrap();
        assert_eq!((wide.head_dim, wide.linear_sites()[0].d_out), (32, 128));
        assert!(with(&llama, "head_dim", 7.into()).unwrap_err().to_string().contains("head_dim"));
        // DeBERTa-v2 settings outside what is implemented are recorded; malformed ones are errors.
        let deberta = serde_json::json!({"model_type": "deberta-v2", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "relative_attention": true,
            "pos_att_type": "p2c|c2p", "share_att_key": true, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
            "position_biased_input": false, "type_vocab_size": 0});
        let spec = ArchSpec::from_config_json(&deberta, p).unwrap();
        assert!(spec.unimplemented.is_empty(), "{:?}", spec.unimplemented);
        assert_eq!((spec.positions, spec.type_vocab, spec.relative.as_ref().unwrap().span), (0, 0, 256));
        for (field, value) in [
            ("conv_kernel_size", 3.into()),
            ("share_att_key", false.into()),
            ("pos_att_type", serde_json::json!(["c2p", "p2p"])),
            ("embedding_size", 32.into()),
            ("pooler_hidden_act", "tanh".into()),
            ("norm_rel_ebd", "layer_norm|scale".into()),
            ("hidden_act", "gelu_new".into()),
        ] {
            let spec = with(&deberta, field, value.clone()).unwrap();
            let err = spec.require_implemented().unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("m/config.json"), "{field}: {err}");
        }
        for (field, value) in
            [("position_buckets", 1.into()), ("pos_att_type", 3.into()), ("relative_attention", "yes".into())]
        {
            assert!(with(&deberta, field, value).unwrap_err().to_string().contains(field));
        }
        let bert = serde_json::json!({"model_type": "bert", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "max_position_embeddings": 64,
            "hidden_act": "gelu", "position_embedding_type": "absolute"});
        assert!(ArchSpec::from_config_json(&bert, p).unwrap().unimplemented.is_empty());
        for (field, value) in [("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key")] {
            let spec = with(&bert, field, value.into()).unwrap();
            assert!(spec.require_implemented().unwrap_err().to_string().contains(field));
        }
    }
}

//! Architecture descriptions: enough of a transformer's shape to name its modules, place adapters
//! and count parameters, without allocating weights (a 70B count takes microseconds).

use crate::error::ModelError;
use crate::layout::{Projection, residual_name};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tensor_peft_adapters::{AttentionGeometry, AttentionMatrix, LinearSite, ResidualPosition, ResidualSite};

/// Model family: which module names and block layout apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// LLaMA-2/3 style decoder (RMSNorm, SwiGLU MLP, GQA, no biases).
    Llama,
    /// BERT/RoBERTa encoder (post-LN blocks, biases, pooler).
    Bert,
}

impl Family {
    /// Lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Bert => "bert",
        }
    }

    /// The family's layout table: the adaptable projections of one block.
    pub fn layout(&self) -> &'static [Projection] {
        match self {
            Family::Llama => crate::llama::LAYOUT,
            Family::Bert => crate::bert::LAYOUT,
        }
    }

    /// The HF path of block `layer` (`model.layers.3`, `encoder.layer.3`).
    pub fn block_path(&self, layer: usize) -> String {
        match self {
            Family::Llama => format!("model.layers.{layer}"),
            Family::Bert => format!("encoder.layer.{layer}"),
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
    /// Rotary embedding base θ (LLaMA family).
    pub rope_theta: f64,
    /// Epsilon of the RMSNorm (LLaMA) or LayerNorm (BERT) layers.
    pub norm_eps: f64,
    /// Settings of the checkpoint that change the computation in ways these models do not
    /// implement (RoPE scaling, another activation, …): the models refuse to load it
    /// ([`ArchSpec::require_implemented`]), while counting parameters is unaffected.
    pub unimplemented: Vec<Unimplemented>,
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

/// Why a RoPE scaling setting is refused.
pub(crate) const NO_ROPE_SCALING: &str = "RoPE scaling is not implemented (positions would differ from transformers)";

/// θ of the rotary embedding (`rope_theta`, or inside transformers ≥ 5's `rope_parameters`) and
/// the `config.json` settings that change the computation in ways the models do not implement.
fn computation_settings(
    json: &Value,
    path: &Path,
    family: Family,
    rope_theta: f64,
) -> Result<(f64, Vec<Unimplemented>), ModelError> {
    let mut unimplemented = Vec::new();
    let mut refuse = |field: &'static str, value: &Value, reason: &'static str| {
        unimplemented.push(Unimplemented { field, value: value.to_string(), reason })
    };
    let scaled = |v: &Value| {
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("default");
        kind != "default"
    };
    let mut theta = rope_theta;
    match family {
        Family::Llama => {
            if let Some(v) = json.get("rope_scaling").filter(|v| !v.is_null() && scaled(v)) {
                refuse("rope_scaling", v, NO_ROPE_SCALING);
            }
            if let Some(v) = json.get("rope_parameters").filter(|v| !v.is_null()) {
                if scaled(v) {
                    refuse("rope_parameters", v, NO_ROPE_SCALING);
                }
                if let Some(t) = v.get("rope_theta") {
                    theta = t.as_f64().filter(|t| t.is_finite() && *t > 0.0).ok_or_else(|| ModelError::Field {
                        path: path.to_path_buf(),
                        field: "rope_parameters.rope_theta",
                        problem: format!("is {t}, expected a positive number"),
                    })?;
                }
            }
            if let Some(v) = json.get("hidden_act").filter(|v| v.as_str() != Some("silu")) {
                refuse("hidden_act", v, "LLaMA-family blocks compute SwiGLU with SiLU only");
            }
            let positions = json.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(u64::MAX);
            if let Some(v) = json.get("sliding_window").filter(|v| v.as_u64().is_some_and(|w| w < positions)) {
                refuse("sliding_window", v, "sliding-window attention is not implemented");
            }
        }
        Family::Bert => {
            if let Some(v) = json.get("hidden_act").filter(|v| v.as_str() != Some("gelu")) {
                refuse("hidden_act", v, "BERT-family blocks compute exact (erf) GELU only");
            }
            if let Some(v) = json.get("position_embedding_type").filter(|v| v.as_str() != Some("absolute")) {
                refuse("position_embedding_type", v, "only absolute position embeddings are implemented");
            }
        }
    }
    Ok((theta, unimplemented))
}

/// Preset names accepted by [`ArchSpec::preset`].
pub const PRESETS: [&str; 6] = ["llama2-7b", "llama2-13b", "llama2-70b", "roberta-base", "bert-base", "minilm-l6"];

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
            rope_theta: 10000.0,
            norm_eps: 1e-5,
            unimplemented: Vec::new(),
        };
        let bert = |hidden, intermediate, layers, heads, vocab, positions, type_vocab| ArchSpec {
            family: Family::Bert,
            vocab,
            positions,
            type_vocab,
            rope_theta: 0.0,
            norm_eps: 1e-12,
            unimplemented: Vec::new(),
            ..llama(hidden, intermediate, layers, heads, heads)
        };
        Some(match name {
            "llama2-7b" => llama(4096, 11008, 32, 32, 32),
            "llama2-13b" => llama(5120, 13824, 40, 40, 40),
            "llama2-70b" => llama(8192, 28672, 80, 64, 8),
            "roberta-base" => bert(768, 3072, 12, 12, 50265, 514, 1),
            "bert-base" => bert(768, 3072, 12, 12, 30522, 512, 2),
            "minilm-l6" => bert(384, 1536, 6, 12, 30522, 512, 2),
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
            other => {
                return Err(field_err(
                    "model_type",
                    format!("is \"{other}\", expected one of llama, mistral, bert, roberta, xlm-roberta"),
                ));
            }
        };
        let hidden = count("hidden_size")?;
        let heads = count("num_attention_heads")?;
        let kv_heads = optional("num_key_value_heads", heads)?;
        if hidden % heads != 0 {
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
        if let Some(v) = json.get("head_dim").filter(|v| !v.is_null())
            && v.as_u64() != Some((hidden / heads) as u64)
        {
            let problem = format!(
                "is {v}; heads of another width than hidden_size / num_attention_heads = {} are not implemented",
                hidden / heads
            );
            return Err(field_err("head_dim", problem));
        }
        let (rope_theta, unimplemented) = computation_settings(json, path, family, float("rope_theta", 10000.0)?)?;
        let tie_embeddings = match json.get("tie_word_embeddings") {
            None | Some(Value::Null) => family == Family::Bert,
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
            positions: if family == Family::Bert { count("max_position_embeddings")? } else { 0 },
            type_vocab: if family == Family::Bert { optional("type_vocab_size", 2)? } else { 0 },
            tie_embeddings,
            rope_theta: if family == Family::Llama { rope_theta } else { 0.0 },
            norm_eps: match family {
                Family::Llama => float("rms_norm_eps", 1e-6)?,
                Family::Bert => float("layer_norm_eps", 1e-12)?,
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

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The attention geometry LoRTA and the counters use.
    pub fn geometry(&self) -> AttentionGeometry {
        AttentionGeometry::new(self.layers, self.hidden, self.heads, self.kv_heads)
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

    /// Houlsby positions: after every block's attention output and feed-forward output.
    pub fn residual_sites(&self) -> Vec<ResidualSite> {
        (0..self.layers)
            .flat_map(|layer| {
                [ResidualPosition::Attention, ResidualPosition::FeedForward].map(|position| ResidualSite {
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
            Family::Bert => {
                let biases: usize = self.linear_sites().iter().map(|s| s.d_out).sum();
                let embeddings = (self.vocab + self.positions + self.type_vocab) * d + 2 * d;
                let layer_norms = self.layers * 2 * 2 * d;
                let pooler = d * d + d;
                embeddings + linear + biases + layer_norms + pooler
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
        assert_eq!((spec.kv_heads, spec.head_dim()), (2, 16));
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
        // transformers >= 5 spells θ inside `rope_parameters`; the default type is implemented.
        let v5 = with(&llama, "rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 5e5}));
        assert_eq!(v5.unwrap().rope_theta, 5e5);
        let llama3 = serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        for (field, value) in [
            ("rope_scaling", llama3.clone()),
            ("rope_scaling", serde_json::json!({"type": "linear", "factor": 2.0})),
            ("rope_parameters", serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})),
            ("hidden_act", "gelu".into()),
            ("sliding_window", 4096.into()),
        ] {
            let spec = with(&llama, field, value.clone()).unwrap();
            assert_eq!(spec.unimplemented.len(), 1, "{field}: {value}");
            let err = spec.require_implemented().unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("m/config.json") && err.contains(&value.to_string()), "{err}");
        }
        // A window as long as the context never applies.
        assert!(with(&llama, "sliding_window", 8192.into()).unwrap().unimplemented.is_empty());
        for (field, value) in [("attention_bias", true.into()), ("mlp_bias", true.into()), ("head_dim", 32.into())] {
            let err = with(&llama, field, value).unwrap_err().to_string();
            assert!(err.contains(field) && err.contains("not implemented"), "{err}");
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

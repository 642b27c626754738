//! The LLaMA decoder against an independent numpy forward pass (fixture written by
//! `scripts/fixtures/tiny_llama.py`), and adapter injection for every method.

use burn::backend::{Autodiff, NdArray};
use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use std::path::PathBuf;
use tensor_peft_adapters::{METHOD_NAMES, MethodConfig};
use tensor_peft_kernels::quant::BlockFormat;
use tensor_peft_models::{ArchSpec, Llama, ModelError, Targets};

type B = NdArray;
/// Autodiff, so that trainable (adapter) parameters can be told from the frozen base.
type AB = Autodiff<NdArray>;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama")
}

fn expected() -> (Vec<Vec<i64>>, Vec<usize>, Vec<f64>) {
    let text = std::fs::read_to_string(fixture().join("expected.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect();
    let shape = json["logits_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    let logits = json["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    (ids, shape, logits)
}

fn tokens<Bk: Backend>(ids: &[Vec<i64>], device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    let flat: Vec<i64> = ids.iter().flatten().copied().collect();
    Tensor::from_data(TensorData::new(flat, [ids.len(), ids[0].len()]), device)
}

/// The tiny LLaMA (on autodiff) and the token ids of its numpy reference.
fn tiny_llama_and_input() -> (Llama<AB>, ArchSpec, Tensor<AB, 2, Int>) {
    let device = Default::default();
    let (base, spec) = Llama::<AB>::from_hf_dir(&fixture(), &device).unwrap();
    let (ids, _, _) = expected();
    (base, spec, tokens::<AB>(&ids, &device))
}

fn values<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec::<f64>().unwrap()
}

#[test]
fn logits_match_the_numpy_reference() {
    let device = Default::default();
    let (model, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    assert_eq!((spec.kv_heads, spec.heads, spec.layers), (2, 4, 2));
    let (ids, shape, reference) = expected();
    let logits = model.forward(tokens::<B>(&ids, &device));
    assert_eq!(logits.dims().to_vec(), shape);
    let got = values(logits);
    let max_err = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    assert!(scale > 0.5, "the reference logits are not trivial");
    eprintln!("max |logit - reference| = {max_err:.2e} (largest logit {scale:.2})");
    assert!(max_err < 1e-4 * scale.max(1.0), "max |logit - reference| = {max_err}");
}

#[test]
fn every_method_injects_with_zero_change_and_trains_only_adapters() {
    let (base, spec, x) = tiny_llama_and_input();
    let reference = values(base.forward(x.clone()));
    for name in METHOD_NAMES {
        let method = MethodConfig::from_name(name).unwrap();
        let adapted = base.clone().adapt(&spec, &method, &Targets::Default).unwrap();
        let out = adapted.forward(x.clone());
        let diff = values(out.clone()).iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(diff < 1e-6, "{name}: zero-delta injection changed the logits by {diff}");
        // Trainable parameters equal the counted ones; the frozen base gets no gradient.
        let (linear, residual) = if method.is_residual() {
            (vec![], spec.residual_sites())
        } else {
            (spec.select_roles(method.default_roles()), vec![])
        };
        let counted = method.count(&spec.geometry(), &linear, &residual).unwrap().total();
        struct Trainable<'a, B: AutodiffBackend>(&'a B::Gradients, usize, usize);
        impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable<'_, B> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                if p.val().is_require_grad() {
                    self.1 += p.val().shape().num_elements();
                } else if p.val().grad(self.0).is_some() {
                    self.2 += 1;
                }
            }
        }
        let grads = out.sum().backward();
        let mut visitor = Trainable::<AB>(&grads, 0, 0);
        adapted.visit(&mut visitor);
        assert_eq!(visitor.1, counted, "{name}: trainable parameters");
        assert_eq!(visitor.2, 0, "{name}: a frozen parameter received a gradient");
        assert!(adapted.clone().adapt(&spec, &method, &Targets::Default).is_err(), "{name}: adapting twice must fail");
    }
}

#[test]
fn explicit_targets_and_clear_errors() {
    let device = Default::default();
    let (model, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let lora = MethodConfig::from_name("lora").unwrap();
    let targets: Vec<String> = ["q_proj", "down_proj"].map(String::from).to_vec();
    let adapted = model.clone().adapt(&spec, &lora, &Targets::Names(targets)).unwrap();
    assert!(adapted.layers[1].down_proj.adapter.is_some() && adapted.layers[1].v_proj.adapter.is_none());
    let err = model.clone().adapt(&spec, &lora, &Targets::Names(vec!["query".to_string()])).unwrap_err().to_string();
    assert!(err.contains("self_attn.q_proj"), "{err}");
    // PEFT's regex targets match the whole module name.
    let regex = Targets::Regex(r"model\.layers\.1\.(self_attn\.(q|k)_proj|mlp\.up_proj)".into());
    let adapted = model.clone().adapt(&spec, &lora, &regex).unwrap();
    let adapted_names: Vec<bool> = [
        &adapted.layers[0].q_proj,
        &adapted.layers[1].q_proj,
        &adapted.layers[1].k_proj,
        &adapted.layers[1].up_proj,
        &adapted.layers[1].v_proj,
    ]
    .iter()
    .map(|p| p.adapter.is_some())
    .collect();
    assert_eq!(adapted_names, [false, true, true, true, false]);
    assert!(
        model.clone().adapt(&spec, &lora, &Targets::Regex("q_proj".into())).is_err(),
        "regex must match whole names"
    );
    assert!(matches!(
        model.clone().adapt(&spec, &lora, &Targets::Regex("(".into())),
        Err(ModelError::BadTarget { .. })
    ));
    let adp = MethodConfig::from_name("loretta-adp").unwrap();
    assert!(
        model.adapt(&spec, &adp, &Targets::Names(vec!["q_proj".into()])).is_err(),
        "residual methods take no targets"
    );

    // A checkpoint with a missing or misshapen tensor is refused with its name.
    let dir = std::env::temp_dir().join(format!("tpeft-llama-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    let config = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 48");
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::copy(fixture().join("model.safetensors"), dir.join("model.safetensors")).unwrap();
    let err = Llama::<B>::from_hf_dir(&dir, &device).unwrap_err();
    assert!(err.to_string().contains("mlp.gate_proj.weight") && err.to_string().contains("[48, 32]"), "{err}");
    std::fs::write(dir.join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let err = Llama::<B>::from_hf_dir(&dir, &device).unwrap_err();
    assert!(matches!(err, ModelError::Weights { .. }) && err.to_string().contains("model.safetensors"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = ArchSpec::preset("llama2-7b");
}

#[test]
fn random_init_has_the_architecture_and_hf_init_statistics() {
    let device = Default::default();
    let mut spec = ArchSpec::preset("llama2-7b").unwrap();
    (spec.hidden, spec.intermediate, spec.layers, spec.heads, spec.kv_heads, spec.vocab) = (64, 96, 2, 4, 2, 50);
    spec.head_dim = 16;
    <B as Backend>::seed(&device, 7);
    let model = Llama::<B>::random(&spec, &device).unwrap();
    assert_eq!(model.num_params(), spec.base_num_params());
    assert_eq!(model.layers[0].k_proj.base.dims(), (64, 32), "grouped K/V: 2 heads of 16");
    // HF's LlamaPreTrainedModel init: N(0, 0.02^2) matrices, unit norm scales.
    let q = values(model.layers[1].q_proj.base.weight_f32());
    let mean = q.iter().sum::<f64>() / q.len() as f64;
    let std = (q.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / q.len() as f64).sqrt();
    assert!(mean.abs() < 2e-3 && (std - 0.02).abs() < 1e-3, "q_proj mean {mean}, std {std}");
    assert!(values(model.norm.gamma.val()).iter().all(|&g| g == 1.0));
    let logits = values(model.forward(tokens::<B>(&[vec![1, 2, 3], vec![4, 5, 6]], &device)));
    assert_eq!(logits.len(), 2 * 3 * 50);
    assert!(logits.iter().all(|v| v.is_finite()));
    // The same seed gives the same weights.
    <B as Backend>::seed(&device, 7);
    let again = Llama::<B>::random(&spec, &device).unwrap();
    assert_eq!(values(again.layers[1].q_proj.base.weight_f32()), q);
    let bert = Llama::<B>::random(&ArchSpec::preset("minilm-l6").unwrap(), &device).unwrap_err();
    assert!(bert.to_string().contains("not a LLaMA-family decoder"), "{bert}");
}

#[test]
fn update_ratios_are_the_norm_of_delta_w_over_the_frozen_weight() {
    use tensor_peft_adapters::{LinearAdapter, LoraConfig};
    let device = Default::default();
    let (base, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let method = MethodConfig::Lora(LoraConfig::new().with_rank(2).with_alpha(4.0));
    let mut model = base.adapt(&spec, &method, &Targets::Default).unwrap();
    let ratios = tensor_peft_models::update_ratios(&mut model.clone(), &spec);
    let names: Vec<_> = ratios.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj"
        ]
    );
    assert!(ratios.iter().all(|(_, r)| *r == 0.0), "B = 0 at initialisation: {ratios:?}");
    // Give layer 1's q_proj a known update and compare with ‖scale·A·B‖ / ‖W‖ by loops in f64.
    let q = &mut model.layers[1].q_proj;
    let Some(LinearAdapter::Lora(lora)) = q.adapter.as_mut() else { panic!("LoRA expected") };
    let b_vals: Vec<f32> = (0..2 * 32).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
    lora.b = Param::from_tensor(Tensor::from_data(TensorData::new(b_vals.clone(), [2, 32]), &device));
    let (a, w, scale) = (values(lora.a.val()), values(q.base.weight_f32()), lora.scaling);
    let mut delta_sq = 0.0;
    for i in 0..32 {
        for j in 0..32 {
            let dij: f64 = (0..2).map(|k| a[i * 2 + k] * b_vals[k * 32 + j] as f64).sum::<f64>() * scale;
            delta_sq += dij * dij;
        }
    }
    let expected = delta_sq.sqrt() / w.iter().map(|v| v * v).sum::<f64>().sqrt();
    let ratios = tensor_peft_models::update_ratios(&mut model.clone(), &spec);
    assert!(expected > 0.01, "the check would be vacuous");
    assert!((ratios[2].1 - expected).abs() < 1e-5 * expected, "{} vs {expected}", ratios[2].1);
    assert_eq!(ratios.iter().filter(|(_, r)| *r > 0.0).count(), 1);
    // A merged layer carries no separate update.
    model.layers[1].q_proj = model.layers[1].q_proj.clone().merge(&model.shared).unwrap();
    assert_eq!(tensor_peft_models::update_ratios(&mut model, &spec).len(), 3);
}

#[test]
fn kv_cache_generation_path_matches_the_full_forward() {
    let device = Default::default();
    let (model, _) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let (ids, _, _) = expected();
    let row = &ids[0];
    let full = values(model.forward(tokens::<B>(std::slice::from_ref(row), &device)));
    let vocab = 64;
    // Prefill three tokens, then one token at a time.
    let mut cache = tensor_peft_models::llama::KvCache::default();
    let mut cached = values(model.forward_cached(tokens::<B>(&[row[..3].to_vec()], &device), &mut cache));
    for &token in &row[3..] {
        cached.extend(values(model.forward_cached(tokens::<B>(&[vec![token]], &device), &mut cache)));
    }
    assert_eq!(cache.len, row.len());
    assert_eq!(cached.len(), row.len() * vocab);
    let max_err = cached.iter().zip(&full).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_err < 1e-5, "cached vs full logits differ by {max_err}");
}

/// The real SmolLM2-135M-Instruct GGUF fetched by `scripts/fetch-assets.sh`; `None` (with a note)
/// when it is absent, a failure when `TENSOR_PEFT_REQUIRE_ASSETS=1` (as in CI).
fn smollm2() -> Option<PathBuf> {
    let root = std::env::var_os("TENSOR_PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    let path = root.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("TENSOR_PEFT_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{} is missing: run scripts/fetch-assets.sh",
        path.display()
    );
    eprintln!("skipping: {} is absent (run scripts/fetch-assets.sh)", path.display());
    None
}

/// Outputs of transformers / sentence-transformers on the real assets
/// (`scripts/fixtures/transformers_parity.py`).
fn parity() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("../transformers-parity.json")).unwrap()).unwrap()
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_gguf_matches_transformers() {
    use tensor_peft_models::tokenizer::ChatMessage;
    let Some(path) = smollm2() else { return };
    let reference = &parity()["smollm2"];
    let device = Default::default();
    let (model, spec, tokenizer) = Llama::<B>::from_gguf(&path, &device).unwrap();
    assert_eq!((spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.vocab), (30, 576, 9, 3, 49152));
    assert!(spec.tie_embeddings);
    assert_eq!(spec.base_num_params(), 134_515_008);
    // Identical tokenization and chat template.
    assert_eq!(tokenizer.encode(reference["plain_text"].as_str().unwrap()).unwrap(), u32s(&reference["plain_ids"]));
    let user = ChatMessage { role: "user".into(), content: reference["question"].as_str().unwrap().into() };
    let prompt = tokenizer.apply_chat_template(&[user], true).unwrap();
    assert_eq!(prompt, reference["prompt"].as_str().unwrap());
    let ids = tokenizer.encode(&prompt).unwrap();
    assert_eq!(ids, u32s(&reference["prompt_ids"]));
    // Logits at the last prompt position within 1e-4 relative, same top-5.
    let t = ids.len();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, t]),
        &device,
    );
    let last = model.forward(input).narrow(1, t - 1, 1).reshape([spec.vocab]);
    let logits = values(last.clone());
    let expected: Vec<f64> =
        reference["last_logits_first32"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let scale = logits.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let max_err = logits.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("last-position logits vs transformers: max |diff| {max_err:.2e} (largest logit {scale:.1})");
    assert!(max_err <= 1e-4 * scale, "logits differ from transformers by {max_err} (scale {scale})");
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    assert_eq!(order[..5].iter().map(|&i| i as u32).collect::<Vec<_>>(), u32s(&reference["last_top5"]));
    // Identical greedy continuation (KV-cache path).
    let answer = model.generate_greedy(&ids, 16, tokenizer.eos);
    assert_eq!(answer, u32s(&reference["greedy_ids"]));
    assert_eq!(tokenizer.decode(&answer).unwrap(), "The capital of France is Paris.<|im_end|>");
    // The GGUF tokenizer written as tokenizer.json (what `tpeft merge` ships) reads back the same.
    let dir = std::env::temp_dir().join(format!("tpeft-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    tokenizer.save_hf(&dir).unwrap();
    let reread = tensor_peft_models::tokenizer::TextTokenizer::from_hf_dir(&dir).unwrap();
    assert_eq!(reread.encode(&prompt).unwrap(), ids);
    assert_eq!(reread.eos, tokenizer.eos);
    assert_eq!(reread.chat_template, tokenizer.chat_template);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The tiny tokenizer-only GGUF files of `scripts/fixtures/gguf_tokenizers.py` and what
/// transformers' GGUF loader gives for them.
fn gguf_tokenizers() -> (PathBuf, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf-tokenizers");
    let expected = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    (dir, expected)
}

/// Asserts `tokenizer` gives transformers' ids (`tokenizer(text)["input_ids"]`) and decoding for
/// every text of the fixture.
fn assert_tokenizes_like_transformers(
    tokenizer: &tensor_peft_models::tokenizer::TextTokenizer,
    texts: &serde_json::Value,
    expected: &serde_json::Value,
    what: &str,
) {
    for (text, want) in texts.as_array().unwrap().iter().zip(expected.as_array().unwrap()) {
        let text = text.as_str().unwrap();
        let ids = tokenizer.encode_with_specials(text).unwrap();
        assert_eq!(ids, u32s(&want["ids"]), "{what}: ids of {text:?}");
        assert_eq!(tokenizer.decode(&ids).unwrap(), want["decoded"].as_str().unwrap(), "{what}: decoding of {text:?}");
        // `encode` is the same with the BOS but never the EOS.
        let mut plain = ids.clone();
        if tokenizer.add_eos {
            assert_eq!(plain.pop(), tokenizer.eos);
        }
        assert_eq!(tokenizer.encode(text).unwrap(), plain, "{what}: encode of {text:?}");
    }
}

fn assert_special_tokens_like_transformers(
    tokenizer: &tensor_peft_models::tokenizer::TextTokenizer,
    expected: &serde_json::Value,
    vocab: usize,
) {
    let special = &expected["special"];
    let ids = tokenizer.encode_with_specials(special["text"].as_str().unwrap()).unwrap();
    assert_eq!(ids, u32s(&special["ids"]));
    assert_eq!(tokenizer.decode(&ids).unwrap(), special["decoded"].as_str().unwrap());
    let every: Vec<u32> = (0..vocab as u32).collect();
    assert_eq!(tokenizer.decode(&every).unwrap(), expected["every_id_decoded"].as_str().unwrap());
}

/// Our rebuilt pipeline (normalizer, pre-tokenizer, model options, post-processor, decoder,
/// added tokens) is transformers', component for component, except the GPT-2 default
/// `<|endoftext|>` that transformers' byte-level rebuild registers even when the vocabulary lacks
/// it (as an id past the model's vocabulary); we leave that one out.
fn assert_pipeline_like_transformers(
    tokenizer: &tensor_peft_models::tokenizer::TextTokenizer,
    expected: &serde_json::Value,
    vocab: usize,
) {
    let mut ours: serde_json::Value = serde_json::from_str(&tokenizer.to_json().unwrap()).unwrap();
    let model = ours["model"].as_object_mut().unwrap();
    model.remove("vocab");
    model.remove("merges");
    let mut want = expected["pipeline"].clone();
    let added = want["added_tokens"].as_array_mut().unwrap();
    let past: Vec<serde_json::Value> =
        added.iter().filter(|t| t["id"].as_u64().unwrap() >= vocab as u64).map(|t| t["content"].clone()).collect();
    added.retain(|t| t["id"].as_u64().unwrap() < vocab as u64);
    assert!(past.iter().all(|c| c == "<|endoftext|>"), "{past:?}");
    assert_eq!(ours, want);
}

#[test]
fn gguf_sentencepiece_tokenizer_matches_transformers() {
    use tensor_peft_models::gguf::MetaValue;
    use tensor_peft_models::tokenizer::TextTokenizer;
    let (dir, expected) = gguf_tokenizers();
    let (mut gguf, tokenizer) = gguf_tokenizer_like_transformers(&dir, "spm", &expected);
    // No add_bos_token in the file: a SentencePiece vocabulary then gets a BOS.
    assert!(tokenizer.add_bos && !tokenizer.add_eos);
    assert_eq!((tokenizer.bos, tokenizer.eos), (Some(1), Some(2)));
    assert_eq!(tokenizer.id_to_token(3).as_deref(), Some("<0x00>"));
    // The file's own add_bos_token / add_eos_token.
    gguf.metadata.insert("tokenizer.ggml.add_bos_token".into(), MetaValue::Bool(false));
    gguf.metadata.insert("tokenizer.ggml.add_eos_token".into(), MetaValue::Bool(true));
    let tokenizer = TextTokenizer::from_gguf(&gguf).unwrap();
    assert!(!tokenizer.add_bos && tokenizer.add_eos);
    let want = &expected["spm"]["no_bos_with_eos"];
    assert_tokenizes_like_transformers(&tokenizer, &expected["texts"], want, "spm.gguf without BOS, with EOS");
}

/// The tokenizer of fixture `{kind}.gguf`: ids, special tokens and pipeline as transformers', also
/// after a round trip through `tokenizer.json` (what `tpeft merge` ships).
fn gguf_tokenizer_like_transformers(
    dir: &std::path::Path,
    kind: &str,
    expected: &serde_json::Value,
) -> (tensor_peft_models::gguf::Gguf, tensor_peft_models::tokenizer::TextTokenizer) {
    use tensor_peft_models::gguf::Gguf;
    use tensor_peft_models::tokenizer::TextTokenizer;
    let file = format!("{kind}.gguf");
    let gguf = Gguf::open(&dir.join(&file)).unwrap();
    let tokenizer = TextTokenizer::from_gguf(&gguf).unwrap();
    assert_tokenizes_like_transformers(&tokenizer, &expected["texts"], &expected[kind]["file"], &file);
    let vocab = gguf.metadata["tokenizer.ggml.tokens"].as_array().unwrap().len();
    assert_special_tokens_like_transformers(&tokenizer, &expected[kind], vocab);
    assert_pipeline_like_transformers(&tokenizer, &expected[kind], vocab);
    let out = std::env::temp_dir().join(format!("tpeft-{kind}-tok-{}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    tokenizer.save_hf(&out).unwrap();
    let reread = TextTokenizer::from_hf_dir(&out).unwrap();
    assert_tokenizes_like_transformers(
        &reread,
        &expected["texts"],
        &expected[kind]["file"],
        &format!("{kind} tokenizer.json"),
    );
    std::fs::remove_dir_all(&out).unwrap();
    (gguf, tokenizer)
}

#[test]
fn gguf_byte_level_tokenizers_match_transformers_for_each_pre() {
    use tensor_peft_models::gguf::MetaValue;
    use tensor_peft_models::tokenizer::TextTokenizer;
    let (dir, expected) = gguf_tokenizers();
    let (mut gguf, tokenizer) = gguf_tokenizer_like_transformers(&dir, "bpe", &expected);
    assert_eq!(gguf.metadata["tokenizer.ggml.pre"], MetaValue::Str("llama-bpe".into()));
    assert!(tokenizer.add_bos && !tokenizer.add_eos);
    // Every split transformers' GGUF loader knows, and GPT-2's, on the same vocabulary.
    let splits = expected["bpe"]["pre"].as_object().unwrap();
    assert!(splits.len() >= 24, "{} pre values", splits.len());
    for (pre, want) in splits {
        gguf.metadata.insert("tokenizer.ggml.pre".into(), MetaValue::Str(pre.clone()));
        let tokenizer = TextTokenizer::from_gguf(&gguf).unwrap();
        assert_tokenizes_like_transformers(&tokenizer, &expected["texts"], want, &format!("pre = {pre}"));
    }
}

#[test]
fn gguf_tokenizer_refusals_name_the_file_key_and_value() {
    use tensor_peft_models::gguf::{Gguf, MetaValue};
    use tensor_peft_models::tokenizer::TextTokenizer;
    let (dir, _) = gguf_tokenizers();
    let spm = Gguf::open(&dir.join("spm.gguf")).unwrap();
    let bpe = Gguf::open(&dir.join("bpe.gguf")).unwrap();
    let refused =
        |base: &Gguf, change: &dyn Fn(&mut std::collections::BTreeMap<String, MetaValue>), needles: &[&str]| {
            let mut gguf = Gguf::open(&base.path).unwrap();
            change(&mut gguf.metadata);
            let err = TextTokenizer::from_gguf(&gguf).expect_err("refused").to_string();
            assert!(err.contains(gguf.path.file_name().unwrap().to_str().unwrap()), "{err}");
            for needle in needles {
                assert!(err.contains(needle), "{err:?} does not name {needle:?}");
            }
        };
    let set = |key: &'static str, value: MetaValue| {
        move |m: &mut std::collections::BTreeMap<String, MetaValue>| {
            m.insert(key.into(), value.clone());
        }
    };
    let remove = |key: &'static str| {
        move |m: &mut std::collections::BTreeMap<String, MetaValue>| {
            m.remove(key);
        }
    };
    // What is not implemented.
    refused(&spm, &set("tokenizer.ggml.model", MetaValue::Str("t5".into())), &["tokenizer.ggml.model", "\"t5\""]);
    refused(
        &bpe,
        &set("tokenizer.ggml.pre", MetaValue::Str("starcoder".into())),
        &["tokenizer.ggml.pre", "\"starcoder\""],
    );
    refused(&bpe, &remove("tokenizer.ggml.pre"), &["tokenizer.ggml.pre", "missing"]);
    refused(
        &spm,
        &set("tokenizer.ggml.pre", MetaValue::Str("llama-bpe".into())),
        &["tokenizer.ggml.pre", "\"llama-bpe\""],
    );
    refused(
        &spm,
        &set("tokenizer.ggml.add_space_prefix", MetaValue::Bool(false)),
        &["tokenizer.ggml.add_space_prefix"],
    );
    refused(
        &spm,
        &set("general.architecture", MetaValue::Str("gemma2".into())),
        &["general.architecture", "\"gemma2\""],
    );
    // Malformed metadata.
    refused(&spm, &remove("tokenizer.ggml.scores"), &["tokenizer.ggml.scores", "missing"]);
    refused(&spm, &remove("tokenizer.ggml.model"), &["tokenizer.ggml.model", "missing"]);
    refused(&bpe, &remove("tokenizer.ggml.merges"), &["tokenizer.ggml.merges", "missing"]);
    refused(&bpe, &remove("tokenizer.ggml.tokens"), &["tokenizer.ggml.tokens", "missing"]);
    let edit_array = |key: &'static str, f: fn(&mut Vec<MetaValue>)| {
        move |m: &mut std::collections::BTreeMap<String, MetaValue>| {
            let Some(MetaValue::Array(a)) = m.get_mut(key) else { panic!("{key}") };
            f(a);
        }
    };
    refused(&spm, &edit_array("tokenizer.ggml.scores", |a| drop(a.pop())), &["tokenizer.ggml.scores", "entries"]);
    refused(
        &spm,
        &edit_array("tokenizer.ggml.token_type", |a| a.push(MetaValue::Int(1))),
        &["tokenizer.ggml.token_type"],
    );
    refused(
        &spm,
        &edit_array("tokenizer.ggml.scores", |a| a[7] = MetaValue::Str("x".into())),
        &["tokenizer.ggml.scores", "entry 7"],
    );
    // A byte token renamed: byte fallback would lose that byte.
    refused(
        &spm,
        &edit_array("tokenizer.ggml.tokens", |a| a[3 + 0x41] = MetaValue::Str("A?".into())),
        &["tokenizer.ggml.tokens", "<0x41>"],
    );
    refused(
        &bpe,
        &edit_array("tokenizer.ggml.merges", |a| a[0] = MetaValue::Str("nospace".into())),
        &["tokenizer.ggml.merges", "nospace"],
    );
    refused(
        &bpe,
        &edit_array("tokenizer.ggml.merges", |a| a[0] = MetaValue::Str("zz qq".into())),
        &["tokenizer.ggml.merges"],
    );
    refused(
        &spm,
        &set("tokenizer.ggml.bos_token_id", MetaValue::Uint(1 << 20)),
        &["tokenizer.ggml.bos_token_id", "1048576"],
    );
    refused(
        &spm,
        &set("tokenizer.ggml.add_bos_token", MetaValue::Str("yes".into())),
        &["tokenizer.ggml.add_bos_token"],
    );
}

/// SmolLM2's `pre = "smollm"` is not in transformers' GGUF table (it falls back to GPT-2's split);
/// tensor-peft keeps SmolLM2's own split (single digits first, as its `tokenizer.json` and
/// llama.cpp do). Both give transformers' ids on the multilingual texts; they differ only where
/// whitespace runs before a digit, and there the ids are SmolLM2's own.
#[test]
fn smollm2_gguf_tokenizer_on_the_multilingual_texts() {
    use tensor_peft_models::gguf::{Gguf, MetaValue};
    use tensor_peft_models::tokenizer::TextTokenizer;
    let Some(path) = smollm2() else { return };
    let gguf = Gguf::open(&path).unwrap();
    assert_eq!(gguf.metadata["tokenizer.ggml.pre"], MetaValue::Str("smollm".into()));
    let tokenizer = TextTokenizer::from_gguf(&gguf).unwrap();
    let (_, expected) = gguf_tokenizers();
    let smollm2 = &expected["smollm2"];
    for (text, want) in expected["texts"].as_array().unwrap().iter().zip(smollm2["transformers"].as_array().unwrap()) {
        let text = text.as_str().unwrap();
        assert_eq!(tokenizer.encode_with_specials(text).unwrap(), u32s(want), "ids of {text:?}");
        assert_eq!(tokenizer.decode(&u32s(want)).unwrap(), text);
    }
    let texts = smollm2["divergent_texts"].as_array().unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = tokenizer.encode(text.as_str().unwrap()).unwrap();
        assert_eq!(ids, u32s(&smollm2["divergent_own"][i]), "ids of {text}");
        assert_ne!(ids, u32s(&smollm2["divergent_transformers"][i]), "ids of {text}");
    }
}

fn minilm() -> Option<PathBuf> {
    let root = std::env::var_os("TENSOR_PEFT_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets"));
    let dir = root.join("all-minilm-l6-v2");
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(std::env::var("TENSOR_PEFT_REQUIRE_ASSETS").as_deref() != Ok("1"), "{} is missing", dir.display());
    eprintln!("skipping: {} is absent (run scripts/fetch-assets.sh)", dir.display());
    None
}

/// `max |row − reference|` for an embedding and its JSON reference array.
fn max_abs_diff(row: &[f32], reference: &serde_json::Value) -> f64 {
    row.iter()
        .zip(reference.as_array().unwrap())
        .map(|(a, b)| (*a as f64 - b.as_f64().unwrap()).abs())
        .fold(0.0, f64::max)
}

#[test]
fn minilm_embeddings_match_the_numpy_reference() {
    use tensor_peft_models::Bert;
    use tensor_peft_models::tokenizer::TextTokenizer;
    let Some(dir) = minilm() else { return };
    let text = std::fs::read_to_string(fixture().join("../minilm-embeddings.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let texts: Vec<String> =
        json["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let device = Default::default();
    let (model, spec) = Bert::<B>::from_hf_dir(&dir, &device).unwrap();
    assert_eq!(spec.base_num_params(), 22_713_216);
    let tokenizer = TextTokenizer::from_hf_dir(&dir).unwrap();
    for (text, ids) in texts.iter().zip(json["input_ids"].as_array().unwrap()) {
        let expected: Vec<u32> = ids.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        // The package's tokenizer.json pads to 128; ours does not.
        assert_eq!(tokenizer.encode_with_specials(text).unwrap(), expected);
    }
    let got = model.embed_texts(&tokenizer, &texts).unwrap();
    for (row, reference) in got.iter().zip(json["embeddings"].as_array().unwrap()) {
        let max_err = max_abs_diff(row, reference);
        assert!(max_err < 1e-5, "embedding differs from the reference by {max_err}");
    }
    // sentence-transformers on the same model and texts.
    let reference = &parity()["minilm"];
    for (text, ids) in texts.iter().zip(reference["input_ids"].as_array().unwrap()) {
        assert_eq!(tokenizer.encode_with_specials(text).unwrap(), u32s(ids));
    }
    for (row, reference) in got.iter().zip(reference["embeddings"].as_array().unwrap()) {
        let max_err = max_abs_diff(row, reference);
        assert!(max_err < 1e-5, "embedding differs from sentence-transformers by {max_err}");
    }
    // Adapters inject into BERT names too, leaving the output unchanged at initialisation.
    let adapted = model.adapt(&spec, &MethodConfig::from_name("loretta-adp").unwrap(), &Targets::Default).unwrap();
    let again = adapted.embed_texts(&tokenizer, &texts[..1]).unwrap();
    assert!(again[0].iter().zip(&got[0]).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn f16_bf16_and_sharded_checkpoints_load() {
    use safetensors::{Dtype, serialize, tensor::TensorView};
    let device = Default::default();
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    names.sort();
    let dir = std::env::temp_dir().join(format!("tpeft-shards-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    // First half of the tensors in BF16, second half in F16, one shard each.
    let mut weight_map = serde_json::Map::new();
    for (shard, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = chunk
            .iter()
            .map(|name| {
                let view = file.tensor(name).unwrap();
                let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
                let data: Vec<u8> = if shard == 0 {
                    values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()
                } else {
                    values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()
                };
                (name.clone(), view.shape().to_vec(), data)
            })
            .collect();
        let dtype = if shard == 0 { Dtype::BF16 } else { Dtype::F16 };
        let views: Vec<(String, TensorView)> =
            encoded.iter().map(|(n, s, d)| (n.clone(), TensorView::new(dtype, s.clone(), d).unwrap())).collect();
        let file_name = format!("model-0000{}-of-00002.safetensors", shard + 1);
        std::fs::write(dir.join(&file_name), serialize(views, None).unwrap()).unwrap();
        for name in chunk {
            weight_map.insert(name.clone(), file_name.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (model, _) = Llama::<B>::from_hf_dir(&dir, &device).unwrap();
    let (ids, _, reference) = expected();
    let got = values(model.forward(tokens::<B>(&ids, &device)));
    let max_err = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    // Half-precision weights move the logits a little, not arbitrarily.
    assert!(max_err > 0.0 && max_err < 0.15, "half-precision logits differ by {max_err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A minimal GGUF v3 file: `meta` as (key, type, encoded value), tensors as (name, dims, type, data).
fn gguf_bytes(meta: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    let string = |s: &str| [(s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (key, ty, value) in meta {
        out.extend(string(key));
        out.extend(ty.to_le_bytes());
        out.extend(value);
    }
    let mut offset = 0u64;
    for (name, dims, ty, data) in tensors {
        out.extend(string(name));
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += data.len().div_ceil(32) as u64 * 32;
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    for (_, _, _, data) in tensors {
        let start = out.len();
        out.extend(data);
        out.resize(start + data.len().div_ceil(32) * 32, 0);
    }
    out
}

#[test]
fn gguf_dequantisation_and_corrupt_files() {
    use tensor_peft_models::gguf::{Gguf, MetaValue};
    // One Q8_0 block (d = 0.5) and one Q4_1 block (d = 0.25, m = -1).
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut q41 = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    q41.extend(half::f16::from_f32(-1.0).to_le_bytes());
    q41.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
    let arch = [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat();
    let bytes = gguf_bytes(
        &[("general.architecture", 8, arch), ("llama.block_count", 4, 2u32.to_le_bytes().to_vec())],
        &[("a", vec![32], 8, q8), ("b", vec![32], 3, q41)],
    );
    let gguf = Gguf::parse(bytes.clone(), "test.gguf".as_ref()).unwrap();
    assert_eq!(gguf.metadata["general.architecture"], MetaValue::Str("llama".into()));
    let (shape, a) = gguf.dequantize_tensor(&gguf.tensors[0]).unwrap();
    assert_eq!(shape, vec![32]);
    assert_eq!(a, (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect::<Vec<_>>());
    let (_, b) = gguf.dequantize_tensor(&gguf.tensors[1]).unwrap();
    let expected: Vec<f32> =
        (0..16).map(|i| 0.25 * i as f32 - 1.0).chain((0..16).map(|i| 0.25 * (15 - i) as f32 - 1.0)).collect();
    assert_eq!(b, expected);
    // Every truncation and many byte flips give an error or a valid parse, never a panic.
    for cut in 0..bytes.len() {
        let r = Gguf::parse(bytes[..cut].to_vec(), "cut.gguf".as_ref());
        if let Err(e) = r {
            assert!(e.to_string().contains("cut.gguf"), "{e}");
        }
    }
    let mut state = 7u64;
    for _ in 0..2000 {
        let mut corrupt = bytes.clone();
        for _ in 0..3 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let pos = (state >> 33) as usize % corrupt.len();
            corrupt[pos] = (state >> 20) as u8;
        }
        if let Ok(g) = Gguf::parse(corrupt, "flip.gguf".as_ref()) {
            for t in &g.tensors {
                let _ = g.dequantize_tensor(t);
            }
        }
    }
    // An unsupported quantisation type (Q8_K, ggml's dot-product type) is named with those read.
    let q8_k = gguf_bytes(&[], &[("w", vec![256], 15, vec![0; 292])]);
    let err = Gguf::parse(q8_k, "k.gguf".as_ref()).unwrap_err().to_string();
    assert!(err.contains("unsupported GGML tensor type 15") && err.contains("Q4_1") && err.contains("Q6_K"), "{err}");
    // Rows that are not whole blocks (two rows of 128 weights: 256 weights, one Q4_K block's
    // worth) are refused naming the tensor and the block size; so is a truncated K-quant tensor.
    let split = gguf_bytes(&[], &[("half_rows", vec![128, 2], 12, vec![0; 144])]);
    let err = Gguf::parse(split, "rows.gguf".as_ref()).unwrap_err().to_string();
    assert!(err.contains("`half_rows`") && err.contains("128") && err.contains("Q4_K") && err.contains("256"), "{err}");
    let mut short = gguf_bytes(&[], &[("short", vec![256, 2], 14, vec![1; 2 * 210])]);
    short.truncate(short.len() - 32);
    let err = Gguf::parse(short, "short.gguf".as_ref()).unwrap_err().to_string();
    assert!(err.contains("`short`") && err.contains("outside the file"), "{err}");
}

/// `n` random GGML blocks of `format` whose f16 fields (at `halves`, byte offsets in a block) hold
/// finite scales of a real model's size; the other bytes (codes, packed sub-block scales) random.
fn random_blocks(rng: &mut Rng, format: BlockFormat, n: usize, halves: &[usize]) -> Vec<u8> {
    let mut bytes: Vec<u8> = (0..n * format.block_bytes()).map(|_| rng.next() as u8).collect();
    for block in bytes.chunks_exact_mut(format.block_bytes()) {
        for &at in halves {
            let scale = half::f16::from_f32((1 + rng.below(100)) as f32 * 2e-4);
            block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
        }
    }
    bytes
}

/// A one-layer llama GGUF whose attention holds K-quant and Q5_0 blocks (256-wide rows): q_proj
/// Q4_K, k_proj Q5_0, v_proj Q6_K, o_proj Q5_K, and metadata for two heads of 128. Also returns
/// each tensor's bytes.
fn k_quant_gguf(rng: &mut Rng) -> (Vec<u8>, Vec<Vec<u8>>) {
    let u32s = |v: u32| v.to_le_bytes().to_vec();
    let arch = [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat();
    let meta = [
        ("general.architecture", 8, arch),
        ("llama.attention.head_count", 4, u32s(2)),
        ("llama.embedding_length", 4, u32s(256)),
        ("llama.feed_forward_length", 4, u32s(512)),
        ("llama.block_count", 4, u32s(1)),
        ("llama.vocab_size", 4, u32s(8)),
    ];
    let rows = 256;
    let tensors = [
        ("blk.0.attn_q.weight", vec![256, rows as u64], 12, random_blocks(rng, BlockFormat::Q4_K, rows, &[0, 2])),
        ("blk.0.attn_k.weight", vec![256, rows as u64], 6, random_blocks(rng, BlockFormat::Q5_0, 8 * rows, &[0])),
        ("blk.0.attn_v.weight", vec![256, rows as u64], 14, random_blocks(rng, BlockFormat::Q6_K, rows, &[208])),
        ("blk.0.attn_output.weight", vec![256, rows as u64], 13, random_blocks(rng, BlockFormat::Q5_K, rows, &[0, 2])),
    ];
    (gguf_bytes(&meta, &tensors), tensors.into_iter().map(|t| t.3).collect())
}

/// A GGUF file of K-quant (and Q5_0) projections loads through [`Gguf`] and [`Weights`]: f32
/// loads are the blocks' dequantization (the Q/K rows restored from llama.cpp's RoPE permutation,
/// the others as stored), and `native` keeps each tensor's own blocks, whose dequantization gives
/// exactly the same values (the permutation moves whole rows of blocks).
#[test]
fn gguf_k_quant_tensors_load_and_native_keeps_their_blocks() {
    use std::sync::Arc;
    use tensor_peft_models::BaseDType;
    use tensor_peft_models::fused::FrozenMatrix;
    use tensor_peft_models::gguf::{Gguf, dequantize};
    let (bytes, data) = k_quant_gguf(&mut Rng(24));
    let gguf = Arc::new(Gguf::parse(bytes, "k.gguf".as_ref()).unwrap());
    let spec = gguf.arch_spec().unwrap();
    let device = Default::default();
    let (head_dim, n) = (128, 256);
    let cases = [
        ("q_proj", "blk.0.attn_q.weight", BlockFormat::Q4_K, true),
        ("k_proj", "blk.0.attn_k.weight", BlockFormat::Q5_0, true),
        ("v_proj", "blk.0.attn_v.weight", BlockFormat::Q6_K, false),
        ("o_proj", "blk.0.attn_output.weight", BlockFormat::Q5_K, false),
    ];
    let mut f32_weights = gguf.hf_weights(&spec).unwrap().with_base_dtype(BaseDType::F32);
    let mut native_weights = gguf.hf_weights(&spec).unwrap().with_base_dtype(BaseDType::Native);
    for ((proj, gguf_name, format, permuted), data) in cases.into_iter().zip(data) {
        let name = format!("model.layers.0.self_attn.{proj}.weight");
        let t = gguf.tensors.iter().find(|t| t.name == gguf_name).unwrap();
        let (_, file_values) = gguf.dequantize_tensor(t).unwrap();
        // The independent route: the tensor's bytes dequantized as one run of blocks, then HF row
        // h·d_h + s·d_h/2 + i taken from GGUF row h·d_h + 2i + s for q and k.
        assert_eq!(dequantize(format.ggml_type(), &data, n * n).unwrap(), file_values, "{proj}");
        let hf_row = |r: usize| {
            let (h, j) = (r / head_dim, r % head_dim);
            let src = if permuted { h * head_dim + 2 * (j % (head_dim / 2)) + j / (head_dim / 2) } else { r };
            &file_values[src * n..(src + 1) * n]
        };
        let FrozenMatrix::Values(w) = f32_weights.take_transposed::<B>(&name, [n, n], &device).unwrap() else {
            panic!("{proj}: f32 base holds values")
        };
        let w: Vec<f32> = w.transpose().into_data().convert::<f32>().to_vec().unwrap();
        for r in 0..n {
            assert_eq!(&w[r * n..(r + 1) * n], hf_row(r), "{proj} row {r}");
        }
        let FrozenMatrix::Blocks(m) = native_weights.take_transposed::<B>(&name, [n, n], &device).unwrap() else {
            panic!("{proj}: native base keeps blocks")
        };
        assert_eq!((m.format, m.d_in, m.d_out), (format, n, n));
        let native: Vec<f32> = m.dequantize().transpose().into_data().convert::<f32>().to_vec().unwrap();
        assert_eq!(native, w, "{proj}: native blocks dequantize to the f32 load");
    }
}

#[test]
fn extra_trainables_norms_and_classification_head() {
    use burn::module::Module;
    let device = Default::default();
    let (llama, spec) = Llama::<AB>::from_hf_dir(&fixture(), &device).unwrap();
    let lora = MethodConfig::from_name("lora").unwrap();
    type Visit<'a> = &'a dyn Fn(&mut dyn FnMut(bool, usize));
    let trainable = |m: Visit| {
        let mut n = 0;
        m(&mut |req, count| {
            if req {
                n += count
            }
        });
        n
    };
    struct Count<'a>(&'a mut dyn FnMut(bool, usize));
    impl<B: Backend> ModuleVisitor<B> for Count<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            (self.0)(p.val().is_require_grad(), p.val().shape().num_elements());
        }
    }
    let adapted = llama.adapt(&spec, &lora, &Targets::Default).unwrap().train_norms();
    let n = trainable(&|f| adapted.visit(&mut Count(f)));
    // LoRA r=8 on q,v of 2 layers (32→32 and 32→16) + 5 RMSNorms of width 32.
    assert_eq!(n, 2 * 8 * (64 + 48) + 5 * 32);
    if let Some(dir) = minilm() {
        let (bert, spec) = tensor_peft_models::Bert::<AB>::from_hf_dir(&dir, &device).unwrap();
        let classifier =
            tensor_peft_models::SequenceClassifier::new(bert.adapt(&spec, &lora, &Targets::Default).unwrap(), 3);
        let n = trainable(&|f| classifier.visit(&mut Count(f)));
        assert_eq!(n, 6 * 2 * 8 * 768 + 384 * 3 + 3);
        let ids =
            Tensor::<AB, 2, Int>::from_data(TensorData::new(vec![101i64, 2054, 102, 101, 102, 0], [2, 3]), &device);
        let mask = Tensor::<AB, 2>::from_data(TensorData::new(vec![1.0f32, 1.0, 1.0, 1.0, 1.0, 0.0], [2, 3]), &device);
        assert_eq!(classifier.forward(ids, None, mask).dims(), [2, 3]);
    }
}

/// Writes a random BERT (HF layout) into `dir`, as the tests' own small checkpoint.
fn write_tiny_bert(dir: &std::path::Path, with_pooler: bool, model_type: &str) {
    use safetensors::{Dtype, serialize, tensor::TensorView};
    let (d, i, layers, vocab, positions) = (16usize, 32usize, 2usize, 30usize, 20usize);
    let config = serde_json::json!({"model_type": model_type, "hidden_size": d, "intermediate_size": i, "num_hidden_layers": layers,
        "num_attention_heads": 2, "vocab_size": vocab, "max_position_embeddings": positions, "type_vocab_size": 2, "layer_norm_eps": 1e-12});
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.word_embeddings.weight".into(), vec![vocab, d]),
        ("embeddings.position_embeddings.weight".into(), vec![positions, d]),
        ("embeddings.token_type_embeddings.weight".into(), vec![2, d]),
        ("embeddings.LayerNorm.weight".into(), vec![d]),
        ("embeddings.LayerNorm.bias".into(), vec![d]),
    ];
    for l in 0..layers {
        let p = format!("encoder.layer.{l}.");
        for (name, out, inp) in [
            ("attention.self.query", d, d),
            ("attention.self.key", d, d),
            ("attention.self.value", d, d),
            ("attention.output.dense", d, d),
            ("intermediate.dense", i, d),
            ("output.dense", d, i),
        ] {
            shapes.push((format!("{p}{name}.weight"), vec![out, inp]));
            shapes.push((format!("{p}{name}.bias"), vec![out]));
        }
        for norm in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{p}{norm}.weight"), vec![d]));
            shapes.push((format!("{p}{norm}.bias"), vec![d]));
        }
    }
    if with_pooler {
        shapes.push(("pooler.dense.weight".into(), vec![d, d]));
        shapes.push(("pooler.dense.bias".into(), vec![d]));
    }
    let mut state = 11u64;
    let data: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, s)| {
            (0..s.iter().product::<usize>())
                .flat_map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView)> = shapes
        .iter()
        .zip(&data)
        .map(|((n, s), d)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), d).unwrap()))
        .collect();
    std::fs::write(dir.join("model.safetensors"), serialize(views, None).unwrap()).unwrap();
}

#[test]
fn tiny_bert_loads_and_padding_does_not_leak() {
    use tensor_peft_models::Bert;
    let device = Default::default();
    let dir = std::env::temp_dir().join(format!("tpeft-tiny-bert-{}", std::process::id()));
    write_tiny_bert(&dir, false, "bert");
    let (bert, spec) = Bert::<B>::from_hf_dir(&dir, &device).unwrap();
    assert!(bert.pooler.is_none());
    assert_eq!(spec.base_num_params(), bert.num_params() + 16 * 16 + 16); // the spec counts a pooler
    let ids = tokens::<B>(&[vec![2, 7, 9, 4, 5], vec![3, 8, 1, 0, 0]], &device);
    let mask =
        Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], [2, 5]), &device);
    let hidden = bert.forward(ids, None, mask);
    assert_eq!(hidden.dims(), [2, 5, 16]);
    // The padded row's real tokens equal the same sentence run alone.
    let alone = values(bert.forward(tokens::<B>(&[vec![3, 8, 1]], &device), None, Tensor::ones([1, 3], &device)));
    let padded = values(hidden.narrow(0, 1, 1).narrow(1, 0, 3));
    let max_err = alone.iter().zip(&padded).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_err < 1e-5, "padding leaked into real tokens: {max_err}");
    // A LLaMA checkpoint directory is refused as a BERT one, naming the field.
    let err = Bert::<B>::from_hf_dir(&fixture(), &device).unwrap_err().to_string();
    assert!(err.contains("model_type"), "{err}");
    write_tiny_bert(&dir, true, "bert");
    assert!(Bert::<B>::from_hf_dir(&dir, &device).unwrap().0.pooler.is_some());
    // RoBERTa numbers positions from padding_idx + 1 = 2: the last usable position is 19 of 20.
    write_tiny_bert(&dir, false, "roberta");
    let (roberta, _) = Bert::<B>::from_hf_dir(&dir, &device).unwrap();
    assert_eq!(roberta.position_offset, 2);
    let long: Vec<i64> = (0..18).collect();
    assert_eq!(
        roberta.forward(tokens::<B>(&[long], &device), None, Tensor::ones([1, 18], &device)).dims(),
        [1, 18, 16]
    );
    // A fresh classification head starts as transformers' does: weight N(0, 0.02²), zero bias
    // (Burn's default uniform ±1/√16 would give a std of 0.14).
    let head = tensor_peft_models::SequenceClassifier::new(roberta, 64).head;
    let w = values(head.weight.val());
    let std = (w.iter().map(|v| v * v).sum::<f64>() / w.len() as f64).sqrt();
    assert!((std / tensor_peft_models::HEAD_INIT_STD - 1.0).abs() < 0.1, "head weight std {std}");
    assert!(values(head.bias.unwrap().val()).iter().all(|&b| b == 0.0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn adapter_files_round_trip_for_every_method() {
    use tensor_peft_models::adapter_file::{AdapterConfig, BaseModelIdentity, load_adapter, save_adapter};
    let (base, spec, x) = tiny_llama_and_input();
    let dir = std::env::temp_dir().join(format!("tpeft-adapter-{}", std::process::id()));
    // Randomises every trainable factor so the round trip cannot pass by accident.
    struct Noise(u64);
    impl<Bk: Backend> burn::module::ModuleMapper<Bk> for Noise {
        fn map_float<const D: usize>(&mut self, p: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
            let (id, t, mapper) = p.consume();
            if !t.is_require_grad() {
                return Param::from_mapped_value(id, t, mapper);
            }
            let dims = t.dims();
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect();
            let fresh = Tensor::from_data(TensorData::new(values, dims), &t.device()).set_require_grad(true);
            Param::from_mapped_value(id, fresh, mapper)
        }
    }
    let mut configs: Vec<(MethodConfig, Targets)> =
        METHOD_NAMES.iter().map(|n| (MethodConfig::from_name(n).unwrap(), Targets::Default)).collect();
    configs.push((MethodConfig::from_name("tt-lora").unwrap(), Targets::Regex(r".*\.(q_proj|down_proj)".into())));
    for (method, targets) in configs {
        let adapted = base.clone().adapt(&spec, &method, &targets).unwrap().map(&mut Noise(5));
        // Logits on the inner backend: no autodiff, so no dropout.
        let logits = |m: &Llama<AB>| values(m.valid().forward(x.clone().inner()));
        let before = logits(&adapted);
        let base_logits = logits(&base);
        let change = before.iter().zip(&base_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(change > 1e-3, "{}: the randomised adapter must change the logits", method.name());
        let mut adapted = adapted;
        let config = AdapterConfig {
            method: method.clone(),
            target_modules: match &targets {
                Targets::Names(n) => Some(n.clone()),
                _ => None,
            },
            target_regex: match &targets {
                Targets::Regex(r) => Some(r.clone()),
                _ => None,
            },
            base_model_name_or_path: "tiny-llama".into(),
            base_model: Some(BaseModelIdentity::of(&spec)),
            peft_type: if method.name() == "lora" { "LORA".into() } else { method.name().into() },
            library_version: "test".into(),
            task: None,
        };
        let _ = std::fs::remove_dir_all(&dir);
        save_adapter(&mut adapted, &spec, &config, &dir).unwrap();
        let mut fresh = base.clone();
        load_adapter(&mut fresh, &spec, &dir).unwrap();
        assert_eq!(logits(&fresh), before, "{}: loaded adapter gives other logits", method.name());
        if method.name() == "lora" {
            // PEFT's layout: lora_A [r, in], lora_B [out, r].
            let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let a = file.tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
            let b = file.tensor("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight").unwrap();
            assert_eq!((a.shape(), b.shape()), (&[8usize, 32][..], &[16usize, 8][..]));
        }
        if method.name() == "lotr" {
            let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
            let names = safetensors::SafeTensors::deserialize(&bytes).unwrap().names().len();
            // q and v have different shapes (GQA): two families, each stored once, + one core per site.
            assert_eq!(names, 2 * 2 + 4);
        }
    }
    // A different base model is refused before anything is loaded; so is a tampered file.
    let mut config_text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    config_text = config_text.replace("\"hidden\": 32", "\"hidden\": 64");
    std::fs::write(dir.join("adapter_config.json"), &config_text).unwrap();
    let mut fresh = base.clone();
    let err = load_adapter(&mut fresh, &spec, &dir).unwrap_err().to_string();
    assert!(err.contains("trained on a base model"), "{err}");
    assert!(fresh.layers[0].q_proj.adapter.is_none(), "nothing may be touched on refusal");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn reads_a_lora_adapter_written_by_peft() {
    use tensor_peft_models::adapter_file::load_adapter;
    let device = Default::default();
    let (mut model, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let dir = fixture().join("../tiny-llama-peft-lora");
    let config = load_adapter(&mut model, &spec, &dir).unwrap();
    assert_eq!(config.peft_type, "LORA");
    assert!(config.base_model.is_none());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let reference: Vec<f64> = json["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let (ids, _, base_logits) = expected();
    let got = values(model.forward(tokens::<B>(&ids, &device)));
    let max_err = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    let change = base_logits.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(change > 0.1, "the PEFT adapter should change the logits");
    assert!(max_err < 1e-4, "logits differ from PEFT's by {max_err}");
}

#[test]
fn merge_and_export_an_hf_model() {
    use tensor_peft_models::adapter_file::load_adapter;
    let device = Default::default();
    let (mut model, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let peft = fixture().join("../tiny-llama-peft-lora");
    load_adapter(&mut model, &spec, &peft).unwrap();
    let (ids, _, _) = expected();
    let adapted = values(model.forward(tokens::<B>(&ids, &device)));
    let merged = model.merge_adapters().unwrap();
    assert!(merged.layers.iter().all(|l| l.q_proj.adapter.is_none() && l.v_proj.adapter.is_none()));
    let dir = std::env::temp_dir().join(format!("tpeft-merged-{}", std::process::id()));
    merged.save_hf(&spec, &dir).unwrap();
    let (reloaded, spec2) = Llama::<B>::from_hf_dir(&dir, &device).unwrap();
    assert_eq!(spec2.hidden, spec.hidden);
    let got = values(reloaded.forward(tokens::<B>(&ids, &device)));
    let max_err = got.iter().zip(&adapted).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    assert!(max_err < 1e-4, "merged and exported model differs from the adapted one by {max_err}");
    // Nonlinear bottleneck adapters are refused.
    let (base, _) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let adp = base.adapt(&spec, &MethodConfig::from_name("loretta-adp").unwrap(), &Targets::Default).unwrap();
    assert!(adp.merge_adapters().unwrap_err().to_string().contains("nonlinear"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Knuth's MMIX linear congruential generator, for seeded random inputs (its high 32 bits).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 32
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Fuzzing without a harness: parsers of untrusted bytes get seeded random and mutated inputs and
/// must return `Err` (or `Ok`), never panic. The counts are reported in RELIABILITY.md.
#[test]
fn parsers_of_untrusted_input_never_panic() {
    let dir = std::env::temp_dir().join(format!("tpeft-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Rng(2026);
    let mut executions = 0usize;
    // safetensors: truncations, byte flips and header-length rewrites of a real checkpoint.
    let original = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let path = dir.join("fuzz.safetensors");
    for i in 0..600 {
        let mut bytes = original.clone();
        match i % 3 {
            0 => bytes.truncate(rng.below(original.len())),
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let k = rng.below(bytes.len().min(4096));
                    bytes[k] = rng.next() as u8;
                }
            }
            _ => bytes[..8].copy_from_slice(&(rng.next() % (1 << 40)).to_le_bytes()),
        }
        std::fs::write(&path, &bytes).unwrap();
        let result = std::panic::catch_unwind(|| {
            let mut w = tensor_peft_models::Weights::default();
            w.add_file(&path).map(|_| w.len())
        });
        assert!(result.is_ok(), "safetensors case {i} panicked");
        executions += 1;
    }
    // config.json: random JSON values in every field of a real config.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let junk = |rng: &mut Rng| -> serde_json::Value {
        match rng.below(7) {
            0 => serde_json::json!(null),
            1 => serde_json::json!(-(rng.below(1000) as i64)),
            2 => serde_json::json!(0),
            3 => serde_json::json!(rng.next()),
            4 => serde_json::json!("llama"),
            5 => serde_json::json!(1e300),
            _ => serde_json::json!([1, 2]),
        }
    };
    let keys: Vec<String> = config.as_object().unwrap().keys().cloned().collect();
    for i in 0..1500 {
        let mut c = config.clone();
        for _ in 0..1 + rng.below(3) {
            let key = &keys[rng.below(keys.len())];
            if rng.below(4) == 0 {
                c.as_object_mut().unwrap().remove(key);
            } else {
                c[key] = junk(&mut rng);
            }
        }
        let result = std::panic::catch_unwind(|| {
            ArchSpec::from_config_json(&c, std::path::Path::new("config.json")).map(|s| s.base_num_params())
        });
        assert!(result.is_ok(), "config case {i} panicked: {c}");
        executions += 1;
    }
    // TT shape strings.
    let alphabet = b"0123456789,, x-+.e ";
    for i in 0..3000 {
        let s: String = (0..rng.below(24)).map(|_| alphabet[rng.below(alphabet.len())] as char).collect();
        let result = std::panic::catch_unwind(|| tensor_peft_adapters::tensor::shape::parse_shape(&s).map(|v| v.len()));
        assert!(result.is_ok(), "shape case {i} panicked: {s:?}");
        executions += 1;
    }
    // GGUF with K-quant and Q5_0 tensors: truncations and byte flips, parsed and every tensor
    // dequantized (through the llama mapping when the metadata still parses).
    let (original, _) = k_quant_gguf(&mut rng);
    for i in 0..300 {
        let mut bytes = original.clone();
        if i % 2 == 0 {
            bytes.truncate(rng.below(original.len()));
        } else {
            for _ in 0..1 + rng.below(8) {
                // Mostly the header and tensor table (the first KiB), where a flip changes the layout.
                let span = if rng.below(4) == 0 { bytes.len() } else { 1024 };
                let k = rng.below(span);
                bytes[k] = rng.next() as u8;
            }
        }
        let result = std::panic::catch_unwind(|| {
            let Ok(g) = tensor_peft_models::gguf::Gguf::parse(bytes, "fuzz.gguf".as_ref()) else { return };
            for t in &g.tensors {
                let _ = g.dequantize_tensor(t);
            }
            let g = std::sync::Arc::new(g);
            if let Ok(spec) = g.arch_spec() {
                let _ = g.hf_weights(&spec);
            }
        });
        assert!(result.is_ok(), "GGUF case {i} panicked");
        executions += 1;
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("fuzz executions: {executions}");
}

/// Fuzzing the GGUF tokenizer rebuild: random junk in, removal of, and truncation or corruption
/// of entries of the `tokenizer.*` metadata of both fixtures; every case is an `Err` or a
/// tokenizer that encodes and decodes, never a panic.
#[test]
fn gguf_tokenizer_metadata_never_panics() {
    use tensor_peft_models::gguf::{Gguf, MetaValue};
    use tensor_peft_models::tokenizer::TextTokenizer;
    let (dir, expected) = gguf_tokenizers();
    let text = expected["texts"][0].as_str().unwrap().to_string() + " <s><|begin_of_text|>😀";
    let mut rng = Rng(24);
    let junk = |rng: &mut Rng| match rng.below(9) {
        0 => MetaValue::Str(String::new()),
        1 => MetaValue::Str(["llama", "gpt2", "llama-bpe", "smollm", "<s>", "a b"][rng.below(6)].into()),
        2 => MetaValue::Uint(rng.next() % 700),
        3 => MetaValue::Int(-(rng.below(3) as i64)),
        4 => MetaValue::Bool(rng.below(2) == 0),
        5 => MetaValue::Float(f64::NAN),
        6 => MetaValue::Array(vec![]),
        7 => MetaValue::Array(vec![MetaValue::Str(String::new()), MetaValue::Str(" ".into())]),
        _ => MetaValue::Array(vec![MetaValue::Int(3); 4]),
    };
    let (mut executions, mut accepted) = (0, 0);
    for name in ["spm.gguf", "bpe.gguf"] {
        let mut gguf = Gguf::open(&dir.join(name)).unwrap();
        let original = gguf.metadata.clone();
        let keys: Vec<String> = original.keys().filter(|k| k.starts_with("tokenizer.")).cloned().collect();
        for i in 0..400 {
            gguf.metadata = original.clone();
            for _ in 0..1 + rng.below(2) {
                let key = &keys[rng.below(keys.len())];
                match (rng.below(4), gguf.metadata.get_mut(key)) {
                    (0, _) => drop(gguf.metadata.remove(key)),
                    (1, Some(MetaValue::Array(a))) => a.truncate(rng.below(a.len() + 1)),
                    (2, Some(MetaValue::Array(a))) if !a.is_empty() => {
                        let k = rng.below(a.len());
                        a[k] = junk(&mut rng);
                    }
                    _ => drop(gguf.metadata.insert(key.clone(), junk(&mut rng))),
                }
            }
            let gguf = std::panic::AssertUnwindSafe(&gguf);
            let result = std::panic::catch_unwind(|| {
                let tokenizer = TextTokenizer::from_gguf(&gguf)?;
                let ids = tokenizer.encode_with_specials(&text)?;
                tokenizer.decode(&ids).map(|_| ())
            });
            assert!(result.is_ok(), "{name} case {i} panicked");
            accepted += usize::from(matches!(result, Ok(Ok(()))));
            executions += 1;
        }
    }
    println!("tokenizer metadata fuzz executions: {executions} ({accepted} still load)");
}

/// Our GELU against Burn's (exact erf GELU) and a float64 reference on a grid over [−8, 8]: the
/// value to 5e-7 of both, the gradient to 1e-6 of `Φ(x) + x·φ(x)` in float64 (Φ integrated from
/// φ by Simpson's rule), with and without autodiff.
#[test]
fn gelu_with_supplied_derivative_matches_exact_gelu() {
    type AB = Autodiff<B>;
    let device = Default::default();
    let grid: Vec<f32> = (0..=1600).map(|i| -8.0 + i as f32 * 0.01).collect();
    let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    // Φ at the grid points: Φ(−8) ≈ φ(8)/8·(1 − 1/64), then Simpson over each step.
    let mut cdf = vec![pdf(8.0) / 8.0 * (1.0 - 1.0 / 64.0)];
    for w in grid.windows(2) {
        let (a, b) = (w[0] as f64, w[1] as f64);
        let n = 16;
        let h = (b - a) / n as f64;
        let sum: f64 = (0..=n)
            .map(|k| {
                pdf(a + k as f64 * h)
                    * if k == 0 || k == n {
                        1.0
                    } else if k % 2 == 1 {
                        4.0
                    } else {
                        2.0
                    }
            })
            .sum();
        cdf.push(cdf.last().unwrap() + sum * h / 3.0);
    }
    let input = |x: &[f32]| Tensor::<AB, 1>::from_data(TensorData::new(x.to_vec(), [x.len()]), &device).require_grad();
    let values = |t: Tensor<AB, 1>| t.to_data().to_vec::<f32>().unwrap();
    let weight = |x: f32| 1.0 + 0.1 * x; // a weighted sum: every element gets its own gradient
    let weights = Tensor::<AB, 1>::from_data(
        TensorData::new(grid.iter().map(|&v| weight(v)).collect::<Vec<f32>>(), [grid.len()]),
        &device,
    );

    let x = input(&grid);
    let ours = tensor_peft_models::fused::gelu(x.clone());
    let burns = burn::tensor::activation::gelu(Tensor::<AB, 1>::from_data(
        TensorData::new(grid.clone(), [grid.len()]),
        &device,
    ));
    for (i, (a, b)) in values(ours.clone()).iter().zip(values(burns)).enumerate() {
        let exact = grid[i] as f64 * cdf[i];
        assert!((a - b).abs() <= 5e-7, "gelu({}) = {a}, Burn: {b}", grid[i]);
        assert!((*a as f64 - exact).abs() <= 5e-7, "gelu({}) = {a}, float64: {exact}", grid[i]);
    }
    let grads = (ours * weights).sum().backward();
    for (i, g) in x.grad(&grads).unwrap().to_data().to_vec::<f32>().unwrap().iter().enumerate() {
        let x = grid[i] as f64;
        let exact = (cdf[i] + x * pdf(x)) * weight(grid[i]) as f64;
        assert!((*g as f64 - exact).abs() <= 1e-6, "gelu'({x})·w = {g}, float64: {exact}");
    }
    // Inference backend: the value only, the same numbers.
    let plain = tensor_peft_models::fused::gelu(Tensor::<B, 1>::from_data(
        TensorData::new(grid.clone(), [grid.len()]),
        &device,
    ));
    let reference =
        burn::tensor::activation::gelu(Tensor::<B, 1>::from_data(TensorData::new(grid.clone(), [grid.len()]), &device));
    let diff = (plain - reference).abs().max().into_scalar();
    assert!(diff <= 5e-7, "{diff}");
}

/// Base dtypes that cannot be held are refused when loading, naming the file and what to use:
/// ndarray stores no half-precision floats, blocks need rows of whole blocks.
#[test]
fn unsupported_base_dtypes_are_refused_with_the_reason() {
    use tensor_peft_models::BaseDType;
    let device = Default::default();
    let err = Llama::<B>::from_hf_dir_as(&fixture(), &device, BaseDType::Bf16).unwrap_err().to_string();
    assert!(err.contains("model.safetensors") && err.contains("cannot hold BF16"), "{err}");
    let spec = ArchSpec::preset("llama2-7b").unwrap();
    let err = Llama::<B>::random_as(&spec, &device, BaseDType::F16).err().unwrap().to_string();
    assert!(err.contains("cannot hold F16"), "{err}");
    // A row of 48 weights is not whole 32-weight blocks.
    let mut spec = ArchSpec::preset("llama2-7b").unwrap();
    (spec.layers, spec.hidden, spec.intermediate, spec.heads, spec.kv_heads, spec.vocab) = (1, 48, 64, 4, 4, 16);
    spec.head_dim = 12;
    let err = Llama::<B>::random_as(&spec, &device, BaseDType::Q4_0).err().unwrap().to_string();
    assert!(err.contains("Q4_0") && err.contains("48"), "{err}");
    // f32 and `native` of an f32 file load as before.
    let (model, _) = Llama::<B>::from_hf_dir_as(&fixture(), &device, BaseDType::Native).unwrap();
    assert_eq!(model.embed_tokens.weight.val().dtype(), burn::tensor::DType::F32);
}

/// A quantized base (`q8_0`, `q4_0`) holds every projection as blocks and computes what an f32
/// model holding the dequantized weights computes: logits, and the gradients of a LoRA adapter on
/// it. On ndarray the blocks are dequantized on the host for each product (the op chain's path), on
/// flex inside the fused kernels (`fused_on_flex` checks that path against this one).
#[test]
fn quantized_base_computes_what_an_f32_model_of_its_dequantized_weights_computes() {
    quantized_base_matches_its_dequantization::<AB>();
}

/// The largest absolute difference between two equally long value lists.
fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn quantized_base_matches_its_dequantization<Bk: AutodiffBackend>() {
    use tensor_peft_adapters::FrozenLinear;
    use tensor_peft_models::BaseDType;
    use tensor_peft_models::adapter_file::load_adapter;
    use tensor_peft_models::fused::FrozenMatrix;
    use tensor_peft_models::layout::LayoutBlock;
    let device = Default::default();
    let (ids, _, _) = expected();
    let lora = fixture().join("../tiny-llama-peft-lora");
    let run = |model: Llama<Bk>, spec: &ArchSpec| {
        let mut model = model;
        load_adapter(&mut model, spec, &lora).unwrap();
        let logits = model.forward(tokens::<Bk>(&ids, &device));
        let weights: Vec<f32> =
            (0..logits.shape().num_elements()).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
        let weights = Tensor::<Bk, 3>::from_data(TensorData::new(weights, logits.dims()), &device);
        let grads = (logits.clone() * weights).sum().backward();
        let mut grad_values = Vec::new();
        for layer in &model.layers {
            for p in layer.projections() {
                if let Some(tensor_peft_adapters::LinearAdapter::Lora(l)) = &p.adapter {
                    grad_values.push(values(l.a.val().grad(&grads).unwrap()));
                    grad_values.push(values(l.b.val().grad(&grads).unwrap()));
                }
            }
        }
        (values(logits), grad_values)
    };
    let (exact, spec) = Llama::<Bk>::from_hf_dir(&fixture(), &device).unwrap();
    let (exact_logits, _) = run(exact, &spec);
    for (base, format) in [(BaseDType::Q8_0, "Q8_0"), (BaseDType::Q4_0, "Q4_0")] {
        let (quantized, spec) = Llama::<Bk>::from_hf_dir_as(&fixture(), &device, base).unwrap();
        let storages: Vec<String> =
            quantized.layers.iter().flat_map(|l| l.projections()).map(|p| p.base.storage()).collect();
        assert!(storages.len() == 14 && storages.iter().all(|s| s == format), "{storages:?}");
        // The reference: the same model with every projection replaced by its f32 dequantization.
        let mut reference = quantized.clone();
        for layer in &mut reference.layers {
            for p in layer.projections_mut() {
                p.base = FrozenLinear::new(FrozenMatrix::Values(p.base.weight_f32()));
            }
        }
        let (logits, grads) = run(quantized, &spec);
        let (ref_logits, ref_grads) = run(reference, &spec);
        let err = max_diff(&logits, &ref_logits);
        assert!(err < 1e-5, "{format}: logits differ from the dequantized f32 model's by {err}");
        assert_eq!(grads.len(), ref_grads.len());
        assert!(grads.len() >= 4);
        for (i, (g, r)) in grads.iter().zip(&ref_grads).enumerate() {
            let scale = r.iter().fold(1e-6f64, |m, v| m.max(v.abs()));
            let err = max_diff(g, r) / scale;
            assert!(err < 1e-5, "{format}: adapter gradient {i} differs by {err} (relative)");
        }
        // Against the unquantized model the logits move only by the quantization error.
        let moved = max_diff(&logits, &exact_logits);
        let scale = exact_logits.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(moved > 0.0 && moved < scale, "{format}: quantization moved the logits by {moved} (scale {scale})");
    }
}

/// The fused kernels that run on flex (`fused` module) against Burn's op chains on ndarray, the
/// path every other backend takes: values and gradients, op by op and through a whole model.
#[cfg(feature = "flex")]
mod fused_on_flex {
    use super::*;
    use burn::backend::Flex;
    use tensor_peft_models::fused::{self, AttentionMask, KeyPadding, Rope};
    use tensor_peft_models::{RopeConfig, RopeScaling};

    type F = Autodiff<Flex>;
    type N = Autodiff<NdArray>;

    /// Deterministic values in [−2, 2) (splitmix64), shared by both backends.
    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    fn input<Bk: Backend, const D: usize>(shape: [usize; D], seed: u64) -> Tensor<Bk, D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(data(n, seed), shape), &Default::default())
    }

    fn floats<Bk: Backend, const D: usize>(t: Tensor<Bk, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
    }

    /// `max |a − b| ≤ tol · max(1, max |b|)`.
    fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        eprintln!("{what}: max |difference| {err:.1e} (scale {scale:.2})");
        assert!(err <= tol * scale, "{what}: fused vs op chain differ by {err} (scale {scale})");
    }

    /// Runs `op` on flex and on ndarray with the same inputs (tracked), and compares the output and
    /// the gradients of `Σ out ⊙ w` for a fixed weight `w`.
    fn compare<const D: usize, const O: usize>(
        what: &str,
        shapes: &[[usize; D]],
        op_f: impl Fn(Vec<Tensor<F, D>>) -> Tensor<F, O>,
        op_n: impl Fn(Vec<Tensor<N, D>>) -> Tensor<N, O>,
    ) {
        compare_on(what, shapes, op_f, op_n, 2e-6);
    }

    /// Runs `op` on flex and on the backend `X` with the same inputs (tracked), and compares the
    /// output (within `output_tol`, relative to the larger of 1 and `X`'s largest value) and the
    /// gradients of `Σ out ⊙ w` for a fixed weight `w` (within 1e-5).
    fn compare_on<X: AutodiffBackend, const D: usize, const O: usize>(
        what: &str,
        shapes: &[[usize; D]],
        op_f: impl Fn(Vec<Tensor<F, D>>) -> Tensor<F, O>,
        op_x: impl Fn(Vec<Tensor<X, D>>) -> Tensor<X, O>,
        output_tol: f32,
    ) {
        let xs_f: Vec<Tensor<F, D>> =
            shapes.iter().enumerate().map(|(i, &s)| input::<F, D>(s, i as u64 + 1).require_grad()).collect();
        let xs_x: Vec<Tensor<X, D>> =
            shapes.iter().enumerate().map(|(i, &s)| input::<X, D>(s, i as u64 + 1).require_grad()).collect();
        let (out_f, out_x) = (op_f(xs_f.clone()), op_x(xs_x.clone()));
        assert_eq!(out_f.dims(), out_x.dims(), "{what}: output shape");
        let w_f = input::<F, O>(out_f.dims(), 99);
        let w_x = input::<X, O>(out_x.dims(), 99);
        assert_close(&format!("{what}: output"), &floats(out_f.clone()), &floats(out_x.clone()), output_tol);
        let (g_f, g_x) = ((out_f * w_f).sum().backward(), (out_x * w_x).sum().backward());
        for (i, (x_f, x_x)) in xs_f.iter().zip(&xs_x).enumerate() {
            let (a, b) = (x_f.grad(&g_f).unwrap(), x_x.grad(&g_x).unwrap());
            assert_eq!(a.dims(), b.dims(), "{what}: gradient {i} shape");
            assert_close(&format!("{what}: gradient {i}"), &floats(a), &floats(b), 1e-5);
        }
    }

    #[test]
    fn swiglu_rms_norm_and_rope_match_the_op_chains() {
        // Odd widths exercise the kernels' vector tails.
        compare(
            "swiglu",
            &[[2, 3, 37], [2, 3, 37]],
            |x| fused::swiglu(x[0].clone(), x[1].clone()),
            |x| fused::swiglu(x[0].clone(), x[1].clone()),
        );
        // γ enters as a rank-3 `[1, 1, d]` input here so that its gradient is compared too.
        let norm = |x: &[Tensor<F, 3>]| fused::rms_norm(x[0].clone(), x[1].clone().reshape([29]), 1e-5);
        let norm_n = |x: &[Tensor<N, 3>]| fused::rms_norm(x[0].clone(), x[1].clone().reshape([29]), 1e-5);
        compare("rms_norm", &[[2, 5, 29], [1, 1, 29]], |x| norm(&x), |x| norm_n(&x));
        // YaRN scales cos and sin, so the rotation is not orthogonal there: its backward too.
        let yarn = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_positions: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attention_factor: 1.2,
                truncate: true,
            },
        };
        for (start, heads, rope) in [(0, 3, RopeConfig::default()), (4, 2, yarn)] {
            let rope_f = Rope::<F>::new(start, 5, 8, &rope, &[heads], &Default::default());
            let rope_n = Rope::<N>::new(start, 5, 8, &rope, &[heads], &Default::default());
            compare(
                &format!("rope from {start}"),
                &[[2, 5, heads, 8]],
                |x| rope_f.apply(x[0].clone()),
                |x| rope_n.apply(x[0].clone()),
            );
        }
    }

    #[test]
    fn attention_matches_the_op_chain_with_grouped_heads_and_a_cache_offset() {
        // (heads, kv heads, queries, keys): grouped-query with two cached positions; plain
        // multi-head self-attention; one query against a cache (decoding).
        // The last two: a sliding window of 3 keys (Mistral), with a cache and without.
        for (heads, kv, t_q, t_k, window) in
            [(6, 2, 5, 7, None), (4, 4, 9, 9, None), (4, 2, 1, 6, None), (4, 2, 5, 7, Some(3)), (4, 4, 9, 9, Some(3))]
        {
            let offset = t_k - t_q;
            let shapes = [[2, t_q, heads, 8], [2, t_k, kv, 8], [2, t_k, kv, 8]];
            let mask_f = AttentionMask::Causal { offset, window };
            let mask_n = AttentionMask::Causal { offset, window };
            compare(
                &format!("causal attention {heads}/{kv} heads, {t_q} queries, {t_k} keys, window {window:?}"),
                &shapes,
                |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_f),
                |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_n),
            );
        }
    }

    /// The weight input `x[1]`, as given or (`transposed`) as a view of its transpose.
    fn weight_of<Bk: Backend>(x: &[Tensor<Bk, 2>], transposed: bool) -> Tensor<Bk, 2> {
        if transposed { x[1].clone().transpose() } else { x[1].clone() }
    }

    /// A `[1, n]` input at `i`, if there is one, as a bias `[n]`.
    fn bias_of<Bk: Backend>(x: &[Tensor<Bk, 2>], i: usize) -> Option<Tensor<Bk, 1>> {
        x.get(i).map(|b| b.clone().reshape([b.dims()[1]]))
    }

    /// `fused::linear` on `[x, weight, (bias)]` inputs.
    fn linear_of<Bk: Backend>(x: &[Tensor<Bk, 2>], transposed: bool) -> Tensor<Bk, 2> {
        fused::linear(x[0].clone(), weight_of(x, transposed), bias_of(x, 2))
    }

    /// `fused::low_rank_linear` without dropout on `[x, weight, a, b, (bias)]` inputs.
    fn low_rank_linear_of<Bk: Backend>(x: &[Tensor<Bk, 2>], transposed: bool) -> Tensor<Bk, 2> {
        let (a, b) = (x[2].clone(), x[3].clone());
        fused::low_rank_linear(x[0].clone(), weight_of(x, transposed), bias_of(x, 4), a, b, 0.0)
    }

    #[test]
    fn linear_matches_burns_with_strided_weights_and_every_gradient() {
        // Weight contiguous `[d_in, d_out]`, or a transposed view of `[d_out, d_in]` (how flex
        // holds widening frozen projections); with and without a bias. The large weights have
        // their output columns split over the threads (uneven blocks), for many rows and for one
        // (decoding).
        let cases: [(&str, &[[usize; 2]], bool); 4] = [
            ("linear", &[[5, 7], [7, 6]], false),
            ("linear, transposed weight, bias", &[[5, 7], [6, 7], [1, 6]], true),
            ("linear, 70 rows, 300 → 250", &[[70, 300], [300, 250]], false),
            ("linear, 1 row, transposed 300 → 251, bias", &[[1, 300], [251, 300], [1, 251]], true),
        ];
        for (what, shapes, transposed) in cases {
            compare(what, shapes, |x| linear_of(&x, transposed), |x| linear_of(&x, transposed));
        }
        // A frozen weight (untracked) gets no gradient and the input's is still exact.
        let w = input::<F, 2>([7, 6], 3);
        let x = input::<F, 2>([5, 7], 4).require_grad();
        let grads = fused::linear(x.clone(), w.clone(), None).sum().backward();
        assert!(w.grad(&grads).is_none());
        let expected = floats(input::<N, 2>([7, 6], 3).sum_dim(1).reshape([1, 7]).repeat_dim(0, 5));
        assert_close("linear: input gradient with a frozen weight", &floats(x.grad(&grads).unwrap()), &expected, 1e-6);
    }

    #[test]
    fn low_rank_linear_matches_the_op_chain_and_every_gradient() {
        // `x·W + bias + (x·a)·b`: contiguous and transposed weights, with and without a bias, and
        // a size large enough for the threaded GEMM path.
        let cases: [(&str, &[[usize; 2]], bool); 2] = [
            ("low-rank linear", &[[5, 7], [7, 6], [7, 3], [3, 6]], false),
            (
                "low-rank linear, transposed weight, bias, 300 rows",
                &[[300, 200], [150, 200], [200, 4], [4, 150], [1, 150]],
                true,
            ),
        ];
        for (what, shapes, transposed) in cases {
            compare(what, shapes, |x| low_rank_linear_of(&x, transposed), |x| low_rank_linear_of(&x, transposed));
        }
        // A frozen weight (as in every adapted model): no gradient for it, and the others exact.
        let run = |x: Tensor<F, 2>, a: Tensor<F, 2>, b: Tensor<F, 2>| {
            let w = input::<F, 2>([7, 6], 2);
            let g = (fused::low_rank_linear(x.clone(), w.clone(), None, a.clone(), b.clone(), 0.0)
                * input::<F, 2>([5, 6], 99))
            .sum()
            .backward();
            assert!(w.grad(&g).is_none());
            [x, a, b].map(|t| floats(t.grad(&g).unwrap()))
        };
        let (x, a, b) = (input::<N, 2>([5, 7], 1), input::<N, 2>([7, 3], 3), input::<N, 2>([3, 6], 4));
        let (x, a, b) = (x.require_grad(), a.require_grad(), b.require_grad());
        let w = input::<N, 2>([7, 6], 2);
        let g = ((x.clone().matmul(w) + x.clone().matmul(a.clone()).matmul(b.clone())) * input::<N, 2>([5, 6], 99))
            .sum()
            .backward();
        let expected = [&x, &a, &b].map(|t| floats(t.grad(&g).unwrap()));
        let got = run(
            input::<F, 2>([5, 7], 1).require_grad(),
            input::<F, 2>([7, 3], 3).require_grad(),
            input::<F, 2>([3, 6], 4).require_grad(),
        );
        for (name, (got, expected)) in ["x", "a", "b"].iter().zip(got.iter().zip(&expected)) {
            assert_close(&format!("low-rank linear, frozen weight: gradient of {name}"), got, expected, 1e-5);
        }
    }

    #[test]
    fn low_rank_linear_with_dropout_equals_the_chain_through_fused_dropout() {
        // The same seed gives the same mask: the fused op (mask applied inside, dX through the
        // mask in one pass) against `linear + linear(linear(fused::dropout(x)))` on flex, values
        // and every gradient.
        let inputs = || {
            [[9, 7], [7, 6], [7, 3], [3, 6], [1, 6]]
                .iter()
                .enumerate()
                .map(|(i, &s)| input::<F, 2>(s, i as u64 + 1).require_grad())
                .collect::<Vec<_>>()
        };
        let run = |fused_op: bool| {
            let x = inputs();
            let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(11);
            let bias = Some(x[4].clone().reshape([6]));
            let y = if fused_op {
                fused::low_rank_linear(x[0].clone(), x[1].clone(), bias, x[2].clone(), x[3].clone(), 0.3)
            } else {
                let update = fused::linear(
                    fused::linear(fused::dropout(x[0].clone(), 0.3), x[2].clone(), None),
                    x[3].clone(),
                    None,
                );
                fused::linear(x[0].clone(), x[1].clone(), bias) + update
            };
            let g = (y.clone() * input::<F, 2>([9, 6], 99)).sum().backward();
            let mut out = vec![floats(y)];
            out.extend(x.iter().map(|t| floats(t.grad(&g).unwrap())));
            out
        };
        let (got, expected) = (run(true), run(false));
        for (i, (got, expected)) in got.iter().zip(&expected).enumerate() {
            assert_close(&format!("low-rank linear with dropout: output/gradient {i}"), got, expected, 1e-6);
        }
        // And the mask is really applied: without it the output differs.
        let x = inputs();
        let unmasked = fused::low_rank_linear(x[0].clone(), x[1].clone(), None, x[2].clone(), x[3].clone(), 0.0);
        let masked = fused::low_rank_linear(x[0].clone(), x[1].clone(), None, x[2].clone(), x[3].clone(), 0.3);
        let diff = floats(unmasked).iter().zip(floats(masked)).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff > 1e-3, "the dropout mask changed nothing");
    }

    #[test]
    fn dropout_keeps_the_expected_fraction_and_its_gradient_uses_the_same_mask() {
        let fresh = || input::<F, 2>([300, 400], 1).add_scalar(3.0).require_grad(); // in [1, 5): never 0
        let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(3);
        let x = fresh();
        let y = fused::dropout(x.clone(), 0.25);
        let (xs, ys) = (floats(x.clone()), floats(y.clone()));
        let kept = ys.iter().filter(|&&v| v != 0.0).count() as f64 / ys.len() as f64;
        assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept} (σ = 0.00125)");
        for (a, b) in xs.iter().zip(&ys) {
            assert!(*b == 0.0 || (b - a / 0.75).abs() <= 1e-6 * b.abs(), "kept values are scaled by 1/0.75");
        }
        // The backward recomputes the forward's mask.
        let w = input::<F, 2>([300, 400], 2);
        let grads = (y * w.clone()).sum().backward();
        let (dx, ws) = (floats(x.grad(&grads).unwrap()), floats(w));
        for ((g, wv), yv) in dx.iter().zip(&ws).zip(&ys) {
            let expected = if *yv == 0.0 { 0.0 } else { wv / 0.75 };
            assert!((g - expected).abs() <= 1e-6 * expected.abs().max(1.0), "gradient {g} vs {expected}");
        }
        // Seeded: the same mask again; the next call draws another; no autodiff, no dropout.
        let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(3);
        assert_eq!(floats(fused::dropout(fresh(), 0.25)), ys);
        assert_ne!(floats(fused::dropout(fresh(), 0.25)), ys);
        let plain = input::<Flex, 2>([3, 4], 1);
        assert_eq!(floats(fused::dropout(plain.clone(), 0.5)), floats(plain));
    }

    #[test]
    fn gelu_layer_norm_and_padded_attention_match_the_op_chains() {
        compare("gelu", &[[3, 41]], |x| fused::gelu(x[0].clone()), |x| fused::gelu(x[0].clone()));
        let norm = |x: &[Tensor<F, 3>]| {
            fused::layer_norm(x[0].clone(), x[1].clone().reshape([19]), x[2].clone().reshape([19]), 1e-12)
        };
        let norm_n = |x: &[Tensor<N, 3>]| {
            fused::layer_norm(x[0].clone(), x[1].clone().reshape([19]), x[2].clone().reshape([19]), 1e-12)
        };
        compare("layer_norm", &[[2, 5, 19], [1, 1, 19], [1, 1, 19]], |x| norm(&x), |x| norm_n(&x));
        // Sequence 0 has no padding, sequence 1 pads its last three keys.
        let mask = [1.0f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.];
        let mask_f =
            KeyPadding::<F>::new(Tensor::from_data(TensorData::new(mask.to_vec(), [2, 7]), &Default::default()), 4);
        let mask_n =
            KeyPadding::<N>::new(Tensor::from_data(TensorData::new(mask.to_vec(), [2, 7]), &Default::default()), 4);
        let (mask_f, mask_n) = (AttentionMask::KeyPadding(mask_f), AttentionMask::KeyPadding(mask_n));
        compare(
            "padded attention",
            &[[2, 7, 4, 8], [2, 7, 4, 8], [2, 7, 4, 8]],
            |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_f),
            |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_n),
        );
    }

    /// The tiny DeBERTa-v3 with trainable LayerNorms on a padded batch, on backend `X`: its hidden
    /// states and the gradients of `Σ h ⊙ w` (fixed `w`) with respect to every trainable tensor.
    fn deberta_hidden_and_norm_grads<X: AutodiffBackend>() -> (Vec<f32>, Vec<Vec<f32>>) {
        use tensor_peft_models::Bert;
        let dir = fixture().join("../tiny-deberta/v3");
        let model = Bert::<X>::from_hf_dir(&dir, &Default::default()).unwrap().0.train_norms();
        let ids = [vec![1, 7, 19, 33, 2, 60], vec![1, 5, 9, 2, 0, 0]];
        let mask = TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0.], [2, 6]);
        let out =
            model.forward(tokens::<X>(&ids, &Default::default()), None, Tensor::from_data(mask, &Default::default()));
        let grads = (out.clone() * input::<X, 3>(out.dims(), 3)).sum().backward();
        (floats(out), trainable_grads(&model, &grads))
    }

    /// DeBERTa's disentangled attention (gathers, broadcast relative projections) on flex: the
    /// hidden states and every LayerNorm gradient (all of which flow back through it) as on ndarray.
    #[test]
    fn deberta_on_flex_matches_ndarray_with_gradients() {
        let ((out_f, g_f), (out_n, g_n)) = (deberta_hidden_and_norm_grads::<F>(), deberta_hidden_and_norm_grads::<N>());
        assert_close("tiny DeBERTa hidden states", &out_f, &out_n, 1e-5);
        assert!(g_f.len() >= 10, "LayerNorm scales and biases are trainable ({} tensors)", g_f.len());
        assert_eq!(g_f.len(), g_n.len());
        for (i, (a, b)) in g_f.iter().zip(&g_n).enumerate() {
            assert_close(&format!("DeBERTa gradient {i}"), a, b, 1e-4);
        }
    }

    #[test]
    fn bert_on_flex_matches_sentence_transformers_and_ndarray_gradients() {
        use tensor_peft_models::Bert;
        use tensor_peft_models::tokenizer::TextTokenizer;
        // The tiny BERT with trainable LayerNorms, on a padded batch: every gradient as on ndarray.
        let dir = std::env::temp_dir().join(format!("tpeft-tiny-bert-flex-{}", std::process::id()));
        write_tiny_bert(&dir, false, "bert");
        let (on_flex, _) = Bert::<F>::from_hf_dir(&dir, &Default::default()).unwrap();
        let (on_ndarray, _) = Bert::<N>::from_hf_dir(&dir, &Default::default()).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let (on_flex, on_ndarray) = (on_flex.train_norms(), on_ndarray.train_norms());
        let ids = [vec![2, 7, 9, 4, 5], vec![3, 8, 1, 0, 0]];
        let mask = TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], [2, 5]);
        let out_f = on_flex.forward(
            tokens::<F>(&ids, &Default::default()),
            None,
            Tensor::from_data(mask.clone(), &Default::default()),
        );
        let out_n = on_ndarray.forward(
            tokens::<N>(&ids, &Default::default()),
            None,
            Tensor::from_data(mask, &Default::default()),
        );
        assert_close("tiny BERT hidden states", &floats(out_f.clone()), &floats(out_n.clone()), 1e-5);
        let w_f = input::<F, 3>(out_f.dims(), 5);
        let w_n = input::<N, 3>(out_n.dims(), 5);
        let g_f = (out_f * w_f).sum().backward();
        let g_n = (out_n * w_n).sum().backward();
        let (g_f, g_n) = (trainable_grads(&on_flex, &g_f), trainable_grads(&on_ndarray, &g_n));
        assert!(g_f.len() >= 10, "LayerNorm scales and biases are trainable ({} tensors)", g_f.len());
        assert_eq!(g_f.len(), g_n.len());
        for (i, (a, b)) in g_f.iter().zip(&g_n).enumerate() {
            assert_close(&format!("tiny BERT gradient {i}"), a, b, 1e-4);
        }
        // The real all-MiniLM-L6-v2 on flex: sentence-transformers' embeddings.
        let Some(dir) = minilm() else { return };
        let reference = &parity()["minilm"];
        let texts: Vec<String> =
            reference["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
        let (model, _) = Bert::<Flex>::from_hf_dir(&dir, &Default::default()).unwrap();
        let tokenizer = TextTokenizer::from_hf_dir(&dir).unwrap();
        let got = model.embed_texts(&tokenizer, &texts).unwrap();
        for (row, expected) in got.iter().zip(reference["embeddings"].as_array().unwrap()) {
            let max_err = max_abs_diff(row, expected);
            assert!(max_err < 1e-5, "flex embedding differs from sentence-transformers by {max_err}");
        }
    }

    /// A copy of the tiny LLaMA whose matrices are stored as `dtype` ("BF16" or "F16", rounded to
    /// nearest even) and whose norm scales stay f32, as HF half-precision checkpoints are.
    fn half_precision_copy(dtype: &str) -> PathBuf {
        use safetensors::{Dtype, SafeTensors, tensor::TensorView};
        let dir = std::env::temp_dir().join(format!("tpeft-{dtype}-llama-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
        let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (name, view) in file.tensors() {
            let shape = view.shape().to_vec();
            let values = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()));
            let (stored, data): (Dtype, Vec<u8>) = match (shape.len(), dtype) {
                (2, "BF16") => (Dtype::BF16, values.flat_map(|v| half::bf16::from_f32(v).to_le_bytes()).collect()),
                (2, _) => (Dtype::F16, values.flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()),
                _ => (Dtype::F32, view.data().to_vec()),
            };
            out.push((name, stored, shape, data));
        }
        let views: Vec<(String, TensorView<'_>)> = out
            .iter()
            .map(|(name, dtype, shape, data)| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
            .collect();
        std::fs::write(dir.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
        dir
    }

    /// The dtypes of a model's 2-D parameters (its frozen matrices and any adapter factors).
    fn matrix_dtypes<Bk: Backend, M: Module<Bk>>(model: &M) -> Vec<burn::tensor::DType> {
        struct Collect(Vec<burn::tensor::DType>);
        impl<Bk: Backend> ModuleVisitor<Bk> for Collect {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
                if D == 2 {
                    self.0.push(p.val().dtype());
                }
            }
        }
        let mut visitor = Collect(Vec::new());
        model.visit(&mut visitor);
        visitor.0
    }

    /// A bf16 / f16 base (converted on load from f32, or kept from a half-precision file with
    /// `native`) holds its matrices in that dtype, and computes exactly what an f32 model holding
    /// the same rounded values computes: each product widens the weight to f32 (exact) and runs
    /// the same f32 GEMM, so logits and the adapter's gradients agree to the last bit. Against
    /// the unrounded f32 model they differ only by the rounding of the weights.
    #[test]
    fn half_precision_base_computes_what_an_f32_model_of_the_rounded_weights_computes() {
        use burn::tensor::DType;
        use tensor_peft_models::BaseDType;
        use tensor_peft_models::adapter_file::load_adapter;
        let device = Default::default();
        let (ids, _, _) = expected();
        let lora = fixture().join("../tiny-llama-peft-lora");
        let run = |dir: &PathBuf, base: BaseDType| {
            let (mut model, spec) = Llama::<F>::from_hf_dir_as(dir, &device, base).unwrap();
            let frozen = matrix_dtypes(&model);
            load_adapter(&mut model, &spec, &lora).unwrap();
            let logits = model.forward(tokens::<F>(&ids, &device));
            let loss = (logits.clone() * input::<F, 3>(logits.dims(), 7)).sum();
            let grads = trainable_grads(&model, &loss.backward());
            (frozen, logits.into_data().to_vec::<f32>().unwrap(), grads)
        };
        let (_, exact_logits, _) = run(&fixture(), BaseDType::F32);
        for (name, base, dtype) in [("BF16", BaseDType::Bf16, DType::BF16), ("F16", BaseDType::F16, DType::F16)] {
            let copy = half_precision_copy(name);
            // The reference: an f32 model holding the rounded values.
            let (frozen, ref_logits, ref_grads) = run(&copy, BaseDType::F32);
            assert!(frozen.iter().all(|d| *d == DType::F32));
            for (label, dir, base) in
                [("converted on load", fixture(), base), ("native", copy.clone(), BaseDType::Native)]
            {
                let (frozen, logits, grads) = run(&dir, base);
                assert!(frozen.len() >= 8 && frozen.iter().all(|d| *d == dtype), "{name} {label}: {frozen:?}");
                assert_eq!(logits, ref_logits, "{name} {label}: logits");
                assert_eq!(grads.len(), ref_grads.len());
                for (i, (a, b)) in grads.iter().zip(&ref_grads).enumerate() {
                    assert_eq!(a, b, "{name} {label}: adapter gradient {i}");
                }
            }
            let rounding = exact_logits.iter().zip(&ref_logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(rounding > 0.0 && rounding < 0.05, "{name}: rounding moved the logits by {rounding}");
            std::fs::remove_dir_all(copy).unwrap();
        }
    }

    /// `--compute-dtype bf16` (`tensor_peft_kernels::ComputeDType::Bf16`): the tiny LLaMA with
    /// PEFT's LoRA adapter on each frozen storage (f32, bf16, q8_0, q4_0), logits and the adapter's
    /// gradients against the same model at `f32`. Each frozen product then rounds both operands to
    /// bf16 (relative error ≤ 2⁻⁹ each, so ≤ about 2⁻⁸ a product) and accumulates in f32; the
    /// errors of the ~12 products along the forward and backward paths add up roughly, so the
    /// tolerance is 12·2⁻⁸ ≈ 5 % of the largest value in the relative max norm (measured: well
    /// under that, see the printed values). The run must differ from f32 (the bf16 path ran), and
    /// the default f32 is bit-identical run to run.
    #[test]
    fn bf16_compute_dtype_stays_close_to_f32_on_every_base_storage() {
        use tensor_peft_kernels::{ComputeDType, with_compute_dtype};
        use tensor_peft_models::BaseDType;
        use tensor_peft_models::adapter_file::load_adapter;
        let device = Default::default();
        let (ids, _, _) = expected();
        let lora = fixture().join("../tiny-llama-peft-lora");
        let run = |base: BaseDType, dtype: ComputeDType| {
            with_compute_dtype(dtype, || {
                let (mut model, spec) = Llama::<F>::from_hf_dir_as(&fixture(), &device, base).unwrap();
                load_adapter(&mut model, &spec, &lora).unwrap();
                let logits = model.forward(tokens::<F>(&ids, &device));
                let loss = (logits.clone() * input::<F, 3>(logits.dims(), 7)).sum();
                let grads = trainable_grads(&model, &loss.backward());
                (logits.into_data().convert::<f32>().to_vec::<f32>().unwrap(), grads)
            })
        };
        let relative = |a: &[f32], b: &[f32]| {
            let scale = b.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
            a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max) / scale
        };
        for base in [BaseDType::F32, BaseDType::Bf16, BaseDType::Q8_0, BaseDType::Q4_0] {
            let (logits, grads) = run(base, ComputeDType::F32);
            let (again, grads_again) = run(base, ComputeDType::F32);
            assert_eq!(again, logits, "{base}: f32 is deterministic");
            assert_eq!(grads_again, grads);
            let (logits_bf16, grads_bf16) = run(base, ComputeDType::Bf16);
            let err = relative(&logits_bf16, &logits);
            eprintln!("{base}: bf16 compute moved the logits by {err:.2e} of the largest");
            assert!(err > 0.0 && err < 0.05, "{base}: logits at bf16 differ by {err} (relative)");
            assert!(grads.len() >= 4 && grads.len() == grads_bf16.len());
            for (i, (g, r)) in grads_bf16.iter().zip(&grads).enumerate() {
                let err = relative(g, r);
                eprintln!("{base}: adapter gradient {i}: {err:.2e}");
                assert!(err < 0.05, "{base}: adapter gradient {i} at bf16 differs by {err} (relative)");
            }
        }
    }

    /// Every format a GGUF file may hand `native` that the random-init test does not cover (the
    /// K-quants, Q5_0, Q5_1, Q8_1) as a frozen base on flex: the fused linear (blocks dequantized a
    /// column panel of rows at a time inside the op) against Burn's op chain on ndarray holding the
    /// blocks' dequantized values, output and input gradient. Tolerance 1e-5 of the largest value:
    /// the two GEMMs add the 512 products of each output in different orders.
    /// A block-quantized tensor taken as a float matrix (the embeddings' and head's path) under a
    /// quantized base: bf16, dequantized a run of blocks at a time, equal bit for bit to the f32
    /// load's values rounded (four formats, K-quants and Q5_0 over several runs, q and k permuted).
    #[test]
    fn gguf_blocks_taken_as_bf16_are_the_f32_load_rounded() {
        use std::sync::Arc;
        use tensor_peft_models::BaseDType;
        use tensor_peft_models::gguf::Gguf;
        let (bytes, _) = super::k_quant_gguf(&mut super::Rng(24));
        let gguf = Arc::new(Gguf::parse(bytes, "k.gguf".as_ref()).unwrap());
        let spec = gguf.arch_spec().unwrap();
        let device = Default::default();
        let mut f32_weights = gguf.hf_weights(&spec).unwrap().with_base_dtype(BaseDType::F32);
        let mut native_weights = gguf.hf_weights(&spec).unwrap().with_base_dtype(BaseDType::Native);
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            let name = format!("model.layers.0.self_attn.{proj}.weight");
            let wide = f32_weights.take_matrix::<Flex>(&name, [256, 256], &device).unwrap();
            let narrow = native_weights.take_matrix::<Flex>(&name, [256, 256], &device).unwrap();
            assert_eq!(narrow.dtype(), burn::tensor::DType::BF16, "{proj}");
            let wide: Vec<f32> = wide.into_data().convert::<f32>().to_vec().unwrap();
            let narrow: Vec<f32> = narrow.into_data().convert::<f32>().to_vec().unwrap();
            let rounded = wide.iter().map(|&v| burn::tensor::bf16::from_f32(v).to_f32());
            assert!(narrow.iter().zip(rounded).all(|(a, b)| a.to_bits() == b.to_bits()), "{proj}");
        }
    }

    #[test]
    fn gguf_block_formats_on_flex_match_their_dequantization() {
        use tensor_peft_models::fused::{BlockMatrix, FrozenMatrix};
        let device = Default::default();
        let mut rng = super::Rng(11);
        let (rows, d_in, d_out) = (6, 512, 40);
        let formats: [(BlockFormat, &[usize]); 8] = [
            (BlockFormat::Q2_K, &[80, 82]),
            (BlockFormat::Q3_K, &[108]),
            (BlockFormat::Q4_K, &[0, 2]),
            (BlockFormat::Q5_K, &[0, 2]),
            (BlockFormat::Q6_K, &[208]),
            (BlockFormat::Q5_0, &[0]),
            (BlockFormat::Q5_1, &[0, 2]),
            (BlockFormat::Q8_1, &[0, 2]),
        ];
        for (format, halves) in formats {
            let bytes = super::random_blocks(&mut rng, format, d_out * d_in / format.block_len(), halves);
            let m = BlockMatrix::<F>::from_bytes(bytes, format, d_in, d_out, &device).unwrap();
            let w = Tensor::<N, 2>::from_data(m.dequantize().into_data(), &Default::default());
            let x_f = input::<F, 2>([rows, d_in], 1).require_grad();
            let x_n = input::<N, 2>([rows, d_in], 1).require_grad();
            let y_f = fused::linear(x_f.clone(), FrozenMatrix::Blocks(m), None);
            let y_n = fused::linear(x_n.clone(), w, None);
            let name = format.name();
            assert_close(&format!("{name}: output"), &floats(y_f.clone()), &floats(y_n.clone()), 1e-5);
            let (g_f, g_n) = (y_f.sum().backward(), y_n.sum().backward());
            let (dx_f, dx_n) = (floats(x_f.grad(&g_f).unwrap()), floats(x_n.grad(&g_n).unwrap()));
            assert_close(&format!("{name}: dX"), &dx_f, &dx_n, 1e-5);
        }
    }

    /// The quantized base on flex's fused kernels (blocks dequantized inside the op, forward and
    /// backward) against its f32 dequantization, as on ndarray.
    #[test]
    fn quantized_base_on_flex_matches_its_dequantization() {
        super::quantized_base_matches_its_dequantization::<F>();
    }

    /// `native` keeps a GGUF file's own Q4_1 blocks (no requantization) and computes what the
    /// f32-dequantized load of the same file computes.
    #[test]
    fn native_gguf_keeps_its_blocks() {
        use tensor_peft_models::BaseDType;
        let Some(path) = super::smollm2() else { return };
        let device = Default::default();
        let (native, spec, _) = Llama::<Flex>::from_gguf_as(&path, &device, BaseDType::Native).unwrap();
        use tensor_peft_models::layout::LayoutBlock;
        let storages: Vec<String> =
            native.layers.iter().flat_map(|l| l.projections()).map(|p| p.base.storage()).collect();
        assert!(storages.iter().all(|s| s == "Q4_1" || s == "Q8_0"), "{storages:?}");
        assert_eq!(native.embed_tokens.weight.val().dtype(), burn::tensor::DType::BF16);
        let (f32_model, _, _) = Llama::<Flex>::from_gguf(&path, &device).unwrap();
        let ids = vec![vec![1i64, 504, 3458, 314, 2545, 30, 1351, 253]];
        let (a, b) = (
            values(native.forward(tokens::<Flex>(&ids, &device))),
            values(f32_model.forward(tokens::<Flex>(&ids, &device))),
        );
        // Only the bf16 rounding of the embedding table (which is also the tied output head: a
        // relative 2⁻⁹ on logits of magnitude ~20) separates them.
        let err = super::max_diff(&a, &b);
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        assert!(err < 0.02 * scale && spec.layers == 30, "native vs f32 logits differ by {err} (scale {scale})");
    }

    /// Gradients of every trainable parameter of `model`, in visiting order.
    fn trainable_grads<Bk: AutodiffBackend, M: Module<Bk>>(
        model: &M,
        grads: &<Bk as AutodiffBackend>::Gradients,
    ) -> Vec<Vec<f32>> {
        struct Collect<'a, Bk: AutodiffBackend>(&'a Bk::Gradients, Vec<Vec<f32>>);
        impl<Bk: AutodiffBackend> ModuleVisitor<Bk> for Collect<'_, Bk> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<Bk, D>>) {
                if p.val().is_require_grad() {
                    let g = p.val().grad(self.0).expect("every trainable parameter gets a gradient");
                    self.1.push(g.into_data().convert::<f32>().to_vec::<f32>().unwrap());
                }
            }
        }
        let mut visitor = Collect::<Bk>(grads, Vec::new());
        model.visit(&mut visitor);
        visitor.1
    }

    #[test]
    fn tiny_llama_on_flex_matches_numpy_peft_and_ndarray_gradients() {
        use tensor_peft_models::adapter_file::load_adapter;
        let device = Default::default();
        let (ids, shape, reference) = expected();
        // Logits of the plain model against the numpy reference, through every fused op.
        let (model, _) = Llama::<Flex>::from_hf_dir(&fixture(), &device).unwrap();
        let logits = model.forward(tokens::<Flex>(&ids, &device));
        assert_eq!(logits.dims().to_vec(), shape);
        let got: Vec<f64> = values(logits);
        let err = got.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-4, "flex logits differ from the numpy reference by {err}");
        // The KV-cache path (one query at a time against the cache) gives the same logits.
        let row = &ids[0];
        let mut cache = tensor_peft_models::llama::KvCache::default();
        let mut cached = values(model.forward_cached(tokens::<Flex>(&[row[..3].to_vec()], &device), &mut cache));
        for &token in &row[3..] {
            cached.extend(values(model.forward_cached(tokens::<Flex>(&[vec![token]], &device), &mut cache)));
        }
        let err = cached.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "flex: cached vs full logits differ by {err}");

        // PEFT's LoRA adapter with trainable norms: every gradient as on ndarray's op chains.
        let dir = fixture().join("../tiny-llama-peft-lora");
        let (mut on_flex, spec) = Llama::<F>::from_hf_dir(&fixture(), &device).unwrap();
        load_adapter(&mut on_flex, &spec, &dir).unwrap();
        let (mut on_ndarray, _) = Llama::<N>::from_hf_dir(&fixture(), &Default::default()).unwrap();
        load_adapter(&mut on_ndarray, &spec, &dir).unwrap();
        let (on_flex, on_ndarray) = (on_flex.train_norms(), on_ndarray.train_norms());
        let loss_f = {
            let out = on_flex.forward(tokens::<F>(&ids, &device));
            let w = input::<F, 3>(out.dims(), 7);
            (out * w).sum()
        };
        let loss_n = {
            let out = on_ndarray.forward(tokens::<N>(&ids, &Default::default()));
            let w = input::<N, 3>(out.dims(), 7);
            (out * w).sum()
        };
        let (g_f, g_n) =
            (trainable_grads(&on_flex, &loss_f.backward()), trainable_grads(&on_ndarray, &loss_n.backward()));
        assert!(g_f.len() >= 8, "LoRA factors and norms are trainable ({} tensors)", g_f.len());
        assert_eq!(g_f.len(), g_n.len());
        for (i, (a, b)) in g_f.iter().zip(&g_n).enumerate() {
            assert_close(&format!("tiny LLaMA gradient {i}"), a, b, 1e-4);
        }
    }

    /// The same checks on wgpu (`--features test-wgpu`; CI runs them on lavapipe, Mesa's software
    /// Vulkan): off flex every fused op is Burn's op chain, and these compare those chains on wgpu
    /// with flex's fused kernels, and the models built from them with flex's models, on the same
    /// values. Tolerances are relative to `max(1, max |flex|)`: 1e-5 for single ops (lavapipe is
    /// exact f32, but sums and `exp` are evaluated in other orders and with other approximations
    /// than the kernels'), 1e-4 for gradients through whole models (as flex against ndarray).
    #[cfg(feature = "test-wgpu")]
    mod wgpu {
        use super::*;
        use burn::backend::Wgpu;

        type W = Autodiff<Wgpu>;

        /// Runs `op` on flex (fused kernels) and on wgpu (op chains) with the same inputs, and
        /// compares the output and the gradients of `Σ out ⊙ w` for a fixed weight `w`.
        fn compare_wgpu<const D: usize, const O: usize>(
            what: &str,
            shapes: &[[usize; D]],
            op_f: impl Fn(Vec<Tensor<F, D>>) -> Tensor<F, O>,
            op_w: impl Fn(Vec<Tensor<W, D>>) -> Tensor<W, O>,
        ) {
            compare_on(&format!("{what} on wgpu"), shapes, op_f, op_w, 1e-5);
        }

        #[test]
        fn fused_ops_fall_back_to_chains_that_equal_the_flex_kernels() {
            compare_wgpu(
                "swiglu",
                &[[2, 3, 37], [2, 3, 37]],
                |x| fused::swiglu(x[0].clone(), x[1].clone()),
                |x| fused::swiglu(x[0].clone(), x[1].clone()),
            );
            compare_wgpu(
                "rms_norm",
                &[[2, 5, 29], [1, 1, 29]],
                |x| fused::rms_norm(x[0].clone(), x[1].clone().reshape([29]), 1e-5),
                |x| fused::rms_norm(x[0].clone(), x[1].clone().reshape([29]), 1e-5),
            );
            let rope_f = Rope::<F>::new(4, 5, 8, &RopeConfig::default(), &[2], &Default::default());
            let rope_w = Rope::<W>::new(4, 5, 8, &RopeConfig::default(), &[2], &Default::default());
            compare_wgpu("rope", &[[2, 5, 2, 8]], |x| rope_f.apply(x[0].clone()), |x| rope_w.apply(x[0].clone()));
            // Grouped-query attention with two cached positions, and a sliding window.
            for window in [None, Some(3)] {
                let mask_f = AttentionMask::Causal { offset: 2, window };
                let mask_w = AttentionMask::Causal { offset: 2, window };
                compare_wgpu(
                    &format!("causal GQA attention, window {window:?}"),
                    &[[2, 5, 6, 8], [2, 7, 2, 8], [2, 7, 2, 8]],
                    |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_f),
                    |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_w),
                );
            }
            let padding = TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 1., 1., 1., 0., 0., 0.], [2, 7]);
            let mask_f = AttentionMask::KeyPadding(KeyPadding::<F>::new(
                Tensor::from_data(padding.clone(), &Default::default()),
                4,
            ));
            let mask_w =
                AttentionMask::KeyPadding(KeyPadding::<W>::new(Tensor::from_data(padding, &Default::default()), 4));
            compare_wgpu(
                "padded attention",
                &[[2, 7, 4, 8], [2, 7, 4, 8], [2, 7, 4, 8]],
                |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_f),
                |x| fused::attention(x[0].clone(), x[1].clone(), x[2].clone(), &mask_w),
            );
            compare_wgpu(
                "linear, transposed weight, bias",
                &[[5, 7], [6, 7], [1, 6]],
                |x| linear_of(&x, true),
                |x| linear_of(&x, true),
            );
            compare_wgpu(
                "low-rank linear, bias",
                &[[5, 7], [7, 6], [7, 3], [3, 6], [1, 6]],
                |x| low_rank_linear_of(&x, false),
                |x| low_rank_linear_of(&x, false),
            );
            compare_wgpu("gelu", &[[3, 41]], |x| fused::gelu(x[0].clone()), |x| fused::gelu(x[0].clone()));
            compare_wgpu(
                "layer_norm",
                &[[2, 5, 19], [1, 1, 19], [1, 1, 19]],
                |x| fused::layer_norm(x[0].clone(), x[1].clone().reshape([19]), x[2].clone().reshape([19]), 1e-12),
                |x| fused::layer_norm(x[0].clone(), x[1].clone().reshape([19]), x[2].clone().reshape([19]), 1e-12),
            );
        }

        /// One seed, one dropout mask on every backend: flex's fused dropout and the host-made
        /// mask multiplied in on wgpu keep the same elements and give bit-identical values and
        /// gradients; so does the low-rank layer with dropout (fused on flex, a chain on wgpu).
        #[test]
        fn dropout_masks_equal_flex_for_the_same_seed() {
            let x_f = input::<F, 2>([30, 40], 1).require_grad();
            let x_w = input::<W, 2>([30, 40], 1).require_grad();
            let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(3);
            let y_f = fused::dropout(x_f.clone(), 0.25);
            let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(3);
            let y_w = fused::dropout(x_w.clone(), 0.25);
            assert_eq!(floats(y_w.clone()), floats(y_f.clone()), "dropout on wgpu vs flex");
            let g_f = (y_f * input::<F, 2>([30, 40], 2)).sum().backward();
            let g_w = (y_w * input::<W, 2>([30, 40], 2)).sum().backward();
            assert_eq!(floats(x_w.grad(&g_w).unwrap()), floats(x_f.grad(&g_f).unwrap()), "dropout gradient");
            for seed in [5, 6] {
                compare_wgpu(
                    &format!("low-rank linear with dropout 0.3, seed {seed}"),
                    &[[9, 7], [7, 6], [7, 3], [3, 6]],
                    |x| {
                        let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(seed);
                        fused::low_rank_linear(x[0].clone(), x[1].clone(), None, x[2].clone(), x[3].clone(), 0.3)
                    },
                    |x| {
                        let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(seed);
                        fused::low_rank_linear(x[0].clone(), x[1].clone(), None, x[2].clone(), x[3].clone(), 0.3)
                    },
                );
            }
        }

        /// The tiny GQA LLaMA (4 query heads, 2 key/value heads): logits and the KV-cache path as
        /// on flex, and with PEFT's LoRA adapter and trainable norms every gradient as on flex.
        #[test]
        fn tiny_llama_logits_and_lora_gradients_equal_flex() {
            use tensor_peft_models::adapter_file::load_adapter;
            let (ids, _, _) = expected();
            let (on_wgpu, _) = Llama::<Wgpu>::from_hf_dir(&fixture(), &Default::default()).unwrap();
            let (on_flex, spec) = Llama::<Flex>::from_hf_dir(&fixture(), &Default::default()).unwrap();
            assert_eq!((spec.heads, spec.kv_heads), (4, 2), "grouped-query attention");
            let logits = floats(on_wgpu.forward(tokens::<Wgpu>(&ids, &Default::default())));
            let expected_logits = floats(on_flex.forward(tokens::<Flex>(&ids, &Default::default())));
            assert_close("tiny LLaMA logits on wgpu", &logits, &expected_logits, 1e-5);
            let row = &ids[0];
            let mut cache = tensor_peft_models::llama::KvCache::default();
            let mut cached =
                floats(on_wgpu.forward_cached(tokens::<Wgpu>(&[row[..3].to_vec()], &Default::default()), &mut cache));
            for &token in &row[3..] {
                cached.extend(floats(
                    on_wgpu.forward_cached(tokens::<Wgpu>(&[vec![token]], &Default::default()), &mut cache),
                ));
            }
            assert_close("tiny LLaMA KV-cache logits on wgpu", &cached, &logits[..cached.len()], 1e-5);

            let dir = fixture().join("../tiny-llama-peft-lora");
            let (mut on_wgpu, _) = Llama::<W>::from_hf_dir(&fixture(), &Default::default()).unwrap();
            load_adapter(&mut on_wgpu, &spec, &dir).unwrap();
            let (mut on_flex, _) = Llama::<F>::from_hf_dir(&fixture(), &Default::default()).unwrap();
            load_adapter(&mut on_flex, &spec, &dir).unwrap();
            let (on_wgpu, on_flex) = (on_wgpu.train_norms(), on_flex.train_norms());
            let out_w = on_wgpu.forward(tokens::<W>(&ids, &Default::default()));
            let out_f = on_flex.forward(tokens::<F>(&ids, &Default::default()));
            let loss_w = (out_w.clone() * input::<W, 3>(out_w.dims(), 7)).sum();
            let loss_f = (out_f.clone() * input::<F, 3>(out_f.dims(), 7)).sum();
            let (g_w, g_f) =
                (trainable_grads(&on_wgpu, &loss_w.backward()), trainable_grads(&on_flex, &loss_f.backward()));
            assert!(g_w.len() >= 8, "LoRA factors and norms are trainable ({} tensors)", g_w.len());
            assert_eq!(g_w.len(), g_f.len());
            for (i, (a, b)) in g_w.iter().zip(&g_f).enumerate() {
                assert_close(&format!("tiny LLaMA gradient {i} on wgpu"), a, b, 1e-4);
            }
        }

        /// The tiny BERT with a classification head (the same seed gives the same head on both)
        /// and the tiny DeBERTa-v3: logits / hidden states and every LayerNorm gradient as on flex.
        #[test]
        fn tiny_bert_and_deberta_equal_flex() {
            use tensor_peft_models::{Bert, SequenceClassifier};
            let dir = std::env::temp_dir().join(format!("tpeft-tiny-bert-wgpu-{}", std::process::id()));
            write_tiny_bert(&dir, false, "bert");
            let (bert_w, _) = Bert::<W>::from_hf_dir(&dir, &Default::default()).unwrap();
            let (bert_f, _) = Bert::<F>::from_hf_dir(&dir, &Default::default()).unwrap();
            std::fs::remove_dir_all(&dir).unwrap();
            let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(4);
            let on_wgpu = SequenceClassifier::new(bert_w.train_norms(), 3);
            let _draws = tensor_peft_kernels::rng::ThreadDraws::seeded(4);
            let on_flex = SequenceClassifier::new(bert_f.train_norms(), 3);
            assert_eq!(floats(on_wgpu.head.weight.val()), floats(on_flex.head.weight.val()), "seeded head");
            let ids = [vec![2, 7, 9, 4, 5], vec![3, 8, 1, 0, 0]];
            let mask = TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], [2, 5]);
            let out_w = on_wgpu.forward(
                tokens::<W>(&ids, &Default::default()),
                None,
                Tensor::from_data(mask.clone(), &Default::default()),
            );
            let out_f = on_flex.forward(
                tokens::<F>(&ids, &Default::default()),
                None,
                Tensor::from_data(mask, &Default::default()),
            );
            assert_close("tiny BERT classifier logits on wgpu", &floats(out_w.clone()), &floats(out_f.clone()), 1e-5);
            let g_w = (out_w.clone() * input::<W, 2>(out_w.dims(), 5)).sum().backward();
            let g_f = (out_f.clone() * input::<F, 2>(out_f.dims(), 5)).sum().backward();
            let (g_w, g_f) = (trainable_grads(&on_wgpu, &g_w), trainable_grads(&on_flex, &g_f));
            assert!(g_w.len() >= 10 && g_w.len() == g_f.len(), "{} vs {} trainable tensors", g_w.len(), g_f.len());
            for (i, (a, b)) in g_w.iter().zip(&g_f).enumerate() {
                assert_close(&format!("tiny BERT gradient {i} on wgpu"), a, b, 1e-4);
            }

            let ((out_w, g_w), (out_f, g_f)) =
                (deberta_hidden_and_norm_grads::<W>(), deberta_hidden_and_norm_grads::<F>());
            assert_close("tiny DeBERTa hidden states on wgpu", &out_w, &out_f, 1e-5);
            assert_eq!(g_w.len(), g_f.len());
            for (i, (a, b)) in g_w.iter().zip(&g_f).enumerate() {
                assert_close(&format!("tiny DeBERTa gradient {i} on wgpu"), a, b, 1e-4);
            }
        }

        /// A half-precision frozen base with f32 LoRA factors: where the device holds the dtype,
        /// the logits and adapter gradients equal flex's on the same half-precision base (within
        /// the rounding of f16/bf16 products summed in other orders); where it does not, loading
        /// is refused naming the backend, the dtype and what to use instead.
        #[test]
        fn half_precision_base_on_wgpu_equals_flex_or_is_refused() {
            use tensor_peft_models::BaseDType;
            use tensor_peft_models::adapter_file::load_adapter;
            let (ids, _, _) = expected();
            let lora = fixture().join("../tiny-llama-peft-lora");
            for base in [BaseDType::F16, BaseDType::Bf16] {
                let on_wgpu = match Llama::<W>::from_hf_dir_as(&fixture(), &Default::default(), base) {
                    Ok((model, _)) => model,
                    Err(e) => {
                        let e = e.to_string();
                        eprintln!("{base}: {e}");
                        assert!(
                            e.contains("cannot hold") && e.contains("--base-dtype"),
                            "{base}: unclear refusal: {e}"
                        );
                        continue;
                    }
                };
                let (mut on_flex, spec) = Llama::<F>::from_hf_dir_as(&fixture(), &Default::default(), base).unwrap();
                let mut on_wgpu = on_wgpu;
                load_adapter(&mut on_wgpu, &spec, &lora).unwrap();
                load_adapter(&mut on_flex, &spec, &lora).unwrap();
                let out_w = on_wgpu.forward(tokens::<W>(&ids, &Default::default()));
                let out_f = on_flex.forward(tokens::<F>(&ids, &Default::default()));
                assert_close(
                    &format!("{base} base: logits on wgpu"),
                    &floats(out_w.clone()),
                    &floats(out_f.clone()),
                    1e-3,
                );
                let loss_w = (out_w.clone() * input::<W, 3>(out_w.dims(), 7)).sum();
                let loss_f = (out_f.clone() * input::<F, 3>(out_f.dims(), 7)).sum();
                let (g_w, g_f) =
                    (trainable_grads(&on_wgpu, &loss_w.backward()), trainable_grads(&on_flex, &loss_f.backward()));
                assert_eq!(g_w.len(), g_f.len());
                for (i, (a, b)) in g_w.iter().zip(&g_f).enumerate() {
                    assert_close(&format!("{base} base: adapter gradient {i} on wgpu"), a, b, 1e-3);
                }
            }
        }
    }
}

/// Adapter files of every method written by an earlier version (`tests/fixtures/adapter-files/`,
/// `scripts/fixtures/adapter_files.sh`) load, and saving them again writes the same tensors under
/// the same names: file names belong to the methods, not to Rust field or variant names.
#[test]
fn committed_adapter_files_of_every_method_load_and_save_the_same_tensors() {
    use tensor_peft_models::adapter_file::{load_adapter, read_adapter_config, save_adapter};
    let device = Default::default();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let (base, spec) = Llama::<AB>::from_hf_dir(&root.join("tiny-llama-words"), &device).unwrap();
    let read = |dir: &std::path::Path| {
        let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
            file.tensors().into_iter().map(|(n, t)| (n, t.shape().to_vec(), t.data().to_vec())).collect();
        tensors.sort();
        tensors
    };
    let out = std::env::temp_dir().join(format!("tpeft-fixture-resave-{}", std::process::id()));
    let mut seen = Vec::new();
    for name in METHOD_NAMES {
        let dir = root.join("adapter-files").join(name);
        if !dir.exists() {
            // A method added after the fixtures were recorded.
            continue;
        }
        let mut model = base.clone();
        let config = load_adapter(&mut model, &spec, &dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(config.method.name(), *name);
        let _ = std::fs::remove_dir_all(&out);
        save_adapter(&mut model, &spec, &config, &out).unwrap();
        let (stored, saved) = (read(&dir), read(&out));
        assert!(!stored.is_empty());
        assert_eq!(saved, stored, "{name}: saving the loaded adapter writes other tensors");
        // The config reads back the same, now with the tensor names' version.
        let again = read_adapter_config(&out).unwrap();
        assert_eq!(serde_json::to_value(&again.method).unwrap(), serde_json::to_value(&config.method).unwrap());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
        assert_eq!(json["tensor_peft"]["names_version"], 1);
        seen.push(*name);
    }
    assert_eq!(seen.len(), std::fs::read_dir(root.join("adapter-files")).unwrap().count(), "a fixture per method");
    assert!(seen.len() >= 6);
    // A file from a future version of the names is refused, naming the field.
    let text = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
    std::fs::write(out.join("adapter_config.json"), text.replace("\"names_version\": 1", "\"names_version\": 2"))
        .unwrap();
    let err = load_adapter(&mut base.clone(), &spec, &out).unwrap_err().to_string();
    assert!(err.contains("names_version") && err.contains('2'), "{err}");
    std::fs::remove_dir_all(&out).unwrap();
}

/// LoRA+'s fast group comes from the adapters themselves: LoRA's `B`, the last core of every
/// TT-LoRA train and of every LoRETTA_rep `B` train, nothing for a method without a
/// zero-initialised factor.
#[test]
fn zero_init_factors_are_named_by_each_method() {
    use tensor_peft_adapters::LinearAdapter;
    let (base, spec) = Llama::<AB>::from_hf_dir(&fixture(), &Default::default()).unwrap();
    let expected = |model: &Llama<AB>, pick: &dyn Fn(&LinearAdapter<AB>) -> burn::module::ParamId| {
        let sites = model.layers.iter().flat_map(|l| [&l.q_proj, &l.v_proj]);
        sites.map(|p| pick(p.adapter.as_ref().expect("adapted"))).collect::<std::collections::HashSet<_>>()
    };
    let found = |model: &mut Llama<AB>| {
        let ids = tensor_peft_models::zero_init_factors(model, &spec);
        let unique: std::collections::HashSet<_> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "each factor once");
        unique
    };
    let mut lora = base.clone().adapt(&spec, &MethodConfig::from_name("lora").unwrap(), &Targets::Default).unwrap();
    let want = expected(&lora, &|a| match a {
        LinearAdapter::Lora(l) => l.b.id,
        _ => unreachable!(),
    });
    assert_eq!(found(&mut lora), want);
    assert_eq!(want.len(), 4);
    let mut tt = base.clone().adapt(&spec, &MethodConfig::from_name("tt-lora").unwrap(), &Targets::Default).unwrap();
    let want = expected(&tt, &|a| match a {
        LinearAdapter::TtLora(t) => t.tt.cores.last().unwrap().id,
        _ => unreachable!(),
    });
    assert_eq!(found(&mut tt), want);
    let mut rep =
        base.clone().adapt(&spec, &MethodConfig::from_name("loretta-rep").unwrap(), &Targets::Default).unwrap();
    let want = expected(&rep, &|a| match a {
        LinearAdapter::LorettaRep(r) => r.b.tt.cores.last().unwrap().id,
        _ => unreachable!(),
    });
    assert_eq!(found(&mut rep), want);
    let mut lotr = base.adapt(&spec, &MethodConfig::from_name("lotr").unwrap(), &Targets::Default).unwrap();
    assert!(found(&mut lotr).is_empty());
}

/// transformers' logits of the tiny LLaMA under each RoPE setting, and its rotary frequencies
/// (`scripts/fixtures/tiny_llama_rope.py`).
fn rope_expected() -> serde_json::Value {
    let path = fixture().join("../tiny-llama-rope/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The numbers of a (nested) JSON array, flattened in order.
fn json_floats(v: &serde_json::Value) -> Vec<f64> {
    match v.as_array() {
        Some(items) => items.iter().flat_map(json_floats).collect(),
        None => vec![v.as_f64().unwrap()],
    }
}

/// Largest |a − b| between our `[1, T, V]` logits and the recorded `[T][V]` ones.
fn logits_diff(got: Tensor<B, 3>, expected: &serde_json::Value) -> f64 {
    max_diff(&values(got), &json_floats(expected))
}

/// Every RoPE type (default with θ inside `rope_parameters`, linear, dynamic NTK past
/// `max_position_embeddings`, YaRN with defaults and with every option, llama3), an explicit
/// `head_dim` and Mistral's sliding window give transformers' logits, and survive an export. Tolerance 1e-4: f32 throughout, the recorded logits are
/// rounded to 1e-5, and the angles are computed in f64 here and in f32 by transformers.
#[test]
fn rope_scaling_and_head_dim_match_transformers() {
    let device = Default::default();
    let expected = rope_expected();
    let ids: Vec<i64> = expected["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let input = tokens::<B>(std::slice::from_ref(&ids), &device);
    let dir = std::env::temp_dir().join(format!("tpeft-rope-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for case in expected["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let weights = fixture().join("..").join(case["weights"].as_str().unwrap()).join("model.safetensors");
        std::fs::copy(weights, dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), case["config"].to_string()).unwrap();
        let (model, spec) = Llama::<B>::from_hf_dir(&dir, &device).unwrap();
        // The frequencies transformers' rotary module holds after the same forward.
        let (inv_freq, scale) = spec.rope.frequencies(spec.head_dim, ids.len());
        let reference: Vec<f64> = case["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(inv_freq.len(), reference.len(), "{name}");
        for (a, b) in inv_freq.iter().zip(&reference) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: inverse frequency {a} vs transformers' {b}");
        }
        assert!((scale - case["attention_scaling"].as_f64().unwrap()).abs() < 1e-9, "{name}: scale {scale}");
        let diff = logits_diff(model.forward(input.clone()), &case["logits"]);
        assert!(diff < 1e-4, "{name}: logits differ from transformers' by {diff}");
        // An exported model says the same to transformers (and to this loader).
        let export = dir.join("export");
        model.save_hf(&spec, &export).unwrap();
        let (_, again) = Llama::<B>::from_hf_dir(&export, &device).unwrap();
        assert_eq!(
            (&again.rope, again.head_dim, again.sliding_window),
            (&spec.rope, spec.head_dim, spec.sliding_window)
        );
        if spec.sliding_window.is_some() {
            // Decoding with a KV cache masks the window as the full forward does.
            let mut cache = tensor_peft_models::llama::KvCache::default();
            let _ = model.forward_cached(input.clone().narrow(1, 0, 10), &mut cache);
            let cached = model.forward_cached(input.clone().narrow(1, 10, ids.len() - 10), &mut cache);
            let full = model.forward(input.clone()).narrow(1, 10, ids.len() - 10);
            let diff = values(cached).iter().zip(values(full)).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(diff < 1e-5, "{name}: cached decoding differs by {diff}");
        }
    }
    // Scaling changes the logits: the check above would catch a scaling ignored.
    let cases = expected["cases"].as_array().unwrap();
    let plain = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap().0.forward(input);
    assert!(logits_diff(plain, &cases.iter().find(|c| c["name"] == "llama3").unwrap()["logits"]) > 1e-2);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A GGUF file of the tiny LLaMA with the given RoPE metadata and optional `rope_freqs` tensor,
/// written as llama.cpp's converter writes one (Q/K rows permuted, shapes reversed).
fn tiny_llama_gguf(rope_meta: &[(&str, u32, Vec<u8>)], rope_freqs: Option<&[f32]>) -> Vec<u8> {
    let bytes = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("config.json")).unwrap()).unwrap();
    let get = |k: &str| config[k].as_u64().unwrap() as u32;
    let (d, heads, kv) = (get("hidden_size"), get("num_attention_heads"), get("num_key_value_heads"));
    let head_dim = (d / heads) as usize;
    let u32v = |v: u32| v.to_le_bytes().to_vec();
    let f32v = |v: f32| v.to_le_bytes().to_vec();
    let arch = [5u64.to_le_bytes().to_vec(), b"llama".to_vec()].concat();
    let mut meta = vec![
        ("general.architecture", 8, arch),
        ("llama.block_count", 4, u32v(get("num_hidden_layers"))),
        ("llama.embedding_length", 4, u32v(d)),
        ("llama.feed_forward_length", 4, u32v(get("intermediate_size"))),
        ("llama.attention.head_count", 4, u32v(heads)),
        ("llama.attention.head_count_kv", 4, u32v(kv)),
        ("llama.vocab_size", 4, u32v(get("vocab_size"))),
        ("llama.rope.dimension_count", 4, u32v(head_dim as u32)),
        ("llama.rope.freq_base", 6, f32v(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", 6, f32v(1e-5)),
    ];
    meta.extend(rope_meta.iter().cloned());
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let shape: Vec<u64> = view.shape().iter().rev().map(|&n| n as u64).collect();
        let mut data = view.data().to_vec();
        let heads = if name.ends_with("q_proj.weight") {
            Some(heads as usize)
        } else if name.ends_with("k_proj.weight") {
            Some(kv as usize)
        } else {
            None
        };
        if let Some(heads) = heads {
            // llama.cpp's `permute`: HF row h·d_h + s·d_h/2 + i becomes GGUF row h·d_h + 2i + s.
            let row = view.shape()[1] * 4;
            let mut permuted = data.clone();
            for h in 0..heads {
                for i in 0..head_dim / 2 {
                    for s in 0..2 {
                        let (src, dst) = (h * head_dim + s * head_dim / 2 + i, h * head_dim + 2 * i + s);
                        permuted[dst * row..(dst + 1) * row].copy_from_slice(&data[src * row..(src + 1) * row]);
                    }
                }
            }
            data = permuted;
        }
        let gguf_name = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            "lm_head.weight" => "output.weight".to_string(),
            other => {
                let rest = other.strip_prefix("model.layers.").unwrap();
                let (layer, local) = rest.split_once('.').unwrap();
                let stem = match local.strip_suffix(".weight").unwrap() {
                    "input_layernorm" => "attn_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    x => panic!("{x}"),
                };
                format!("blk.{layer}.{stem}.weight")
            }
        };
        tensors.push((gguf_name, shape, 0u32, data));
    }
    if let Some(f) = rope_freqs {
        tensors.push((
            "rope_freqs.weight".into(),
            vec![f.len() as u64],
            0,
            f.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let tensors: Vec<(&str, Vec<u64>, u32, Vec<u8>)> =
        tensors.iter().map(|(n, s, t, d)| (n.as_str(), s.clone(), *t, d.clone())).collect();
    gguf_bytes(&meta, &tensors)
}

/// GGUF RoPE metadata as llama.cpp reads it gives transformers' logits for the same scaling: a
/// `rope_freqs` tensor written by llama.cpp's converter for `llama3`, `rope.scaling.type` linear
/// and yarn. Unknown scaling types and keys are refused, naming them.
#[test]
fn gguf_rope_scaling_matches_transformers() {
    use std::sync::Arc;
    use tensor_peft_models::gguf::Gguf;
    let device = Default::default();
    let expected = rope_expected();
    let ids: Vec<i64> = expected["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
    let input = tokens::<B>(std::slice::from_ref(&ids), &device);
    let case = |name: &str| expected["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let string = |s: &str| [(s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
    let f32v = |v: f32| v.to_le_bytes().to_vec();
    let load = |bytes: Vec<u8>| -> Result<Llama<B>, ModelError> {
        let gguf = Arc::new(Gguf::parse(bytes, "rope.gguf".as_ref())?);
        let spec = gguf.arch_spec()?;
        spec.require_implemented()?;
        Llama::from_weights(&spec, &mut gguf.hf_weights(&spec)?, &device)
    };
    let freqs: Vec<f32> =
        expected["llama3_rope_freqs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let linear = [("llama.rope.scaling.type", 8, string("linear")), ("llama.rope.scaling.factor", 6, f32v(2.0))];
    let yarn = [
        ("llama.rope.scaling.type", 8, string("yarn")),
        ("llama.rope.scaling.factor", 6, f32v(4.0)),
        ("llama.rope.scaling.original_context_length", 4, 64u32.to_le_bytes().to_vec()),
    ];
    for (name, bytes) in [
        ("llama3", tiny_llama_gguf(&[], Some(&freqs))),
        ("linear", tiny_llama_gguf(&linear, None)),
        ("yarn", tiny_llama_gguf(&yarn, None)),
    ] {
        let model = load(bytes).unwrap();
        // f32 rope_freqs factors: 1e-4 still holds.
        let diff = logits_diff(model.forward(input.clone()), &case(name)["logits"]);
        assert!(diff < 1e-4, "GGUF {name}: logits differ from transformers' by {diff}");
    }
    let refused = [
        (vec![("llama.rope.scaling.type", 8, string("longrope"))], "longrope"),
        (vec![("llama.rope.scaling.yarn_log_multiplier", 6, f32v(0.1))], "yarn_log_multiplier"),
        (linear[..1].to_vec(), "llama.rope.scaling.factor"),
    ];
    for (meta, named) in refused {
        let err = load(tiny_llama_gguf(&meta, None)).expect_err("refused").to_string();
        assert!(err.contains(named) && err.contains("rope.gguf"), "{err}");
    }
    let err = load(tiny_llama_gguf(&linear, Some(&freqs))).expect_err("refused").to_string();
    assert!(err.contains("rope_freqs"), "{err}");
    let err = load(tiny_llama_gguf(&[], Some(&freqs[..2]))).expect_err("refused").to_string();
    assert!(err.contains("rope_freqs") && err.contains("expected 4"), "{err}");
}

/// transformers' outputs of the tiny DeBERTa-v2 classifiers (`scripts/fixtures/tiny_deberta.py`).
fn deberta_expected() -> serde_json::Value {
    let path = fixture().join("../tiny-deberta/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// DeBERTa-v2/v3 (disentangled c2p/p2c attention, log-bucketed and clamped relative positions,
/// normed relative embeddings, with and without absolute positions and token types, GELU context
/// pooler) gives transformers' hidden states, pooled outputs and classifier logits on a padded
/// batch, within 1e-4 (f32 throughout; the fixture is rounded to 1e-6). Its parameter count is
/// transformers' `DebertaV2Model`'s, and LoRA lands on `query_proj`/`value_proj` without changing
/// the outputs.
#[test]
fn deberta_matches_transformers() {
    use burn::module::Param;
    use tensor_peft_models::{Bert, SequenceClassifier};
    let device = Default::default();
    let expected = deberta_expected();
    let ints = |key: &str| -> Vec<Vec<i64>> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
            .collect()
    };
    let (ids, types, mask) = (ints("ids"), ints("token_types"), ints("attention_mask"));
    let (b, t) = (ids.len(), ids[0].len());
    let mask_f: Vec<f32> = mask.iter().flatten().map(|&m| m as f32).collect();
    let mask_t = Tensor::<B, 2>::from_data(TensorData::new(mask_f, [b, t]), &device);
    let close = |got: Vec<f64>, reference: &serde_json::Value, what: &str| {
        let diff = max_diff(&got, &json_floats(reference));
        assert!(diff < 1e-4, "{what} differs from transformers' by {diff}");
    };
    for case in expected["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let dir = fixture().join("../tiny-deberta").join(name);
        let (encoder, spec) = Bert::<B>::from_hf_dir(&dir, &device).unwrap();
        let floats = |key: &str| -> Vec<f32> { json_floats(&case[key]).into_iter().map(|x| x as f32).collect() };
        let (weight, bias) = (floats("classifier_weight"), floats("classifier_bias"));
        assert_eq!(spec.base_num_params() as u64, case["base_num_params"].as_u64().unwrap(), "{name}");
        let types_t = case["uses_token_types"].as_bool().unwrap().then(|| tokens::<B>(&types, &device));
        let hidden = encoder.forward(tokens::<B>(&ids, &device), types_t.clone(), mask_t.clone());
        let d = hidden.dims()[2];
        let rows = values(hidden.clone());
        let unpadded: Vec<f64> =
            (0..b * t).filter(|&r| mask[r / t][r % t] == 1).flat_map(|r| rows[r * d..(r + 1) * d].to_vec()).collect();
        close(unpadded, &case["hidden_unpadded"], &format!("{name}: hidden states"));
        close(values(encoder.pooled(hidden).unwrap()), &case["pooled"], &format!("{name}: pooled output"));
        let mut classifier = SequenceClassifier::new(encoder, 3);
        let n = bias.len();
        let head_weight = Tensor::<B, 2>::from_data(TensorData::new(weight, [n, d]), &device).transpose();
        classifier.head.weight = Param::from_tensor(head_weight);
        classifier.head.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(bias, [n]), &device)));
        let logits = classifier.forward(tokens::<B>(&ids, &device), types_t.clone(), mask_t.clone());
        close(values(logits.clone()), &case["logits"], &format!("{name}: logits"));
        // LoRA's default targets are the query and value projections; B = 0 leaves the logits.
        let lora = MethodConfig::from_flags("lora", &Default::default()).unwrap();
        let encoder = classifier.encoder.adapt(&spec, &lora, &Targets::Default).unwrap();
        let adapted = encoder.layers[0].query.adapter.is_some() && encoder.layers[0].value.adapter.is_some();
        assert!(adapted && encoder.layers[0].key.adapter.is_none(), "{name}: LoRA not on query_proj/value_proj");
        classifier.encoder = encoder;
        let again = classifier.forward(tokens::<B>(&ids, &device), types_t, mask_t.clone());
        close(values(again), &case["logits"], &format!("{name}: logits with a fresh LoRA"));
    }
    // The sites carry DeBERTa's module names (PEFT's target names).
    let spec = ArchSpec::from_config_file(&fixture().join("../tiny-deberta/v3/config.json")).unwrap();
    let names: Vec<String> = spec.linear_sites().into_iter().take(3).map(|s| s.name).collect();
    assert_eq!(names[0], "encoder.layer.0.attention.self.query_proj");
    assert_eq!(names[2], "encoder.layer.0.attention.self.value_proj");
}

/// Adapters written by `tpeft finetune` give in transformers + PEFT (`PeftModel.from_pretrained`)
/// the logits they give here, within 1e-4: a LoRA on the tiny DeBERTa classifier, whose trained
/// head PEFT loads as `modules_to_save` (`classifier`), and a LoRA on the tiny LLaMA (fixture and
/// script: `scripts/fixtures/tpeft_adapters_in_peft.sh`).
#[test]
fn peft_reads_adapters_written_by_tpeft() {
    use burn::module::Param;
    use tensor_peft_models::adapter_file::{load_adapter, load_adapter_with_extras};
    use tensor_peft_models::heads::head_from_hf;
    use tensor_peft_models::{Bert, SequenceClassifier};
    let device = Default::default();
    let dir = fixture().join("../tpeft-adapters-in-peft");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ints = |v: &serde_json::Value| -> Vec<Vec<i64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect())
            .collect()
    };
    let close = |got: Vec<f64>, reference: &serde_json::Value, what: &str| {
        let diff = max_diff(&got, &json_floats(reference));
        assert!(diff < 1e-4, "{what}: differs from transformers + PEFT by {diff}");
    };
    // The classifier: LoRA on query_proj/value_proj under `deberta.`, the head as `classifier`.
    let adapter = dir.join("deberta-classifier");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["modules_to_save"], serde_json::json!(["classifier"]));
    let (mut encoder, spec) = Bert::<B>::from_hf_dir(&fixture().join("../tiny-deberta/v3"), &device).unwrap();
    let (_, extras) = load_adapter_with_extras(&mut encoder, &spec, &adapter).unwrap();
    let head = |name: &str| {
        let (shape, values) = &extras[name];
        head_from_hf(name, shape, values)
    };
    let ((_, w_shape, w), (_, _, b)) = (head("classifier.weight"), head("classifier.bias"));
    let mut classifier = SequenceClassifier::new(encoder, b.len());
    classifier.head.weight = Param::from_tensor(Tensor::from_data(TensorData::new(w, w_shape), &device));
    classifier.head.bias = Some(Param::from_tensor(Tensor::from_data(TensorData::new(b.clone(), [b.len()]), &device)));
    let case = &expected["deberta_classifier"];
    let (ids, mask) = (ints(&case["ids"]), ints(&case["attention_mask"]));
    let mask: Vec<f32> = mask.iter().flatten().map(|&m| m as f32).collect();
    let mask = Tensor::<B, 2>::from_data(TensorData::new(mask, [ids.len(), ids[0].len()]), &device);
    let logits = classifier.forward(tokens::<B>(&ids, &device), None, mask);
    close(values(logits), &case["logits"], "DeBERTa classifier logits");
    // The causal LM.
    let (mut llama, spec) = Llama::<B>::from_hf_dir(&fixture().join("../tiny-llama-words"), &device).unwrap();
    load_adapter(&mut llama, &spec, &dir.join("llama-causal-lm")).unwrap();
    let case = &expected["llama_causal_lm"];
    close(values(llama.forward(tokens::<B>(&ints(&case["ids"]), &device))), &case["logits"], "LLaMA logits");
}

/// Every tensor method, with every flag at its default, trains at most a tenth of LoRA r=8's
/// adapter parameters (each at its default targets) on MiniLM's 384-wide layers, the README's
/// VADER recipe where the defaults were chosen (docs/cli.md, "Recommended settings"). On
/// LLaMA-2-7B the ratios are larger, but for LoRETTA_adp, whose biases (`b + d` for each of 96
/// adapters) alone are 393,984: 9.9× fewer.
#[test]
fn tensor_method_defaults_train_a_tenth_of_lora_r8_or_less() {
    let count = |preset: &str, name: &str| {
        let (spec, method) = (ArchSpec::preset(preset).unwrap(), MethodConfig::from_name(name).unwrap());
        Targets::Default.count(&spec, &method).unwrap().total()
    };
    let lora = count("minilm-l6", "lora");
    assert_eq!(lora, 6 * 2 * 8 * (384 + 384), "LoRA r=8 on q,v");
    // (`toy` is the registry test's one-folder example method, not a tensor method.)
    for name in METHOD_NAMES.iter().filter(|&&n| n != "lora" && n != "toy") {
        let params = count("minilm-l6", name);
        assert!(params * 10 <= lora, "{name} trains {params}, LoRA r=8 {lora}");
    }
    assert_eq!((count("minilm-l6", "loretta-rep"), count("llama2-7b", "lora")), (7_200, 4_194_304));
    assert_eq!(count("llama2-7b", "loretta-adp"), 423_168);
}

/// LoRETTA_adp sits where the official code puts it: on LLaMA an input adapter before `gate_proj`
/// and `up_proj` and an output adapter after `down_proj` (three per block: LLaMA-2-7B at the
/// paper's bottleneck 64 and tensor rank 8 trains 921,600 parameters), on BERT after the attention and feed-forward outputs; the
/// `houlsby` placement puts two per block everywhere. An input adapter changes what its
/// projection reads: with a linear bottleneck, `f(h) = h·M + c`, so `gate_proj(h + f(h))` is a
/// plain projection of weight `(I + M)·W` and bias `c·W`, which the reference model holds instead.
#[test]
fn loretta_adp_goes_where_the_official_code_puts_it() {
    use tensor_peft_adapters::{
        Activation, AdaptedLinear, AdpPlacement, DeltaInit, FrozenLinear, FrozenWeight, LorettaAdpConfig,
        ResidualAdapter,
    };
    let count = |preset: &str, placement| {
        let spec = ArchSpec::preset(preset).unwrap();
        let method = MethodConfig::LorettaAdp(
            LorettaAdpConfig::new().with_bottleneck(64).with_tensor_rank(8).with_placement(Some(placement)),
        );
        let report = method.count(&spec.geometry(), &[], &spec.residual_sites()).unwrap();
        let names: Vec<String> = report.rows.iter().take(3).map(|r| r.module.clone()).collect();
        (report.rows.len(), report.total(), names)
    };
    let (adapters, params, names) = count("llama2-7b", AdpPlacement::Official);
    assert_eq!((adapters, params), (96, 921_600));
    let block = ["gate_input_adapter", "up_input_adapter", "ffn_adapter"].map(|n| format!("model.layers.0.{n}"));
    assert_eq!(names, block);
    assert_eq!(count("llama2-7b", AdpPlacement::Houlsby).0, 64);
    assert_eq!(count("llama2-7b", AdpPlacement::Houlsby).1, 614_400);
    let (adapters, _, names) = count("minilm-l6", AdpPlacement::Official);
    assert_eq!(
        (adapters, &names[..2]),
        (12, &["encoder.layer.0.attention_adapter".into(), "encoder.layer.0.ffn_adapter".into()][..])
    );

    // The forward: the adapted model against a reference that folds each input adapter into its
    // projection (the output adapters stay in both).
    let device = Default::default();
    let (base, spec) = Llama::<B>::from_hf_dir(&fixture(), &device).unwrap();
    let (ids, _, _) = expected();
    let x = tokens::<B>(&ids, &device);
    let cfg = LorettaAdpConfig::new()
        .with_bottleneck(4)
        .with_tensor_rank(2)
        .with_activation(Activation::Identity)
        .with_scaling(0.7)
        .with_init(DeltaInit::Paper);
    let adapted = base.adapt(&spec, &MethodConfig::LorettaAdp(cfg), &Targets::Default).unwrap();
    let mut reference = adapted.clone();
    let d = spec.hidden;
    let fold = |adapter: Option<ResidualAdapter<B>>, projection: &AdaptedLinear<B>| {
        let adapter = adapter.expect("an input adapter in every block");
        let f = |h: Tensor<B, 2>| adapter.forward(h.clone()) - h;
        let c = f(Tensor::zeros([1, d], &device));
        let m = f(Tensor::eye(d, &device)) - c.clone();
        let w = projection.base.weight_f32();
        let weight = (Tensor::eye(d, &device) + m).matmul(w.clone());
        let bias = c.matmul(w).reshape([-1]);
        let base = FrozenLinear {
            weight: FrozenWeight::Values(Param::from_tensor(weight)),
            bias: Some(Param::from_tensor(bias)),
        };
        AdaptedLinear::new(base, None).unwrap()
    };
    for layer in &mut reference.layers {
        layer.gate_proj = fold(layer.gate_input_adapter.take(), &layer.gate_proj);
        layer.up_proj = fold(layer.up_input_adapter.take(), &layer.up_proj);
        assert!(layer.attention_adapter.is_none() && layer.ffn_adapter.is_some());
    }
    let (got, want) = (values(adapted.forward(x.clone())), values(reference.forward(x.clone())));
    let base_logits = values(Llama::<B>::from_hf_dir(&fixture(), &device).unwrap().0.forward(x));
    let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max);
    assert!(diff(&got, &base_logits) > 1e-3, "the adapters change the logits");
    assert!(diff(&got, &want) < 1e-4, "input adapters act on the projections' input: {}", diff(&got, &want));
}

/// The tiny word-level LLaMA, the committed adapters of every method trained on it
/// (`tests/fixtures/adapter-files/<method>`), and two token sequences.
fn words_llama_and_input() -> (Llama<B>, ArchSpec, PathBuf, Tensor<B, 2, Int>) {
    let device = Default::default();
    let (base, spec) = Llama::<B>::from_hf_dir(&fixture().join("../tiny-llama-words"), &device).unwrap();
    let x = tokens::<B>(&[vec![1, 12, 30, 7, 2, 44, 5], vec![3, 9, 41, 0, 17, 8, 63]], &device);
    (base, spec, fixture().join("../adapter-files"), x)
}

#[test]
fn several_adapters_switch_and_disable_on_one_base() {
    use tensor_peft_models::adapter_file::load_adapter;
    use tensor_peft_models::adapter_set::carries_adapters;
    use tensor_peft_models::{MultiAdapterModel, put_adapters, take_adapters};
    let (base, spec, files, x) = words_llama_and_input();
    let logits = |m: &Llama<B>| values(m.forward(x.clone()));
    let base_logits = logits(&base);
    let names = ["lora", "tt-lora", "lotr", "loretta-adp", "lorta"];
    let alone: Vec<Vec<f64>> = names
        .iter()
        .map(|name| {
            let mut model = base.clone();
            load_adapter(&mut model, &spec, &files.join(name)).unwrap();
            let got = logits(&model);
            assert!(max_diff(&got, &base_logits) > 1e-4, "{name}: the trained adapter must change the logits");
            got
        })
        .collect();
    let mut multi = MultiAdapterModel::new(base.clone(), spec.clone()).unwrap();
    for name in names {
        multi.load_adapter(&files.join(name), name).unwrap();
    }
    // The first adapter is active, as with PeftModel.from_pretrained; switching gives each
    // adapter's own logits, bit for bit, back and forth (shared factors and residual slots too).
    assert_eq!((multi.active_adapter(), multi.adapter_names()), (Some("lora"), names.to_vec()));
    assert_eq!(logits(multi.model()), alone[0]);
    for i in [3, 1, 4, 2, 0, 3, 2] {
        multi.set_adapter(names[i]).unwrap();
        assert_eq!(multi.active_adapter(), Some(names[i]));
        assert_eq!(logits(multi.model()), alone[i], "{} after switching", names[i]);
    }
    // Disabled: exactly the base model, for one pass or until enabled again.
    let during = multi.with_adapters_disabled(|m| logits(m)).unwrap();
    assert_eq!(during, base_logits);
    assert_eq!(logits(multi.model()), alone[2], "the scoped pass re-enables the active adapter");
    multi.disable_adapters().unwrap();
    assert!(!multi.adapters_enabled() && !carries_adapters(multi.model_mut(), &spec));
    assert_eq!(logits(multi.model()), base_logits);
    multi.enable_adapters().unwrap();
    assert_eq!(logits(multi.model()), alone[2]);
    // Refusals name what is wrong and change nothing.
    let err = multi.set_adapter("nope").unwrap_err().to_string();
    assert!(err.contains("no adapter called `nope`") && err.contains("lora, tt-lora, lotr"), "{err}");
    let err = multi.load_adapter(&files.join("lora"), "lotr").unwrap_err().to_string();
    assert!(err.contains("already an adapter called `lotr`"), "{err}");
    let other = std::env::temp_dir().join(format!("tpeft-other-base-{}", std::process::id()));
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(files.join("lora/adapter_model.safetensors"), other.join("adapter_model.safetensors")).unwrap();
    let config = std::fs::read_to_string(files.join("lora/adapter_config.json")).unwrap();
    std::fs::write(other.join("adapter_config.json"), config.replace("\"hidden\": 32", "\"hidden\": 48")).unwrap();
    let err = multi.load_adapter(&other, "other").unwrap_err().to_string();
    assert!(err.contains("adapter `other`") && err.contains("trained on a base model"), "{err}");
    std::fs::remove_dir_all(&other).unwrap();
    assert_eq!(logits(multi.model()), alone[2]);
    // Deleting the active adapter leaves the base model.
    multi.set_adapter("lora").unwrap();
    multi.delete_adapter("lora").unwrap();
    assert_eq!((multi.active_adapter(), logits(multi.model())), (None, base_logits.clone()));
    multi.set_adapter("lorta").unwrap();
    assert_eq!(logits(&multi.into_model()), alone[4]);
    // A merged adapter cannot be switched away from until it is unmerged (on a holder of its own:
    // W + ΔW − ΔW is W only up to rounding).
    let mut multi = MultiAdapterModel::new(base.clone(), spec.clone()).unwrap();
    multi.load_adapter(&files.join("tt-lora"), "tt-lora").unwrap();
    multi.load_adapter(&files.join("lora"), "lora").unwrap();
    let merge = |multi: &mut MultiAdapterModel<B, Llama<B>>, undo: bool| {
        let shared = multi.model().shared.clone();
        let slot = &mut multi.model_mut().layers[0].q_proj;
        *slot = if undo { slot.clone().unmerge(&shared) } else { slot.clone().merge(&shared) }.unwrap();
    };
    merge(&mut multi, false);
    let err = multi.set_adapter("lora").unwrap_err().to_string();
    assert!(err.contains("merged") && err.contains("unmerge"), "{err}");
    assert!(multi.disable_adapters().is_err());
    assert_eq!(multi.active_adapter(), Some("tt-lora"));
    merge(&mut multi, true);
    multi.set_adapter("lora").unwrap();
    assert!(max_diff(&logits(multi.model()), &alone[0]) < 1e-5);
    // The generic pieces under the holder: take and put back.
    let mut model = base.clone();
    load_adapter(&mut model, &spec, &files.join("lotr")).unwrap();
    let set = take_adapters(&mut model, &spec).unwrap();
    assert_eq!(logits(&model), base_logits);
    put_adapters(&mut model, set).unwrap();
    assert_eq!(logits(&model), alone[2]);
    let device = Default::default();
    let (_, again, _) =
        tensor_peft_models::adapter_file::read_adapter::<B>(&spec, &files.join("lora"), &device).unwrap();
    let err = put_adapters(&mut model, again).unwrap_err().to_string();
    assert!(err.contains("already carries an adapter"), "{err}");
    assert!(MultiAdapterModel::new(model, spec).is_err(), "a model with adapters is refused");
}

/// `ΔW` of every adapted site of `model`, by site name.
fn site_deltas(model: &mut Llama<B>, spec: &ArchSpec) -> std::collections::BTreeMap<String, Vec<f64>> {
    use tensor_peft_adapters::LinearDelta;
    use tensor_peft_models::AdapterSlots;
    let shared = model.shared.clone();
    spec.linear_sites()
        .into_iter()
        .filter_map(|site| {
            let adapter = model.linear_slot(&site)?.adapter.as_ref()?;
            Some((site.name.clone(), values(adapter.delta_weight(&shared))))
        })
        .collect()
}

#[test]
fn weighted_combinations_of_adapters_are_their_weighted_updates() {
    use tensor_peft_adapters::LinearAdapter;
    use tensor_peft_models::adapter_file::{load_adapter, read_adapter, save_adapter};
    use tensor_peft_models::adapter_set::{WeightedAdapter, combine_adapters};
    use tensor_peft_models::{AdapterSlots, Combination, MultiAdapterModel};
    let (base, spec, files, x) = words_llama_and_input();
    let device = Default::default();
    let logits = |m: &Llama<B>| values(m.forward(x.clone()));
    // LoRA and TT-LoRA at q, v; LoTR's shared factors; LoRTA at q, k, v, o: the union of sites.
    let parts = [("lora", 0.7), ("tt-lora", -0.3), ("lotr", 0.5), ("lorta", 1.2)];
    let mut multi = MultiAdapterModel::new(base.clone(), spec.clone()).unwrap();
    let mut expected = std::collections::BTreeMap::<String, Vec<f64>>::new();
    for (name, weight) in parts {
        multi.load_adapter(&files.join(name), name).unwrap();
        let mut alone = base.clone();
        load_adapter(&mut alone, &spec, &files.join(name)).unwrap();
        for (site, delta) in site_deltas(&mut alone, &spec) {
            let sum = expected.entry(site).or_insert_with(|| vec![0.0; delta.len()]);
            sum.iter_mut().zip(&delta).for_each(|(s, d)| *s += weight * d);
        }
    }
    multi.add_weighted_adapter(&parts, "mix", Combination::Cat).unwrap();
    assert_eq!(multi.active_adapter(), Some("lora"), "the combination does not become active");
    multi.set_adapter("mix").unwrap();
    let config = multi.adapter("mix").unwrap().config.clone();
    let got = site_deltas(multi.model_mut(), &spec);
    assert_eq!(got.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>());
    assert_eq!(got.len(), 2 * 4, "q, k, v, o of both layers");
    for (site, delta) in &got {
        let diff = max_diff(delta, &expected[site]);
        assert!(diff < 1e-5, "{site}: combined ΔW differs from Σ wᵢ·ΔWᵢ by {diff}");
    }
    // One rank for every site: LoRA 8 + TT-LoRA's cut rank 5 + LoTR 8 at q, v; LoRTA's 8; scale 1.
    let tensor_peft_adapters::MethodConfig::Lora(lora) = &config.method else { panic!("not LoRA: {config:?}") };
    assert_eq!((lora.rank, lora.alpha, lora.scaling()), (29, 29.0, 1.0));
    // The model with the combination computes the base model with W + Σ wᵢ·ΔWᵢ.
    let mut dense = base.clone();
    for site in spec.linear_sites() {
        if let Some(delta) = expected.get(&site.name) {
            let delta: Vec<f32> = delta.iter().map(|&v| v as f32).collect();
            let delta = Tensor::<B, 2>::from_data(TensorData::new(delta, [site.d_in, site.d_out]), &device);
            let slot = dense.linear_slot(&site).unwrap();
            slot.base = slot.base.clone().add_delta(delta).unwrap();
        }
    }
    let mixed = logits(multi.model());
    let diff = max_diff(&mixed, &logits(&dense));
    assert!(diff < 1e-4, "logits with the combination differ from the merged weighted sum by {diff}");
    // Its file (PEFT's LoRA format, r = lora_alpha) reproduces it exactly.
    let dir = std::env::temp_dir().join(format!("tpeft-combined-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    save_adapter(multi.model_mut(), &spec, &config, &dir).unwrap();
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((json["r"].as_u64(), json["lora_alpha"].as_f64()), (Some(29), Some(29.0)));
    let mut reloaded = base.clone();
    load_adapter(&mut reloaded, &spec, &dir).unwrap();
    assert_eq!(logits(&reloaded), mixed);
    std::fs::remove_dir_all(&dir).unwrap();

    // PEFT's linear combination of two LoRA adapters of one rank: A = Σ ±√|w·s|·Aᵢ, B = Σ √|w·s|·Bᵢ.
    let (lora_config, mut second, _) = read_adapter::<B>(&spec, &files.join("lora"), &device).unwrap();
    for (_, adapter) in &mut second.linear {
        let LinearAdapter::Lora(l) = adapter else { unreachable!() };
        let dims = l.b.dims();
        l.b = burn::module::Param::from_tensor(Tensor::random(dims, burn::tensor::Distribution::Default, &device));
    }
    multi.add_adapter("second", lora_config, second).unwrap();
    multi.add_weighted_adapter(&[("lora", 0.6), ("second", -0.25)], "linear", Combination::Linear).unwrap();
    let (first, second) = (read_lora(&mut multi, "lora"), read_lora(&mut multi, "second"));
    multi.set_adapter("linear").unwrap();
    let got = site_deltas(multi.model_mut(), &spec);
    assert_eq!(got.len(), 4);
    for (site, delta) in got {
        let ((a1, b1, s1), (a2, b2, s2)) = (&first[&site], &second[&site]);
        let (w1, w2) = (0.6 * s1, -0.25 * s2);
        let a = a1.clone().mul_scalar(w1.sqrt()) + a2.clone().mul_scalar(-(-w2).sqrt());
        let b = b1.clone().mul_scalar(w1.sqrt()) + b2.clone().mul_scalar((-w2).sqrt());
        let diff = max_diff(&delta, &values(a.matmul(b)));
        assert!(diff < 1e-5, "{site}: linear combination differs from PEFT's formula by {diff}");
    }

    // Refusals.
    let refused = |multi: &mut MultiAdapterModel<B, Llama<B>>, parts: &[(&str, f64)], how: Combination| {
        multi.add_weighted_adapter(parts, "refused", how).unwrap_err().to_string()
    };
    multi.load_adapter(&files.join("loretta-adp"), "adp").unwrap();
    let err = refused(&mut multi, &[("lora", 0.5), ("adp", 0.5)], Combination::Cat);
    assert!(err.contains("`adp` is loretta-adp") && err.contains("nonlinear"), "{err}");
    let err = refused(&mut multi, &[("lora", 0.5), ("tt-lora", 0.5)], Combination::Linear);
    assert!(err.contains("`tt-lora` is tt-lora") && err.contains("cat"), "{err}");
    multi.load_adapter(&fixture().join("../tpeft-adapters-in-peft/llama-causal-lm"), "r4").unwrap();
    let err = refused(&mut multi, &[("lora", 0.5), ("r4", 0.5)], Combination::Linear);
    assert!(err.contains("one rank") && err.contains("`r4` r=4"), "{err}");
    let err = refused(&mut multi, &[("lora", f64::NAN)], Combination::Cat);
    assert!(err.contains("finite"), "{err}");
    let err = refused(&mut multi, &[], Combination::Cat);
    assert!(err.contains("nothing to combine"), "{err}");
    let err = refused(&mut multi, &[("lora", 1.0), ("missing", 1.0)], Combination::Cat);
    assert!(err.contains("no adapter called `missing`"), "{err}");
    let err = multi.add_weighted_adapter(&[("lora", 1.0)], "lotr", Combination::Cat).unwrap_err().to_string();
    assert!(err.contains("already an adapter called `lotr`"), "{err}");
    assert!(Combination::parse("svd").unwrap_err().to_string().contains("cat or linear"));
    // Adapters of a model of other shapes: refused by site and shape.
    let (mut config, set, _) = read_adapter::<B>(&spec, &files.join("lora"), &device).unwrap();
    config.base_model = None;
    let mut wider = spec.clone();
    wider.hidden = 48;
    let part = WeightedAdapter { name: "lora", config: &config, set: &set, weight: 1.0 };
    let err = combine_adapters(&wider, &[part], Combination::Cat).unwrap_err().to_string();
    assert!(err.contains("as a 32x32 matrix, but in this model it is 48x"), "{err}");
    assert!(multi.add_adapter("wide", config, set).is_ok(), "same shapes");
}

/// Every site's LoRA factors `(A, B, scale)` of the adapter `name`.
fn read_lora(
    multi: &mut tensor_peft_models::MultiAdapterModel<B, Llama<B>>,
    name: &str,
) -> std::collections::BTreeMap<String, (Tensor<B, 2>, Tensor<B, 2>, f64)> {
    use tensor_peft_adapters::LinearAdapter;
    use tensor_peft_models::AdapterSlots;
    let spec = multi.spec().clone();
    multi.set_adapter(name).unwrap();
    let model = multi.model_mut();
    spec.linear_sites()
        .into_iter()
        .filter_map(|site| match model.linear_slot(&site)?.adapter.as_ref()? {
            LinearAdapter::Lora(l) => Some((site.name.clone(), (l.a.val(), l.b.val(), l.scaling))),
            _ => None,
        })
        .collect()
}

#[test]
fn peft_add_weighted_adapter_cat_equals_ours() {
    use tensor_peft_models::adapter_file::{load_adapter, read_adapter};
    use tensor_peft_models::adapter_set::{WeightedAdapter, combine_adapters};
    use tensor_peft_models::{Combination, put_adapters};
    let (base, spec, _, _) = words_llama_and_input();
    let device = Default::default();
    let dir = fixture().join("../peft-weighted-adapter");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let root = fixture().join("../../..");
    let read: Vec<_> = expected["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|path| read_adapter::<B>(&spec, &root.join(path.as_str().unwrap()), &device).unwrap())
        .collect();
    let weights = json_floats(&expected["weights"]);
    let parts: Vec<_> = read
        .iter()
        .zip(["a", "b"])
        .zip(&weights)
        .map(|(((config, set, _), name), &weight)| WeightedAdapter { name, config, set, weight })
        .collect();
    let (_, ours) = combine_adapters(&spec, &parts, Combination::Cat).unwrap();
    let mut model = base.clone();
    put_adapters(&mut model, ours).unwrap();
    let mut peft = base.clone();
    let config = load_adapter(&mut peft, &spec, &dir.join("cat")).unwrap();
    assert_eq!(config.peft_type, "LORA");
    let (ours, theirs) = (site_deltas(&mut model, &spec), site_deltas(&mut peft, &spec));
    assert_eq!(ours.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (site, delta) in &ours {
        let diff = max_diff(delta, &theirs[site]);
        assert!(diff < 1e-6, "{site}: our cat combination differs from PEFT's by {diff}");
    }
    let ids: Vec<Vec<i64>> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect())
        .collect();
    let x = tokens::<B>(&ids, &device);
    let diff = max_diff(&values(model.forward(x)), &json_floats(&expected["logits"]));
    assert!(diff < 1e-4, "logits with our combination differ from transformers + PEFT's by {diff}");
}

/// The block-wise view (`BlockStack`) run one block at a time, on the autodiff model and on its
/// inner copy, gives the model's own forward: LLaMA with LoTR (factors shared by every block) and
/// DeBERTa-v3 (relative embeddings in the context, padding mask).
#[test]
fn the_block_wise_forward_run_by_hand_is_the_models_forward() {
    use tensor_peft_models::{Bert, BlockStack, StackInput};
    fn by_hand<Bk: Backend, S: BlockStack<Bk>>(stack: &S, input: &StackInput<Bk>) -> Vec<f64> {
        let context = stack.stack_context(input);
        let mut x = stack.stack_input(input);
        for i in 0..stack.num_blocks() {
            x = stack.block_forward(i, x, &context);
        }
        values(stack.stack_output(x))
    }
    let close = |a: &[f64], b: &[f64]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    let (base, spec, ids) = tiny_llama_and_input();
    let llama = base.adapt(&spec, &MethodConfig::from_name("lotr").unwrap(), &Targets::Default).unwrap();
    assert_eq!(llama.num_blocks(), spec.layers);
    let hidden = values(llama.hidden(ids.clone()));
    let input = StackInput::ids(ids.clone());
    assert!(close(&by_hand(&llama, &input), &hidden));
    let inner = StackInput::ids(ids.clone().inner());
    assert!(close(&by_hand(&llama.valid(), &inner), &hidden));
    let logits = llama.logits(llama.hidden(ids.clone()));
    assert!(close(&values(logits), &values(llama.forward(ids))));

    let device = Default::default();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-deberta/v3");
    let (deberta, _) = Bert::<B>::from_hf_dir(&dir, &device).unwrap();
    let ids = tokens::<B>(&[vec![1, 7, 9, 4, 2], vec![1, 8, 2, 0, 0]], &device);
    let mask =
        Tensor::<B, 2>::from_data(TensorData::new(vec![1.0f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], [2, 5]), &device);
    let input = StackInput { ids: ids.clone(), types: None, mask: Some(mask.clone()) };
    assert!(close(&by_hand(&deberta, &input), &values(deberta.forward(ids, None, mask))));
}

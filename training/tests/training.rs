//! The training crate's tests (one binary): metrics against hand counts, the seeded split against
//! the Python reference implementation's indices, data parsing and its errors, the LR schedule,
//! global-norm clipping against torch's formula, and end-to-end fine-tuning of a tiny LLaMA
//! (causal LM and prompt-based classification: loss falls, the adapter reloads and evaluates to the
//! recorded validation metrics, resuming from a step checkpoint is bit-identical) and of MiniLM
//! (classification and pair regression, when the assets are present); multiple choice and
//! generation: SQuAD's EM/F1, choice scores against a plain forward, end-to-end runs, bad rows.

use burn::backend::{Autodiff, NdArray};
use burn::module::Module;
use burn::nn::LinearConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use std::path::{Path, PathBuf};
use tensor_peft_adapters::MethodConfig;
use tensor_peft_training::data::{self, FieldMap, TaskKind};
use tensor_peft_training::eval::Target;
use tensor_peft_training::metrics::{accuracy, f1, matthews, pearson, ranks, spearman};
use tensor_peft_training::optim::{Decay, WarmupSchedule, clip_global_norm};
use tensor_peft_training::{TrainConfig, TrainError, finetune};

type B = NdArray<f32>;
type AB = Autodiff<B>;

/// Burn's CPU backends draw random numbers from one process-wide generator, which `finetune`
/// seeds: end-to-end runs must not overlap, or their initialisations interleave.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tensor-peft-training-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn binary_metrics_match_hand_counts() {
    // tp=3 fn=2 fp=1 tn=4
    let labels = [1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
    let pred = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0];
    assert!((accuracy(&pred, &labels) - 0.7).abs() < 1e-12);
    assert!((f1(&pred, &labels, 2) - 6.0 / 9.0).abs() < 1e-12);
    let mcc = (3.0 * 4.0 - 1.0 * 2.0) / (4.0f64 * 5.0 * 5.0 * 6.0).sqrt();
    assert!((matthews(&pred, &labels, 2) - mcc).abs() < 1e-12);
    // A constant prediction has no correlation.
    assert_eq!(matthews(&[0; 10], &labels, 2), 0.0);
}

#[test]
fn multiclass_metrics_match_sklearn() {
    // sklearn.metrics.f1_score(average="macro") and matthews_corrcoef of these vectors
    // (scikit-learn 1.x).
    let labels = [0, 1, 2, 0, 1, 2];
    let pred = [0, 2, 1, 0, 0, 2];
    assert!((f1(&pred, &labels, 3) - 0.43333333333333335).abs() < 1e-12);
    assert!((matthews(&pred, &labels, 3) - 0.26111648393354675).abs() < 1e-12);
}

#[test]
fn rank_correlations_match_scipy() {
    assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
    // scipy.stats.spearmanr([1,2,3,4,5],[5,6,7,8,7]) = 0.8207826816681233
    let s = spearman(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5.0, 6.0, 7.0, 8.0, 7.0]);
    assert!((s - 0.8207826816681233).abs() < 1e-6, "{s}");
    // scipy.stats.pearsonr([1,2,3,4],[2,4,5,9]) = 0.9647638212377322
    let p = pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]);
    assert!((p - 0.9647638212377322).abs() < 1e-9, "{p}");
}

#[test]
fn split_is_seeded_disjoint_and_matches_the_python_reference() {
    // 10,568 rated VADER movie snippets, as in docs/results/vader_peft_lora.json.
    let [train, valid, test] = data::split_indices(10_568, 1234, 10, 10);
    assert_eq!((train.len(), valid.len(), test.len()), (8_456, 1_056, 1_056));
    let mut all: Vec<usize> = train.iter().chain(&valid).chain(&test).copied().collect();
    all.sort();
    assert_eq!(all, (0..10_568).collect::<Vec<_>>());
    assert_eq!(data::split_indices(10_568, 1234, 10, 10)[0], train, "not deterministic");
    assert_ne!(data::split_indices(10_568, 1235, 10, 10)[0], train, "the seed is ignored");
    // The same splitmix64 Fisher–Yates in Python (scripts/reference/vader_peft_lora.py, whose
    // output docs/results/vader_peft_lora.json records these indices).
    assert_eq!(&train[..5], &PYTHON_TRAIN_HEAD);
    assert_eq!(&valid[..5], &PYTHON_VALID_HEAD);
    assert_eq!(&test[..5], &PYTHON_TEST_HEAD);
}

#[test]
fn split_seed_fixes_the_split_while_seed_varies() {
    let dir = scratch("split-seed");
    let file = dir.join("data.jsonl");
    let rows: String = (0..40).map(|i| format!("{{\"text\": \"row {i}\", \"label\": {}}}\n", i % 2)).collect();
    std::fs::write(&file, rows).unwrap();
    let lines = |seed: u64, split_seed: Option<u64>| {
        let cfg = TrainConfig {
            train: file.clone(),
            valid_percent: 20,
            test_percent: 10,
            seed,
            split_seed,
            ..TrainConfig::default()
        };
        let (train, valid, test, _) = tensor_peft_training::trainer::load_splits(&cfg).unwrap();
        let lines = |v: &[data::Example]| v.iter().map(|e| e.origin.line).collect::<Vec<_>>();
        [lines(&train), lines(&valid), lines(&test)]
    };
    let fixed = lines(1, Some(7));
    assert_eq!(fixed.each_ref().map(Vec::len), [28, 8, 4]);
    assert_eq!(lines(2, Some(7)), fixed, "--seed moved a split fixed by --split-seed");
    assert_eq!(lines(7, None), fixed, "without --split-seed the split follows --seed");
    assert_ne!(lines(1, None), lines(2, None), "--seed does not move the split");
    assert_ne!(lines(1, Some(8)), fixed, "--split-seed is ignored");
}

const PYTHON_TRAIN_HEAD: [usize; 5] = [4247, 8212, 10366, 1610, 6707];
const PYTHON_VALID_HEAD: [usize; 5] = [8552, 2880, 9287, 7366, 2898];
const PYTHON_TEST_HEAD: [usize; 5] = [9828, 9935, 7862, 7427, 5693];

#[test]
fn the_vader_asset_has_the_reference_counts() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../assets/vader/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt");
    if !path.is_file() {
        assert!(
            std::env::var_os("TENSOR_PEFT_REQUIRE_ASSETS").is_none(),
            "assets missing: run scripts/fetch-assets.sh"
        );
        return;
    }
    let examples = data::vader_movie_reviews(&path).unwrap();
    let counts = data::label_counts(&examples);
    assert_eq!((examples.len(), counts["1"], counts["0"]), (10_568, 5_242, 5_326));
}

#[test]
fn vader_loader_drops_neutral_ratings() {
    let dir = scratch("vader");
    let path = dir.join("snippets.txt");
    std::fs::write(&path, "1\t2.5\tgood film \r\n2\t0\tmeh\r\n3\t-1.2\tbad\twith a tab\n\n").unwrap();
    let examples = data::vader_movie_reviews(&path).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(
        examples[1].content,
        data::Content::Labelled { text: "bad\twith a tab".into(), text_pair: None, label: "0".into() }
    );
    assert_eq!(examples[1].origin.line, 3);
    std::fs::write(&path, "1\tnot-a-number\ttext\n").unwrap();
    let err = data::vader_movie_reviews(&path).unwrap_err().to_string();
    assert!(err.contains("snippets.txt:1:") && err.contains("numeric rating"), "{err}");
}

#[test]
fn bad_rows_name_their_file_and_line() {
    let dir = scratch("rows");
    let path = dir.join("data.jsonl");
    std::fs::write(&path, "{\"text\": \"a\", \"label\": 1}\n\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\"\n")
        .unwrap();
    let fields = FieldMap::default();
    let err = data::read_file(&path, TaskKind::Classification, &fields, false).unwrap_err().to_string();
    assert!(err.contains("data.jsonl:4:") && err.contains("invalid JSON"), "{err}");
    let skipped = data::read_file(&path, TaskKind::Classification, &fields, true).unwrap();
    assert_eq!((skipped.examples.len(), skipped.skipped.len()), (2, 1));

    std::fs::write(&path, "{\"text\": \"a\"}\n").unwrap();
    let err = data::read_file(&path, TaskKind::Classification, &fields, false).unwrap_err().to_string();
    assert!(err.contains(":1:") && err.contains("missing field `label`") && err.contains("--label-field"), "{err}");

    std::fs::write(&path, "").unwrap();
    let err = data::read_file(&path, TaskKind::Classification, &fields, false).unwrap_err().to_string();
    assert!(err.contains("empty"), "{err}");

    let csv = dir.join("data.csv");
    std::fs::write(&csv, "sentence,y\n\"hello, world\",pos\nbye,neg\n").unwrap();
    let mapped = FieldMap { text: "sentence".into(), label: "y".into(), ..FieldMap::default() };
    let rows = data::read_file(&csv, TaskKind::Classification, &mapped, false).unwrap();
    assert_eq!(
        rows.examples[0].content,
        data::Content::Labelled { text: "hello, world".into(), text_pair: None, label: "pos".into() }
    );
    assert_eq!(rows.examples[1].origin.line, 3);
    let labels = data::Labels::from_examples(&rows.examples, &csv).unwrap();
    assert_eq!(labels.names, ["neg", "pos"]);
    let err = labels.index("neutral", &rows.examples[0].origin).unwrap_err().to_string();
    assert!(err.contains("unknown label `neutral`") && err.contains("data.csv:2:"), "{err}");

    let tsv = dir.join("data.tsv");
    std::fs::write(&tsv, "text\ttext_pair\tscore\na\tb\t3.5\nc\td\thigh\n").unwrap();
    let err = data::read_file(&tsv, TaskKind::Regression, &fields, false).unwrap_err().to_string();
    assert!(err.contains("data.tsv:3:") && err.contains("finite number"), "{err}");

    let chat = dir.join("chat.jsonl");
    std::fs::write(&chat, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let err = data::read_file(&chat, TaskKind::CausalLm, &fields, false).unwrap_err().to_string();
    assert!(err.contains("no assistant turn"), "{err}");

    let err = data::read_file(&dir.join("data.parquet"), TaskKind::CausalLm, &fields, false).unwrap_err().to_string();
    assert!(err.contains(".jsonl, .csv or .tsv"), "{err}");
}

#[test]
fn integer_labels_keep_numeric_order() {
    let origin = data::Origin { path: "x".into(), line: 1 };
    let ex = |l: &str| data::Example {
        content: data::Content::Labelled { text: "t".into(), text_pair: None, label: l.into() },
        origin: origin.clone(),
    };
    let labels = data::Labels::from_examples(&[ex("10"), ex("2"), ex("1")], Path::new("x")).unwrap();
    assert_eq!(labels.names, ["1", "2", "10"]);
    let err = data::Labels::from_examples(&[ex("1")], Path::new("x")).unwrap_err().to_string();
    assert!(err.contains("at least two labels"), "{err}");
}

#[test]
fn schedule_follows_hf_warmup_then_decay() {
    let mut s = WarmupSchedule { peak: 1.0, warmup: 4, total: 14, decay: Decay::Linear, step: 0 };
    let lrs: Vec<f64> = (0..14).map(|_| burn::optim::lr_scheduler::LrScheduler::step(&mut s)).collect();
    assert_eq!(&lrs[..5], &[0.0, 0.25, 0.5, 0.75, 1.0]);
    assert!((lrs[9] - 0.5).abs() < 1e-12 && (lrs[13] - 0.1).abs() < 1e-12, "{lrs:?}");
    let cos = WarmupSchedule { peak: 2.0, warmup: 0, total: 10, decay: Decay::Cosine, step: 0 };
    assert!((cos.lr_at(0) - 2.0).abs() < 1e-12 && (cos.lr_at(5) - 1.0).abs() < 1e-12 && cos.lr_at(10).abs() < 1e-12);
}

#[test]
fn global_norm_clipping_matches_torch() {
    let device = Default::default();
    let linear = LinearConfig::new(3, 2).init::<AB>(&device);
    let x = Tensor::<AB, 2>::from_data(TensorData::new(vec![1.0f32, -2.0, 3.0, 0.5, 0.5, -1.0], [2, 3]), &device);
    let loss = linear.forward(x).mul_scalar(3.0).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &linear);
    let w = grads.get::<B, 2>(linear.weight.id).unwrap().into_data().to_vec::<f32>().unwrap();
    let b = grads.get::<B, 1>(linear.bias.as_ref().unwrap().id).unwrap().into_data().to_vec::<f32>().unwrap();
    let norm = w.iter().chain(&b).map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
    let (reported, clipped) = clip_global_norm(&linear, grads, Some(1.0));
    assert!((reported - norm).abs() < 1e-4 * norm, "{reported} vs {norm}");
    let coef = 1.0 / (norm + 1e-6);
    let w2 = clipped.get::<B, 2>(linear.weight.id).unwrap().into_data().to_vec::<f32>().unwrap();
    for (a, b) in w.iter().zip(&w2) {
        assert!(((*a as f64) * coef - *b as f64).abs() < 1e-6, "{a} {b}");
    }
    let b2 = clipped.get::<B, 1>(linear.bias.as_ref().unwrap().id).unwrap().into_data().to_vec::<f32>().unwrap();
    let clipped_norm = w2.iter().chain(&b2).map(|g| (*g as f64).powi(2)).sum::<f64>().sqrt();
    assert!((clipped_norm - 1.0).abs() < 1e-5, "{clipped_norm}");
    let _ = linear.num_params();
}

fn lm_config(name: &str, method: &str) -> TrainConfig {
    TrainConfig {
        model: fixtures().join("tiny-llama-words"),
        task: TaskKind::CausalLm,
        train: fixtures().join("lm-copy-train.jsonl"),
        valid: Some(fixtures().join("lm-copy-valid.jsonl")),
        method: MethodConfig::from_name(method).unwrap(),
        epochs: 4,
        batch_size: 8,
        lr: Some(5e-2),
        max_len: 32,
        seed: 5,
        output: scratch(name),
        overwrite: true,
        ..TrainConfig::default()
    }
}

/// How the tests evaluate a saved adapter: default fields, stop at a bad row.
fn eval_options(task: TaskKind, batch_size: usize) -> tensor_peft_training::eval::EvalOptions {
    tensor_peft_training::eval::EvalOptions {
        task,
        fields: FieldMap::default(),
        skip_bad_rows: false,
        batch_size,
        base_dtype: Default::default(),
        max_new_tokens: None,
    }
}

/// LoRA on the tiny LLaMA classifying the sentiment fixture by the verbalizers `w60`/`w61`.
fn lm_classification_config(name: &str) -> TrainConfig {
    TrainConfig {
        task: TaskKind::LmClassification,
        train: fixtures().join("lm-sentiment-train.jsonl"),
        valid: Some(fixtures().join("lm-sentiment-valid.jsonl")),
        verbalizers: vec!["w60".into(), "w61".into()],
        template: "{text} w5".into(),
        ..lm_config(name, "lora")
    }
}

fn valid_losses(r: &tensor_peft_training::FinetuneReport) -> Vec<f64> {
    r.history.iter().filter(|h| h.split == "valid").map(|h| h.metrics["loss"]).collect()
}

#[test]
fn causal_lm_loss_falls_and_the_adapter_reloads() {
    let _serial = serial();
    for method in ["lora", "tt-lora"] {
        let cfg = lm_config(&format!("lm-{method}"), method);
        let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
        let losses = valid_losses(&report);
        assert_eq!(losses.len(), 4);
        assert!(losses[3] < losses[0] - 0.3, "{method}: validation loss did not fall: {losses:?}");
        let ppl = report.history.last().unwrap().metrics["perplexity"];
        assert!((ppl - losses[3].exp()).abs() < 1e-9 * ppl);
        // The update-size diagnostic ‖ΔW‖/‖W‖ is recorded every epoch and grows as the adapter
        // learns (this tiny model's weights are random, so the task lives in ΔW and it passes 1).
        let ratios: Vec<f64> =
            report.history.iter().filter(|h| h.split == "train").map(|h| h.metrics["update_ratio"]).collect();
        assert!(ratios.len() == 4 && ratios.iter().all(|r| r.is_finite() && *r > 0.0), "{method}: {ratios:?}");
        assert!(ratios[3] > ratios[0], "{method}: {ratios:?}");
        for f in [
            "adapter_config.json",
            "adapter_model.safetensors",
            "last/adapter_model.safetensors",
            "metrics.csv",
            "metrics.json",
            "curves.png",
            "train_config.json",
        ] {
            assert!(cfg.output.join(f).is_file(), "{method}: {f} missing");
        }
        let png = std::fs::read(cfg.output.join("curves.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // The saved best adapter evaluates to the best recorded validation loss.
        let options = eval_options(TaskKind::CausalLm, 8);
        let metrics = tensor_peft_training::eval::evaluate::<B>(
            &cfg.model,
            &cfg.output,
            cfg.valid.as_ref().unwrap(),
            &options,
            &Default::default(),
        )
        .unwrap();
        let best = report.best.as_ref().unwrap().1;
        assert!((metrics["loss"] - best).abs() < 1e-4, "{method}: eval {} vs best {best}", metrics["loss"]);
        // The run refuses to overwrite itself unless asked.
        let again = TrainConfig { overwrite: false, ..cfg.clone() };
        let err = finetune::<AB>(&again, &Default::default()).unwrap_err().to_string();
        assert!(err.contains("already holds a run") && err.contains("--overwrite"), "{err}");
    }
}

#[test]
fn prompt_based_classification_learns_the_verbalizer() {
    let _serial = serial();
    let cfg = TrainConfig { epochs: 6, lr: Some(2e-2), ..lm_classification_config("lm-cls") };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let best = report.best.clone().unwrap();
    assert_eq!(best.0, "accuracy");
    assert!(best.1 >= 0.9, "accuracy {:?}", report.history);
    let bad = TrainConfig { verbalizers: vec!["w60".into()], output: scratch("lm-cls-bad"), ..cfg.clone() };
    let err = finetune::<AB>(&bad, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("1 words given for 2 labels"), "{err}");
}

#[test]
fn resume_from_a_step_checkpoint_is_bit_identical() {
    let _serial = serial();
    let full = TrainConfig { save_every_steps: 1, ..lm_config("resume-full", "tt-lora") };
    finetune::<AB>(&full, &Default::default()).unwrap();
    let reference = std::fs::read(full.output.join("last/adapter_model.safetensors")).unwrap();

    // Stop after 5 optimizer steps (mid-epoch 1 of 6 batches each); the schedule is fixed by
    // epochs, so continue with the same options.
    let part = TrainConfig { save_every_steps: 1, ..lm_config("resume-part", "tt-lora") };
    let stop_at = tensor_peft_training::trainer::StopAt::Step(5);
    tensor_peft_training::trainer::finetune_until::<AB>(&part, &[Default::default()], stop_at).unwrap();
    let checkpoints = tensor_peft_training::checkpoint::list_checkpoints(&part.output.join("checkpoint"));
    assert_eq!(checkpoints.iter().map(|c| c.0).collect::<Vec<_>>(), [5], "only the newest checkpoint is kept");
    // What a kill can leave: an old checkpoint half deleted (renamed first, so not under a `step-`
    // name) and a checkpoint half written. Resume ignores both and the next checkpoint sweeps them.
    let root = part.output.join("checkpoint");
    std::fs::create_dir_all(root.join(".old-step-00000004")).unwrap();
    std::fs::write(root.join(".old-step-00000004/trainable.safetensors"), b"partial").unwrap();
    std::fs::create_dir_all(root.join(".tmp-step-00000006")).unwrap();
    let resumed = TrainConfig { resume: true, overwrite: false, ..part.clone() };
    finetune::<AB>(&resumed, &Default::default()).unwrap();
    let left: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(left.iter().all(|n| n.starts_with("step-")), "leftovers were not swept: {left:?}");
    let again = std::fs::read(part.output.join("last/adapter_model.safetensors")).unwrap();
    assert!(reference == again, "the resumed run's adapter differs from the uninterrupted one");
    // Metric histories are identical too, except the measured throughput.
    let history = |dir: &Path| -> serde_json::Value {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("metrics.json")).unwrap()).unwrap();
        for record in v.as_array_mut().unwrap() {
            record["metrics"].as_object_mut().unwrap().remove("tokens_per_second");
        }
        v
    };
    assert_eq!(history(&full.output), history(&part.output), "metric histories differ");

    // Another run's checkpoint is refused.
    let other = TrainConfig { lr: Some(5e-3), resume: true, overwrite: false, ..part.clone() };
    let err = finetune::<AB>(&other, &Default::default()).unwrap_err();
    assert!(matches!(err, TrainError::Checkpoint { .. }) && err.to_string().contains("other data"), "{err}");
}

/// The MiniLM directory, or `None` (test skipped) when the assets were not fetched.
/// `method` fine-tuning MiniLM for `task` on `train`: batches of 8 at lr 5e-3, into scratch `name`.
fn minilm_config(model: PathBuf, task: TaskKind, train: PathBuf, method: &str, name: &str) -> TrainConfig {
    let method = MethodConfig::from_name(method).unwrap();
    TrainConfig {
        model,
        task,
        train,
        method,
        batch_size: 8,
        lr: Some(5e-3),
        output: scratch(name),
        overwrite: true,
        ..TrainConfig::default()
    }
}

fn minilm() -> Option<PathBuf> {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/all-minilm-l6-v2");
    if model.join("model.safetensors").is_file() {
        return Some(model);
    }
    assert!(std::env::var_os("TENSOR_PEFT_REQUIRE_ASSETS").is_none(), "assets missing: run scripts/fetch-assets.sh");
    eprintln!("skipped: assets/all-minilm-l6-v2 missing (scripts/fetch-assets.sh)");
    None
}

#[test]
fn minilm_classification_trains_a_head_and_tt_lora() {
    let _serial = serial();
    let Some(model) = minilm() else { return };
    let dir = scratch("minilm-data");
    let train = dir.join("train.jsonl");
    let mut lines = String::new();
    for i in 0..48 {
        let (text, label) =
            if i % 2 == 0 { ("a wonderful, moving film", "pos") } else { ("a dull and boring mess", "neg") };
        lines.push_str(&format!("{{\"text\": \"{text} {i}\", \"label\": \"{label}\"}}\n"));
    }
    std::fs::write(&train, lines).unwrap();
    let cfg = TrainConfig {
        valid_percent: 25,
        epochs: 2,
        max_len: 16,
        seed: 3,
        ..minilm_config(model, TaskKind::Classification, train, "tt-lora", "minilm")
    };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    assert_eq!(report.trainable_params - report.adapter_params, 384 * 2 + 2, "head = 384×2 + 2");
    assert!(report.best.as_ref().unwrap().1 >= 0.9, "{:?}", report.history);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg.output.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["tensor_peft"]["task"]["labels"], serde_json::json!(["neg", "pos"]));
    assert_eq!(config["task_type"], "SEQ_CLS");
}

#[test]
fn minilm_regression_fits_pair_scores_and_eval_reports_each_prediction() {
    let _serial = serial();
    let Some(model) = minilm() else { return };
    // STS-like pairs: the same sentence scores 5, the same topic 2.5, another topic 0.
    let topics = [
        ["the cat sleeps on the warm mat", "a kitten naps on a rug"],
        ["stock markets fell sharply today", "shares dropped in heavy trading"],
        ["the team won the final match", "the players celebrated their victory"],
        ["heavy rain flooded the streets", "a storm brought floods to the town"],
    ];
    let mut lines = String::new();
    for i in 0..64 {
        let (t, kind) = (i % 4, (i / 4) % 3);
        let (pair, score) = match kind {
            0 => (topics[t][0], 5.0),
            1 => (topics[t][1], 2.5),
            _ => (topics[(t + 1) % 4][1], 0.0),
        };
        lines.push_str(&format!("{{\"text\": \"{}\", \"text_pair\": \"{pair}\", \"score\": {score}}}\n", topics[t][0]));
    }
    let dir = scratch("minilm-regression-data");
    let (train, valid) = (dir.join("train.jsonl"), dir.join("valid.jsonl"));
    std::fs::write(&train, &lines).unwrap();
    std::fs::write(&valid, lines.lines().take(24).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let cfg = TrainConfig {
        valid: Some(valid.clone()),
        epochs: 4,
        head_lr: Some(1e-2),
        max_len: 24,
        seed: 5,
        ..minilm_config(model.clone(), TaskKind::Regression, train, "lora", "minilm-regression")
    };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let valid_loss: Vec<f64> = valid_losses(&report);
    assert!(valid_loss.last().unwrap() < &(valid_loss[0] * 0.5), "valid MSE does not fall: {valid_loss:?}");
    let (name, best, _, _) = report.best.clone().unwrap();
    assert_eq!(name, "pearson");
    assert!(best > 0.8, "{:?}", report.history);
    // The reloaded adapter scores the validation file; its per-example predictions reproduce the
    // metrics computed from them (Pearson, MSE).
    let options = eval_options(TaskKind::Regression, 5);
    let evaluation = tensor_peft_training::eval::evaluate_with_predictions::<B>(
        &model,
        &cfg.output,
        &valid,
        &options,
        &Default::default(),
    )
    .unwrap();
    assert_eq!(evaluation.predictions.len(), 24);
    let mut expected = Vec::new();
    let mut predicted = Vec::new();
    for (i, p) in evaluation.predictions.iter().enumerate() {
        assert_eq!((p.index, p.line), (i, i + 1));
        match (&p.expected, &p.predicted) {
            (Target::Score(e), Target::Score(q)) => {
                expected.push(*e);
                predicted.push(*q);
            }
            other => panic!("regression predictions are scores, got {other:?}"),
        }
    }
    let want: Vec<f32> = lines
        .lines()
        .take(24)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["score"].as_f64().unwrap() as f32)
        .collect();
    assert_eq!(expected, want);
    let r = pearson(&predicted, &expected);
    assert!((r - evaluation.metrics["pearson"]).abs() < 1e-9, "{r} vs {:?}", evaluation.metrics);
    let mse = predicted.iter().zip(&expected).map(|(p, e)| ((p - e) as f64).powi(2)).sum::<f64>() / 24.0;
    assert!((mse - evaluation.metrics["loss"]).abs() < 1e-4 * mse.max(1.0), "{mse} vs {:?}", evaluation.metrics);
}

#[test]
fn gradient_accumulation_equals_a_larger_batch_and_early_stopping_stops() {
    let _serial = serial();
    // lm-classification: one loss unit per example and right padding that does not change the
    // last prompt position, so 2 × 4 accumulated examples equal one batch of 8. Three steps: Adam
    // turns float noise in near-zero gradients into lr-sized steps, so long runs drift apart.
    let base = TrainConfig { epochs: 2, max_grad_norm: None, ..lm_classification_config("accum-a") };
    let short = TrainConfig { max_steps: Some(3), warmup_ratio: 0.0, lr: Some(1e-2), ..base.clone() };
    let big = TrainConfig { batch_size: 8, ..short.clone() };
    let accumulated = TrainConfig { batch_size: 4, grad_accumulation: 2, output: scratch("accum-b"), ..short };
    finetune::<AB>(&big, &Default::default()).unwrap();
    finetune::<AB>(&accumulated, &Default::default()).unwrap();
    let a =
        tensor_peft_training::checkpoint::read_safetensors(&big.output.join("last/adapter_model.safetensors")).unwrap();
    let b =
        tensor_peft_training::checkpoint::read_safetensors(&accumulated.output.join("last/adapter_model.safetensors"))
            .unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, (_, x)) in &a {
        let y = &b[name].1;
        let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        let scale = x.iter().map(|p| p.abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-6, "{name}: accumulated differs by {diff} (scale {scale})");
    }
    // Accuracy reaches 1.0 and cannot improve: patience 1 stops the run early.
    let patient =
        TrainConfig { epochs: 30, lr: Some(2e-2), early_stopping_patience: Some(1), output: scratch("early"), ..base };
    let report = finetune::<AB>(&patient, &Default::default()).unwrap();
    assert!(report.stop_reason.starts_with("early stopping"), "{}", report.stop_reason);
    let epochs = report.history.iter().map(|h| h.epoch).max().unwrap();
    assert_eq!(epochs, report.best.as_ref().unwrap().2 + 1, "stops one epoch after the best");
    let lr = report.history.iter().find(|h| h.split == "train").unwrap().metrics["lr"];
    assert!(lr > 0.0 && lr <= 2e-2);
}

/// Every tensor of a saved adapter, by name.
fn adapter_tensors(dir: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, values)
        })
        .collect()
}

/// One AdamW step of `method` without weight decay, clipping or warmup (every entry moves by
/// `lr·sign(g)`), with LoRA+ at `ratio`.
fn one_step_config(name: &str, method: &str, ratio: Option<f64>) -> TrainConfig {
    TrainConfig {
        max_steps: Some(1),
        weight_decay: 0.0,
        max_grad_norm: None,
        warmup_ratio: 0.0,
        lr: Some(1e-2),
        loraplus_lr_ratio: ratio,
        ..lm_config(name, method)
    }
}

#[test]
fn loraplus_ratio_multiplies_the_first_step_of_the_zero_init_factor_only() {
    let _serial = serial();
    // One AdamW step without weight decay, clipping or warmup moves every entry by lr·sign(g):
    // with LoRA+ ratio 4, B (zero at start) must end at exactly 4× the plain run's B, A unchanged.
    let one_step = |name: &str, ratio: Option<f64>| {
        let cfg = one_step_config(name, "lora", ratio);
        finetune::<AB>(&cfg, &Default::default()).unwrap();
        adapter_tensors(&cfg.output)
    };
    let plain = one_step("loraplus-off", None);
    let fast = one_step("loraplus-4", Some(4.0));
    let mut b_checked = 0;
    for (name, p) in &plain {
        let f = &fast[name];
        if name.contains("lora_B") {
            assert!(p.iter().any(|v| v.abs() > 1e-3), "{name}: B did not move");
            for (x, y) in p.iter().zip(f) {
                assert!((y - 4.0 * x).abs() <= 1e-5 * x.abs().max(1e-2), "{name}: {y} vs 4 × {x}");
            }
            b_checked += 1;
        } else {
            assert_eq!(p, f, "{name}: only B may change with the ratio");
        }
    }
    assert_eq!(b_checked, 4, "q and v of both layers");
}

#[test]
fn loraplus_is_refused_for_methods_without_a_zero_initialised_factor() {
    // Which factors those are is each method's own answer (models' `zero_init_factors` test).
    // Only methods with a zero-initialised factor take the option.
    for (method, ok) in [("lora", true), ("tt-lora", true), ("loretta-rep", true), ("lotr", false), ("lorta", false)] {
        let cfg = TrainConfig { loraplus_lr_ratio: Some(16.0), ..lm_config("loraplus-check", method) };
        let err = tensor_peft_training::config::validate(&cfg).err();
        assert_eq!(err.is_none(), ok, "{method}: {err:?}");
        if let Some(e) = err {
            assert!(e.to_string().contains("loraplus-lr-ratio") && e.to_string().contains(method), "{e}");
        }
    }
    let paper = TrainConfig {
        loraplus_lr_ratio: Some(16.0),
        method: MethodConfig::TtLora(
            tensor_peft_adapters::TtLoraConfig::new().with_init(tensor_peft_adapters::DeltaInit::Paper),
        ),
        ..lm_config("loraplus-paper", "tt-lora")
    };
    assert!(tensor_peft_training::config::validate(&paper).is_err());
    let bad = TrainConfig { loraplus_lr_ratio: Some(0.0), ..lm_config("loraplus-zero", "lora") };
    assert!(tensor_peft_training::config::validate(&bad).unwrap_err().to_string().contains("positive"));
}

/// The fused loss against a float64 reference computed on the host: the value
/// `−Σ w_i log softmax(h_i·Wᵀ)[t_i] / count` and its gradients `G·W` and `Gᵀ·h` with
/// `G = w·(softmax − onehot)/count`, for several chunk sizes, with and without autodiff.
///
/// On ndarray (Burn's op chain) and on flex (the fused softmax cross-entropy kernel).
#[test]
fn linear_cross_entropy_matches_a_float64_reference_in_every_chunking() {
    // Seeding and drawing from Burn's process-wide RNG while an end-to-end test trains would change
    // that test's initialisation.
    let _serial = serial();
    linear_cross_entropy_check::<AB>();
    linear_cross_entropy_check::<Autodiff<burn::backend::Flex>>();
}

fn linear_cross_entropy_check<AB: burn::tensor::backend::AutodiffBackend>() {
    use burn::tensor::{Distribution, Int};
    use tensor_peft_training::loss::linear_cross_entropy;
    type B<AB> = <AB as burn::tensor::backend::AutodiffBackend>::InnerBackend;
    let device = Default::default();
    <AB as burn::tensor::backend::Backend>::seed(&device, 7);
    let (rows, d, vocab) = (7, 5, 11);
    let hidden = Tensor::<AB, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device);
    let head = Tensor::<AB, 2>::random([vocab, d], Distribution::Normal(0.0, 1.0), &device);
    let targets: Vec<i64> = vec![3, 0, 10, 3, 7, 1, 5];
    let weights: Vec<f32> = vec![1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0];
    let count = 5;

    let h: Vec<f64> = hidden.to_data().to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect();
    let w: Vec<f64> = head.to_data().to_vec::<f32>().unwrap().iter().map(|&x| x as f64).collect();
    let (mut value, mut grad_h, mut grad_w) = (0.0, vec![0.0; rows * d], vec![0.0; vocab * d]);
    for i in 0..rows {
        let z: Vec<f64> = (0..vocab).map(|v| (0..d).map(|k| h[i * d + k] * w[v * d + k]).sum()).collect();
        let max = z.iter().cloned().fold(f64::MIN, f64::max);
        let sum: f64 = z.iter().map(|x| (x - max).exp()).sum();
        let scale = weights[i] as f64 / count as f64;
        value -= scale * (z[targets[i] as usize] - max - sum.ln());
        for v in 0..vocab {
            let g = scale * ((z[v] - max).exp() / sum - if v == targets[i] as usize { 1.0 } else { 0.0 });
            for k in 0..d {
                grad_h[i * d + k] += g * w[v * d + k];
                grad_w[v * d + k] += g * h[i * d + k];
            }
        }
    }
    let close = |got: &[f32], want: &[f64], what: &str| {
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "{what}[{j}]: {g} vs {w}");
        }
    };

    let t = Tensor::<AB, 1, Int>::from_data(TensorData::new(targets.clone(), [rows]), &device);
    let wt = Tensor::<AB, 1>::from_data(TensorData::new(weights.clone(), [rows]), &device);
    for chunk in [1, 3, rows] {
        let (h_leaf, w_leaf) = (hidden.clone().require_grad(), head.clone().require_grad());
        // The loss sees an intermediate, as it does in the model, and the head as a view.
        let h_in = h_leaf.clone().mul_scalar(1.0);
        let w_in = w_leaf.clone().transpose().transpose();
        let loss = linear_cross_entropy(h_in, w_in, true, t.clone(), wt.clone(), count, Some(chunk));
        close(&loss.to_data().to_vec::<f32>().unwrap(), &[value], "value");
        let grads = loss.backward();
        close(&h_leaf.grad(&grads).unwrap().to_data().to_vec::<f32>().unwrap(), &grad_h, "grad hidden");
        close(&w_leaf.grad(&grads).unwrap().to_data().to_vec::<f32>().unwrap(), &grad_w, "grad head");
    }
    // A frozen head gets no gradient; the hidden states' gradient is unchanged.
    let h_leaf = hidden.clone().require_grad();
    let loss =
        linear_cross_entropy(h_leaf.clone().mul_scalar(1.0), head.clone(), false, t.clone(), wt.clone(), count, None);
    let grads = loss.backward();
    close(&h_leaf.grad(&grads).unwrap().to_data().to_vec::<f32>().unwrap(), &grad_h, "grad hidden (frozen head)");
    assert!(head.grad(&grads).is_none());
    // Without autodiff (evaluation): the value only.
    let inner = |x: Tensor<AB, 2>| Tensor::<B<AB>, 2>::from_data(x.to_data(), &device);
    let loss = linear_cross_entropy(
        inner(hidden),
        inner(head),
        false,
        Tensor::<B<AB>, 1, Int>::from_data(TensorData::new(targets, [rows]), &device),
        Tensor::<B<AB>, 1>::from_data(TensorData::new(weights, [rows]), &device),
        count,
        None,
    );
    close(&loss.to_data().to_vec::<f32>().unwrap(), &[value], "value (no autodiff)");
}

/// A method added through the registry alone (the `toy-method` feature: `methods/toy/` and one
/// registry line) counts, builds, trains, saves and reloads with no other code knowing it, and LoRA+
/// finds its zero-initialised factor.
#[test]
fn a_toy_method_added_through_the_registry_alone_trains_saves_and_reloads() {
    use tensor_peft_adapters::METHOD_NAMES;
    let _serial = serial();
    assert!(METHOD_NAMES.contains(&"toy"), "{METHOD_NAMES:?}");
    let method = MethodConfig::from_name("toy").unwrap();
    // Counted without allocating: u [d_in, 1] and v [1, d_out] at q and v of both layers.
    let (_, spec) =
        tensor_peft_models::Llama::<B>::from_hf_dir(&fixtures().join("tiny-llama-words"), &Default::default()).unwrap();
    let sites = tensor_peft_models::Targets::Default.resolve(&spec, &method).unwrap();
    let report = method.count(&spec.geometry(), &sites, &[]).unwrap();
    assert_eq!(report.total(), sites.iter().map(|s| s.d_in + s.d_out).sum::<usize>());
    assert_eq!(report.rows.len(), 4);
    // Trains one step with LoRA+: v (zero at start) moves 4× as far as in a plain step, u as far.
    let step = |name: &str, ratio: Option<f64>| {
        let cfg = one_step_config(name, "toy", ratio);
        let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
        assert_eq!(report.adapter_params, report.trainable_params);
        let tensors = adapter_tensors(&cfg.output);
        (cfg, report, tensors)
    };
    let (cfg, report, plain) = step("toy-plain", None);
    let (_, _, fast) = step("toy-loraplus", Some(4.0));
    assert_eq!(plain.len(), 8, "u and v of 4 sites: {:?}", plain.keys());
    for (name, p) in &plain {
        assert!(name.ends_with(".toy.u") || name.ends_with(".toy.v"), "{name}");
        if name.ends_with(".toy.v") {
            assert!(p.iter().any(|v| v.abs() > 1e-3), "{name}: v did not move");
            assert!(p.iter().zip(&fast[name]).all(|(x, y)| (y - 4.0 * x).abs() <= 1e-5 * x.abs().max(1e-2)));
        } else {
            assert_eq!(p, &fast[name], "{name}");
        }
    }
    // Reloads: the saved adapter evaluates to the recorded validation loss.
    let options = eval_options(TaskKind::CausalLm, 8);
    let valid = cfg.valid.as_ref().unwrap();
    let metrics =
        tensor_peft_training::eval::evaluate::<B>(&cfg.model, &cfg.output, valid, &options, &Default::default())
            .unwrap();
    let best = report.best.as_ref().unwrap().1;
    assert!((metrics["loss"] - best).abs() < 1e-4, "eval {} vs best {best}", metrics["loss"]);
    let config = tensor_peft_models::adapter_file::read_adapter_config(&cfg.output).unwrap();
    assert_eq!((config.method.name(), config.peft_type.as_str()), ("toy", "TOY"));
}

#[test]
fn squad_exact_match_and_f1_match_hand_computed_values() {
    use tensor_peft_training::metrics::{GenerationOutcome, exact_match, normalize_answer, token_f1};
    // Lower case, ASCII punctuation out, articles out as whole words only, whitespace collapsed.
    assert_eq!(normalize_answer("  The Cat,  sat!\tAn apple; a banana. "), "cat sat apple banana");
    assert_eq!(normalize_answer("Theory of an anthem"), "theory of anthem");
    assert_eq!(normalize_answer("the—end"), "—end");
    assert_eq!(exact_match("The Eiffel Tower.", "eiffel tower"), 1.0);
    assert_eq!(exact_match("Eiffel Towers", "eiffel tower"), 0.0);
    // pred {cat, sat, on, mat}, gold {cat, on, mat}: 3 shared, P = 3/4, R = 1, F1 = 6/7.
    assert!((token_f1("the cat sat on the mat", "a cat on a mat") - 6.0 / 7.0).abs() < 1e-12);
    // Repeated words count as a multiset: pred {a1 x, x}… gold {x}: 1 shared, P = 1/2, R = 1.
    assert!((token_f1("x x", "x") - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(token_f1("nothing shared", "else"), 0.0);
    assert_eq!(token_f1("the", "a"), 0.0, "both empty after normalisation: SQuAD v1.1 gives 0");
    // The best of several gold answers, for each metric separately.
    let g = GenerationOutcome::score("Denver Broncos".into(), &["Broncos".into(), "the Denver Broncos!".into()]);
    assert_eq!((g.exact_match, g.f1), (1.0, 1.0));
    let g = GenerationOutcome::score("in Paris France".into(), &["Paris".into(), "Lyon France".into()]);
    // "Paris": P = 1/3, R = 1 → 0.5; "Lyon France": P = 1/3, R = 1/2 → 0.4.
    assert_eq!(g.exact_match, 0.0);
    assert!((g.f1 - 0.5).abs() < 1e-12, "{}", g.f1);
}

#[test]
fn choice_outcomes_follow_each_normalisation() {
    use tensor_peft_training::metrics::{Accumulator, ChoiceOutcome, StepStats};
    // Sums -6, -4, -5; 12, 2, 10 characters; 3, 1, 5 tokens.
    // sum: -4 (choice 1); per char: -0.5, -2, -0.5 → first max is choice 0; per token: -2, -4, -1 → 2.
    let c = ChoiceOutcome::from_scores(2, &[-6.0, -4.0, -5.0], &[12, 2, 10], &[3, 1, 5]);
    assert_eq!((c.by_sum, c.by_chars, c.by_tokens), (1, 0, 2));
    let mut acc = Accumulator::default();
    let d = ChoiceOutcome::from_scores(0, &[-1.0, -2.0], &[1, 1], &[1, 1]);
    acc.add(&StepStats { loss: 2.0, units: 4, choices: vec![c, d], ..Default::default() });
    let m = acc.metrics(0, false);
    assert_eq!((m["accuracy"], m["accuracy_norm"], m["accuracy_per_token"]), (0.5, 0.5, 1.0));
    assert_eq!(m["loss"], 2.0);
    assert!(!m.contains_key("f1") && !m.contains_key("mcc"), "{m:?}");
}

/// `{"prompt", "choices", "label"}` rows from the copy fixture's prompts: the distractors add 12
/// to every word (and 14 for every other row, which has three choices); the correct choice adds
/// 10 when `copy`, else it is always ` w60 w61` (what this tiny model learns within seconds).
fn write_choice_file(source: &str, path: &Path, copy: bool) {
    let text = std::fs::read_to_string(fixtures().join(source)).unwrap();
    let shift = |s: &str, by: u32| -> String {
        let words: Vec<String> =
            s.split_whitespace().map(|w| format!("w{}", w[1..].parse::<u32>().unwrap() + by)).collect();
        format!(" {}", words.join(" "))
    };
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let prompt = row["prompt"].as_str().unwrap();
        let mut choices = vec![shift(prompt, 12)];
        if i % 2 == 0 {
            choices.push(shift(prompt, 14));
        }
        let label = i % (choices.len() + 1);
        choices.insert(label, if copy { shift(prompt, 10) } else { " w60 w61".into() });
        out.push_str(&serde_json::json!({"prompt": prompt, "choices": choices, "label": label}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

/// `{"prompt", "answers"}` rows from the copy fixture's prompts: the answer `w60 w61` (one this
/// tiny model learns within seconds), then a wrong one.
fn write_answer_file(source: &str, path: &Path) {
    let text = std::fs::read_to_string(fixtures().join(source)).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let answers = ["w60 w61", "w2 w3"];
        out.push_str(&serde_json::json!({"prompt": row["prompt"], "answers": answers}).to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}

#[test]
fn multiple_choice_scores_are_the_choice_tokens_log_likelihoods_of_a_plain_forward() {
    use tensor_peft_models::Llama;
    use tensor_peft_models::tokenizer::TextTokenizer;
    use tensor_peft_training::task::{Encoder, LmTask, Target, make_batch};
    let dir = scratch("mc-scores");
    let path = dir.join("mc.jsonl");
    write_choice_file("lm-copy-valid.jsonl", &path, true);
    let model_dir = fixtures().join("tiny-llama-words");
    let device = Default::default();
    let (net, _) = Llama::<B>::from_hf_dir(&model_dir, &device).unwrap();
    let tokenizer = TextTokenizer::from_hf_dir(&model_dir).unwrap();
    let examples = data::read_file(&path, TaskKind::LmMultipleChoice, &FieldMap::default(), false).unwrap().examples;
    let examples = &examples[..5];
    let encoder = Encoder {
        tokenizer: &tokenizer,
        task: TaskKind::LmMultipleChoice,
        max_len: 32,
        labels: None,
        template: "",
        eos: tokenizer.eos,
        training: false,
    };
    let (items, report) = encoder.encode_all(examples).unwrap();
    assert_eq!((items.len(), report.truncated), (5, 0));
    // Five examples of 3, 2, 3, 2, 3 choices of different lengths: one padded batch of 13 rows.
    let task = LmTask { net: net.clone(), verbalizer: Vec::new(), decoding: None, gradient_checkpointing: false };
    let refs: Vec<_> = items.iter().collect();
    let (loss, stats) = task.run(make_batch::<B>(&refs, 0, &device));
    assert_eq!(stats.choices.len(), 5);
    let (mut correct_sum, mut correct_tokens) = (0.0, 0);
    for (e, outcome) in examples.iter().zip(&stats.choices) {
        let data::Content::MultipleChoice { prompt, choices, label } = &e.content else { panic!() };
        assert_eq!(outcome.label, *label);
        for (k, choice) in choices.iter().enumerate() {
            // The independent score: one unpadded sequence, log-softmax in f64 on the host.
            let p = tokenizer.encode(prompt).unwrap();
            let c = tokenizer.encode(choice).unwrap();
            let ids: Vec<i64> = p.iter().chain(&c).map(|&t| t as i64).collect();
            let n = ids.len();
            let logits = net.forward(Tensor::from_data(TensorData::new(ids.clone(), [1, n]), &device));
            let v = logits.dims()[2];
            let logits = logits.into_data().to_vec::<f32>().unwrap();
            let mut expected = 0.0f64;
            for pos in p.len() - 1..n - 1 {
                let row = &logits[pos * v..(pos + 1) * v];
                let max = row.iter().fold(f64::MIN, |m, &x| m.max(x as f64));
                let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
                expected += row[ids[pos + 1] as usize] as f64 - lse;
            }
            let got = outcome.log_likelihoods[k];
            assert!((got - expected).abs() < 1e-4 * expected.abs().max(1.0), "choice {k}: {got} vs {expected}");
            if k == *label {
                correct_sum += expected;
                correct_tokens += c.len();
            }
        }
        let best = (0..choices.len())
            .fold(0, |b, k| if outcome.log_likelihoods[k] > outcome.log_likelihoods[b] { k } else { b });
        assert_eq!(outcome.by_sum, best);
    }
    // The loss is the mean negative log-likelihood of the correct choices' tokens.
    let loss = loss.into_data().to_vec::<f32>().unwrap()[0] as f64;
    assert_eq!(stats.units, correct_tokens);
    assert!(
        (loss + correct_sum / correct_tokens as f64).abs() < 1e-4,
        "{loss} vs {}",
        -correct_sum / correct_tokens as f64
    );
    // Training encodes the correct choice as a completion (no end-of-sequence token).
    let train = Encoder { training: true, ..encoder };
    let (items, _) = train.encode_all(&examples[..1]).unwrap();
    let data::Content::MultipleChoice { prompt, choices, label } = &examples[0].content else { panic!() };
    let p = tokenizer.encode(prompt).unwrap();
    assert_eq!(items[0].ids, [p.clone(), tokenizer.encode(&choices[*label]).unwrap()].concat());
    assert_eq!(items[0].target, Target::Completion { from: p.len() });
    // A prompt too long for --max-len is cut from the left; the choice stays whole.
    let short = Encoder { max_len: 6, training: false, ..train };
    let (items, report) = short.encode_all(&examples[1..2]).unwrap();
    assert_eq!(report.truncated, 1);
    let data::Content::MultipleChoice { prompt, choices, .. } = &examples[1].content else { panic!() };
    let p = tokenizer.encode(prompt).unwrap();
    let Target::Choices { rows, .. } = &items[0].target else { panic!() };
    for ((ids, from), choice) in rows.iter().zip(choices) {
        let c = tokenizer.encode(choice).unwrap();
        assert!(ids.len() == 6 && ids[*from..] == c[..] && ids[..*from] == p[p.len() - *from..], "{ids:?}");
    }
}

#[test]
fn multiple_choice_and_generation_finetune_then_evaluate_to_the_recorded_best() {
    let _serial = serial();
    let dir = scratch("mc-gen-data");
    let (mc_train, mc_valid) = (dir.join("mc-train.jsonl"), dir.join("mc-valid.jsonl"));
    write_choice_file("lm-copy-train.jsonl", &mc_train, false);
    write_choice_file("lm-copy-valid.jsonl", &mc_valid, false);
    let cfg = TrainConfig {
        task: TaskKind::LmMultipleChoice,
        train: mc_train,
        valid: Some(mc_valid.clone()),
        eval_before_training: true,
        ..lm_config("mc", "lora")
    };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let valid: Vec<_> = report.history.iter().filter(|h| h.split == "valid").collect();
    let train: Vec<_> = report.history.iter().filter(|h| h.split == "train").collect();
    eprintln!("multiple choice: {:?}", valid.iter().map(|h| &h.metrics).collect::<Vec<_>>());
    assert!(train.iter().all(|h| !h.metrics.contains_key("accuracy")), "training measures the loss only");
    assert_eq!(report.best.as_ref().unwrap().0, "accuracy");
    let (first, last) = (&valid[0].metrics, &valid[valid.len() - 1].metrics);
    assert!(last["loss"] < first["loss"] - 0.3, "{first:?} → {last:?}");
    assert!(last["accuracy"] >= 0.9 && last["accuracy"] > first["accuracy"], "{first:?} → {last:?}");
    let options = eval_options(TaskKind::LmMultipleChoice, 3);
    let evaluation = tensor_peft_training::eval::evaluate_with_predictions::<B>(
        &cfg.model,
        &cfg.output,
        &mc_valid,
        &options,
        &Default::default(),
    )
    .unwrap();
    let best = report.best.as_ref().unwrap();
    let best_record = valid.iter().find(|h| h.step == best.3).unwrap();
    for key in ["loss", "accuracy", "accuracy_norm", "accuracy_per_token"] {
        assert!((evaluation.metrics[key] - best_record.metrics[key]).abs() < 1e-4, "{key}: {:?}", evaluation.metrics);
    }
    assert_eq!(evaluation.predictions.len(), 16);
    assert_eq!(evaluation.predictions[1].expected, Target::Choice(1));
    assert!(matches!(evaluation.predictions[1].predicted, Target::Choice(0..=1)));

    let (gen_train, gen_valid) = (dir.join("gen-train.jsonl"), dir.join("gen-valid.jsonl"));
    write_answer_file("lm-copy-train.jsonl", &gen_train);
    write_answer_file("lm-copy-valid.jsonl", &gen_valid);
    let cfg = TrainConfig {
        task: TaskKind::LmGeneration,
        train: gen_train,
        valid: Some(gen_valid.clone()),
        max_new_tokens: 6,
        eval_before_training: true,
        ..lm_config("gen", "lora")
    };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let valid: Vec<_> = report.history.iter().filter(|h| h.split == "valid").collect();
    eprintln!("generation: {:?}", valid.iter().map(|h| &h.metrics).collect::<Vec<_>>());
    assert_eq!(report.best.as_ref().unwrap().0, "f1");
    let (first, last) = (&valid[0].metrics, &valid[valid.len() - 1].metrics);
    assert!(last["loss"] < first["loss"] - 0.3 && last["f1"] > first["f1"] + 0.3, "{first:?} → {last:?}");
    assert!(last["exact_match"] > first["exact_match"], "{first:?} → {last:?}");
    let evaluation = tensor_peft_training::eval::evaluate_with_predictions::<B>(
        &cfg.model,
        &cfg.output,
        &gen_valid,
        &eval_options(TaskKind::LmGeneration, 5),
        &Default::default(),
    )
    .unwrap();
    let best = report.best.as_ref().unwrap();
    let best_record = valid.iter().find(|h| h.step == best.3).unwrap();
    for key in ["loss", "exact_match", "f1"] {
        assert!((evaluation.metrics[key] - best_record.metrics[key]).abs() < 1e-4, "{key}: {:?}", evaluation.metrics);
    }
    let Target::Answers(answers) = &evaluation.predictions[0].expected else { panic!() };
    assert_eq!(answers[1], "w2 w3");
    let Target::Text(text) = &evaluation.predictions[0].predicted else { panic!() };
    assert!(text.split_whitespace().count() <= 6, "{text}");
    // A shorter decoding limit than the adapter's applies at evaluation.
    let one =
        tensor_peft_training::eval::EvalOptions { max_new_tokens: Some(1), ..eval_options(TaskKind::LmGeneration, 5) };
    let evaluation = tensor_peft_training::eval::evaluate_with_predictions::<B>(
        &cfg.model,
        &cfg.output,
        &gen_valid,
        &one,
        &Default::default(),
    )
    .unwrap();
    for p in &evaluation.predictions {
        let Target::Text(text) = &p.predicted else { panic!() };
        assert!(text.split_whitespace().count() <= 1, "{text}");
    }
}

#[test]
fn multiple_choice_and_generation_rows_are_refused_with_file_line_and_field() {
    let dir = scratch("mc-rows");
    let path = dir.join("rows.jsonl");
    let fields = FieldMap::default();
    // A good first row, then the bad one.
    let refused = |task: TaskKind, row: &str| -> String {
        let good = match task {
            TaskKind::LmGeneration => r#"{"prompt": "p", "answers": ["a"]}"#,
            _ => r#"{"prompt": "p", "choices": ["a", "b"], "label": 0}"#,
        };
        std::fs::write(&path, format!("{good}\n{row}\n")).unwrap();
        data::read_file(&path, task, &fields, false).unwrap_err().to_string()
    };
    let mc = TaskKind::LmMultipleChoice;
    for (row, words) in [
        (r#"{"prompt": "p", "label": 0}"#, &["missing field `choices`", "--choices-field"][..]),
        (r#"{"prompt": "p", "choices": "a b", "label": 0}"#, &["field `choices` must be a list of strings"]),
        (r#"{"prompt": "p", "choices": ["a"], "label": 0}"#, &["at least two"]),
        (r#"{"prompt": "p", "choices": ["a", 3], "label": 0}"#, &["`choices[1]` must be a non-empty string"]),
        (r#"{"prompt": "p", "choices": ["a", "b"]}"#, &["missing field `label`"]),
        (r#"{"prompt": "p", "choices": ["a", "b"], "label": 2}"#, &["field `label`", "(0 to 1)", "found 2"]),
        (r#"{"prompt": "p", "choices": ["a", "b"], "label": -1}"#, &["field `label`", "found -1"]),
        (r#"{"prompt": "p", "choices": ["a", "b"], "label": "b"}"#, &["field `label`", "0-based index"]),
        (r#"{"choices": ["a", "b"], "label": 0}"#, &["missing field `prompt`"]),
        (r#"{"prompt": "", "choices": ["a", "b"], "label": 0}"#, &["field `prompt` is empty"]),
    ] {
        let err = refused(mc, row);
        assert!(err.contains("rows.jsonl:2:") && words.iter().all(|w| err.contains(w)), "{row}: {err}");
    }
    let generation = TaskKind::LmGeneration;
    for (row, words) in [
        (r#"{"prompt": "p"}"#, &["missing field `answers`", "--answers-field"][..]),
        (r#"{"prompt": "p", "answers": [1]}"#, &["`answers[0]` must be a string"]),
        (r#"{"prompt": "p", "answers": []}"#, &["field `answers` has no"]),
        (r#"{"prompt": "p", "answers": {"start": 3}}"#, &["field `answers` must be a string, a list"]),
        (r#"{"answers": ["a"]}"#, &["missing field `prompt`"]),
    ] {
        let err = refused(generation, row);
        assert!(err.contains("rows.jsonl:2:") && words.iter().all(|w| err.contains(w)), "{row}: {err}");
    }
    // Accepted spellings: `text` for the prompt, a single `answer`, SQuAD's {"text": [...]}.
    std::fs::write(
        &path,
        "{\"text\": \"p\", \"answer\": \"x\"}\n{\"prompt\": \"q\", \"answers\": {\"text\": [\"y\", \"z\"], \"answer_start\": [0, 4]}}\n",
    )
    .unwrap();
    let rows = data::read_file(&path, generation, &fields, false).unwrap().examples;
    assert_eq!(rows[0].content, data::Content::Question { prompt: "p".into(), answers: vec!["x".into()] });
    assert_eq!(rows[1].content, data::Content::Question { prompt: "q".into(), answers: vec!["y".into(), "z".into()] });
    // A row of another task is refused by the encoder, naming its line.
    let copy = fixtures().join("lm-copy-valid.jsonl");
    let err = data::read_file(&copy, mc, &fields, false).unwrap_err().to_string();
    assert!(err.contains("lm-copy-valid.jsonl:1:") && err.contains("missing field `choices`"), "{err}");
    // These tasks need a causal LM.
    let cfg = TrainConfig {
        model: fixtures().join("tiny-deberta/v3"),
        task: mc,
        train: path.clone(),
        output: dir.join("out"),
        ..TrainConfig::default()
    };
    let err = finetune::<AB>(&cfg, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("lm-multiple-choice needs a causal LM"), "{err}");
    let bad = TrainConfig { task: generation, max_new_tokens: 0, model: fixtures().join("tiny-llama-words"), ..cfg };
    let err = finetune::<AB>(&bad, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("max-new-tokens") && err.contains("at least 1"), "{err}");
}

/// A DPO file from the copy fixture: each prompt's own completion is chosen, the next row's is
/// rejected.
fn dpo_file(dir: &Path, name: &str, fixture: &str) -> PathBuf {
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(fixtures().join(fixture))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = (0..rows.len())
        .map(|i| {
            let row = serde_json::json!({
                "prompt": rows[i]["prompt"],
                "chosen": rows[i]["completion"],
                "rejected": rows[(i + 1) % rows.len()]["completion"],
            });
            format!("{row}\n")
        })
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `log p(response | prompt)` by a plain forward of `prompt ++ response` (no padding, no batch)
/// and a log-softmax over the full logits.
fn response_log_prob(model: &tensor_peft_models::Llama<B>, prompt: &[u32], response: &[u32]) -> f64 {
    let ids: Vec<i64> = prompt.iter().chain(response).map(|&t| t as i64).collect();
    let len = ids.len();
    let logits = model.forward(Tensor::from_data(TensorData::new(ids.clone(), [1, len]), &Default::default()));
    let vocab = logits.dims()[2];
    let logp = burn::tensor::activation::log_softmax(logits, 2).into_data().to_vec::<f32>().unwrap();
    (prompt.len().max(1)..len).map(|k| logp[(k - 1) * vocab + ids[k] as usize] as f64).sum()
}

/// TT-LoRA with the official initialisation: ΔW ≠ 0 before any training.
fn paper_tt_lora() -> MethodConfig {
    let flags =
        tensor_peft_adapters::MethodFlags { init: Some(tensor_peft_adapters::DeltaInit::Paper), ..Default::default() };
    MethodConfig::from_flags("tt-lora", &flags).unwrap()
}

#[test]
fn dpo_loss_rewards_and_reference_match_a_hand_computation() {
    use tensor_peft_training::dpo::{DpoTask, fill_reference};
    use tensor_peft_training::task::{Encoder, Target, make_batch};
    let _serial = serial();
    let device = Default::default();
    let dir = fixtures().join("tiny-llama-words");
    let tokenizer = tensor_peft_models::tokenizer::TextTokenizer::from_hf_dir(&dir).unwrap();
    let (base, spec) = tensor_peft_models::Llama::<B>::from_hf_dir(&dir, &device).unwrap();
    tensor_peft_kernels::rng::seed::<B>(&device, 3);
    // A non-zero adapter: the policy differs from the base from the start.
    let policy = base.clone().adapt(&spec, &paper_tt_lora(), &Default::default()).unwrap();
    let rows = [
        ("w19 w35 w13", "w29 w45 w23", "w7 w8"),
        ("w44", "w54 w26 w3 w9", "w12"),
        ("w47 w13 w42 w40 w41", "w57", "w57 w23 w52"),
    ];
    let examples: Vec<data::Example> = rows
        .iter()
        .enumerate()
        .map(|(i, (p, c, r))| data::Example {
            content: data::Content::Preference {
                prompt: p.to_string(),
                chosen: c.to_string(),
                rejected: r.to_string(),
            },
            origin: data::Origin { path: "pairs.jsonl".into(), line: i + 1 },
        })
        .collect();
    let encoder = Encoder {
        tokenizer: &tokenizer,
        task: TaskKind::Dpo,
        max_len: 32,
        labels: None,
        template: "",
        eos: tokenizer.eos,
        training: true,
    };
    let (mut items, report) = encoder.encode_all(&examples).unwrap();
    assert_eq!((items.len(), report.truncated), (3, 0));
    let pad = tokenizer.eos.unwrap_or(0);
    // The reference is taken from the adapted model: its adapters must be left out.
    fill_reference(&policy, &mut items, 2, pad, &device).unwrap();

    let tokens = |text: &str, response: bool| -> Vec<u32> {
        let mut ids = tokenizer.encode(text).unwrap();
        if response {
            if tokenizer.add_bos {
                ids.remove(0);
            }
            ids.extend(tokenizer.eos);
        }
        ids
    };
    let beta = 0.5;
    let mut expected_loss = 0.0;
    let mut expected = Vec::new();
    for ((p, c, r), item) in rows.iter().zip(&items) {
        let (p, c, r) = (tokens(p, false), tokens(c, true), tokens(r, true));
        assert_eq!(item.ids, [p.clone(), c.clone()].concat());
        let Target::Preference(pair) = &item.target else { panic!("not a pair") };
        assert_eq!(pair.rejected, [p.clone(), r.clone()].concat());
        let (ref_c, ref_r) = (response_log_prob(&base, &p, &c), response_log_prob(&base, &p, &r));
        let reference = pair.reference.unwrap();
        assert!((reference[0] - ref_c).abs() < 1e-4 && (reference[1] - ref_r).abs() < 1e-4, "{reference:?}");
        let (pi_c, pi_r) = (response_log_prob(&policy, &p, &c), response_log_prob(&policy, &p, &r));
        assert!((pi_c - ref_c).abs() > 1e-3, "the adapter does not change the policy: {pi_c} vs {ref_c}");
        let (reward_c, reward_r) = (beta * (pi_c - ref_c), beta * (pi_r - ref_r));
        expected_loss += (1.0 + (-(reward_c - reward_r)).exp()).ln() / rows.len() as f64;
        expected.push((reward_c, reward_r, pi_c, pi_r));
    }

    let task = DpoTask { net: policy, beta, gradient_checkpointing: false };
    let refs: Vec<_> = items.iter().collect();
    let (loss, stats) = task.run(make_batch::<B>(&refs, pad, &device));
    let value = loss.into_data().to_vec::<f32>().unwrap()[0] as f64;
    assert!(
        (value - expected_loss).abs() < 1e-5 && (stats.loss - expected_loss).abs() < 1e-5,
        "{value} vs {expected_loss}"
    );
    assert_eq!(stats.units, 3);
    for (got, want) in stats.pairs.iter().zip(&expected) {
        let close = |a: f64, b: f64| (a - b).abs() < 1e-4;
        assert!(close(got.reward_chosen, want.0) && close(got.reward_rejected, want.1), "{got:?} vs {want:?}");
        assert!(close(got.logp_chosen, want.2) && close(got.logp_rejected, want.3), "{got:?} vs {want:?}");
    }
    let metrics = tensor_peft_training::metrics::preference_metrics(&stats.pairs);
    let n = expected.len() as f64;
    let wins = expected.iter().filter(|e| e.0 > e.1).count() as f64;
    let margin = expected.iter().map(|e| e.0 - e.1).sum::<f64>() / n;
    assert_eq!(metrics["rewards/accuracies"], wins / n);
    assert!((metrics["rewards/margins"] - margin).abs() < 1e-4, "{metrics:?}");
    assert!((metrics["rewards/chosen"] - expected.iter().map(|e| e.0).sum::<f64>() / n).abs() < 1e-4);
}

#[test]
fn dpo_truncates_the_prompt_start_then_the_responses() {
    use tensor_peft_training::dpo::encode_pair;
    use tensor_peft_training::task::Target;
    // max_len 8: the prompt keeps BOS and its last 3 tokens (8 / 2 = 4 in all), the responses the
    // 4 tokens left.
    let (e, cut) = encode_pair((0..10).collect(), vec![20, 21, 22, 23, 24, 25], vec![30, 31], true, 8);
    assert!(cut);
    assert_eq!(e.ids, [0, 7, 8, 9, 20, 21, 22, 23]);
    let Target::Preference(pair) = &e.target else { panic!("not a pair") };
    assert_eq!((pair.rejected.as_slice(), pair.from), ([0, 7, 8, 9, 30, 31].as_slice(), 4));
    // What fits is left alone.
    let (e, cut) = encode_pair(vec![1, 2], vec![3], vec![4, 5], false, 8);
    assert!(!cut && e.ids == [1, 2, 3]);
}

#[test]
fn dpo_rows_missing_a_field_and_encoder_models_are_refused() {
    let _serial = serial();
    let dir = scratch("dpo-rows");
    let path = dir.join("pairs.jsonl");
    let fields = FieldMap::default();
    let read = |text: &str| {
        std::fs::write(&path, text).unwrap();
        data::read_file(&path, TaskKind::Dpo, &fields, false).map(|d| d.examples.len())
    };
    assert_eq!(read("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap(), 1);
    let err =
        read("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}\n")
            .unwrap_err()
            .to_string();
    assert!(err.contains("pairs.jsonl:2:") && err.contains("missing field `rejected`"), "{err}");
    assert!(err.contains("--rejected-field"), "{err}");
    let err = read("{\"chosen\": \"b\", \"rejected\": \"c\"}\n").unwrap_err().to_string();
    assert!(err.contains("pairs.jsonl:1:") && err.contains("missing field `prompt`"), "{err}");
    let err = read("{\"prompt\": \"a\", \"chosen\": \" \", \"rejected\": \"c\"}\n").unwrap_err().to_string();
    assert!(err.contains(":1:") && err.contains("field `chosen` is empty"), "{err}");
    let err = read("{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": 3}\n").unwrap_err().to_string();
    assert!(err.contains("field `rejected` must be a string"), "{err}");
    // A DPO run on an encoder is refused before any data is read.
    let cfg = TrainConfig {
        model: fixtures().join("tiny-deberta/v3"),
        task: TaskKind::Dpo,
        train: path.clone(),
        output: dir.join("out"),
        ..TrainConfig::default()
    };
    let err = finetune::<AB>(&cfg, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("task dpo needs a causal LM (LLaMA family)"), "{err}");
    let bad_beta = TrainConfig { model: fixtures().join("tiny-llama-words"), dpo_beta: 0.0, ..cfg };
    let err = finetune::<AB>(&bad_beta, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("dpo-beta"), "{err}");
}

fn dpo_config(name: &str, method: MethodConfig) -> TrainConfig {
    let base = lm_config(name, "lora");
    let dir = base.output.clone();
    TrainConfig {
        task: TaskKind::Dpo,
        train: dpo_file(&dir, "train.jsonl", "lm-copy-train.jsonl"),
        valid: Some(dpo_file(&dir, "valid.jsonl", "lm-copy-valid.jsonl")),
        method,
        epochs: 3,
        dpo_beta: 0.5,
        eval_before_training: true,
        output: dir.join("out"),
        ..base
    }
}

#[test]
fn dpo_finetune_raises_reward_accuracy_and_eval_reproduces_it() {
    let _serial = serial();
    let cfg = dpo_config("dpo-lora", MethodConfig::from_name("lora").unwrap());
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let valid: Vec<&std::collections::BTreeMap<String, f64>> =
        report.history.iter().filter(|h| h.split == "valid").map(|h| &h.metrics).collect();
    assert_eq!(valid.len(), 4);
    // ΔW = 0 before training: the policy is the reference, every reward 0, the loss ln 2.
    assert!((valid[0]["loss"] - std::f64::consts::LN_2).abs() < 1e-4, "{:?}", valid[0]);
    assert!(valid[0]["rewards/margins"].abs() < 1e-4, "{:?}", valid[0]);
    // The training pairs are learnt; on this random tiny model the held-out ones less so (the
    // best validation epoch is the first), which is what best-by-loss selection is for.
    let train: Vec<&std::collections::BTreeMap<String, f64>> =
        report.history.iter().filter(|h| h.split == "train").map(|h| &h.metrics).collect();
    assert!(train[2]["loss"] < 0.3 && train[2]["rewards/accuracies"] > 0.9, "{train:?}");
    assert_eq!(report.best.as_ref().unwrap().0, "loss");
    let best_record = valid.iter().min_by(|a, b| a["loss"].total_cmp(&b["loss"])).unwrap();
    assert!(best_record["loss"] < std::f64::consts::LN_2 - 0.05, "validation loss did not fall: {valid:?}");
    assert!(best_record["rewards/accuracies"] > 0.6 && best_record["rewards/margins"] > 0.0, "{valid:?}");
    // The saved best adapter evaluates to the best recorded validation loss and its rewards.
    let options = eval_options(TaskKind::Dpo, 8);
    let valid_file = cfg.valid.as_ref().unwrap();
    let metrics =
        tensor_peft_training::eval::evaluate::<B>(&cfg.model, &cfg.output, valid_file, &options, &Default::default())
            .unwrap();
    let (_, best, _, step) = report.best.clone().unwrap();
    assert!((metrics["loss"] - best).abs() < 1e-4, "eval {} vs best {best}", metrics["loss"]);
    let recorded = valid.iter().find(|m| m["loss"] == best).unwrap();
    assert!((metrics["rewards/accuracies"] - recorded["rewards/accuracies"]).abs() < 1e-9, "{metrics:?} at {step}");
}

#[test]
fn dpo_reference_is_the_base_even_when_the_adapter_starts_non_zero() {
    let _serial = serial();
    let cfg = TrainConfig { epochs: 1, ..dpo_config("dpo-paper", paper_tt_lora()) };
    let report = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let before = &report.history.iter().find(|h| h.split == "valid").unwrap().metrics;
    // Had the reference been the initialised adapter, every reward would be 0 and the loss ln 2.
    assert!(before["rewards/chosen"].abs() > 1e-3 && before["rewards/rejected"].abs() > 1e-3, "{before:?}");
    assert!((before["loss"] - std::f64::consts::LN_2).abs() > 1e-4, "{before:?}");
}

/// Without a learning rate a run takes its method's recommended settings (lr, LoRA+ ratio, the
/// head at 1e-3) and says which; any given learning rate leaves every setting to the user.
#[test]
fn a_run_without_lr_takes_the_methods_recommended_settings() {
    use tensor_peft_adapters::{DeltaInit, MethodConfig, RecommendedTraining};
    let cfg = |method: &str, task: TaskKind| TrainConfig {
        method: MethodConfig::from_name(method).unwrap(),
        task,
        ..TrainConfig::default()
    };
    let (tt, note) = cfg("tt-lora", TaskKind::Classification).with_recommended_settings();
    assert_eq!((tt.lr, tt.loraplus_lr_ratio, tt.head_lr), (Some(5e-3), Some(4.0), Some(RecommendedTraining::HEAD_LR)));
    assert_eq!(
        note.unwrap(),
        "tt-lora's recommended settings: lr 0.005, LoRA+ ratio 4, head lr 0.001 (give --lr to choose your own)"
    );
    let (lora, _) = cfg("lora", TaskKind::CausalLm).with_recommended_settings();
    assert_eq!((lora.lr, lora.loraplus_lr_ratio, lora.head_lr), (Some(1e-3), None, None), "no head to train");
    // LoRA+ needs the zero-initialised last core, which `--init paper` does not have.
    let mut paper = cfg("tt-lora", TaskKind::CausalLm);
    if let MethodConfig::TtLora(c) = &mut paper.method {
        c.init = DeltaInit::Paper;
    }
    assert_eq!(paper.with_recommended_settings().0.loraplus_lr_ratio, None);
    let given = TrainConfig { lr: Some(2e-4), ..cfg("tt-lora", TaskKind::Classification) };
    let (same, note) = given.clone().with_recommended_settings();
    assert_eq!((same.lr, same.loraplus_lr_ratio, same.head_lr, note), (Some(2e-4), None, None, None));
    assert_eq!(given.peak_lr(), 2e-4);
    assert_eq!(cfg("loretta-rep", TaskKind::Classification).peak_lr(), 5e-3);
}

/// Every trainable parameter of `task` with a small random perturbation, so that no factor is
/// zero (a zero-initialised factor would zero its partner's gradient and hide a wrong one).
fn perturbed<M: Module<AB>>(task: M) -> M {
    struct Perturb;
    impl burn::module::ModuleMapper<AB> for Perturb {
        fn map_float<const D: usize>(
            &mut self,
            p: burn::module::Param<Tensor<AB, D>>,
        ) -> burn::module::Param<Tensor<AB, D>> {
            let (id, t, mapper) = p.consume();
            if !t.is_require_grad() {
                return burn::module::Param::from_mapped_value(id, t, mapper);
            }
            let noise = Tensor::random(t.shape(), burn::tensor::Distribution::Normal(0.0, 0.05), &t.device());
            burn::module::Param::from_mapped_value(id, (t + noise).detach().require_grad(), mapper)
        }
    }
    task.map(&mut Perturb)
}

/// The gradient of every trainable parameter of one `TrainStep` of `task` on `batch`, by path.
fn step_gradients<T>(task: &T, batch: tensor_peft_training::task::Batch<AB>) -> Vec<(String, Vec<f32>)>
where
    T: burn::train::TrainStep<Input = tensor_peft_training::task::Batch<AB>> + Module<AB>,
{
    let grads = burn::train::TrainStep::step(task, batch).grads;
    tensor_peft_training::checkpoint::trainable_params(task)
        .into_iter()
        .map(|(path, shape, _, id)| {
            let values = match shape.len() {
                1 => grads.get::<B, 1>(id).map(|g| g.into_data()),
                2 => grads.get::<B, 2>(id).map(|g| g.into_data()),
                3 => grads.get::<B, 3>(id).map(|g| g.into_data()),
                4 => grads.get::<B, 4>(id).map(|g| g.into_data()),
                n => panic!("{path}: a {n}-D parameter"),
            };
            let values = values.unwrap_or_else(|| panic!("{path} has no gradient")).to_vec::<f32>().unwrap();
            (path, values)
        })
        .collect()
}

/// Asserts that every parameter's gradient with checkpointing equals the plain one: the largest
/// difference within `1e-5` of the parameter's largest plain gradient (f32 rounding of a second,
/// differently ordered forward).
fn assert_same_gradients(what: &str, plain: &[(String, Vec<f32>)], checkpointed: &[(String, Vec<f32>)]) {
    assert_eq!(plain.len(), checkpointed.len(), "{what}");
    assert!(!plain.is_empty(), "{what}: nothing trains");
    for ((name, a), (other, b)) in plain.iter().zip(checkpointed) {
        assert_eq!(name, other, "{what}");
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-5 * scale, "{what}: {name} differs by {diff} (largest gradient {scale})");
    }
}

fn method_without_dropout(name: &str) -> MethodConfig {
    let mut config = serde_json::to_value(MethodConfig::from_name(name).unwrap()).unwrap();
    if let Some(p) = config.get_mut("dropout") {
        *p = serde_json::json!(0.0);
    }
    serde_json::from_value(config).unwrap()
}

#[test]
fn gradient_checkpointing_gives_the_plain_gradients_on_llama_and_deberta() {
    use tensor_peft_models::{Bert, Llama, SequenceClassifier};
    use tensor_peft_training::dpo::{DpoTask, encode_pair};
    use tensor_peft_training::task::{Encoded, EncoderTask, LmTask, Target as Tgt, make_batch};
    let _guard = serial();
    let device = Default::default();
    <AB as burn::tensor::backend::Backend>::seed(&device, 7);
    // Two causal-LM rows of different lengths (padding, a supervised span), and three encoder rows.
    let lm_items = [
        Encoded { ids: vec![1, 5, 9, 13, 17, 21, 25], types: vec![0; 7], target: Tgt::Completion { from: 3 } },
        Encoded { ids: vec![1, 30, 31, 32, 33], types: vec![0; 5], target: Tgt::Completion { from: 2 } },
    ];
    let lm_refs: Vec<_> = lm_items.iter().collect();
    let (llama, llama_spec) = Llama::<AB>::from_hf_dir(&fixtures().join("tiny-llama-words"), &device).unwrap();
    for (method, norms) in [("lora", true), ("lotr", false), ("loretta-adp", false)] {
        let net = llama.clone().adapt(&llama_spec, &method_without_dropout(method), &Default::default()).unwrap();
        let net = if norms { net.train_norms() } else { net };
        let task = perturbed(LmTask { net, verbalizer: Vec::new(), decoding: None, gradient_checkpointing: false });
        let checkpointed = LmTask { gradient_checkpointing: true, ..task.clone() };
        let plain = step_gradients(&task, make_batch::<AB>(&lm_refs, 0, &device));
        let got = step_gradients(&checkpointed, make_batch::<AB>(&lm_refs, 0, &device));
        assert_same_gradients(&format!("llama {method}"), &plain, &got);
    }
    // DPO: a loss over both sequences of each pair.
    let (mut pair, _) = encode_pair(vec![1, 5, 9], vec![13, 17, 2], vec![40, 2], false, 32);
    if let Tgt::Preference(p) = &mut pair.target {
        p.reference = Some([-3.0, -4.0]);
    }
    let net = llama.clone().adapt(&llama_spec, &method_without_dropout("lora"), &Default::default()).unwrap();
    let task = perturbed(DpoTask { net, beta: 0.5, gradient_checkpointing: false });
    let checkpointed = DpoTask { gradient_checkpointing: true, ..task.clone() };
    let plain = step_gradients(&task, make_batch::<AB>(&[&pair], 0, &device));
    let got = step_gradients(&checkpointed, make_batch::<AB>(&[&pair], 0, &device));
    assert_same_gradients("llama dpo lora", &plain, &got);

    let enc_items = [
        Encoded { ids: vec![1, 7, 9, 4, 2], types: vec![0, 0, 0, 1, 1], target: Tgt::Class(2) },
        Encoded { ids: vec![1, 8, 2], types: vec![0; 3], target: Tgt::Class(0) },
        Encoded { ids: vec![1, 3, 5, 6, 11, 2], types: vec![0; 6], target: Tgt::Class(1) },
    ];
    let enc_refs: Vec<_> = enc_items.iter().collect();
    let (deberta, deberta_spec) = Bert::<AB>::from_hf_dir(&fixtures().join("tiny-deberta/v3"), &device).unwrap();
    // The encoders' `train_norms` includes the embedding LayerNorm: the embedding stage trains.
    for (method, norms) in [("lora", true), ("lotr", false), ("loretta-adp", true)] {
        let bert = deberta.clone().adapt(&deberta_spec, &method_without_dropout(method), &Default::default()).unwrap();
        let bert = if norms { bert.train_norms() } else { bert };
        let net = SequenceClassifier::new(bert, 3);
        let task = perturbed(EncoderTask { net, regression: false, gradient_checkpointing: false });
        let checkpointed = EncoderTask { gradient_checkpointing: true, ..task.clone() };
        let plain = step_gradients(&task, make_batch::<AB>(&enc_refs, 0, &device));
        let got = step_gradients(&checkpointed, make_batch::<AB>(&enc_refs, 0, &device));
        assert_same_gradients(&format!("deberta {method}"), &plain, &got);
    }
    // A BERT encoder (absolute positions, plain attention), when the assets are present.
    if let Some(dir) = minilm() {
        let (bert, spec) = Bert::<AB>::from_hf_dir(&dir, &device).unwrap();
        let bert = bert.adapt(&spec, &method_without_dropout("lora"), &Default::default()).unwrap().train_norms();
        let task = perturbed(EncoderTask {
            net: SequenceClassifier::new(bert, 3),
            regression: false,
            gradient_checkpointing: false,
        });
        let checkpointed = EncoderTask { gradient_checkpointing: true, ..task.clone() };
        let plain = step_gradients(&task, make_batch::<AB>(&enc_refs, 0, &device));
        let got = step_gradients(&checkpointed, make_batch::<AB>(&enc_refs, 0, &device));
        assert_same_gradients("minilm lora", &plain, &got);
    }
}

#[test]
fn gradient_checkpointing_finetunes_to_the_plain_losses_and_refuses_adapter_dropout() {
    let _guard = serial();
    let base = TrainConfig { epochs: 2, ..lm_config("gc-plain", "lotr") };
    let plain = finetune::<AB>(&base, &Default::default()).unwrap();
    let cfg = TrainConfig { gradient_checkpointing: true, output: scratch("gc-checkpointed"), ..base.clone() };
    let checkpointed = finetune::<AB>(&cfg, &Default::default()).unwrap();
    let losses = |r: &tensor_peft_training::FinetuneReport| -> Vec<f64> {
        r.history.iter().map(|h| h.metrics["loss"]).collect()
    };
    let (a, b) = (losses(&plain), losses(&checkpointed));
    assert_eq!(a.len(), b.len());
    assert!(a.len() >= 4, "{a:?}");
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0), "plain {a:?} vs checkpointed {b:?}");
    }
    // Adapter dropout draws other masks in the recomputation: refused before anything is loaded.
    let dropout =
        TrainConfig { method: MethodConfig::from_name("loretta-rep").unwrap(), output: scratch("gc-dropout"), ..cfg };
    let err = finetune::<AB>(&dropout, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("gradient-checkpointing") && err.contains("dropout 0.05") && err.contains("lora, "), "{err}");
    assert!(!dropout.output.join("train_config.json").exists());
}

/// Largest difference between two saved adapters' tensors, relative to each tensor's largest
/// value (at least 1).
fn adapter_difference(a: &Path, b: &Path) -> f32 {
    let (a, b) = (adapter_tensors(a), adapter_tensors(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0.0f32;
    for (name, x) in &a {
        let scale = x.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = x.iter().zip(&b[name]).fold(0.0f32, |m, (p, q)| m.max((p - q).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

/// Data parallel over workers sharing ndarray's one device (what a machine without two GPUs can
/// run): each global batch of 8 is split in order over the workers, and the parts' gradients,
/// weighted by their loss units, are summed for one step. The adapter equals the one-device
/// run's: LoTR on causal LM, where the parts hold different numbers of supervised tokens (the
/// weighting matters) and the shared factors must take one summed update per step, and LoRA on
/// prompt classification. A run stopped at a step checkpoint on two workers resumes on one to
/// the same adapter (the data position counts global batches). With adapter dropout each part
/// draws its own masks on its worker: two runs give the same bytes.
#[test]
fn data_parallel_steps_equal_one_device_steps_and_repeat_with_dropout() {
    let _serial = serial();
    let device = Default::default();
    // Float sums in another order, carried through 12 Adam steps: 1e-6 measured.
    let tolerance = 2e-5;
    let one = TrainConfig { epochs: 2, save_every_steps: 1, ..lm_config("dp-one", "lotr") };
    let report = finetune::<AB>(&one, &device).unwrap();
    let two = TrainConfig { output: scratch("dp-two"), ..one.clone() };
    let parallel = tensor_peft_training::finetune_on::<AB>(&two, &[device, device]).unwrap();
    let diff = adapter_difference(&one.output.join("last"), &two.output.join("last"));
    assert!(diff <= tolerance, "two workers' LoTR adapter differs by {diff}");
    let (a, b) = (valid_losses(&report), valid_losses(&parallel));
    assert_eq!(a.len(), b.len());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * x), "{a:?} vs {b:?}");

    // Stopped after step 5 (mid-epoch) on two workers, resumed on one.
    let part = TrainConfig { output: scratch("dp-part"), ..one.clone() };
    let stop_at = tensor_peft_training::trainer::StopAt::Step(5);
    tensor_peft_training::trainer::finetune_until::<AB>(&part, &[device, device], stop_at).unwrap();
    let resumed = TrainConfig { resume: true, overwrite: false, ..part.clone() };
    finetune::<AB>(&resumed, &device).unwrap();
    let diff = adapter_difference(&one.output.join("last"), &part.output.join("last"));
    assert!(diff <= tolerance, "resumed on one device, the adapter differs by {diff}");

    let cls = lm_classification_config("dp-cls-one");
    finetune::<AB>(&cls, &device).unwrap();
    let cls_four = TrainConfig { output: scratch("dp-cls-four"), ..cls.clone() };
    tensor_peft_training::finetune_on::<AB>(&cls_four, &[device; 4]).unwrap();
    let diff = adapter_difference(&cls.output.join("last"), &cls_four.output.join("last"));
    assert!(diff <= tolerance, "four workers' LoRA classifier differs by {diff}");

    // LoRETTA_rep's default input dropout (0.05): the same bytes twice.
    let rep = TrainConfig { epochs: 1, ..lm_config("dp-dropout-a", "loretta-rep") };
    let again = TrainConfig { output: scratch("dp-dropout-b"), ..rep.clone() };
    for cfg in [&rep, &again] {
        tensor_peft_training::finetune_on::<AB>(cfg, &[device, device]).unwrap();
    }
    let bytes = |cfg: &TrainConfig| std::fs::read(cfg.output.join("last/adapter_model.safetensors")).unwrap();
    assert!(bytes(&rep) == bytes(&again), "two data-parallel runs with dropout differ");

    // A global batch that does not split evenly is refused before anything is written.
    let uneven = TrainConfig { batch_size: 6, output: scratch("dp-uneven"), ..one };
    let err = tensor_peft_training::finetune_on::<AB>(&uneven, &[device; 4]).unwrap_err();
    assert!(matches!(err, TrainError::Option { option: "batch_size", .. }), "{err}");
    assert!(err.to_string().contains("6 examples") && err.to_string().contains("4 devices"), "{err}");
    assert!(!uneven.output.join("train_config.json").exists());
}

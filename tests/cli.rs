//! End-to-end tests of the `tpeft` binary: exact parameter counts from the papers, PEFT's output
//! format, clear errors with the documented exit codes (2 usage, 1 runtime).

use std::process::{Command, Output};

fn tpeft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpeft")).args(args).output().expect("run tpeft")
}

fn summary(args: &[&str]) -> String {
    let out = tpeft(args);
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().last().unwrap().to_string()
}

fn trainable(args: &[&str]) -> String {
    summary(args).split(" || ").next().unwrap().trim_start_matches("trainable params: ").to_string()
}

#[test]
fn params_match_the_published_counts() {
    assert_eq!(
        summary(&[
            "params",
            "--model",
            "llama2-7b",
            "--method",
            "tt-lora",
            "--rank",
            "5",
            "--tt-shape",
            "16,16,16,16,16,16"
        ]),
        "trainable params: 112,640 || all params: 6,738,528,256 || trainable%: 0.0017"
    );
    assert_eq!(trainable(&["params", "--model", "llama2-7b", "--method", "lora", "--rank", "8"]), "4,194,304");
    assert_eq!(trainable(&["params", "--model", "llama2-13b", "--method", "lora", "--rank", "8"]), "6,553,600");
    assert_eq!(trainable(&["params", "--model", "llama2-70b", "--method", "lora", "--rank", "8"]), "16,384,000");
    assert_eq!(trainable(&["params", "--model", "roberta-base", "--method", "lotr", "--rank", "8"]), "13,824");
    assert_eq!(trainable(&["params", "--model", "llama2-7b", "--method", "lotr", "--rank", "8"]), "69,632");
    assert_eq!(trainable(&["params", "--model", "llama2-7b", "--method", "lorta", "--rank", "8"]), "34,336");
    // LoRETTA_rep on LLaMA-2-7B q,v at the paper's r=8 with the published [16,16,8,4,4] shapes
    // (1,600 per module), and at the default r=2.
    assert_eq!(trainable(&["params", "--model", "llama2-7b", "--method", "loretta-rep", "--rank", "8"]), "102,400");
    assert_eq!(trainable(&["params", "--model", "llama2-7b", "--method", "loretta-rep"]), "66,560");
    // Explicit targets and the per-module table.
    let out = String::from_utf8(
        tpeft(&["params", "--model", "bert-base", "--method", "lora", "--targets", "query,value,intermediate.dense"])
            .stdout,
    )
    .unwrap();
    assert!(out.contains("encoder.layer.11.intermediate.dense"), "{out}");
    assert!(out.contains("trainable params: 663,552 ||"), "{out}"); // 12·8·(1536+1536+3840)
    // PEFT-style regex targets: q and v of the first two layers only.
    let regex = r"encoder\.layer\.[01]\.attention\.self\.(query|value)";
    assert_eq!(trainable(&["params", "--model", "bert-base", "--method", "lora", "--target-regex", regex]), "49,152");
}

#[test]
fn params_reads_an_hf_config_json() {
    let dir = std::env::temp_dir().join(format!("tpeft-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = r#"{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": true}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    // SmolLM2-135M: q 576x576, v 576x192 → LoRA r=8: 30·8·(1152 + 768) = 460,800; base 134,515,008.
    assert_eq!(
        summary(&["params", "--model", dir.to_str().unwrap(), "--method", "lora"]),
        "trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414"
    );
    // LoRTA generalises to its GQA k/v with a separate key/value head factor.
    assert_eq!(trainable(&["params", "--model", dir.to_str().unwrap(), "--method", "lorta"]), "5,488"); // 8·(576+64+9+3+30+4)
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama", "hidden_size": 576}"#).unwrap();
    let out = tpeft(&["params", "--model", dir.to_str().unwrap(), "--method", "lora"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("config.json") && err.contains("num_attention_heads"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error_with_exit_code_2() {
    let cases: [(&[&str], &str); 13] = [
        (&["bench", "--suite", "linear,nope"], "unknown suite `nope`"),
        (&["bench", "--suite", "train-step"], "the train-step suite needs --model"),
        (
            &["bench", "--suite", "train-step", "--model", "llama2-7b", "--train-shape", "4by8"],
            "expected BATCHxSEQUENCE",
        ),
        (&["bench", "--dtype", "bf16"], "--dtype bf16 needs --backend cuda"),
        (
            &["params", "--model", "llama2-7b", "--method", "tt-lora", "--tt-shape", "16,16,16,16,16"],
            "the factors multiply to 1048576, expected 16777216",
        ),
        (
            &["params", "--model", "llama2-7b", "--method", "tt-lora", "--tt-shape", "16,0,16"],
            "factors must be at least 1",
        ),
        (&["params", "--model", "llama2-7b", "--method", "tt-lora", "--tt-shape", ""], "expected comma-separated"),
        (&["params", "--model", "llama2-7b", "--method", "lora", "--rank", "0"], "at least 1"),
        (&["params", "--model", "llama2-7b", "--method", "dora"], "expected one of lora, tt-lora"),
        (
            &["params", "--model", "llama2-7b", "--method", "lora", "--targets", "query"],
            "module names are: self_attn.q_proj",
        ),
        (&["params", "--model", "no-such-model", "--method", "lora"], "unknown model"),
        (&["--backend", "cuda", "params", "--model", "llama2-7b", "--method", "lora"], "not compiled into this binary"),
        (
            &["params", "--model", "llama2-7b", "--method", "lora", "--bottleneck", "8"],
            "--bottleneck does not apply to lora; it takes --rank, --alpha",
        ),
    ];
    for (args, expected) in cases {
        let out = tpeft(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked") && out.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn bench_train_step_times_both_methods_and_writes_json() {
    let dir = scratch("bench-train-step");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("records.json");
    let model = fixture("tiny-llama");
    let out = tpeft(&[
        "bench",
        "--suite",
        "train-step",
        "--model",
        &model,
        "--train-shape",
        "2x8",
        "--repeats",
        "1",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("batch 2x8") && stdout.contains("lora r=8") && stdout.contains("tt-lora"), "{stdout}");
    let records: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 2);
    // LoRA r=8 on q (32→32) and v (32→16, two KV heads of 8) in both layers.
    assert_eq!(records[0]["adapter_params"], 2 * 8 * ((32 + 32) + (32 + 16)));
    for r in records {
        assert_eq!((r["batch"].as_u64(), r["seq"].as_u64()), (Some(2), Some(8)));
        let tokens_per_s = r["tokens_per_s"].as_f64().unwrap();
        let step_ms = r["step_ms"].as_f64().unwrap();
        assert!(step_ms > 0.0 && (tokens_per_s * step_ms / 1e3 - 16.0).abs() < 1e-6, "{r}");
        // `tpeft` counts its allocations: a step allocates at least its logits (16 × 64 floats).
        let allocated = r["allocated_mib"].as_f64().unwrap() * 1024.0 * 1024.0;
        assert!(r["allocations"].as_u64().unwrap() > 0 && allocated >= 16.0 * 64.0 * 4.0, "{r}");
        assert!(r["heap_peak_extra_mib"].as_f64().unwrap() * 1024.0 * 1024.0 <= allocated, "{r}");
    }
    assert_eq!(records[0]["vs_lora"].as_f64(), Some(1.0));
}

/// The counting allocator, installed here as `tpeft` installs it, for the test below.
#[global_allocator]
static ALLOCATOR: tensor_peft::allocator::CountingAllocator = tensor_peft::allocator::CountingAllocator;

#[test]
fn the_counting_allocator_sees_a_known_allocation() {
    use tensor_peft::allocator::count_allocations;
    const MIB: usize = 1 << 20;
    // A 1 MiB buffer freed inside, an 8 MiB one kept, and a 4 MiB one grown to 12 MiB by
    // `realloc` (counted as a free and a new block). Other test threads allocate and free
    // meanwhile: allocations and bytes only add up, so they are lower bounds, and the live heap's
    // true rise (at least 20 MiB) leaves 8 MiB of slack for frees of their older blocks.
    let (kept, delta) = count_allocations(|| {
        drop(std::hint::black_box(vec![1u8; MIB]));
        let pad = std::hint::black_box(vec![1u8; 8 * MIB]);
        let mut v = std::hint::black_box(vec![1u8; 4 * MIB]);
        v.reserve_exact(8 * MIB);
        (pad, v)
    });
    let delta = delta.expect("the counting allocator is installed");
    assert!(delta.allocations >= 4, "{delta:?}");
    assert!(delta.allocated_bytes >= 25 * MIB as u64, "{delta:?}");
    assert!(delta.peak_extra_bytes >= 12 * MIB as u64, "{delta:?}");
    drop(kept);
}

#[test]
fn demo_trains_every_method_on_the_cpu_backend() {
    let out = tpeft(&["selfcheck", "--steps", "30"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    for method in ["lora", "tt-lora", "loretta-rep", "loretta-adp", "lotr", "lorta"] {
        let line = stdout.lines().find(|l| l.starts_with(&format!("{method} "))).unwrap_or_else(|| panic!("{stdout}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (before, after, err): (f64, f64, f64) =
            (cols[2].parse().unwrap(), cols[3].parse().unwrap(), cols[4].parse().unwrap());
        assert!(after < before, "{method} did not learn: {line}");
        // Zero would mean nothing was compared (every method has a factored path to check).
        assert!(err > 0.0 && err < 1e-5, "{method}: factored forward vs its dense reconstruction: {line}");
    }
}

#[test]
fn generate_answers_with_the_real_smollm2_chat_model() {
    let gguf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        assert_ne!(std::env::var("TENSOR_PEFT_REQUIRE_ASSETS").as_deref(), Ok("1"), "run scripts/fetch-assets.sh");
        eprintln!("skipping: {} is absent (run scripts/fetch-assets.sh)", gguf.display());
        return;
    }
    let out =
        tpeft(&["generate", "--model", gguf.to_str().unwrap(), "--prompt", "What is the capital of France?", "--chat"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "The capital of France is Paris.\n");
    // An adapter for another base model is refused with the reason.
    let peft = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-peft-lora");
    let out =
        tpeft(&["generate", "--model", gguf.to_str().unwrap(), "--prompt", "hi", "--adapter", peft.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("adapter file") && err.contains("shape"), "{err}");
    // The GGUF's architecture also feeds `params`.
    assert_eq!(
        summary(&["params", "--model", gguf.to_str().unwrap(), "--method", "lora"]),
        "trainable params: 460,800 || all params: 134,975,808 || trainable%: 0.3414"
    );
}

#[test]
fn generate_refuses_bad_input() {
    let out = tpeft(&["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file or directory"));
    let dir = std::env::temp_dir().join(format!("tpeft-bad-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("broken.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
    let out = tpeft(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.gguf") && err.contains("invalid GGUF"), "{err}");
    assert!(!err.contains("panicked"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_prints_sentence_transformers_embeddings() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/all-minilm-l6-v2");
    if !dir.join("model.safetensors").is_file() {
        assert_ne!(std::env::var("TENSOR_PEFT_REQUIRE_ASSETS").as_deref(), Ok("1"), "run scripts/fetch-assets.sh");
        eprintln!("skipping: {} is absent (run scripts/fetch-assets.sh)", dir.display());
        return;
    }
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm-embeddings.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = fixture["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let mut args = vec!["embed", "--model", dir.to_str().unwrap()];
    for t in &texts {
        args.extend(["--text", t]);
    }
    let out = tpeft(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<f64>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.len(), texts.len());
    for (row, reference) in got.iter().zip(fixture["embeddings"].as_array().unwrap()) {
        let norm: f64 = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let max_err = row
            .iter()
            .zip(reference.as_array().unwrap())
            .map(|(a, b)| (a - b.as_f64().unwrap()).abs())
            .fold(0.0, f64::max);
        assert!(max_err < 1e-5, "{max_err}");
    }
    let out = tpeft(&["embed", "--model", "/no/such/dir", "--text", "x"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn merge_writes_a_plain_hf_model() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("tests/fixtures/tiny-llama");
    let adapter = root.join("tests/fixtures/tiny-llama-peft-lora");
    let out_dir = std::env::temp_dir().join(format!("tpeft-merge-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let args = [
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out_dir.to_str().unwrap(),
    ];
    let out = tpeft(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("merged"));
    // The merged directory is an ordinary model: same shapes, no adapter tensors.
    assert_eq!(
        summary(&["params", "--model", out_dir.to_str().unwrap(), "--method", "lora"]),
        summary(&["params", "--model", model.to_str().unwrap(), "--method", "lora"])
    );
    // A second merge into the same place is refused without --overwrite.
    let again = tpeft(&args);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    std::fs::remove_dir_all(&out_dir).unwrap();
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tpeft-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// `tpeft finetune` on the tiny word-level LLaMA with the copy task.
fn lm_finetune_args(output: &std::path::Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "finetune",
        "--model",
        &fixture("tiny-llama-words"),
        "--task",
        "causal-lm",
        "--train",
        &fixture("lm-copy-train.jsonl"),
        "--valid",
        &fixture("lm-copy-valid.jsonl"),
        "--method",
        "tt-lora",
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--max-len",
        "32",
        "--seed",
        "9",
        "--output",
        output.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // An extra `--flag value` replaces the default value of that flag.
    let mut i = 0;
    while i < extra.len() {
        let has_value = extra.get(i + 1).is_some_and(|v| !v.starts_with("--"));
        match args.iter().position(|a| a == extra[i]) {
            Some(k) if has_value => args[k + 1] = extra[i + 1].to_string(),
            _ => {
                args.push(extra[i].to_string());
                if has_value {
                    args.push(extra[i + 1].to_string());
                }
            }
        }
        i += 1 + usize::from(has_value);
    }
    args
}

/// `tpeft eval` of an adapter on the tiny LLaMA over the copy task's validation file.
fn eval_tiny(adapter: &std::path::Path, task: &str) -> Output {
    let adapter = adapter.to_str().unwrap();
    let (model, data) = (fixture("tiny-llama-words"), fixture("lm-copy-valid.jsonl"));
    tpeft(&["eval", "--model", &model, "--adapter", adapter, "--task", task, "--data", &data])
}

fn run_args(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tpeft")).args(args).output().expect("run tpeft")
}

/// The output of a successful `tpeft eval` of `adapter` on `model` over `data`.
fn eval_output(model: &str, adapter: &std::path::Path, task: &str, data: &str) -> String {
    let adapter = adapter.to_str().unwrap();
    let out = tpeft(&["eval", "--model", model, "--adapter", adapter, "--task", task, "--data", data]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The value of the `name: value` line of `eval`'s output.
fn metric(text: &str, name: &str) -> f64 {
    let prefix = format!("{name}: ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("{text}")).trim().parse().unwrap()
}

/// The header of an adapter directory's safetensors file (tensor names and shapes), as text.
fn adapter_header(dir: &std::path::Path) -> String {
    let weights = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    String::from_utf8_lossy(&weights[..weights.len().min(8192)]).to_string()
}

#[test]
fn finetune_eval_and_generate_with_the_trained_adapter() {
    let out_dir = scratch("finetune");
    let out = run_args(&lm_finetune_args(&out_dir, &[]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    // One line per epoch and split (no TUI without a terminal), then the summary.
    assert_eq!(stdout.lines().filter(|l| l.starts_with("epoch ")).count(), 6, "{stdout}");
    assert!(stdout.contains("best valid loss:") && stdout.contains("trainable params:"), "{stdout}");
    let csv = std::fs::read_to_string(out_dir.join("metrics.csv")).unwrap();
    assert!(
        csv.starts_with("epoch,split,step,loss,lr,perplexity,tokens_per_second,update_ratio\n")
            && csv.lines().count() == 7,
        "{csv}"
    );
    // eval prints one `metric: value` line per metric.
    let eval = eval_tiny(&out_dir, "causal-lm");
    let text = String::from_utf8_lossy(&eval.stdout).to_string();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    assert!(
        text.lines().any(|l| l.starts_with("loss: ")) && text.lines().any(|l| l.starts_with("perplexity: ")),
        "{text}"
    );
    // generate applies the adapter.
    let generated = tpeft(&[
        "generate",
        "--model",
        &fixture("tiny-llama-words"),
        "--adapter",
        out_dir.join("last").to_str().unwrap(),
        "--prompt",
        "w12 w30",
        "--max-new-tokens",
        "3",
    ]);
    assert!(generated.status.success(), "{}", String::from_utf8_lossy(&generated.stderr));
    // A run in the output directory is not overwritten by accident.
    let again = run_args(&lm_finetune_args(&out_dir, &[]));
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--overwrite"));
    // Wrong task for the adapter, and a task the model family cannot do.
    let wrong = eval_tiny(&out_dir, "lm-classification");
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("trained for causal-lm"));
    let mut args = lm_finetune_args(&scratch("wrong-family"), &[]);
    args[4] = "classification".into();
    let wrong = run_args(&args);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("needs an encoder (BERT family)"));
}

#[test]
fn eval_writes_every_prediction_and_refuses_them_for_causal_lm() {
    let out_dir = scratch("predictions");
    let valid = fixture("lm-sentiment-valid.jsonl");
    let args = lm_finetune_args(
        &out_dir,
        &[
            "--task",
            "lm-classification",
            "--train",
            &fixture("lm-sentiment-train.jsonl"),
            "--valid",
            &valid,
            "--verbalizers",
            "w60,w61",
            "--template",
            "{text} w5",
            "--epochs",
            "2",
        ],
    );
    let out = run_args(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = out_dir.join("predictions.jsonl");
    let (model, adapter) = (fixture("tiny-llama-words"), out_dir.to_str().unwrap().to_string());
    let eval = |task: &str, predictions: &str| {
        tpeft(&[
            "eval",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--task",
            task,
            "--data",
            &valid,
            "--json",
            "--predictions",
            predictions,
        ])
    };
    let out = eval("lm-classification", file.to_str().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // One row per example, in file order, with the file's gold labels; their agreement is the
    // printed accuracy.
    let gold: Vec<serde_json::Value> = std::fs::read_to_string(&valid)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["label"].clone())
        .collect();
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), gold.len());
    for (i, (row, label)) in rows.iter().zip(&gold).enumerate() {
        assert_eq!((row["index"].as_u64(), row["line"].as_u64()), (Some(i as u64), Some(i as u64 + 1)), "{row}");
        assert_eq!(&row["expected"], label, "{row}");
        assert!(["neg", "pos"].contains(&row["predicted"].as_str().unwrap()), "{row}");
    }
    let correct = rows.iter().filter(|r| r["expected"] == r["predicted"]).count();
    let accuracy = metrics["accuracy"].as_f64().unwrap();
    assert!((accuracy - correct as f64 / rows.len() as f64).abs() < 1e-12, "{accuracy} vs {correct}/{}", rows.len());
    // Causal-LM has no per-example prediction, and a missing directory is caught before evaluating.
    let refused = eval("causal-lm", file.to_str().unwrap());
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("causal-lm has no single predicted value"));
    let missing = out_dir.join("no/such/dir/p.jsonl");
    let refused = eval("lm-classification", missing.to_str().unwrap());
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn an_update_that_outgrows_its_frozen_weight_is_reported() {
    let out_dir = scratch("runaway");
    let out = run_args(&lm_finetune_args(&out_dir, &["--method", "lora", "--lr", "0.3"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warning = stderr.lines().find(|l| l.starts_with("warning: epoch")).unwrap_or_else(|| panic!("{stderr}"));
    assert!(warning.contains("(‖ΔW‖/‖W‖)") && warning.contains("lower --lr"), "{warning}");
    // The value printed is epoch 1's recorded metric.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("metrics.json")).unwrap()).unwrap();
    let first = json[0]["metrics"]["update_ratio"].as_f64().unwrap();
    assert!(warning.starts_with("warning: epoch 1:") && first > 1.0, "{warning}");
    assert!(warning.contains(&format!("{first:.2}×")), "{warning} vs {first}");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn finetune_reads_a_toml_config_and_flags_override_it() {
    let out_dir = scratch("toml");
    let config = out_dir.with_extension("toml");
    std::fs::write(
        &config,
        format!(
            "model = \"{}\"\ntask = \"causal-lm\"\ntrain = \"{}\"\nmethod = \"lora\"\nrank = 2\nepochs = 5\nbatch_size = 8\nmax_len = 32\n",
            fixture("tiny-llama-words"),
            fixture("lm-copy-train.jsonl")
        ),
    )
    .unwrap();
    let out = tpeft(&[
        "finetune",
        "--config",
        config.to_str().unwrap(),
        "--epochs",
        "1",
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(saved["epochs"], 1, "the flag wins");
    assert_eq!(saved["method"]["rank"], 2, "the file's value is kept");
    std::fs::write(&config, "modle = \"x\"\n").unwrap();
    let bad = tpeft(&["finetune", "--config", config.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown field `modle`"));
}

#[test]
fn a_killed_finetune_resumes_to_the_same_adapter() {
    killed_finetune_resumes_to_the_same_adapter("f32");
}

/// With a quantized base too: `train_config.json` records `base_dtype`, so `--resume` reloads the
/// base in the same blocks.
#[test]
fn a_killed_finetune_on_a_quantized_base_resumes_to_the_same_adapter() {
    killed_finetune_resumes_to_the_same_adapter("q8_0");
}

fn killed_finetune_resumes_to_the_same_adapter(base_dtype: &str) {
    let reference_dir = scratch(&format!("kill-reference-{base_dtype}"));
    // ndarray: the deterministic CPU backend (bit-identical results are claimed there).
    let deterministic = ["--save-every-steps", "1", "--backend", "ndarray", "--base-dtype", base_dtype];
    let out = run_args(&lm_finetune_args(&reference_dir, &deterministic));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = std::fs::read(reference_dir.join("last/adapter_model.safetensors")).unwrap();
    // Kill with SIGKILL as soon as a checkpoint at step >= k exists, for a few k, then resume.
    let dir = scratch(&format!("kill-{base_dtype}"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tpeft"))
        .args(lm_finetune_args(&dir, &deterministic))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Three random kill points among the 36 steps (printed, so a failure can be replayed).
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as usize;
    let mut targets = [1 + nanos % 10, 12 + (nanos / 10) % 10, 23 + (nanos / 100) % 10];
    targets.sort();
    println!("kill points (checkpoint steps): {targets:?}");
    let mut kills = 0;
    for target in targets {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let steps: Vec<usize> = std::fs::read_dir(dir.join("checkpoint"))
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .collect();
            if steps.iter().any(|&s| s >= target) || child.try_wait().unwrap().is_some() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no checkpoint {target}");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        let _ = child.wait();
        // Only complete checkpoints are visible.
        for entry in std::fs::read_dir(dir.join("checkpoint")).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("step-") {
                assert!(entry.path().join("trainer_state.json").is_file(), "{name} is incomplete");
            }
        }
        child = Command::new(env!("CARGO_BIN_EXE_tpeft"))
            .args(["finetune", "--backend", "ndarray", "--resume", dir.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
    }
    let status = child.wait_with_output().unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(kills >= 2, "the run finished before it could be killed ({kills} kills)");
    let resumed = std::fs::read(dir.join("last/adapter_model.safetensors")).unwrap();
    assert!(resumed == reference, "after {kills} kills the adapter differs from an uninterrupted run");
    let config = std::fs::read_to_string(dir.join("train_config.json")).unwrap();
    assert!(config.contains(&format!("\"base_dtype\": \"{base_dtype}\"")), "{config}");
}

/// `--base-dtype`: a quantized or half-precision base trains an f32 adapter of the same format,
/// which evaluates on any base dtype; what cannot be held is refused before anything is written.
#[test]
fn base_dtypes_train_the_same_adapter_format_and_refuse_what_cannot_be_held() {
    let dir = scratch("base-q4");
    let out = run_args(&lm_finetune_args(&dir, &["--base-dtype", "q4_0", "--epochs", "1"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let loss_on = |base: &str| {
        let (model, data, adapter) =
            (fixture("tiny-llama-words"), fixture("lm-copy-valid.jsonl"), dir.to_str().unwrap());
        let out = tpeft(&[
            "eval",
            "--model",
            &model,
            "--adapter",
            adapter,
            "--task",
            "causal-lm",
            "--data",
            &data,
            "--json",
            "--base-dtype",
            base,
        ]);
        assert!(out.status.success(), "{base}: {}", String::from_utf8_lossy(&out.stderr));
        let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        metrics["loss"].as_f64().unwrap()
    };
    // The run's own validation loss is reproduced on the base it trained on, and the same adapter
    // file loads on an f32 and a bf16 base (close, not equal: the base's weights differ).
    let trained = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let valid: f64 =
        trained.lines().rfind(|l| l.contains(",valid,")).unwrap().split(',').nth(3).unwrap().parse().unwrap();
    assert!((loss_on("q4_0") - valid).abs() < 1e-4, "{} vs {valid}", loss_on("q4_0"));
    for base in ["f32", "bf16", "native"] {
        assert!((loss_on(base) - valid).abs() < 0.5, "{base}: {} vs {valid}", loss_on(base));
    }
    // Refusals: an unknown dtype (usage, exit 2), a dtype the backend cannot hold (exit 1); no
    // output directory either way.
    for (extra, code, message) in [
        (vec!["--base-dtype", "fp8"], 2, "unknown base dtype `fp8`"),
        (vec!["--base-dtype", "bf16", "--backend", "ndarray"], 1, "cannot hold BF16"),
    ] {
        let refused = scratch("base-refused");
        let out = run_args(&lm_finetune_args(&refused, &extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{extra:?}: {stderr}");
        assert!(stderr.contains(message) && stderr.lines().count() == 1, "{extra:?}: {stderr}");
        assert!(!refused.join("adapter_model.safetensors").exists());
    }
    let generated =
        tpeft(&["generate", "--model", &fixture("tiny-llama-words"), "--prompt", "w1", "--base-dtype", "int8"]);
    assert_eq!(generated.status.code(), Some(2));
}

#[test]
fn compare_runs_a_grid_writes_results_and_resumes() {
    let dir = scratch("compare");
    std::fs::create_dir_all(&dir).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            r#"output = "{out}"
[base]
model = "{model}"
task = "causal-lm"
train = "{train}"
valid = "{valid}"
epochs = 4
batch_size = 8
lr = 0.05
max_len = 32
seed = 3
[[variant]]
method = "lora"
rank = [1, 4]
[[variant]]
method = "tt-lora"
rank = [2, 4]
[[variant]]
method = "lorta"
targets = [["q_proj", "k_proj", "v_proj", "o_proj"]]
[halving]
min_epochs = 1
eta = 2
"#,
            out = dir.join("out").display(),
            model = fixture("tiny-llama-words"),
            train = fixture("lm-copy-train.jsonl"),
            valid = fixture("lm-copy-valid.jsonl"),
        ),
    )
    .unwrap();
    let out = tpeft(&["compare", "--config", sweep.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let csv = std::fs::read_to_string(dir.join("out/results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    // Successive halving: 5 runs at 1 epoch, 3 at 2, 2 at 4.
    let epochs: Vec<usize> = csv.lines().skip(1).map(|l| l.split(',').nth_back(5).unwrap().parse().unwrap()).collect();
    let mut sorted = epochs.clone();
    sorted.sort();
    assert_eq!(sorted, [1, 1, 2, 4, 4], "{csv}");
    let png = std::fs::read(dir.join("out/accuracy_vs_params.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let md = std::fs::read_to_string(dir.join("out/results.md")).unwrap();
    assert!(md.contains("| lorta |") && md.contains("(halved)"), "{md}");
    // Running it again repeats nothing.
    let again = tpeft(&["compare", "--config", sweep.to_str().unwrap()]);
    assert!(again.status.success());
    let log = String::from_utf8_lossy(&again.stderr);
    assert_eq!(log.matches("skipped").count(), 5 + 3 + 2, "{log}");
    assert!(!log.contains("compare: training"), "{log}");
    // A typo in the sweep file is a usage error.
    std::fs::write(&sweep, "output = \"x\"\n[base]\nmodle = 1\n[[variant]]\nmethod = \"lora\"\n").unwrap();
    let bad = tpeft(&["compare", "--config", sweep.to_str().unwrap()]);
    assert_eq!(bad.status.code(), Some(2), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("modle"));
}

fn sha(path: &std::path::Path) -> Vec<u8> {
    // Content snapshot (files are small): "unchanged" means byte-identical.
    std::fs::read(path).unwrap()
}

#[test]
fn finetune_fails_cleanly_on_bad_data_full_disks_and_divergence() {
    // A malformed JSONL row: file and line named, exit 1; --skip-bad-rows goes on.
    let dir = scratch("reliability");
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.jsonl");
    let mut text = std::fs::read_to_string(fixture("lm-copy-train.jsonl")).unwrap();
    text.push_str("{\"prompt\": \"w3\"}\nnot json\n");
    std::fs::write(&bad, &text).unwrap();
    let mut args = lm_finetune_args(&dir.join("out-bad"), &["--epochs", "1"]);
    args[6] = bad.to_str().unwrap().into();
    let out = run_args(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("bad.jsonl:49:") && err.contains("missing field `completion`"), "{err}");
    assert!(!dir.join("out-bad").exists(), "nothing is written for a run that cannot start");
    args.push("--skip-bad-rows".into());
    let out = run_args(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 2 bad rows"));

    // An output path below a regular file cannot be created: exit 1, the path is named.
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let out = run_args(&lm_finetune_args(&file.join("run"), &["--epochs", "1"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plain-file/run"));

    // A full disk (file-size limit; EFBIG instead of SIGXFSZ): exit 1 naming the file, and no
    // temporary or partial checkpoint left behind.
    let full = dir.join("out-full");
    let cmd = format!(
        "trap '' XFSZ; ulimit -f 3; exec {} {}",
        env!("CARGO_BIN_EXE_tpeft"),
        lm_finetune_args(&full, &["--save-every-steps", "1"]).join(" ")
    );
    let out = Command::new("sh").args(["-c", &cmd]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("File too large") || err.contains("too large"), "{err}");
    for entry in std::fs::read_dir(full.join("checkpoint")).into_iter().flatten() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.starts_with(".tmp"), "a temporary checkpoint was left: {name}");
    }

    // A diverging run stops at the step whose loss is not finite; the last checkpoint stays.
    let diverge = dir.join("out-diverge");
    let out =
        run_args(&lm_finetune_args(&diverge, &["--lr", "1e30", "--max-grad-norm", "0", "--save-every-steps", "1"]));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let step: usize = err
        .split("at step ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let checkpoints: Vec<String> = std::fs::read_dir(diverge.join("checkpoint"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(checkpoints, [format!("step-{:08}", step - 1)], "{err}");
}

#[test]
fn reading_adapters_and_checkpoints_never_modifies_them() {
    let dir = scratch("read-only");
    let out = run_args(&lm_finetune_args(&dir, &["--epochs", "2"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let files = ["adapter_config.json", "adapter_model.safetensors"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| sha(&dir.join(f))).collect();
    let checkpoint = std::fs::read_dir(dir.join("checkpoint")).unwrap().next().unwrap().unwrap().path();
    let ck_files = ["trainable.safetensors", "optimizer.bin", "trainer_state.json"];
    let ck_before: Vec<Vec<u8>> = ck_files.iter().map(|f| sha(&checkpoint.join(f))).collect();
    let eval = eval_tiny(&dir, "causal-lm");
    assert!(eval.status.success());
    let (model, adapter) = (fixture("tiny-llama-words"), dir.to_str().unwrap());
    let generate =
        tpeft(&["generate", "--model", &model, "--adapter", adapter, "--prompt", "w5", "--max-new-tokens", "2"]);
    assert!(generate.status.success());
    let after: Vec<Vec<u8>> = files.iter().map(|f| sha(&dir.join(f))).collect();
    assert!(before == after, "eval or generate modified the adapter files");
    // Resuming a finished run with the same number of epochs reads the checkpoint and trains
    // nothing more: the checkpoint is untouched.
    let resumed = tpeft(&["finetune", "--resume", dir.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let ck_after: Vec<Vec<u8>> = ck_files.iter().map(|f| sha(&checkpoint.join(f))).collect();
    assert!(ck_before == ck_after, "resuming modified the checkpoint it read");
}

#[test]
fn adapters_with_trained_norms_generate_and_merge_to_the_same_text() {
    let dir = scratch("norms");
    let out = run_args(&lm_finetune_args(
        &dir,
        &["--train-norms", "--epochs", "8", "--lr", "0.05", "--method", "loretta-rep"],
    ));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = String::from_utf8_lossy(&std::fs::read(dir.join("adapter_config.json")).unwrap()).to_string();
    assert!(saved.contains("LORETTA-REP") || saved.contains("loretta"), "{saved}");
    let generate = |model: &str, adapter: Option<&std::path::Path>| {
        let mut args = vec!["generate", "--model", model, "--prompt", "w12 w30 w41", "--max-new-tokens", "4"];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let out = tpeft(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let with_adapter = generate(&fixture("tiny-llama-words"), Some(&dir));
    let merged_dir = dir.join("merged");
    let merge = tpeft(&[
        "merge",
        "--model",
        &fixture("tiny-llama-words"),
        "--adapter",
        dir.to_str().unwrap(),
        "--output",
        merged_dir.to_str().unwrap(),
    ]);
    assert!(merge.status.success(), "{}", String::from_utf8_lossy(&merge.stderr));
    assert_eq!(generate(merged_dir.to_str().unwrap(), None), with_adapter, "merged model generates differently");
    assert_ne!(generate(&fixture("tiny-llama-words"), None), with_adapter, "the adapter changes nothing");
}

#[test]
fn init_flag_selects_the_official_initialisation() {
    let dir = scratch("init");
    // Epoch-0 validation loss (before any step) of a run with the given extra flags.
    let start_loss = |name: &str, extra: &[&str]| -> f64 {
        let mut flags = vec!["--epochs", "1", "--max-steps", "1", "--eval-before-training"];
        flags.extend_from_slice(extra);
        let out = run_args(&lm_finetune_args(&dir.join(name), &flags));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let metrics: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(name).join("metrics.json")).unwrap()).unwrap();
        let rows = metrics.as_array().expect("a list of records");
        let first = rows.iter().find(|r| r["epoch"] == 0 && r["split"] == "valid").expect("epoch 0 recorded");
        first["metrics"]["loss"].as_f64().unwrap()
    };
    let base = start_loss("zero", &[]);
    assert_eq!(base, start_loss("zero-explicit", &["--init", "zero"]), "zero is the default");
    // LANL's direct_init: every core random, so the adapted model differs from the base at step 0.
    let paper = start_loss("paper", &["--init", "paper"]);
    assert!((paper - base).abs() > 1e-6, "paper init must move the starting point: {paper} vs {base}");

    for (extra, message) in [
        (vec!["--init", "gaussian"], "--init gaussian: expected zero or paper"),
        (vec!["--method", "lora", "--init", "paper"], "--init paper does not apply to lora"),
    ] {
        let out = run_args(&lm_finetune_args(&dir.join("bad"), &extra));
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains(message), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// The adapter files an earlier version wrote for every method (`scripts/fixtures/adapter_files.sh`)
/// evaluate to the metrics recorded with them.
#[test]
fn committed_adapter_files_of_every_method_evaluate_as_recorded() {
    let mut dirs: Vec<_> = std::fs::read_dir(fixture("adapter-files")).unwrap().map(|e| e.unwrap().path()).collect();
    dirs.sort();
    assert_eq!(dirs.len(), 6, "one fixture per method");
    for dir in dirs {
        let method = dir.file_name().unwrap().to_string_lossy().to_string();
        let (model, data) = (fixture("tiny-llama-words"), fixture("lm-copy-valid.jsonl"));
        let args = ["eval", "--model", &model, "--adapter", dir.to_str().unwrap(), "--task", "causal-lm"];
        let out = tpeft(&[&args[..], &["--data", &data, "--json"]].concat());
        assert!(out.status.success(), "{method}: {}", String::from_utf8_lossy(&out.stderr));
        let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let want: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        for key in ["loss", "perplexity"] {
            let (g, w) = (got[key].as_f64().unwrap(), want[key].as_f64().unwrap());
            assert!((g - w).abs() <= 1e-5 * w.abs(), "{method}: {key} {g} vs recorded {w}");
        }
    }
}

/// A checkpoint whose `config.json` asks for a computation the models do not implement (here
/// LLaMA-3's RoPE scaling) is refused naming the field, never run with that field ignored;
/// counting its parameters still works.
#[test]
fn unimplemented_config_settings_are_refused_not_ignored() {
    let dir = scratch("rope-scaling");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-llama-words")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let mut write = |scaling: serde_json::Value| {
        config["rope_scaling"] = scaling;
        std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    };
    let model = dir.to_str().unwrap();
    let generate = || tpeft(&["generate", "--model", model, "--prompt", "w5", "--max-new-tokens", "1"]);
    // A RoPE type that is not implemented is refused by name; `params` still counts the model.
    write(serde_json::json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}));
    let out = generate();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rope_scaling") && err.contains("longrope") && err.contains("not implemented"), "{err}");
    let params = tpeft(&["params", "--model", model]);
    assert!(params.status.success(), "{}", String::from_utf8_lossy(&params.stderr));
    // llama3 scaling is implemented.
    write(serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}));
    let out = generate();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `tpeft plan` estimates without loading (a 70B preset plans in no time), and `finetune` refuses
/// a run whose estimate exceeds the machine's memory before it loads anything, unless `--force`.
#[test]
fn plan_estimates_without_loading_and_finetune_refuses_what_does_not_fit() {
    let out =
        tpeft(&["plan", "--model", "llama2-70b", "--base-dtype", "q4_0", "--batch-size", "1", "--max-len", "512"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap();
    let mib: u64 = last.strip_prefix("estimated peak memory: ").unwrap().strip_suffix(" MiB").unwrap().parse().unwrap();
    // 68.98 B weights: mostly 4.5-bit blocks, so between 35 and 60 GiB.
    assert!((35 << 10..60 << 10).contains(&mib), "{stdout}");
    assert!(stdout.contains("frozen projections (q4_0)") && stdout.contains("activations"), "{stdout}");
    let bad = tpeft(&["plan", "--model", "llama2-7b", "--base-dtype", "fp8"]);
    assert_eq!(bad.status.code(), Some(2));
    // A 70B-shaped config without weights: refused by the plan (exit 2, nothing written) before any
    // load; with --force the load itself fails on the missing weights (exit 1).
    let dir = scratch("plan-70b");
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(fixture("tiny-llama-words/config.json"))
        .unwrap()
        .replace("\"hidden_size\": 32", "\"hidden_size\": 8192")
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 28672")
        .replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 80")
        .replace("\"num_attention_heads\": 4", "\"num_attention_heads\": 64")
        .replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 8");
    std::fs::write(dir.join("config.json"), config).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture(&format!("tiny-llama-words/{file}")), dir.join(file)).unwrap();
    }
    let output = scratch("plan-70b-run");
    let mut args = lm_finetune_args(&output, &[]);
    args[2] = dir.to_str().unwrap().to_string();
    let refused = run_args(&args);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs an estimated") && stderr.contains("--force"), "{stderr}");
    assert!(!output.exists(), "nothing is written");
    args.push("--force".into());
    let forced = run_args(&args);
    assert_eq!(forced.status.code(), Some(1), "{}", String::from_utf8_lossy(&forced.stderr));
    // `compare` checks every run of the sweep before the first starts.
    let sweep_out = scratch("plan-70b-sweep");
    let sweep = dir.join("sweep.toml");
    let toml = format!(
        "output = \"{}\"\n[base]\nmodel = \"{}\"\ntask = \"causal-lm\"\ntrain = \"{}\"\nmax_len = 32\n[[variant]]\nmethod = \"lora\"\n",
        sweep_out.display(),
        dir.display(),
        fixture("lm-copy-train.jsonl")
    );
    std::fs::write(&sweep, toml).unwrap();
    let refused = tpeft(&["compare", "--config", sweep.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("lora") && stderr.contains("needs an estimated"), "{stderr}");
    assert!(!sweep_out.exists(), "nothing is written");
}

/// A DeBERTa-v3-style encoder (disentangled attention, no absolute positions) fine-tunes for
/// sequence classification through the CLI, and its adapter evaluates.
#[test]
fn deberta_fine_tunes_for_classification_and_evaluates() {
    let out_dir = scratch("deberta");
    let model = fixture("tiny-deberta/v3");
    let (train, valid) = (fixture("lm-sentiment-train.jsonl"), fixture("lm-sentiment-valid.jsonl"));
    let out = tpeft(&[
        "finetune",
        "--model",
        &model,
        "--task",
        "classification",
        "--train",
        &train,
        "--valid",
        &valid,
        "--method",
        "tt-lora",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "0.01",
        "--max-len",
        "16",
        "--seed",
        "3",
        "--output",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("best valid"), "{stdout}");
    // The adapter's tensors carry DeBERTa's module names.
    let header = adapter_header(&out_dir.join("last"));
    assert!(header.contains("attention.self.query_proj") && header.contains("attention.self.value_proj"), "{header}");
    let text = eval_output(&model, &out_dir.join("last"), "classification", &valid);
    assert!((0.0..=1.0).contains(&metric(&text, "accuracy")), "{text}");
    // The same adapter without its trained head is refused, not evaluated with a random head.
    let headless = scratch("deberta-headless");
    std::fs::create_dir_all(&headless).unwrap();
    std::fs::copy(out_dir.join("last/adapter_config.json"), headless.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(out_dir.join("last/adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let (mut kept, mut data) = (serde_json::Map::new(), Vec::new());
    for (name, entry) in header.into_iter().filter(|(name, _)| !name.contains(".classifier.")) {
        let mut entry = entry;
        if let Some(offsets) = entry.get("data_offsets").cloned() {
            let [start, end] = [0, 1].map(|i| offsets[i].as_u64().unwrap() as usize);
            entry["data_offsets"] = serde_json::json!([data.len(), data.len() + end - start]);
            data.extend_from_slice(&bytes[8 + n + start..8 + n + end]);
        }
        kept.insert(name, entry);
    }
    let json = serde_json::to_vec(&kept).unwrap();
    let file = [&(json.len() as u64).to_le_bytes()[..], &json, &data].concat();
    std::fs::write(headless.join("adapter_model.safetensors"), file).unwrap();
    let out = tpeft(&[
        "eval",
        "--model",
        &model,
        "--adapter",
        headless.to_str().unwrap(),
        "--task",
        "classification",
        "--data",
        &valid,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("adapter_model.safetensors") && err.contains("no trained task head"), "{err}");
    // A model with learned absolute positions (64 here) refuses a longer --max-len up front.
    let too_long = tpeft(&[
        "finetune",
        "--model",
        &fixture("tiny-deberta/v2-absolute"),
        "--task",
        "classification",
        "--train",
        &train,
        "--method",
        "lora",
        "--max-len",
        "100",
        "--output",
        scratch("deberta-too-long").to_str().unwrap(),
    ]);
    assert_eq!(too_long.status.code(), Some(1));
    let err = String::from_utf8_lossy(&too_long.stderr);
    assert!(err.contains("max-len") && err.contains("context of 64 positions"), "{err}");
}

/// `--eval-every-steps` evaluates between epoch ends and keeps the best step's adapter, without
/// changing the training itself.
#[test]
fn eval_every_steps_adds_evaluations_without_changing_training() {
    let (plain, every) = (scratch("eval-steps-plain"), scratch("eval-steps-every"));
    for (dir, extra) in [(&plain, vec!["--epochs", "2"]), (&every, vec!["--epochs", "2", "--eval-every-steps", "5"])] {
        let out = run_args(&lm_finetune_args(dir, &extra));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The same steps: the last adapters are byte for byte the same.
    let last = |dir: &std::path::Path| std::fs::read(dir.join("last/adapter_model.safetensors")).unwrap();
    assert_eq!(last(&plain), last(&every));
    // 48 examples in batches of 4: 12 steps an epoch; validation at 5, 10, 12, 15, 20, 24.
    let csv = std::fs::read_to_string(every.join("metrics.csv")).unwrap();
    let valid_steps: Vec<usize> = csv
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1] == "valid").then(|| f[2].parse().unwrap())
        })
        .collect();
    assert_eq!(valid_steps, [5, 10, 12, 15, 20, 24], "{csv}");
    // The report names the best evaluation's step, and the kept adapter is that evaluation's.
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(every.join("train_report.json")).unwrap()).unwrap();
    let best_step = report["best"][3].as_u64().unwrap() as usize;
    assert!(valid_steps.contains(&best_step), "{report}");
    let best_loss = report["best"][1].as_f64().unwrap();
    let text = eval_output(&fixture("tiny-llama-words"), &every, "causal-lm", &fixture("lm-copy-valid.jsonl"));
    let loss = metric(&text, "loss");
    assert!((loss - best_loss).abs() < 1e-4, "best adapter evaluates to {loss}, recorded {best_loss}");
}

/// `--tt-shape NAME=…` gives modules of different sizes their own TT-LoRA shapes (GQA q and v);
/// an entry that names no adapted module, a second bare shape, or a method without per-module
/// shapes is refused.
#[test]
fn tt_lora_takes_a_shape_per_module() {
    // LLaMA-2-70B: q 8192×8192, v 8192×1024. Per layer 2,560 + 1,760 at rank 5.
    let q = "q_proj=16,16,32,32,16,16";
    let v = "v_proj=16,16,32,8,8,16";
    let base = ["params", "--model", "llama2-70b", "--method", "tt-lora", "--rank", "5"];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    assert_eq!(trainable(&with(&base, &["--tt-shape", q, "--tt-shape", v])), "345,600");
    let joined = format!("{q};{v}");
    assert_eq!(trainable(&with(&base, &["--tt-shape", &joined])), "345,600");
    // A bare shape still applies to every target not named (here q); unnamed targets without one
    // get planned shapes.
    assert_eq!(trainable(&with(&base, &["--tt-shape", "16,16,32,32,16,16", "--tt-shape", v])), "345,600");
    for (extra, message) in [
        // A bare shape for every target does not fit v.
        (vec!["--tt-shape", "16,16,32,32,16,16"], "the factors multiply to 67108864, expected 8388608"),
        (vec!["--tt-shape", q, "--tt-shape", v, "--tt-shape", "k_proj=16,16,32,8,8,16"], "k_proj"),
        (vec!["--tt-shape", "16,16,32,32,16,16", "--tt-shape", "16,16,32,32,16,16"], "already given"),
        (vec!["--tt-shape", "=16,16"], "with a module name"),
    ] {
        let out = tpeft(&with(&base, &extra));
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(message), "{extra:?}: {err}");
    }
    let out = tpeft(&["params", "--model", "llama2-70b", "--method", "loretta-rep", "--tt-shape", q]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tt-shape NAME=… does not apply to loretta-rep"));
}

/// `--init-from` starts a run from a saved adapter (sequential multi-task learning): before its
/// first step it scores what the saved adapter scored; another method or targets are refused.
#[test]
fn init_from_warm_starts_from_a_saved_adapter() {
    let (first, second, wrong) = (scratch("init-first"), scratch("init-second"), scratch("init-wrong"));
    let out = run_args(&lm_finetune_args(&first, &["--epochs", "1"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = first.join("last");
    let args =
        lm_finetune_args(&second, &["--epochs", "1", "--init-from", saved.to_str().unwrap(), "--eval-before-training"]);
    let out = run_args(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let valid_losses = |dir: &std::path::Path| -> Vec<f64> {
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let loss = header.iter().position(|h| *h == "loss").unwrap();
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f[1] == "valid")
            .map(|f| f[loss].parse().unwrap())
            .collect()
    };
    let (before, after) = (valid_losses(&first), valid_losses(&second));
    assert!((after[0] - before.last().unwrap()).abs() < 1e-6, "warm start scores {} vs saved {:?}", after[0], before);
    let out =
        run_args(&lm_finetune_args(&wrong, &["--epochs", "1", "--rank", "2", "--init-from", saved.to_str().unwrap()]));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("init-from") && err.contains("same method flags"), "{err}");
}

/// `params --train-norms` counts what `finetune --train-norms` trains, and reproduces the LoRETTA
/// paper's LLaMA-2-7B LoRETTA_rep figure (0.51M: r=8 at tensor rank 8 on q,v plus every RMSNorm).
#[test]
fn params_count_trained_norms_as_finetune_trains_them() {
    let rep = [
        "params",
        "--model",
        "llama2-7b",
        "--method",
        "loretta-rep",
        "--rank",
        "8",
        "--tensor-rank",
        "8",
        "--train-norms",
    ];
    assert_eq!(trainable(&rep), "516,096");
    let model = fixture("tiny-llama-words");
    let counted = trainable(&["params", "--model", &model, "--method", "tt-lora", "--train-norms"]);
    let out_dir = scratch("train-norms");
    let out = run_args(&lm_finetune_args(&out_dir, &["--epochs", "1", "--train-norms"]));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().find(|l| l.starts_with("trainable params: ")).unwrap_or_else(|| panic!("{stdout}"));
    let trained = line.trim_start_matches("trainable params: ").split_whitespace().next().unwrap().replace(',', "");
    assert_eq!(trained, counted.replace(',', ""), "{line}");
}

/// `--head tt`, LoRETTA's tensorized classification head: a fresh TT layer replaces the pooler. It
/// trains, is saved with the adapter, and the saved adapter evaluates to the recorded best loss;
/// other tasks and unknown heads are refused.
#[test]
fn tt_head_trains_saves_and_evaluates() {
    let out_dir = scratch("tt-head");
    let model = fixture("tiny-deberta/v3");
    let (train, valid) = (fixture("lm-sentiment-train.jsonl"), fixture("lm-sentiment-valid.jsonl"));
    let args = |head: &str, output: &std::path::Path| -> Vec<String> {
        [
            "finetune",
            "--model",
            &model,
            "--task",
            "classification",
            "--train",
            &train,
            "--valid",
            &valid,
            "--method",
            "loretta-rep",
            "--head",
            head,
            "--metric-for-best",
            "loss",
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--lr",
            "0.01",
            "--max-len",
            "16",
            "--seed",
            "3",
            "--output",
            output.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let out = run_args(&args("tt", &out_dir));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let header = adapter_header(&out_dir);
    assert!(header.contains("tt_pooler.tt.cores.0") && header.contains("classifier.weight"), "{header}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("train_report.json")).unwrap()).unwrap();
    let best = report["best"][1].as_f64().unwrap();
    let loss = metric(&eval_output(&model, &out_dir, "classification", &valid), "loss");
    assert!((loss - best).abs() < 1e-4, "the saved TT head evaluates to {loss}, recorded {best}");
    // The TT head is a different model from the linear one.
    let linear_dir = scratch("linear-head");
    assert!(run_args(&args("linear", &linear_dir)).status.success());
    let linear: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(linear_dir.join("train_report.json")).unwrap()).unwrap();
    assert_ne!(linear["best"][1].as_f64().unwrap(), best);
    let mut bad = args("nope", &scratch("bad-head"));
    assert_eq!(run_args(&bad).status.code(), Some(2));
    bad = lm_finetune_args(&scratch("lm-tt-head"), &["--head", "tt"]);
    let out = run_args(&bad);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--head applies to classification"));
}

#[test]
fn multiple_choice_and_generation_train_and_evaluate_from_the_command_line() {
    let dir = scratch("mc-gen");
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_str().unwrap().to_string();
    // Multiple choice from a --config file, with the choices under another key.
    let rows: String = (0..12)
        .map(|i| {
            let label = i % 2;
            let mut options = vec![format!(" w{} w{}", 20 + i, 30 + i)];
            options.insert(label, " w60 w61".into());
            serde_json::json!({"text": format!("w{} w{}", 10 + i, 40 - i), "options": options, "label": label})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path("mc.jsonl"), &rows).unwrap();
    std::fs::write(
        path("mc.toml"),
        format!(
            "model = \"{}\"\ntask = \"lm-multiple-choice\"\ntrain = \"{}\"\nvalid = \"{}\"\nchoices_field = \"options\"\nmethod = \"lora\"\nepochs = 1\nbatch_size = 4\nmax_len = 16\n",
            fixture("tiny-llama-words"),
            path("mc.jsonl"),
            path("mc.jsonl")
        ),
    )
    .unwrap();
    let out = tpeft(&["finetune", "--config", &path("mc.toml"), "--output", &path("mc-run")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("best valid accuracy:"), "{stdout}");
    let model = fixture("tiny-llama-words");
    let eval = |task: &str, data: &str, adapter: &str, extra: &[&str]| {
        let mut args = vec!["eval", "--model", &model, "--adapter", adapter, "--task", task, "--data", data];
        args.extend_from_slice(extra);
        tpeft(&args)
    };
    let (mc, mc_run, predictions) = (path("mc.jsonl"), path("mc-run"), path("mc-pred.jsonl"));
    let out = eval(
        "lm-multiple-choice",
        &mc,
        &mc_run,
        &["--choices-field", "options", "--json", "--predictions", &predictions],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["accuracy", "accuracy_norm", "accuracy_per_token", "loss"] {
        assert!(metrics[key].is_number(), "{metrics}");
    }
    let lines = std::fs::read_to_string(&predictions).unwrap();
    let second: serde_json::Value = serde_json::from_str(lines.lines().nth(1).unwrap()).unwrap();
    assert_eq!((second["line"].as_u64(), second["expected"].as_u64()), (Some(2), Some(1)), "{second}");
    // Without the key mapping the rows are refused, naming file, line and field (a runtime error).
    let out = eval("lm-multiple-choice", &mc, &mc_run, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("mc.jsonl:1:") && err.contains("missing field `choices`") && !err.contains("panicked"),
        "{err}"
    );

    // Generation from flags, the answers under another key; eval's --max-new-tokens wins.
    let rows: String = (0..12)
        .map(|i| {
            serde_json::json!({"prompt": format!("w{} w{}", 10 + i, 40 - i), "golds": ["w60 w61"]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(path("gen.jsonl"), &rows).unwrap();
    let (generation, gen_run) = (path("gen.jsonl"), path("gen-run"));
    let args = lm_finetune_args(
        std::path::Path::new(&gen_run),
        &[
            "--task",
            "lm-generation",
            "--train",
            &generation,
            "--valid",
            &generation,
            "--answers-field",
            "golds",
            "--max-new-tokens",
            "4",
            "--epochs",
            "1",
        ],
    );
    let out = run_args(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("best valid f1:"));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("gen-run/train_config.json")).unwrap()).unwrap();
    assert_eq!(saved["max_new_tokens"], 4);
    let predictions = path("gen-pred.jsonl");
    let out = eval(
        "lm-generation",
        &generation,
        &gen_run,
        &["--answers-field", "golds", "--max-new-tokens", "1", "--predictions", &predictions],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("exact_match: ") && text.contains("f1: "), "{text}");
    for line in std::fs::read_to_string(&predictions).unwrap().lines() {
        let p: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(p["expected"], serde_json::json!(["w60 w61"]));
        assert!(p["predicted"].as_str().unwrap().split_whitespace().count() <= 1, "{p}");
    }
    // An encoder model cannot do these tasks.
    let args = lm_finetune_args(
        &dir.join("deberta"),
        &["--model", &fixture("tiny-deberta/v3"), "--task", "lm-generation", "--train", &generation],
    );
    let out = run_args(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("lm-generation needs a causal LM"), "{err}");
}

/// `tpeft eval` and `generate` with several adapters on one base, and `tpeft combine`, on the
/// committed adapter files of the tiny word-level LLaMA.
#[test]
fn several_adapters_switch_disable_and_combine() {
    let (model, data) = (fixture("tiny-llama-words"), fixture("lm-copy-valid.jsonl"));
    let files = fixture("adapter-files");
    let (lora, tt) = (format!("lora={files}/lora"), format!("tt={files}/tt-lora"));
    let loss = |extra: &[&str]| {
        let args = [&["eval", "--model", &model, "--task", "causal-lm", "--data", &data, "--json"][..], extra].concat();
        let out = tpeft(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        json["loss"].as_f64().unwrap()
    };
    let recorded = |method: &str| {
        let text = std::fs::read_to_string(format!("{files}/{method}/expected.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["loss"].as_f64().unwrap()
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs();
    // The first adapter is applied unless --active-adapter names another; each evaluates as alone.
    assert!(close(loss(&["--adapter", &lora, "--adapter", &tt]), recorded("lora")));
    assert!(close(loss(&["--adapter", &lora, "--adapter", &tt, "--active-adapter", "tt"]), recorded("tt-lora")));
    // Disabled: the base model, whichever adapter is active.
    let base = loss(&["--adapter", &lora, "--adapter", &tt, "--disable-adapters"]);
    let base_tt = loss(&["--adapter", &lora, "--adapter", &tt, "--active-adapter", "tt", "--disable-adapters"]);
    assert_eq!(base, base_tt);
    assert!(!close(base, recorded("lora")) && !close(base, recorded("tt-lora")));

    // combine: weights 1 and 0 reproduce the first adapter; the file is PEFT's LoRA format.
    let out_dir = scratch("combined");
    let combine = |extra: &[&str]| {
        let args = [
            &[
                "combine",
                "--model",
                &model,
                "--adapter",
                &lora,
                "--adapter",
                &tt,
                "--output",
                out_dir.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        tpeft(&args)
    };
    let out = combine(&["--weights", "1,0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("rank 13 at 4 modules"), "{summary}"); // LoRA 8 + TT-LoRA's cut rank 5
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["peft_type"].as_str(), config["r"].as_u64(), config["lora_alpha"].as_f64()),
        (Some("LORA"), Some(13), Some(13.0))
    );
    let combined = format!("mix={}", out_dir.display());
    assert!(close(loss(&["--adapter", &combined]), recorded("lora")));
    // An existing output is refused without --overwrite and replaced whole with it; a negative
    // weight subtracts.
    let out = combine(&["--weights", "0.5,0.5"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overwrite"));
    let out = combine(&["--weights", "-0.5,1.5", "--overwrite"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mixed = loss(&["--adapter", &combined]);
    assert!(mixed.is_finite() && !close(mixed, recorded("lora")) && !close(mixed, recorded("tt-lora")));
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".{}.", out_dir.file_name().unwrap().to_string_lossy()))
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary directories left: {leftovers:?}");
    // generate takes the same flags.
    let generate = |extra: &[&str]| {
        let args =
            [&["generate", "--model", &model, "--prompt", "w13 w16 w10 w46", "--max-new-tokens", "4"][..], extra]
                .concat();
        let out = tpeft(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(generate(&["--adapter", &lora, "--adapter", &tt, "--disable-adapters"]), generate(&[]));
    assert_eq!(
        generate(&["--adapter", &lora, "--adapter", &tt, "--active-adapter", "tt"]),
        generate(&["--adapter", &format!("{files}/tt-lora")])
    );

    // Refusals: exit 2 for the command line, 1 for adapters that cannot be combined.
    let refused = |args: &[&str], code: i32, needle: &str| {
        let out = tpeft(args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    let eval = ["eval", "--model", &model, "--task", "causal-lm", "--data", &data];
    refused(&[&eval[..], &["--adapter", &lora, "--active-adapter", "nope"]].concat(), 2, "no adapter called `nope`");
    refused(&[&eval[..], &["--adapter", &lora, "--adapter", &lora]].concat(), 2, "two adapters are called `lora`");
    refused(&[&eval[..], &["--adapter", &lora, "--adapter", &format!("{files}/tt-lora")]].concat(), 2, "NAME=DIR");
    refused(&["generate", "--model", &model, "--prompt", "w1", "--disable-adapters"], 2, "need at least one --adapter");
    let out = out_dir.to_str().unwrap();
    let combine_args =
        ["combine", "--model", &model, "--adapter", &lora, "--adapter", &tt, "--output", out, "--overwrite"];
    refused(&[&combine_args[..], &["--weights", "0.5"]].concat(), 2, "1 weights for 2 adapters");
    refused(
        &[&combine_args[..], &["--weights", "1,1", "--combination", "svd"]].concat(),
        2,
        "unknown combination `svd`",
    );
    refused(&[&combine_args[..], &["--weights", "1,1", "--combination", "linear"]].concat(), 1, "`tt` is tt-lora");
    let adp = format!("adp={files}/loretta-adp");
    let args = [
        "combine",
        "--model",
        &model,
        "--adapter",
        &lora,
        "--adapter",
        &adp,
        "--weights",
        "1,1",
        "--output",
        out,
        "--overwrite",
    ];
    refused(&args, 1, "nonlinear");
    let args =
        ["combine", "--model", "llama2-7b", "--adapter", &lora, "--weights", "1", "--output", out, "--overwrite"];
    refused(&args, 1, "trained on a base model");
    assert!(close(loss(&["--adapter", &combined]), mixed), "a refused combine leaves the output as it was");
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn finetune_and_eval_take_dpo_pairs() {
    let dir = scratch("dpo");
    std::fs::create_dir_all(&dir).unwrap();
    // Pairs from the copy task: the row's completion is chosen, the next row's rejected.
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(fixture("lm-copy-train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let pairs: String = (0..rows.len())
        .map(|i| {
            let rejected = &rows[(i + 1) % rows.len()]["completion"];
            let row =
                serde_json::json!({"prompt": rows[i]["prompt"], "better": rows[i]["completion"], "rejected": rejected});
            format!("{row}\n")
        })
        .collect();
    let data = dir.join("pairs.jsonl");
    std::fs::write(&data, pairs).unwrap();
    let data = data.to_str().unwrap();
    let out_dir = dir.join("out");
    let mut args =
        lm_finetune_args(&out_dir, &["--task", "dpo", "--train", data, "--epochs", "1", "--dpo-beta", "0.5"]);
    args.retain(|a| a != "--valid");
    args.retain(|a| !a.ends_with("lm-copy-valid.jsonl"));
    // The chosen key is mapped; without the mapping the row is refused naming file, line and field.
    let refused = run_args(&args);
    let err = String::from_utf8_lossy(&refused.stderr).to_string();
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("pairs.jsonl:1:") && err.contains("missing field `chosen`"), "{err}");
    args.extend(["--chosen-field".to_string(), "better".to_string()]);
    let out = run_args(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("rewards/accuracies=") && stdout.contains("best valid loss"), "{stdout}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["tensor_peft"]["task"]["dpo_beta"], 0.5, "{config}");
    // eval reads the mapped file only with default keys: write one.
    let plain = dir.join("plain.jsonl");
    std::fs::write(&plain, std::fs::read_to_string(data).unwrap().replace("\"better\"", "\"chosen\"")).unwrap();
    let text = eval_output(&fixture("tiny-llama-words"), &out_dir, "dpo", plain.to_str().unwrap());
    assert!(metric(&text, "loss").is_finite() && (0.0..=1.0).contains(&metric(&text, "rewards/accuracies")), "{text}");
    let predictions = dir.join("p.jsonl");
    let adapter = out_dir.to_str().unwrap();
    let refused = tpeft(&[
        "eval",
        "--model",
        &fixture("tiny-llama-words"),
        "--adapter",
        adapter,
        "--task",
        "dpo",
        "--data",
        plain.to_str().unwrap(),
        "--predictions",
        predictions.to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("dpo has no single predicted value"));
}

/// `--gradient-checkpointing` (flag or `--config` key) trains to the same losses as a plain run,
/// `plan` shrinks its activation estimate with it, and what it cannot do is refused (exit 2,
/// nothing written): adapters with dropout, and `bench` without the train-step suite.
#[test]
fn gradient_checkpointing_trains_the_same_plans_less_and_refuses_dropout() {
    let best = |out: &Output| -> String {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout.lines().find(|l| l.starts_with("best valid loss:")).unwrap_or_else(|| panic!("{stdout}")).to_string()
    };
    let (plain_dir, checkpointed_dir) = (scratch("gc-plain"), scratch("gc-checkpointed"));
    let plain = run_args(&lm_finetune_args(&plain_dir, &[]));
    let checkpointed = run_args(&lm_finetune_args(&checkpointed_dir, &["--gradient-checkpointing"]));
    assert_eq!(best(&plain), best(&checkpointed));
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpointed_dir.join("train_config.json")).unwrap()).unwrap();
    assert_eq!(saved["gradient_checkpointing"], true);

    // LoRETTA_rep's dropout (0.05 by default) is refused, from a --config file too.
    let dir = scratch("gc-dropout");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(&config, "gradient_checkpointing = true\nmethod = \"loretta-rep\"\n").unwrap();
    let output = dir.join("out");
    let mut args = lm_finetune_args(&output, &["--method", "loretta-rep"]);
    args.extend(["--config".to_string(), config.to_str().unwrap().to_string()]);
    let refused = run_args(&args);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("gradient-checkpointing") && stderr.contains("adapter dropout 0.05"), "{stderr}");
    assert!(stderr.contains("--dropout 0"), "{stderr}");
    assert!(!output.exists(), "nothing is written");
    // `--dropout 0` (PEFT's lora_dropout) lets it checkpoint; the value is recorded in the adapter.
    let rep_dir = scratch("gc-rep-no-dropout");
    let rep = run_args(&lm_finetune_args(
        &rep_dir,
        &["--method", "loretta-rep", "--dropout", "0", "--gradient-checkpointing"],
    ));
    assert!(rep.status.success(), "{}", String::from_utf8_lossy(&rep.stderr));
    // The run starts by naming every setting of the method, its defaults included.
    let stdout = String::from_utf8_lossy(&rep.stdout);
    let start = stdout.lines().find(|l| l.starts_with("fine-tuning ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(start.contains("with loretta-rep (alpha 4.0, dropout 0.0, init Zero, rank 2, tensor_rank 5): "), "{start}");
    let adapter: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rep_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(adapter["tensor_peft"]["method"]["dropout"], 0.0, "{adapter}");
    // A dropout outside [0, 1), or on a method without one, is a usage error.
    for (extra, expected) in [
        (&["--method", "lora", "--dropout", "1.5"][..], "[0, 1)"),
        (&["--method", "lotr", "--dropout", "0.1"], "--dropout"),
    ] {
        let bad_dir = scratch("gc-bad-dropout");
        let out = run_args(&lm_finetune_args(&bad_dir, extra));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!bad_dir.exists(), "nothing is written");
    }

    // The plan: block inputs and one block's activations instead of every block's.
    let peak = |extra: &[&str]| -> (u64, String) {
        let mut args =
            vec!["plan", "--model", "llama2-7b", "--base-dtype", "q8_0", "--batch-size", "1", "--max-len", "512"];
        args.extend(extra);
        let out = tpeft(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let last = stdout.lines().last().unwrap();
        (last.strip_prefix("estimated peak memory: ").unwrap().strip_suffix(" MiB").unwrap().parse().unwrap(), stdout)
    };
    let ((plain, _), (less, text)) = (peak(&[]), peak(&["--gradient-checkpointing"]));
    assert!(text.contains("gradient checkpointing") && text.contains("block inputs + one block"), "{text}");
    assert!(less < plain, "{less} vs {plain}");

    let bench = tpeft(&["bench", "--suite", "linear", "--gradient-checkpointing"]);
    assert_eq!(bench.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bench.stderr).contains("train-step"));
}

/// `tpeft --backend wgpu` (`--features wgpu`; CI runs it on lavapipe, Mesa's software Vulkan).
/// `--devices cpu,cpu` trains data-parallel (two workers on the CPU backend's one device, each
/// taking half of every global batch): the same validation losses as one device, printed to the
/// 4 decimals of the report. Device lists that cannot work are refused before anything is loaded.
#[test]
fn finetune_trains_data_parallel_over_devices_and_refuses_bad_device_lists() {
    let best = |out: &Output| -> String {
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        stdout.lines().find(|l| l.starts_with("best valid loss:")).unwrap_or_else(|| panic!("{stdout}")).to_string()
    };
    let (one_dir, two_dir) = (scratch("dp-one"), scratch("dp-two"));
    let one = run_args(&lm_finetune_args(&one_dir, &["--method", "lotr"]));
    let mut args = vec!["--devices".to_string(), "cpu,cpu".to_string()];
    args.extend(lm_finetune_args(&two_dir, &["--method", "lotr"]));
    let two = run_args(&args);
    assert_eq!(best(&one), best(&two));

    let refused = |args: &[&str], expected: &[&str]| {
        let out = tpeft(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(expected.iter().all(|e| stderr.contains(e)), "{args:?}: {stderr}");
    };
    refused(&["--devices", "cuda:0", "params", "--model", "llama2-7b"], &["`cuda:0`", "flex", "`cpu`"]);
    refused(&["--devices", "gpu", "params", "--model", "llama2-7b"], &["`gpu`"]);
    let (model, adapter, data) =
        (fixture("tiny-llama-words"), fixture("adapter-files/lora"), fixture("lm-copy-valid.jsonl"));
    let eval = ["eval", "--model", &model, "--adapter", &adapter, "--task", "causal-lm", "--data", &data];
    let mut two_devices = vec!["--devices", "cpu,cpu"];
    two_devices.extend(eval);
    refused(&two_devices, &["only finetune and compare"]);
    // lm_finetune_args trains with batches of 4: not over 3 devices.
    let output = scratch("dp-three");
    let mut args = vec!["--devices".to_string(), "cpu,cpu,cpu".to_string()];
    args.extend(lm_finetune_args(&output, &[]));
    let out = run_args(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--batch-size 4") && stderr.contains("3 --devices"), "{stderr}");
    assert!(!output.join("train_config.json").exists(), "nothing is written");
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;

    /// `(split, step, loss)` of every row of a run's `metrics.csv`.
    type Losses = Vec<(String, usize, f64)>;

    /// The [`Losses`] of a run's `metrics.csv`.
    fn losses(dir: &std::path::Path) -> Losses {
        let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let loss = header.iter().position(|h| *h == "loss").unwrap();
        csv.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[1].to_string(), f[2].parse().unwrap(), f[loss].parse().unwrap())
            })
            .collect()
    }

    /// Without a Vulkan device (the loader pointed at no driver) a wgpu command ends with one line
    /// that names the backend and what to install, exit code 1: no panic trace, no hang.
    #[test]
    fn no_vulkan_device_is_one_clear_line() {
        let out = Command::new(env!("CARGO_BIN_EXE_tpeft"))
            .args(["--backend", "wgpu", "eval", "--model", &fixture("tiny-llama-words")])
            .args(["--adapter", &fixture("adapter-files/lora"), "--task", "causal-lm"])
            .args(["--data", &fixture("lm-copy-valid.jsonl")])
            .env("VK_ICD_FILENAMES", "/nonexistent/no-driver.json")
            .env("VK_DRIVER_FILES", "/nonexistent/no-driver.json")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("error: no wgpu device could be started for wgpu:default"), "{stderr}");
        assert!(lines[0].contains("mesa-vulkan-drivers") && lines[0].contains("--backend flex"), "{stderr}");
    }

    /// Data parallel over two wgpu devices (`wgpu:cpu` and `wgpu:default`: two CubeCL devices on
    /// lavapipe), the second holding a replica of the model that receives the trained values and
    /// returns gradients through host memory each step: the same losses as one wgpu device within
    /// 1e-5 relative and the same adapter within 1e-5 of each tensor's largest value (measured
    /// 6e-7). A device that does not exist is one line naming it, exit code 1.
    #[test]
    fn wgpu_trains_data_parallel_over_two_devices_and_names_a_missing_one() {
        let extra = ["--method", "lotr", "--epochs", "1", "--batch-size", "8", "--eval-before-training"];
        let (one_dir, two_dir) = (scratch("wgpu-dp-one"), scratch("wgpu-dp-two"));
        let mut one = vec!["--backend".to_string(), "wgpu".to_string()];
        one.extend(lm_finetune_args(&one_dir, &extra));
        let mut two = ["--backend", "wgpu", "--devices", "wgpu:cpu,wgpu:default"]
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>();
        two.extend(lm_finetune_args(&two_dir, &extra));
        for args in [&one, &two] {
            let out = run_args(args);
            assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let (a, b) = (losses(&one_dir), losses(&two_dir));
        assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
        for ((split, step, x), (split_b, step_b, y)) in a.iter().zip(&b) {
            assert_eq!((split, step), (split_b, step_b));
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{split} loss at step {step}: one device {x}, two {y}");
        }
        let tensors = |dir: &std::path::Path| {
            tensor_peft_training::checkpoint::read_safetensors(&dir.join("adapter_model.safetensors")).unwrap()
        };
        let (x, y) = (tensors(&one_dir), tensors(&two_dir));
        assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
        for ((name, (_, p)), (_, (_, q))) in x.iter().zip(&y) {
            let scale = p.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = p.iter().zip(q).fold(0.0f32, |m, (u, v)| m.max((u - v).abs()));
            assert!(diff <= 1e-5 * scale, "{name}: two devices differ by {diff}");
        }

        let out = tpeft(&[
            "--backend",
            "wgpu",
            "--devices",
            "wgpu:7",
            "eval",
            "--model",
            &fixture("tiny-llama-words"),
            "--adapter",
            &fixture("adapter-files/lora"),
            "--task",
            "causal-lm",
            "--data",
            &fixture("lm-copy-valid.jsonl"),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("XDG_RUNTIME_DIR")).collect();
        assert_eq!(lines.len(), 1, "{stderr}");
        assert!(lines[0].starts_with("error: no wgpu device could be started for wgpu:7"), "{stderr}");
        assert!(lines[0].contains("vulkaninfo --summary"), "{stderr}");
    }

    /// A tensor larger than the device can hold (a 24,576² weight: 2.4 GB, over lavapipe's 2 GiB
    /// buffer limit) ends with one line naming the device and what to try, exit code 1.
    #[test]
    fn a_device_out_of_memory_is_one_line_with_what_to_try() {
        let out = tpeft(&["--backend", "wgpu", "bench", "--suite", "linear", "--dims", "24576", "--tokens", "24576"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        let errors: Vec<&str> =
            stderr.lines().filter(|l| l.starts_with("error:") && !l.contains("XDG_RUNTIME_DIR")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].starts_with("error: the wgpu device wgpu:default ran out of memory ("), "{stderr}");
        assert!(errors[0].contains("--batch-size") && errors[0].contains("tpeft plan"), "{stderr}");
        assert!(!stderr.contains("internal failure") && !stderr.contains("panicked"), "{stderr}");
    }

    /// Runs `tpeft --backend flex` and `--backend wgpu` with the arguments `args(output)`, and
    /// requires the same rows in both `metrics.csv` with losses within 1e-4 relative.
    fn train_on_flex_and_wgpu(
        name: &str,
        args: impl Fn(&std::path::Path) -> Vec<String>,
    ) -> Vec<(std::path::PathBuf, Losses)> {
        let mut runs = Vec::new();
        for backend in ["flex", "wgpu"] {
            let dir = scratch(&format!("wgpu-parity-{name}-{backend}"));
            let mut all = vec!["--backend".to_string(), backend.to_string()];
            all.extend(args(&dir));
            let started = std::time::Instant::now();
            let out = run_args(&all);
            assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
            eprintln!("{name} on {backend}: fine-tune took {:.1} s", started.elapsed().as_secs_f64());
            let losses = losses(&dir);
            runs.push((dir, losses));
        }
        let (flex, wgpu) = (&runs[0].1, &runs[1].1);
        assert_eq!(flex.len(), wgpu.len(), "{flex:?} vs {wgpu:?}");
        let worst = flex.iter().zip(wgpu).map(|(a, b)| (a.2 - b.2).abs() / a.2.abs()).fold(0.0, f64::max);
        eprintln!("{name}: largest relative loss difference, wgpu vs flex: {worst:.1e}");
        for ((split, step, a), (split_w, step_w, b)) in flex.iter().zip(wgpu) {
            assert_eq!((split, step), (split_w, step_w));
            assert!((a - b).abs() <= 1e-4 * a.abs(), "{name}: {split} loss at step {step}: flex {a}, wgpu {b}");
        }
        runs
    }

    /// A classifier with a fresh head on the tiny DeBERTa-v3 (TT-LoRA, official init), its
    /// validation set a seeded 25 % split of the training file: the same split, head, adapter and
    /// losses on wgpu as on flex, and the adapter (with its head) written on wgpu evaluates on
    /// flex to wgpu's loss and accuracy.
    #[test]
    fn classification_on_wgpu_splits_initialises_and_trains_as_on_flex() {
        let model = fixture("tiny-deberta/v3");
        let train = fixture("lm-sentiment-train.jsonl");
        let runs = train_on_flex_and_wgpu("deberta", |dir| {
            [
                "finetune",
                "--model",
                &model,
                "--task",
                "classification",
                "--train",
                &train,
                "--valid-percent",
                "25",
                "--method",
                "tt-lora",
                "--init",
                "paper",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--lr",
                "0.01",
                "--max-len",
                "16",
                "--seed",
                "5",
                "--eval-before-training",
                "--output",
                dir.to_str().unwrap(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        });
        let adapter = runs[1].0.join("last");
        let metrics = |backend: &str| {
            let adapter = adapter.to_str().unwrap();
            let out = tpeft(&[
                "--backend",
                backend,
                "eval",
                "--model",
                &model,
                "--adapter",
                adapter,
                "--task",
                "classification",
                "--data",
                &train,
            ]);
            assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            (metric(&text, "loss"), metric(&text, "accuracy"))
        };
        let ((loss_f, acc_f), (loss_w, acc_w)) = (metrics("flex"), metrics("wgpu"));
        // `eval` prints 4 decimals: allow one unit of the last one.
        assert!((loss_f - loss_w).abs() <= 1e-4 && acc_f == acc_w, "flex {loss_f} {acc_f}, wgpu {loss_w} {acc_w}");
        for (dir, _) in runs {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    /// The same seed trains the same adapter on wgpu as on flex: LoRETTA_rep with the official
    /// (non-zero) initialisation and its default input dropout (0.05), so the initial adapter, the
    /// shuffle and the dropout masks all come from the seed. Every loss (validation before
    /// training, every 4 steps, and the epoch's training mean) agrees within 1e-4 relative: the
    /// backends compute in f32 with sums in other orders, and 12 Adam steps carry those 1e-7
    /// differences along. The adapter written on wgpu evaluates to the same loss on flex and on
    /// wgpu (adapter files are backend-portable), and to the loss the run recorded (to the 4
    /// decimals `eval` prints).
    #[test]
    fn finetune_on_wgpu_trains_what_flex_trains_and_its_adapter_evaluates_on_flex() {
        let extra = [
            "--method",
            "loretta-rep",
            "--init",
            "paper",
            "--epochs",
            "1",
            "--eval-every-steps",
            "4",
            "--eval-before-training",
        ];
        let runs = train_on_flex_and_wgpu("lm", |dir| lm_finetune_args(dir, &extra));
        let (flex, wgpu) = (&runs[0].1, &runs[1].1);
        assert!(flex.len() >= 5 && flex[0].1 == 0, "validation before training, every 4 steps, the epoch: {flex:?}");
        let model = fixture("tiny-llama-words");
        let valid = fixture("lm-copy-valid.jsonl");
        let adapter = runs[1].0.join("last").to_str().unwrap().to_string();
        let eval = |backend: &str| {
            let out = tpeft(&[
                "--backend",
                backend,
                "eval",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--task",
                "causal-lm",
                "--data",
                &valid,
            ]);
            assert!(out.status.success(), "{backend}: {}", String::from_utf8_lossy(&out.stderr));
            metric(&String::from_utf8_lossy(&out.stdout), "loss")
        };
        let (on_flex, on_wgpu) = (eval("flex"), eval("wgpu"));
        // `eval` prints 4 decimals: allow one unit of the last one.
        assert!((on_flex - on_wgpu).abs() <= 1e-4, "eval on flex {on_flex}, on wgpu {on_wgpu}");
        let last_valid = wgpu.iter().rev().find(|(split, _, _)| split == "valid").unwrap().2;
        assert!((on_flex - last_valid).abs() <= 1e-4, "eval {on_flex}, recorded {last_valid}");
        for (dir, _) in runs {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}

/// A run records its compute dtype in train_config.json and `--resume` continues at it: a bf16 run
/// resumed for a second epoch without the flag ends with the adapter of one resumed with
/// `--compute-dtype bf16`, bit for bit, and not with that of one resumed with `--compute-dtype
/// f32` (which is then recorded). A train_config.json written before the key existed resumes at
/// f32.
#[test]
fn resume_continues_at_the_recorded_compute_dtype() {
    let dir = scratch("resume-compute-dtype");
    let adapter = |run: &std::path::Path| std::fs::read(run.join("last/adapter_model.safetensors")).unwrap();
    let resumed = |name: &str, flag: &[&str], drop_key: bool| {
        let run = dir.join(name);
        let out = run_args(&lm_finetune_args(&run, &["--epochs", "1", "--compute-dtype", "bf16"]));
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let path = run.join("train_config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["compute_dtype"].as_str(), Some("bf16"), "{json}");
        if drop_key {
            json.as_object_mut().unwrap().remove("compute_dtype");
            std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
        }
        let mut args = vec!["finetune", "--resume", run.to_str().unwrap(), "--epochs", "2"];
        args.extend(flag);
        let out = tpeft(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        run
    };
    let kept = adapter(&resumed("kept", &[], false));
    let bf16 = adapter(&resumed("bf16", &["--compute-dtype", "bf16"], false));
    let f32_run = resumed("f32", &["--compute-dtype", "f32"], false);
    let config = std::fs::read_to_string(f32_run.join("train_config.json")).unwrap();
    assert!(config.contains("\"compute_dtype\": \"f32\""), "{config}");
    let f32 = adapter(&f32_run);
    assert!(kept == bf16, "resumed without the flag, the run did not continue at its recorded bf16");
    assert!(kept != f32, "the second epoch at f32 gave the bf16 adapter: the flag changed nothing");
    // Without the key (an older run): f32, the only precision there was.
    assert!(adapter(&resumed("old", &[], true)) == f32, "a run without the key did not resume at f32");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `--compute-dtype`: an unknown name, and `bf16` off the flex backend, are usage errors (exit 2),
/// also from a `finetune --config` file; the train-step bench records the dtype it ran at.
#[test]
fn compute_dtype_is_checked_and_recorded() {
    let dir = scratch("compute-dtype");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("run.toml");
    std::fs::write(&config, "compute_dtype = \"fp8\"\n").unwrap();
    let cases: [(&[&str], &str); 3] = [
        (&["bench", "--suite", "linear", "--compute-dtype", "fp8"], "--compute-dtype: unknown compute dtype \"fp8\""),
        (&["--backend", "ndarray", "bench", "--suite", "linear", "--compute-dtype", "bf16"], "flex backend only"),
        (&["finetune", "--config", config.to_str().unwrap()], "unknown compute dtype \"fp8\""),
    ];
    for (args, expected) in cases {
        let out = tpeft(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expected), "{args:?}: {err}");
        assert!(!err.contains("panicked") && out.stdout.is_empty(), "{args:?}");
    }
    let model = fixture("tiny-llama");
    for dtype in ["f32", "bf16"] {
        let json = dir.join(format!("{dtype}.json"));
        let out = tpeft(&[
            "bench",
            "--suite",
            "train-step",
            "--model",
            &model,
            "--train-shape",
            "2x8",
            "--repeats",
            "1",
            "--compute-dtype",
            dtype,
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let records: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        for r in records.as_array().unwrap() {
            assert_eq!(r["compute_dtype"].as_str(), Some(dtype), "{r}");
            assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

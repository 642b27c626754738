//! Task metrics, computed over a whole split (F1, Matthews correlation and the rank correlations
//! are not averages of per-batch values), and their burn-train dashboard wrappers.

use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry, SerializedEntry,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Host-side results of one batch: what every metric needs, no tensors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// Mean loss over the batch's units.
    pub loss: f64,
    /// Loss units: examples, or supervised tokens for causal LM.
    pub units: usize,
    /// Predicted class per example (classification tasks).
    pub predicted: Vec<usize>,
    /// True class per example.
    pub labels: Vec<usize>,
    /// Predicted score per example (regression).
    pub predicted_scores: Vec<f32>,
    /// True score per example.
    pub scores: Vec<f32>,
    /// Non-padding input tokens processed.
    pub tokens: usize,
    /// Multiple-choice examples scored (`lm-multiple-choice` evaluation).
    pub choices: Vec<ChoiceOutcome>,
    /// Generations scored against their gold answers (`lm-generation` evaluation).
    pub generations: Vec<GenerationOutcome>,
    /// DPO: each pair's rewards and log-probabilities.
    pub pairs: Vec<PairOutcome>,
}

/// What DPO measured on one preference pair (TRL's `DPOTrainer` logs the same quantities).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PairOutcome {
    /// The implicit reward of the chosen response, `β·(log π(chosen) − log π_ref(chosen))`.
    pub reward_chosen: f64,
    /// The implicit reward of the rejected response.
    pub reward_rejected: f64,
    /// `log π(chosen | prompt)` under the trained model, summed over the response tokens.
    pub logp_chosen: f64,
    /// `log π(rejected | prompt)` under the trained model.
    pub logp_rejected: f64,
}

/// One multiple-choice example scored by the log-likelihood of each choice after the prompt: the
/// gold index and the choice each normalisation picks (ties go to the first).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceOutcome {
    /// 0-based index of the correct choice.
    pub label: usize,
    /// Highest sum of the choice tokens' log-probabilities (lm-eval-harness's `acc`).
    pub by_sum: usize,
    /// Highest sum per character of the choice (lm-eval-harness's `acc_norm`).
    pub by_chars: usize,
    /// Highest mean log-probability per choice token (MeZO's and LoRETTA's default scoring).
    pub by_tokens: usize,
    /// Each choice's summed token log-probabilities.
    pub log_likelihoods: Vec<f64>,
}

impl ChoiceOutcome {
    /// The outcome of choices whose summed log-probabilities are `sums`, `chars` characters and
    /// `tokens` tokens long.
    pub fn from_scores(label: usize, sums: &[f64], chars: &[usize], tokens: &[usize]) -> Self {
        let best = |score: &dyn Fn(usize) -> f64| {
            (0..sums.len()).fold(0, |best, i| if score(i) > score(best) { i } else { best })
        };
        Self {
            label,
            by_sum: best(&|i| sums[i]),
            by_chars: best(&|i| sums[i] / chars[i].max(1) as f64),
            by_tokens: best(&|i| sums[i] / tokens[i].max(1) as f64),
            log_likelihoods: sums.to_vec(),
        }
    }
}

/// One generation and its SQuAD scores against the best-matching gold answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationOutcome {
    /// The decoded text (up to the first newline, trimmed).
    pub text: String,
    /// 1 when it equals a gold answer after [`normalize_answer`], else 0.
    pub exact_match: f64,
    /// The best [`token_f1`] over the gold answers.
    pub f1: f64,
}

impl GenerationOutcome {
    /// Scores `text` against `answers` (the maximum over them, as the SQuAD script does).
    pub fn score(text: String, answers: &[String]) -> Self {
        let exact_match = answers.iter().map(|a| exact_match(&text, a)).fold(0.0, f64::max);
        let f1 = answers.iter().map(|a| token_f1(&text, a)).fold(0.0, f64::max);
        Self { text, exact_match, f1 }
    }
}

/// SQuAD's answer normalisation: lower case, ASCII punctuation removed, the articles `a`, `an`,
/// `the` removed as words, whitespace collapsed to single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower: String = s.to_lowercase().chars().filter(|c| !c.is_ascii_punctuation()).collect();
    // Python's `re.sub(r"\b(a|an|the)\b", " ", text)`: articles as whole runs of word characters.
    let mut out = String::with_capacity(lower.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        if matches!(word.as_str(), "a" | "an" | "the") {
            out.push(' ');
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in lower.chars() {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// 1 when `prediction` and `gold` are equal after [`normalize_answer`], else 0.
pub fn exact_match(prediction: &str, gold: &str) -> f64 {
    f64::from(u8::from(normalize_answer(prediction) == normalize_answer(gold)))
}

/// SQuAD's token F1: the harmonic mean of precision and recall of the normalised words shared
/// (as multisets) by `prediction` and `gold`; 0 when they share none (also when both are empty).
pub fn token_f1(prediction: &str, gold: &str) -> f64 {
    let (p, g) = (normalize_answer(prediction), normalize_answer(gold));
    let (p, g): (Vec<&str>, Vec<&str>) = (p.split_whitespace().collect(), g.split_whitespace().collect());
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for w in &g {
        *counts.entry(w).or_insert(0) += 1;
    }
    let mut same = 0usize;
    for w in &p {
        if let Some(c) = counts.get_mut(w)
            && *c > 0
        {
            *c -= 1;
            same += 1;
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / p.len() as f64;
    let recall = same as f64 / g.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Accumulates [`StepStats`] over an epoch or a whole evaluation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Accumulator {
    loss_sum: f64,
    units: usize,
    predicted: Vec<usize>,
    labels: Vec<usize>,
    predicted_scores: Vec<f32>,
    scores: Vec<f32>,
    /// Tokens seen.
    pub tokens: usize,
    #[serde(default)]
    choices: Vec<ChoiceOutcome>,
    #[serde(default)]
    generations: Vec<GenerationOutcome>,
    /// DPO pairs seen (absent in checkpoints written before DPO existed).
    #[serde(default)]
    pairs: Vec<PairOutcome>,
}

impl Accumulator {
    /// Adds one batch.
    pub fn add(&mut self, s: &StepStats) {
        self.loss_sum += s.loss * s.units as f64;
        self.units += s.units;
        self.predicted.extend_from_slice(&s.predicted);
        self.labels.extend_from_slice(&s.labels);
        self.predicted_scores.extend_from_slice(&s.predicted_scores);
        self.scores.extend_from_slice(&s.scores);
        self.tokens += s.tokens;
        self.choices.extend_from_slice(&s.choices);
        self.generations.extend_from_slice(&s.generations);
        self.pairs.extend_from_slice(&s.pairs);
    }

    /// Multiple-choice outcomes per example, in the order added.
    pub fn choices(&self) -> &[ChoiceOutcome] {
        &self.choices
    }

    /// DPO pairs, in the order added.
    pub fn pairs(&self) -> &[PairOutcome] {
        &self.pairs
    }

    /// Generation outcomes per example, in the order added.
    pub fn generations(&self) -> &[GenerationOutcome] {
        &self.generations
    }

    /// Predicted class per example, in the order added.
    pub fn predicted(&self) -> &[usize] {
        &self.predicted
    }

    /// True class per example, in the order added.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Predicted score per example (regression), in the order added.
    pub fn predicted_scores(&self) -> &[f32] {
        &self.predicted_scores
    }

    /// True score per example (regression), in the order added.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }

    /// Mean loss per unit.
    pub fn loss(&self) -> f64 {
        if self.units == 0 { f64::NAN } else { self.loss_sum / self.units as f64 }
    }

    /// Every metric that applies to what was accumulated (`loss`, and `accuracy`, `f1`, `mcc` for
    /// labels, `pearson`, `spearman` for scores, `perplexity` for LM losses when `lm`,
    /// `accuracy`, `accuracy_norm`, `accuracy_per_token` for multiple choice, `exact_match`, `f1`
    /// for generations).
    pub fn metrics(&self, n_classes: usize, lm: bool) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        out.insert("loss".into(), self.loss());
        if lm {
            out.insert("perplexity".into(), self.loss().exp());
        }
        if !self.labels.is_empty() {
            out.insert("accuracy".into(), accuracy(&self.predicted, &self.labels));
            out.insert("f1".into(), f1(&self.predicted, &self.labels, n_classes));
            out.insert("mcc".into(), matthews(&self.predicted, &self.labels, n_classes));
        }
        if !self.scores.is_empty() {
            out.insert("pearson".into(), pearson(&self.predicted_scores, &self.scores));
            out.insert("spearman".into(), spearman(&self.predicted_scores, &self.scores));
        }
        if !self.choices.is_empty() {
            let n = self.choices.len() as f64;
            let rate = |pick: fn(&ChoiceOutcome) -> usize| {
                self.choices.iter().filter(|c| pick(c) == c.label).count() as f64 / n
            };
            out.insert("accuracy".into(), rate(|c| c.by_sum));
            out.insert("accuracy_norm".into(), rate(|c| c.by_chars));
            out.insert("accuracy_per_token".into(), rate(|c| c.by_tokens));
        }
        if !self.generations.is_empty() {
            let n = self.generations.len() as f64;
            out.insert("exact_match".into(), self.generations.iter().map(|g| g.exact_match).sum::<f64>() / n);
            out.insert("f1".into(), self.generations.iter().map(|g| g.f1).sum::<f64>() / n);
        }
        out.extend(preference_metrics(&self.pairs));
        out
    }
}

/// The DPO metrics of `pairs`, named and computed as TRL's `DPOTrainer` logs them (means over the
/// pairs): `rewards/chosen`, `rewards/rejected`, `rewards/accuracies` (the fraction of pairs whose
/// chosen reward is strictly larger), `rewards/margins` (chosen − rejected reward),
/// `logps/chosen`, `logps/rejected`. Empty when there are no pairs.
pub fn preference_metrics(pairs: &[PairOutcome]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    if pairs.is_empty() {
        return out;
    }
    let mean = |f: &dyn Fn(&PairOutcome) -> f64| pairs.iter().map(f).sum::<f64>() / pairs.len() as f64;
    out.insert("rewards/chosen".into(), mean(&|p| p.reward_chosen));
    out.insert("rewards/rejected".into(), mean(&|p| p.reward_rejected));
    out.insert("rewards/accuracies".into(), mean(&|p| f64::from(u8::from(p.reward_chosen > p.reward_rejected))));
    out.insert("rewards/margins".into(), mean(&|p| p.reward_chosen - p.reward_rejected));
    out.insert("logps/chosen".into(), mean(&|p| p.logp_chosen));
    out.insert("logps/rejected".into(), mean(&|p| p.logp_rejected));
    out
}

/// Fraction of `predicted` equal to `labels`.
pub fn accuracy(predicted: &[usize], labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return f64::NAN;
    }
    predicted.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

/// `confusion[true][predicted]` counts.
pub fn confusion(predicted: &[usize], labels: &[usize], n_classes: usize) -> Vec<Vec<u64>> {
    let n = n_classes.max(predicted.iter().chain(labels).map(|&c| c + 1).max().unwrap_or(0));
    let mut m = vec![vec![0u64; n]; n];
    for (&p, &l) in predicted.iter().zip(labels) {
        m[l][p] += 1;
    }
    m
}

/// F1 of class 1 for two classes (the GLUE convention), macro-averaged F1 for more.
pub fn f1(predicted: &[usize], labels: &[usize], n_classes: usize) -> f64 {
    let m = confusion(predicted, labels, n_classes);
    let class_f1 = |c: usize| {
        let tp = m[c][c] as f64;
        let fp: f64 = (0..m.len()).filter(|&t| t != c).map(|t| m[t][c] as f64).sum();
        let fn_: f64 = (0..m.len()).filter(|&p| p != c).map(|p| m[c][p] as f64).sum();
        if tp == 0.0 { 0.0 } else { 2.0 * tp / (2.0 * tp + fp + fn_) }
    };
    if m.len() <= 2 {
        class_f1(1.min(m.len().saturating_sub(1)))
    } else {
        (0..m.len()).map(class_f1).sum::<f64>() / m.len() as f64
    }
}

/// Matthews correlation coefficient (Gorodkin's multi-class form; the usual MCC for two classes).
/// 0 when it is undefined (a constant prediction or a single true class).
pub fn matthews(predicted: &[usize], labels: &[usize], n_classes: usize) -> f64 {
    let m = confusion(predicted, labels, n_classes);
    let k = m.len();
    let s: f64 = labels.len() as f64;
    let c: f64 = (0..k).map(|i| m[i][i] as f64).sum();
    let t: Vec<f64> = (0..k).map(|i| m[i].iter().sum::<u64>() as f64).collect();
    let p: Vec<f64> = (0..k).map(|j| (0..k).map(|i| m[i][j]).sum::<u64>() as f64).collect();
    let tp: f64 = t.iter().zip(&p).map(|(a, b)| a * b).sum();
    let num = c * s - tp;
    let den = ((s * s - p.iter().map(|x| x * x).sum::<f64>()) * (s * s - t.iter().map(|x| x * x).sum::<f64>())).sqrt();
    if den == 0.0 { 0.0 } else { num / den }
}

/// Pearson correlation of `x` and `y` (NaN when either is constant).
pub fn pearson(x: &[f32], y: &[f32]) -> f64 {
    let n = x.len().min(y.len()) as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let mx = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let my = y.iter().map(|&v| v as f64).sum::<f64>() / n;
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (dx, dy) = (a as f64 - mx, b as f64 - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    sxy / (sxx * syy).sqrt()
}

/// Ranks starting at 1, ties get their average rank (as scipy's `rankdata`).
pub fn ranks(x: &[f32]) -> Vec<f32> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut r = vec![0.0f32; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f32 / 2.0 + 1.0;
        for &o in &order[i..=j] {
            r[o] = rank;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson of the tie-averaged ranks).
pub fn spearman(x: &[f32], y: &[f32]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// Whether larger values of `metric` are better.
pub fn higher_is_better(metric: &str) -> bool {
    !matches!(metric, "loss" | "perplexity")
}

/// One row of the metrics history (`metrics.csv` / `metrics.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: usize,
    /// `train` or `valid` (or `test`).
    pub split: String,
    /// Optimizer steps done at the end of this record.
    pub step: usize,
    /// Metric name → value.
    pub metrics: BTreeMap<String, f64>,
}

/// The dashboard metrics: running values over the current epoch, computed like [`Accumulator`].
#[derive(Clone)]
pub struct DashboardMetric {
    name: MetricName,
    key: &'static str,
    n_classes: usize,
    lm: bool,
    acc: Accumulator,
    state: NumericMetricState,
    started: Option<std::time::Instant>,
}

impl DashboardMetric {
    /// The metric `key` (`loss`, `accuracy`, `f1`, `mcc`, `pearson`, `spearman`, `perplexity`,
    /// `tokens/s`), shown under `label`.
    pub fn new(key: &'static str, label: &str, n_classes: usize, lm: bool) -> Self {
        Self {
            name: MetricName::new(label.to_string()),
            key,
            n_classes,
            lm,
            acc: Accumulator::default(),
            state: NumericMetricState::default(),
            started: None,
        }
    }
}

impl Metric for DashboardMetric {
    type Input = StepStats;

    fn name(&self) -> MetricName {
        self.name.clone()
    }

    fn update(&mut self, item: &StepStats, _metadata: &MetricMetadata) -> SerializedEntry {
        self.acc.add(item);
        let value = if self.key == "tokens/s" {
            let started = *self.started.get_or_insert_with(std::time::Instant::now);
            self.acc.tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)
        } else {
            self.acc.metrics(self.n_classes, self.lm).get(self.key).copied().unwrap_or(f64::NAN)
        };
        // The state's running mean is not used for display: report the exact epoch value.
        self.state.reset();
        let precision = if self.key == "tokens/s" { 0 } else { 4 };
        self.state.update(value, 1, FormatOptions::new(self.name()).precision(precision))
    }

    fn clear(&mut self) {
        self.acc = Accumulator::default();
        self.state.reset();
        self.started = None;
    }

    fn attributes(&self) -> MetricAttributes {
        NumericAttributes { unit: None, higher_is_better: higher_is_better(self.key) }.into()
    }
}

impl Numeric for DashboardMetric {
    fn value(&self) -> NumericEntry {
        self.state.current_value()
    }

    fn running_value(&self) -> NumericEntry {
        self.state.current_value()
    }
}

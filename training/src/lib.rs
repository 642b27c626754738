//! Fine-tuning: tasks, data, metrics and the burn-train learner glue (filled by the training issue).

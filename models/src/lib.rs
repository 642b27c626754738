//! LLaMA and BERT-family models with adapter injection (filled by the models issue).

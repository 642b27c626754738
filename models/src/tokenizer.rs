//! Text tokenizers: HF `tokenizer.json` files, or the tokenizer embedded in a GGUF file's metadata
//! rebuilt as a `tokenizers` tokenizer exactly as transformers' GGUF loader rebuilds it
//! (SentencePiece `llama` vocabularies with byte fallback, byte-level `gpt2` ones with the split
//! `tokenizer.ggml.pre` names; see `gguf_vocab`); chat templates rendered with minijinja.

mod gguf_vocab;

use crate::error::ModelError;
use crate::gguf::{Gguf, MetaValue};
use serde::Serialize;
use std::path::Path;
use tokenizers::Tokenizer;

/// One chat message.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with its special ids and chat template.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence id, if the model uses one.
    pub bos: Option<u32>,
    /// End-of-sequence id (generation stops there).
    pub eos: Option<u32>,
    /// Whether a BOS token is prepended when encoding.
    pub add_bos: bool,
    /// Whether the model's own post-processing appends an EOS token
    /// ([`Self::encode_with_specials`]; [`Self::encode`] never does: callers end sequences).
    pub add_eos: bool,
    /// The Jinja chat template, if the model ships one.
    pub chat_template: Option<String>,
    bos_text: String,
    eos_text: String,
}

fn tok_err(path: &Path, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Weights { path: path.to_path_buf(), reason: format!("tokenizer: {reason}") }
}

impl TextTokenizer {
    /// Rebuilds the GGUF's embedded tokenizer as transformers does (`AutoTokenizer.from_pretrained(dir,
    /// gguf_file=...)` gives the same ids): `tokenizer.ggml.model` `llama` (SentencePiece) or
    /// `gpt2` (byte-level BPE, with a supported `tokenizer.ggml.pre`). Anything else, and malformed
    /// metadata, is an error naming the file and the key.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ModelError> {
        let rebuilt = gguf_vocab::rebuild(gguf)?;
        let text_of = |i: Option<u32>| i.and_then(|i| rebuilt.tokens.get(i as usize)).cloned().unwrap_or_default();
        Ok(TextTokenizer {
            bos_text: text_of(rebuilt.bos),
            eos_text: text_of(rebuilt.eos),
            inner: rebuilt.inner,
            bos: rebuilt.bos,
            eos: rebuilt.eos,
            add_bos: rebuilt.add_bos,
            add_eos: rebuilt.add_eos,
            chat_template: gguf.metadata.get("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_string),
        })
    }

    /// Loads an HF `tokenizer.json` (padding and truncation settings in the file are removed: the
    /// caller decides them).
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        inner.with_padding(None);
        inner.with_truncation(None).map_err(|e| tok_err(path, e))?;
        Ok(TextTokenizer {
            inner,
            bos: None,
            eos: None,
            add_bos: false,
            add_eos: false,
            chat_template: None,
            bos_text: String::new(),
            eos_text: String::new(),
        })
    }

    /// Loads `dir/tokenizer.json` with the chat template and BOS/EOS tokens of
    /// `dir/tokenizer_config.json` (when present).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"))?;
        let config_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&config_path) {
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::Json { path: config_path.clone(), reason: e.to_string() })?;
            let token = |key: &str| -> Option<String> {
                match json.get(key) {
                    Some(serde_json::Value::String(s)) => Some(s.clone()),
                    Some(v) => v.get("content").and_then(|c| c.as_str()).map(str::to_string),
                    None => None,
                }
            };
            tok.chat_template = json.get("chat_template").and_then(|t| t.as_str()).map(str::to_string);
            if let Some(bos) = token("bos_token") {
                tok.bos = tok.inner.token_to_id(&bos);
                tok.bos_text = bos;
            }
            if let Some(eos) = token("eos_token") {
                tok.eos = tok.inner.token_to_id(&eos);
                tok.eos_text = eos;
            }
            tok.add_bos = json.get("add_bos_token").and_then(|b| b.as_bool()).unwrap_or(false);
            tok.add_eos = json.get("add_eos_token").and_then(|b| b.as_bool()).unwrap_or(false);
        }
        Ok(tok)
    }

    /// Token ids of `text` (special tokens written in the text are recognised; a BOS is added when
    /// the model asks for one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.inner.encode(text, false).map_err(|e| tok_err(Path::new("<text>"), e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Token ids of `text` with the tokenizer's own post-processing (e.g. BERT's `[CLS] … [SEP]`; a
    /// GGUF tokenizer's BOS / EOS as its `add_bos_token` / `add_eos_token` say): what transformers'
    /// `tokenizer(text)["input_ids"]` gives.
    pub fn encode_with_specials(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let encoding = self.inner.encode(text, true).map_err(|e| tok_err(Path::new("<text>"), e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids and token types of a sentence pair with the tokenizer's post-processing (BERT:
    /// `[CLS] a [SEP] b [SEP]`, types 0 then 1), truncated to `max_len` by shortening the longer
    /// sentence first (HF's `longest_first`).
    pub fn encode_pair(&self, a: &str, b: &str, max_len: usize) -> Result<(Vec<u32>, Vec<u32>), ModelError> {
        use tokenizers::PostProcessor;
        use tokenizers::utils::truncation::{TruncationParams, TruncationStrategy, truncate_encodings};
        let err = |e| tok_err(Path::new("<text>"), e);
        let first = self.inner.encode(a, false).map_err(err)?;
        let second = self.inner.encode(b, false).map_err(err)?;
        let specials = self.inner.get_post_processor().map_or(0, |p| p.added_tokens(true));
        let params = TruncationParams {
            max_length: max_len.saturating_sub(specials),
            strategy: TruncationStrategy::LongestFirst,
            ..Default::default()
        };
        let (first, second) = truncate_encodings(first, Some(second), &params).map_err(err)?;
        let pair = self.inner.post_process(first, second, true).map_err(err)?;
        Ok((pair.get_ids().to_vec(), pair.get_type_ids().to_vec()))
    }

    /// The tokenizer as HF `tokenizer.json` text.
    pub fn to_json(&self) -> Result<String, ModelError> {
        self.inner.to_string(false).map_err(|e| tok_err(Path::new("<tokenizer>"), e))
    }

    /// The id of token `token`, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of token `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Text of `ids` (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(|e| tok_err(Path::new("<ids>"), e))
    }

    /// Renders the model's chat template for `messages` (with the assistant prompt appended when
    /// `add_generation_prompt`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ModelError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| tok_err(Path::new("<model>"), "the model has no chat template"))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(|e| tok_err(Path::new("<chat template>"), e))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_text.clone(),
            eos_token => self.eos_text.clone(),
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| tok_err(Path::new("<chat template>"), e))
    }
}

//! A GGUF file's embedded tokenizer rebuilt as a `tokenizers` [`Tokenizer`], component for
//! component as transformers 5 rebuilds it (`transformers/integrations/gguf/
//! gguf_tokenizer_mapping.py`), so the ids match `AutoTokenizer.from_pretrained(dir,
//! gguf_file=...)`:
//!
//! * `tokenizer.ggml.model = "llama"` (SentencePiece BPE: LLaMA-2, TinyLlama, Mistral): a BPE
//!   model with byte fallback over the file's tokens, merges from the file or, as llama.cpp writes
//!   none, rebuilt from `tokenizer.ggml.scores` (transformers' `generate_merges`); `Metaspace`
//!   (`▁`, prefix on the first section only); decoder `▁`→space, byte fallback, fuse, strip one
//!   leading space.
//! * `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the file's tokens (respelled in GPT-2's
//!   byte alphabet where a file stores raw UTF-8) and merges, with the split that
//!   `tokenizer.ggml.pre` names (see [`byte_level_pre_tokenizer`]).
//!
//! Control tokens (type 3) and the BOS/EOS/UNK/PAD tokens are special added tokens, user-defined
//! ones (type 4) plain added tokens; a `TemplateProcessing` adds the BOS/EOS that
//! `tokenizer.ggml.add_bos_token` / `add_eos_token` ask for. Anything this does not reproduce
//! exactly (another tokenizer model, an unknown `pre`, SentencePiece without a space prefix, a
//! SentencePiece vocabulary of an architecture transformers rebuilds differently) is refused
//! with an error naming the file, the key and the value.
//!
//! Where transformers is itself wrong for the model, this follows the model instead: `pre =
//! "smollm"` keeps SmolLM's own split (transformers falls back to GPT-2's, which differs where
//! whitespace runs before a digit); GPT-2's default `<|endoftext|>`, which transformers registers
//! as a new id past a byte-level vocabulary that lacks it, is not added; a SentencePiece vocabulary
//! missing a `<0xNN>` byte token is refused (byte fallback would drop that byte).

use crate::error::ModelError;
use crate::gguf::{Gguf, MetaValue};
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// LLaMA-3's split (transformers' `_LLAMA3_SPLIT`): up to three digits a piece, letters with one
/// leading non-letter, English contractions.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Mistral's Tekken split (transformers' `_TEKKEN_SPLIT`): case-aware words, single digits.
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's split (transformers' `_GPT4O_SPLIT`): case-aware words with contractions, up to
/// three digits.
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split (transformers' `models/qwen2` `PRETOKENIZE_REGEX`): LLaMA-3's with single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split (transformers' `models/qwen3_5` `PRETOKENIZE_REGEX`): Qwen2's with combining
/// marks kept in words.
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.ggml.pre` values and their split, exactly transformers' `GGUF_PRE_TOKENIZER_SPLITS`.
const PRE_SPLITS: &[(&str, &str)] = &[
    ("llama3", LLAMA3_SPLIT),
    ("llama-v3", LLAMA3_SPLIT),
    ("llama-bpe", LLAMA3_SPLIT),
    ("falcon3", LLAMA3_SPLIT),
    ("falcon-h1", LLAMA3_SPLIT),
    ("pixtral", LLAMA3_SPLIT),
    ("midm-2.0", LLAMA3_SPLIT),
    ("lfm2", LLAMA3_SPLIT),
    ("jina-v5-nano", LLAMA3_SPLIT),
    ("dbrx", LLAMA3_SPLIT),
    ("smaug-bpe", LLAMA3_SPLIT),
    ("tekken", TEKKEN_SPLIT),
    ("qwen2", QWEN2_SPLIT),
    ("deepseek-r1-qwen", QWEN2_SPLIT),
    ("kormo", QWEN2_SPLIT),
    ("f2llmv2", QWEN2_SPLIT),
    ("megrez", QWEN2_SPLIT),
    ("qwen35", QWEN35_SPLIT),
    ("gpt-4o", GPT4O_SPLIT),
    ("llama4", GPT4O_SPLIT),
    ("kanana2", GPT4O_SPLIT),
    ("talkie", GPT4O_SPLIT),
    ("minimax-m2", GPT4O_SPLIT),
];

/// Architectures whose SentencePiece vocabulary transformers rebuilds with another builder (Gemma:
/// respelled space tokens, merges by file order; Phi-3: a normalizer instead of `Metaspace`).
const OTHER_SENTENCEPIECE_ARCHS: &[&str] = &["gemma", "gemma2", "gemma3", "phi3"];

/// What [`rebuild`] gives [`super::TextTokenizer::from_gguf`].
pub(super) struct Rebuilt {
    /// The tokenizer, with its added tokens and BOS/EOS post-processor.
    pub inner: Tokenizer,
    /// The file's tokens as it spells them (for the chat template's BOS/EOS text).
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos: Option<u32>,
    /// Whether a BOS is prepended (`tokenizer.ggml.add_bos_token`, default true for SentencePiece).
    pub add_bos: bool,
    /// Whether an EOS is appended by the post-processor (`tokenizer.ggml.add_eos_token`).
    pub add_eos: bool,
}

/// Typed reads of the `tokenizer.*` metadata; every error names the file and the key.
struct Meta<'a> {
    gguf: &'a Gguf,
}

impl<'a> Meta<'a> {
    fn path(&self) -> &'a Path {
        self.gguf.path.as_path()
    }

    fn err(&self, key: &str, reason: impl std::fmt::Display) -> ModelError {
        super::tok_err(self.path(), format!("{key} {reason}"))
    }

    fn get(&self, key: &str) -> Option<&'a MetaValue> {
        self.gguf.metadata.get(key)
    }

    fn string(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| self.err(key, "is not a string"))).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "is not a bool")),
        }
    }

    /// An array whose entries are each `what` (`("strings", "a string")`: plural, singular).
    fn array<T>(
        &self,
        key: &str,
        what: (&str, &str),
        convert: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, ModelError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let items = value.as_array().ok_or_else(|| self.err(key, format!("is not an array of {}", what.0)))?;
        items
            .iter()
            .enumerate()
            .map(|(i, v)| convert(v).ok_or_else(|| self.err(key, format!("entry {i} is not {}", what.1))))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn strings(&self, key: &str) -> Result<Option<Vec<String>>, ModelError> {
        self.array(key, ("strings", "a string"), |v| v.as_str().map(str::to_string))
    }

    /// An array with one entry per token.
    fn per_token<T>(
        &self,
        key: &str,
        what: (&str, &str),
        n_tokens: usize,
        convert: impl Fn(&MetaValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>, ModelError> {
        let values = self.array(key, what, convert)?;
        if let Some(v) = &values
            && v.len() != n_tokens
        {
            return Err(self.err(key, format!("has {} entries but tokenizer.ggml.tokens has {n_tokens}", v.len())));
        }
        Ok(values)
    }

    /// A token id, checked against the vocabulary size.
    fn token_id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>, ModelError> {
        let Some(value) = self.get(key) else { return Ok(None) };
        let id = value.as_u64().ok_or_else(|| self.err(key, "is not a non-negative integer"))?;
        if id >= n_tokens as u64 {
            return Err(self.err(key, format!("is {id}, past the {n_tokens}-token vocabulary")));
        }
        Ok(Some(id as u32))
    }

    fn merges(&self) -> Result<Option<Vec<(String, String)>>, ModelError> {
        let key = "tokenizer.ggml.merges";
        let Some(lines) = self.strings(key)? else { return Ok(None) };
        lines
            .iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !b.contains(' ') => Ok((a.to_string(), b.to_string())),
                _ => Err(self.err(key, format!("entry {i} ({m:?}) is not of the form `a b`"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Rebuilds the tokenizer `gguf` describes (see the module doc), or says why it cannot.
pub(super) fn rebuild(gguf: &Gguf) -> Result<Rebuilt, ModelError> {
    let meta = Meta { gguf };
    let model_key = "tokenizer.ggml.model";
    let model = meta.string(model_key)?.ok_or_else(|| meta.err(model_key, "is missing"))?;
    if !matches!(model, "llama" | "gpt2") {
        return Err(meta.err(
            model_key,
            format!(
                "is {model:?}; only \"llama\" (SentencePiece) and \"gpt2\" (byte-level BPE) vocabularies are supported"
            ),
        ));
    }
    let tokens_key = "tokenizer.ggml.tokens";
    let tokens = meta.strings(tokens_key)?.ok_or_else(|| meta.err(tokens_key, "is missing"))?;
    let n = tokens.len();
    let types = meta
        .per_token("tokenizer.ggml.token_type", ("integers", "a non-negative integer"), n, MetaValue::as_u64)?
        .unwrap_or_default();
    let bos = meta.token_id("tokenizer.ggml.bos_token_id", n)?;
    let eos = meta.token_id("tokenizer.ggml.eos_token_id", n)?;
    let unk = meta.token_id("tokenizer.ggml.unknown_token_id", n)?;
    let pad = meta.token_id("tokenizer.ggml.padding_token_id", n)?;
    let byte_level = model == "gpt2";
    let (mut inner, vocab_tokens) =
        if byte_level { byte_level_bpe(&meta, &tokens)? } else { (sentencepiece(&meta, &tokens)?, tokens.clone()) };

    // Control tokens are matched whole and special. In a byte-level vocabulary one spelled outside
    // the byte alphabet is a llama.cpp mislabel that transformers skips; so do we.
    let alphabet: HashSet<char> = byte_alphabet().into_iter().collect();
    let in_alphabet = |t: &str| !byte_level || t.chars().all(|c| alphabet.contains(&c));
    let mut specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == CONTROL && in_alphabet(t))
        .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
        .collect();
    // transformers also registers the tokens the BOS/EOS/UNK/PAD ids name as special (a
    // SentencePiece `<unk>` is type 2, not control). One spelled outside a byte-level alphabet is
    // not in the vocabulary; transformers would give it a new id past the model's, so it is left out.
    let vocab_has: HashSet<&str> = vocab_tokens.iter().map(String::as_str).collect();
    for id in [bos, eos, unk, pad].into_iter().flatten() {
        let t = &tokens[id as usize];
        if vocab_has.contains(t.as_str()) && !specials.iter().any(|s| &s.content == t) {
            specials.push(AddedToken::from(t.clone(), true).normalized(false));
        }
    }
    inner.add_special_tokens(specials).map_err(|e| super::tok_err(meta.path(), e))?;
    // User-defined tokens (`<think>`) are matched whole too, but are not special.
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(t, ty)| **ty == USER_DEFINED && vocab_has.contains(t.as_str()))
        .map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    inner.add_tokens(user).map_err(|e| super::tok_err(meta.path(), e))?;

    // Older SentencePiece files lack the flag; llama.cpp and transformers then add a BOS.
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama") && bos.is_some();
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false) && eos.is_some();
    let named = |id: Option<u32>, wanted: bool| id.filter(|_| wanted).map(|i| (tokens[i as usize].clone(), i));
    inner.with_post_processor(Some(post_processor(&meta, named(bos, add_bos), named(eos, add_eos))?));
    Ok(Rebuilt { inner, tokens, bos, eos, add_bos, add_eos })
}

/// transformers' `update_post_processor`: `[BOS] $A [EOS]`, and `[BOS] $A [EOS] [BOS] $B [EOS]` for
/// pairs (second sequence type 1), each special only when asked for.
fn post_processor(
    meta: &Meta,
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<TemplateProcessing, ModelError> {
    // A token text with a space or a colon cannot be written in a template (nor can transformers).
    for (key, token) in [("tokenizer.ggml.bos_token_id", &bos), ("tokenizer.ggml.eos_token_id", &eos)] {
        if let Some((t, _)) = token
            && t.contains([' ', ':'])
        {
            return Err(meta.err(key, format!("names the token {t:?}, which a post-processor template cannot hold")));
        }
    }
    let piece = |t: &Option<(String, u32)>, type_id: u32| t.as_ref().map(|(t, _)| format!("{t}:{type_id}"));
    let single: Vec<String> = [piece(&bos, 0), Some("$A:0".into()), piece(&eos, 0)].into_iter().flatten().collect();
    let pair: Vec<String> = single
        .iter()
        .cloned()
        .chain([piece(&bos, 1), Some("$B:1".into()), piece(&eos, 1)].into_iter().flatten())
        .collect();
    let special_tokens: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
    let err = |e: String| super::tok_err(meta.path(), e);
    TemplateProcessing::builder()
        .try_single(single)
        .map_err(err)?
        .try_pair(pair)
        .map_err(err)?
        .special_tokens(special_tokens)
        .build()
        .map_err(|e| super::tok_err(meta.path(), e))
}

/// transformers' `sentencepiece_tokenizer` (its `LlamaTokenizer`).
fn sentencepiece(meta: &Meta, tokens: &[String]) -> Result<Tokenizer, ModelError> {
    let arch_key = "general.architecture";
    let arch = meta.string(arch_key)?.unwrap_or("");
    if OTHER_SENTENCEPIECE_ARCHS.contains(&arch) {
        return Err(meta.err(
            arch_key,
            format!(
                "is {arch:?}: transformers rebuilds this architecture's SentencePiece vocabulary differently, \
                 which is not implemented"
            ),
        ));
    }
    // transformers ignores `pre` here unless it names a byte-level split, which would be nonsense on
    // a SentencePiece vocabulary; accept only the values llama.cpp writes for one.
    let pre_key = "tokenizer.ggml.pre";
    if let Some(pre) = meta.string(pre_key)?
        && pre != "default"
    {
        return Err(meta.err(
            pre_key,
            format!("is {pre:?} on a SentencePiece (llama) vocabulary; only \"default\" or no value is supported"),
        ));
    }
    // transformers always prefixes a space (its LlamaTokenizer ignores this flag); llama.cpp honours
    // it. Rather than pick one silently, refuse the case where they differ.
    let prefix_key = "tokenizer.ggml.add_space_prefix";
    if meta.bool(prefix_key)? == Some(false) {
        return Err(meta.err(
            prefix_key,
            "is false: transformers' GGUF loader would still prefix a space (llama.cpp would not); not supported",
        ));
    }
    // Byte fallback needs every byte: without one, a character would silently vanish.
    let present: HashSet<&str> = tokens.iter().map(String::as_str).collect();
    if let Some(b) = (0..=255u8).find(|b| !present.contains(format!("<0x{b:02X}>").as_str())) {
        return Err(meta.err(
            "tokenizer.ggml.tokens",
            format!("has no byte token <0x{b:02X}>; a SentencePiece vocabulary needs all 256 for byte fallback"),
        ));
    }
    let merges = match meta.merges()? {
        Some(m) => m,
        None => {
            let key = "tokenizer.ggml.scores";
            let scores = meta
                .per_token(key, ("numbers", "a number"), tokens.len(), MetaValue::as_f64)?
                .ok_or_else(|| meta.err(key, "is missing (and there are no tokenizer.ggml.merges to use instead)"))?;
            merges_from_scores(tokens, &scores)
        }
    };
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| meta.err("tokenizer.ggml.merges", format!("do not fit the vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(|e| super::tok_err(meta.path(), e))?;
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        replace.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    Ok(tokenizer)
}

/// transformers' `generate_merges(vocab, scores)`: every split of every token into two tokens,
/// ordered by the token's score (best first), then the pieces' lengths (longer first); ties keep
/// the vocabulary order, and the splits of one token are ordered by the pieces' ids.
fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    // Python dicts: a repeated token keeps its first position and its last id / score.
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut order = Vec::new();
    let mut score_of: HashMap<&str, f64> = HashMap::new();
    for (t, &s) in tokens.iter().zip(scores) {
        if score_of.insert(t.as_str(), s).is_none() {
            order.push(t.as_str());
        }
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for token in order {
        let start = merges.len();
        for (i, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(i);
            if ids.contains_key(l) && ids.contains_key(r) {
                merges.push((l, r, score_of[token], l.chars().count(), r.chars().count()));
            }
        }
        merges[start..].sort_by_key(|m| (ids[m.0], ids[m.1]));
    }
    // Descending and stable, as Python's `sorted(reverse=True)`; -0.0 == 0.0 there too.
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(Ordering::Equal).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges.into_iter().map(|(l, r, ..)| (l.to_string(), r.to_string())).collect()
}

/// GPT-2's `bytes_to_unicode`: the printable Latin-1 bytes stand for themselves, the others for
/// U+0100 onwards, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let b = b as u32;
        let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *slot = if printable {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("below U+0200")
        };
    }
    out
}

/// transformers' `byte_level_tokenizer` (its `GPT2Tokenizer`) with the split of
/// [`byte_level_pre_tokenizer`]; also the vocabulary as the model sees it (respelled).
fn byte_level_bpe(meta: &Meta, tokens: &[String]) -> Result<(Tokenizer, Vec<String>), ModelError> {
    let pre = byte_level_pre_tokenizer(meta)?;
    let alphabet = byte_alphabet();
    let spelled: HashSet<char> = alphabet.into_iter().collect();
    // A token stored as raw UTF-8 instead of in the byte alphabet is respelled, as transformers does.
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| spelled.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| alphabet[b as usize]).collect()
            }
        })
        .collect();
    let key = "tokenizer.ggml.merges";
    let merges = meta.merges()?.ok_or_else(|| meta.err(key, "is missing (a byte-level BPE vocabulary needs them)"))?;
    let vocab: Vocab = respelled.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(String::new())
        .build()
        .map_err(|e| meta.err(key, format!("do not fit the vocabulary: {e}")))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok((tokenizer, respelled))
}

/// The split `tokenizer.ggml.pre` names for a byte-level vocabulary: each value transformers' GGUF
/// loader knows (`PRE_SPLITS`: its regex, then byte-level without GPT-2's regex); `"gpt-2"`, GPT-2's
/// own (transformers' default); `"smollm"`, single digits then GPT-2's split (what llama.cpp and
/// SmolLM's `tokenizer.json` do; transformers uses GPT-2's alone, which gives the same ids as long
/// as no token holds a digit next to another character, as in SmolLM2's vocabulary). Anything
/// else, or no value, is refused rather than split wrongly.
fn byte_level_pre_tokenizer(meta: &Meta) -> Result<PreTokenizerWrapper, ModelError> {
    let key = "tokenizer.ggml.pre";
    let supported = || {
        let mut names: Vec<&str> = PRE_SPLITS.iter().map(|(n, _)| *n).collect();
        names.extend(["gpt-2", "smollm"]);
        names.join(", ")
    };
    let pre = meta.string(key)?.ok_or_else(|| {
        meta.err(key, format!("is missing, so the byte-level split is unknown (supported values: {})", supported()))
    })?;
    Ok(match pre {
        "gpt-2" => ByteLevel::new(false, true, true).into(),
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        _ => {
            let Some((_, split)) = PRE_SPLITS.iter().find(|(n, _)| *n == pre) else {
                return Err(meta.err(key, format!("is {pre:?}, which is not implemented (supported: {})", supported())));
            };
            let split = Split::new(SplitPattern::Regex(split.to_string()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| meta.err(key, format!("is {pre:?}, whose split does not compile: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
    })
}

//! Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE built from a GGUF file's
//! vocabulary and merges, wrapped with the special-token ids tunelens needs.
//!
//! candle's built-in GGUF tokenizer adds a prefix space for `tokenizer.ggml.pre = smollm` and gives
//! wrong ids, so the BPE is assembled here with the pre-tokenizer that model family uses
//! (see DESIGN.md); ids then match Hugging Face exactly (tested against `golden/tokenize.json`).

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::model::chat::ChatTemplate;
use crate::model::config::ModelConfig;

/// The pre-tokenizer regex of LLaMA-3 style BPE vocabularies.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The pre-tokenizer regex of Qwen2 vocabularies (single digits).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token ids and each token's byte span.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

/// A tokenizer with the model's special tokens.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Beginning-of-sequence token text and id.
    pub bos: Option<(String, u32)>,
    /// End-of-sequence token text and id.
    pub eos: Option<(String, u32)>,
    /// Every id that ends generation (the EOS plus the model config's extra ones).
    pub stop_ids: Vec<u32>,
}

fn tok_err(context: &str, err: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {err}"))
}

/// Reads a special token that `tokenizer_config.json` gives as a string or `{"content": ..}`.
fn special_token_text(config: Option<&serde_json::Value>, key: &str) -> Option<String> {
    let value = config?.get(key)?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(map) => map.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers::Tokenizer` with explicit special tokens.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos: Option<(String, u32)>,
        eos: Option<(String, u32)>,
        extra_stop_ids: &[u32],
    ) -> Self {
        let mut stop_ids: Vec<u32> = eos.iter().map(|(_, id)| *id).collect();
        for &id in extra_stop_ids {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Self {
            inner,
            bos,
            eos,
            stop_ids,
        }
    }

    /// Loads `tokenizer.json`, taking special tokens from `tokenizer_config.json` when present and
    /// from the model config otherwise.
    pub fn from_hf_files(
        path: &Path,
        tokenizer_config: Option<&serde_json::Value>,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|err| Error::bad_file(path, format!("invalid tokenizer.json ({err})")))?;
        let lookup = |text: Option<String>, id: Option<u32>| -> Option<(String, u32)> {
            match (text, id) {
                (Some(t), _) => inner.token_to_id(&t).map(|id| (t, id)),
                (None, Some(id)) => inner.id_to_token(id).map(|t| (t, id)),
                (None, None) => None,
            }
        };
        let bos = lookup(
            special_token_text(tokenizer_config, "bos_token"),
            cfg.bos_token_id,
        );
        let eos = lookup(
            special_token_text(tokenizer_config, "eos_token"),
            cfg.eos_token_ids.first().copied(),
        );
        Ok(Self::new(inner, bos, eos, &cfg.eos_token_ids))
    }

    /// Builds the tokenizer a GGUF file describes: byte-level BPE (`gpt2`), or Gemma's
    /// SentencePiece vocabulary (`llama` in a Gemma file).
    pub fn from_gguf_vocab(vocab: &GgufVocab, path: &Path) -> Result<Self> {
        let gemma = vocab.model == "llama" && vocab.architecture.starts_with("gemma");
        let mut inner = if vocab.model == "gpt2" {
            Self::byte_level_bpe(vocab, path)?
        } else if gemma {
            gemma_bpe(vocab)?
        } else {
            return Err(Error::bad_file(
                path,
                format!(
                    "GGUF tokenizer model `{}` is not supported for `{}` (byte-level BPE `gpt2`, or `llama` in a Gemma file)",
                    vocab.model, vocab.architecture
                ),
            ));
        };
        // Control tokens (type 3) are special; user-defined tokens (type 4) are plain added
        // tokens, matched in the raw text.
        let known = inner.get_vocab(false);
        let mut special = Vec::new();
        let mut added = Vec::new();
        for (id, token) in vocab.tokens.iter().enumerate() {
            match vocab.token_types.get(id) {
                Some(3) => special.push(AddedToken::from(token.clone(), true)),
                // transformers adds Gemma's only when the vocabulary has them as spelled (its
                // runs of spaces are respelled with `▁`).
                Some(4) if gemma && known.contains_key(token) => {
                    added.push(AddedToken::from(token.clone(), false).normalized(false));
                }
                Some(4) if !gemma => added.push(AddedToken::from(token.clone(), false)),
                _ => {}
            }
        }
        inner.add_special_tokens(&special);
        inner.add_tokens(&added);
        let named = |id: Option<u32>| {
            id.and_then(|id| vocab.tokens.get(id as usize).map(|t| (t.clone(), id)))
        };
        let bos = named(vocab.bos_token_id);
        let eos = named(vocab.eos_token_id);
        if vocab.add_bos_token {
            if let Some((text, id)) = &bos {
                let processor = TemplateProcessing::builder()
                    .try_single(format!("{text} $A"))
                    .and_then(|b| b.try_pair(format!("{text} $A {text} $B")))
                    .map_err(|err| tok_err("BOS template", err))?
                    .special_tokens(vec![(text.clone(), *id)])
                    .build()
                    .map_err(|err| tok_err("BOS template", err))?;
                inner.with_post_processor(Some(processor));
            }
        }
        Ok(Self::new(inner, bos, eos, &[]))
    }

    /// Byte-level BPE from a GGUF file's vocabulary and merges, with the pre-tokenizer its
    /// `tokenizer.ggml.pre` names.
    fn byte_level_bpe(vocab: &GgufVocab, path: &Path) -> Result<tokenizers::Tokenizer> {
        let mut token_ids = tokenizers::models::bpe::Vocab::default();
        for (id, token) in vocab.tokens.iter().enumerate() {
            token_ids.insert(token.clone(), id as u32);
        }
        let mut merges = Vec::with_capacity(vocab.merges.len());
        for (line_idx, merge) in vocab.merges.iter().enumerate() {
            let Some((a, b)) = merge.split_once(' ') else {
                return Err(Error::bad_file(
                    path,
                    format!("tokenizer.ggml.merges[{line_idx}] is not a pair: {merge:?}"),
                ));
            };
            merges.push((a.to_owned(), b.to_owned()));
        }
        let pre = vocab.pre.as_deref().unwrap_or("default");
        let byte_level = |use_regex: bool| ByteLevel::new(false, true, use_regex);
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(Split::new(
                SplitPattern::Regex(pattern.to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|err| tok_err("pre-tokenizer regex", err))?
            .into())
        };
        let (pre_tokenizer, ignore_merges, nfc): (PreTokenizerWrapper, bool, bool) = match pre {
            "smollm" => (
                Sequence::new(vec![Digits::new(true).into(), byte_level(true).into()]).into(),
                false,
                false,
            ),
            "default" | "gpt2" | "gpt-2" => (byte_level(true).into(), false, false),
            "llama-bpe" | "llama3" | "smaug-bpe" => (
                Sequence::new(vec![split(LLAMA3_PATTERN)?, byte_level(false).into()]).into(),
                true,
                false,
            ),
            "qwen2" => (
                Sequence::new(vec![split(QWEN2_PATTERN)?, byte_level(false).into()]).into(),
                false,
                true,
            ),
            other => {
                return Err(Error::bad_file(
                    path,
                    format!("GGUF pre-tokenizer `{other}` is not supported (smollm, gpt2, llama-bpe, qwen2)"),
                ))
            }
        };
        let bpe = BPE::builder()
            .vocab_and_merges(token_ids, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|err| tok_err("building BPE from GGUF vocabulary", err))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        if nfc {
            inner.with_normalizer(Some(NFC));
        }
        Ok(inner)
    }

    /// Token ids of `text`. With `add_special_tokens` the tokenizer's own post-processing runs
    /// (a BOS for LLaMA-2; nothing for SmolLM), as `tokenizer(text)` does in transformers.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| tok_err("encoding", err))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte span in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<IdsWithOffsets> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|err| tok_err("encoding", err))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// The vocabulary string of each id (`Ġhow`, `<0x0A>`, ...).
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| {
                self.inner
                    .id_to_token(id)
                    .unwrap_or_else(|| format!("<{id}>"))
            })
            .collect()
    }

    /// Decoded text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|err| tok_err("decoding", err))
    }

    /// The id of a vocabulary string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers::Tokenizer` (e.g. to save it as `tokenizer.json`).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// A chat template bound to this tokenizer's special-token strings.
    pub fn chat_template(&self, source: String) -> ChatTemplate {
        ChatTemplate {
            source,
            bos_token: self
                .bos
                .as_ref()
                .map(|(t, _)| t.clone())
                .unwrap_or_default(),
            eos_token: self
                .eos
                .as_ref()
                .map(|(t, _)| t.clone())
                .unwrap_or_default(),
        }
    }
}

/// Gemma's SentencePiece vocabulary as a BPE with byte fallback, built as transformers builds it
/// from a GGUF file: the file lists no merges, so every split of a token into two tokens of the
/// vocabulary is a merge, ranked by the merged token's position in the file (earlier first) and
/// then by the longer left piece; runs of spaces, stored as real spaces, are respelled with `▁`;
/// spaces become `▁` in a normalizer and the text is never split before the BPE.
fn gemma_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    // Python's `str.strip` whitespace: Unicode White_Space plus the separators U+001C..U+001F.
    let py_space = |c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c);
    let tokens: Vec<String> = vocab
        .tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.chars().all(py_space) {
                "\u{2581}".repeat(t.chars().count())
            } else {
                t.clone()
            }
        })
        .collect();
    // A later duplicate wins, as in a Python dict built in file order.
    let mut ids = tokenizers::models::bpe::Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        ids.insert(token.clone(), id as u32);
    }
    // (merged token's rank, left piece's length in chars, left, right)
    let mut ranked: Vec<(u32, usize, &str, &str)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for token in &tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        let Some(&rank) = ids.get(token) else {
            continue;
        };
        for (chars, (at, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(at);
            if ids.contains_key(left) && ids.contains_key(right) {
                ranked.push((rank, chars, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let merges: Vec<(String, String)> = ranked
        .into_iter()
        .map(|(_, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(ids, merges)
        .unk_token("<unk>".to_owned())
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|err| tok_err("building Gemma's BPE from the GGUF vocabulary", err))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_normalizer(Some(
        Replace::new(" ", "\u{2581}").map_err(|err| tok_err("Gemma normalizer", err))?,
    ));
    inner.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".to_owned()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|err| tok_err("Gemma pre-tokenizer", err))?,
    ));
    inner.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new("\u{2581}", " ")
            .map_err(|err| tok_err("Gemma decoder", err))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    Ok(inner)
}

/// The tokenizer data a GGUF file carries (`tokenizer.ggml.*`).
#[derive(Clone, Debug, Default)]
pub struct GgufVocab {
    /// `general.architecture` (Gemma's SentencePiece vocabulary needs its own builder).
    pub architecture: String,
    /// `tokenizer.ggml.model` (`gpt2` = byte-level BPE).
    pub model: String,
    /// `tokenizer.ggml.pre`.
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 3 control, 4 user-defined, ...).
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`, `"a b"` each.
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos_token: bool,
}

//! Tokenizers through the `tokenizers` crate: `tokenizer.json` for Hugging Face folders, and for
//! GGUF files one built from the `tokenizer.ggml.*` metadata (byte-level BPE with the
//! pre-tokenizer `tokenizer.ggml.pre` names, or SentencePiece BPE from the pieces' scores). Plus streaming detokenization that never splits a
//! multi-byte character, and chat templates rendered with `minijinja`.

use crate::runtime::Detokenizer;
use std::path::{Path, PathBuf};

use minijinja::{context, Environment};
use serde::Serialize;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};
use crate::gguf::{Header, Value};

/// Pre-tokenizer families (`tokenizer.ggml.pre`) this builds.
pub const SUPPORTED_PRE: &[&str] = &["default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2"];

const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How a tokenizer decides whether a prompt starts with BOS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddBos {
    /// The model's files say (`add_bos_token`, `tokenizer.ggml.add_bos_token`).
    Explicit(bool),
    /// They do not: the tokenizer.json's post-processor adds what it adds (transformers'
    /// `add_special_tokens=True`).
    PostProcessor,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_id: Option<i64>,
    pub eos_id: Option<i64>,
    /// Whether `encode(text, true)` starts with BOS.
    pub add_bos: AddBos,
    pub chat_template: Option<String>,
    /// Where it came from, for error messages.
    pub source: PathBuf,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

fn tk_err(source: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::BadFile { file: source.into(), msg: format!("{what}: {e}") }
}

impl Tokenizer {
    /// The tokenizer a GGUF file describes; `None` when it has no `tokenizer.ggml.model`, or
    /// one of a type this does not build (neither GPT-2's byte-level BPE, `gpt2`, nor
    /// SentencePiece BPE, `llama`): then with a warning naming the key, and the model runs on
    /// prompts given as token ids (text prompts are refused asking for them).
    pub fn from_gguf(h: &Header, path: &Path) -> Result<Option<Tokenizer>> {
        let Some(model) = h.get("tokenizer.ggml.model") else { return Ok(None) };
        let key_err = |k: &str, m: String| Error::config(path, k, m);
        let model = model.as_str().ok_or_else(|| key_err("tokenizer.ggml.model", "not a string".into()))?;
        if model != "gpt2" && model != "llama" {
            tracing::warn!(
                "{}: tokenizer.ggml.model `{model}` is not supported (supported: gpt2, llama); the model runs without a tokenizer: give prompts as token_ids",
                path.display()
            );
            return Ok(None);
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let arr = h.get(k).and_then(Value::as_array).ok_or_else(|| key_err(k, "missing or not an array".into()))?;
            arr.iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| key_err(k, "holds a non-string".into())))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let inner = if model == "gpt2" {
            Self::gguf_byte_level(h, path, &tokens, strings("tokenizer.ggml.merges")?)?
        } else {
            Self::gguf_sentencepiece(h, path, &tokens)?
        };
        Ok(Some(Self::from_gguf_parts(h, path, inner, &tokens)))
    }

    /// GPT-2's byte-level BPE from the vocabulary and merges, with the pre-tokenizer
    /// `tokenizer.ggml.pre` names.
    fn gguf_byte_level(
        h: &Header,
        path: &Path,
        tokens: &[String],
        merges: Vec<String>,
    ) -> Result<tokenizers::Tokenizer> {
        let key_err = |k: &str, m: String| Error::config(path, k, m);
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| key_err("tokenizer.ggml.merges", format!("entry {i} `{m}` is not two tokens")))
            })
            .collect::<Result<_>>()?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| tk_err(path, "tokenizer.ggml.merges", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = h.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        let byte_level = |regex: bool| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, regex));
        let split = |re: &str| -> Result<PreTokenizerWrapper> {
            let s = Split::new(SplitPattern::Regex(re.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tk_err(path, "tokenizer.ggml.pre", e))?;
            Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::Split(s), byte_level(false)])))
        };
        let pt = match pre {
            "default" | "gpt2" => byte_level(true),
            // SmolLM's tokenizer splits digits one by one before GPT-2's byte-level regex.
            "smollm" => PreTokenizerWrapper::Sequence(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level(true),
            ])),
            "llama-bpe" | "llama3" => split(LLAMA3_REGEX)?,
            "qwen2" => split(QWEN2_REGEX)?,
            other => {
                return Err(key_err(
                    "tokenizer.ggml.pre",
                    format!("`{other}` is not supported; supported: {}", SUPPORTED_PRE.join(", ")),
                ))
            }
        };
        inner.with_pre_tokenizer(Some(pt));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(inner)
    }

    /// SentencePiece BPE (`tokenizer.ggml.model = "llama"`: Llama 2's, Gemma's) as transformers
    /// converts it: the merges are every split of a piece into two pieces of the vocabulary,
    /// ranked by the merged piece's score (then the longer left, the longer right piece, then
    /// vocabulary order); spaces become `▁` (one prepended when `tokenizer.ggml.add_space_prefix`),
    /// and bytes without a piece fall back to their `<0xNN>` pieces.
    fn gguf_sentencepiece(h: &Header, path: &Path, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
        use tokenizers::decoders::{byte_fallback::ByteFallback, fuse::Fuse, strip::Strip};
        use tokenizers::normalizers::{Prepend, Replace};
        use tokenizers::{DecoderWrapper, NormalizerWrapper};
        let key = "tokenizer.ggml.scores";
        let scores: Vec<f32> = h
            .get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| Error::config(path, key, "missing or not an array"))?
            .iter()
            .map(|v| v.as_f64().map(|x| x as f32))
            .collect::<Option<_>>()
            .ok_or_else(|| Error::config(path, key, "holds a non-number"))?;
        if scores.len() != tokens.len() {
            return Err(Error::config(path, key, format!("{} scores for {} tokens", scores.len(), tokens.len())));
        }
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        // (left, right, score of the merged piece), in vocabulary order.
        let mut merges: Vec<(&str, &str, f32)> = Vec::new();
        for (piece, &score) in tokens.iter().zip(&scores) {
            let start = merges.len();
            for (i, _) in piece.char_indices().skip(1) {
                let (l, r) = piece.split_at(i);
                if vocab.contains_key(l) && vocab.contains_key(r) {
                    merges.push((l, r, score));
                }
            }
            merges[start..].sort_by_key(|&(l, r, _)| (vocab[l], vocab[r]));
        }
        // Stable: equal keys keep vocabulary order, as Python's sorted(..., reverse=True) does.
        merges.sort_by(|a, b| {
            b.2.total_cmp(&a.2)
                .then(b.0.chars().count().cmp(&a.0.chars().count()))
                .then(b.1.chars().count().cmp(&a.1.chars().count()))
        });
        let merges: Vec<(String, String)> =
            merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect();
        let mut b = BPE::builder().vocab_and_merges(vocab.clone(), merges).byte_fallback(true);
        let unk = h.get("tokenizer.ggml.unknown_token_id").and_then(Value::as_u64).and_then(|i| tokens.get(i as usize));
        if let Some(u) = unk {
            b = b.unk_token(u.clone()).fuse_unk(true);
        }
        let bpe = b.build().map_err(|e| tk_err(path, "tokenizer.ggml.scores", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let prefix = h.get("tokenizer.ggml.add_space_prefix").and_then(Value::as_bool).unwrap_or(true);
        let space = Replace::new(" ", "\u{2581}").map_err(|e| tk_err(path, "tokenizer.ggml.model", e))?;
        let mut norm = vec![NormalizerWrapper::Replace(space)];
        let mut dec = vec![DecoderWrapper::Replace(
            Replace::new("\u{2581}", " ").map_err(|e| tk_err(path, "tokenizer.ggml.model", e))?,
        )];
        dec.push(DecoderWrapper::ByteFallback(ByteFallback::default()));
        dec.push(DecoderWrapper::Fuse(Fuse::default()));
        if prefix {
            norm.insert(0, NormalizerWrapper::Prepend(Prepend::new("\u{2581}".into())));
            dec.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        inner.with_normalizer(Some(NormalizerWrapper::Sequence(tokenizers::normalizers::Sequence::new(norm))));
        inner.with_decoder(Some(DecoderWrapper::Sequence(tokenizers::decoders::sequence::Sequence::new(dec))));
        Ok(inner)
    }

    /// The GGUF tokenizer's special tokens, ids, BOS rule and chat template around `inner`.
    fn from_gguf_parts(h: &Header, path: &Path, mut inner: tokenizers::Tokenizer, tokens: &[String]) -> Tokenizer {
        // Control (3) and user-defined (4) tokens are matched whole, before BPE.
        if let Some(types) = h.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            let special: Vec<AddedToken> = types
                .iter()
                .zip(tokens)
                .filter(|(t, _)| matches!(t.as_u64(), Some(3) | Some(4)))
                .map(|(_, s)| AddedToken::from(s.clone(), true))
                .collect();
            inner.add_special_tokens(&special);
        }
        let id = |k: &str| h.get(k).and_then(Value::as_u64).map(|v| v as i64);
        Tokenizer {
            inner,
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            add_bos: AddBos::Explicit(h.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false)),
            chat_template: h.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string),
            source: path.into(),
        }
    }

    /// `tokenizer.json` (and `tokenizer_config.json` for the chat template and bos/eos) in a
    /// Hugging Face folder; `None` when there is no `tokenizer.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Ok(None);
        }
        let inner = tokenizers::Tokenizer::from_file(&file).map_err(|e| tk_err(&file, "cannot load tokenizer", e))?;
        let mut t = Tokenizer {
            inner,
            bos_id: None,
            eos_id: None,
            add_bos: AddBos::PostProcessor,
            chat_template: None,
            source: file,
        };
        let cfg = dir.join("tokenizer_config.json");
        if cfg.is_file() {
            let text = std::fs::read_to_string(&cfg).map_err(|e| Error::io(&cfg, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::BadFile { file: cfg.clone(), msg: format!("invalid JSON: {e}") })?;
            let tok_id = |k: &str| {
                let s = match v.get(k)? {
                    serde_json::Value::String(s) => s.clone(),
                    o => o.get("content")?.as_str()?.to_string(),
                };
                t.inner.token_to_id(&s).map(|i| i as i64)
            };
            t.bos_id = tok_id("bos_token");
            t.eos_id = tok_id("eos_token");
            // Without `add_bos_token` (transformers 5 writes none), what the tokenizer.json's
            // post-processor adds is what transformers adds: encode with special tokens.
            t.add_bos = match v.get("add_bos_token").and_then(serde_json::Value::as_bool) {
                Some(b) => AddBos::Explicit(b),
                None => AddBos::PostProcessor,
            };
            t.chat_template = v.get("chat_template").and_then(serde_json::Value::as_str).map(str::to_string);
        }
        let jinja = dir.join("chat_template.jinja");
        if t.chat_template.is_none() && jinja.is_file() {
            t.chat_template = Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?);
        }
        Ok(Some(t))
    }

    /// Token ids of `text`. Special tokens written in the text are recognised; `add_bos` puts
    /// the BOS token first when the model asks for one.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<i64>> {
        let special = add_bos && self.add_bos == AddBos::PostProcessor;
        let enc = self.inner.encode(text, special).map_err(|e| tk_err(&self.source, "tokenization failed", e))?;
        let mut ids: Vec<i64> = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos == AddBos::Explicit(true) {
            ids.extend(self.bos_id);
        }
        ids.extend(enc.get_ids().iter().map(|&i| i as i64));
        Ok(ids)
    }

    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().filter_map(|&i| u32::try_from(i).ok()).collect();
        self.inner.decode(&ids, false).unwrap_or_default()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(|i| i as i64)
    }

    /// Renders the chat template for `messages`, ending with the assistant's turn opened.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Msg(format!("{}: the model has no chat template", self.source.display())))?;
        let mut env = Environment::new();
        // A template is code from the model's files: bounded in instructions (a loop nest cannot
        // hang), depth, and output (a repeated string cannot fill memory).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_DEPTH);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let tok = |id: Option<i64>| id.map(|i| self.decode(&[i])).unwrap_or_default();
        let src = self.source.display();
        env.add_template("chat", tpl).map_err(|e| Error::Msg(format!("{src}: chat template: {e:#}")))?;
        let t = env.get_template("chat").map_err(|e| Error::Msg(format!("{src}: chat template: {e:#}")))?;
        let mut out = CappedWriter { buf: Vec::new(), cap: TEMPLATE_OUTPUT };
        t.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => tok(self.bos_id),
                eos_token => tok(self.eos_id),
            },
            &mut out,
        )
        .map_err(|e| {
            let why = match e.kind() {
                minijinja::ErrorKind::OutOfFuel => {
                    format!("ran more than {TEMPLATE_FUEL} template instructions (a loop that does not end?)")
                }
                minijinja::ErrorKind::WriteFailure => format!("wrote more than {} MiB", TEMPLATE_OUTPUT >> 20),
                _ => format!("{e:#}"),
            };
            Error::Msg(format!("{src}: the chat template failed to render: {why}"))
        })?;
        String::from_utf8(out.buf).map_err(|_| Error::Msg(format!("{src}: the chat template wrote invalid UTF-8")))
    }
}

impl Detokenizer for Tokenizer {
    fn decode(&self, ids: &[i64]) -> String {
        Tokenizer::decode(self, ids)
    }
}

/// How many instructions a chat template may run: real templates take a few hundred a message.
const TEMPLATE_FUEL: u64 = 5_000_000;
/// How deep a chat template's macros and includes may nest.
const TEMPLATE_DEPTH: usize = 64;
/// The most text a chat template may write (a prompt far longer than any context).
const TEMPLATE_OUTPUT: usize = 16 << 20;

/// A writer that fails once `cap` bytes are written.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            return Err(std::io::Error::other("chat template output over its limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tokens held back at most while they form no whole character (a UTF-8 character is at most 4
/// bytes, and a byte-level token carries at least one).
const MAX_HELD_TOKENS: usize = 16;

/// Turns a growing list of token ids into text pieces, holding back bytes until they form whole
/// characters (a multi-byte character split across tokens is emitted once complete). Each push
/// decodes only a short window (the tokens since the last emitted piece, and one before them
/// for context), so a completion of n tokens costs O(n), not O(n²).
/// `D` is how the decoder holds its detokenizer: a reference (`&Tokenizer`) or a shared
/// handle (`Arc<dyn Detokenizer>`) for a decoder that outlives the caller's borrow.
pub struct StreamDecoder<D> {
    tok: D,
    ids: Vec<i64>,
    prefix: usize,
    read: usize,
}

impl<D> StreamDecoder<D>
where
    D: std::ops::Deref,
    D::Target: Detokenizer,
{
    pub fn new(tok: D) -> Self {
        StreamDecoder { tok, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, id: i64) -> Option<String> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read]);
        let now = self.tok.decode(&self.ids[self.prefix..]);
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            if self.ids.len() - self.read < MAX_HELD_TOKENS {
                return None;
            }
            // That many tokens make no whole character: they decode to nothing (ids the
            // tokenizer has no text for) or to broken bytes. Let them go as a full decode renders
            // them, so the window stays short.
            let piece = now.get(before.len()..).unwrap_or_default().to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            return (!piece.is_empty()).then_some(piece);
        }
        let piece = now.get(before.len()..)?.to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Some(piece)
    }

    /// The text of the tokens still held back (an incomplete character decodes lossily, as a
    /// full decode would render it); empty when nothing is held.
    pub fn flush(&mut self) -> String {
        if self.read == self.ids.len() {
            return String::new();
        }
        let before = self.tok.decode(&self.ids[self.prefix..self.read]);
        let now = self.tok.decode(&self.ids[self.prefix..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        now.get(before.len()..).unwrap_or_default().to_string()
    }
}

//! The OpenAI API's requests, read and checked field by field (every error names the field, as
//! OpenAI's `param`), and its responses. Fields OpenAI defines that change the output and that
//! this server does not implement are refused, not ignored; fields it does not know are
//! ignored (clients send extras), with a log line.

use autodeploy_core::error::Error;
use autodeploy_core::runtime::{Completion, FinishReason};
use autodeploy_core::sampling::{SamplingParams, TokenLogprobs, MAX_LOGPROBS};
use autodeploy_core::tokenizer::ChatMessage;
use serde_json::{json, Map, Value};

use crate::llm::LlmInfo;

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub kind: &'static str,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, message: message.into(), param: Some(param.into()), kind: "invalid_request_error" }
    }

    pub fn status(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), param: None, kind }
    }

    pub fn body(&self) -> Value {
        let msg = match &self.param {
            Some(p) if !self.message.starts_with(p.as_str()) => format!("{p}: {}", self.message),
            _ => self.message.clone(),
        };
        json!({"error": {"message": msg, "type": self.kind, "param": self.param, "code": self.status}})
    }

    /// An engine's refusal of a request (`Error::Input` names the engine's field), in the API's
    /// field names.
    pub fn from_engine(e: &Error, chat: bool) -> ApiError {
        match e {
            Error::Input { input, msg } => {
                let param = match input.as_str() {
                    "prompt" if chat => "messages",
                    "max_new_tokens" => "max_tokens",
                    "stop_strings" => "stop",
                    "logprobs" if chat => "top_logprobs",
                    other => other,
                };
                ApiError::bad(param, msg.clone())
            }
            e => ApiError::status(500, "internal_error", e.to_string()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// A checked request: what to submit and how to answer.
#[derive(Debug)]
pub struct Job {
    pub kind: Kind,
    /// Each prompt's token ids (a completion request may carry several prompts).
    pub prompts: Vec<Vec<i64>>,
    /// Completions per prompt.
    pub n: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Whether to report log-probabilities (with `sampling.logprobs` alternatives).
    pub logprobs: bool,
}

/// The fields each endpoint reads; others are ignored.
const COMMON: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "ignore_eos",
    "min_tokens",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "best_of",
];
const COMPLETION_ONLY: &[&str] = &["prompt", "echo", "suffix", "max_completion_tokens"];
const CHAT_ONLY: &[&str] = &["messages", "max_completion_tokens", "top_logprobs", "tools", "response_format"];

/// Most completions one request may ask for (`n` times the prompts).
pub const MAX_CHOICES: usize = 128;

struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The field's value, `None` when absent or null.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn int(&self, k: &str) -> Result<Option<i64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| ApiError::bad(k, format!("must be an integer, got {} ({v})", type_name(v)))),
        }
    }

    /// An integer in `lo..=hi`.
    fn int_in(&self, k: &str, lo: i64, hi: i64) -> Result<Option<usize>, ApiError> {
        match self.int(k)? {
            Some(x) if x < lo || x > hi => Err(ApiError::bad(k, format!("must be between {lo} and {hi}, got {x}"))),
            x => Ok(x.map(|x| x as usize)),
        }
    }

    fn num(&self, k: &str) -> Result<Option<f64>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::bad(k, format!("must be a number, got {} ({v})", type_name(v)))),
        }
    }

    fn boolean(&self, k: &str) -> Result<Option<bool>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| ApiError::bad(k, format!("must be a boolean, got {} ({v})", type_name(v)))),
        }
    }

    fn string(&self, k: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                v.as_str().map(Some).ok_or_else(|| ApiError::bad(k, format!("must be a string, got {}", type_name(v))))
            }
        }
    }
}

/// Token ids from a JSON array, each in the vocabulary; the error names `field[i]`.
fn token_ids(field: &str, v: &[Value], vocab: Option<usize>) -> Result<Vec<i64>, ApiError> {
    v.iter()
        .enumerate()
        .map(|(i, t)| {
            let id = t.as_i64().ok_or_else(|| {
                ApiError::bad(
                    &format!("{field}[{i}]"),
                    format!("must be a token id (an integer), got {}", type_name(t)),
                )
            })?;
            match vocab {
                Some(n) if id < 0 || id as usize >= n => Err(ApiError::bad(
                    &format!("{field}[{i}]"),
                    format!("token id {id} is out of range for the vocabulary of {n}"),
                )),
                _ => Ok(id),
            }
        })
        .collect()
}

/// Reads and checks a request body for `kind` against the engine's `info`.
pub fn parse(kind: Kind, body: &[u8], info: &LlmInfo) -> Result<Job, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::status(400, "invalid_request_error", format!("the body is not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| {
        ApiError::status(400, "invalid_request_error", format!("the body must be a JSON object, got {}", type_name(&v)))
    })?;
    let f = Fields { obj };
    let own = if kind == Kind::Chat { CHAT_ONLY } else { COMPLETION_ONLY };
    for k in obj.keys().filter(|k| !COMMON.contains(&k.as_str()) && !own.contains(&k.as_str())) {
        tracing::debug!("ignoring the unknown request field `{k}`");
    }
    if let Some(m) = f.string("model")? {
        if m != info.model {
            return Err(ApiError {
                status: 404,
                message: format!("the model `{m}` does not exist; this server serves `{}`", info.model),
                param: Some("model".into()),
                kind: "not_found_error",
            });
        }
    }
    // What this server does not do, refused rather than silently ignored.
    for k in ["presence_penalty", "frequency_penalty"] {
        if f.num(k)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::bad(k, "is not supported (only 0)"));
        }
    }
    if f.get("logit_bias").is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(ApiError::bad("logit_bias", "is not supported"));
    }
    if kind == Kind::Completion {
        if f.boolean("echo")? == Some(true) {
            return Err(ApiError::bad("echo", "is not supported"));
        }
        if f.string("suffix")?.is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::bad("suffix", "is not supported"));
        }
    } else {
        for k in ["tools", "response_format"] {
            if f.get(k).is_some() {
                return Err(ApiError::bad(k, "is not supported"));
            }
        }
    }
    let vocab = info.vocab_size;
    let tok = info.tokenizer.as_deref();
    let prompts = match kind {
        Kind::Completion => {
            let p = f.get("prompt").ok_or_else(|| ApiError::bad("prompt", "is required"))?;
            let encode = |field: &str, text: &str| -> Result<Vec<i64>, ApiError> {
                let tok = tok.ok_or_else(|| ApiError::bad(field, "this model has no tokenizer; send token ids"))?;
                tok.encode(text, true).map_err(|e| ApiError::bad(field, e.to_string()))
            };
            let bad_shape = || {
                ApiError::bad(
                    "prompt",
                    "must be a string, an array of strings, an array of token ids or an array of arrays of token ids",
                )
            };
            match p {
                Value::String(s) => vec![encode("prompt", s)?],
                Value::Array(a) if a.is_empty() => return Err(ApiError::bad("prompt", "is empty")),
                Value::Array(a) if a[0].is_string() => a
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match s.as_str() {
                        Some(s) => encode(&format!("prompt[{i}]"), s),
                        None => Err(bad_shape()),
                    })
                    .collect::<Result<_, _>>()?,
                Value::Array(a) if a[0].is_array() => a
                    .iter()
                    .enumerate()
                    .map(|(i, s)| match s.as_array() {
                        Some(ids) => token_ids(&format!("prompt[{i}]"), ids, vocab),
                        None => Err(bad_shape()),
                    })
                    .collect::<Result<_, _>>()?,
                Value::Array(a) => vec![token_ids("prompt", a, vocab)?],
                _ => return Err(bad_shape()),
            }
        }
        Kind::Chat => {
            let messages = chat_messages(&f)?;
            let tok = tok.ok_or_else(|| ApiError::bad("messages", "this model has no tokenizer, so it cannot chat"))?;
            if tok.chat_template.is_none() {
                return Err(ApiError::bad("messages", "this model has no chat template; use /v1/completions"));
            }
            let text =
                tok.apply_chat_template(&messages, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
            vec![tok.encode(&text, true).map_err(|e| ApiError::bad("messages", e.to_string()))?]
        }
    };
    let prompt_field = if kind == Kind::Chat { "messages" } else { "prompt" };
    for (i, p) in prompts.iter().enumerate() {
        let field = if prompts.len() > 1 { format!("{prompt_field}[{i}]") } else { prompt_field.to_string() };
        if p.is_empty() {
            return Err(ApiError::bad(&field, "is empty (no tokens)"));
        }
        if p.len() >= info.max_seq_len {
            return Err(ApiError::bad(
                &field,
                format!(
                    "{} tokens leave no room to generate: this model's maximum context length is {} tokens",
                    p.len(),
                    info.max_seq_len
                ),
            ));
        }
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = info.max_seq_len - longest;
    let max_field = if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
    let max_tokens = match f.int(max_field)? {
        Some(x) if x < 1 => return Err(ApiError::bad(max_field, format!("must be at least 1, got {x}"))),
        Some(x) if x as u64 > room as u64 => {
            return Err(ApiError::bad(
                max_field,
                format!(
                "{x} tokens asked, but this model's maximum context length is {} tokens and the prompt has {longest}",
                info.max_seq_len
            ),
            ))
        }
        Some(x) => x as usize,
        // OpenAI's defaults: 16 for completions; for chat, as long as the context allows.
        None if kind == Kind::Completion => 16.min(room),
        None => room,
    };
    let temperature = f.num("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad("temperature", format!("must be between 0 and 2, got {temperature}")));
    }
    let top_p = f.num("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p", format!("must be in (0, 1], got {top_p}")));
    }
    // vLLM's convention: -1 (or 0) is no top-k filter.
    let top_k = match f.int("top_k")? {
        None | Some(-1) => 0,
        Some(k) if k < -1 => return Err(ApiError::bad("top_k", format!("must be -1 (off), 0 (off) or more, got {k}"))),
        Some(k) => k as usize,
    };
    let seed = f.int("seed")?.map(|s| s as u64);
    let stop_strings: Vec<String> = match f.get("stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::bad(&format!("stop[{i}]"), format!("must be a string, got {}", type_name(s)))
                })
            })
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::bad("stop", format!("must be a string or an array of strings, got {}", type_name(v))))
        }
    };
    if let Some(i) = stop_strings.iter().position(String::is_empty) {
        return Err(ApiError::bad(&format!("stop[{i}]"), "an empty stop string would stop at once"));
    }
    if !stop_strings.is_empty() && tok.is_none() {
        return Err(ApiError::bad(
            "stop",
            "needs a tokenizer to match text, and this model has none (use stop_token_ids)",
        ));
    }
    let stop_token_ids = match f.get("stop_token_ids") {
        None => Vec::new(),
        Some(Value::Array(a)) => token_ids("stop_token_ids", a, vocab)?,
        Some(v) => {
            return Err(ApiError::bad("stop_token_ids", format!("must be an array of token ids, got {}", type_name(v))))
        }
    };
    let n = f.int_in("n", 1, MAX_CHOICES as i64)?.unwrap_or(1);
    if n * prompts.len() > MAX_CHOICES {
        return Err(ApiError::bad("n", format!("{n} completions of {} prompts exceed {MAX_CHOICES}", prompts.len())));
    }
    if let Some(b) = f.int("best_of")? {
        if b as usize != n {
            return Err(ApiError::bad("best_of", "is not supported (only equal to n)"));
        }
    }
    let stream = f.boolean("stream")?.unwrap_or(false);
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(_) if !stream => return Err(ApiError::bad("stream_options", "is only allowed with stream: true")),
        Some(Value::Object(o)) => Fields { obj: o }
            .boolean("include_usage")
            .map_err(|e| ApiError::bad("stream_options.include_usage", e.message))?
            .unwrap_or(false),
        Some(v) => return Err(ApiError::bad("stream_options", format!("must be an object, got {}", type_name(v)))),
    };
    let max_lp = MAX_LOGPROBS as i64;
    let (logprobs, top) = match kind {
        // Completions: `logprobs` is the number of alternatives (0: only the chosen token's).
        Kind::Completion => match f.int_in("logprobs", 0, max_lp)? {
            Some(k) => (true, k),
            None => (false, 0),
        },
        Kind::Chat => {
            let on = f.boolean("logprobs")?.unwrap_or(false);
            let top = f.int_in("top_logprobs", 0, max_lp)?;
            if top.is_some() && !on {
                return Err(ApiError::bad("top_logprobs", "needs logprobs: true"));
            }
            (on, top.unwrap_or(0))
        }
    };
    let min_tokens = f.int("min_tokens")?.unwrap_or(0);
    if min_tokens < 0 || min_tokens as usize > max_tokens {
        return Err(ApiError::bad(
            "min_tokens",
            format!("must be between 0 and max_tokens ({max_tokens}), got {min_tokens}"),
        ));
    }
    let sampling = SamplingParams {
        max_new_tokens: max_tokens,
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed,
        stop_token_ids,
        stop_strings,
        min_tokens: min_tokens as usize,
        logprobs: logprobs.then_some(top),
    };
    Ok(Job {
        kind,
        prompts,
        n,
        sampling,
        ignore_eos: f.boolean("ignore_eos")?.unwrap_or(false),
        stream,
        include_usage,
        logprobs,
    })
}

/// `messages`: a non-empty array of `{role, content}`, content a string or an array of text
/// parts.
fn chat_messages(f: &Fields) -> Result<Vec<ChatMessage>, ApiError> {
    let arr = match f.get("messages") {
        None => return Err(ApiError::bad("messages", "is required")),
        Some(Value::Array(a)) if a.is_empty() => return Err(ApiError::bad("messages", "must not be empty")),
        Some(Value::Array(a)) => a,
        Some(v) => return Err(ApiError::bad("messages", format!("must be an array, got {}", type_name(v)))),
    };
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |k: &str| format!("messages[{i}].{k}");
            let o = m.as_object().ok_or_else(|| ApiError::bad(&format!("messages[{i}]"), "must be an object"))?;
            let role = match o.get("role") {
                Some(Value::String(r))
                    if ["system", "user", "assistant", "developer", "tool"].contains(&r.as_str()) =>
                {
                    r.clone()
                }
                Some(Value::String(r)) => {
                    return Err(ApiError::bad(
                        &at("role"),
                        format!("`{r}` is not one of system, user, assistant, developer, tool"),
                    ))
                }
                _ => return Err(ApiError::bad(&at("role"), "is required (a string)")),
            };
            let content = match o.get("content") {
                None | Some(Value::Null) if role == "assistant" => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .enumerate()
                    .map(|(j, p)| {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => Ok(t),
                            _ => Err(ApiError::bad(
                                &format!("messages[{i}].content[{j}]"),
                                "only {\"type\": \"text\", \"text\": ...} parts are supported",
                            )),
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .concat(),
                _ => return Err(ApiError::bad(&at("content"), "is required (a string or an array of text parts)")),
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// Log-probabilities of a run of tokens in the endpoint's format: chat's `{"content": [...]}`
/// or completions' parallel lists.
pub fn logprobs_json(kind: Kind, info: &LlmInfo, tokens: &[(i64, &TokenLogprobs)], text_offset: usize) -> Value {
    let piece = |id: i64| info.tokenizer.as_ref().map(|t| t.decode(&[id])).unwrap_or_else(|| id.to_string());
    match kind {
        Kind::Chat => {
            let entry = |id: i64, lp: f32| {
                let s = piece(id);
                json!({"token": s, "logprob": lp, "bytes": s.as_bytes()})
            };
            let content: Vec<Value> = tokens
                .iter()
                .map(|(id, l)| {
                    let mut e = entry(*id, l.logprob);
                    e["top_logprobs"] = l.top.iter().map(|&(t, lp)| entry(t, lp)).collect();
                    e
                })
                .collect();
            json!({"content": content})
        }
        Kind::Completion => {
            let mut offset = text_offset;
            let mut offsets = Vec::new();
            let mut strs = Vec::new();
            for (id, _) in tokens {
                let s = piece(*id);
                offsets.push(offset);
                offset += s.len();
                strs.push(s);
            }
            let top: Vec<Value> = tokens
                .iter()
                .map(|(_, l)| {
                    // Keyed by text: where two tokens decode alike, the likelier (first) stays.
                    let mut m = Map::new();
                    for &(t, lp) in &l.top {
                        m.entry(piece(t)).or_insert(json!(lp));
                    }
                    Value::Object(m)
                })
                .collect();
            json!({
                "tokens": strs,
                "token_logprobs": tokens.iter().map(|(_, l)| l.logprob).collect::<Vec<_>>(),
                "top_logprobs": top,
                "text_offset": offsets,
            })
        }
    }
}

/// One finished choice of a non-streamed response.
pub fn choice(kind: Kind, index: usize, c: &Completion, logprobs: Option<Value>) -> Value {
    let text = c.text.clone().unwrap_or_default();
    let reason = finish_reason(c.finish);
    match kind {
        Kind::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}),
        Kind::Chat => json!({
            "index": index,
            "message": {"role": "assistant", "content": text},
            "logprobs": logprobs,
            "finish_reason": reason,
        }),
    }
}

/// A streamed chunk's choice: new text (and log-probabilities), or the finish reason.
pub fn chunk_choice(kind: Kind, index: usize, text: &str, logprobs: Option<Value>, finish: Option<&str>) -> Value {
    match kind {
        Kind::Completion => json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}),
        Kind::Chat => {
            let delta = if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) };
            json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> LlmInfo {
        LlmInfo {
            model: "m".into(),
            tokenizer: None,
            eos_ids: Vec::new(),
            vocab_size: Some(100),
            max_seq_len: 64,
            max_new_tokens: 16,
            capacity: 8,
            created: 0,
        }
    }

    fn err(kind: Kind, body: Value) -> ApiError {
        parse(kind, body.to_string().as_bytes(), &info()).expect_err("should be refused")
    }

    #[test]
    fn each_bad_field_is_named() {
        let c = Kind::Completion;
        let cases: Vec<(Kind, Value, &str)> = vec![
            (c, json!({"prompt": [1, 2], "max_tokens": -3}), "max_tokens"),
            (c, json!({"prompt": [1, 2], "max_tokens": "ten"}), "max_tokens"),
            (c, json!({"prompt": [1, 2], "max_tokens": 63}), "max_tokens"),
            (c, json!({"prompt": [1, 200]}), "prompt[1]"),
            (c, json!({"prompt": [[1], [2, -1]]}), "prompt[1][1]"),
            (c, json!({"prompt": (0..64).collect::<Vec<_>>()}), "prompt"),
            (c, json!({"prompt": []}), "prompt"),
            (c, json!({"prompt": {"a": 1}}), "prompt"),
            (c, json!({}), "prompt"),
            (c, json!({"prompt": [1], "temperature": 3}), "temperature"),
            (c, json!({"prompt": [1], "temperature": "hot"}), "temperature"),
            (c, json!({"prompt": [1], "top_p": 0}), "top_p"),
            (c, json!({"prompt": [1], "n": 0}), "n"),
            (c, json!({"prompt": [1], "stop_token_ids": [5, 100]}), "stop_token_ids[1]"),
            (c, json!({"prompt": [1], "stop": "x"}), "stop"),
            (c, json!({"prompt": [1], "stop": 5}), "stop"),
            (c, json!({"prompt": [1], "logprobs": 21}), "logprobs"),
            (c, json!({"prompt": [1], "stream_options": {"include_usage": true}}), "stream_options"),
            (c, json!({"prompt": [1], "min_tokens": 17}), "min_tokens"),
            (c, json!({"prompt": [1], "presence_penalty": 0.5}), "presence_penalty"),
            (c, json!({"prompt": [1], "model": "other"}), "model"),
            (c, json!({"prompt": [1], "stream": "yes"}), "stream"),
            (Kind::Chat, json!({"messages": []}), "messages"),
            (Kind::Chat, json!({"messages": "hi"}), "messages"),
            (Kind::Chat, json!({"messages": [{"role": "wizard", "content": "x"}]}), "messages[0].role"),
            (Kind::Chat, json!({"messages": [{"role": "user"}]}), "messages[0].content"),
        ];
        for (kind, body, field) in cases {
            let e = err(kind, body.clone());
            assert_eq!(e.param.as_deref(), Some(field), "{body}: {e:?}");
            let status = if field == "model" { 404 } else { 400 };
            assert_eq!(e.status, status, "{body}");
            assert!(e.body()["error"]["message"].as_str().unwrap().starts_with(field), "{:?}", e.body());
        }
        assert_eq!(
            parse(c, b"{not json", &info()).unwrap_err().status,
            400,
            "a body that is not JSON is a bad request"
        );
    }

    #[test]
    fn defaults_and_conversions() {
        let j = parse(
            Kind::Completion,
            json!({"prompt": [[1, 2], [3]], "n": 2, "top_k": -1, "seed": 7, "stop_token_ids": [9], "logprobs": 2, "unknown": 1})
                .to_string()
                .as_bytes(),
            &info(),
        )
        .unwrap();
        assert_eq!(j.prompts, vec![vec![1, 2], vec![3]]);
        assert_eq!((j.n, j.sampling.top_k, j.sampling.seed, j.sampling.max_new_tokens), (2, 0, Some(7), 16));
        assert_eq!((j.sampling.temperature, j.sampling.logprobs, j.logprobs), (1.0, Some(2), true));
        assert_eq!(j.sampling.stop_token_ids, vec![9]);
        let j = parse(Kind::Completion, br#"{"prompt": [1], "max_tokens": 5, "temperature": 0}"#, &info()).unwrap();
        assert_eq!((j.sampling.max_new_tokens, j.sampling.temperature, j.sampling.logprobs), (5, 0.0, None));
    }
}

//! SmolLM2-135M-Instruct from its real GGUF file (Q4_1 linears, Q8_0 embeddings) against
//! transformers running the same file (tests/fixtures/make_smollm2_reference.py).
//!
//! The 98 MB GGUF is not committed: `scripts/fetch-smollm2.sh` puts it in `.cache/models/`
//! (CI runs it first). Without it the tests say so and pass only outside CI.

mod common;

use std::path::PathBuf;

use autodeploy_core::registry::{self, ImportRequest};
use autodeploy_core::runtime::Request;
use autodeploy_core::sampling::SamplingParams;
use autodeploy_core::DType;
use common::*;

pub fn smollm2_gguf() -> Option<PathBuf> {
    let p = std::env::var_os("AUTODEPLOY_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.is_file() {
        return Some(p);
    }
    assert!(std::env::var_os("CI").is_none(), "{} is missing in CI: .ci/run must fetch it", p.display());
    eprintln!("SKIPPED: {} not found; run scripts/fetch-smollm2.sh", p.display());
    None
}

/// Max |ours − transformers| over the prompt's logits. Both dequantize the same blocks to f32 and
/// run f32 math, so what differs is accumulation order over 30 layers.
const LOGITS_MAX_ABS: f32 = 1e-3;

#[test]
fn logits_and_greedy_tokens_match_transformers_on_the_gguf() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let r = Reference::load("smollm2");
    let (_, prompt) = r.i64("prompt_ids");
    let (lshape, want) = r.f32("logits");
    let req = ImportRequest { path: path.clone(), dtype: Some(DType::F32), max_batch_size: 1, max_seq_len: 256 };
    let g = registry::importer("gguf").unwrap().import(&req).unwrap();
    let mut m = compile(&g);
    let got = logits(m.as_mut(), &[1, prompt.len()], &prompt);
    let vocab = lshape[1];
    let (_, am) = r.i64("argmax");
    for (row, a) in got.chunks(vocab).enumerate() {
        assert_eq!(argmax(a) as i64, am[row], "argmax differs at position {row}");
    }
    // The reference keeps the logits of the last rows.
    let tail = &got[got.len() - want.len()..];
    let max_abs = tail.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    eprintln!("smollm2 logits: max abs error {max_abs:.3e} over the last {} positions", lshape[0]);
    assert!(max_abs <= LOGITS_MAX_ABS, "max abs error {max_abs} > {LOGITS_MAX_ABS}");

    // The same with the Q4_1/Q8_0 weights kept as stored (`dtype = auto`): the kernels read the
    // blocks directly, the arithmetic is the same up to summation order.
    let req = ImportRequest { path: path.clone(), dtype: None, max_batch_size: 1, max_seq_len: 256 };
    let gq = registry::importer("gguf").unwrap().import(&req).unwrap();
    assert!(gq.dump().contains("q4_1["), "linears should stay block-quantized");
    let mut mq = compile(&gq);
    // One token at a time exercises the decode kernel (few rows), the whole prompt the GEMM path.
    let gotq = logits(mq.as_mut(), &[1, prompt.len()], &prompt);
    let tailq = &gotq[gotq.len() - want.len()..];
    let dq = tailq.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    eprintln!("smollm2 logits, quantized weights: max abs error {dq:.3e}");
    assert!(dq <= LOGITS_MAX_ABS, "quantized path: max abs error {dq}");
    let last = &prompt[prompt.len() - 3..];
    let few = logits(mq.as_mut(), &[1, last.len()], last);
    let few_f32 = logits(m.as_mut(), &[1, last.len()], last);
    let d3 = few.iter().zip(&few_f32).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d3 <= LOGITS_MAX_ABS, "decode kernel vs f32: {d3}");

    // 32 greedy tokens through the whole pipeline (transforms, KV cache, demollm; auto dtype).
    let (_, greedy) = r.i64("greedy_ids");
    let toml = format!("model = {:?}\nmax_seq_len = 256\nmax_batch_size = 2\n", path.display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
    assert!(e.cache.is_some());
    let mut rt = autodeploy_core::runtime::runtime(&cfg).unwrap();
    let req = Request {
        prompt: prompt.clone(),
        sampling: SamplingParams { max_new_tokens: greedy.len(), ..Default::default() },
    };
    let (out, _) = rt.generate(&mut e, &[req]);
    assert_eq!(out[0].as_ref().unwrap().tokens, greedy);
}

#[test]
fn tokenizer_from_gguf_metadata_matches_transformers() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let tok = registry::importer("gguf").unwrap().tokenizer(&path).unwrap().expect("the GGUF carries a tokenizer");
    let refs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2").join("tokenization.json")).unwrap()).unwrap();
    for case in refs["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<i64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "tokenization of {text:?}");
        assert_eq!(tok.decode(&want), text, "round trip of {text:?}");
    }
    // The chat template renders the prompt transformers rendered.
    let msgs: Vec<autodeploy_core::tokenizer::ChatMessage> = refs["chat_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| autodeploy_core::tokenizer::ChatMessage {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect();
    let rendered = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(rendered, refs["chat_prompt"].as_str().unwrap());
    let r = Reference::load("smollm2");
    assert_eq!(tok.encode(&rendered, true).unwrap(), r.i64("prompt_ids").1);
    // Streaming decode of the greedy answer gives the same text, piece by piece.
    let greedy = r.i64("greedy_ids").1;
    let mut sd = autodeploy_core::tokenizer::StreamDecoder::new(&tok);
    let streamed: String = greedy.iter().filter_map(|&t| sd.push(t)).collect();
    assert_eq!(streamed, refs["greedy_text"].as_str().unwrap());
}

#[test]
fn streaming_never_splits_a_multibyte_character() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let tok = registry::importer("gguf").unwrap().tokenizer(&path).unwrap().unwrap();
    let text = "naïve 日本語 😀👍🏽 ok";
    let ids = tok.encode(text, false).unwrap();
    assert!(ids.len() > text.chars().count() / 2, "emoji should take several byte-level tokens");
    let mut sd = autodeploy_core::tokenizer::StreamDecoder::new(&tok);
    let mut pieces = Vec::new();
    for &i in &ids {
        if let Some(p) = sd.push(i) {
            assert!(!p.contains('\u{FFFD}'), "piece {p:?} holds a broken character");
            pieces.push(p);
        }
    }
    assert_eq!(pieces.concat(), text);
}

#[test]
fn chat_template_errors_name_the_template_problem() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let mut tok = registry::importer("gguf").unwrap().tokenizer(&path).unwrap().unwrap();
    let msgs = vec![autodeploy_core::tokenizer::ChatMessage { role: "user".into(), content: "hi".into() }];
    tok.chat_template = Some("{% for m in messages %}{{ m.content }".into());
    let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
    assert!(e.contains("chat template") && e.contains("syntax"), "{e}");
    tok.chat_template = Some("{{ raise_exception('roles must alternate') }}".into());
    let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
    assert!(e.contains("failed to render") && e.contains("roles must alternate"), "{e}");
    tok.chat_template = None;
    let e = tok.apply_chat_template(&msgs, true).unwrap_err().to_string();
    assert!(e.contains("no chat template"), "{e}");
}

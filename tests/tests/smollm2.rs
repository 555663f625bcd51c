//! SmolLM2-135M-Instruct from its real GGUF file (Q4_1 linears, Q8_0 embeddings) against
//! transformers running the same file (tests/fixtures/make_smollm2_reference.py).
//!
//! The 98 MB GGUF is not committed: `scripts/fetch-smollm2.sh` puts it in `.cache/models/`
//! (CI runs it first). Without it the tests say so and pass only outside CI.

mod common;

use std::path::PathBuf;

use autodeploy_core::backend::ImportRequest;
use autodeploy_core::registry;
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
/// run f32 math, so what differs is accumulation order over 30 layers: measured 9.3e-5 on the
/// development machine; 10x leaves room for other CPUs, where the `gemm` crate picks other
/// (AVX-512) kernels at run time and so another summation order.
const LOGITS_MAX_ABS: f32 = 1e-3;

#[test]
fn logits_and_greedy_tokens_match_transformers_on_the_gguf() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let r = Reference::load("smollm2");
    let (_, prompt) = r.i64("prompt_ids");
    let (lshape, want) = r.f32("logits");
    let req = ImportRequest {
        path: path.clone(),
        dtype: Some(DType::F32),
        max_batch_size: 1,
        max_seq_len: 256,
        dummy_weights: false,
    };
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
    let max_abs = max_abs_diff(tail, &want, "smollm2 logits");
    eprintln!("smollm2 logits: max abs error {max_abs:.3e} over the last {} positions", lshape[0]);
    assert!(max_abs <= LOGITS_MAX_ABS, "max abs error {max_abs} > {LOGITS_MAX_ABS}");

    // The same with the Q4_1/Q8_0 weights kept as stored (`dtype = auto`): the kernels read the
    // blocks directly, the arithmetic is the same up to summation order.
    let req =
        ImportRequest { path: path.clone(), dtype: None, max_batch_size: 1, max_seq_len: 256, dummy_weights: false };
    let gq = registry::importer("gguf").unwrap().import(&req).unwrap();
    assert!(gq.dump().contains("q4_1["), "linears should stay block-quantized");
    let mut mq = compile(&gq);
    // One token at a time exercises the decode kernel (few rows), the whole prompt the GEMM path.
    let gotq = logits(mq.as_mut(), &[1, prompt.len()], &prompt);
    let tailq = &gotq[gotq.len() - want.len()..];
    let dq = max_abs_diff(tailq, &want, "smollm2 logits, blocks kept");
    eprintln!("smollm2 logits, quantized weights: max abs error {dq:.3e}");
    assert!(dq <= LOGITS_MAX_ABS, "quantized path: max abs error {dq}");
    let last = &prompt[prompt.len() - 3..];
    let few = logits(mq.as_mut(), &[1, last.len()], last);
    let few_f32 = logits(m.as_mut(), &[1, last.len()], last);
    let d3 = max_abs_diff(&few, &few_f32, "decode kernel vs f32");
    assert!(d3 <= LOGITS_MAX_ABS, "decode kernel vs f32: {d3}");

    // 32 greedy tokens through the whole pipeline (transforms, KV cache, demollm; auto dtype).
    let (_, greedy) = r.i64("greedy_ids");
    let toml = format!("model = {:?}\nmax_seq_len = 256\nmax_batch_size = 2\n", path.display().to_string());
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
    assert!(e.cache.is_some());
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    let req = Request {
        prompt: prompt.clone(),
        sampling: SamplingParams { max_new_tokens: greedy.len(), ..Default::default() },
    };
    let (out, _) = rt.generate(&mut e, std::slice::from_ref(&req));
    assert_eq!(out[0].as_ref().unwrap().tokens, greedy);
    // The same through `trtllm`, its 42-token prompt prefilled in chunks of 16 beside a second
    // request's decodes: transformers' tokens again, and the second request's are demollm's.
    let other =
        Request { prompt: prompt[..7].to_vec(), sampling: SamplingParams { max_new_tokens: 24, ..Default::default() } };
    let demo_other = rt.generate(&mut e, std::slice::from_ref(&other)).0.remove(0).unwrap().tokens;
    let toml = format!("{toml}runtime = \"trtllm\"\nmax_num_tokens = 16\n");
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
    let (out, stats) = autodeploy_core::registry::runtime(&cfg).unwrap().generate(&mut e, &[other, req]);
    assert_eq!(stats.max_step_tokens, 16, "{stats:?}");
    assert_eq!(out[0].as_ref().unwrap().tokens, demo_other, "trtllm vs demollm");
    assert_eq!(out[1].as_ref().unwrap().tokens, greedy, "trtllm vs transformers");
}

/// The logits of every prompt position, computed the way decode computes them: one token per
/// step through the cached engine, so every linear takes the few-row (decode) kernels.
fn logits_token_by_token(e: &mut autodeploy_core::pipeline::Engine, prompt: &[i64]) -> Vec<f32> {
    use autodeploy_core::kvcache::{BatchMetadata, PagedKvCache, StepContext, StepPlan};
    use autodeploy_core::Tensor;
    let page = 16;
    let mut cache = PagedKvCache::new(e.cache.clone().expect("cached engine"), page);
    let pages = prompt.len().div_ceil(page);
    cache.ensure_pages(pages);
    let input = |name: &str| e.graph.inputs.iter().position(|&v| e.graph.value(v).name == name).unwrap();
    let (ids_at, pos_at, gather_at) = (input("input_ids"), input("position_ids"), input("logits_gather_idx"));
    let mut out = Vec::new();
    for (i, &tok) in prompt.iter().enumerate() {
        let meta =
            BatchMetadata { seq_lens: vec![1], cached_lens: vec![i], page_tables: vec![(0..pages as u32).collect()] };
        let plan = StepPlan::new(&meta, page).unwrap();
        let mut inputs = vec![Tensor::from_i64(vec![0], vec![]).unwrap(); e.graph.inputs.len()];
        inputs[ids_at] = Tensor::from_i64(vec![1, 1], vec![tok]).unwrap();
        inputs[pos_at] = Tensor::from_i64(vec![1, 1], vec![i as i64]).unwrap();
        inputs[gather_at] = Tensor::from_i64(vec![1], vec![0]).unwrap();
        let mut cx = StepContext { plan: &plan, cache: &mut cache };
        out.extend_from_slice(&e.model.forward(&inputs, Some(&mut cx)).unwrap()[0].to_f32());
    }
    out
}

/// `activation_quant = "int8"` rounds each 32-value block of a decode-sized linear's input to
/// int8 (llama.cpp's method), so its logits move further from transformers' than the exact
/// kernels' do. The tolerance is llama.cpp's own error on the same file and prompt: its max
/// |logit error| against the same reference is 1.023 fed the whole prompt and 1.499 fed one
/// token at a time (llama-cpp-python 0.3.36, `python benches/smollm2_llama_cpp_error.py
/// [--batch 1]`, 2026-11-27). Ours must stay within that, and the argmax may differ only at
/// near-ties: positions where our logits of the two tokens are within `INT8_NEAR_TIE`, the
/// typical size of the int8 mode's logit noise: fed this prompt token by token, the int8 logits
/// differ from the exact kernels' by 0.287 (portable), 0.294 (avx2) and 0.303 (avx512vnni) on
/// average (2026-12-02, Intel Xeon); llama.cpp's own flip on this prompt is at a gap of 0.094.
const INT8_LOGITS_MAX_ABS: f32 = 1.5;
const INT8_NEAR_TIE: f32 = 0.3;

/// On every CPU kernel path this CPU runs (`cpu_kernels`: portable, avx2, avx512vnni): the
/// exact kernels stay within the exact bound and generate the reference's greedy tokens (the
/// exact answer does not depend on the path); the int8 ones stay within their bound, their
/// argmax differing from the reference's only at near-ties, over the prompt and over the
/// reference's greedy continuation.
#[test]
fn int8_activations_stay_within_their_tolerance() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let r = Reference::load("smollm2");
    let (_, prompt) = r.i64("prompt_ids");
    let (lshape, want) = r.f32("logits");
    let (_, am) = r.i64("argmax");
    let (_, greedy) = r.i64("greedy_ids");
    let vocab = lshape[1];
    let paths: Vec<_> =
        autodeploy_kernels::isa::CpuKernels::ALL.into_iter().filter(|k| k.supported()).map(|k| k.name()).collect();
    eprintln!("smollm2: CPU kernel paths {paths:?}");
    for kernels in paths {
        let config = |act: &str| {
            let toml = format!(
                "model = {:?}\nmax_seq_len = 256\nmax_batch_size = 1\nactivation_quant = {act:?}\ncpu_kernels = {kernels:?}\n",
                path.display().to_string()
            );
            autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap()
        };
        let mut errors = Vec::new();
        for act in ["none", "int8"] {
            let cfg = config(act);
            let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
            let got = logits_token_by_token(&mut e, &prompt);
            let differ: Vec<usize> = got
                .chunks(vocab)
                .enumerate()
                .filter(|(row, a)| argmax(a) as i64 != am[*row])
                .map(|(row, _)| row)
                .collect();
            for &row in &differ {
                let a = &got[row * vocab..(row + 1) * vocab];
                let gap = a[argmax(a)] - a[am[row] as usize];
                eprintln!(
                    "{kernels}, activation_quant = {act}: position {row} picks {} over the reference's {} by {gap:.3}",
                    argmax(a),
                    am[row]
                );
                assert!(
                    act == "int8" && gap <= INT8_NEAR_TIE,
                    "{kernels}, activation_quant = {act}: argmax differs at position {row}"
                );
            }
            assert!(differ.len() <= 2, "{kernels}, activation_quant = {act}: argmax differs at {differ:?}");
            let tail = &got[got.len() - want.len()..];
            let d = max_abs_diff(tail, &want, "smollm2 decode-path logits");
            eprintln!("smollm2 decode-path logits, {kernels}, activation_quant = {act}: max abs error {d:.3e}");
            errors.push(d);

            if act == "none" {
                // Greedy generation after the prompt, as `autodeploy --config` runs it.
                let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
                let req = Request {
                    prompt: prompt.clone(),
                    sampling: SamplingParams { max_new_tokens: greedy.len(), ..Default::default() },
                };
                let (out, _) = rt.generate(&mut e, &[req]);
                let toks = &out[0].as_ref().unwrap().tokens;
                let same = toks.iter().zip(&greedy).take_while(|(a, b)| a == b).count();
                assert_eq!(toks, &greedy, "{kernels}: exact kernels' greedy tokens diverge at {same}");
            } else {
                // Int8 rounding is chaotic (one flipped rounding moves the later ones), so a
                // free-running generation may part from the reference at a near-tie and never
                // return. Teacher-forced instead: fed the reference's greedy continuation, each
                // step picks the reference's next token, or misses it only at a near-tie.
                let fed: Vec<i64> = prompt.iter().chain(&greedy[..greedy.len() - 1]).copied().collect();
                let got = logits_token_by_token(&mut e, &fed);
                for (i, &next) in greedy.iter().enumerate() {
                    let row = prompt.len() - 1 + i;
                    let a = &got[row * vocab..(row + 1) * vocab];
                    let gap = a[argmax(a)] - a[next as usize];
                    assert!(
                        gap <= INT8_NEAR_TIE,
                        "{kernels}, int8: generated token {i} picks {} over the reference's {next} by {gap:.3}",
                        argmax(a)
                    );
                }
            }
        }
        assert!(errors[0] <= LOGITS_MAX_ABS, "{kernels}: exact decode kernels: max abs error {}", errors[0]);
        assert!(errors[1] > errors[0], "{kernels}: int8 activations changed nothing: the int8 kernels did not run");
        assert!(
            errors[1] <= INT8_LOGITS_MAX_ABS,
            "{kernels}: int8 activations: max abs error {} > {INT8_LOGITS_MAX_ABS}",
            errors[1]
        );
    }
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

/// Greedy tokens of an FP8 model may part from the reference's only where our logits hold both
/// tokens closer than this.
const FP8_TIE: f32 = 0.5;

/// The perplexity of `ids` under a model: exp of the mean negative log-likelihood of each token
/// given the ones before it (one forward over all of them, positions from 0).
fn perplexity(model: &mut dyn autodeploy_core::backend::CompiledModel, ids: &[i64]) -> f64 {
    let got = logits(model, &[1, ids.len()], ids);
    let vocab = got.len() / ids.len();
    let nll: f64 = got
        .chunks(vocab)
        .zip(&ids[1..])
        .map(|(row, &next)| {
            let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            lse - row[next as usize] as f64
        })
        .sum();
    (nll / (ids.len() - 1) as f64).exp()
}

/// `quantize = "fp8"` on SmolLM2 (the GGUF dequantized to f32 at load, then every linear but
/// the LM head FP8) against tests/fixtures/make_smollm2_fp8_reference.py, which quantizes
/// transformers' model of the same file the same way: the greedy tokens after the chat prompt
/// the same for 32 tokens, or parting only where ours are a near-tie (an E4M3 rounding of an
/// activation can land either side in two summation orders, and over 30 layers that moves a
/// logit by a few hundredths), and the perplexity over 2048 tokens of the GNU GPL v3 text
/// (tests/fixtures/text) equal to the reference's within 0.5%, the float model's within 0.1%.
/// Measured 2026-12-04: f32 19.6606 vs 19.6604; FP8 20.0828 vs 20.1404 (0.29%); FP8 is 2.15%
/// above f32 (the target is 1%); greedy tokens equal for 19 tokens, then two tokens
/// 0.19 apart in our logits.
#[test]
fn fp8_at_load_matches_its_reference_tokens_and_perplexity() {
    let Some(path) = smollm2_gguf() else { return };
    autodeploy_plugins::link();
    let bytes = std::fs::read(fixture("smollm2").join("fp8.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ids = |name: &str| -> Vec<i64> {
        st.tensor(name).unwrap().data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2").join("fp8.json")).unwrap()).unwrap();
    let (prompt, want, text) = (ids("prompt_ids"), ids("greedy_ids"), ids("text_ids"));
    let config = |quant: &str| {
        format!(
            "model = {:?}\ndtype = \"float32\"\nmax_seq_len = 2048\nmax_batch_size = 1\n{quant}",
            path.display().to_string()
        )
    };
    let mut ppl = Vec::new();
    let mut fp8 = None;
    for (quant, key) in [("", "perplexity_f32"), ("quantize = \"fp8\"\n", "perplexity_fp8")] {
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&config(quant), None).unwrap();
        let g = autodeploy_core::pipeline::graph_after(&cfg, autodeploy_sdk::Stage::PostLoadFusion).unwrap();
        let mut model = compile(&g);
        let p = perplexity(model.as_mut(), &text);
        fp8 = Some(model);
        let reference = info[key].as_f64().unwrap();
        eprintln!("SmolLM2 {key}: ours {p:.4}, reference {reference:.4}");
        let bound = if quant.is_empty() { 1e-3 } else { 5e-3 };
        assert!((p / reference - 1.0).abs() < bound, "{key}: {p} vs the reference's {reference}");
        ppl.push(p);
    }
    eprintln!("SmolLM2 FP8 perplexity {:.4} vs f32 {:.4}: {:+.2}%", ppl[1], ppl[0], (ppl[1] / ppl[0] - 1.0) * 100.0);
    // Greedy through the whole engine (cached attention, the runtime).
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&config("quantize = \"fp8\"\n"), None).unwrap();
    let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
    let mut rt = registry::runtime(&cfg).unwrap();
    let req = Request {
        prompt: prompt.clone(),
        sampling: SamplingParams { max_new_tokens: want.len(), ..Default::default() },
    };
    let out = rt.generate(&mut e, &[req]).0;
    let got = &out[0].as_ref().unwrap().tokens;
    let Some(j) = got.iter().zip(&want).position(|(a, b)| a != b) else { return };
    // Where they part, our logits after the common prefix must hold both tokens within a tie.
    let mut seq = prompt.clone();
    seq.extend(&want[..j]);
    let all = logits(fp8.as_mut().unwrap().as_mut(), &[1, seq.len()], &seq);
    let row = &all[all.len() - all.len() / seq.len()..];
    let margin = row[got[j] as usize] - row[want[j] as usize];
    eprintln!(
        "SmolLM2 FP8 greedy: equal for {j} tokens, then {} vs the reference's {} ({margin:.3} apart)",
        got[j], want[j]
    );
    assert!(j >= 16 && margin.abs() < FP8_TIE, "greedy tokens part at {j}: {got:?} vs {want:?}, {margin} apart");
}

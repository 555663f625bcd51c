//! `LLM` from Rust: the serve fixture's greedy continuations against transformers', requests
//! joining a running engine, and an abandoned submission's pages returned.

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::runtime::FinishReason;
use autodeploy_core::sampling::SamplingParams;
use autodeploy_serve::{Output, LLM};

fn fixture() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/serve")
}

fn llm(runtime: &str) -> LLM {
    // In flight, prompts are prefilled in chunks of up to 16 tokens beside the decodes; demollm
    // prefills whole prompts.
    let budget = if runtime == "trtllm" { "max_num_tokens = 16" } else { "" };
    let text = format!(
        "model = {:?}\ndtype = \"float32\"\nruntime = \"{runtime}\"\nmax_seq_len = 256\nmax_batch_size = 4\n{budget}\n",
        fixture().display().to_string()
    );
    LLM::new(&PipelineConfig::from_toml_str(&text, None).unwrap()).unwrap()
}

fn reference() -> Vec<(Vec<i64>, Vec<i64>)> {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect::<Vec<_>>();
    r["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy"]))).collect()
}

#[test]
fn streams_transformers_greedy_tokens_under_both_runtimes() {
    let refs = reference();
    assert!(refs.len() >= 4);
    for runtime in ["trtllm", "demollm"] {
        let llm = llm(runtime);
        let params = SamplingParams { max_new_tokens: refs[0].1.len(), ..Default::default() };
        // All submitted at once: they run together in the engine's batches.
        let reqs = refs
            .iter()
            .map(|(p, _)| autodeploy_core::runtime::Request { prompt: p.clone(), sampling: params.clone() })
            .collect();
        let subs = llm.submit_all(reqs).unwrap();
        for (mut sub, (_, want)) in subs.into_iter().zip(&refs) {
            let (mut streamed, mut text) = (Vec::new(), String::new());
            let done = loop {
                match sub.blocking_next().expect("outputs until Finished") {
                    Output::Accepted => assert!(streamed.is_empty(), "Accepted comes first"),
                    Output::Token { token, text: piece, .. } => {
                        streamed.push(token);
                        text.push_str(&piece);
                    }
                    Output::Finished(r) => break r.unwrap(),
                }
            };
            assert_eq!(&streamed, want, "{runtime}: streamed tokens");
            assert_eq!(&done.tokens, want, "{runtime}: the completion's tokens");
            assert_eq!(done.finish, FinishReason::Length);
            let full = done.text.unwrap();
            assert!(full.starts_with(&text), "{runtime}: streamed text {text:?} is not a prefix of {full:?}");
            assert!(sub.blocking_next().is_none(), "nothing after Finished");
        }
        let m = llm.metrics();
        assert_eq!((m.pages_used, m.running, m.waiting), (0, 0, 0), "{runtime}");
        assert_eq!(m.finished_length, refs.len() as u64);
    }
}

#[test]
fn generate_and_an_abandoned_submission() {
    let llm = llm("trtllm");
    let params = SamplingParams { max_new_tokens: 200, ..Default::default() };
    let mut long = llm.submit(llm.text_request("Once upon a time", &params, true).unwrap()).unwrap();
    // Wait for it to run, then let go of it mid-generation.
    while !matches!(long.blocking_next(), Some(Output::Token { .. })) {}
    assert!(llm.metrics().pages_used > 0);
    drop(long);
    // Other requests go on; `generate` waits for its own.
    let out = llm.generate(&["The quick brown fox", "1, 2, 3, 4,"], &SamplingParams::default()).unwrap();
    assert_eq!(out.len(), 2);
    for c in out {
        assert!(!c.unwrap().tokens.is_empty());
    }
    let m = llm.metrics();
    assert_eq!(m.finished_abort, 1, "the dropped submission was aborted");
    assert!(m.generation_tokens < 200 + 32, "it stopped generating: {} tokens", m.generation_tokens);
    assert_eq!(m.pages_used, 0);
    // A bad request is refused through its own outputs, naming the field.
    let bad = autodeploy_core::runtime::Request { prompt: vec![5, 100_000], sampling: SamplingParams::default() };
    match llm.submit(bad).unwrap().blocking_next() {
        Some(Output::Finished(Err(e))) => assert!(e.to_string().contains("prompt"), "{e}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    llm.shutdown();
}

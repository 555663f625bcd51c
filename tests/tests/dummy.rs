//! `load_format = "dummy"`: a model from its config.json alone, with random weights.

mod common;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use common::*;

fn config(model: &std::path::Path) -> PipelineConfig {
    let toml = format!(
        "model = {:?}\nload_format = \"dummy\"\ndtype = \"float32\"\nmax_batch_size = 1\nmax_seq_len = 64\n",
        model.display().to_string()
    );
    PipelineConfig::from_toml_str(&toml, None).unwrap()
}

#[test]
fn a_config_alone_builds_a_runnable_deterministic_model() {
    autodeploy_plugins::link();
    // The real SmolLM2-135M config.json (tests/fixtures/configs), no weights beside it.
    let dir = fixture("configs/SmolLM2-135M-Instruct");
    assert!(!dir.join("model.safetensors").exists());
    let cfg = config(&dir);
    let g = pipeline::graph_after(&cfg, autodeploy_sdk::Stage::PostLoadFusion).unwrap();
    assert!(g.history[0].contains("hf importer"), "{:?}", g.history);
    let mut a = pipeline::build(&cfg).unwrap();
    let mut b = pipeline::build(&cfg).unwrap();
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    let req = autodeploy_core::runtime::Request {
        prompt: vec![1, 2, 3, 4],
        sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: 6, ..Default::default() },
    };
    let (ra, _) = rt.generate(&mut a, std::slice::from_ref(&req));
    let (rb, _) = rt.generate(&mut b, &[req]);
    let (ta, tb) = (ra[0].as_ref().unwrap(), rb[0].as_ref().unwrap());
    assert_eq!(ta.tokens.len(), 6);
    assert!(ta.tokens.iter().all(|&t| (0..49152).contains(&t)), "{:?}", ta.tokens);
    assert_eq!(ta.tokens, tb.tokens, "the same names give the same random weights");

    // The weights have the config's shapes and sane magnitudes: norms 1, others within ±1/√fan_in.
    let w = g.weights.load("model.layers.0.mlp.down_proj.weight", autodeploy_core::DType::F32).unwrap();
    assert_eq!(w.shape(), &[576, 1536]);
    let bound = 1.0 / (1536f32).sqrt();
    assert!(w.to_f32().iter().all(|v| v.abs() <= bound) && w.to_f32().iter().any(|v| v.abs() > bound / 2.0));
    let n = g.weights.load("model.norm.weight", autodeploy_core::DType::F32).unwrap();
    assert!(n.to_f32().iter().all(|&v| v == 1.0));
}

#[test]
fn dummy_weights_need_a_config_json() {
    autodeploy_plugins::link();
    let gguf = fixture("gguf/tiny-mistral.gguf");
    let e = pipeline::build(&config(&gguf)).err().expect("a GGUF file has no config.json").to_string();
    assert!(e.contains("load_format = \"dummy\"") && e.contains("config.json"), "{e}");
}

//! Greedy generation (full recompute per step) equals transformers' `generate` for every family.

mod common;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use common::*;

#[test]
fn greedy_tokens_match_transformers_generate() {
    for fam in FAMILIES {
        let toml =
            format!("model = {:?}\ndtype = \"float32\"\nmax_seq_len = 128\n", fixture(fam).display().to_string());
        let cfg = PipelineConfig::from_toml_str(&toml, None).unwrap();
        let mut engine = pipeline::build(&cfg).unwrap();
        let r = Reference::load(fam);
        let mut j = 0;
        while r.has(&format!("gen_prompt_{j}")) {
            let (_, prompt) = r.i64(&format!("gen_prompt_{j}"));
            let (_, want) = r.i64(&format!("gen_output_{j}"));
            let (got, _) = pipeline::generate_greedy(&mut engine, &prompt, want.len()).unwrap();
            assert_eq!(got, want, "{fam} prompt {j}");
            j += 1;
        }
        assert!(j >= 2, "{fam}: expected generation references");
    }
}

#[test]
fn too_long_a_request_is_refused_with_the_limit() {
    let toml = format!("model = {:?}\nmax_seq_len = 16\n", fixture("qwen2").display().to_string());
    let cfg = PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut engine = pipeline::build(&cfg).unwrap();
    let e = pipeline::generate_greedy(&mut engine, &[5; 10], 7).unwrap_err().to_string();
    assert!(e.contains("max_new_tokens 7") && e.contains("16"), "{e}");
    // A forward longer than the graph's `seq` range names the symbol and the range.
    let ids = autodeploy_core::Tensor::from_i64(vec![1, 20], vec![3; 20]).unwrap();
    let e = engine.model.forward(&[ids.clone(), ids]).unwrap_err().to_string();
    assert!(e.contains("`seq` = 20") && e.contains("[1, 16]"), "{e}");
}

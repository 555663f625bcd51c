//! ModelOpt FP8 and NVFP4 checkpoints (tests/fixtures/make_quant_fixtures.py) against a Python
//! reference that dequantizes the same files: the `quantize` stage's transforms, the quantized
//! linear ops and their CPU kernels.

mod common;

use autodeploy_core::config::PipelineConfig;
use autodeploy_sdk::Stage;
use common::*;

/// The quantized fixtures, the op their linears must become, and how many of those remain
/// once `fuse_gemms` has fused q/k/v and gate/up (2 layers of 4).
const QUANTIZED: &[(&str, &str, usize)] = &[
    ("llama-fp8", "torch_quant_fp8_linear", 8),
    ("qwen3-fp8", "torch_quant_fp8_linear", 8),
    ("mistral-nvfp4", "torch_quant_nvfp4_linear", 8),
    // llama-fp8 with ModelOpt's FP8 KV cache declared (kv_cache_quant_algo, k/v scales).
    ("llama-fp8-kv", "torch_quant_fp8_linear", 8),
];

/// f32 logits against the reference's: the float fixtures' bound. The reference and the engine
/// sum in different orders; were that to move an FP8 linear's input across an E4M3 rounding
/// boundary, the input would differ by one E4M3 step (6%) and this would fail, so a failure
/// here needs a look at the margin before a looser bound. Measured 2026-12-04: FP8 at most
/// 3.3e-6, NVFP4 1.1e-5 (no such flip in the reference sequences).
const QUANT_F32_MAX_ABS: f32 = F32_MAX_ABS;

fn graph_after(fixture_name: &str, stage: Stage, extra: &str) -> autodeploy_core::Result<autodeploy_core::Graph> {
    let cfg = PipelineConfig::from_toml_str(&config_text(fixture_name, extra), None).unwrap();
    autodeploy_core::pipeline::graph_after(&cfg, stage)
}

#[test]
fn quantized_checkpoints_match_their_dequantized_reference() {
    for &(name, op, fused) in QUANTIZED {
        let count = |stage: Stage| {
            let g = graph_after(name, stage, "").unwrap_or_else(|e| panic!("{name}: {e}"));
            let dump = g.dump();
            assert!(!dump.contains("= aten.linear(%l"), "{name}: a layer's linear stayed float\n{dump}");
            (dump.lines().filter(|l| l.contains(&format!("= {op}("))).count(), g)
        };
        // 2 layers of q, k, v, o, gate, up, down; the tied LM head is excluded.
        assert_eq!(count(Stage::Quantize).0, 14, "{name}: {op} nodes after the quantize stage");
        let (n, g) = count(Stage::PostLoadFusion);
        assert_eq!(n, fused, "{name}: {op} nodes after post_load_fusion");
        let mut model = compile(&g);
        let r = Reference::load(name);
        let mut i = 0;
        while r.has(&format!("tokens_{i}")) {
            let (shape, ids) = r.i64(&format!("tokens_{i}"));
            let (_, want) = r.f32(&format!("logits_f32_{i}"));
            let got = logits(model.as_mut(), &shape, &ids);
            let d = max_abs_diff(&got, &want, name);
            eprintln!("{name} seq {i} {shape:?}: max |ours - reference| {d:.3e}");
            assert!(d <= QUANT_F32_MAX_ABS, "{name} seq {i}: {d}");
            i += 1;
        }
        assert!(i >= 3, "{name}: {i} reference sequences");
        // Greedy generation through the whole engine (cached attention, the runtime).
        let mut j = 0;
        while r.has(&format!("gen_prompt_{j}")) {
            let (_, prompt) = r.i64(&format!("gen_prompt_{j}"));
            let (_, want) = r.i64(&format!("gen_output_{j}"));
            let out = generate(name, "", &[greedy(&prompt, want.len())]);
            let got = &out[0].as_ref().unwrap_or_else(|e| panic!("{name}: {e}")).tokens;
            assert_eq!(got, &want, "{name} generation {j}");
            j += 1;
        }
        assert!(j >= 2, "{name}: {j} generations");
    }
}

/// The quantized linears' inputs, weights and scales are what the checkpoint holds: a float
/// linear over the same dequantized weight gives other logits (the test above would catch an
/// engine that ignored the scales or the input quantization).
#[test]
fn the_reference_is_not_the_float_model() {
    for &(name, ..) in QUANTIZED {
        let float = name.rsplit_once('-').unwrap().0;
        let r_q = Reference::load(name);
        let r_f = Reference::load(float);
        let (_, q) = r_q.f32("logits_f32_1");
        let (_, f) = r_f.f32("logits_f32_1");
        let d = max_abs_diff(&q, &f, name);
        eprintln!("{name}: max |quantized reference - {float} reference| {d:.3e}");
        assert!(d > 50.0 * QUANT_F32_MAX_ABS, "{name}: the quantized reference is too close to the float model ({d})");
    }
}

/// The FP8 KV cache (`quantize_fp8_kv_cache`): a checkpoint declaring one gets each layer's
/// attention reading K and V through E4M3 at its `k_proj.k_scale` / `v_proj.v_scale` (the test
/// above holds it to its reference, uncached and through the cache); `kv_cache_dtype = "model"`
/// keeps the model's dtype, which gives the checkpoint's logits without the KV rounding
/// (llama-fp8's reference, the same weights); `kv_cache_dtype = "fp8"` on a float checkpoint
/// takes scale 1.0 and changes its logits; a malformed scale is refused naming the tensor.
#[test]
fn an_fp8_kv_cache_reads_the_checkpoints_scales_or_is_switched_off() {
    let g = graph_after("llama-fp8-kv", Stage::Quantize, "").unwrap();
    let dump = g.dump();
    let with_scales = dump.lines().filter(|l| l.contains("torch_attention(") && l.contains("k_scale=0.0")).count();
    assert_eq!(with_scales, 2, "both layers' attention with the checkpoint's scales:\n{dump}");
    assert!(g.history.iter().any(|h| h.contains("4 of 4 scales the checkpoint's")), "{:?}", g.history);

    let off = graph_after("llama-fp8-kv", Stage::PostLoadFusion, "kv_cache_dtype = \"model\"\n").unwrap();
    assert!(!off.dump().contains("k_scale="), "kv_cache_dtype = model left a scale");
    let r = Reference::load("llama-fp8");
    let (shape, ids) = r.i64("tokens_1");
    let (_, want) = r.f32("logits_f32_1");
    let got = logits(compile(&off).as_mut(), &shape, &ids);
    assert!(max_abs_diff(&got, &want, "llama-fp8-kv, kv model") <= QUANT_F32_MAX_ABS);

    let float = graph_after("llama", Stage::PostLoadFusion, "kv_cache_dtype = \"fp8\"\n").unwrap();
    assert!(float.history.iter().any(|h| h.contains("0 of 4 scales the checkpoint's")), "{:?}", float.history);
    let r = Reference::load("llama");
    let (shape, ids) = r.i64("tokens_1");
    let (_, want) = r.f32("logits_f32_1");
    let d = max_abs_diff(&logits(compile(&float).as_mut(), &shape, &ids), &want, "llama with an FP8 KV cache");
    assert!(d > 1e-3, "an FP8 KV cache at scale 1 should move the float model's logits, moved {d}");

    // A scale that is not one positive number.
    let dir = std::env::temp_dir().join(format!("ad-quant-kvscale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "generation_config.json", "hf_quant_config.json"] {
        std::fs::copy(fixture("llama-fp8-kv").join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("llama-fp8-kv").join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "model.layers.1.self_attn.v_proj.v_scale").collect();
    let neg = (-1.0f32).to_le_bytes();
    tensors.push((
        "model.layers.1.self_attn.v_proj.v_scale".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![], &neg).unwrap(),
    ));
    safetensors::serialize_to_file(tensors, None, &dir.join("model.safetensors")).unwrap();
    let toml = format!("model = {:?}\ndtype = \"float32\"\ndevice = \"cpu\"\n", dir.display().to_string());
    let cfg = PipelineConfig::from_toml_str(&toml, None).unwrap();
    let e = autodeploy_core::pipeline::graph_after(&cfg, Stage::Quantize).err().expect("refused").to_string();
    assert!(e.contains("model.layers.1.self_attn.v_proj.v_scale") && e.contains("one positive number"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Which attention backends take an FP8 KV cache, decided at `cache_init` (no GPU needed): on
/// CUDA both `flashinfer`'s kernels and `triton`'s slot kernel read one (the CUDA tests hold
/// both to the CPU), while `triton` still refuses a sliding window, naming what it lacks.
#[test]
fn both_cuda_attention_backends_take_an_fp8_kv_cache() {
    for attn in ["flashinfer", "triton"] {
        let extra = format!("kv_cache_dtype = \"fp8\"\ndevice = \"cuda\"\nattn_backend = \"{attn}\"\n");
        let g = graph_after("llama-fp8-kv", Stage::CacheInit, &extra).unwrap_or_else(|e| panic!("{attn}: {e}"));
        let dump = g.dump();
        let cached =
            dump.lines().filter(|l| l.contains("= attention_with_kv_cache(") && l.contains("k_scale=")).count();
        assert_eq!(cached, 2, "{attn}: both layers cached with their scales\n{dump}");
    }
    let window = "device = \"cuda\"\nattn_backend = \"triton\"\n";
    let e = graph_after("qwen2-window", Stage::CacheInit, window).err().expect("triton took a window").to_string();
    assert!(e.contains("`triton`") && e.contains("sliding window") && !e.contains("FP8"), "{e}");
}

#[test]
fn an_fp8_checkpoint_without_its_transform_is_refused_naming_the_weight_and_transform() {
    let extra = "[transforms.quantize_fp8_linear_from_config]\nenabled = false\n";
    let cfg = PipelineConfig::from_toml_str(&config_text("llama-fp8", extra), None).unwrap();
    let e = autodeploy_core::pipeline::build(&cfg).err().expect("built without the fp8 transform").to_string();
    assert!(
        e.contains("_proj.weight") && e.contains("stored as f8e4m3") && e.contains("quantize_fp8_linear_from_config"),
        "{e}"
    );
}

/// A float checkpoint goes through the quantize stage untouched.
#[test]
fn a_float_checkpoint_is_not_quantized() {
    let g = graph_after("llama", Stage::Quantize, "").unwrap();
    assert!(g
        .history
        .iter()
        .any(|h| h.contains("quantize_fp8_linear_from_config] skipped: the checkpoint is not quantized")));
    assert!(!g.dump().contains("torch_quant_"));
}

/// `quantize = "fp8"` on a float checkpoint (the llama fixture) against the reference that
/// quantizes the same way in Python (tests/fixtures/quant-inplace/llama): E4M3 weights at one
/// scale a row, each token's activations at its own scale; the LM head stays f32.
#[test]
fn quantize_fp8_in_place_matches_its_reference() {
    let extra = "quantize = \"fp8\"\n";
    let g = graph_after("llama", Stage::PostLoadFusion, extra).unwrap();
    let dump = g.dump();
    assert_eq!(dump.matches("dynamic=true)").count(), 8, "{dump}");
    assert!(g.history.iter().any(|h| h.contains("14 linears to FP8 at load")), "{:?}", g.history);
    let mut model = compile(&g);
    let r = Reference::load("quant-inplace/llama");
    let mut i = 0;
    while r.has(&format!("tokens_{i}")) {
        let (shape, ids) = r.i64(&format!("tokens_{i}"));
        let (_, want) = r.f32(&format!("logits_f32_{i}"));
        let d = max_abs_diff(&logits(model.as_mut(), &shape, &ids), &want, "llama quantize=fp8");
        eprintln!("llama quantize=fp8 seq {i} {shape:?}: max |ours - reference| {d:.3e}");
        assert!(d <= QUANT_F32_MAX_ABS, "seq {i}: {d}");
        i += 1;
    }
    assert!(i >= 3);
    for j in 0..2 {
        let (_, prompt) = r.i64(&format!("gen_prompt_{j}"));
        let (_, want) = r.i64(&format!("gen_output_{j}"));
        let out = generate("llama", extra, &[greedy(&prompt, want.len())]);
        assert_eq!(out[0].as_ref().unwrap().tokens, want, "generation {j}");
    }
    // It differs from the float model: the quantization ran.
    let (_, float) = Reference::load("llama").f32("logits_f32_1");
    let (_, quant) = r.f32("logits_f32_1");
    assert!(max_abs_diff(&float, &quant, "float vs fp8") > 50.0 * QUANT_F32_MAX_ABS);
}

/// A quantized checkpoint whose declaration and tensors disagree is refused at import, naming
/// the file and key or the tensor, never run as another model.
#[test]
fn inconsistent_quantized_checkpoints_are_refused_by_name() {
    let src = fixture("llama-fp8");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            r#"{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "INT8_SQ", "exclude_modules": []}}"#,
            "quant_algo",
            &["hf_quant_config.json", "quantization.quant_algo", "INT8_SQ"],
        ),
        (
            r#"{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}"#,
            "an FP8 file declared NVFP4",
            &["model.layers.0.", "f4e2m1"],
        ),
        (
            r#"{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head", "model.layers.*.mlp.down_proj"]}}"#,
            "an excluded module with scales",
            &["mlp.down_proj", "excluded"],
        ),
        (
            r#"{"producer": {"name": "someone-else"}, "quantization": {"quant_algo": "FP8"}}"#,
            "another producer",
            &["producer.name", "someone-else"],
        ),
    ];
    for (i, (quant, what, want)) in cases.iter().enumerate() {
        let dir = std::env::temp_dir().join(format!("ad-quant-bad-{}-{i}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        std::fs::write(dir.join("hf_quant_config.json"), quant).unwrap();
        let req = autodeploy_core::backend::ImportRequest {
            path: dir.clone(),
            dtype: None,
            max_batch_size: 1,
            max_seq_len: 16,
            dummy_weights: false,
        };
        let e = autodeploy_core::registry::importer("hf").unwrap().import(&req).err();
        let e = e.unwrap_or_else(|| panic!("{what}: imported")).to_string();
        eprintln!("{what}: {e}");
        for w in *want {
            assert!(e.contains(w), "{what}: `{w}` not in: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// `quantize = "fp8"` where it cannot apply is an error saying what to change: on a checkpoint
/// that is already quantized, and on GGUF blocks kept as stored (`dtype = "auto"`).
#[test]
fn quantize_fp8_where_it_cannot_apply_says_why() {
    let e = graph_after("llama-fp8", Stage::Quantize, "quantize = \"fp8\"\n").err().expect("built").to_string();
    assert!(e.contains("already a FP8 checkpoint") && e.contains("remove `quantize`"), "{e}");
    let gguf = fixture("gguf").join("tiny-mistral.gguf");
    let text = format!("model = {:?}\nquantize = \"fp8\"\n", gguf.display().to_string());
    let cfg = PipelineConfig::from_toml_str(&text, None).unwrap();
    let e = autodeploy_core::pipeline::graph_after(&cfg, Stage::Quantize).err().expect("built").to_string();
    assert!(e.contains("quantize = \"fp8\": weight `") && e.contains("set dtype = \"bfloat16\""), "{e}");
}

/// The logits of a ragged prefill and 3 decode steps under `extra` are those under `plain` bit
/// for bit, in f32 and bf16 (`what` names the change a failure blames).
fn same_logits(name: &str, extra: &str, plain: &str, what: &str) {
    let prompts = vec![vec![1, 17, 42, 99, 5, 7, 250, 3, 11], vec![1, 200, 3]];
    let decode = vec![vec![5, 9], vec![77, 31], vec![2, 140]];
    for dtype in ["float32", "bfloat16"] {
        let with = |extra: &str| format!("{extra}dtype = \"{dtype}\"\n");
        let a = common::steps::run_paged_steps(&mut engine(name, &with(extra)), 4, &prompts, &decode);
        let b = common::steps::run_paged_steps(&mut engine(name, &with(plain)), 4, &prompts, &decode);
        assert!(a.len() == 4 && a == b, "{name} {dtype}: {what} changed the logits\n{extra}");
    }
}

/// Greedy generation under `extra` gives the fixture's reference tokens.
fn generates_the_reference(name: &str, extra: &str) {
    let r = Reference::load(name);
    let (_, prompt) = r.i64("gen_prompt_0");
    let (_, want) = r.i64("gen_output_0");
    let out = generate(name, extra, &[greedy(&prompt, want.len())]);
    assert_eq!(out[0].as_ref().unwrap().tokens, want, "{name}: generation\n{extra}");
}

/// `fuse_gated_act` and `fuse_fp8_input_quant` (compile stage, on by default): under `opt` the
/// quantized MLPs' `mul(silu(gate), up)` (left unfused by the matchers) becomes one
/// `torch_gated_act` over the gate/up output; and each op whose output only FP8 linears read
/// writes E4M3 codes that they read (`out=`): in 2 layers, the input norm before q/k/v, the
/// post-attention norm before gate/up (the residual adds fused into them first) and the gated
/// activation before down. The logits of a ragged prefill and 3 decode steps are the unfused
/// graph's (both switched off) bit for bit (the codes are the ones the linears made), in f32
/// and bf16, with either or both; generation still gives the reference's tokens. q/k norms and
/// the final norm, read by other ops, stay as they are; NVFP4 (weight-only) gets the gated
/// activation alone.
#[test]
fn gated_activations_and_fp8_input_codes_fold_without_changing_the_numbers() {
    let opt = "compile_backend = \"opt\"\nattn_page_size = 4\n";
    let set = |gated: bool, fold: bool| {
        format!("{opt}transforms.fuse_gated_act.enabled = {gated}\ntransforms.fuse_fp8_input_quant.enabled = {fold}\n")
    };
    let (base, gated, fold) = (&set(false, false), &set(true, false), &set(false, true));
    // The defaults: both on.
    let both = &opt.to_string();
    let count = |dump: &str, op: &str, with: &str| dump.lines().filter(|l| l.contains(op) && l.contains(with)).count();
    for name in ["llama-fp8", "qwen3-fp8", "llama-fp8-kv", "mistral-nvfp4"] {
        let fp8 = name.contains("fp8");
        for (extra, acts, norms, act_codes) in
            [(&gated, 2, 0, 0), (&fold, 0, 4 * fp8 as usize, 0), (&both, 2, 4 * fp8 as usize, 2 * fp8 as usize)]
        {
            let e = engine(name, extra);
            let dump = e.graph.dump();
            assert_eq!(count(&dump, "= torch_gated_act(", ""), acts, "{name}: gated activations\n{extra}{dump}");
            assert_eq!(count(&dump, "rmsnorm(", "quant=fp8"), norms, "{name}: norms writing codes\n{extra}{dump}");
            assert_eq!(count(&dump, "= torch_gated_act(", "quant=fp8"), act_codes, "{name}\n{extra}{dump}");
            let readers = count(&dump, "= torch_quant_fp8_linear(", "out=");
            assert_eq!(readers, norms + act_codes, "{name}: linears reading codes\n{extra}{dump}");
            if acts > 0 {
                assert!(!dump.contains("= aten.silu("), "{name}: an activation was left\n{dump}");
            }
            same_logits(name, extra, base, "folding");
            generates_the_reference(name, extra);
        }
        let plain = engine(name, base).graph.dump();
        assert!(!plain.contains("quant=fp8") && !plain.contains("torch_gated_act"), "{name}: fused while off");
    }
    // `simple` does not fuse, enabled or not.
    let simple = engine("llama-fp8", &set(true, true).replace("compile_backend = \"opt\"\n", "")).graph.dump();
    assert!(!simple.contains("quant=fp8") && !simple.contains("torch_gated_act"));
}

/// `fuse_fp8_attention_out` (compile stage, off by default): under `opt` on the FP8 fixtures
/// with static input scales, each layer's cached attention (RoPE fused, and Qwen3's q/k norms
/// when `fuse_qk_norm_attention` is on too) writes the E4M3 codes its o_proj reads through the
/// transpose and reshape (`quant=fp8` on the attention, `out=` on o_proj: 2 each), alone and
/// with every other FP8 fold; the logits of a ragged prefill and 3 decode steps are the unfused
/// graph's bit for bit in f32 and bf16, and generation gives the reference's tokens. The
/// in-place FP8 (dynamic per-token scales) and NVFP4 (weight-only) have no static scale to
/// write codes at and keep their attention as it is.
#[test]
fn an_attention_writes_the_fp8_codes_its_o_proj_reads_without_changing_the_numbers() {
    let base = "compile_backend = \"opt\"\nattn_page_size = 4\n";
    let out = format!("{base}transforms.fuse_fp8_attention_out.enabled = true\n");
    let all = format!(
        "{out}transforms.fuse_fp8_input_quant.enabled = true\ntransforms.fuse_gated_act.enabled = true\n\
         transforms.fuse_quant_gated_epilogue.enabled = true\ntransforms.fuse_qk_norm_attention.enabled = true\n"
    );
    let count = |dump: &str, op: &str, with: &str| dump.lines().filter(|l| l.contains(op) && l.contains(with)).count();
    let cases = [
        ("llama-fp8", "", 2),
        ("qwen3-fp8", "", 2),
        ("llama-fp8-kv", "", 2),
        ("llama", "quantize = \"fp8\"\n", 0),
        ("mistral-nvfp4", "", 0),
    ];
    for (name, q, want) in cases {
        for extra in [&out, &all] {
            let extra = format!("{extra}{q}");
            let dump = engine(name, &extra).graph.dump();
            let attn = count(&dump, "= attention_with_kv_cache(", "quant=fp8");
            assert_eq!(attn, want, "{name}: attentions writing codes\n{extra}{dump}");
            let o_proj = count(&dump, "o_proj: ", "= torch_quant_fp8_linear(%l");
            let o_proj = o_proj.min(count(&dump, "o_proj: ", "out="));
            assert_eq!(o_proj, want, "{name}: o_proj reading codes\n{extra}{dump}");
            if want > 0 {
                assert!(dump.contains("attn.flat: f8e4m3["), "{name}: the reshape moves codes\n{dump}");
            }
            same_logits(name, &extra, &format!("{base}{q}"), "the attention's codes");
            if q.is_empty() {
                generates_the_reference(name, &extra);
            }
        }
    }
}

/// `fuse_quant_gated_epilogue` (compile stage, off by default, after `fuse_gated_act`): under
/// `opt` on the FP8 fixtures (static scales, and `quantize = "fp8"`'s per-token ones on llama),
/// each layer's gated activation goes into its FP8 gate/up linear (`act=silu`: 2 linears, no
/// `torch_gated_act` left), alone and with `fuse_fp8_input_quant` after it (the norms write
/// codes for q/k/v and gate/up, and with static scales the gated linears write down's input
/// codes: `quant=fp8` on them, `out=` on down), and likewise each NVFP4
/// gate/up linear of mistral-nvfp4; the logits of a ragged prefill and 3 decode steps are the
/// unfused graph's bit for bit in f32 and bf16, and generation gives the reference's tokens.
#[test]
fn an_fp8_gate_up_linear_takes_its_gated_activation_without_changing_the_numbers() {
    let opt = "compile_backend = \"opt\"\nattn_page_size = 4\n";
    // The unfused graph: the folds (on by default) off.
    let base =
        &format!("{opt}transforms.fuse_gated_act.enabled = false\ntransforms.fuse_fp8_input_quant.enabled = false\n");
    let epi = format!(
        "{opt}transforms.fuse_gated_act.enabled = true\ntransforms.fuse_quant_gated_epilogue.enabled = true\n\
         transforms.fuse_fp8_input_quant.enabled = false\n"
    );
    let all = format!("{opt}transforms.fuse_quant_gated_epilogue.enabled = true\n");
    let count = |dump: &str, op: &str, with: &str| dump.lines().filter(|l| l.contains(op) && l.contains(with)).count();
    let cases = [
        ("llama-fp8", ""),
        ("qwen3-fp8", ""),
        ("llama-fp8-kv", ""),
        ("llama", "quantize = \"fp8\"\n"),
        ("mistral-nvfp4", ""),
    ];
    for (name, q) in cases {
        let fp8 = name != "mistral-nvfp4";
        for (extra, norms) in [(&epi, 0), (&all, 4)] {
            let extra = format!("{extra}{q}");
            let dump = engine(name, &extra).graph.dump();
            let gated = count(&dump, "= torch_quant_", "act=silu");
            assert_eq!(gated, 2, "{name}: gated gate/up linears\n{extra}{dump}");
            assert_eq!(count(&dump, "= torch_gated_act(", ""), 0, "{name}\n{extra}{dump}");
            // (The in-place FP8's dynamic scales take no folds.)
            let folded = if q.is_empty() { norms * fp8 as usize } else { 0 };
            assert_eq!(count(&dump, "rmsnorm(", "quant=fp8"), folded, "{name}: norms writing codes\n{extra}{dump}");
            let epi_codes = folded / 2;
            let writing = count(&dump, "= torch_quant_fp8_linear(", "quant=fp8");
            assert_eq!(writing, epi_codes, "{name}: gated linears writing codes\n{extra}{dump}");
            let readers = count(&dump, "= torch_quant_fp8_linear(", "out=");
            assert_eq!(readers, folded + epi_codes, "{name}: linears reading codes\n{extra}{dump}");
            same_logits(name, &extra, &format!("{base}{q}"), "the epilogue");
            if q.is_empty() {
                generates_the_reference(name, &extra);
            }
        }
    }
}

/// `fuse_gemms` on FP8 q/k/v and gate/up (each part one weight scale) gives the fused linear
/// one scale a row and names the runs of equal rows (`scale_runs`: on CUDA each run is one
/// GEMM that cuBLASLt scales itself where it has no per-channel algorithm); the runs are the
/// parts' rows, the CPU kernel refuses runs the scale does not hold, and the op rule runs that
/// do not cover the weight.
#[test]
fn a_fused_fp8_linear_names_the_runs_of_its_parts_scales() {
    use autodeploy_core::DType;
    let mut g = graph_after("llama-fp8", Stage::PostLoadFusion, "").unwrap();
    let mut fused = 0;
    for n in &g.nodes {
        if n.op.name != "torch_quant_fp8_linear" || !g.value(n.inputs[1]).name.starts_with("fused[") {
            continue;
        }
        let w = &g.value(n.inputs[1]).name;
        fused += 1;
        let parts = w.matches('+').count() + 1;
        let runs: Vec<usize> =
            n.op.attrs
                .split_once("scale_runs=[")
                .and_then(|(_, r)| r.split_once(']'))
                .unwrap_or_else(|| panic!("{w}: no scale_runs in `{}`", n.op.attrs))
                .0
                .split(", ")
                .map(|r| r.parse().unwrap())
                .collect();
        assert_eq!(runs.len(), parts, "{w}: one run a part, {runs:?}");
        let scale = g.weights.load(&g.value(n.inputs[3]).name, DType::F32).unwrap().to_f32().into_owned();
        assert_eq!(runs.iter().sum::<usize>(), scale.len(), "{w}: {runs:?}");
        let mut start = 0;
        let mut firsts = Vec::new();
        for r in &runs {
            assert!(scale[start..start + r].iter().all(|v| *v == scale[start]), "{w}: run at {start}");
            firsts.push(scale[start]);
            start += r;
        }
        assert!(firsts.windows(2).all(|p| p[0] != p[1]), "{w}: neighbouring runs of one value {firsts:?}");
    }
    assert_eq!(fused, 4, "q/k/v and gate/up of 2 layers");
    // Runs the scale does not hold: the CPU kernel names the rows.
    let i = g.nodes.iter().position(|n| n.op.attrs.contains("scale_runs=")).unwrap();
    let rows = g.meta(g.nodes[i].inputs[1]).shape[0].as_static().unwrap();
    g.nodes[i].op.attrs = format!("scale_runs=[{}, 8]", rows - 8);
    let r = Reference::load("llama-fp8");
    let (shape, ids) = r.i64("tokens_1");
    let (b, s) = (shape[0], shape[1]);
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..s as i64).collect();
    let t = |v: Vec<i64>| autodeploy_core::Tensor::from_i64(vec![b, s], v).unwrap();
    let err = compile(&g).forward(&[t(ids), t(pos)], None).expect_err("runs the weight scale does not hold");
    let err = err.to_string();
    assert!(err.contains("are not one value"), "{err}");
    // Runs past the weight's rows: the op rule.
    g.nodes[i].op.attrs = format!("scale_runs=[{}]", rows + 8);
    let err = g.validate().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("scale_runs") && err.contains("torch_quant_fp8_linear"), "{err}");
    // Codes out (`quant=fp8`) without a gated epilogue: the op's attributes refuse it.
    g.nodes[i].op.attrs = "quant=fp8".into();
    let err = g.validate().err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("quant") && err.contains("act="), "{err}");
}

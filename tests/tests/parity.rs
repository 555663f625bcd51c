//! Full-forward logits of every fixture family against Hugging Face transformers.

mod common;

use autodeploy_core::DType;
use common::*;

/// f16 against transformers' f32 (no f16 reference exists), relative to each row's largest
/// logit as bf16's bound (an absolute one failed Gemma, whose logits are larger). Measured
/// 2026-12-03: max relative at most 1.62e-2 (gemma; mistral 1.13e-2), Σ-relative at most
/// 3.8e-3, no argmax differences; bounds 1.5x / 1.3x.
const F16_MAX_REL: f32 = 0.025;
const F16_MEAN_REL: f32 = 0.005;
/// f16: argmax may differ only where f32's top two logits are closer than this.
const F16_TIE: f32 = 0.1;

struct Stats {
    max_abs: f32,
    max_rel: f32,
    mean_rel: f32,
    argmax_mismatch: usize,
    /// Mismatches where the reference's top two are further apart than `tie`.
    clear_mismatch: usize,
    positions: usize,
}

fn compare(got: &[f32], want: &[f32], vocab: usize, tie: f32) -> Stats {
    assert_eq!(got.len(), want.len());
    let mut s =
        Stats { max_abs: 0.0, max_rel: 0.0, mean_rel: 0.0, argmax_mismatch: 0, clear_mismatch: 0, positions: 0 };
    let (mut sum_d, mut sum_w) = (0.0f64, 0.0f64);
    for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
        let scale = w.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
        for (a, b) in g.iter().zip(w) {
            let d = (a - b).abs();
            assert!(d.is_finite(), "non-finite logit: got {a}, want {b}");
            s.max_abs = s.max_abs.max(d);
            s.max_rel = s.max_rel.max(d / scale);
            sum_d += d as f64;
            sum_w += b.abs() as f64;
        }
        s.positions += 1;
        let (ag, aw) = (argmax(g), argmax(w));
        if ag != aw {
            s.argmax_mismatch += 1;
            let mut sorted = w.to_vec();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            if sorted[0] - sorted[1] > tie {
                s.clear_mismatch += 1;
            }
        }
    }
    s.mean_rel = (sum_d / sum_w.max(1e-30)) as f32;
    s
}

/// Mean |a - b| over two logit tensors.
fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).sum::<f64>() as f32 / a.len() as f32
}

fn run(family: &str, dtype: DType) -> Vec<Stats> {
    let g = import(family, dtype);
    let mut model = compile(&g);
    let r = Reference::load(family);
    let tag = if dtype == DType::F32 { "f32" } else { "bf16" };
    let mut all = Vec::new();
    let mut i = 0;
    while r.has(&format!("tokens_{i}")) {
        let (shape, ids) = r.i64(&format!("tokens_{i}"));
        let (lshape, want) = r.f32(&format!("logits_{tag}_{i}"));
        let got = logits(model.as_mut(), &shape, &ids);
        if dtype == DType::BF16 {
            // Ours must be at least as close to transformers' bf16 as transformers' bf16 is to
            // its own f32: the rounding noise of bf16, not more.
            let (_, f32_ref) = r.f32(&format!("logits_f32_{i}"));
            let (ours, theirs) = (mean_abs_diff(&got, &want), mean_abs_diff(&want, &f32_ref));
            eprintln!("{family} bf16 seq {i}: mean |ours - hf bf16| {ours:.3e}, mean |hf bf16 - hf f32| {theirs:.3e}");
            assert!(
                ours <= theirs,
                "{family} seq {i}: bf16 error {ours} exceeds transformers' own bf16 noise {theirs}"
            );
        }
        let s = compare(&got, &want, lshape[2], BF16_TIE);
        eprintln!(
            "{family} {tag} seq {i} {shape:?}: max abs {:.3e}, max rel {:.3e}, mean rel {:.3e}, argmax mismatches {}/{}",
            s.max_abs, s.max_rel, s.mean_rel, s.argmax_mismatch, s.positions
        );
        all.push(s);
        i += 1;
    }
    assert!(i >= 3, "{family}: expected at least 3 reference sequences, found {i}");
    all
}

/// The multimodal checkpoint's layout (`llama4`: the text model's keys under `text_config`, its
/// tensors under `language_model.`, a vision tower beside them) of the llama4_text fixture is
/// the same model: transformers' f32 logits, with chunked attention on the RoPE layers (chunks of
/// 10 in the fixture's config) and the query temperature on the no-RoPE layer, sequences up to
/// `max_position_embeddings`.
#[test]
fn a_llama4_multimodal_checkpoint_is_its_text_model() {
    use common::edit::{copy_fixture, edit_config, edit_weights};
    let (_t, dir) = copy_fixture("llama4_text");
    edit_config(&dir, |m| {
        let text = serde_json::Value::Object(std::mem::take(m));
        m.insert("model_type".into(), "llama4".into());
        m.insert("architectures".into(), serde_json::json!(["Llama4ForConditionalGeneration"]));
        m.insert("vision_config".into(), serde_json::json!({"model_type": "llama4_vision_model"}));
        m.insert("text_config".into(), text);
    });
    edit_weights(&dir.join("model.safetensors"), |t| {
        let old = std::mem::take(t);
        for (name, v) in old {
            t.insert(format!("language_model.{name}"), v.clone());
            if name == "model.norm.weight" {
                t.insert("vision_model.layernorm_post.weight".into(), v);
            }
        }
    });
    let g = import_dir(&dir, DType::F32);
    assert!(g.history.iter().any(|h| h.contains("llama4 decoder")), "{:?}", g.history);
    assert_eq!(g.symbols["seq"].max, 128, "chunked attention is built: no cap below max_position_embeddings");
    let dump = g.dump();
    assert_eq!(dump.matches("chunk=10").count(), 3, "the three RoPE layers are chunked:\n{dump}");
    assert!(dump.contains("aten.log1p") && dump.contains("q_temp"), "the no-RoPE layer's temperature:\n{dump}");
    let mut model = compile(&g);
    let r = Reference::load("llama4_text");
    let (shape, ids) = r.i64("tokens_1");
    let (_, want) = r.f32("logits_f32_1");
    let err = max_abs_diff(&logits(model.as_mut(), &shape, &ids), &want, "llama4 logits");
    assert!(err <= F32_MAX_ABS, "max abs error {err}");
}

#[test]
fn f32_logits_match_transformers() {
    for fam in FAMILIES {
        for s in run(fam, DType::F32) {
            assert!(s.max_abs <= F32_MAX_ABS, "{fam}: max abs error {} > {F32_MAX_ABS}", s.max_abs);
            assert_eq!(s.argmax_mismatch, 0, "{fam}: argmax differs at {} positions", s.argmax_mismatch);
        }
    }
}

#[test]
fn bf16_logits_match_transformers_within_tolerance() {
    for fam in FAMILIES {
        let stats = run(fam, DType::BF16);
        if ROUTED.contains(fam) {
            // `run` held each sequence's mean error within transformers' own bf16 noise; a
            // routing flip (common::ROUTED) moves single logits past any per-logit bound.
            continue;
        }
        for s in stats {
            assert!(s.max_rel <= BF16_MAX_REL, "{fam}: bf16 max relative error {} > {BF16_MAX_REL}", s.max_rel);
            assert!(s.mean_rel <= BF16_MEAN_REL, "{fam}: bf16 mean relative error {} > {BF16_MEAN_REL}", s.mean_rel);
            assert_eq!(s.clear_mismatch, 0, "{fam}: bf16 argmax differs where the reference is not a near-tie");
        }
    }
}

/// `dtype = "float16"`: the graph really runs in f16 (weights and logits), and its logits stay
/// close to transformers' f32 ones. There is no f16 reference from transformers, so the bound
/// is set from what f16 (11 significant bits, 8x finer than bf16) measures against f32.
#[test]
fn f16_logits_track_transformers_f32() {
    for fam in FAMILIES {
        let g = import(fam, DType::F16);
        let out = g.meta(g.outputs[0]);
        assert_eq!(out.dtype, DType::F16, "{fam}: logits dtype");
        let dump = g.dump();
        let weights: Vec<&str> = dump.lines().filter(|l| l.ends_with("= weight")).collect();
        assert!(
            !weights.is_empty() && weights.iter().all(|l| l.contains(": f16[") || l.contains("inv_freq")),
            "{fam}: {weights:?}"
        );
        let mut model = compile(&g);
        let r = Reference::load(fam);
        let mut i = 0;
        while r.has(&format!("tokens_{i}")) {
            let (shape, ids) = r.i64(&format!("tokens_{i}"));
            let (lshape, want) = r.f32(&format!("logits_f32_{i}"));
            let got = logits(model.as_mut(), &shape, &ids);
            let s = compare(&got, &want, lshape[2], F16_TIE);
            eprintln!(
                "{fam} f16 seq {i}: max abs {:.3e}, max rel {:.3e}, mean rel {:.3e}, argmax mismatches {}/{}",
                s.max_abs, s.max_rel, s.mean_rel, s.argmax_mismatch, s.positions
            );
            assert!(s.max_abs > 0.0, "{fam}: f16 logits equal f32's exactly: is the graph really f16?");
            if ROUTED.contains(fam) {
                // f16 (8x finer than bf16) no further from f32 than transformers' bf16 is.
                let (_, hf_bf16) = r.f32(&format!("logits_bf16_{i}"));
                let (ours, theirs) = (mean_abs_diff(&got, &want), mean_abs_diff(&hf_bf16, &want));
                assert!(ours <= theirs, "{fam} seq {i}: f16 error {ours} exceeds transformers' bf16 noise {theirs}");
                i += 1;
                continue;
            }
            assert!(s.max_rel <= F16_MAX_REL, "{fam} seq {i}: f16 max relative error {} > {F16_MAX_REL}", s.max_rel);
            assert!(s.mean_rel <= F16_MEAN_REL, "{fam} seq {i}: f16 mean relative error {}", s.mean_rel);
            assert_eq!(s.clear_mismatch, 0, "{fam} seq {i}: f16 argmax differs where f32's is not a near-tie");
            i += 1;
        }
    }
}

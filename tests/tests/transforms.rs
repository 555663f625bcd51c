//! Each transform: a graph-text snapshot on a small hand-built graph, and a numeric check that
//! the graph before and after gives the same outputs on random inputs. Then the whole pipeline
//! on every fixture family.

mod common;

use std::sync::Arc;

use autodeploy_core::config::PipelineConfig;
use autodeploy_core::ir::GraphBuilder;
use autodeploy_core::ops::attention::SdpaAttrs;
use autodeploy_core::ops::binary::{ADD, ADD_SCALAR, MUL, MUL_SCALAR, POW_SCALAR};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::registry;
use autodeploy_core::shape::static_shape;
use autodeploy_core::transform::TransformContext;
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{DType, Dim, Graph, Op, SizeArg, Tensor};
use autodeploy_sdk::Stage;
use common::*;

/// Deterministic values in [-1, 1).
fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn rand_tensor(dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f32_as(dtype, shape.to_vec(), rand_vec(n, seed)).unwrap()
}

/// Runs graph `g` on `inputs` with the interpreter.
fn run(g: &Graph, inputs: &[Tensor]) -> Vec<Vec<f32>> {
    let mut m = registry::compile_backend("simple").unwrap().compile(g, &Default::default()).unwrap();
    m.forward(inputs, None).unwrap().iter().map(|t| t.to_f32().into_owned()).collect()
}

fn apply(name: &str, g: &mut Graph) -> String {
    autodeploy_plugins::link();
    let t = registry::transform(name).unwrap_or_else(|| panic!("no transform {name}"));
    let cfg = PipelineConfig::from_toml_str("model = \"unused\"", None).unwrap();
    let cx = TransformContext { config: &cfg, options: toml_table() };
    let summary = t.instantiate().apply(g, &cx).unwrap();
    g.validate().unwrap();
    summary
}

fn toml_table() -> autodeploy_core::transform::Options {
    Default::default()
}

/// The node lines of a dump (weights and header dropped), for compact snapshots.
fn body(g: &Graph) -> String {
    g.dump()
        .lines()
        .filter(|l| l.starts_with("  %") && !l.contains("= weight"))
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks the transform changes the graph to `want` and keeps its outputs (max abs diff ≤ tol).
fn check(name: &str, mut g: Graph, inputs: &[Tensor], want: &str, tol: f32) {
    let before = run(&g, inputs);
    let summary = apply(name, &mut g);
    let got = body(&g);
    assert_eq!(got.trim(), want.trim(), "{name} ({summary}) snapshot:\n{got}");
    let after = run(&g, inputs);
    assert_eq!(before.len(), after.len(), "{name}: number of outputs");
    for (a, b) in before.iter().zip(&after) {
        let d = max_abs_diff(a, b, name);
        assert!(d <= tol, "{name}: outputs moved by {d} > {tol}");
    }
}

fn store(ws: &[(&str, Tensor)]) -> Arc<WeightStore> {
    let mut s = WeightStore::new("test");
    for (n, t) in ws {
        s.add_tensor(n, t.clone());
    }
    Arc::new(s)
}

#[test]
fn rmsnorm_with_casts_in_bf16() {
    let w = rand_tensor(DType::BF16, &[8], 1);
    let mut b = GraphBuilder::new(store(&[("w", w)]));
    b.symbol("n", 1, 16);
    let x = b.input("x", DType::BF16, vec![Dim::sym("n"), Dim::new(8)]);
    let w = b.param("w", DType::BF16, static_shape(&[8]));
    let xf = b.op("xf", Op::to_dtype(DType::F32), &[x]).unwrap();
    let sq = b.op("sq", Op::scalar(POW_SCALAR, 2.0), &[xf]).unwrap();
    let var = b.op("var", Op::mean(vec![-1], true), &[sq]).unwrap();
    let ve = b.op("ve", Op::scalar(ADD_SCALAR, 1e-6), &[var]).unwrap();
    let r = b.op("r", Op::unary("aten.rsqrt"), &[ve]).unwrap();
    let y = b.op("y", Op::binary(MUL), &[r, xf]).unwrap(); // operands swapped: commutativity
    let yc = b.op("yc", Op::to_dtype(DType::BF16), &[y]).unwrap();
    let out = b.op("out", Op::binary(MUL), &[yc, w]).unwrap();
    b.output(out);
    let g = b.finish().unwrap();
    let want = "%out.rmsnorm: bf16[n, 8] = torch_rmsnorm(%x, %w, eps=1e-6, norm_dtype=bf16)";
    // Same arithmetic in the same order: bit-identical.
    check("match_rmsnorm", g, &[rand_tensor(DType::BF16, &[5, 8], 2)], want, 0.0);
}

#[test]
fn rmsnorm_without_the_f32_upcast_is_left_alone() {
    // x·rsqrt(mean(x²)+eps) computed in bf16 is not transformers' RMSNorm: no match.
    let w = rand_tensor(DType::BF16, &[8], 1);
    let mut b = GraphBuilder::new(store(&[("w", w)]));
    let x = b.input("x", DType::BF16, static_shape(&[2, 8]));
    let w = b.param("w", DType::BF16, static_shape(&[8]));
    let sq = b.op("sq", Op::scalar(POW_SCALAR, 2.0), &[x]).unwrap();
    let var = b.op("var", Op::mean(vec![-1], true), &[sq]).unwrap();
    let ve = b.op("ve", Op::scalar(ADD_SCALAR, 1e-6), &[var]).unwrap();
    let r = b.op("r", Op::unary("aten.rsqrt"), &[ve]).unwrap();
    let y = b.op("y", Op::binary(MUL), &[x, r]).unwrap();
    let out = b.op("out", Op::binary(MUL), &[w, y]).unwrap();
    b.output(out);
    let mut g = b.finish().unwrap();
    assert_eq!(apply("match_rmsnorm", &mut g), "matched 0 rmsnorm");
}

fn rope_graph(interleaved_input: bool) -> (Graph, Vec<Tensor>) {
    let mut b = GraphBuilder::new(store(&[]));
    b.symbol("s", 1, 32);
    let s = Dim::sym("s");
    let x = b.input("x", DType::F32, vec![Dim::new(1), Dim::new(2), s.clone(), Dim::new(8)]);
    let cos = b.input("cos", DType::F32, vec![Dim::new(1), s.clone(), Dim::new(8)]);
    let sin = b.input("sin", DType::F32, vec![Dim::new(1), s.clone(), Dim::new(8)]);
    let mut xin = x;
    if interleaved_input {
        let sz = |v: &[Dim]| v.iter().cloned().map(SizeArg::Dim).collect::<Vec<_>>();
        let v = b
            .op("pairs", Op::view(sz(&[Dim::new(1), Dim::new(2), s.clone(), Dim::new(4), Dim::new(2)])), &[x])
            .unwrap();
        let t = b.op("pairs_t", Op::transpose(-1, -2), &[v]).unwrap();
        xin = b.op("deint", Op::reshape(sz(&[Dim::new(1), Dim::new(2), s.clone(), Dim::new(8)])), &[t]).unwrap();
    }
    let cu = b.op("cos_u", Op::unsqueeze(1), &[cos]).unwrap();
    let su = b.op("sin_u", Op::unsqueeze(1), &[sin]).unwrap();
    let xc = b.op("xc", Op::binary(MUL), &[cu, xin]).unwrap();
    let x1 = b.op("x1", Op::slice(Slice::new(3, 0, 4)), &[xin]).unwrap();
    let x2 = b.op("x2", Op::slice(Slice::new(-1, 4, i64::MAX)), &[xin]).unwrap();
    let n2 = b.op("n2", Op::unary("aten.neg"), &[x2]).unwrap();
    let rot = b.op("rot", Op::cat(-1), &[n2, x1]).unwrap();
    let rs = b.op("rs", Op::binary(MUL), &[rot, su]).unwrap();
    let out = b.op("out", Op::binary(ADD), &[rs, xc]).unwrap();
    b.output(out);
    let ins = vec![
        rand_tensor(DType::F32, &[1, 2, 6, 8], 3),
        rand_tensor(DType::F32, &[1, 6, 8], 4),
        rand_tensor(DType::F32, &[1, 6, 8], 5),
    ];
    (b.finish().unwrap(), ins)
}

#[test]
fn rope_rotate_half() {
    let (g, ins) = rope_graph(false);

    let want = "%cos_u: f32[1, 1, s, 8] = aten.unsqueeze(%cos, 1)
%sin_u: f32[1, 1, s, 8] = aten.unsqueeze(%sin, 1)
%out.rope: f32[1, 2, s, 8] = torch_rope_with_explicit_cos_sin(%x, %cos_u, %sin_u, interleaved=false)";
    check("match_rope", g, &ins, want, 0.0);
}

#[test]
fn rope_interleaved() {
    let (mut g, ins) = rope_graph(true);
    let before = run(&g, &ins);
    apply("match_rope", &mut g);
    let want = "%cos_u: f32[1, 1, s, 8] = aten.unsqueeze(%cos, 1)
%sin_u: f32[1, 1, s, 8] = aten.unsqueeze(%sin, 1)
%out.rope.rope: f32[1, 2, s, 8] = torch_rope_with_explicit_cos_sin(%x, %cos_u, %sin_u, interleaved=true)";
    check("match_rope_interleaved", g.clone(), &ins, want, 0.0);
    apply("match_rope_interleaved", &mut g);
    assert_eq!(run(&g, &ins), before);
}

fn attention_graph(repeat: bool) -> (Graph, Vec<Tensor>) {
    let mut b = GraphBuilder::new(store(&[]));
    b.symbol("s", 1, 32);
    let s = Dim::sym("s");
    let d = |n: usize| Dim::new(n);
    let q = b.input("q", DType::F32, vec![d(1), d(4), s.clone(), d(8)]);
    let k = b.input("k", DType::F32, vec![d(1), d(2), s.clone(), d(8)]);
    let v = b.input("v", DType::F32, vec![d(1), d(2), s.clone(), d(8)]);
    let (mut kk, mut vv) = (k, v);
    if repeat {
        let sz = |v: Vec<Dim>| v.into_iter().map(SizeArg::Dim).collect::<Vec<_>>();
        for (name, x) in [("k", k), ("v", v)] {
            let u = b.op(&format!("{name}_u"), Op::unsqueeze(2), &[x]).unwrap();
            let e = b.op(&format!("{name}_e"), Op::expand(sz(vec![d(1), d(2), d(2), s.clone(), d(8)])), &[u]).unwrap();
            let r = b.op(&format!("{name}_r"), Op::reshape(sz(vec![d(1), d(4), s.clone(), d(8)])), &[e]).unwrap();
            if name == "k" {
                kk = r
            } else {
                vv = r
            }
        }
    }
    let sdpa = Op::sdpa(SdpaAttrs { is_causal: true, scale: None, enable_gqa: !repeat, scoring: Default::default() });
    let out = b.op("out", sdpa, &[q, kk, vv]).unwrap();
    b.output(out);
    let ins = vec![
        rand_tensor(DType::F32, &[1, 4, 5, 8], 6),
        rand_tensor(DType::F32, &[1, 2, 5, 8], 7),
        rand_tensor(DType::F32, &[1, 2, 5, 8], 8),
    ];
    (b.finish().unwrap(), ins)
}

#[test]
fn attention_with_repeat_kv_and_with_enable_gqa() {
    let want = "%out.attention: f32[1, 4, s, 8] = torch_attention(%q, %k, %v, causal=true, scale=0.35355339059327373)";
    let (g, ins) = attention_graph(true);
    check("match_attention", g, &ins, want, 0.0);
    let (g, ins) = attention_graph(false);
    check("match_attention", g, &ins, want, 0.0);
}

#[test]
fn eager_attention_becomes_non_causal_attention() {
    for repeat in [true, false] {
        let mut b = GraphBuilder::new(store(&[]));
        b.symbol("s", 1, 32);
        let s = Dim::sym("s");
        let d = |n: usize| Dim::new(n);
        let hk = if repeat { 2 } else { 4 };
        let q = b.input("q", DType::BF16, vec![d(1), d(4), s.clone(), d(8)]);
        let k = b.input("k", DType::BF16, vec![d(1), d(hk), s.clone(), d(8)]);
        let v = b.input("v", DType::BF16, vec![d(1), d(hk), s.clone(), d(8)]);
        let (mut kk, mut vv) = (k, v);
        if repeat {
            let sz = |v: Vec<Dim>| v.into_iter().map(SizeArg::Dim).collect::<Vec<_>>();
            let rep = |b: &mut GraphBuilder, name: &str, x| {
                let u = b.op(&format!("{name}_u"), Op::unsqueeze(2), &[x]).unwrap();
                let e =
                    b.op(&format!("{name}_e"), Op::expand(sz(vec![d(1), d(2), d(2), s.clone(), d(8)])), &[u]).unwrap();
                b.op(&format!("{name}_r"), Op::reshape(sz(vec![d(1), d(4), s.clone(), d(8)])), &[e]).unwrap()
            };
            kk = rep(&mut b, "k", k);
            vv = rep(&mut b, "v", v);
        }
        let kt = b.op("kt", Op::transpose(2, 3), &[kk]).unwrap();
        let sc = b.op("scores", Op::matmul(), &[q, kt]).unwrap();
        let sc = b.op("scaled", Op::scalar(MUL_SCALAR, 0.5), &[sc]).unwrap();
        let sc = b.op("scores_f32", Op::to_dtype(DType::F32), &[sc]).unwrap();
        let w = b.op("probs", Op::softmax(-1), &[sc]).unwrap();
        let w = b.op("probs_bf16", Op::to_dtype(DType::BF16), &[w]).unwrap();
        let out = b.op("out", Op::matmul(), &[w, vv]).unwrap();
        b.output(out);
        let g = b.finish().unwrap();
        let ins = vec![
            rand_tensor(DType::BF16, &[1, 4, 5, 8], 30),
            rand_tensor(DType::BF16, &[1, hk, 5, 8], 31),
            rand_tensor(DType::BF16, &[1, hk, 5, 8], 32),
        ];
        // transformers' form: scores upcast to f32 for the softmax, weights cast back. The
        // canonical op runs the softmax in f32 too, rounding once at the end instead of after
        // the softmax: equal within bf16 rounding.
        let want = "%out.attention: bf16[1, 4, s, 8] = torch_attention(%q, %k, %v, causal=false, scale=0.5)";
        check("match_attention", g, &ins, want, 0.02);
    }
}

fn mlp_graph(bias_on_up: bool) -> (Graph, Vec<Tensor>) {
    let ws = [
        ("wg", rand_tensor(DType::F32, &[12, 8], 9)),
        ("wu", rand_tensor(DType::F32, &[12, 8], 10)),
        ("wd", rand_tensor(DType::F32, &[8, 12], 11)),
        ("bu", rand_tensor(DType::F32, &[12], 12)),
    ];
    let mut b = GraphBuilder::new(store(&ws));
    let x = b.input("x", DType::F32, static_shape(&[3, 8]));
    let wg = b.param("wg", DType::F32, static_shape(&[12, 8]));
    let wu = b.param("wu", DType::F32, static_shape(&[12, 8]));
    let wd = b.param("wd", DType::F32, static_shape(&[8, 12]));
    let g_ = b.op("gate", Op::linear(), &[x, wg]).unwrap();
    let mut up_in = vec![x, wu];
    if bias_on_up {
        up_in.push(b.param("bu", DType::F32, static_shape(&[12])));
    }
    let u = b.op("up", Op::linear(), &up_in).unwrap();
    let a = b.op("act", Op::unary("aten.silu"), &[g_]).unwrap();
    let m = b.op("prod", Op::binary(MUL), &[u, a]).unwrap();
    let out = b.op("down", Op::linear(), &[m, wd]).unwrap();
    b.output(out);
    (b.finish().unwrap(), vec![rand_tensor(DType::F32, &[3, 8], 13)])
}

/// A checkpoint's fused gate/up weight, chunked in the graph (a Phi-3 export): the gated MLP
/// over it, `fused=true`; halves the other way round (up first) are not that MLP and stay.
#[test]
fn swiglu_over_a_fused_gate_up_weight() {
    let graph = |gate_first: bool| {
        let ws = [("wgu", rand_tensor(DType::F32, &[24, 8], 9)), ("wd", rand_tensor(DType::F32, &[8, 12], 11))];
        let mut b = GraphBuilder::new(store(&ws));
        let x = b.input("x", DType::F32, static_shape(&[3, 8]));
        let wgu = b.param("wgu", DType::F32, static_shape(&[24, 8]));
        let wd = b.param("wd", DType::F32, static_shape(&[8, 12]));
        let gu = b.op("gu", Op::linear(), &[x, wgu]).unwrap();
        let lo = b.op("lo", Op::slice(Slice::new(-1, 0, 12)), &[gu]).unwrap();
        let hi = b.op("hi", Op::slice(Slice::new(-1, 12, 24)), &[gu]).unwrap();
        let (gate, up) = if gate_first { (lo, hi) } else { (hi, lo) };
        let a = b.op("act", Op::unary("aten.silu"), &[gate]).unwrap();
        let m = b.op("prod", Op::binary(MUL), &[a, up]).unwrap();
        let out = b.op("down", Op::linear(), &[m, wd]).unwrap();
        b.output(out);
        (b.finish().unwrap(), vec![rand_tensor(DType::F32, &[3, 8], 13)])
    };
    let (g, ins) = graph(true);
    check("match_swiglu", g, &ins, "%down.swiglu: f32[3, 8] = torch_swiglu_mlp(%x, %wgu, %wd, fused=true)", 1e-6);
    let (mut g, _) = graph(false);
    assert_eq!(apply("match_swiglu", &mut g), "matched 0 gated mlp (swiglu/geglu; 0 over a fused gate/up weight)");
}

#[test]
fn swiglu_and_its_gate_up_fusion() {
    let (g, ins) = mlp_graph(false);
    check(
        "match_swiglu",
        g.clone(),
        &ins,
        "%down.swiglu: f32[3, 8] = torch_swiglu_mlp(%x, %wg, %wu, %wd, fused=false)",
        0.0,
    );
    let mut m = g;
    apply("match_swiglu", &mut m);
    check(
        "fuse_gemms",
        m,
        &ins,
        "%down.swiglu_1: f32[3, 8] = torch_swiglu_mlp(%x, %fused[wg+wu], %wd, fused=true)",
        1e-5,
    );
    // A biased projection is not a plain SwiGLU: left for GEMM fusion, which fuses gate and up.
    let (g, ins) = mlp_graph(true);
    let mut g2 = g.clone();
    assert_eq!(apply("match_swiglu", &mut g2), "matched 0 gated mlp (swiglu/geglu; 0 over a fused gate/up weight)");
    let out = body(&g);
    assert!(out.contains("aten.silu"), "{out}");
    let mut fused = g;
    let before = run(&fused, &ins);
    let summary = apply("fuse_gemms", &mut fused);
    assert!(summary.starts_with("fused 0 linears"), "mixed bias must not fuse: {summary}");
    assert_eq!(run(&fused, &ins), before);
}

#[test]
fn gemm_fusion_of_linears_sharing_an_input() {
    let ws = [
        ("wq", rand_tensor(DType::F32, &[8, 8], 20)),
        ("wk", rand_tensor(DType::F32, &[4, 8], 21)),
        ("wv", rand_tensor(DType::F32, &[4, 8], 22)),
        ("bq", rand_tensor(DType::F32, &[8], 23)),
        ("bk", rand_tensor(DType::F32, &[4], 24)),
        ("bv", rand_tensor(DType::F32, &[4], 25)),
    ];
    let mut b = GraphBuilder::new(store(&ws));
    let x = b.input("x", DType::F32, vec![Dim::sym("n"), Dim::new(8)]);
    b.symbol("n", 1, 8);
    let mut outs = Vec::new();
    for (w, bias, rows) in [("wq", "bq", 8), ("wk", "bk", 4), ("wv", "bv", 4)] {
        let wv = b.param(w, DType::F32, static_shape(&[rows, 8]));
        let bv = b.param(bias, DType::F32, static_shape(&[rows]));
        outs.push(b.op(&format!("{w}_out"), Op::linear(), &[x, wv, bv]).unwrap());
    }
    let qk = b.op("qk", Op::cat(-1), &[outs[0], outs[1], outs[2]]).unwrap();
    b.output(qk);
    let g = b.finish().unwrap();
    let want = "%wq_out.fused: f32[n, 16] = aten.linear(%x, %fused[wq+wk+wv], %fused[wq+wk+wv].bias)
%wq_out_1: f32[n, 8] = aten.slice.Tensor(%wq_out.fused, dim=-1, start=0, end=8)
%wk_out_1: f32[n, 4] = aten.slice.Tensor(%wq_out.fused, dim=-1, start=8, end=12)
%wv_out_1: f32[n, 4] = aten.slice.Tensor(%wq_out.fused, dim=-1, start=12, end=16)
%qk: f32[n, 16] = aten.cat(%wq_out_1, %wk_out_1, %wv_out_1, dim=-1)";
    check("fuse_gemms", g, &[rand_tensor(DType::F32, &[3, 8], 26)], want, 1e-5);
}

fn pipeline_graph(fam: &str, dtype: &str, stage: Stage) -> Graph {
    autodeploy_plugins::link();
    let toml = format!("model = {:?}\ndtype = {dtype:?}\nmax_seq_len = 128\n", fixture(fam).display().to_string());
    let cfg = PipelineConfig::from_toml_str(&toml, None).unwrap();
    autodeploy_core::pipeline::graph_after(&cfg, stage).unwrap()
}

#[test]
fn every_family_reaches_the_canonical_ops_with_unchanged_logits() {
    for fam in FAMILIES {
        for (dtype, tol) in [("float32", 1e-5f32), ("bfloat16", 0.0)] {
            let before = pipeline_graph(fam, dtype, Stage::Import);
            let after = pipeline_graph(fam, dtype, Stage::PostLoadFusion);
            let ops = after.op_counts();
            for gone in ["aten.rsqrt", "aten.scaled_dot_product_attention", "aten.silu", "aten.gelu", "aten.neg"] {
                assert!(!ops.contains_key(gone), "{fam}: {gone} left after fusion:\n{}", after.dump());
            }
            // Every RMSNorm of the import (one rsqrt each: two a layer, Gemma 2/3's four, q/k
            // norms, the final one) and every attention became canonical; LayerNorms are one op
            // from the start.
            let unfused = before.op_counts();
            let count = |m: &std::collections::BTreeMap<&str, usize>, op: &str| m.get(op).copied().unwrap_or(0);
            let (rms, ln) = (count(&unfused, "aten.rsqrt"), count(&unfused, "aten.layer_norm"));
            let layers = count(&unfused, "aten.scaled_dot_product_attention");
            assert!(rms + ln > 2 * layers && layers >= 2, "{fam}: {rms} + {ln} norms, {layers} layers");
            assert_eq!(count(&ops, "torch_rmsnorm"), rms, "{fam}");
            assert_eq!(count(&ops, "aten.layer_norm"), ln, "{fam}");
            let rotating = layers - common::nope_layers(fam);
            assert_eq!(ops.get("torch_rope_with_explicit_cos_sin"), Some(&(2 * rotating)), "{fam}");
            assert_eq!(ops.get("torch_attention"), Some(&layers), "{fam}");
            // Gated (SwiGLU, GeGLU), ungated (StarCoder2's) or mixture of experts: one
            // canonical MLP a layer, and a gated one more a shared expert (Llama 4's, whose
            // gate/up/down linears are then the MLP's).
            let moe = count(&ops, "torch_moe");
            let dump = after.dump();
            let shared = dump.lines().filter(|l| l.contains(".shared.") && l.contains("= torch_swiglu_mlp(")).count();
            assert_eq!(count(&ops, "torch_swiglu_mlp") + count(&ops, "torch_mlp") + moe, layers + shared, "{fam}");
            assert_eq!(moe > 0, ROUTED.contains(fam), "{fam}");
            // Per layer: fused qkv, o_proj; a router per sparse MLP; plus lm_head.
            assert_eq!(ops.get("aten.linear"), Some(&(2 * layers + moe + 1)), "{fam}");
            let r = Reference::load(fam);
            let (shape, ids) = r.i64("tokens_1");
            let pos: Vec<i64> = (0..shape[1] as i64).collect();
            let inputs = [Tensor::from_i64(shape.clone(), ids).unwrap(), Tensor::from_i64(shape.clone(), pos).unwrap()];
            let (a, b) = (run(&before, &inputs), run(&after, &inputs));
            let d = max_abs_diff(&a[0], &b[0], &format!("{fam} {dtype}"));
            // bf16: the canonical ops round where the unfused ones did, and GEMM fusion keeps each
            // dot product's order here, so the logits are identical.
            assert!(d <= tol, "{fam} {dtype}: transforms moved logits by {d}");
        }
    }
}

#[test]
fn identity_ops_are_dropped_and_the_rest_kept() {
    let mut b = GraphBuilder::new(store(&[]));
    let x = b.input("x", DType::F32, static_shape(&[2, 4]));
    let ids = b.input("ids", DType::I64, static_shape(&[2, 4]));
    let one = b.op("one", Op::scalar(MUL_SCALAR, 1.0), &[x]).unwrap(); // dropped
    let same = b.op("same", Op::to_dtype(DType::F32), &[one]).unwrap(); // dropped
    let two = b.op("two", Op::scalar(MUL_SCALAR, 2.0), &[same]).unwrap(); // kept
    let half = b.op("half", Op::to_dtype(DType::BF16), &[two]).unwrap(); // kept: a real cast
    let back = b.op("back", Op::to_dtype(DType::F32), &[half]).unwrap(); // kept
    let int_one = b.op("int_one", Op::scalar(MUL_SCALAR, 1.0), &[ids]).unwrap(); // dropped: i64 stays i64 here
    let idf = b.op("idf", Op::to_dtype(DType::F32), &[int_one]).unwrap(); // kept
    let sum = b.op("sum", Op::binary(ADD), &[back, idf]).unwrap();
    let out = b.op("out", Op::scalar(MUL_SCALAR, 1.0), &[sum]).unwrap(); // kept: a graph output
    b.output(out);
    let g = b.finish().unwrap();
    let ids_t = Tensor::from_i64(vec![2, 4], vec![1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
    let want = "%two: f32[2, 4] = aten.mul.Scalar(%x, 2.0)
%half: bf16[2, 4] = aten._to_copy(%two, dtype=bf16)
%back: f32[2, 4] = aten._to_copy(%half, dtype=f32)
%idf: f32[2, 4] = aten._to_copy(%ids, dtype=f32)
%sum: f32[2, 4] = aten.add.Tensor(%back, %idf)
%out: f32[2, 4] = aten.mul.Scalar(%sum, 1.0)";
    check("drop_identity_ops", g, &[rand_tensor(DType::F32, &[2, 4], 3), ids_t], want, 0.0);
}

/// A transform registered at the compile stage runs when an engine is built, as it shows in
/// `autodeploy graph --stage compile`: the graph printed is the graph that runs.
#[test]
fn a_compile_stage_transform_runs_in_the_engine() {
    use autodeploy_core::transform::Transform;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    struct Marker;
    impl Transform for Marker {
        fn apply(&self, g: &mut Graph, _: &TransformContext) -> autodeploy_core::error::Result<String> {
            RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(format!("saw {} nodes", g.nodes.len()))
        }
    }
    let name = "test_compile_stage_marker";
    registry::register_transform(registry::TransformRef::external(
        name,
        Stage::Compile,
        0,
        true,
        &[],
        "0.0.0",
        "tests/transforms.rs",
        Box::new(|| Box::new(Marker) as Box<dyn Transform>),
    ))
    .unwrap();
    let line = format!("[stage=compile, transform={name}] saw");
    let shown = pipeline_graph("llama", "float32", Stage::Compile);
    assert!(shown.history.iter().any(|l| l.starts_with(&line)), "{:?}", shown.history);
    let before = RUNS.load(Ordering::SeqCst);
    let e = engine("llama", "");
    assert!(RUNS.load(Ordering::SeqCst) > before, "the compile-stage transform did not run in the engine");
    assert!(e.graph.history.iter().any(|l| l.starts_with(&line)), "{:?}", e.graph.history);
    // Switched off like any other transform.
    let e = engine("llama", &format!("[transforms.{name}]\nenabled = false"));
    assert!(e.graph.history.iter().any(|l| l == &format!("[stage=compile, transform={name}] disabled")));
}

/// `fuse_qk_norm_attention` (compile stage, on by default): every fixture whose attention
/// RMS-normalises q and k per head before the RoPE in the model's dtype (Qwen3, Qwen3-MoE,
/// OpenELM, Llama 4, Gemma 3 in f32) gets its two norms a layer folded into the RoPE-fused
/// cached attention, and the logits of a ragged prefill and decode steps are the unfused
/// graph's bit for bit in f32 and bf16; the other fixtures' graphs are left as they were.
#[test]
fn qk_norms_fold_into_the_rope_fused_attention_without_changing_the_numbers() {
    let opt = "compile_backend = \"opt\"\nattn_page_size = 4\n";
    // On by default: the plain graph switches it off.
    let base = &format!("{opt}transforms.fuse_qk_norm_attention.enabled = false\n");
    let on = opt.to_string();
    let prompts = vec![vec![1, 17, 42, 99, 5, 7, 250, 3, 11], vec![1, 200, 3]];
    let decode = vec![vec![5, 9], vec![77, 31], vec![2, 140]];
    let count = |dump: &str, what: &str| dump.lines().filter(|l| l.contains(what)).count();
    let mut folded = Vec::new();
    for fam in FAMILIES {
        for dtype in ["float32", "bfloat16"] {
            let with = |extra: &str| format!("{extra}dtype = \"{dtype}\"\n");
            let (mut a, mut b) = (engine(fam, &with(&on)), engine(fam, &with(base)));
            let (fused, plain) = (a.graph.dump(), b.graph.dump());
            let n = count(&fused, "qk_norm_eps=");
            let norms = |d: &str| count(d, "= torch_rmsnorm(");
            assert_eq!(norms(&plain) - norms(&fused), 2 * n, "{fam} {dtype}: two norms an attention\n{fused}");
            assert_eq!(count(&plain, "qk_norm_eps="), 0, "{fam}: folded while off");
            if n == 0 {
                let body = |d: &str| {
                    d.lines().filter(|l| !l.contains("fuse_qk_norm_attention")).collect::<Vec<_>>().join("\n")
                };
                assert_eq!(body(&fused), body(&plain), "{fam} {dtype}: changed without folding");
                continue;
            }
            folded.push(format!("{fam} {dtype}"));
            let x = common::steps::run_paged_steps(&mut a, 4, &prompts, &decode);
            let y = common::steps::run_paged_steps(&mut b, 4, &prompts, &decode);
            assert!(x.len() == 4 && x == y, "{fam} {dtype}: folding the q/k norms changed the logits");
        }
    }
    for want in ["qwen3 bfloat16", "qwen3_moe bfloat16", "openelm bfloat16", "gemma3_text float32"] {
        assert!(folded.iter().any(|f| f == want), "{want} not folded: {folded:?}");
    }
}

/// `fuse_moe_router` (compile stage, off by default): in every mixture-of-experts fixture
/// (Qwen3-MoE, Mixtral, Llama 4's sigmoid router) each `torch_moe` takes its router's weight in
/// place of the router linear's output (`router_weight=true`, the linear gone), and the logits of
/// a ragged prefill and decode steps are the unfused graph's bit for bit in f32 and bf16.
#[test]
fn the_moe_router_folds_into_the_moe_op_without_changing_the_numbers() {
    let base = "compile_backend = \"opt\"\nattn_page_size = 4\n";
    let on = format!("{base}transforms.fuse_moe_router.enabled = true\n");
    let prompts = vec![vec![1, 17, 42, 99, 5, 7, 250, 3, 11], vec![1, 200, 3]];
    let decode = vec![vec![5, 9], vec![77, 31], vec![2, 140]];
    let count = |dump: &str, what: &str| dump.lines().filter(|l| l.contains(what)).count();
    for (fam, layers) in [("qwen3_moe", 1), ("mixtral", 2), ("llama4_text", 2)] {
        for dtype in ["float32", "bfloat16"] {
            let with = |extra: &str| format!("{extra}dtype = \"{dtype}\"\n");
            let (mut a, mut b) = (engine(fam, &with(&on)), engine(fam, &with(base)));
            let (fused, plain) = (a.graph.dump(), b.graph.dump());
            assert_eq!(count(&fused, "router_weight=true"), layers, "{fam} {dtype}\n{fused}");
            assert_eq!(count(&plain, "router_weight=true"), 0, "{fam}: folded while off");
            let linears = |d: &str| count(d, "= aten.linear(");
            assert_eq!(linears(&plain) - linears(&fused), layers, "{fam} {dtype}: the router linears\n{fused}");
            let x = common::steps::run_paged_steps(&mut a, 4, &prompts, &decode);
            let y = common::steps::run_paged_steps(&mut b, 4, &prompts, &decode);
            assert!(x.len() == 4 && x == y, "{fam} {dtype}: folding the router changed the logits");
        }
    }
}

/// `detect_sharding` on an MLP the matchers left as linears (`silu(x·Wgᵀ) * (x·Wuᵀ)` then a
/// linear): gate and up split by rows, down by columns, one all_reduce; but where a value inside
/// the MLP is read elsewhere too (here the gate's output is also a graph output), a rank would
/// hold only its columns of it, so the MLP is not split as one (a linear producing a graph
/// output is then split as an LM head instead; one split as part of an MLP is not also split
/// as an LM head).
#[test]
fn an_mlp_left_as_linears_splits_only_when_its_values_stay_inside_it() {
    let build = |gate_out_too: bool| {
        let ws = [
            ("wg", rand_tensor(DType::F32, &[16, 8], 40)),
            ("wu", rand_tensor(DType::F32, &[16, 8], 41)),
            ("wd", rand_tensor(DType::F32, &[8, 16], 42)),
        ];
        let mut b = GraphBuilder::new(store(&ws));
        let x = b.input("x", DType::F32, vec![Dim::sym("n"), Dim::new(8)]);
        b.symbol("n", 1, 8);
        let [wg, wu] = ["wg", "wu"].map(|w| b.param(w, DType::F32, static_shape(&[16, 8])));
        let wd = b.param("wd", DType::F32, static_shape(&[8, 16]));
        let g = b.op("gate", Op::linear(), &[x, wg]).unwrap();
        let u = b.op("up", Op::linear(), &[x, wu]).unwrap();
        let a = b.op("act", Op::unary("aten.silu"), &[g]).unwrap();
        let p = b.op("prod", Op::binary(MUL), &[a, u]).unwrap();
        let y = b.op("down", Op::linear(), &[p, wd]).unwrap();
        b.output(y);
        if gate_out_too {
            b.output(g);
        }
        b.finish().unwrap()
    };
    autodeploy_plugins::link();
    let cfg = PipelineConfig::from_toml_str("model = \"unused\"\nworld_size = 2\n", None).unwrap();
    let cx = TransformContext { config: &cfg, options: toml_table() };
    let shard = |mut g: Graph| {
        let t = registry::transform("detect_sharding").unwrap().instantiate();
        let summary = t.apply(&mut g, &cx).unwrap();
        g.validate().unwrap();
        (summary, body(&g))
    };
    let (summary, dump) = shard(build(false));
    assert!(summary.contains("1 MLPs, 0 LM head") && summary.contains("3 weights sliced, 1 all_reduce"), "{summary}");
    assert!(dump.contains("aten.linear(%x, %wg.tp0of2)") && dump.contains("aten.linear(%prod, %wd.tp0of2)"), "{dump}");
    // (Each output linear is then split as an LM head: by rows, gathered after.)
    let (summary, dump) = shard(build(true));
    assert!(summary.contains("0 MLPs"), "{summary}");
    assert!(!dump.contains("all_reduce") && dump.contains("%down.all_gather"), "{dump}");
}

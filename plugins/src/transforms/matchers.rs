//! Pattern-matcher stage: find the structure of a decoder in the unfused graph and replace it
//! with canonical ops. Patterns know ops and shapes, never model names.

use autodeploy_core::error::Result;
use autodeploy_core::ir::{Graph, ValueId};
use autodeploy_core::ops::attention::{AttentionAttrs, Scoring, MATMUL};
use autodeploy_core::ops::binary::{ADD, ADD_SCALAR, DIV_SCALAR, MUL, MUL_SCALAR, POW_SCALAR};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::ops::linear::{GateAct, SwiGlu, LINEAR};
use autodeploy_core::ops::norm::NormAttrs;
use autodeploy_core::pattern::{rewrite_all, Captures, Pattern, PatternBuilder};
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::{DType, Op, SizeArg};
use autodeploy_sdk::Stage;

macro_rules! register {
    ($name:literal, $order:expr, $ty:expr) => {
        autodeploy_core::inventory::submit! {
            TransformPlugin {
                name: $name,
                stage: Stage::PatternMatcher,
                order: $order,
                enabled_by_default: true,
                options: &[],
                version: env!("CARGO_PKG_VERSION"),
                origin: "built-in",
                make: || Box::new($ty),
            }
        }
    };
}

register!("match_rmsnorm", 10, MatchRmsNorm);
register!("match_rope", 20, MatchRope);
register!("match_rope_interleaved", 21, MatchRopeInterleaved);
register!("match_attention", 30, MatchAttention);
register!("match_swiglu", 40, MatchSwiGlu);
register!("match_mlp", 41, MatchMlp);

/// Inserts `op(ins)` at `pos` when it is valid on these inputs and gives exactly the dtype and
/// shape of the matched output; otherwise leaves the graph as it was and returns `None`.
fn insert_if_equivalent(
    g: &mut Graph,
    pos: usize,
    hint: &str,
    op: Op,
    ins: &[ValueId],
    matched: ValueId,
) -> Option<ValueId> {
    let v = g.insert_node(pos, hint, op, ins).ok()?;
    if g.meta(v) == g.meta(matched) {
        Some(v)
    } else {
        g.nodes.remove(pos);
        None
    }
}

fn is_last_dim(d: i64, rank: usize) -> bool {
    d == -1 || d == rank as i64 - 1
}

/// `w * cast?(cast?(x) * rsqrt(mean(cast?(x)², -1, keepdim) + eps))`, the cast to f32 where present.
pub fn rmsnorm_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let x = p.input("x");
    let w = p.input("w");
    let xf = p.optional(|op, _| op.to_dtype_of() == Some(DType::F32), x);
    let sq = p.op(|op, _| op.scalar_of(POW_SCALAR) == Some(2.0), &[xf]);
    let var = p.op(|op, _| op.mean_attrs().is_some_and(|m| m.keepdim && m.dims.len() == 1), &[sq]);
    let ve = p.op(
        |op, c: &mut Captures| match op.scalar_of(ADD_SCALAR) {
            Some(e) => {
                c.f.insert("eps", e);
                true
            }
            None => false,
        },
        &[var],
    );
    let r = p.op(|op, _| op.name() == "aten.rsqrt", &[ve]);
    let y = p.commutative(|op, _| op.is(MUL), xf, r);
    let yc = p.opt_cast(y);
    let out = p.commutative(|op, _| op.is(MUL), w, yc);
    p.build(out)
}

pub struct MatchRmsNorm;

impl Transform for MatchRmsNorm {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let pat = rmsnorm_pattern();
        let n = rewrite_all(g, &pat, |g, m, pos| {
            let (x, w) = (m.input("x"), m.input("w"));
            let xm = g.meta(x).clone();
            // The mean must run over the last dim, in f32, and the weight be one per channel.
            let mean_ok = m
                .nodes
                .iter()
                .any(|&i| g.nodes[i].op.mean_attrs().is_some_and(|a| is_last_dim(a.dims[0], xm.shape.len())));
            let wm = g.meta(w);
            if !mean_ok || wm.shape.len() != 1 || xm.shape.last() != Some(&wm.shape[0]) || !xm.dtype.is_float() {
                return Ok(None);
            }
            let norm_in = m.nodes.iter().find_map(|&i| g.nodes[i].op.is(POW_SCALAR).then(|| g.nodes[i].inputs[0]));
            if norm_in.is_some_and(|v| g.meta(v).dtype != DType::F32) {
                return Ok(None);
            }
            // The dtype the normalised value has before the weight multiplies it.
            let out_mul = pos - 1; // the match output's node
            let yc = *g.nodes[out_mul].inputs.iter().find(|&&v| v != w).unwrap_or(&w);
            let norm_dtype = g.meta(yc).dtype;
            let op = Op::rmsnorm(NormAttrs::new(m.caps.f["eps"], norm_dtype));
            let hint = format!("{}.rmsnorm", g.value(m.output).name);
            Ok(Some(g.insert_node(pos, &hint, op, &[x, w])?))
        })?;
        Ok(format!("matched {n} rmsnorm"))
    }
}

fn capture_slice(tag: &'static str) -> impl Fn(&Op, &mut Captures) -> bool + Send + Sync {
    move |op, c| match op.slice_of() {
        Some(Slice { dim, start, end, step: 1 }) => {
            let (ks, ke, kd) = match tag {
                "x1" => ("x1_start", "x1_end", "x1_dim"),
                _ => ("x2_start", "x2_end", "x2_dim"),
            };
            c.f.insert(ks, start as f64);
            c.f.insert(ke, end as f64);
            c.f.insert(kd, dim as f64);
            true
        }
        _ => false,
    }
}

/// `x·cos + cat(-x[..., d/2:], x[..., :d/2])·sin`
pub fn rope_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let x = p.input("x");
    let cos = p.input("cos");
    let sin = p.input("sin");
    let xc = p.commutative(|op, _| op.is(MUL), x, cos);
    let x1 = p.op(capture_slice("x1"), &[x]);
    let x2 = p.op(capture_slice("x2"), &[x]);
    let n2 = p.op(|op, _| op.name() == "aten.neg", &[x2]);
    let rot = p.op(|op, c| op.cat_dim().map(|d| c.f.insert("cat_dim", d as f64)).is_some(), &[n2, x1]);
    let rs = p.commutative(|op, _| op.is(MUL), rot, sin);
    let out = p.commutative(|op, _| op.is(ADD), xc, rs);
    p.build(out)
}

pub struct MatchRope;

impl Transform for MatchRope {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let pat = rope_pattern();
        let n = rewrite_all(g, &pat, |g, m, pos| {
            let x = m.input("x");
            let xm = g.meta(x).clone();
            let rank = xm.shape.len();
            let Some(d) = xm.shape.last().and_then(|d| d.as_static()) else { return Ok(None) };
            let c = &m.caps.f;
            let half = (d / 2) as f64;
            let ends = |e: f64| if e >= d as f64 { d as f64 } else { e };
            let ok = d % 2 == 0
                && [c["x1_dim"], c["x2_dim"], c["cat_dim"]].iter().all(|&k| is_last_dim(k as i64, rank))
                && c["x1_start"] == 0.0
                && ends(c["x1_end"]) == half
                && c["x2_start"] == half
                && ends(c["x2_end"]) == d as f64;
            if !ok {
                return Ok(None);
            }
            let hint = format!("{}.rope", g.value(m.output).name);
            let ins = [x, m.input("cos"), m.input("sin")];
            Ok(insert_if_equivalent(g, pos, &hint, Op::rope(false), &ins, m.output))
        })?;
        Ok(format!("matched {n} rope"))
    }
}

/// `rope(reshape(transpose(view(x, [..., d/2, 2]), -1, -2), [..., d]))`: RoPE on a q/k whose
/// channel pairs are interleaved (as DeepSeek-style checkpoints store them).
pub fn rope_interleaved_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let x = p.input("x");
    let cos = p.input("cos");
    let sin = p.input("sin");
    let v = p.op(
        |op, _| matches!(op.view_sizes().as_deref(), Some([.., SizeArg::Dim(d)]) if d.as_static() == Some(2)),
        &[x],
    );
    let t = p.op(|op, _| matches!(op.transpose_dims(), Some((-1, -2) | (-2, -1))), &[v]);
    let r = p.op(|op, _| op.view_sizes().is_some(), &[t]);
    let out = p.op(|op, _| op.rope_interleaved() == Some(false), &[r, cos, sin]);
    p.build(out)
}

pub struct MatchRopeInterleaved;

impl Transform for MatchRopeInterleaved {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let pat = rope_interleaved_pattern();
        let n = rewrite_all(g, &pat, |g, m, pos| {
            let x = m.input("x");
            // The de-interleaved value must have x's shape: only the last dim was permuted.
            let deint = g.nodes[pos - 1].inputs[0];
            if g.meta(deint).shape != g.meta(x).shape {
                return Ok(None);
            }
            let hint = format!("{}.rope", g.value(m.output).name);
            Ok(Some(g.insert_node(pos, &hint, Op::rope(true), &[x, m.input("cos"), m.input("sin")])?))
        })?;
        Ok(format!("matched {n} interleaved rope"))
    }
}

fn capture_sdpa(op: &Op, c: &mut Captures) -> bool {
    match op.sdpa_attrs() {
        Some(a) => {
            c.b.insert("causal", a.is_causal);
            c.b.insert("gqa", a.enable_gqa);
            if let Some(s) = a.scale {
                c.f.insert("scale", s);
            }
            if let Some(w) = a.scoring.window {
                c.f.insert("window", w as f64);
            }
            if let Some(w) = a.scoring.chunk {
                c.f.insert("chunk", w as f64);
            }
            if let Some(s) = a.scoring.softcap {
                c.f.insert("softcap", s);
            }
            true
        }
        None => false,
    }
}

/// `reshape(expand(unsqueeze(x, 2), [b, hk, n, s, d]), [b, hk·n, s, d])`: transformers' repeat_kv.
fn repeat_kv(p: &mut PatternBuilder, x: usize) -> usize {
    let u = p.op(|op, _| op.unsqueeze_dim() == Some(2), &[x]);
    let e = p.op(|op, _| op.expand_sizes().is_some_and(|s| s.len() == 5), &[u]);
    p.op(|op, _| op.view_sizes().is_some_and(|s| s.len() == 4), &[e])
}

/// SDPA whose k and v went through repeat_kv (GQA spelled out).
pub fn attention_repeat_kv_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let (q, k, v) = (p.input("q"), p.input("k"), p.input("v"));
    let kr = repeat_kv(&mut p, k);
    let vr = repeat_kv(&mut p, v);
    let out = p.op(capture_sdpa, &[q, kr, vr]);
    p.build(out)
}

pub fn attention_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let (q, k, v) = (p.input("q"), p.input("k"), p.input("v"));
    let out = p.op(capture_sdpa, &[q, k, v]);
    p.build(out)
}

/// The eager form transformers' `eager_attention_forward` exports:
/// `matmul(cast?(softmax(cast?(mask?(softcap?(matmul(q, kᵀ)·scale))), -1)), v)`, k/v optionally
/// through repeat_kv. `softcap`: Gemma 2's `c·tanh(s / c)`; `masked`: a `causal_mask` node (an
/// additive mask tensor the torch-export importer evaluated as causal, or a sliding window: a
/// mask it could not read is never matched, and the uncached path stays correct), which makes
/// the attention causal. Without it the form is not causal.
fn eager_attention_pattern(with_repeat_kv: bool, softcap: bool, masked: bool) -> Pattern {
    let mut p = PatternBuilder::new();
    let (q, k, v) = (p.input("q"), p.input("k"), p.input("v"));
    let (k, v) = if with_repeat_kv { (repeat_kv(&mut p, k), repeat_kv(&mut p, v)) } else { (k, v) };
    let kt = p.op(|op, _| matches!(op.transpose_dims(), Some((2, 3) | (3, 2) | (-2, -1) | (-1, -2))), &[k]);
    let scores = p.op(|op, _| op.is(MATMUL), &[q, kt]);
    let scaled = p.op(
        |op, c| match op.scalar_of(MUL_SCALAR) {
            Some(s) => {
                c.f.insert("scale", s);
                true
            }
            None => false,
        },
        &[scores],
    );
    let scaled = if softcap {
        // Matching runs from the output back: the outer multiply captures the cap, the
        // division must divide by the same.
        let over =
            p.op(|op, c| op.scalar_of(DIV_SCALAR).is_some_and(|cap| Some(&cap) == c.f.get("softcap")), &[scaled]);
        let t = p.op(|op, _| op.is("aten.tanh"), &[over]);
        p.op(
            |op, c| match op.scalar_of(MUL_SCALAR) {
                Some(cap) if cap > 0.0 => {
                    c.f.insert("softcap", cap);
                    true
                }
                _ => false,
            },
            &[t],
        )
    } else {
        scaled
    };
    let scaled = if masked {
        p.op(
            |op, c| match op.causal_mask_of() {
                Some(window) => {
                    c.b.insert("causal", true);
                    if let Some(w) = window {
                        c.f.insert("window", w as f64);
                    }
                    true
                }
                None => false,
            },
            &[scaled],
        )
    } else {
        scaled
    };
    // transformers upcasts the scores to f32 for the softmax and casts the weights back.
    let up = p.opt_cast(scaled);
    let sm = p.op(|op, _| matches!(op.softmax_dim(), Some(-1 | 3)), &[up]);
    let w = p.opt_cast(sm);
    let out = p.op(|op, _| op.is(MATMUL), &[w, v]);
    p.build(out)
}

pub struct MatchAttention;

impl Transform for MatchAttention {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut counts = [0usize; 12];
        let mut patterns = vec![(attention_repeat_kv_pattern(), true), (attention_pattern(), false)];
        // The longer eager forms first, so a masked, soft-capped chain is taken whole.
        for (softcap, masked) in [(true, true), (false, true), (true, false), (false, false)] {
            patterns.push((eager_attention_pattern(true, softcap, masked), true));
            patterns.push((eager_attention_pattern(false, softcap, masked), false));
        }
        for (i, (pat, repeated)) in patterns.iter().enumerate() {
            counts[i] = rewrite_all(g, pat, |g, m, pos| {
                let (q, k, v) = (m.input("q"), m.input("k"), m.input("v"));
                let (qm, km) = (g.meta(q).clone(), g.meta(k).clone());
                if qm.shape.len() != 4 || km.shape.len() != 4 {
                    return Ok(None);
                }
                // repeat_kv must repeat each kv head in place (kv head h serves q heads h·n..h·n+n).
                if *repeated && qm.shape[1].div(&km.shape[1]).is_none() {
                    return Ok(None);
                }
                let Some(d) = qm.shape[3].as_static() else { return Ok(None) };
                let scale = m.caps.f.get("scale").copied().unwrap_or(1.0 / (d as f64).sqrt());
                // The eager form carries no mask here, so it is not causal.
                let causal = m.caps.b.get("causal").copied().unwrap_or(false);
                let scoring = Scoring {
                    window: m.caps.f.get("window").map(|&w| w as usize),
                    chunk: m.caps.f.get("chunk").map(|&w| w as usize),
                    softcap: m.caps.f.get("softcap").copied(),
                    kv_fp8: None,
                };
                let op = Op::attention(AttentionAttrs { causal, scale, scoring });
                let hint = format!("{}.attention", g.value(m.output).name);
                Ok(Some(g.insert_node(pos, &hint, op, &[q, k, v])?))
            })?;
        }
        Ok(format!(
            "matched {} attention ({} sdpa, {} eager; {} with repeat_kv GQA)",
            counts.iter().sum::<usize>(),
            counts[0] + counts[1],
            counts[2..].iter().sum::<usize>(),
            counts[0] + counts.iter().skip(2).step_by(2).sum::<usize>()
        ))
    }
}

/// The gated MLP's activation: silu (SwiGLU), or GELU exact or tanh-approximated (GeGLU).
fn gate_activation(op: &Op) -> Option<GateAct> {
    match (op.name(), op.attrs.trim()) {
        ("aten.silu", _) => Some(GateAct::Silu),
        ("aten.gelu", "approximate=tanh") => Some(GateAct::GeluTanh),
        ("aten.gelu", "" | "approximate=none") => Some(GateAct::Gelu),
        _ => None,
    }
}

/// A [`gate_activation`] node reading `x`, its activation captured as `act` ([`captured_act`]).
fn activation_node(p: &mut PatternBuilder, x: usize) -> usize {
    p.op(
        |op, c| match gate_activation(op) {
            Some(a) => {
                c.f.insert("act", a as i32 as f64);
                true
            }
            None => false,
        },
        &[x],
    )
}

/// `down(act(gate(x)) · up(x))` with bias-free linears, act one of [`gate_activation`]'s.
pub fn swiglu_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let (x, wg, wu, wd) = (p.input("x"), p.input("w_gate"), p.input("w_up"), p.input("w_down"));
    let gt = p.op(|op, _| op.is(LINEAR), &[x, wg]);
    let up = p.op(|op, _| op.is(LINEAR), &[x, wu]);
    let a = activation_node(&mut p, gt);
    let m = p.commutative(|op, _| op.is(MUL), a, up);
    let out = p.op(|op, _| op.is(LINEAR), &[m, wd]);
    p.build(out)
}

/// The same MLP over a checkpoint's fused gate/up weight (Phi-3's `gate_up_proj`, exported as
/// one linear chunked in two): `down(act(gu[.., :I]) · gu[.., I:])`, `gu = x · w_gate_upᵀ`.
pub fn fused_swiglu_pattern() -> Pattern {
    let mut p = PatternBuilder::new();
    let (x, wgu, wd) = (p.input("x"), p.input("w_gate_up"), p.input("w_down"));
    let gu = p.op(|op, _| op.is(LINEAR), &[x, wgu]);
    let half = |first: bool| {
        move |op: &Op, c: &mut Captures| match op.slice_of() {
            Some(s) if s.step == 1 => {
                let key = if first { "gate" } else { "up" };
                c.f.insert(key, s.start as f64);
                c.f.insert(if first { "gate_end" } else { "up_end" }, s.end as f64);
                c.f.insert(if first { "gate_dim" } else { "up_dim" }, s.dim as f64);
                true
            }
            _ => false,
        }
    };
    let gate = p.op(half(true), &[gu]);
    let up = p.op(half(false), &[gu]);
    let a = activation_node(&mut p, gate);
    let m = p.commutative(|op, _| op.is(MUL), a, up);
    let out = p.op(|op, _| op.is(LINEAR), &[m, wd]);
    p.build(out)
}

/// Whether a fused match's slices are the gate half then the up half of the last dim.
fn halves(g: &Graph, m: &autodeploy_core::pattern::Match) -> bool {
    let f = &m.caps.f;
    let rows = g.meta(m.input("w_gate_up")).shape.first().and_then(|d| d.as_static()).unwrap_or(0) as f64;
    let last = |d: f64| d == -1.0 || d == (g.meta(m.input("x")).shape.len() as f64 - 1.0);
    let i = rows / 2.0;
    f["gate"] == 0.0
        && f["gate_end"] == i
        && f["up"] == i
        && (f["up_end"] == rows || f["up_end"] >= i64::MAX as f64)
        && last(f["gate_dim"])
        && last(f["up_dim"])
}

/// Whether the MLP over `ins` will have quantized linears (a weight the checkpoint stored
/// quantized, or `quantize = "fp8"`): they become quantized linears in the `quantize` stage, so
/// the MLP stays unfused here.
fn reads_scaled(g: &Graph, cx: &TransformContext, ins: &[ValueId]) -> bool {
    cx.config.quantize != autodeploy_core::config::Quantize::None
        || g.params.iter().any(|p| ins.contains(&p.value) && g.weights.is_scaled(&p.weight))
}

pub struct MatchSwiGlu;

impl Transform for MatchSwiGlu {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let n = rewrite_all(g, &swiglu_pattern(), |g, m, pos| {
            let ins = [m.input("x"), m.input("w_gate"), m.input("w_up"), m.input("w_down")];
            if reads_scaled(g, cx, &ins) {
                return Ok(None);
            }
            let act = captured_act(m);
            let hint = format!("{}.swiglu", g.value(m.output).name);
            let op = Op::swiglu(SwiGlu { fused: false, epilogue: false, act });
            Ok(insert_if_equivalent(g, pos, &hint, op, &ins, m.output))
        })?;
        let fused = rewrite_all(g, &fused_swiglu_pattern(), |g, m, pos| {
            if !halves(g, m) {
                return Ok(None);
            }
            let ins = [m.input("x"), m.input("w_gate_up"), m.input("w_down")];
            if reads_scaled(g, cx, &ins) {
                return Ok(None);
            }
            let hint = format!("{}.swiglu", g.value(m.output).name);
            let op = Op::swiglu(SwiGlu { fused: true, epilogue: false, act: captured_act(m) });
            Ok(insert_if_equivalent(g, pos, &hint, op, &ins, m.output))
        })?;
        Ok(format!("matched {} gated mlp (swiglu/geglu; {fused} over a fused gate/up weight)", n + fused))
    }
}

/// `proj(act(fc(x)))`, the ungated MLP (StarCoder2's `c_fc` / `c_proj`), both linears biased or
/// neither.
pub fn mlp_pattern(biased: bool) -> Pattern {
    let mut p = PatternBuilder::new();
    let (x, wf, wp) = (p.input("x"), p.input("w_fc"), p.input("w_proj"));
    let fc_ins = if biased { vec![x, wf, p.input("b_fc")] } else { vec![x, wf] };
    let fc = p.op(|op, _| op.is(LINEAR), &fc_ins);
    let a = activation_node(&mut p, fc);
    let proj_ins = if biased { vec![a, wp, p.input("b_proj")] } else { vec![a, wp] };
    let out = p.op(|op, _| op.is(LINEAR), &proj_ins);
    p.build(out)
}

/// The activation a gated or ungated MLP pattern captured.
fn captured_act(m: &autodeploy_core::pattern::Match) -> GateAct {
    [GateAct::Silu, GateAct::GeluTanh, GateAct::Gelu]
        .into_iter()
        .find(|&a| a as i32 as f64 == m.caps.f["act"])
        .expect("captured from gate_activation")
}

pub struct MatchMlp;

impl Transform for MatchMlp {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let mut n = 0;
        for biased in [true, false] {
            n += rewrite_all(g, &mlp_pattern(biased), |g, m, pos| {
                let mut ins = vec![m.input("x"), m.input("w_fc"), m.input("w_proj")];
                if biased {
                    ins.extend([m.input("b_fc"), m.input("b_proj")]);
                }
                if reads_scaled(g, cx, &ins) {
                    return Ok(None);
                }
                let hint = format!("{}.mlp", g.value(m.output).name);
                Ok(insert_if_equivalent(g, pos, &hint, Op::mlp(captured_act(m)), &ins, m.output))
            })?;
        }
        Ok(format!("matched {n} ungated mlp"))
    }
}

//! Post-load fusion: linears that read the same input become one GEMM over concatenated
//! weights followed by slices (quantized linears too, each kind among itself: FP8 where the
//! parts share their input scale, the fused weight getting one scale a row; NVFP4 where they
//! share their global scale, the block scales concatenated); a SwiGLU MLP's gate and up
//! projections become one weight.

use std::collections::BTreeMap;
use std::sync::Arc;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta, ValueId};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::ops::linear::{SwiGlu, LINEAR};
use autodeploy_core::ops::quant_linear::{MAX_SCALE_RUNS, NVFP4_LINEAR};
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::shape::static_shape;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::{DType, Op};
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fuse_gemms",
        stage: Stage::PostLoadFusion,
        order: 10,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FuseGemms),
    }
}

/// The weight-store name a param value reads, if the value is a param.
fn param_weight(g: &Graph, v: ValueId) -> Option<String> {
    g.params.iter().find(|p| p.value == v).map(|p| p.weight.clone())
}

/// Registers the params `vals` concatenated along dim 0 as a new weight (read when a backend
/// loads it: nothing is copied here); returns the param value reading it.
fn concat_params(g: &mut Graph, vals: &[ValueId], name: &str) -> Result<ValueId> {
    let parts = vals
        .iter()
        .map(|&v| param_weight(g, v).ok_or_else(|| Error::Msg(format!("%{} is not a weight", g.value(v).name))))
        .collect::<Result<Vec<_>>>()?;
    let dtype = g.meta(vals[0]).dtype;
    let store = Arc::make_mut(&mut g.weights);
    store.add_concat(name, &parts, dtype)?;
    let (_, shape) = store.stored_meta(name)?;
    Ok(g.add_param(name, TensorMeta { dtype, shape: static_shape(&shape) }))
}

pub struct FuseGemms;

/// The linears `fuse_gemms` fuses, each kind among itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Float,
    Fp8 { dynamic: bool },
    Nvfp4,
}

impl Kind {
    fn of(op: &Op) -> Option<Kind> {
        if op.is(LINEAR) {
            return Some(Kind::Float);
        }
        if op.is(NVFP4_LINEAR) {
            return Some(Kind::Nvfp4);
        }
        op.fp8_linear_of().map(|dynamic| Kind::Fp8 { dynamic })
    }

    fn op(self) -> Op {
        match self {
            Kind::Float => Op::linear(),
            Kind::Fp8 { dynamic: false } => Op::fp8_linear(),
            Kind::Fp8 { dynamic: true } => Op::fp8_linear_dynamic(),
            Kind::Nvfp4 => Op::nvfp4_linear(),
        }
    }

    /// Where a node's scales are: the one the group must share (FP8's input scale, NVFP4's
    /// global scale), the one each part brings (the weight scale, the block scales); and the bias.
    fn inputs(self) -> (Option<usize>, Option<usize>, usize) {
        match self {
            Kind::Float => (None, None, 2),
            Kind::Fp8 { dynamic: false } => (Some(2), Some(3), 4),
            Kind::Fp8 { dynamic: true } => (None, Some(2), 3),
            Kind::Nvfp4 => (Some(3), Some(2), 4),
        }
    }
}

/// One linear of a group: input, weight, the scale it shares with the group and its own,
/// bias, output.
struct Member {
    x: ValueId,
    w: ValueId,
    shared: Option<ValueId>,
    own: Option<ValueId>,
    bias: Option<ValueId>,
    out: ValueId,
}

impl FuseGemms {
    /// One group of linears of one kind sharing an input → one linear and slices. Returns
    /// false if the group does not qualify (weights or scales not params, mixed bias, mixed
    /// dtypes; quantized: different shared scales).
    fn fuse_group(g: &mut Graph, kind: Kind, nodes: &[usize]) -> Result<bool> {
        let (shared_at, own_at, bias_at) = kind.inputs();
        let lin: Vec<Member> = nodes
            .iter()
            .map(|&i| {
                let n = &g.nodes[i];
                Member {
                    x: n.inputs[0],
                    w: n.inputs[1],
                    shared: shared_at.map(|k| n.inputs[k]),
                    own: own_at.map(|k| n.inputs[k]),
                    bias: n.inputs.get(bias_at).copied(),
                    out: n.outputs[0],
                }
            })
            .collect();
        let has_bias = lin[0].bias.is_some();
        let dtype = g.meta(lin[0].w).dtype;
        let is_param = |v: Option<ValueId>| v.is_none_or(|v| param_weight(g, v).is_some());
        let ok = lin.iter().all(|l| {
            l.bias.is_some() == has_bias
                && param_weight(g, l.w).is_some()
                && is_param(l.bias)
                && is_param(l.shared)
                && is_param(l.own)
                && g.meta(l.w).dtype == dtype
        });
        if !ok || !shared_values_equal(g, &lin)? {
            return Ok(false);
        }
        let names: Vec<String> = lin.iter().map(|l| param_weight(g, l.w).expect("checked")).collect();
        let fused_name = format!("fused[{}]", names.join("+"));
        let mut op = kind.op();
        let own = match kind {
            Kind::Float => None,
            Kind::Fp8 { dynamic } => match fp8_row_scales(g, &lin, &fused_name)? {
                Some((s, runs)) => {
                    if !dynamic && runs.len() <= MAX_SCALE_RUNS {
                        op = Op::fp8_linear_scale_runs(&runs);
                    }
                    Some(s)
                }
                None => return Ok(false),
            },
            Kind::Nvfp4 => {
                let bs: Vec<ValueId> = lin.iter().map(|l| l.own.expect("nvfp4")).collect();
                Some(concat_params(g, &bs, &format!("{fused_name}.weight_scale"))?)
            }
        };
        let w = concat_params(g, &lin.iter().map(|l| l.w).collect::<Vec<_>>(), &fused_name)?;
        let mut ins = vec![lin[0].x, w];
        match kind {
            Kind::Nvfp4 => ins.extend(own.into_iter().chain(lin[0].shared)),
            _ => ins.extend(lin[0].shared.into_iter().chain(own)),
        }
        if has_bias {
            let bs: Vec<ValueId> = lin.iter().map(|l| l.bias.expect("checked")).collect();
            ins.push(concat_params(g, &bs, &format!("{fused_name}.bias"))?);
        }
        let pos = *nodes.iter().min().expect("group of two or more");
        let hint = format!("{}.fused", g.value(lin[0].out).name);
        let y = g.insert_node(pos, &hint, op, &ins)?;
        let mut start = 0i64;
        for (k, l) in lin.iter().enumerate() {
            let width = g.meta(l.w).shape[0].as_static().expect("static weight") as i64;
            let name = g.value(l.out).name.clone();
            let s = g.insert_node(pos + 1 + k, &name, Op::slice(Slice::new(-1, start, start + width)), &[y])?;
            g.replace_uses(l.out, s);
            start += width;
        }
        g.dce();
        Ok(true)
    }
}

/// A weight's values as f32 (the small scales read here).
pub(crate) fn values(g: &Graph, v: ValueId) -> Result<Vec<f32>> {
    let name = param_weight(g, v).expect("checked by the caller");
    Ok(g.weights.load(&name, DType::F32)?.to_f32().into_owned())
}

/// Whether every member's shared scale holds the first one's values (FP8 inputs quantize
/// alike; NVFP4 weights share their global scale).
fn shared_values_equal(g: &Graph, lin: &[Member]) -> Result<bool> {
    let Some(first) = lin[0].shared else { return Ok(true) };
    let want = values(g, first)?;
    for l in &lin[1..] {
        if values(g, l.shared.expect("same kind"))? != want {
            return Ok(false);
        }
    }
    Ok(true)
}

/// An FP8 group's weight scale: one a row of the fused weight, computed here from the parts'
/// (one value or one a row each), and the row counts of its runs of equal values (the parts
/// with one scale each: q/k/v, gate/up); `None` if a part's does not fit.
fn fp8_row_scales(g: &mut Graph, lin: &[Member], fused: &str) -> Result<Option<(ValueId, Vec<usize>)>> {
    let mut rows = Vec::new();
    for l in lin {
        let n = g.meta(l.w).shape[0].as_static().expect("static weight");
        let s = values(g, l.own.expect("fp8"))?;
        match s.len() {
            1 => rows.extend(std::iter::repeat_n(s[0], n)),
            len if len == n => rows.extend(s),
            _ => return Ok(None),
        }
    }
    let mut runs: Vec<usize> = Vec::new();
    for (i, v) in rows.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if v.to_bits() == rows[i - 1].to_bits() => *r += 1,
            _ => runs.push(1),
        }
    }
    let name = format!("{fused}.weight_scale");
    let n = rows.len();
    Arc::make_mut(&mut g.weights).add_tensor(&name, autodeploy_core::Tensor::from_f32(vec![n], rows)?);
    Ok(Some((g.add_param(&name, TensorMeta { dtype: DType::F32, shape: static_shape(&[n]) }), runs)))
}

impl Transform for FuseGemms {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut groups_done = 0;
        let mut linears_fused = 0;
        let mut tried: Vec<(ValueId, Kind)> = Vec::new();
        loop {
            // Group linears by their input; pick the first group of two or more not yet tried.
            // Keyed by input and kind: float, FP8, dynamic FP8 and NVFP4 linears each fuse
            // among themselves.
            let mut by_input: BTreeMap<(ValueId, Kind), Vec<usize>> = BTreeMap::new();
            for (i, n) in g.nodes.iter().enumerate() {
                if let Some(kind) = Kind::of(&n.op) {
                    by_input.entry((n.inputs[0], kind)).or_default().push(i);
                }
            }
            let Some((input, group)) = by_input.into_iter().find(|(k, v)| v.len() > 1 && !tried.contains(k)) else {
                break;
            };
            tried.push(input);
            if Self::fuse_group(g, input.1, &group)? {
                groups_done += 1;
                linears_fused += group.len();
            }
        }
        // SwiGLU MLPs: gate and up into one weight.
        let mut mlps = 0;
        while let Some(i) = g.nodes.iter().position(|n| n.op.swiglu_of().is_some_and(|s| !s.fused)) {
            let n = g.nodes[i].clone();
            if param_weight(g, n.inputs[1]).is_none() || param_weight(g, n.inputs[2]).is_none() {
                break;
            }
            let name = format!(
                "fused[{}+{}]",
                param_weight(g, n.inputs[1]).expect("checked"),
                param_weight(g, n.inputs[2]).expect("checked")
            );
            let w = concat_params(g, &[n.inputs[1], n.inputs[2]], &name)?;
            let hint = g.value(n.outputs[0]).name.clone();
            let y = g.insert_node(
                i,
                &hint,
                Op::swiglu(SwiGlu { fused: true, ..n.op.swiglu_of().expect("a swiglu node") }),
                &[n.inputs[0], w, n.inputs[3]],
            )?;
            g.replace_uses(n.outputs[0], y);
            g.dce();
            mlps += 1;
        }
        Ok(format!("fused {linears_fused} linears into {groups_done} GEMMs; fused gate/up of {mlps} swiglu mlps"))
    }
}

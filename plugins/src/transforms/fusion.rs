//! Post-load fusion: linears that read the same input become one GEMM over concatenated
//! weights followed by slices (FP8 linears too, where they share their input scale: the fused
//! weight gets one scale a row); a SwiGLU MLP's gate and up projections become one weight.

use std::collections::BTreeMap;
use std::sync::Arc;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta, ValueId};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::ops::linear::{SwiGlu, LINEAR};
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

/// One linear of a group: input, weight, the FP8 linear's scales (input, unless dynamic;
/// weight), bias, output.
struct Member {
    x: ValueId,
    w: ValueId,
    scales: Option<(Option<ValueId>, ValueId)>,
    bias: Option<ValueId>,
    out: ValueId,
}

impl FuseGemms {
    /// One group of linears sharing an input (all `aten.linear` or all FP8 linears) → one
    /// linear and slices. Returns false if the group does not qualify (weights not params, mixed
    /// bias, mixed dtypes; FP8: different input scales).
    fn fuse_group(g: &mut Graph, nodes: &[usize]) -> Result<bool> {
        let fp8 = g.nodes[nodes[0]].op.fp8_linear_of();
        let lin: Vec<Member> = nodes
            .iter()
            .map(|&i| {
                let n = &g.nodes[i];
                let (scales, bias) = match fp8 {
                    Some(false) => (Some((Some(n.inputs[2]), n.inputs[3])), n.inputs.get(4)),
                    Some(true) => (Some((None, n.inputs[2])), n.inputs.get(3)),
                    None => (None, n.inputs.get(2)),
                };
                Member { x: n.inputs[0], w: n.inputs[1], scales, bias: bias.copied(), out: n.outputs[0] }
            })
            .collect();
        let has_bias = lin[0].bias.is_some();
        let dtype = g.meta(lin[0].w).dtype;
        let ok = lin.iter().all(|l| {
            l.bias.is_some() == has_bias
                && param_weight(g, l.w).is_some()
                && l.bias.is_none_or(|b| param_weight(g, b).is_some())
                && l.scales
                    .is_none_or(|(a, b)| a.is_none_or(|a| param_weight(g, a).is_some()) && param_weight(g, b).is_some())
                && g.meta(l.w).dtype == dtype
        });
        if !ok {
            return Ok(false);
        }
        let names: Vec<String> = lin.iter().map(|l| param_weight(g, l.w).expect("checked")).collect();
        let fused_name = format!("fused[{}]", names.join("+"));
        let scales = match fp8 {
            Some(_) => match fp8_scales(g, &lin, &fused_name)? {
                Some(s) => Some(s),
                None => return Ok(false),
            },
            None => None,
        };
        let w = concat_params(g, &lin.iter().map(|l| l.w).collect::<Vec<_>>(), &fused_name)?;
        let mut ins = vec![lin[0].x, w];
        if let Some((a, b)) = scales {
            ins.extend(a);
            ins.push(b);
        }
        if has_bias {
            let bs: Vec<ValueId> = lin.iter().map(|l| l.bias.expect("checked")).collect();
            ins.push(concat_params(g, &bs, &format!("{fused_name}.bias"))?);
        }
        let pos = *nodes.iter().min().expect("group of two or more");
        let hint = format!("{}.fused", g.value(lin[0].out).name);
        let op = match fp8 {
            Some(false) => Op::fp8_linear(),
            Some(true) => Op::fp8_linear_dynamic(),
            None => Op::linear(),
        };
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

/// An FP8 group's scales: the input scale they share (`None` when their values differ: their
/// inputs would quantize differently; none to share when dynamic) and one weight scale a row of
/// the fused weight, computed here from the parts' scales (one value or one a row each).
#[allow(clippy::type_complexity)]
fn fp8_scales(g: &mut Graph, lin: &[Member], fused: &str) -> Result<Option<(Option<ValueId>, ValueId)>> {
    let value = |g: &Graph, v: ValueId| -> Result<Vec<f32>> {
        let name = param_weight(g, v).expect("checked by the caller");
        Ok(g.weights.load(&name, DType::F32)?.to_f32().into_owned())
    };
    let first_in = lin[0].scales.expect("fp8").0;
    let s_in = first_in.map(|a| value(g, a)).transpose()?;
    let mut rows = Vec::new();
    for l in lin {
        let (a, b) = l.scales.expect("fp8");
        if a.map(|a| value(g, a)).transpose()? != s_in {
            return Ok(None);
        }
        let n = g.meta(l.w).shape[0].as_static().expect("static weight");
        let s = value(g, b)?;
        match s.len() {
            1 => rows.extend(std::iter::repeat_n(s[0], n)),
            len if len == n => rows.extend(s),
            _ => return Ok(None),
        }
    }
    let name = format!("{fused}.weight_scale");
    let n = rows.len();
    Arc::make_mut(&mut g.weights).add_tensor(&name, autodeploy_core::Tensor::from_f32(vec![n], rows)?);
    let s_w = g.add_param(&name, TensorMeta { dtype: DType::F32, shape: static_shape(&[n]) });
    Ok(Some((first_in, s_w)))
}

impl Transform for FuseGemms {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut groups_done = 0;
        let mut linears_fused = 0;
        let mut tried: Vec<(ValueId, u8)> = Vec::new();
        loop {
            // Group linears by their input; pick the first group of two or more not yet tried.
            // Keyed by input and op: float linears, FP8 linears and dynamic FP8 linears each
            // fuse among themselves.
            let mut by_input: BTreeMap<(ValueId, u8), Vec<usize>> = BTreeMap::new();
            for (i, n) in g.nodes.iter().enumerate() {
                let kind = match n.op.fp8_linear_of() {
                    _ if n.op.is(LINEAR) => 0,
                    Some(false) => 1,
                    Some(true) => 2,
                    None => continue,
                };
                by_input.entry((n.inputs[0], kind)).or_default().push(i);
            }
            let Some((input, group)) = by_input.into_iter().find(|(k, v)| v.len() > 1 && !tried.contains(k)) else {
                break;
            };
            tried.push(input);
            if Self::fuse_group(g, &group)? {
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

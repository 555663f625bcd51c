//! Post-load fusion: linears that read the same input become one GEMM over concatenated
//! weights followed by slices; a SwiGLU MLP's gate and up projections become one weight.

use std::collections::BTreeMap;
use std::sync::Arc;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta, ValueId};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::ops::linear::{SwiGlu, LINEAR};
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::shape::static_shape;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::Op;
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

impl FuseGemms {
    /// One group of linears sharing an input → one linear and slices. Returns false if the group
    /// does not qualify (weights not params, mixed bias, mixed dtypes).
    fn fuse_group(g: &mut Graph, nodes: &[usize]) -> Result<bool> {
        let lin: Vec<(ValueId, ValueId, Option<ValueId>, ValueId)> = nodes
            .iter()
            .map(|&i| {
                let n = &g.nodes[i];
                (n.inputs[0], n.inputs[1], n.inputs.get(2).copied(), n.outputs[0])
            })
            .collect();
        let has_bias = lin[0].2.is_some();
        let dtype = g.meta(lin[0].1).dtype;
        let ok = lin.iter().all(|l| {
            l.2.is_some() == has_bias
                && param_weight(g, l.1).is_some()
                && l.2.is_none_or(|b| param_weight(g, b).is_some())
                && g.meta(l.1).dtype == dtype
        });
        if !ok {
            return Ok(false);
        }
        let names: Vec<String> = lin.iter().map(|l| param_weight(g, l.1).expect("checked")).collect();
        let fused_name = format!("fused[{}]", names.join("+"));
        let w = concat_params(g, &lin.iter().map(|l| l.1).collect::<Vec<_>>(), &fused_name)?;
        let mut ins = vec![lin[0].0, w];
        if has_bias {
            let bs: Vec<ValueId> = lin.iter().map(|l| l.2.expect("checked")).collect();
            ins.push(concat_params(g, &bs, &format!("{fused_name}.bias"))?);
        }
        let pos = *nodes.iter().min().expect("group of two or more");
        let hint = format!("{}.fused", g.value(lin[0].3).name);
        let y = g.insert_node(pos, &hint, Op::linear(), &ins)?;
        let mut start = 0i64;
        for (k, l) in lin.iter().enumerate() {
            let width = g.meta(l.1).shape[0].as_static().expect("static weight") as i64;
            let name = g.value(l.3).name.clone();
            let s = g.insert_node(pos + 1 + k, &name, Op::slice(Slice::new(-1, start, start + width)), &[y])?;
            g.replace_uses(l.3, s);
            start += width;
        }
        g.dce();
        Ok(true)
    }
}

impl Transform for FuseGemms {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut groups_done = 0;
        let mut linears_fused = 0;
        let mut tried: Vec<ValueId> = Vec::new();
        loop {
            // Group linears by their input; pick the first group of two or more not yet tried.
            let mut by_input: BTreeMap<ValueId, Vec<usize>> = BTreeMap::new();
            for (i, n) in g.nodes.iter().enumerate() {
                if n.op.is(LINEAR) {
                    by_input.entry(n.inputs[0]).or_default().push(i);
                }
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

//! Ops that leave their input as it is: multiplying by 1.0, converting to the dtype a
//! tensor already has, concatenating a tensor with empty ones (HF's RoPE scales its cos/sin tables by `attention_scaling`, 1.0 for the
//! usual RoPE types; a model's `.to(float32)` on an f32 tensor). Each would be a kernel launch
//! a step; their readers read the input instead.
//!
//! Runs after the pattern matchers (their patterns may include such an op) and for every
//! importer alike, so different exports of one model still reach the same graph.
//!
//! After the weights are known (`post_load_fusion`), small ops over weights alone are folded
//! into weights computed at load (`fold_weight_ops`).

use std::sync::Arc;

use autodeploy_core::error::Result;
use autodeploy_core::ir::Graph;
use autodeploy_core::ops::binary::{MUL, MUL_SCALAR};
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::DType;
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "drop_identity_ops",
        stage: Stage::PatternMatcher,
        order: 100,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(DropIdentityOps),
    }
}

pub struct DropIdentityOps;

impl Transform for DropIdentityOps {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut dropped = 0;
        // In order, so a chain of them collapses onto its first input.
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            let (mut x, y) = (n.inputs[0], n.outputs[0]);
            // A concatenation of one tensor with empty ones is that tensor (Phi-3's RoPE
            // concatenates the rotated part with a zero-width rest when it rotates all of a head).
            if let Some(d) = n.op.cat_dim() {
                let rank = g.meta(y).shape.len();
                let Ok(d) = autodeploy_core::ops::layout::dim_index(d, rank) else { continue };
                let full: Vec<_> = n
                    .inputs
                    .iter()
                    .copied()
                    .filter(|&v| g.meta(v).shape.get(d).and_then(|s| s.as_static()) != Some(0))
                    .collect();
                if full.len() != 1 {
                    continue;
                }
                x = full[0];
            }
            let identity = match &n.op {
                op if op.cat_dim().is_some() => true,
                // x · 1.0 is x exactly (NaN and the sign of zero included).
                op if op.is(MUL_SCALAR) => op.scalar_of(MUL_SCALAR) == Some(1.0),
                op if op.to_dtype_of().is_some() => op.to_dtype_of() == Some(g.meta(x).dtype),
                _ => false,
            };
            // A graph output keeps its node (and its name).
            if identity && g.meta(x) == g.meta(y) && !g.outputs.contains(&y) {
                g.replace_uses(y, x);
                dropped += 1;
            }
        }
        let removed = g.dce();
        Ok(format!("dropped {dropped} identity ops ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "merge_duplicate_ops",
        stage: Stage::PatternMatcher,
        order: 101,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(MergeDuplicateOps),
    }
}

/// Nodes that compute the same op on the same inputs are computed once (an export that builds
/// its position tables twice, once per RoPE base; the per-layer unsqueeze of the same cos/sin):
/// every op before `cache_init` is a pure function of its inputs.
pub struct MergeDuplicateOps;

impl Transform for MergeDuplicateOps {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let mut seen: std::collections::HashMap<(&'static str, String, Vec<autodeploy_core::ValueId>), Vec<_>> =
            std::collections::HashMap::new();
        let mut merged = 0;
        // In order, so the uses a merge rewrites let later duplicates match too.
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            let key = (n.op.name, n.op.attrs.clone(), n.inputs.clone());
            let outs = n.outputs.clone();
            match seen.get(&key) {
                Some(first) if first.len() == outs.len() && !outs.iter().any(|o| g.outputs.contains(o)) => {
                    for (&o, &f) in outs.iter().zip(first.clone().iter()) {
                        g.replace_uses(o, f);
                    }
                    merged += 1;
                }
                Some(_) => {}
                None => {
                    seen.insert(key, outs);
                }
            }
        }
        let removed = g.dce();
        Ok(format!("merged {merged} duplicate ops ({removed} nodes removed)"))
    }
}

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "fold_weight_ops",
        stage: Stage::PostLoadFusion,
        order: 5,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(FoldWeightOps),
    }
}

/// Folding stops at this many elements a result: small per-channel vectors (norm weights,
/// biases) fold; a whole matrix stays an op rather than a second copy of the weight.
const FOLD_MAX_ELEMENTS: usize = 1 << 20;

/// Small computations on weights alone (Gemma's RMSNorm weight `1 + w`, a cast of a norm
/// weight to f32) become weights computed once at load (`WeightStore::add_computed`), instead
/// of ops every step; the fusions after it then see plain weights.
pub struct FoldWeightOps;

impl Transform for FoldWeightOps {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let (mut folded, mut scalars) = (0, 0);
        // In order, so a chain of them folds onto its first weight.
        for i in 0..g.nodes.len() {
            let n = &g.nodes[i];
            if n.outputs.len() != 1 || n.inputs.is_empty() || g.outputs.contains(&n.outputs[0]) {
                continue;
            }
            // x times a one-element weight (Gemma's embedding normaliser, an exported tensor
            // constant): the scalar op with its value, as the HF import builds it.
            if let Some((op, x)) = scalar_operand(g, i)? {
                // The same output value, now computed from x alone.
                g.nodes[i].op = op;
                g.nodes[i].inputs = vec![x];
                scalars += 1;
                continue;
            }
            let weights: Option<Vec<(String, DType)>> = n
                .inputs
                .iter()
                .map(|&v| g.params.iter().find(|p| p.value == v).map(|p| (p.weight.clone(), g.meta(v).dtype)))
                .collect();
            let out = g.meta(n.outputs[0]).clone();
            let shape: Option<Vec<usize>> = out.shape.iter().map(|d| d.as_static()).collect();
            let (Some(weights), Some(shape)) = (weights, shape) else { continue };
            // A stack of matrices with its last two dims swapped, read by this op alone (the
            // experts' weights an export hands `torch_moe` transposed, Llama 4's): the weight
            // read transposed at load, whatever its size; the original is then unused.
            let sole = |v: &autodeploy_core::ValueId| g.nodes.iter().filter(|m| m.inputs.contains(v)).count() == 1;
            if matches!(n.op.transpose_dims(), Some((1, 2) | (2, 1) | (-1, -2) | (-2, -1)))
                && shape.len() == 3
                && n.inputs.len() == 1
                && sole(&n.inputs[0])
            {
                let name = format!("transposed[{}]", weights[0].0);
                let y = n.outputs[0];
                Arc::make_mut(&mut g.weights).add_transposed(&name, &weights[0].0)?;
                let p = g.add_param(&name, out);
                g.replace_uses(y, p);
                folded += 1;
                continue;
            }
            if shape.iter().product::<usize>() > FOLD_MAX_ELEMENTS {
                continue;
            }
            let name = format!("folded[{}]", g.value(n.outputs[0]).name);
            let (op, y) = (n.op.clone(), n.outputs[0]);
            Arc::make_mut(&mut g.weights).add_computed(&name, op, weights, shape, out.dtype)?;
            let p = g.add_param(&name, out);
            g.replace_uses(y, p);
            folded += 1;
        }
        let removed = g.dce();
        Ok(format!(
            "folded {folded} weight-only ops into weights computed at load, {scalars} one-element weights into scalar ops ({removed} nodes removed)"
        ))
    }
}

/// Node `i` as `aten.mul.Scalar` of its tensor operand when it multiplies a tensor by a
/// one-element weight of the same dtype (the value read from the store).
fn scalar_operand(g: &Graph, i: usize) -> Result<Option<(autodeploy_core::Op, autodeploy_core::ValueId)>> {
    let n = &g.nodes[i];
    if !n.op.is(MUL) || n.inputs.len() != 2 {
        return Ok(None);
    }
    let param = |v| g.params.iter().find(|p| p.value == v);
    let one = |v| g.meta(v).shape.iter().all(|d| d.as_static() == Some(1));
    let (w, x) = match (n.inputs[0], n.inputs[1]) {
        (a, b) if one(b) && param(b).is_some() && !one(a) => (b, a),
        (a, b) if one(a) && param(a).is_some() && !one(b) => (a, b),
        _ => return Ok(None),
    };
    if g.meta(x) != g.meta(n.outputs[0]) || g.meta(w).dtype != g.meta(x).dtype {
        return Ok(None);
    }
    let name = &param(w).expect("checked").weight;
    let value = g.weights.load(name, DType::F32)?.to_f32()[0];
    Ok(Some((autodeploy_core::Op::scalar(MUL_SCALAR, value as f64), x)))
}

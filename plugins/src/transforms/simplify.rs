//! Ops that leave their input as it is: multiplying by 1.0 and converting to the dtype a
//! tensor already has (HF's RoPE scales its cos/sin tables by `attention_scaling`, 1.0 for the
//! usual RoPE types; a model's `.to(float32)` on an f32 tensor). Each would be a kernel launch
//! a step; their readers read the input instead.
//!
//! Runs after the pattern matchers (their patterns may include such an op) and for every
//! importer alike, so different exports of one model still reach the same graph.

use autodeploy_core::error::Result;
use autodeploy_core::ir::Graph;
use autodeploy_core::ops::binary::MUL_SCALAR;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "drop_identity_ops",
        stage: Stage::PatternMatcher,
        order: 100,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
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
            let (x, y) = (n.inputs[0], n.outputs[0]);
            let identity = match &n.op {
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

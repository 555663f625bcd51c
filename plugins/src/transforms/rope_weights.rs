//! RoPE over interleaved channel pairs (`rope(interleaved=true)`: Meta's layout, which Llama 4's
//! export and DeepSeek-style checkpoints carry) on a q or k that comes straight from a linear:
//! that linear's rows are permuted at load, per head, into the rotate-half order, and the RoPE
//! becomes the plain one. The values do not change (the interleaved RoPE is defined as the plain
//! one of the de-interleaved input, and the permuted linear computes that input), but the plain
//! RoPE has a kernel on every backend and can fuse into the attention after it. The same
//! permutation the HF importer applies to such checkpoints' q/k weights, and llama.cpp's GGUF
//! files undo (`importers::gguf::unpermute_rows`).

use std::sync::Arc;

use autodeploy_core::error::Result;
use autodeploy_core::ir::{Graph, ValueId};
use autodeploy_core::ops::linear::LINEAR;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::{DType, Op, Tensor};
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "deinterleave_rope",
        stage: Stage::PostLoadFusion,
        order: 6,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(DeinterleaveRope),
    }
}

pub struct DeinterleaveRope;

/// The chain `transpose(1, 2)(view [.., heads, d](linear(h, w[, b])))` under a RoPE's input
/// `x`, each value read only by the next: (linear node, head dim).
fn projection(g: &Graph, producers: &[Option<usize>], uses: &[usize], x: ValueId) -> Option<(usize, usize)> {
    let only = |v: ValueId| uses[v.0 as usize] == 1 && !g.outputs.contains(&v);
    let t = producers[x.0 as usize].filter(|_| only(x))?;
    if !matches!(g.nodes[t].op.transpose_dims(), Some((1, 2) | (2, 1))) {
        return None;
    }
    let v_out = g.nodes[t].inputs[0];
    let v = producers[v_out.0 as usize].filter(|_| only(v_out))?;
    g.nodes[v].op.view_sizes()?;
    let l_out = g.nodes[v].inputs[0];
    let l = producers[l_out.0 as usize].filter(|_| only(l_out))?;
    if !g.nodes[l].op.is(LINEAR) {
        return None;
    }
    // [b, s, heads, d] from [b, s, heads · d]: the view splits only the last dim into heads.
    let (vs, ls) = (&g.meta(v_out).shape, &g.meta(l_out).shape);
    let d = vs.last()?.as_static()?;
    let width = ls.last()?.as_static()?;
    let heads = vs.get(vs.len().checked_sub(2)?)?.as_static()?;
    (vs.len() == 4 && ls.len() == 3 && vs[..2] == ls[..2] && d % 2 == 0 && heads * d == width).then_some((l, d))
}

impl Transform for DeinterleaveRope {
    fn apply(&self, g: &mut Graph, _: &TransformContext) -> Result<String> {
        let (producers, uses) = (g.producers(), g.use_counts());
        let todo: Vec<(usize, usize, usize)> = (0..g.nodes.len())
            .filter(|&i| g.nodes[i].op.rope_interleaved() == Some(true))
            .filter_map(|i| projection(g, &producers, &uses, g.nodes[i].inputs[0]).map(|(l, d)| (i, l, d)))
            .collect();
        let mut permuted = 0;
        for &(rope, lin, d) in &todo {
            // The weight and the bias (each a weight of the store, else the RoPE stays).
            let params: Vec<Option<String>> = g.nodes[lin].inputs[1..]
                .iter()
                .map(|&v| g.params.iter().find(|p| p.value == v).map(|p| p.weight.clone()))
                .collect();
            if params.iter().any(Option::is_none) {
                continue;
            }
            for (k, name) in params.into_iter().flatten().enumerate() {
                let meta = g.meta(g.nodes[lin].inputs[k + 1]).clone();
                let store = Arc::make_mut(&mut g.weights);
                let (_, shape) = store.stored_meta(&name)?;
                let rows = shape[0];
                let cols = shape.iter().skip(1).product::<usize>();
                let new = format!("deinterleaved[{name}]");
                // Generated (dummy) values have no order to restore.
                if store.synthetic_parts(&name).is_some() {
                    store.add_alias(&new, &name)?;
                } else {
                    let (src, n, s) = (store.clone(), name.clone(), shape.clone());
                    let load = Arc::new(move || {
                        let t = src.load(&n, DType::F32)?;
                        let v = crate::importers::gguf::unpermute_rows(&t.to_f32(), rows / d, rows, cols);
                        Tensor::from_f32(s.clone(), v)
                    });
                    let origin = format!("{} (rows from interleaved to rotate-half RoPE order)", store.location(&name));
                    store.add_lazy(&new, shape, origin, load);
                }
                let p = g.add_param(&new, meta);
                g.nodes[lin].inputs[k + 1] = p;
            }
            g.nodes[rope].op = Op::rope(false);
            permuted += 1;
        }
        let removed = g.dce();
        Ok(format!(
            "made {permuted} interleaved RoPE plain, their q/k projections' rows permuted at load ({removed} nodes removed)"
        ))
    }
}

//! The `quantize` stage: the built-in `fp8` and `nvfp4` plugins' transforms, named as
//! AutoDeploy names them. Each takes the `aten.linear`s whose weight the checkpoint stored
//! quantized (the importer marked it, `WeightStore::mark_scaled`, from the checkpoint's
//! `hf_quant_config.json`) and makes them the quantized linear op of their format, the weight
//! read as stored and its scales added as graph values (params of the checkpoint's tensors).
//! They know weights and their storage, not models.

use autodeploy_core::config::Quantize;
use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta};
use autodeploy_core::ops::linear::LINEAR;
use autodeploy_core::quant::QuantAlgo;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::shape::Dim;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::Op;
use autodeploy_sdk::Stage;

macro_rules! register {
    ($name:literal, $order:expr, $algo:expr, $origin:literal) => {
        autodeploy_core::inventory::submit! {
            TransformPlugin {
                name: $name,
                stage: Stage::Quantize,
                order: $order,
                enabled_by_default: true,
                options: &[],
                version: env!("CARGO_PKG_VERSION"),
                origin: $origin,
                make: || Box::new(QuantizeFromConfig($algo)),
            }
        }
    };
}

register!("quantize_fp8_linear_from_config", 10, QuantAlgo::Fp8, "built-in (fp8 plugin)");
register!("quantize_nvfp4_linear_from_config", 20, QuantAlgo::Nvfp4, "built-in (nvfp4 plugin)");

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "quantize_fp8_kv_cache",
        stage: Stage::Quantize,
        order: 30,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in (fp8 plugin)",
        make: || Box::new(QuantizeKvCache),
    }
}

/// The FP8 KV cache (`kv_cache_dtype`): each attention's K and V read through E4M3 at its
/// layer's `(k_scale, v_scale)` (`Scoring::kv_fp8`, which both attention paths apply). The
/// scales are the checkpoint's `<k_proj>.k_scale` and `<v_proj>.v_scale` beside the linears
/// that make the attention's k and v (found by walking back from its inputs), 1.0 where it has
/// none.
pub struct QuantizeKvCache;

impl Transform for QuantizeKvCache {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        use autodeploy_core::config::KvCacheDtype;
        let declared = g.weights.quantization().and_then(|q| q.kv_cache.map(|kv| (kv, q.file.clone())));
        let source = match (cx.config.kv_cache_dtype, &declared) {
            (KvCacheDtype::Model, _) | (KvCacheDtype::Auto, None) => {
                return Ok("skipped: the KV cache keeps the model's dtype".into())
            }
            (KvCacheDtype::Auto, Some((kv, file))) if *kv != QuantAlgo::Fp8 => {
                return Err(Error::Msg(format!(
                    "{}: a {} KV cache is not supported (FP8 is)",
                    file.display(),
                    kv.name()
                )))
            }
            (KvCacheDtype::Auto, Some((_, file))) => format!("{}'s kv_cache_quant_algo", file.display()),
            (KvCacheDtype::Fp8, _) => "kv_cache_dtype = \"fp8\"".to_string(),
        };
        if cx.config.resolved_device() != autodeploy_core::config::Device::Cpu
            && cx.config.kv_cache_dtype == KvCacheDtype::Auto
        {
            // A checkpoint's own FP8 KV cache is an option, not a requirement: on a device the
            // cache keeps the model's dtype unless `kv_cache_dtype = "fp8"` asks for it (the
            // CUDA FP8 cache kernels are new; they become the default for such checkpoints once
            // measured against the CPU and for speed on a GPU).
            tracing::warn!(
                "{source} declares an FP8 KV cache; on {} the KV cache keeps the model's dtype unless kv_cache_dtype = \"fp8\"",
                cx.config.device
            );
            return Ok(format!(
                "skipped: {source} declares an FP8 KV cache (on {}: kv_cache_dtype = \"fp8\" to use it)",
                cx.config.device
            ));
        }
        let (mut n, mut from_checkpoint) = (0, 0);
        for i in 0..g.nodes.len() {
            let Some(mut attrs) = g.nodes[i].op.attention_attrs() else { continue };
            let mut scale = |input: usize, name: &str| -> Result<f64> {
                let Some(module) = producing_linear(g, g.nodes[i].inputs[input]) else { return Ok(1.0) };
                let key = format!("{module}.{name}");
                if !g.weights.contains(&key) {
                    return Ok(1.0);
                }
                let t = g.weights.load(&key, autodeploy_core::DType::F32)?;
                let v = t.to_f32();
                match v[..] {
                    [s] if s > 0.0 && s.is_finite() => {
                        from_checkpoint += 1;
                        Ok(s as f64)
                    }
                    _ => Err(Error::Msg(format!(
                        "{}: `{key}` must be one positive number, found {:?}",
                        g.weights.location(&key),
                        &v[..v.len().min(4)]
                    ))),
                }
            };
            let (ks, vs) = (scale(1, "k_scale")?, scale(2, "v_scale")?);
            attrs.scoring.kv_fp8 = Some((ks, vs));
            g.nodes[i].op = Op::attention(attrs);
            n += 1;
        }
        Ok(format!("{n} attentions read K and V through FP8 (from {source}; {from_checkpoint} of {} scales the checkpoint's, the rest 1.0)", 2 * n))
    }
}

/// The module (`model.layers.3.self_attn.k_proj`) of the linear whose output reaches `v`
/// through one-input ops (views, transposes, RoPE, norms: each node's first input), if any.
fn producing_linear(g: &Graph, mut v: autodeploy_core::ValueId) -> Option<String> {
    for _ in 0..16 {
        let node = &g.nodes[g.producer(v)?];
        if node.op.is(LINEAR)
            || node.op.fp8_linear_of().is_some()
            || node.op.is(autodeploy_core::ops::quant_linear::NVFP4_LINEAR)
        {
            let w = *node.inputs.get(1)?;
            let name = g.params.iter().find(|p| p.value == w)?.weight.clone();
            return name.strip_suffix(".weight").map(str::to_string);
        }
        v = *node.inputs.first()?;
    }
    None
}

/// Makes the linears over a checkpoint's `algo`-quantized weights that format's quantized
/// linear.
pub struct QuantizeFromConfig(pub QuantAlgo);

impl Transform for QuantizeFromConfig {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let algo = self.0;
        if let (Some(q), Quantize::Fp8) = (g.weights.quantization(), cx.config.quantize) {
            return Err(Error::Msg(format!(
                "quantize = \"fp8\" asks to quantize a float checkpoint, but this one is already a {}; \
                 remove `quantize` from the config",
                q.describe()
            )));
        }
        match g.weights.quantization() {
            Some(q) if q.algo == algo => {}
            Some(q) => return Ok(format!("skipped: a {} checkpoint", q.algo.name())),
            None if algo == QuantAlgo::Fp8 && cx.config.quantize == Quantize::Fp8 => {
                let n = quantize_in_place(g)?;
                return Ok(format!(
                    "{n} linears to FP8 at load (quantize = \"fp8\": E4M3 weights with one scale a row, activations per token)"
                ));
            }
            None => return Ok("skipped: the checkpoint is not quantized".into()),
        }
        let mut n = 0;
        for i in 0..g.nodes.len() {
            let node = &g.nodes[i];
            if !node.op.is(LINEAR) {
                continue;
            }
            let w = node.inputs[1];
            let Some(name) = g.params.iter().find(|p| p.value == w).map(|p| p.weight.clone()) else { continue };
            if !g.weights.is_scaled(&name) {
                continue;
            }
            let module = name.strip_suffix(".weight").ok_or_else(|| {
                Error::Msg(format!("{}: quantized weight `{name}` is not a `<module>.weight`", algo.transform()))
            })?;
            let readers = g.nodes.iter().filter(|n| n.inputs.contains(&w)).count();
            if readers != 1 {
                return Err(Error::Msg(format!(
                    "{}: quantized weight `{name}` is read by {readers} nodes; only a linear may read it",
                    algo.transform()
                )));
            }
            let (stored, _) = g.weights.stored_meta(&name)?;
            let scales: &[&str] = match algo {
                QuantAlgo::Fp8 => &["input_scale", "weight_scale"],
                QuantAlgo::Nvfp4 => &["weight_scale", "weight_scale_2"],
            };
            let mut ins = vec![node.inputs[0], w];
            for s in scales {
                let scale = format!("{module}.{s}");
                let (dt, shape) = g.weights.stored_meta(&scale)?;
                ins.push(
                    g.add_param(&scale, TensorMeta { dtype: dt, shape: shape.into_iter().map(Dim::new).collect() }),
                );
            }
            let node = &g.nodes[i];
            ins.extend(node.inputs.get(2).copied());
            let (before, out) = (g.meta(node.outputs[0]).clone(), node.outputs[0]);
            g.values[w.0 as usize].meta.dtype = stored;
            let op = match algo {
                QuantAlgo::Fp8 => Op::fp8_linear(),
                QuantAlgo::Nvfp4 => Op::nvfp4_linear(),
            };
            let metas: Vec<TensorMeta> = ins.iter().map(|&v| g.meta(v).clone()).collect();
            let after = autodeploy_core::ops::infer(&op, &metas).map_err(|e| e.at_node(&g.value(out).name))?;
            if after.first() != Some(&before) {
                return Err(Error::Msg(format!(
                    "{}: `{name}`'s linear would change its output {before}",
                    algo.transform()
                )));
            }
            g.nodes[i].op = op;
            g.nodes[i].inputs = ins;
            n += 1;
        }
        Ok(format!("{n} linears over {} weights", algo.name()))
    }
}

/// `quantize = "fp8"` on a float checkpoint: every linear over a 2-D weight that only it reads,
/// except the one whose output is a graph output (the LM head), becomes a dynamic FP8 linear
/// over a weight quantized at load: each row's scale max |w_row| / 448, its codes w / scale
/// rounded to E4M3 (computed when a backend loads the weight; nothing is read here).
fn quantize_in_place(g: &mut Graph) -> Result<usize> {
    use autodeploy_core::ops::quant_linear::dynamic_scale;
    use autodeploy_core::{DType, Tensor};
    let src = g.weights.clone();
    let mut n = 0;
    for i in 0..g.nodes.len() {
        let node = &g.nodes[i];
        if !node.op.is(LINEAR) || g.outputs.contains(&node.outputs[0]) {
            continue;
        }
        let w = node.inputs[1];
        let Some(name) = g.params.iter().find(|p| p.value == w).map(|p| p.weight.clone()) else { continue };
        let meta = g.meta(w).clone();
        let shape: Option<Vec<usize>> = meta.shape.iter().map(Dim::as_static).collect();
        let Some(shape) = shape.filter(|s| s.len() == 2) else { continue };
        if g.nodes.iter().filter(|n| n.inputs.contains(&w)).count() != 1 {
            continue;
        }
        if !meta.dtype.is_float() {
            return Err(Error::Msg(format!(
                "quantize = \"fp8\": weight `{name}` is {} as the graph holds it, not a float: set dtype = \
                 \"bfloat16\" (or \"float32\") so it is dequantized at load, then quantized to FP8",
                meta.dtype
            )));
        }
        let (rows, k) = (shape[0], shape[1]);
        let origin = format!("`{name}` quantized to FP8 at load (quantize = \"fp8\")");
        let (codes_name, scale_name) = (format!("{name}.fp8"), format!("{name}.fp8_scale"));
        let (s1, n1, sh) = (src.clone(), name.clone(), shape.clone());
        let codes = std::sync::Arc::new(move || {
            use rayon::prelude::*;
            let wv = s1.load(&n1, DType::F32)?.to_f32().into_owned();
            let mut out = vec![0u8; wv.len()];
            out.par_chunks_mut(k.max(1)).zip(wv.par_chunks(k.max(1))).for_each(|(o, row)| {
                let s = dynamic_scale(row);
                o.iter_mut().zip(row).for_each(|(c, v)| *c = autodeploy_kernels::quant::lowbit::f32_to_e4m3(v / s));
            });
            Tensor::from_low_bit(DType::F8E4M3, sh.clone(), out)
        });
        let (s2, n2) = (src.clone(), name.clone());
        let scales = std::sync::Arc::new(move || {
            use rayon::prelude::*;
            let wv = s2.load(&n2, DType::F32)?.to_f32().into_owned();
            Tensor::from_f32(vec![rows], wv.par_chunks(k.max(1)).map(dynamic_scale).collect())
        });
        let store = std::sync::Arc::make_mut(&mut g.weights);
        store.add_lazy_typed(&codes_name, shape.clone(), DType::F8E4M3, origin.clone(), codes);
        store.add_lazy_typed(&scale_name, vec![rows], DType::F32, origin, scales);
        let wq = g.add_param(&codes_name, TensorMeta { dtype: DType::F8E4M3, shape: meta.shape.clone() });
        let sw = g.add_param(&scale_name, TensorMeta { dtype: DType::F32, shape: vec![Dim::new(rows)] });
        let node = &g.nodes[i];
        let mut ins = vec![node.inputs[0], wq, sw];
        ins.extend(node.inputs.get(2).copied());
        let (before, out) = (g.meta(node.outputs[0]).clone(), node.outputs[0]);
        let op = Op::fp8_linear_dynamic();
        let metas: Vec<TensorMeta> = ins.iter().map(|&v| g.meta(v).clone()).collect();
        let after = autodeploy_core::ops::infer(&op, &metas).map_err(|e| e.at_node(&g.value(out).name))?;
        if after.first() != Some(&before) {
            return Err(Error::Msg(format!("quantize = \"fp8\": `{name}`'s linear would change its output {before}")));
        }
        g.nodes[i].op = op;
        g.nodes[i].inputs = ins;
        n += 1;
    }
    g.dce();
    Ok(n)
}

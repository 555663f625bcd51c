//! Layer shapes beyond one uniform block, from a Hugging Face `config.json` (read by hf.rs):
//! OpenELM's per-layer lists, DeciLM's `block_configs`, and mixture-of-experts MLPs. Every size
//! is bounded before anything is listed or allocated from it.

use autodeploy_core::error::Result;
use serde_json::Value;

use super::decoder::{LayerShape, MoeConfig};
use super::families::{self, Layers, SparseLayers};
use super::hf_keys::Keys;

/// The widest MLP a layer may have (as `intermediate_size`'s limit).
pub(super) const MAX_MLP_WIDTH: usize = 1 << 20;

/// What stands for heterogeneous layers in the model-wide fields (summaries, the widest
/// buffers): the widest layer's query heads (at least 1), the first attention's KV heads, and the
/// widest MLP; each layer's own stay in `blocks.layers`. Both importers use it.
pub(super) fn widest(v: &[LayerShape]) -> (usize, Option<usize>, usize) {
    (
        v.iter().map(|s| s.heads).max().unwrap_or(0).max(1),
        v.iter().find_map(|s| s.kv_heads),
        v.iter().filter_map(|s| s.mlp).max().unwrap_or(0),
    )
}

/// OpenELM's per-layer lists (`Layers::Lists`): query heads, KV heads (dividing them), and MLP
/// widths from multipliers of the hidden size as its `make_divisible` rounds them (to the
/// nearest multiple of the divisor, at least one, and up once more if that lost over 10%).
pub(super) fn parse_layer_lists(k: &Keys, layers: Layers, num_layers: usize, hidden: usize) -> Result<Vec<LayerShape>> {
    let Layers::Lists { heads, kv_heads, ffn_multipliers, ffn_divisor } = layers else {
        return Ok(Vec::new());
    };
    let list = |key: &str| -> Result<Vec<f64>> {
        let v = k.present(key).ok_or_else(|| k.err(key, "missing"))?;
        let xs = match v {
            Value::Number(n) => n.as_f64().map(|x| vec![x; num_layers]),
            Value::Array(a) => a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>(),
            _ => None,
        }
        .filter(|xs| xs.iter().all(|x| *x > 0.0 && *x <= 4096.0))
        .ok_or_else(|| k.err(key, format!("expected a list of positive numbers, found {v}")))?;
        if xs.len() != num_layers {
            return Err(k.err(key, format!("{} entries for {num_layers} layers", xs.len())));
        }
        Ok(xs)
    };
    let count = |key: &str, x: f64| -> Result<usize> {
        if x.fract() != 0.0 {
            return Err(k.err(key, format!("{x} is not a whole number of heads")));
        }
        Ok(x as usize)
    };
    let (q, kv, mult) = (list(heads)?, list(kv_heads)?, list(ffn_multipliers)?);
    let divisor = k.size(ffn_divisor, 1 << 16)?;
    let mut out = Vec::with_capacity(num_layers);
    for l in 0..num_layers {
        let (h, g) = (count(heads, q[l])?, count(kv_heads, kv[l])?);
        if h % g != 0 {
            return Err(k.err(kv_heads, format!("layer {l}: {g} KV heads do not divide {h} query heads")));
        }
        let v = mult[l] * hidden as f64;
        let mut width = ((v + divisor as f64 / 2.0) as usize / divisor * divisor).max(divisor);
        if (width as f64) < 0.9 * v {
            width += divisor;
        }
        if width > MAX_MLP_WIDTH {
            return Err(
                k.err(ffn_multipliers, format!("layer {l}: an MLP of width {width}, past the limit {MAX_MLP_WIDTH}"))
            );
        }
        out.push(LayerShape { heads: h, kv_heads: Some(g), mlp: Some(width) });
    }
    Ok(out)
}

/// DeciLM's `block_configs`: one entry per layer, each with an `attention` (KV heads as
/// `num_attention_heads / n_heads_in_group`, or `no_op`) and an `ffn` (SwiGLU of width
/// int(2·ffn_mult·hidden/3) rounded up to a multiple of 256, or `no_op`). Linear replacements,
/// sparsified blocks, attention windows and sink tokens are refused naming the key.
pub(super) fn parse_block_configs(
    k: &Keys,
    num_layers: usize,
    num_heads: usize,
    hidden: usize,
) -> Result<Vec<LayerShape>> {
    let list = match k.present("block_configs") {
        Some(Value::Array(a)) => a,
        Some(v) => return Err(k.err("block_configs", format!("expected a list of blocks, found {v}"))),
        None => return Err(k.err("block_configs", "missing")),
    };
    if list.len() != num_layers {
        return Err(k.err("block_configs", format!("{} blocks for num_hidden_layers = {num_layers}", list.len())));
    }
    let mut out = Vec::with_capacity(num_layers);
    for (i, b) in list.iter().enumerate() {
        let key = |part: &str, name: &str| format!("block_configs[{i}].{part}.{name}");
        let part = |name: &str| {
            b.get(name)
                .and_then(Value::as_object)
                .ok_or_else(|| k.err(&format!("block_configs[{i}].{name}"), "expected an object"))
        };
        let (attn, ffn) = (part("attention")?, part("ffn")?);
        let set = |o: &serde_json::Map<String, Value>, p: &str, name: &str| -> Result<bool> {
            match o.get(name) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(v) => Err(k.err(&key(p, name), format!("expected true or false, found {v}"))),
            }
        };
        for (o, p) in [(attn, "attention"), (ffn, "ffn")] {
            if set(o, p, "replace_with_linear")? {
                return Err(k.err(&key(p, "replace_with_linear"), "linear replacement blocks are not supported yet"));
            }
            if o.get("sparsify").is_some_and(|v| !v.is_null()) {
                return Err(k.err(&key(p, "sparsify"), "sparsified blocks are not supported"));
            }
        }
        for name in ["window_length", "num_sink_tokens"] {
            if attn.get(name).is_some_and(|v| !v.is_null()) {
                return Err(k.err(&key("attention", name), "windowed and sink-token attention are not supported yet"));
            }
        }
        if set(attn, "attention", "unshifted_sink")? {
            return Err(k.err(&key("attention", "unshifted_sink"), "sink-token attention is not supported yet"));
        }
        let kv_heads = match set(attn, "attention", "no_op")? {
            true => None,
            false => {
                let v = attn.get("n_heads_in_group").unwrap_or(&Value::Null);
                let g = v.as_u64().filter(|&g| g > 0 && (num_heads as u64).is_multiple_of(g)).ok_or_else(|| {
                    k.err(
                        &key("attention", "n_heads_in_group"),
                        format!("expected a divisor of num_attention_heads = {num_heads}, found {v}"),
                    )
                })?;
                Some(num_heads / g as usize)
            }
        };
        let heads = num_heads;
        let mlp = match set(ffn, "ffn", "no_op")? {
            true => None,
            false => {
                let v = ffn.get("ffn_mult").unwrap_or(&Value::Null);
                let m = v.as_f64().filter(|m| *m > 0.0 && *m <= 1024.0).ok_or_else(|| {
                    k.err(&key("ffn", "ffn_mult"), format!("expected a positive multiplier, found {v}"))
                })?;
                // As DeciLM: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256.
                let n = (2.0 * m * hidden as f64 / 3.0) as usize;
                let width = n.div_ceil(256) * 256;
                if n == 0 || width > MAX_MLP_WIDTH {
                    return Err(k.err(
                        &key("ffn", "ffn_mult"),
                        format!("{m} gives an MLP of width {width} (1 to {MAX_MLP_WIDTH})"),
                    ));
                }
                Some(width)
            }
        };
        out.push(LayerShape { heads, kv_heads, mlp });
    }
    Ok(out)
}

/// A mixture-of-experts family's expert count, top-k, expert width and sparse layers.
pub(super) fn parse_moe(k: &Keys, m: &families::MoeKeys, num_layers: usize, norm: bool) -> Result<MoeConfig> {
    let key = m.experts.iter().copied().find(|key| k.present(key).is_some()).unwrap_or(m.experts[0]);
    let num_experts = k.size(key, 1 << 12)?;
    let top_k = k.size("num_experts_per_tok", 1 << 12)?;
    if top_k > num_experts {
        return Err(k.err("num_experts_per_tok", format!("{top_k} is more than the {num_experts} experts ({key})")));
    }
    let intermediate_size = k.size(m.intermediate.unwrap_or("intermediate_size"), MAX_MLP_WIDTH)?;
    let sparse_layers = match m.sparse {
        SparseLayers::QwenStep => {
            let step = k.size_opt("decoder_sparse_step", 1 << 10)?.unwrap_or(1);
            let dense = layer_list(k, "mlp_only_layers", num_layers)?.unwrap_or_default();
            (0..num_layers).map(|l| !dense.contains(&l) && (l + 1) % step == 0).collect()
        }
        SparseLayers::Interleave => match layer_list(k, "moe_layers", num_layers)? {
            Some(sparse) => (0..num_layers).map(|l| sparse.contains(&l)).collect(),
            None => {
                let step = k.size_opt("interleave_moe_layer_step", 1 << 10)?.unwrap_or(1);
                (0..num_layers).map(|l| (l + 1) % step == 0).collect()
            }
        },
        SparseLayers::All => vec![true; num_layers],
    };
    // Three checkpoint tensors an expert a sparse layer are listed before any is read: bounded
    // (the largest matrix models have about 16k experts in all).
    let total = num_experts * sparse_layers.iter().filter(|&&s| s).count();
    if total > 1 << 16 {
        return Err(
            k.err(key, format!("{num_experts} experts in each sparse layer make {total}, past the limit 65536"))
        );
    }
    Ok(MoeConfig {
        num_experts,
        top_k,
        intermediate_size,
        norm,
        weights_f32: m.weights_f32,
        sparse_layers,
        router: m.router,
        layout: m.layout,
        shared: m.shared,
        names: m.names,
    })
}

/// A list of layer indices under `key` (absent: `None`), each below `num_layers`.
fn layer_list(k: &Keys, key: &str, num_layers: usize) -> Result<Option<Vec<usize>>> {
    let Some(v) = k.present(key) else { return Ok(None) };
    let list = v
        .as_array()
        .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| k.err(key, format!("expected a list of layer indices, found {v}")))?;
    match list.iter().find(|&&l| l >= num_layers as u64) {
        Some(l) => Err(k.err(key, format!("layer {l} is past num_hidden_layers = {num_layers}"))),
        None => Ok(Some(list.into_iter().map(|l| l as usize).collect())),
    }
}

/// Which layers apply RoPE (Llama 4): `no_rope_layers` (one 0 or 1 a layer, 1 = RoPE; an
/// empty list counts as absent, as transformers reads it), or without it every layer but each
/// `no_rope_layer_interval`-th (absent: 4).
pub(super) fn parse_rope_layers(k: &Keys, num_layers: usize) -> Result<Vec<bool>> {
    let key = "no_rope_layers";
    if let Some(v) = k.present(key).filter(|v| v.as_array().is_none_or(|a| !a.is_empty())) {
        let list = v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().filter(|&b| b <= 1)).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| k.err(key, format!("expected a list of 0 or 1 a layer, found {v}")))?;
        if list.len() != num_layers {
            return Err(k.err(key, format!("{} entries for num_hidden_layers = {num_layers}", list.len())));
        }
        return Ok(list.into_iter().map(|b| b == 1).collect());
    }
    let interval = k.size_opt("no_rope_layer_interval", 1 << 10)?.unwrap_or(families::LLAMA4_NOPE_INTERVAL);
    Ok((0..num_layers).map(|l| (l + 1) % interval != 0).collect())
}

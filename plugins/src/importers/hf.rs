//! Hugging Face checkpoint folders: `config.json` plus `model.safetensors` or the shards listed
//! in `model.safetensors.index.json`. The families are `families.rs`'s table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use autodeploy_core::backend::{ImportRequest, ModelImporter};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::quant::read_checkpoint_quant;
use autodeploy_core::registry::ImporterPlugin;
use autodeploy_core::weights::{SafetensorsFile, WeightStore};
use autodeploy_core::{DType, Graph};
use serde_json::Value;

use super::decoder::{build_decoder, BlockOptions, DecoderConfig, RopeScaling, Scalars};
use super::families::{self, Flag, Layers, Window};
use super::hf_keys::Keys;
use super::hf_quant::{dummy_quantized, mark_quantized};
use super::layer_shapes::{
    parse_block_configs, parse_layer_lists, parse_moe, parse_rope_layers, widest, MAX_MLP_WIDTH,
};

pub struct HfImporter;

autodeploy_core::inventory::submit! {
    ImporterPlugin { name: "hf", version: env!("CARGO_PKG_VERSION"), make: || Box::new(HfImporter) }
}

impl ModelImporter for HfImporter {
    fn accepts(&self, path: &Path) -> bool {
        path.is_dir() && path.join("config.json").is_file()
    }

    fn tokenizer(&self, path: &Path) -> Result<Option<autodeploy_core::tokenizer::Tokenizer>> {
        autodeploy_core::tokenizer::Tokenizer::from_hf_dir(path)
    }

    fn import(&self, req: &ImportRequest) -> Result<Graph> {
        let cfg_path = req.path.join("config.json");
        let quant = read_checkpoint_quant(&req.path)?;
        let cfg = parse_config(&cfg_path, req.dtype)?;
        let mut store = if req.dummy_weights {
            let mut store = dummy_weights(&cfg, &req.path);
            if let Some(q) = &quant {
                dummy_quantized(q, &mut store)?;
            }
            store
        } else {
            let mut store = open_weights(&req.path)?;
            if let Some(fam) = families::family(&cfg.family) {
                rename_weights(fam, &mut store)?;
                if fam.fused_projections {
                    split_fused(&cfg, &mut store)?;
                }
                if fam.interleaved_rope {
                    unpermute_qk(&cfg, &mut store)?;
                }
            }
            store
        };
        if let Some(q) = quant {
            // A declared KV-cache format (FP8, with `k_proj.k_scale` / `v_proj.v_scale`) is
            // applied by the `quantize_fp8_kv_cache` transform, as `kv_cache_dtype` says.
            mark_quantized(&q, &mut store)?;
            store.set_quantization(q);
        }
        check_weights(&cfg, &store)?;
        let mut g = build_decoder(&cfg, store, req.max_batch_size, req.max_seq_len)?;
        g.history.insert(0, format!("import: hf importer read {}", req.path.display()));
        Ok(g)
    }
}

/// Reads `config.json` into the normalised decoder description.
pub fn parse_config(path: &Path, dtype: Option<DType>) -> Result<DecoderConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| Error::BadFile { file: path.into(), msg: format!("invalid JSON: {e}") })?;
    let map = json.as_object().ok_or_else(|| Error::BadFile { file: path.into(), msg: "not a JSON object".into() })?;
    let k = Keys { file: path, map, prefix: "", aliases: &[] };

    let model_type = k.str_opt("model_type")?.ok_or_else(|| k.err("model_type", "missing"))?;
    let fam = families::family(model_type).ok_or_else(|| Error::UnknownModelType {
        file: path.into(),
        model_type: model_type.into(),
        supported: families::names(),
    })?;
    // A multimodal checkpoint's text model: its keys under `text_config`.
    let text;
    let k = if fam.text_config {
        text = k
            .present("text_config")
            .and_then(Value::as_object)
            .ok_or_else(|| k.err("text_config", format!("missing: {model_type} configs nest the text model's keys")))?;
        Keys { map: text, prefix: "text_config.", ..k }
    } else {
        k
    };
    let k = Keys { aliases: fam.config_keys, ..k };
    let flag = |f: Flag| match f {
        Flag::Fixed(v) => Ok(v),
        Flag::Key(key, default) => k.bool_or(key, default),
    };
    for &(key, only) in fam.fixed_keys {
        let accepted: Option<Value> = serde_json::from_str(only).ok();
        if let Some(v) = k.present(key).filter(|&v| accepted.as_ref() != Some(v)) {
            return Err(k.err(key, format!("{v}: only {only} is supported for {model_type}")));
        }
    }
    let hidden_size = k.size("hidden_size", 1 << 17)?;
    let num_layers = k.size("num_hidden_layers", 1 << 10)?;
    let lists = match fam.layers {
        Layers::Lists { .. } => Some(parse_layer_lists(&k, fam.layers, num_layers, hidden_size)?),
        _ => None,
    };
    let (num_heads, num_kv_heads) = match &lists {
        Some(v) => {
            let (heads, kv, _) = widest(v);
            (heads, kv.unwrap_or(1))
        }
        None => {
            let num_heads = k.size("num_attention_heads", 1 << 12)?;
            let num_kv_heads = k.size_opt("num_key_value_heads", 1 << 12)?.unwrap_or(num_heads);
            if num_heads % num_kv_heads != 0 {
                return Err(k.err(
                    "num_key_value_heads",
                    format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
                ));
            }
            (num_heads, num_kv_heads)
        }
    };
    let head_dim = match k.size_opt("head_dim", 1 << 12)? {
        Some(d) => d,
        None if lists.is_some() => return Err(k.err("head_dim", "missing (the layers' head counts differ)")),
        None if hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(k.err(
                "head_dim",
                format!("missing, and hidden_size {hidden_size} is not a multiple of {num_heads} heads"),
            ))
        }
    };
    if head_dim % 2 != 0 {
        return Err(k.err("head_dim", format!("{head_dim} is odd; rotary embedding needs an even head_dim")));
    }
    let (act_key, act_default) = fam.activation_key;
    let act = k.str_opt(act_key)?.unwrap_or(act_default);
    let activation = match fam.activations.iter().find(|(name, _)| *name == act) {
        Some(&(_, a)) => a,
        None => {
            let known: Vec<&str> = fam.activations.iter().map(|(n, _)| *n).collect();
            let known = known.join(", ");
            return Err(k.err(act_key, format!("`{act}` is not supported for {model_type} (supported: {known})")));
        }
    };
    let layers = match fam.layers {
        Layers::BlockConfigs => Some(parse_block_configs(&k, num_layers, num_heads, hidden_size)?),
        Layers::Lists { .. } => lists,
        Layers::Uniform => None,
    };
    // Heterogeneous layers: the widest MLP and the first attention's KV heads (`widest`).
    let (intermediate_size, num_kv_heads) = match &layers {
        Some(v) => {
            let (_, kv, mlp) = widest(v);
            (mlp, kv.unwrap_or(num_kv_heads))
        }
        None => {
            // The dense layers' width where a MoE family keeps `intermediate_size` for its
            // experts (and the key is present).
            let key = fam.moe.and_then(|m| m.dense_intermediate).filter(|key| k.present(key).is_some());
            (k.size(key.unwrap_or("intermediate_size"), MAX_MLP_WIDTH)?, num_kv_heads)
        }
    };
    if k.bool_or("use_bidirectional_attention", false)? {
        return Err(k.err("use_bidirectional_attention", "bidirectional attention is not supported (causal only)"));
    }

    let (rope_theta, rope_scaling, local_rope) = match fam.local_rope_theta {
        Some(default) => parse_layer_ropes(&k, default)?,
        None => {
            let (t, s) = parse_rope(&k)?;
            (t, s, None)
        }
    };
    let rotary_dim = rotary_dim(&k, head_dim)?;
    if let RopeScaling::LongRope { short_factor, .. } = &rope_scaling {
        let key = if k.present("rope_parameters").is_some() { "rope_parameters" } else { "rope_scaling" };
        for name in ["short_factor", "long_factor"] {
            let n =
                k.present(key).and_then(|v| v.get(name)).and_then(Value::as_array).map_or(short_factor.len(), Vec::len);
            if n != rotary_dim / 2 {
                return Err(k.err(
                    &format!("{key}.{name}"),
                    format!("{n} factors, but the rotary dimension {rotary_dim} needs {}", rotary_dim / 2),
                ));
            }
        }
    }

    let (sliding_window, sliding_layers) = match fam.window {
        Window::Key(key) => (k.size_opt(key, 1 << 28)?, None),
        Window::Layers { key, default, pattern } => {
            let w = k.size_or_null(key, 1 << 28, default)?;
            (w, Some(sliding_layers(&k, num_layers, pattern)?))
        }
        Window::FromLayer if k.bool_or("use_sliding_window", false)? => {
            let w = k.size_or_null("sliding_window", 1 << 28, Some(4096))?;
            let layers = match k.present("layer_types") {
                Some(_) => sliding_layers(&k, num_layers, 1)?,
                None => {
                    let from = match k.present("max_window_layers") {
                        None => 28,
                        Some(v) => v
                            .as_u64()
                            .ok_or_else(|| k.err("max_window_layers", format!("expected a layer count, found {v}")))?
                            as usize,
                    };
                    (0..num_layers).map(|i| i >= from).collect()
                }
            };
            (w, Some(layers))
        }
        Window::FromLayer => (None, None),
        Window::None if k.bool_or("use_sliding_window", false)? => {
            return Err(k.err("use_sliding_window", "sliding-window layers are not supported yet for this family"))
        }
        Window::None => (None, None),
    };
    let file_dtype = match k.str_opt("torch_dtype")?.or(k.str_opt("dtype")?) {
        None => DType::F32,
        Some(s) => DType::parse(s)
            .filter(|d| d.is_float())
            .ok_or_else(|| k.err("torch_dtype", format!("unknown dtype `{s}`")))?,
    };
    let eps_key = if fam.layer_norm { "norm_epsilon" } else { "rms_norm_eps" };
    let rms_norm_eps = k.f64_opt(eps_key)?.unwrap_or(if fam.layer_norm { 1e-5 } else { 1e-6 });
    if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
        return Err(k.err(eps_key, format!("{rms_norm_eps} is outside (0, 1)")));
    }
    let max_position_embeddings = k.size_opt("max_position_embeddings", 1 << 28)?.unwrap_or(4096);
    let dtype = dtype.unwrap_or(file_dtype);
    let softcaps = match fam.softcaps {
        Some(d) => (
            k.positive_or_null("attn_logit_softcapping", d.attn)?,
            k.positive_or_null("final_logit_softcapping", d.final_logits)?,
        ),
        None => (None, None),
    };
    let rope_layers = if fam.nope_layers { Some(parse_rope_layers(&k, num_layers)?) } else { None };
    let qk_norm_ones = match fam.qk_l2_norm {
        Some(key) => k.bool_or(key, true)?,
        None => false,
    };
    let (attention_chunk, query_temperature) =
        if fam.chunked_attention { chunked_attention(&k, rope_layers.as_deref())? } else { (None, None) };
    let mut scalars = if fam.multipliers { parse_multipliers(&k)? } else { Scalars::default() };
    if fam.embedding_scale {
        // transformers multiplies by √hidden_size as a tensor of the weights' dtype.
        scalars.embedding = autodeploy_core::cpu::round_as(dtype, (hidden_size as f32).sqrt()) as f64;
    }
    if let Some(default) = fam.query_pre_attn_scalar {
        let s = k
            .positive_or_null("query_pre_attn_scalar", Some(default))?
            .ok_or_else(|| k.err("query_pre_attn_scalar", "must be a positive number"))?;
        scalars.attention = Some(s.powf(-0.5));
    }
    Ok(DecoderConfig {
        family: model_type.to_string(),
        vocab_size: k.size("vocab_size", 1 << 22)?,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rotary_dim,
        rms_norm_eps,
        rope_theta,
        rope_scaling,
        max_position_embeddings,
        sliding_window,
        tie_word_embeddings: k.bool_or("tie_word_embeddings", fam.tied_by_default)?,
        qkv_bias: flag(fam.qkv_bias)?,
        o_bias: flag(fam.o_bias)?,
        mlp_bias: flag(fam.mlp_bias)?,
        qk_norm: fam.qk_norm || qk_norm_ones,
        dtype,
        weight_dtypes: Default::default(),
        scalars,
        blocks: BlockOptions {
            norm_offset: fam.norm_offset,
            activation,
            sandwich_norms: fam.sandwich_norms,
            attn_softcap: softcaps.0,
            final_softcap: softcaps.1,
            sliding_layers,
            local_rope_theta: local_rope,
            layer_norm: fam.layer_norm,
            plain_mlp: fam.plain_mlp,
            layers,
            qk_norm_after_transpose: fam.qk_norm_after_transpose,
            rope_layers,
            qk_norm_ones,
            attention_chunk,
            query_temperature,
            moe: match &fam.moe {
                Some(m) => Some(parse_moe(&k, m, num_layers, flag(m.norm)?)?),
                None => None,
            },
        },
    })
}

/// The checkpoint's tensors under the graph's names, where the family spells them its own way
/// (`Family::weight_names`): each name with the family's fragments replaced by the graph's.
fn rename_weights(fam: &families::Family, store: &mut WeightStore) -> Result<()> {
    if fam.weight_names.is_empty() {
        return Ok(());
    }
    for name in store.names() {
        let ours = fam.weight_names.iter().fold(name.clone(), |n, (ours, theirs)| n.replace(theirs, ours));
        if ours != name {
            store.add_alias(&ours, &name)?;
        }
    }
    Ok(())
}

/// Llama 4's chunked attention and query temperature (`Family::chunked_attention`): its RoPE
/// layers attend only within their chunk of `attention_chunk_size` positions (absent or null:
/// no chunks), and with `attn_temperature_tuning` (absent: true) its no-RoPE layers scale
/// queries at position p by `log1p(floor((p + 1) / floor_scale)) · attn_scale + 1`
/// (`floor_scale` absent: 8192, `attn_scale` absent: 0.1).
/// (`attention_chunk_size`, (`floor_scale`, `attn_scale`)) as `BlockOptions` takes them.
type ChunkedAttention = (Option<usize>, Option<(f64, f64)>);

fn chunked_attention(k: &Keys, rope_layers: Option<&[bool]>) -> Result<ChunkedAttention> {
    let chunk = k.size_opt("attention_chunk_size", 1 << 28)?;
    let nope = rope_layers.is_some_and(|v| v.contains(&false));
    let temperature = if nope && k.bool_or("attn_temperature_tuning", true)? {
        let floor = k.size_opt("floor_scale", 1 << 28)?.unwrap_or(families::LLAMA4_FLOOR_SCALE);
        let scale = k.f64_opt("attn_scale")?.unwrap_or(families::LLAMA4_ATTN_SCALE);
        if !scale.is_finite() {
            return Err(k.err("attn_scale", format!("{scale} is not a number")));
        }
        Some((floor as f64, scale))
    } else {
        None
    };
    Ok((chunk, temperature))
}

/// Which layers slide: `layer_types` (transformers 5), else every layer but each
/// `sliding_window_pattern`-th (`pattern` when that key is absent).
fn sliding_layers(k: &Keys, num_layers: usize, pattern: usize) -> Result<Vec<bool>> {
    if let Some(v) = k.present("layer_types") {
        let list = v.as_array().ok_or_else(|| k.err("layer_types", format!("expected a list, found {v}")))?;
        if list.len() != num_layers {
            return Err(k.err("layer_types", format!("{} entries for num_hidden_layers = {num_layers}", list.len())));
        }
        return list
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(k.err(
                    &format!("layer_types[{i}]"),
                    format!("{t} is not \"sliding_attention\" or \"full_attention\""),
                )),
            })
            .collect();
    }
    let pattern = k.size_opt("sliding_window_pattern", 1 << 10)?.unwrap_or(pattern);
    Ok((0..num_layers).map(|i| (i + 1) % pattern != 0).collect())
}

/// Gemma 3's two RoPE tables: the full-attention layers' (`rope_theta` and `rope_scaling`, or
/// `rope_parameters.full_attention`) and the sliding layers' (`rope_local_base_freq`, or
/// `rope_parameters.sliding_attention`, which must be unscaled).
fn parse_layer_ropes(k: &Keys, local_default: f64) -> Result<(f64, RopeScaling, Option<f64>)> {
    let nested = k.present("rope_parameters").and_then(Value::as_object).filter(|m| m.contains_key("full_attention"));
    let Some(m) = nested else {
        let (theta, scaling) = parse_rope(k)?;
        let local = k.f64_opt("rope_local_base_freq")?.unwrap_or(local_default);
        return Ok((theta, scaling, Some(local)));
    };
    let part = |name: &str| -> Result<(f64, RopeScaling)> {
        let prefix = format!("rope_parameters.{name}.");
        let v = m.get(name).filter(|v| !v.is_null());
        let obj = match v {
            Some(v) => v.as_object().ok_or_else(|| k.err(&format!("rope_parameters.{name}"), "expected an object"))?,
            None => return Err(k.err(&format!("rope_parameters.{name}"), "missing")),
        };
        let sub = Keys { file: k.file, map: obj, prefix: &prefix, aliases: &[] };
        let theta = sub.f64("rope_theta")?;
        Ok((theta, parse_rope_type(&sub, k)?))
    };
    let (theta, scaling) = part("full_attention")?;
    let (local, local_scaling) = part("sliding_attention")?;
    if local_scaling != RopeScaling::None {
        return Err(k.err("rope_parameters.sliding_attention.rope_type", "only the default RoPE is supported here"));
    }
    Ok((theta, scaling, Some(local)))
}

/// Granite's multipliers; each must be a positive finite number (absent: no scaling).
fn parse_multipliers(k: &Keys) -> Result<Scalars> {
    let positive = |key: &str| -> Result<Option<f64>> {
        match k.f64_opt(key)? {
            Some(v) if !(v > 0.0 && v.is_finite()) => Err(k.err(key, format!("{v} is not a positive number"))),
            v => Ok(v),
        }
    };
    Ok(Scalars {
        embedding: positive("embedding_multiplier")?.unwrap_or(1.0),
        attention: positive("attention_multiplier")?,
        residual: positive("residual_multiplier")?.unwrap_or(1.0),
        logits_divisor: positive("logits_scaling")?.unwrap_or(1.0),
    })
}

/// RoPE from either `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
fn parse_rope(k: &Keys) -> Result<(f64, RopeScaling)> {
    let (params, key) = match (k.present("rope_parameters"), k.present("rope_scaling")) {
        (Some(p), _) => (Some(p), "rope_parameters"),
        (None, Some(s)) => (Some(s), "rope_scaling"),
        (None, None) => (None, ""),
    };
    let prefix = format!("{key}.");
    let sub = match params {
        None => None,
        Some(v) => Some(Keys {
            aliases: &[],
            file: k.file,
            map: v.as_object().ok_or_else(|| k.err(key, format!("expected an object, found {v}")))?,
            prefix: &prefix,
        }),
    };
    let theta = match sub.as_ref().map(|s| s.f64_opt("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => k.f64_opt("rope_theta")?.unwrap_or(10000.0),
    };
    let Some(s) = sub else {
        return Ok((theta, RopeScaling::None));
    };
    Ok((theta, parse_rope_type(&s, k)?))
}

/// How much of each head RoPE rotates: `partial_rotary_factor` (top-level, or in
/// transformers 5's `rope_parameters`) of `head_dim`, truncated as transformers does.
fn rotary_dim(k: &Keys, head_dim: usize) -> Result<usize> {
    // transformers 5 reads it from `rope_parameters` (where it moves a top-level one).
    let (key, f) = match k.present("rope_parameters").and_then(|p| p.get("partial_rotary_factor")) {
        Some(v) => {
            let key = "rope_parameters.partial_rotary_factor";
            (key, v.as_f64().ok_or_else(|| k.err(key, format!("expected a number, found {v}")))?)
        }
        None => match k.f64_opt("partial_rotary_factor")? {
            Some(f) => ("partial_rotary_factor", f),
            None => return Ok(head_dim),
        },
    };
    let dim = (head_dim as f64 * f) as usize;
    if !(f > 0.0 && f <= 1.0) || dim < 2 || !dim.is_multiple_of(2) {
        return Err(k.err(key, format!("{f} of head_dim {head_dim} is not an even rotary dimension of at least 2")));
    }
    Ok(dim)
}

/// A list of numbers (LongRoPE's factors), each positive and finite.
fn factors(s: &Keys, key: &str) -> Result<Vec<f64>> {
    let v = s.present(key).ok_or_else(|| s.err(key, "missing"))?;
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
        .filter(|f| f.iter().all(|x| *x > 0.0 && x.is_finite()))
        .ok_or_else(|| s.err(key, format!("expected a list of positive numbers, found {v}")))
}

/// The scaling a RoPE parameter object `s` describes (`k`: the config, for defaults).
fn parse_rope_type(s: &Keys, k: &Keys) -> Result<RopeScaling> {
    let rope_type = match s.str_opt("rope_type")? {
        Some(t) => t,
        None => s.str_opt("type")?.unwrap_or("default"),
    };
    let factor = || -> Result<f64> {
        let f = s.f64("factor")?;
        if f >= 1.0 && f.is_finite() {
            Ok(f)
        } else {
            Err(s.err("factor", format!("{f} is not a finite number of at least 1")))
        }
    };
    let scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: factor()? },
        "dynamic" => RopeScaling::Dynamic {
            factor: factor()?,
            original_max_position_embeddings: match s.size_opt("original_max_position_embeddings", 1 << 28)? {
                Some(n) => n,
                None => k.size_opt("max_position_embeddings", 1 << 28)?.unwrap_or(4096),
            },
        },
        "llama3" => RopeScaling::Llama3 {
            factor: s.f64("factor")?,
            low_freq_factor: s.f64("low_freq_factor")?,
            high_freq_factor: s.f64("high_freq_factor")?,
            original_max_position_embeddings: s.f64("original_max_position_embeddings")?,
        },
        "longrope" => {
            factors(s, "long_factor")?;
            let original = match s.size_opt("original_max_position_embeddings", 1 << 28)? {
                Some(n) => n,
                None => k.size("original_max_position_embeddings", 1 << 28)?,
            };
            // transformers: `factor`, else max_position_embeddings over the original.
            let factor = match s.f64_opt("factor")? {
                Some(f) => f,
                None => k.size_opt("max_position_embeddings", 1 << 28)?.unwrap_or(original) as f64 / original as f64,
            };
            let attention_factor = match s.f64_opt("attention_factor")? {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
            };
            RopeScaling::LongRope {
                short_factor: factors(s, "short_factor")?,
                original_max_position_embeddings: original,
                attention_factor,
            }
        }
        other => {
            return Err(s.err(
                "rope_type",
                format!("`{other}` is not supported (supported: default, linear, dynamic, llama3, longrope)"),
            ))
        }
    };
    // Equal factors (Llama 4's) leave no band between the two wavelengths to smooth over.
    if let RopeScaling::Llama3 { low_freq_factor, high_freq_factor, .. } = scaling {
        if high_freq_factor < low_freq_factor {
            return Err(s.err("high_freq_factor", "must be at least low_freq_factor"));
        }
    }
    Ok(scaling)
}

/// Opens `model.safetensors`, or every shard named by `model.safetensors.index.json`.
pub fn open_weights(dir: &Path) -> Result<WeightStore> {
    let index = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let mut store = WeightStore::new(dir.display().to_string());
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| Error::BadFile { file: index.clone(), msg: format!("invalid JSON: {e}") })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
        let mut by_file: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (name, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| Error::config(&index, format!("weight_map.{name}"), "expected a file name"))?;
            by_file.entry(f).or_default().push(name.clone());
        }
        for (f, names) in by_file {
            let path = dir.join(f);
            let file = SafetensorsFile::open(&path)?;
            for n in &names {
                if file.info(n).is_none() {
                    return Err(Error::MissingTensor {
                        name: n.clone(),
                        where_: format!("{} (the index {} places it there)", path.display(), index.display()),
                    });
                }
            }
            store.add_file(file, Some(&names));
        }
    } else if single.is_file() {
        store.add_file(SafetensorsFile::open(&single)?, None);
    } else {
        return Err(Error::BadFile {
            file: dir.into(),
            msg: "no model.safetensors or model.safetensors.index.json in this folder".into(),
        });
    }
    Ok(store)
}

/// Random weights for every tensor the config implies (`load_format = "dummy"`), generated when
/// the backend loads them (a GPU backend may generate them on the device: the values are
/// defined by `Synthetic`): norms 1, biases 0, the rest uniform in ±1/√fan_in, each seeded by
/// its name, so two runs see the same model.
pub fn dummy_weights(cfg: &DecoderConfig, dir: &Path) -> WeightStore {
    use autodeploy_core::weights::Synthetic;
    let mut store = WeightStore::new(format!("{} (random weights: load_format = \"dummy\")", dir.display()));
    for (name, shape) in cfg.expected_weights() {
        let origin = format!("random `{name}` (load_format = \"dummy\", {})", dir.display());
        let values = if name.ends_with("norm.weight") {
            Synthetic::Const(1.0)
        } else if name.ends_with(".bias") {
            Synthetic::Const(0.0)
        } else {
            Synthetic::uniform_named(&name, 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt())
        };
        store.add_synthetic(&name, shape, origin, values);
    }
    store
}

/// The q/k projections of a checkpoint in Meta's interleaved RoPE order
/// (`Family::interleaved_rope`), their rows permuted when loaded into the rotate-half order the
/// blocks use (the permutation llama.cpp's GGUF files undo: the same matrices up to an order of
/// each head's rows, applied to q and k alike, so the scores do not change).
fn unpermute_qk(cfg: &DecoderConfig, store: &mut WeightStore) -> Result<()> {
    let source = store.clone();
    for l in (0..cfg.num_layers).filter(|&l| cfg.rope(l)) {
        let Some(kv) = cfg.kv_heads(l) else { continue };
        for (proj, heads) in [("q_proj", cfg.heads(l)), ("k_proj", kv)] {
            for part in ["weight", "bias"] {
                let name = format!("model.layers.{l}.self_attn.{proj}.{part}");
                if !source.contains(&name) {
                    continue;
                }
                let (dtype, shape) = source.stored_meta(&name)?;
                let (rows, cols) = (shape[0], shape.iter().skip(1).product::<usize>());
                if rows != heads * cfg.head_dim {
                    continue; // check_weights names the shape
                }
                let (src, n, s) = (source.clone(), name.clone(), shape.clone());
                let load = std::sync::Arc::new(move || {
                    let t = src.load(&n, dtype)?;
                    let v = super::gguf::unpermute_rows(&t.to_f32(), heads, rows, cols);
                    autodeploy_core::Tensor::from_f32(s.clone(), v)
                });
                let origin = format!("{} (rows from interleaved to rotate-half RoPE order)", source.location(&name));
                store.add_lazy(&name, shape, origin, load);
            }
        }
    }
    Ok(())
}

/// The decoder's q/k/v and gate/up weights as row ranges of a checkpoint's fused
/// `self_attn.qkv_proj` and `mlp.gate_up_proj` (checked to hold exactly those rows).
fn split_fused(cfg: &DecoderConfig, store: &mut WeightStore) -> Result<()> {
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        let q = cfg.heads(l) * cfg.head_dim;
        let mut fused_parts = Vec::new();
        if let Some(kv) = cfg.kv_heads(l).map(|g| g * cfg.head_dim) {
            let parts = vec![("self_attn.q_proj", q), ("self_attn.k_proj", kv), ("self_attn.v_proj", kv)];
            fused_parts.push(("self_attn.qkv_proj", parts));
        }
        if let Some(i) = cfg.mlp_width(l) {
            fused_parts.push(("mlp.gate_up_proj", vec![("mlp.gate_proj", i), ("mlp.up_proj", i)]));
        }
        for (fused, parts) in fused_parts {
            let of = format!("{p}.{fused}.weight");
            if !store.contains(&of) {
                return Err(Error::MissingTensor { name: of, where_: store.describe() });
            }
            let (_, shape) = store.stored_meta(&of)?;
            let rows: usize = parts.iter().map(|(_, n)| n).sum();
            if shape.first() != Some(&rows) {
                let mut expected = shape.clone();
                if let Some(r) = expected.first_mut() {
                    *r = rows;
                }
                return Err(Error::TensorShape {
                    file: PathBuf::from(store.location(&of)),
                    name: of,
                    expected,
                    found: shape,
                });
            }
            let mut start = 0;
            for (name, n) in parts {
                store.add_rows(&format!("{p}.{name}.weight"), &of, start, n)?;
                start += n;
            }
        }
    }
    Ok(())
}

/// Every tensor the graph needs is present, a float, and of the shape the config implies.
fn check_weights(cfg: &DecoderConfig, store: &WeightStore) -> Result<()> {
    for (name, shape) in cfg.expected_weights() {
        if !store.contains(&name) {
            return Err(Error::MissingTensor { name, where_: store.describe() });
        }
        let (_, found) = store.stored_meta(&name)?;
        if found != shape {
            return Err(Error::TensorShape {
                file: PathBuf::from(store.location(&name)),
                name,
                expected: shape,
                found,
            });
        }
    }
    Ok(())
}

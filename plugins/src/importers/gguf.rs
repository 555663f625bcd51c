//! GGUF files (llama.cpp's format): the model config from the metadata, tensors renamed to
//! Hugging Face names and dequantized when the engine loads them, and the Q/K row permutation
//! llama.cpp's converter applies to llama-architecture models undone.

use std::path::Path;
use std::sync::Arc;

use autodeploy_core::backend::{ImportRequest, ModelImporter};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::gguf::{GgmlType, GgufFile, Value};
use autodeploy_core::registry::ImporterPlugin;
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{DType, Graph, Tensor};

use super::decoder::{build_decoder, BlockOptions, DecoderConfig, RopeScaling, Scalars};

pub struct GgufImporter;

autodeploy_core::inventory::submit! {
    ImporterPlugin { name: "gguf", version: env!("CARGO_PKG_VERSION"), make: || Box::new(GgufImporter) }
}

impl ModelImporter for GgufImporter {
    fn accepts(&self, path: &Path) -> bool {
        path.is_file()
            && std::fs::File::open(path)
                .and_then(|mut f| {
                    let mut m = [0u8; 4];
                    std::io::Read::read_exact(&mut f, &mut m).map(|_| m)
                })
                .is_ok_and(|m| &m == b"GGUF")
    }

    fn tokenizer(&self, path: &Path) -> Result<Option<autodeploy_core::tokenizer::Tokenizer>> {
        let f = GgufFile::open(path)?;
        autodeploy_core::tokenizer::Tokenizer::from_gguf(&f.header, path)
    }

    fn import(&self, req: &ImportRequest) -> Result<Graph> {
        if req.dummy_weights {
            return Err(Error::Msg(format!(
                "{}: load_format = \"dummy\" builds weights from a Hugging Face config.json; point `model` at a folder holding one",
                req.path.display()
            )));
        }
        let file = Arc::new(GgufFile::open(&req.path)?);
        let mut cfg = config(&file, req.dtype)?;
        // With `dtype = "auto"`, 2-D weights in a format the CPU kernels read directly (Q4_0,
        // Q4_1, Q8_0) stay as stored; everything else is dequantized.
        if req.dtype.is_none() {
            for (hf, shape) in cfg.expected_weights() {
                // Experts are stacked for `torch_moe`, which reads floats.
                let src = source(&file, &cfg, &hf, &shape).filter(|s| !(s.rows.is_some() && s.name.contains("_exps")));
                let t = src.and_then(|s| file.header.tensor(&s.name));
                if let Some(ty) = t.and_then(|t| GgmlType::from_id(t.type_id)).filter(|ty| ty.computes_quantized()) {
                    if shape.len() == 2 {
                        cfg.weight_dtypes.insert(hf, DType::Block(ty));
                    }
                }
            }
        }
        let store = weights(&file, &cfg)?;
        let mut g = build_decoder(&cfg, store, req.max_batch_size, req.max_seq_len)?;
        g.history
            .insert(0, format!("import: gguf importer read {} (GGUF v{})", req.path.display(), file.header.version));
        Ok(g)
    }
}

struct Meta<'a> {
    f: &'a GgufFile,
    arch: &'a str,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.f.path, key, msg)
    }
    fn opt(&self, k: &str) -> Option<&Value> {
        self.f.header.get(&self.key(k))
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(&self.key(k), format!("expected a positive integer, found {v:?}"))),
        }
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?.ok_or_else(|| self.err(&self.key(k), "missing"))
    }
    /// A key llama.cpp writes per layer for heterogeneous models (OpenELM, DeciLM): `None`
    /// where it is one number, else one count per layer (0 allowed: a skipped sub-block),
    /// each at most `max`, the list as long as the model is deep.
    fn per_layer(&self, k: &str, num_layers: usize, max: u64) -> Result<Option<Vec<usize>>> {
        let Some(list) = self.opt(k).and_then(Value::as_array) else { return Ok(None) };
        if list.len() != num_layers {
            return Err(self.err(&self.key(k), format!("{} entries for {num_layers} blocks", list.len())));
        }
        list.iter()
            .enumerate()
            .map(|(l, v)| {
                v.as_u64().filter(|&n| n <= max).map(|n| n as usize).ok_or_else(|| {
                    self.err(&self.key(k), format!("block {l}: expected a count of at most {max}, found {v:?}"))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    fn f64_opt(&self, k: &str) -> Result<Option<f64>> {
        match self.opt(k) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| self.err(&self.key(k), format!("expected a number, found {v:?}")))
            }
        }
    }
}

/// An optional metadata number that must be positive and finite.
fn positive(m: &Meta, k: &str) -> Result<Option<f64>> {
    match m.f64_opt(k)? {
        Some(v) if !(v > 0.0 && v.is_finite()) => Err(m.err(&m.key(k), format!("{v} is not a positive number"))),
        v => Ok(v),
    }
}

/// The decoder description from the GGUF metadata.
pub fn config(f: &GgufFile, dtype: Option<DType>) -> Result<DecoderConfig> {
    let arch = f
        .header
        .get("general.architecture")
        .ok_or_else(|| Error::config(&f.path, "general.architecture", "missing"))?
        .as_str()
        .ok_or_else(|| Error::config(&f.path, "general.architecture", "not a string"))?;
    let m = Meta { f, arch };
    if super::families::gguf_family(arch, false).or(super::families::gguf_family(arch, true)).is_none() {
        return Err(Error::config(
            &f.path,
            "general.architecture",
            format!("`{arch}` GGUF files are not supported; supported: {}", super::families::gguf_names()),
        ));
    }
    // Files with experts (Mixtral's say `llama`) are their MoE family's, never run as dense;
    // an `expert_count` of 0 (some converters write it for dense models) is none.
    let experts = match m.opt("expert_count").and_then(Value::as_u64) {
        Some(0) => None,
        _ => m.usize_opt("expert_count")?,
    };
    let Some(fam) = super::families::gguf_family(arch, experts.is_some()) else {
        let what = if experts.is_some() { "with" } else { "without" };
        return Err(m.err(&m.key("expert_count"), format!("`{arch}` GGUF files {what} experts are not supported")));
    };
    let hidden = m.usize("embedding_length")?;
    // Checked before anything is sized from it: the last block's first tensor must exist.
    let num_layers = m.usize("block_count")?;
    let has = |n: &str| f.header.tensor(n).is_some();
    let last_block =
        |n: usize| has(&format!("blk.{}.attn_norm.weight", n - 1)) || has(&format!("blk.{}.ffn_norm.weight", n - 1));
    if num_layers == 0 || !last_block(num_layers) {
        return Err(m.err(
            &m.key("block_count"),
            format!("{num_layers} blocks, but the file has no tensor blk.{}.attn_norm.weight", num_layers.max(1) - 1),
        ));
    }
    let layers = layer_shapes(&m, num_layers)?;
    let (heads, kv_heads) = match &layers {
        // As the HF importer: `widest` stands for the model, each layer's own are in
        // `blocks.layers`.
        Some(v) => {
            let (heads, kv, _) = super::layer_shapes::widest(v);
            (heads, kv.unwrap_or(1))
        }
        None => {
            let heads = m.usize("attention.head_count")?;
            let kv_heads = m.usize_opt("attention.head_count_kv")?.unwrap_or(heads);
            if heads % kv_heads != 0 {
                return Err(
                    m.err(&m.key("attention.head_count_kv"), format!("{kv_heads} does not divide head_count {heads}"))
                );
            }
            (heads, kv_heads)
        }
    };
    let head_dim = match m.usize_opt("attention.key_length")? {
        Some(d) => d,
        None if layers.is_some() => {
            return Err(m.err(&m.key("attention.key_length"), "missing (the blocks' head counts differ)"))
        }
        None => hidden / heads,
    };
    // Partial rotary (Phi-4-mini): RoPE on the first `rope.dimension_count` of each head.
    let rotary_dim = m.usize_opt("rope.dimension_count")?.unwrap_or(head_dim);
    if rotary_dim > head_dim || rotary_dim % 2 != 0 {
        return Err(m.err(
            &m.key("rope.dimension_count"),
            format!("{rotary_dim} rotary dimensions do not fit a head of {head_dim} in pairs"),
        ));
    }
    let vocab = match m.usize_opt("vocab_size")? {
        Some(v) => v,
        None => f
            .header
            .get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(<[Value]>::len)
            .ok_or_else(|| m.err(&m.key("vocab_size"), "missing, and no tokenizer.ggml.tokens to count"))?,
    };
    // Whether the blocks have a tensor (any block: a DeciLM block may skip attention or MLP).
    let any_block = |t: &str| (0..num_layers).any(|l| has(&format!("blk.{l}.{t}")));
    let dtype = dtype.unwrap_or(DType::F32);
    let mut blocks = family_blocks(&m, fam, num_layers)?;
    let intermediate_size = match &layers {
        Some(v) => super::layer_shapes::widest(v).2,
        None => m.usize("feed_forward_length")?,
    };
    blocks.layers = layers;
    if let (Some(n), Some(keys)) = (experts, fam.moe) {
        blocks.moe = Some(moe_config(&m, &keys, n, hidden, num_layers)?);
    }
    let eps_key = if fam.layer_norm { "attention.layer_norm_epsilon" } else { "attention.layer_norm_rms_epsilon" };
    let max_positions = m.usize_opt("context_length")?.unwrap_or(4096);
    let mut scalars = Scalars {
        // llama.cpp's names for Granite's multipliers (absent for the other families).
        embedding: positive(&m, "embedding_scale")?.unwrap_or(1.0),
        attention: positive(&m, "attention.scale")?,
        residual: positive(&m, "residual_scale")?.unwrap_or(1.0),
        logits_divisor: positive(&m, "logit_scale")?.unwrap_or(1.0),
    };
    if fam.embedding_scale {
        // As the HF importer: √hidden_size rounded to the model's dtype.
        scalars.embedding = autodeploy_core::cpu::round_as(dtype, (hidden as f32).sqrt()) as f64;
    }
    // Gemma 2/3 files do not store `query_pre_attn_scalar`: llama.cpp scales queries by
    // head_dim^-0.5, or (hidden / heads)^-0.5 for the layer counts of the 27B models.
    if scalars.attention.is_none() && fam.gguf_wide_query_layers.contains(&num_layers) {
        scalars.attention = Some(((hidden / heads) as f64).powf(-0.5));
    }
    Ok(DecoderConfig {
        family: fam.name.to_string(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size,
        num_layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
        rotary_dim,
        rms_norm_eps: m.f64_opt(eps_key)?.unwrap_or(1e-5),
        rope_theta: m.f64_opt("rope.freq_base")?.unwrap_or(10000.0),
        rope_scaling: rope_scaling(&m, rotary_dim, max_positions)?,
        max_position_embeddings: max_positions,
        sliding_window: if fam.window == super::families::Window::None {
            None
        } else {
            m.usize_opt("attention.sliding_window")?
        },
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: any_block("attn_q.bias"),
        o_bias: any_block("attn_output.bias"),
        mlp_bias: any_block("ffn_up.bias"),
        qk_norm: any_block("attn_q_norm.weight") || fam.qk_l2_norm.is_some(),
        // Activations in f32 unless asked otherwise; see `weights` for which weights stay quantized.
        dtype,
        weight_dtypes: Default::default(),
        scalars,
        blocks,
    })
}

/// The experts of a MoE file: `expert_count` (checked against the first router tensor's rows
/// before anything is sized from it), `expert_used_count`, `expert_feed_forward_length` (absent:
/// `feed_forward_length`, as Mixtral's), and `expert_weights_norm` (absent: true, as llama.cpp
/// routes these families). A layer is sparse where the file has its router,
/// `blk.N.ffn_gate_inp.weight`; the experts are llama.cpp's stacked `ffn_{gate,up,down}_exps`.
fn moe_config(
    m: &Meta,
    keys: &super::families::MoeKeys,
    n: usize,
    hidden: usize,
    num_layers: usize,
) -> Result<super::decoder::MoeConfig> {
    use super::decoder::ExpertLayout;
    let router = |l: usize| m.f.header.tensor(&format!("blk.{l}.ffn_gate_inp.weight"));
    let sparse_layers: Vec<bool> = (0..num_layers).map(|l| router(l).is_some()).collect();
    let Some(first) = sparse_layers.iter().position(|&s| s) else {
        return Err(m.err(&m.key("expert_count"), format!("{n} experts, but no blk.N.ffn_gate_inp.weight router")));
    };
    let rows = router(first).map(|t| t.shape()).unwrap_or_default();
    if rows != [n, hidden] {
        return Err(m.err(
            &m.key("expert_count"),
            format!("{n} experts, but blk.{first}.ffn_gate_inp.weight is {rows:?}, not [{n}, {hidden}]"),
        ));
    }
    let top_k = m.usize("expert_used_count")?;
    if top_k > n {
        return Err(m.err(&m.key("expert_used_count"), format!("{top_k} is more than the {n} experts")));
    }
    // A family that never renormalises (Llama 4's sigmoid router) does not; the others as the
    // file says, absent: true (as llama.cpp routes them).
    let norm = match (keys.norm, m.opt("expert_weights_norm")) {
        (super::families::Flag::Fixed(false), _) => false,
        (_, None) => true,
        (_, Some(v)) => {
            v.as_bool().ok_or_else(|| m.err(&m.key("expert_weights_norm"), format!("not a boolean: {v:?}")))?
        }
    };
    let intermediate_size = match m.usize_opt("expert_feed_forward_length")? {
        Some(i) => i,
        None => m.usize("feed_forward_length")?,
    };
    Ok(super::decoder::MoeConfig {
        num_experts: n,
        top_k,
        intermediate_size,
        norm,
        weights_f32: keys.weights_f32,
        sparse_layers,
        router: keys.router,
        // llama.cpp stacks every family's experts per projection (`ffn_{gate,up,down}_exps`),
        // sliced per expert (`moe_source`), whatever the checkpoint's own layout.
        layout: ExpertLayout::PerExpert,
        shared: keys.shared,
        names: keys.names,
    })
}

/// LongRoPE (Phi-3/4) where the file carries llama.cpp's `rope_factors_short.weight` (one factor a
/// rotated pair) with `rope.scaling.original_context_length` and, optionally,
/// `rope.scaling.attn_factor` (absent: transformers' default from the two lengths). As from a
/// `config.json`, only the short factors are used and sequences stop at the original length.
fn rope_scaling(m: &Meta, rotary_dim: usize, max_positions: usize) -> Result<RopeScaling> {
    // One positive factor per rotated pair, checked before it is read.
    let factors = |name: &str| -> Result<Option<Vec<f64>>> {
        let Some(t) = m.f.header.tensor(name) else { return Ok(None) };
        if t.shape() != [rotary_dim / 2] {
            return Err(Error::TensorShape {
                file: m.f.path.clone(),
                name: name.into(),
                expected: vec![rotary_dim / 2],
                found: t.shape(),
            });
        }
        let v: Vec<f64> = m.f.dequantize(name)?.into_iter().map(f64::from).collect();
        if let Some(bad) = v.iter().find(|f| !(**f > 0.0 && f.is_finite())) {
            return Err(Error::BadFile { file: m.f.path.clone(), msg: format!("tensor `{name}` holds {bad}") });
        }
        Ok(Some(v))
    };
    // Llama 3.1's scaling, as llama.cpp's converter bakes it: a divisor per frequency.
    if let Some(f) = factors("rope_freqs.weight")? {
        return Ok(RopeScaling::Factors(f));
    }
    let Some(short_factor) = factors("rope_factors_short.weight")? else {
        return Ok(RopeScaling::None);
    };
    let original = m.usize("rope.scaling.original_context_length")?;
    let factor = max_positions as f64 / original as f64;
    let attention_factor = match positive(m, "rope.scaling.attn_factor")? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope { short_factor, original_max_position_embeddings: original, attention_factor })
}

/// Per-layer shapes where llama.cpp writes `head_count`, `head_count_kv` or
/// `feed_forward_length` as lists (OpenELM's layer-wise scaling, DeciLM's heterogeneous blocks):
/// a block with 0 heads has no attention, one with 0 MLP width no MLP (their norms and residual
/// adds go with them). DeciLM's linear replacement of attention (query heads but 0 KV heads) is
/// refused naming the block. `None` where all three are single numbers.
fn layer_shapes(m: &Meta, num_layers: usize) -> Result<Option<Vec<super::decoder::LayerShape>>> {
    let (hk, kk, fk) = ("attention.head_count", "attention.head_count_kv", "feed_forward_length");
    let lists = (
        m.per_layer(hk, num_layers, 1 << 12)?,
        m.per_layer(kk, num_layers, 1 << 12)?,
        m.per_layer(fk, num_layers, super::layer_shapes::MAX_MLP_WIDTH as u64)?,
    );
    if matches!(lists, (None, None, None)) {
        return Ok(None);
    }
    let each = |list: Option<Vec<usize>>, key: &str| -> Result<Vec<usize>> {
        match list {
            Some(v) => Ok(v),
            None => Ok(vec![m.usize(key)?; num_layers]),
        }
    };
    let heads = each(lists.0, hk)?;
    let kv = match lists.1 {
        Some(v) => v,
        None => heads.clone(),
    };
    let ffn = each(lists.2, fk)?;
    (0..num_layers)
        .map(|l| {
            let kv_heads = match (heads[l], kv[l]) {
                (0, _) => None,
                (h, 0) => {
                    return Err(m.err(
                        &m.key(kk),
                        format!("block {l}: {h} query heads and no KV heads (a linear replacement of attention) are not supported yet"),
                    ))
                }
                (h, g) if h % g != 0 => {
                    return Err(m.err(&m.key(kk), format!("block {l}: {g} KV heads do not divide {h} query heads")))
                }
                (_, g) => Some(g),
            };
            let mlp = Some(ffn[l]).filter(|&w| w > 0);
            Ok(super::decoder::LayerShape { heads: heads[l], kv_heads, mlp })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// The block options of a family's GGUF file: what the family entry fixes (Gemma's norms,
/// activation, sandwich norms, q/k norm order), and from the metadata what llama.cpp stores of
/// the rest: soft-caps (`attn_logit_softcapping`, `final_logit_softcapping`). What it does not
/// store takes transformers' defaults for the family, as transformers' own GGUF loading does:
/// the sliding layers' pattern and RoPE base.
fn family_blocks(m: &Meta, fam: &super::families::Family, num_layers: usize) -> Result<BlockOptions> {
    use super::families::Window;
    let (_, act) = fam.activation_key;
    let activation = fam.activations.iter().find(|(n, _)| *n == act).map(|&(_, a)| a).unwrap_or_default();
    let sliding_layers = match fam.window {
        Window::Layers { pattern, .. } => Some((0..num_layers).map(|l| (l + 1) % pattern != 0).collect()),
        _ => None,
    };
    let (attn_softcap, final_softcap) = match fam.softcaps {
        Some(_) => (positive(m, "attn_logit_softcapping")?, positive(m, "final_logit_softcapping")?),
        None => (None, None),
    };
    // Llama 4's blocks as llama.cpp runs its `llama4` files, which store none of it: unless
    // `attention.sliding_window` is 0, every 4th layer has no RoPE and the others attend in
    // chunks, the no-RoPE layers' queries tempered (the released models' values, `LLAMA4_*`);
    // the q/k L2 norm on the RoPE layers.
    use super::families::{LLAMA4_ATTN_SCALE, LLAMA4_CHUNK, LLAMA4_FLOOR_SCALE, LLAMA4_NOPE_INTERVAL};
    let (mut rope_layers, mut attention_chunk, mut query_temperature) = (None, None, None);
    if fam.nope_layers && fam.chunked_attention && m.opt("attention.sliding_window").and_then(Value::as_u64) != Some(0)
    {
        rope_layers = Some((0..num_layers).map(|l| (l + 1) % LLAMA4_NOPE_INTERVAL != 0).collect());
        attention_chunk = Some(LLAMA4_CHUNK);
        query_temperature = Some((LLAMA4_FLOOR_SCALE as f64, LLAMA4_ATTN_SCALE));
    }
    Ok(BlockOptions {
        rope_layers,
        attention_chunk,
        query_temperature,
        qk_norm_ones: fam.qk_l2_norm.is_some(),
        norm_offset: fam.norm_offset,
        activation,
        sandwich_norms: fam.sandwich_norms,
        attn_softcap,
        final_softcap,
        sliding_layers,
        local_rope_theta: fam.local_rope_theta,
        qk_norm_after_transpose: fam.qk_norm_after_transpose,
        layer_norm: fam.layer_norm,
        plain_mlp: fam.plain_mlp,
        ..Default::default()
    })
}

/// GGUF tensor name for an HF tensor name (`sandwich`: Gemma 2/3's four norms a layer, where
/// llama.cpp's `ffn_norm` is the pre-MLP norm and `post_attention_norm` the attention output's).
fn gguf_name(hf: &str, sandwich: bool) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "model.norm.bias" => Some("output_norm.bias"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (module, suffix) = part.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" if sandwich => "post_attention_norm",
        "post_attention_layernorm" => "ffn_norm",
        "pre_feedforward_layernorm" => "ffn_norm",
        "post_feedforward_layernorm" => "post_ffw_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Where a graph weight lives in a GGUF file: a tensor, or `rows` (first, count) of one.
struct Source {
    name: String,
    rows: Option<(usize, usize)>,
}

/// The GGUF source of graph weight `hf` of shape `shape`: its own tensor, or rows of llama.cpp's
/// fused ones (Phi-3's `attn_qkv`, q then k then v; its `ffn_up` of gate then up rows where the
/// file has no `ffn_gate`).
fn source(f: &GgufFile, cfg: &DecoderConfig, hf: &str, shape: &[usize]) -> Option<Source> {
    if let Some(s) = cfg.blocks.moe.as_ref().and_then(|m| moe_source(m, hf)) {
        return Some(s);
    }
    let name = gguf_name(hf, cfg.blocks.sandwich_norms)?;
    let direct = |name: String| Some(Source { name, rows: None });
    let Some((blk, kind, suffix)) = name
        .rsplit_once('.')
        .and_then(|(stem, suffix)| stem.rsplit_once('.').map(|(blk, kind)| (blk, kind, suffix)))
        .filter(|(blk, ..)| blk.starts_with("blk."))
    else {
        return direct(name);
    };
    let has = |n: &str| f.header.tensor(n).is_some();
    let l = block_index(&name)?;
    let (q, kv, i) =
        (cfg.heads(l) * cfg.head_dim, cfg.kv_heads(l).unwrap_or(0) * cfg.head_dim, cfg.mlp_width(l).unwrap_or(0));
    let fused_up = !has(&format!("{blk}.ffn_gate.{suffix}"))
        && f.header.tensor(&format!("{blk}.ffn_up.{suffix}")).is_some_and(|t| t.shape().first() == Some(&(2 * i)));
    let (fused, first) = match kind {
        "attn_q" | "attn_k" | "attn_v" if !has(&name) && has(&format!("{blk}.attn_qkv.{suffix}")) => {
            ("attn_qkv", [0, q, q + kv][["attn_q", "attn_k", "attn_v"].iter().position(|k| *k == kind)?])
        }
        "ffn_gate" if fused_up => ("ffn_up", 0),
        "ffn_up" if fused_up && shape.first() == Some(&i) => ("ffn_up", i),
        _ => return direct(name.clone()),
    };
    let n = *shape.first()?;
    Some(Source { name: format!("{blk}.{fused}.{suffix}"), rows: Some((first, n)) })
}

/// A sparse MLP's router (`ffn_gate_inp`) or expert `e`'s projection: its slice `(e, 1)` of
/// llama.cpp's stacked `ffn_{gate,up,down}_exps` `[experts, out, in]`.
fn moe_source(m: &super::decoder::MoeConfig, hf: &str) -> Option<Source> {
    let (l, rest) = hf.strip_prefix("model.layers.")?.split_once('.')?;
    let rest = rest.strip_prefix(m.names.block)?.strip_prefix('.')?;
    // llama.cpp's name for a projection (`gate`, `up`, `down`).
    let kind = |proj: &str| {
        [(m.names.gate, "gate"), (m.names.up, "up"), (m.names.down, "down")].into_iter().find(|(p, _)| *p == proj)
    };
    // The shared expert (Llama 4's): llama.cpp's `ffn_{gate,up,down}_shexp`.
    if let Some(proj) = m.shared.and_then(|sh| rest.strip_prefix(sh)?.strip_prefix('.')) {
        let (proj, suffix) = proj.split_once('.')?;
        return Some(Source { name: format!("blk.{l}.ffn_{}_shexp.{suffix}", kind(proj)?.1), rows: None });
    }
    if rest.strip_suffix(".weight") == Some(m.names.router) {
        return Some(Source { name: format!("blk.{l}.ffn_gate_inp.weight"), rows: None });
    }
    let (e, proj) = rest.strip_prefix("experts.")?.split_once('.')?;
    let proj = proj.strip_suffix(".weight")?;
    Some(Source { name: format!("blk.{l}.ffn_{}_exps.weight", kind(proj)?.1), rows: Some((e.parse().ok()?, 1)) })
}

/// The block a GGUF tensor belongs to (`blk.3.attn_q.weight`: 3).
fn block_index(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// Undoes llama.cpp's Q/K permutation: `hf[h·hd + j·hd/2 + i] = gguf[h·hd + 2i + j]`, on whole
/// rows of `cols` elements (values, or bytes of quantized blocks).
pub fn unpermute_rows<T: Copy + Default>(v: &[T], heads: usize, rows: usize, cols: usize) -> Vec<T> {
    let hd = rows / heads;
    let mut out = vec![T::default(); v.len()];
    for h in 0..heads {
        for i in 0..hd / 2 {
            for j in 0..2 {
                let dst = h * hd + j * hd / 2 + i;
                let src = h * hd + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn weights(f: &Arc<GgufFile>, cfg: &DecoderConfig) -> Result<WeightStore> {
    let mut store = WeightStore::new(f.path.display().to_string());
    let permute = super::families::family(&cfg.family).is_some_and(|fam| fam.gguf_qk_permuted);
    for (hf, shape) in cfg.expected_weights() {
        // llama.cpp stores Gemma's norm weights as 1 + w (ggml multiplies by the weight).
        let offset = cfg.blocks.norm_offset && hf.ends_with("norm.weight");
        let Source { name: g, rows } =
            source(f, cfg, &hf, &shape).ok_or_else(|| Error::Msg(format!("no GGUF name for tensor `{hf}`")))?;
        let info = f
            .header
            .tensor(&g)
            .ok_or_else(|| Error::MissingTensor { name: g.clone(), where_: f.path.display().to_string() })?;
        let found = info.shape();
        let fits = match rows {
            None => found == shape,
            // Rows of a fused 2-D tensor, or one expert of a stacked 3-D one.
            Some((first, n)) => {
                first + n <= found[0]
                    && ((found.len() == shape.len() && found[1..] == shape[1..]) || (n == 1 && found[1..] == shape[..]))
            }
        };
        if !fits {
            return Err(Error::TensorShape { file: f.path.clone(), name: g, expected: shape, found });
        }
        // The bytes (or values) of the rows this weight takes, out of the tensor's.
        let total_rows = found.first().copied().unwrap_or(1);
        let take = move |len: usize| match rows {
            None => 0..len,
            Some((first, n)) => first * (len / total_rows)..(first + n) * (len / total_rows),
        };
        let heads = match (permute, g.rsplit('.').nth(1), block_index(&g)) {
            (true, Some("attn_q"), Some(l)) => Some(cfg.heads(l)),
            (true, Some("attn_k"), Some(l)) => cfg.kv_heads(l),
            _ => None,
        };
        let (file, name, shp) = (f.clone(), g.clone(), shape.clone());
        let keep = cfg.weight_dtypes.get(&hf).copied();
        let load = Arc::new(move || -> Result<Tensor> {
            let (ty, raw) = file.typed(&name)?;
            let raw = &raw[take(raw.len())];
            if let Some(DType::Block(ty)) = keep {
                let mut bytes = raw.to_vec();
                if let Some(h) = heads {
                    let row_bytes = bytes.len() / shp[0];
                    bytes = unpermute_rows(&bytes, h, shp[0], row_bytes);
                }
                return Tensor::from_blocks(ty, shp.clone(), bytes);
            }
            let mut v = autodeploy_core::gguf::dequantize(ty, raw);
            if offset {
                v.iter_mut().for_each(|x| *x -= 1.0);
            }
            if let Some(h) = heads {
                let rows = shp[0];
                let cols = shp.get(1).copied().unwrap_or(1);
                v = unpermute_rows(&v, h, rows, cols);
            }
            Tensor::from_f32(shp.clone(), v)
        });
        store.add_lazy(&hf, shape, format!("{} tensor `{g}`", f.path.display()), load);
    }
    // Every tensor's type is known and its data lies inside the file: a truncated file fails
    // here, naming a tensor, not when the engine loads.
    for t in &f.header.tensors {
        f.header.tensor_range(f.len(), t).map_err(|msg| Error::BadFile { file: f.path.clone(), msg })?;
    }
    Ok(store)
}

//! The unfused ATen graph of a Llama-style decoder, as `torch.export` of the Hugging Face model
//! gives it (DESIGN.md, boundary 1). Importers of checkpoint formats (HF folders, GGUF) fill in a
//! [`DecoderConfig`] and a weight store with HF tensor names, then call [`build_decoder`].

use std::sync::Arc;

use autodeploy_core::error::Result;
use autodeploy_core::ops::attention::{Scoring, SdpaAttrs};
use autodeploy_core::ops::binary::{ADD, ADD_SCALAR, DIV_SCALAR, MUL, MUL_SCALAR, POW_SCALAR};
use autodeploy_core::ops::layout::Slice;
pub use autodeploy_core::ops::linear::GateAct;
use autodeploy_core::ops::moe::{Moe, Router};
use autodeploy_core::shape::static_shape;
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{DType, Dim, Graph, GraphBuilder, Op, SizeArg, Tensor, ValueId};

#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers' `linear`): every frequency over `factor`.
    Linear {
        factor: f64,
    },
    /// NTK-aware base growth past `original_max_position_embeddings` (transformers' `dynamic`);
    /// up to it the frequencies are the default ones, and the graph's sequences stop there.
    Dynamic {
        factor: f64,
        original_max_position_embeddings: usize,
    },
    /// LongRoPE (Phi-3/4): each frequency over its `short_factor` and cos/sin times
    /// `attention_factor`; transformers switches to the long factors once a sequence passes
    /// `original_max_position_embeddings`, so the graph's sequences stop there (exact below).
    LongRope {
        short_factor: Vec<f64>,
        original_max_position_embeddings: usize,
        attention_factor: f64,
    },
    /// Each frequency divided by its own factor at every position: llama.cpp's
    /// `rope_freqs.weight`, the factors its converter computes from Llama 3.1's scaling.
    Factors(Vec<f64>),
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Architecture hyper-parameters, normalised across checkpoint formats.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// For the graph's history line and dumps.
    pub family: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// RoPE rotates the first `rotary_dim` of each head (`partial_rotary_factor`; `head_dim`
    /// when whole), the rest passes through.
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// Attention window of the sliding layers (every layer unless `blocks.sliding_layers` says
    /// which): each query sees itself and the `w - 1` positions before it. A window as long as
    /// the graph's longest sequence never masks anything and is left out.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3-style RMSNorm of each q and k head before RoPE.
    pub qk_norm: bool,
    /// Compute dtype of activations, and of weights not listed in `weight_dtypes`.
    pub dtype: DType,
    /// Weights kept in another dtype (block-quantized GGUF linears).
    pub weight_dtypes: std::collections::BTreeMap<String, DType>,
    /// Granite's scalars (1 and None elsewhere, and then no node): the embedding times
    /// `embedding_multiplier`, attention scaled by `attention_multiplier` instead of 1/√head_dim,
    /// each residual branch times `residual_multiplier`, the logits over `logits_scaling`.
    pub scalars: Scalars,
    pub blocks: BlockOptions,
}

/// The block variants beyond Llama's (the defaults are Llama's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockOptions {
    /// Gemma's RMSNorm: `x̂ · (1 + w)` in f32, then the cast back (the weights are offsets from 1).
    pub norm_offset: bool,
    /// The gated MLP's activation.
    pub activation: GateAct,
    /// Gemma 2/3: the attention output is normed (`post_attention_layernorm`) before the
    /// residual add, and the MLP runs between `pre_feedforward_layernorm` and
    /// `post_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Attention scores soft-capped at this (`attn_logit_softcapping`).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped at this (`final_logit_softcapping`): `cap · tanh(logits / cap)`.
    pub final_softcap: Option<f64>,
    /// Which layers attend within `sliding_window` (`None`: all of them).
    pub sliding_layers: Option<Vec<bool>>,
    /// The RoPE base of the sliding layers (Gemma 3's `rope_local_base_freq`, unscaled); `None`:
    /// every layer uses `rope_theta` and `rope_scaling`.
    pub local_rope_theta: Option<f64>,
    /// LayerNorm (weight and bias, `aten.layer_norm`) instead of RMSNorm (StarCoder2).
    pub layer_norm: bool,
    /// An ungated MLP, `c_proj(act(c_fc(x)))` (StarCoder2), instead of the gated
    /// `down(act(gate(x)) · up(x))`; its biases are `mlp_bias`.
    pub plain_mlp: bool,
    /// The q/k head norms after the heads' transpose (Gemma 3), not before.
    pub qk_norm_after_transpose: bool,
    /// Mixture-of-experts MLPs on the layers it marks sparse.
    pub moe: Option<MoeConfig>,
    /// Per-layer blocks (DeciLM's `block_configs`); `None`: every layer has attention with
    /// `num_kv_heads` and an MLP of `intermediate_size`.
    pub layers: Option<Vec<LayerShape>>,
    /// Which layers apply RoPE (`None`: all). A layer without RoPE has no q/k norm either
    /// (Llama 4's, the one family with such layers).
    pub rope_layers: Option<Vec<bool>>,
    /// The q/k norms are weightless (Llama 4's L2 norm): the importer adds their weights as
    /// ones instead of reading them.
    pub qk_norm_ones: bool,
    /// Chunked attention on the RoPE layers (Llama 4's `attention_chunk_size`): a query sees
    /// only the positions of its own chunk.
    pub attention_chunk: Option<usize>,
    /// Query temperature on the layers without RoPE (Llama 4's `attn_temperature_tuning`):
    /// (`floor_scale`, `attn_scale`); the query at position p is multiplied in f32 by
    /// `log1p(floor((p + 1) / floor_scale)) · attn_scale + 1`, then rounded to the dtype.
    pub query_temperature: Option<(f64, f64)>,
}

/// One layer's blocks where layers differ: its attention's query and KV heads and its MLP's
/// width, the last two `None` where the layer skips that sub-block (its norm and residual add
/// too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerShape {
    /// Query heads (`num_heads` unless the family's layers differ in it: OpenELM).
    pub heads: usize,
    pub kv_heads: Option<usize>,
    pub mlp: Option<usize>,
}

/// The checkpoint names of a sparse MLP under `model.layers.{l}.`: `{block}.{router}` is the
/// router, `{block}.experts.{e}.{gate|up|down}` the experts' projections (`ExpertLayout::PerExpert`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeNames {
    pub block: &'static str,
    pub router: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

/// How a checkpoint stores a sparse MLP's experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertLayout {
    /// One `[out, in]` tensor an expert and projection, `{block}.experts.{e}.{proj}.weight`.
    PerExpert,
    /// Two tensors a layer stored `[in, out]`: `{block}.experts.gate_up_proj` `[E, H, 2I]` (gate
    /// columns first) and `{block}.experts.down_proj` `[E, I, H]` (Llama 4).
    Fused,
}

/// A mixture-of-experts MLP: a router linear, then `torch_moe` over the experts' weights,
/// stacked (or transposed) at load into `{block}.experts.gate_up_proj.weight` `[E, 2I, H]` (each
/// expert's gate rows, then its up rows) and `{block}.experts.down_proj.weight` `[E, H, I]`;
/// plus a shared expert's MLP where the family has one.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    /// The chosen probabilities divided by their sum.
    pub norm: bool,
    /// The routing weights scale the experts' outputs in f32 (Mixtral), not rounded first.
    pub weights_f32: bool,
    /// Which layers are sparse; the others have the dense MLP of `intermediate_size`.
    pub sparse_layers: Vec<bool>,
    pub router: Router,
    pub layout: ExpertLayout,
    /// The shared expert's block under `{block}.` (`None`: no shared expert).
    pub shared: Option<&'static str>,
    pub names: MoeNames,
}

impl MoeConfig {
    /// The graph's stacked expert weights of layer `l`: (gate_up, down).
    pub fn stacked(&self, l: usize) -> (String, String) {
        let (gu, down) = self.fused(l);
        (format!("{gu}.weight"), format!("{down}.weight"))
    }

    /// A fused checkpoint's expert tensors of layer `l` (`ExpertLayout::Fused`): (gate_up, down).
    pub fn fused(&self, l: usize) -> (String, String) {
        let p = format!("model.layers.{l}.{}.experts", self.names.block);
        (format!("{p}.gate_up_proj"), format!("{p}.down_proj"))
    }

    /// Expert `e`'s checkpoint tensor of projection `proj` in layer `l`.
    pub fn expert(&self, l: usize, e: usize, proj: &str) -> String {
        format!("model.layers.{l}.{}.experts.{e}.{proj}.weight", self.names.block)
    }
}

/// The scalar multipliers some families put on the residual stream (see [`DecoderConfig::scalars`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scalars {
    pub embedding: f64,
    pub attention: Option<f64>,
    pub residual: f64,
    /// The logits are divided by this (`aten.div.Scalar`, as transformers).
    pub logits_divisor: f64,
}

impl Default for Scalars {
    fn default() -> Scalars {
        Scalars { embedding: 1.0, attention: None, residual: 1.0, logits_divisor: 1.0 }
    }
}

/// Name of the RoPE inverse-frequency buffer the importer computes.
pub const INV_FREQ: &str = "model.rotary_emb.inv_freq";
/// The sliding layers' buffer where their base differs (`BlockOptions::local_rope_theta`).
pub const INV_FREQ_LOCAL: &str = "model.rotary_emb_local.inv_freq";

/// One expected weight: name and shape.
pub type WeightSpec = (String, Vec<usize>);

impl DecoderConfig {
    pub fn lm_head_weight(&self) -> &'static str {
        if self.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        }
    }

    /// Every checkpoint tensor the graph reads, with its expected shape.
    pub fn expected_weights(&self) -> Vec<WeightSpec> {
        let (h, hd) = (self.hidden_size, self.head_dim);
        let mut v: Vec<WeightSpec> = vec![("model.embed_tokens.weight".into(), vec![self.vocab_size, h])];
        for l in 0..self.num_layers {
            let q = self.heads(l) * hd;
            let p = format!("model.layers.{l}");
            let mut add = |n: &str, s: Vec<usize>| v.push((format!("{p}.{n}"), s));
            if let Some(kv_heads) = self.kv_heads(l) {
                let kv = kv_heads * hd;
                add("input_layernorm.weight", vec![h]);
                if self.blocks.layer_norm {
                    add("input_layernorm.bias", vec![h]);
                }
                add("self_attn.q_proj.weight", vec![q, h]);
                add("self_attn.k_proj.weight", vec![kv, h]);
                add("self_attn.v_proj.weight", vec![kv, h]);
                if self.qkv_bias {
                    add("self_attn.q_proj.bias", vec![q]);
                    add("self_attn.k_proj.bias", vec![kv]);
                    add("self_attn.v_proj.bias", vec![kv]);
                }
                if self.qk_norm(l) && !self.blocks.qk_norm_ones {
                    add("self_attn.q_norm.weight", vec![hd]);
                    add("self_attn.k_norm.weight", vec![hd]);
                }
                add("self_attn.o_proj.weight", vec![h, q]);
                if self.o_bias {
                    add("self_attn.o_proj.bias", vec![h]);
                }
            }
            let Some(i) = self.mlp_width(l) else { continue };
            add("post_attention_layernorm.weight", vec![h]);
            if self.blocks.layer_norm {
                add("post_attention_layernorm.bias", vec![h]);
            }
            if self.blocks.sandwich_norms {
                add("pre_feedforward_layernorm.weight", vec![h]);
                add("post_feedforward_layernorm.weight", vec![h]);
            }
            if let Some(m) = self.sparse(l) {
                let (b, mi) = (m.names.block, m.intermediate_size);
                add(&format!("{b}.{}.weight", m.names.router), vec![m.num_experts, h]);
                match m.layout {
                    ExpertLayout::PerExpert => {
                        for e in 0..m.num_experts {
                            let projs = [(m.names.gate, [mi, h]), (m.names.up, [mi, h]), (m.names.down, [h, mi])];
                            for (proj, shape) in projs {
                                add(&format!("{b}.experts.{e}.{proj}.weight"), shape.to_vec());
                            }
                        }
                    }
                    ExpertLayout::Fused => {
                        add(&format!("{b}.experts.gate_up_proj"), vec![m.num_experts, h, 2 * mi]);
                        add(&format!("{b}.experts.down_proj"), vec![m.num_experts, mi, h]);
                    }
                }
                if let Some(sh) = m.shared {
                    for (proj, shape) in [("gate_proj", [mi, h]), ("up_proj", [mi, h]), ("down_proj", [h, mi])] {
                        add(&format!("{b}.{sh}.{proj}.weight"), shape.to_vec());
                    }
                }
                continue;
            }
            let mlp: &[(&str, usize, usize)] = if self.blocks.plain_mlp {
                &[("c_fc", i, h), ("c_proj", h, i)]
            } else {
                &[("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]
            };
            for &(name, out, inp) in mlp {
                add(&format!("mlp.{name}.weight"), vec![out, inp]);
                if self.mlp_bias {
                    add(&format!("mlp.{name}.bias"), vec![out]);
                }
            }
        }
        v.push(("model.norm.weight".into(), vec![h]));
        if self.blocks.layer_norm {
            v.push(("model.norm.bias".into(), vec![h]));
        }
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".into(), vec![self.vocab_size, h]));
        }
        v
    }

    /// RoPE inverse frequencies in f32, computed the way transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        self.inv_freq_of(self.rope_theta, &self.rope_scaling)
    }

    fn inv_freq_of(&self, theta: f64, scaling: &RopeScaling) -> Vec<f32> {
        let dim = self.rotary_dim;
        let base = theta as f32;
        let inv: Vec<f32> = (0..dim).step_by(2).map(|i| 1.0 / base.powf(i as f32 / dim as f32)).collect();
        match *scaling {
            RopeScaling::None | RopeScaling::Dynamic { .. } => inv,
            // transformers: 1 / (ext_factors · base^(i/dim)), the product in f32.
            RopeScaling::LongRope { ref short_factor, .. } => (0..dim)
                .step_by(2)
                .zip(short_factor)
                .map(|(i, &f)| 1.0 / (f as f32 * base.powf(i as f32 / dim as f32)))
                .collect(),
            RopeScaling::Linear { factor } => inv.iter().map(|&f| f / factor as f32).collect(),
            RopeScaling::Factors(ref factors) => inv.iter().zip(factors).map(|(&f, &d)| f / d as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let (low_wavelen, high_wavelen) = (old / low, old / high);
                inv.iter()
                    .map(|&f| {
                        let wavelen = (1.0 / f) * (2.0 * std::f64::consts::PI) as f32;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        // Equal factors: no band between the wavelengths to smooth over.
                        if wavelen < high_wavelen || wavelen > low_wavelen || high <= low {
                            return scaled;
                        }
                        let smooth = ((1.0 / wavelen) * old - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    })
                    .collect()
            }
        }
    }

    /// Layer `l`'s query heads.
    pub fn heads(&self, l: usize) -> usize {
        self.blocks.layers.as_ref().and_then(|v| v.get(l)).map_or(self.num_heads, |s| s.heads)
    }

    /// Layer `l`'s KV heads, or `None` where it has no attention (DeciLM's no-op blocks).
    pub fn kv_heads(&self, l: usize) -> Option<usize> {
        match &self.blocks.layers {
            Some(v) => v.get(l).and_then(|s| s.kv_heads),
            None => Some(self.num_kv_heads),
        }
    }

    /// Layer `l`'s MLP width, or `None` where it has no MLP.
    pub fn mlp_width(&self, l: usize) -> Option<usize> {
        match &self.blocks.layers {
            Some(v) => v.get(l).and_then(|s| s.mlp),
            None => Some(self.intermediate_size),
        }
    }

    /// Whether layer `l` applies RoPE.
    pub fn rope(&self, l: usize) -> bool {
        self.blocks.rope_layers.as_ref().is_none_or(|v| v.get(l) != Some(&false))
    }

    /// Whether layer `l` norms its q and k heads (never where it has no RoPE).
    pub fn qk_norm(&self, l: usize) -> bool {
        self.qk_norm && self.rope(l)
    }

    /// Layer `l`'s mixture of experts, where its MLP is sparse.
    pub fn sparse(&self, l: usize) -> Option<&MoeConfig> {
        self.blocks.moe.as_ref().filter(|m| m.sparse_layers.get(l) == Some(&true))
    }

    /// Whether layer `l` attends within `sliding_window`.
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_window.is_some() && self.blocks.sliding_layers.as_ref().is_none_or(|s| s.get(l) == Some(&true))
    }

    /// Layer `l`'s window in a graph of sequences up to `max_seq` (none where it masks nothing).
    pub fn window(&self, l: usize, max_seq: usize) -> Option<usize> {
        self.sliding_window.filter(|&w| self.is_sliding(l) && w < max_seq)
    }

    /// Longest sequence the graph accepts.
    pub fn max_seq(&self, max_seq_len: usize) -> usize {
        let mut m = max_seq_len.min(self.max_position_embeddings);
        if let RopeScaling::Dynamic { original_max_position_embeddings: o, .. }
        | RopeScaling::LongRope { original_max_position_embeddings: o, .. } = self.rope_scaling
        {
            m = m.min(o);
        }
        m
    }
}

struct Ctx<'a> {
    b: GraphBuilder,
    cfg: &'a DecoderConfig,
    /// The query temperature `[batch, 1, seq, 1]` (f32) of the layers without RoPE, where the
    /// model has one (`BlockOptions::query_temperature`).
    temperature: Option<ValueId>,
    batch: Dim,
    seq: Dim,
    /// The graph's longest sequence.
    max_seq: usize,
}

impl Ctx<'_> {
    fn w(&mut self, name: &str, shape: &[usize]) -> ValueId {
        let dtype = self.cfg.weight_dtypes.get(name).copied().unwrap_or(self.cfg.dtype);
        self.b.param(name, dtype, static_shape(shape))
    }

    fn linear(&mut self, hint: &str, x: ValueId, prefix: &str, out: usize, inp: usize, bias: bool) -> Result<ValueId> {
        let w = self.w(&format!("{prefix}.weight"), &[out, inp]);
        let mut args = vec![x, w];
        if bias {
            args.push(self.w(&format!("{prefix}.bias"), &[out]));
        }
        self.b.op(hint, Op::linear(), &args)
    }

    /// transformers' RMSNorm: upcast to f32, x * rsqrt(mean(x²) + eps), back to the input
    /// dtype, times the weight; Gemma's (`norm_offset`): times `1 + w` in f32, then back.
    fn rmsnorm(&mut self, hint: &str, x: ValueId, weight: &str, dim: usize) -> Result<ValueId> {
        if self.cfg.blocks.layer_norm {
            // nn.LayerNorm(dim, eps): one op in an export (the bias beside the weight).
            let w = self.w(weight, &[dim]);
            let b = self.w(&format!("{}.bias", weight.strip_suffix(".weight").unwrap_or(weight)), &[dim]);
            return self.b.op(hint, Op::layer_norm(self.cfg.rms_norm_eps), &[x, w, b]);
        }
        let in_dtype = self.b.meta(x).dtype;
        let xf = if in_dtype != DType::F32 {
            self.b.op(&format!("{hint}.to_f32"), Op::to_dtype(DType::F32), &[x])?
        } else {
            x
        };
        let sq = self.b.op(&format!("{hint}.pow"), Op::scalar(POW_SCALAR, 2.0), &[xf])?;
        let var = self.b.op(&format!("{hint}.mean"), Op::mean(vec![-1], true), &[sq])?;
        let ve = self.b.op(&format!("{hint}.add_eps"), Op::scalar(ADD_SCALAR, self.cfg.rms_norm_eps), &[var])?;
        let r = self.b.op(&format!("{hint}.rsqrt"), Op::unary("aten.rsqrt"), &[ve])?;
        let y = self.b.op(&format!("{hint}.normed"), Op::binary(MUL), &[xf, r])?;
        if self.cfg.blocks.norm_offset {
            let w = self.w(weight, &[dim]);
            let wf = if self.b.meta(w).dtype != DType::F32 {
                self.b.op(&format!("{hint}.w_f32"), Op::to_dtype(DType::F32), &[w])?
            } else {
                w
            };
            let w1 = self.b.op(&format!("{hint}.one_plus_w"), Op::scalar(ADD_SCALAR, 1.0), &[wf])?;
            let y = self.b.op(&format!("{hint}.scaled"), Op::binary(MUL), &[y, w1])?;
            return if in_dtype != DType::F32 { self.b.op(hint, Op::to_dtype(in_dtype), &[y]) } else { Ok(y) };
        }
        let y = if in_dtype != DType::F32 {
            self.b.op(&format!("{hint}.to_in"), Op::to_dtype(in_dtype), &[y])?
        } else {
            y
        };
        let w = self.w(weight, &[dim]);
        self.b.op(hint, Op::binary(MUL), &[w, y])
    }

    fn rotate_half(&mut self, hint: &str, x: ValueId) -> Result<ValueId> {
        let half = self.cfg.rotary_dim as i64 / 2;
        let x1 = self.b.op(&format!("{hint}.x1"), Op::slice(Slice::new(-1, 0, half)), &[x])?;
        let x2 = self.b.op(&format!("{hint}.x2"), Op::slice(Slice::new(-1, half, i64::MAX)), &[x])?;
        let n2 = self.b.op(&format!("{hint}.neg"), Op::unary("aten.neg"), &[x2])?;
        self.b.op(hint, Op::cat(-1), &[n2, x1])
    }

    /// `x · s` (nothing when `s` is 1).
    fn scale(&mut self, hint: &str, x: ValueId, s: f64) -> Result<ValueId> {
        if s == 1.0 {
            return Ok(x);
        }
        self.b.op(hint, Op::scalar(MUL_SCALAR, s), &[x])
    }

    /// cos and sin of `pos_f32 · inv_freq` (buffer `buffer` of `half` values), in the model's dtype.
    fn rope_tables(&mut self, hint: &str, buffer: &str, half: usize, pos_f32: ValueId) -> Result<(ValueId, ValueId)> {
        let inv_freq = self.b.param(buffer, DType::F32, static_shape(&[half]));
        let freqs = self.b.op(&format!("{hint}.freqs"), Op::binary(MUL), &[pos_f32, inv_freq])?;
        let emb = self.b.op(&format!("{hint}.emb"), Op::cat(-1), &[freqs, freqs])?;
        let mut cs = Vec::new();
        for (name, op) in [("cos", Op::unary("aten.cos")), ("sin", Op::unary("aten.sin"))] {
            let t = self.b.op(&format!("{hint}.{name}_f32"), op, &[emb])?;
            // attention_scaling: 1.0 for the default, linear, dynamic and llama3 RoPE types.
            let scale = match self.cfg.rope_scaling {
                RopeScaling::LongRope { attention_factor, .. } => attention_factor,
                _ => 1.0,
            };
            let t = self.b.op(&format!("{hint}.{name}_scaled"), Op::scalar(MUL_SCALAR, scale), &[t])?;
            let dtype = self.cfg.dtype;
            let t =
                if dtype != DType::F32 { self.b.op(&format!("{hint}.{name}"), Op::to_dtype(dtype), &[t])? } else { t };
            cs.push(t);
        }
        Ok((cs[0], cs[1]))
    }

    fn apply_rope(&mut self, hint: &str, x: ValueId, cos: ValueId, sin: ValueId) -> Result<ValueId> {
        let (rd, hd) = (self.cfg.rotary_dim as i64, self.cfg.head_dim as i64);
        // Partial rotary: transformers rotates `x[..., :rotary_dim]` and concatenates the rest.
        let (xr, pass) = if rd < hd {
            let r = self.b.op(&format!("{hint}.x_rot"), Op::slice(Slice::new(-1, 0, rd)), &[x])?;
            let p = self.b.op(&format!("{hint}.x_pass"), Op::slice(Slice::new(-1, rd, i64::MAX)), &[x])?;
            (r, Some(p))
        } else {
            (x, None)
        };
        let xc = self.b.op(&format!("{hint}.mul_cos"), Op::binary(MUL), &[xr, cos])?;
        let rot = self.rotate_half(&format!("{hint}.rot"), xr)?;
        let rs = self.b.op(&format!("{hint}.mul_sin"), Op::binary(MUL), &[rot, sin])?;
        match pass {
            None => self.b.op(hint, Op::binary(ADD), &[xc, rs]),
            Some(p) => {
                let y = self.b.op(&format!("{hint}.rotated"), Op::binary(ADD), &[xc, rs])?;
                self.b.op(hint, Op::cat(-1), &[y, p])
            }
        }
    }

    /// `x.view(batch, seq, -1, head_dim)` then optional per-head norm, then `transpose(1, 2)`.
    fn heads(&mut self, hint: &str, x: ValueId, norm: Option<&str>) -> Result<ValueId> {
        let sizes = vec![
            SizeArg::Dim(self.batch.clone()),
            SizeArg::Dim(self.seq.clone()),
            SizeArg::Infer,
            SizeArg::Dim(Dim::new(self.cfg.head_dim)),
        ];
        let v = self.b.op(&format!("{hint}.view"), Op::view(sizes), &[x])?;
        let after = self.cfg.blocks.qk_norm_after_transpose;
        let v = match norm {
            Some(w) if !after => self.rmsnorm(&format!("{hint}.norm"), v, w, self.cfg.head_dim)?,
            _ => v,
        };
        let t = self.b.op(&format!("{hint}.t"), Op::transpose(1, 2), &[v])?;
        match norm {
            Some(w) if after => self.rmsnorm(&format!("{hint}.norm"), t, w, self.cfg.head_dim),
            _ => Ok(t),
        }
    }

    /// Layer `l`: attention and MLP sub-blocks, each added to the residual stream `h`, each
    /// left out where the layer has none.
    fn layer(&mut self, l: usize, h: ValueId, tables: (ValueId, ValueId)) -> Result<ValueId> {
        let h = match self.cfg.kv_heads(l) {
            Some(kv) => self.attention(l, kv, h, tables)?,
            None => h,
        };
        match self.cfg.mlp_width(l) {
            Some(is) => self.mlp(l, is, h),
            None => Ok(h),
        }
    }

    fn attention(&mut self, l: usize, kv_heads: usize, h: ValueId, (cos, sin): (ValueId, ValueId)) -> Result<ValueId> {
        let c = self.cfg;
        let (hs, hd, heads) = (c.hidden_size, c.head_dim, c.heads(l));
        let p = format!("model.layers.{l}");
        let n = format!("l{l}");
        let x = self.rmsnorm(&format!("{n}.input_norm"), h, &format!("{p}.input_layernorm.weight"), hs)?;
        let q = self.linear(&format!("{n}.q_proj"), x, &format!("{p}.self_attn.q_proj"), heads * hd, hs, c.qkv_bias)?;
        let k =
            self.linear(&format!("{n}.k_proj"), x, &format!("{p}.self_attn.k_proj"), kv_heads * hd, hs, c.qkv_bias)?;
        let v =
            self.linear(&format!("{n}.v_proj"), x, &format!("{p}.self_attn.v_proj"), kv_heads * hd, hs, c.qkv_bias)?;
        let (qn, kn) = (format!("{p}.self_attn.q_norm.weight"), format!("{p}.self_attn.k_norm.weight"));
        let q = self.heads(&format!("{n}.q"), q, c.qk_norm(l).then_some(qn.as_str()))?;
        let k = self.heads(&format!("{n}.k"), k, c.qk_norm(l).then_some(kn.as_str()))?;
        let v = self.heads(&format!("{n}.v"), v, None)?;
        let (q, k) = if c.rope(l) {
            let cos_u = self.b.op(&format!("{n}.cos"), Op::unsqueeze(1), &[cos])?;
            let sin_u = self.b.op(&format!("{n}.sin"), Op::unsqueeze(1), &[sin])?;
            let q = self.apply_rope(&format!("{n}.q_rope"), q, cos_u, sin_u)?;
            (q, self.apply_rope(&format!("{n}.k_rope"), k, cos_u, sin_u)?)
        } else if let Some(t) = self.temperature {
            // The query in f32 times its position's temperature, rounded back.
            let q32 = if c.dtype == DType::F32 {
                q
            } else {
                self.b.op(&format!("{n}.q_f32"), Op::to_dtype(DType::F32), &[q])?
            };
            let q = self.b.op(&format!("{n}.q_temp"), Op::binary(MUL), &[q32, t])?;
            let q = if c.dtype == DType::F32 {
                q
            } else {
                self.b.op(&format!("{n}.q_tempered"), Op::to_dtype(c.dtype), &[q])?
            };
            (q, k)
        } else {
            (q, k)
        };
        let chunk = c.blocks.attention_chunk.filter(|&ch| c.rope(l) && ch < self.max_seq);
        let sdpa = Op::sdpa(SdpaAttrs {
            is_causal: true,
            scale: Some(c.scalars.attention.unwrap_or((hd as f64).powf(-0.5))),
            enable_gqa: kv_heads != heads,
            scoring: Scoring { window: c.window(l, self.max_seq), chunk, softcap: c.blocks.attn_softcap, kv_fp8: None },
        });
        let a = self.b.op(&format!("{n}.attn"), sdpa, &[q, k, v])?;
        let a = self.b.op(&format!("{n}.attn.t"), Op::transpose(1, 2), &[a])?;
        let flat = vec![SizeArg::Dim(self.batch.clone()), SizeArg::Dim(self.seq.clone()), SizeArg::Infer];
        let a = self.b.op(&format!("{n}.attn.flat"), Op::reshape(flat), &[a])?;
        let o = self.linear(&format!("{n}.o_proj"), a, &format!("{p}.self_attn.o_proj"), hs, heads * hd, c.o_bias)?;
        let o = self.scale(&format!("{n}.o_scaled"), o, c.scalars.residual)?;
        let sandwich = c.blocks.sandwich_norms;
        let post_attn = format!("{p}.post_attention_layernorm.weight");
        let o = if sandwich { self.rmsnorm(&format!("{n}.post_attn_norm"), o, &post_attn, hs)? } else { o };
        self.b.op(&format!("{n}.attn_residual"), Op::binary(ADD), &[h, o])
    }

    /// The MLP activation as its ATen op.
    fn act_op(&self) -> Result<Op> {
        Ok(match self.cfg.blocks.activation {
            GateAct::Silu => Op::unary("aten.silu"),
            GateAct::GeluTanh => autodeploy_core::custom_op::op("aten.gelu", "approximate=tanh")?,
            GateAct::Gelu => autodeploy_core::custom_op::op("aten.gelu", "approximate=none")?,
        })
    }

    /// `down(act(gate(x)) · up(x))` over `{prefix}.{gate,up,down}_proj` (biases: `mlp_bias`).
    fn gated_mlp(&mut self, n: &str, x: ValueId, prefix: &str, is: usize) -> Result<ValueId> {
        let c = self.cfg;
        let hs = c.hidden_size;
        let act = self.act_op()?;
        let g = self.linear(&format!("{n}.gate_proj"), x, &format!("{prefix}.gate_proj"), is, hs, c.mlp_bias)?;
        let u = self.linear(&format!("{n}.up_proj"), x, &format!("{prefix}.up_proj"), is, hs, c.mlp_bias)?;
        let g = self.b.op(&format!("{n}.act"), act, &[g])?;
        let m = self.b.op(&format!("{n}.act_mul"), Op::binary(MUL), &[g, u])?;
        self.linear(&format!("{n}.down_proj"), m, &format!("{prefix}.down_proj"), hs, is, c.mlp_bias)
    }

    fn mlp(&mut self, l: usize, is: usize, h: ValueId) -> Result<ValueId> {
        let c = self.cfg;
        let hs = c.hidden_size;
        let p = format!("model.layers.{l}");
        let n = format!("l{l}");
        let sandwich = c.blocks.sandwich_norms;
        let post_attn = format!("{p}.post_attention_layernorm.weight");
        let x = if sandwich {
            self.rmsnorm(&format!("{n}.pre_mlp_norm"), h, &format!("{p}.pre_feedforward_layernorm.weight"), hs)?
        } else {
            self.rmsnorm(&format!("{n}.post_attn_norm"), h, &post_attn, hs)?
        };
        let d = if let Some(m) = c.sparse(l) {
            let block = format!("{p}.{}", m.names.block);
            let router = format!("{block}.{}", m.names.router);
            let r = self.linear(&format!("{n}.router"), x, &router, m.num_experts, hs, false)?;
            let (gu, dw) = m.stacked(l);
            let gu = self.w(&gu, &[m.num_experts, 2 * m.intermediate_size, hs]);
            let dw = self.w(&dw, &[m.num_experts, hs, m.intermediate_size]);
            let (act, top_k, norm, weights_f32) = (c.blocks.activation, m.top_k, m.norm, m.weights_f32);
            let op = Op::moe(Moe {
                top_k,
                norm,
                act,
                weights_f32,
                router: m.router,
                expert_offset: None,
                router_weight: false,
            });
            let routed = self.b.op(&format!("{n}.moe"), op, &[x, r, gu, dw])?;
            match m.shared {
                // transformers: out = shared_expert(x); out.add_(routed).
                Some(sh) => {
                    let s = self.gated_mlp(&format!("{n}.shared"), x, &format!("{block}.{sh}"), m.intermediate_size)?;
                    self.b.op(&format!("{n}.moe_sum"), Op::binary(ADD), &[s, routed])?
                }
                None => routed,
            }
        } else if c.blocks.plain_mlp {
            let f = self.linear(&format!("{n}.c_fc"), x, &format!("{p}.mlp.c_fc"), is, hs, c.mlp_bias)?;
            let act = self.act_op()?;
            let a = self.b.op(&format!("{n}.act"), act, &[f])?;
            self.linear(&format!("{n}.c_proj"), a, &format!("{p}.mlp.c_proj"), hs, is, c.mlp_bias)?
        } else {
            self.gated_mlp(&n, x, &format!("{p}.mlp"), is)?
        };
        let d = self.scale(&format!("{n}.down_scaled"), d, c.scalars.residual)?;
        let d = if sandwich {
            self.rmsnorm(&format!("{n}.post_mlp_norm"), d, &format!("{p}.post_feedforward_layernorm.weight"), hs)?
        } else {
            d
        };
        self.b.op(&format!("{n}.mlp_residual"), Op::binary(ADD), &[h, d])
    }
}

/// Builds the graph `(input_ids, position_ids) -> logits`. The store must hold every tensor of
/// [`DecoderConfig::expected_weights`]; this adds the RoPE buffer itself.
pub fn build_decoder(
    cfg: &DecoderConfig,
    mut store: WeightStore,
    max_batch: usize,
    max_seq_len: usize,
) -> Result<Graph> {
    let inv = cfg.inv_freq();
    let half = inv.len();
    store.add_tensor(INV_FREQ, Tensor::from_f32(vec![half], inv)?);
    if let Some(theta) = cfg.blocks.local_rope_theta {
        store.add_tensor(INV_FREQ_LOCAL, Tensor::from_f32(vec![half], cfg.inv_freq_of(theta, &RopeScaling::None))?);
    }
    if cfg.blocks.qk_norm_ones {
        let ones = Tensor::from_f32(vec![cfg.head_dim], vec![1.0; cfg.head_dim])?;
        for l in (0..cfg.num_layers).filter(|&l| cfg.qk_norm(l) && cfg.kv_heads(l).is_some()) {
            for which in ["q_norm", "k_norm"] {
                store.add_tensor(&format!("model.layers.{l}.self_attn.{which}.weight"), ones.clone());
            }
        }
    }
    for (l, m) in (0..cfg.num_layers).filter_map(|l| cfg.sparse(l).map(|m| (l, m))) {
        let (gu, down) = m.stacked(l);
        if m.layout == ExpertLayout::Fused {
            let (fgu, fdown) = m.fused(l);
            store.add_transposed(&gu, &fgu)?;
            store.add_transposed(&down, &fdown)?;
            continue;
        }
        let experts = 0..m.num_experts;
        let gate_up: Vec<Vec<String>> =
            experts.clone().map(|e| vec![m.expert(l, e, m.names.gate), m.expert(l, e, m.names.up)]).collect();
        let downs: Vec<Vec<String>> = experts.map(|e| vec![m.expert(l, e, m.names.down)]).collect();
        for (name, groups) in [(gu, gate_up), (down, downs)] {
            let (dtype, _) = store.stored_meta(&groups[0][0])?;
            store.add_stacked(&name, &groups, dtype)?;
        }
    }
    let mut b = GraphBuilder::new(Arc::new(store));
    let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
    let max_seq = cfg.max_seq(max_seq_len);
    b.symbol("batch", 1, max_batch);
    b.symbol("seq", 1, max_seq);
    let ids = b.input("input_ids", DType::I64, vec![batch.clone(), seq.clone()]);
    let pos = b.input("position_ids", DType::I64, vec![batch.clone(), seq.clone()]);
    let mut cx = Ctx { b, cfg, temperature: None, batch, seq, max_seq };

    let emb_w = cx.w("model.embed_tokens.weight", &[cfg.vocab_size, cfg.hidden_size]);
    let h = cx.b.op("embed", Op::embedding(), &[emb_w, ids])?;
    let mut h = cx.scale("embed_scaled", h, cfg.scalars.embedding)?;

    // Rotary embedding, once for all layers (and once more for the sliding layers where their
    // base differs): freqs = position_ids[..., None].float() * inv_freq.
    let p = cx.b.op("rope.pos", Op::unsqueeze(-1), &[pos])?;
    let p = cx.b.op("rope.pos_f32", Op::to_dtype(DType::F32), &[p])?;
    let global = cx.rope_tables("rope", INV_FREQ, half, p)?;
    if let Some((floor_scale, attn_scale)) =
        cfg.blocks.query_temperature.filter(|_| (0..cfg.num_layers).any(|l| !cfg.rope(l)))
    {
        // log1p(floor((p + 1) / floor_scale)) · attn_scale + 1, as transformers' Llama 4.
        let t = cx.b.op("temp.p1", Op::scalar(ADD_SCALAR, 1.0), &[p])?;
        let t = cx.b.op("temp.div", Op::scalar(DIV_SCALAR, floor_scale), &[t])?;
        let t = cx.b.op("temp.floor", Op::unary("aten.floor"), &[t])?;
        let t = cx.b.op("temp.log1p", Op::unary("aten.log1p"), &[t])?;
        let t = cx.b.op("temp.scaled", Op::scalar(MUL_SCALAR, attn_scale), &[t])?;
        let t = cx.b.op("temp.plus1", Op::scalar(ADD_SCALAR, 1.0), &[t])?;
        cx.temperature = Some(cx.b.op("temperature", Op::unsqueeze(1), &[t])?);
    }
    let local = match cfg.blocks.local_rope_theta {
        Some(_) => Some(cx.rope_tables("rope_local", INV_FREQ_LOCAL, half, p)?),
        None => None,
    };
    for l in 0..cfg.num_layers {
        let tables = match local {
            Some(t) if cfg.is_sliding(l) => t,
            _ => global,
        };
        h = cx.layer(l, h, tables)?;
    }
    let h = cx.rmsnorm("final_norm", h, "model.norm.weight", cfg.hidden_size)?;
    let lm = cx.w(cfg.lm_head_weight(), &[cfg.vocab_size, cfg.hidden_size]);
    let plain = cfg.scalars.logits_divisor == 1.0 && cfg.blocks.final_softcap.is_none();
    let mut logits = cx.b.op(if plain { "logits" } else { "lm_head" }, Op::linear(), &[h, lm])?;
    if cfg.scalars.logits_divisor != 1.0 {
        // transformers: logits / logits_scaling.
        let last = cfg.blocks.final_softcap.is_none();
        let name = if last { "logits" } else { "lm_head.scaled" };
        logits = cx.b.op(name, Op::scalar(DIV_SCALAR, cfg.scalars.logits_divisor), &[logits])?;
    }
    if let Some(cap) = cfg.blocks.final_softcap {
        // transformers: logits / cap, tanh, * cap.
        let d = cx.b.op("lm_head.capped", Op::scalar(DIV_SCALAR, cap), &[logits])?;
        let t = cx.b.op("lm_head.tanh", Op::unary("aten.tanh"), &[d])?;
        logits = cx.b.op("logits", Op::scalar(MUL_SCALAR, cap), &[t])?;
    }
    cx.b.output(logits);
    cx.b.note(format!(
        "import: {} decoder, {} layers, hidden {}, heads {}/{} (kv), head_dim {}, dtype {}",
        cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.dtype
    ));
    cx.b.finish()
}

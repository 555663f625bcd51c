//! Uncached attention and its parts, each defined once here and registered in the op table:
//! `aten.matmul` (broadcast batch dims), `aten.scaled_dot_product_attention`
//! (`is_causal=true, scale=0.125, enable_gqa=true`; `[batch, heads, seq, head_dim]`) and the
//! canonical `torch_attention` the matchers make from either form (`causal=true, scale=0.125`;
//! k/v may have fewer heads). CPU kernels only: the `cache_init` stage turns matched attention
//! into cached attention, which is what runs on CUDA. Graphs build them with [`Op::matmul`],
//! [`Op::sdpa`] and [`Op::attention`]; matchers read them with [`Op::sdpa_attrs`] and
//! [`Op::attention_attrs`]. `causal_mask(scores)` (`window=8` optional) is the eager form's
//! mask: an export's additive attention mask the torch-export importer evaluated and
//! recognised as causal (or a sliding window), so the eager pattern can become causal attention.

use std::sync::Arc;

use autodeploy_kernels::cpu as k;

use crate::custom_op::{CustomOp, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::mutation::{self, Mutation};
use crate::op_text::read_attrs;
use crate::ops::norm::NormAttrs;
use crate::ops::quant_linear::codes_out;
use crate::ops::{broadcast_shapes, no_attrs, Op};
use crate::tensor::Tensor;

pub const MATMUL: &str = "aten.matmul";
pub const SDPA: &str = "aten.scaled_dot_product_attention";
pub const ATTENTION: &str = "torch_attention";
pub const CACHED_ATTENTION: &str = "attention_with_kv_cache";
pub const CAUSAL_MASK: &str = "causal_mask";

/// What a sliding-window mask and soft-capping add to causal attention; carried by SDPA (where
/// an export has an attention-mask tensor the importer recognised as a sliding window, or the
/// tanh soft-cap of the eager form), by `torch_attention` and by the cached op, so both
/// attention backends see them (`window=4096, softcap=50.0`; absent: none).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Scoring {
    /// Each query sees itself and the `window - 1` positions before it (causal only).
    pub window: Option<usize>,
    /// Each query sees only the positions of its own chunk of `chunk`, from ⌊p / chunk⌋·chunk
    /// to itself (causal only; Llama 4's chunked attention).
    pub chunk: Option<usize>,
    /// Scores become `softcap · tanh(score / softcap)` before the mask.
    pub softcap: Option<f64>,
    /// K and V go through an FP8 (E4M3) KV cache at these `(k_scale, v_scale)` (`k_scale=..,
    /// v_scale=..`): attention reads each as `e4m3(x / scale) · scale` (k after RoPE), cached
    /// or not, so both paths compute the same. Set by `quantize_fp8_kv_cache`.
    pub kv_fp8: Option<(f64, f64)>,
}

impl Scoring {
    fn read(a: &mut crate::op_text::Attrs<'_>) -> crate::error::Result<Scoring> {
        let window = match a.opt_int("window")? {
            Some(w) if w >= 1 => Some(w as usize),
            Some(w) => return Err(a.bad("window", &w.to_string(), "a positive number of positions")),
            None => None,
        };
        let chunk = match a.opt_int("chunk")? {
            Some(c) if c >= 1 => Some(c as usize),
            Some(c) => return Err(a.bad("chunk", &c.to_string(), "a positive number of positions")),
            None => None,
        };
        let softcap = match a.opt_f64("softcap")? {
            Some(c) if c > 0.0 && c.is_finite() => Some(c),
            Some(c) => return Err(a.bad("softcap", &c.to_string(), "a positive number")),
            None => None,
        };
        let positive = |a: &mut crate::op_text::Attrs<'_>, key: &str| -> crate::error::Result<Option<f64>> {
            match a.opt_f64(key)? {
                Some(s) if s > 0.0 && s.is_finite() => Ok(Some(s)),
                Some(s) => Err(a.bad(key, &s.to_string(), "a positive number")),
                None => Ok(None),
            }
        };
        let kv_fp8 = match (positive(a, "k_scale")?, positive(a, "v_scale")?) {
            (Some(k), Some(v)) => Some((k, v)),
            (None, None) => None,
            (Some(_), None) => return Err(a.missing("v_scale")),
            (None, Some(_)) => return Err(a.missing("k_scale")),
        };
        Ok(Scoring { window, chunk, softcap, kv_fp8 })
    }

    fn text(&self) -> String {
        let mut s = String::new();
        if let Some(w) = self.window {
            s.push_str(&format!(", window={w}"));
        }
        if let Some(c) = self.chunk {
            s.push_str(&format!(", chunk={c}"));
        }
        if let Some(c) = self.softcap {
            s.push_str(&format!(", softcap={c:?}"));
        }
        if let Some((k, v)) = self.kv_fp8 {
            s.push_str(&format!(", k_scale={k:?}, v_scale={v:?}"));
        }
        s
    }

    /// The CPU kernels' description of the scores.
    pub fn scores(&self, scale: f32, causal: bool) -> k::Scores {
        k::Scores {
            scale,
            causal,
            window: self.window,
            chunk: self.chunk,
            softcap: self.softcap.map(|c| c as f32),
            kv_fp8: self.kv_fp8.map(|(k, v)| (k as f32, v as f32)),
        }
    }

    pub fn is_plain(&self) -> bool {
        *self == Scoring::default()
    }
}

/// `attention_with_kv_cache(q, k, v[, cos, sin[, q_norm_w, k_norm_w]][, out_scale])` for layer `layer`:
/// writes k/v of this step's tokens into the paged cache, then attends each token to its
/// sequence's cached prefix, through the attention backend `backend` (its kernels are the
/// backend's, with the step's batch metadata and KV cache: no CPU or CUDA kernel of the op table
/// runs it). Tokens of all sequences are flattened into `seq` (batch 1).
#[derive(Clone, Debug, PartialEq)]
pub struct CachedAttn {
    pub backend: String,
    pub layer: usize,
    pub scale: f64,
    /// `(q, k, v, cos, sin)`: q and k arrive unrotated and the op applies RoPE (rotate-half, as
    /// `torch_rope_with_explicit_cos_sin`) before writing k and attending; the
    /// `fuse_rope_attention` transform makes it, so the CUDA executor rotates, writes the cache
    /// and attends in one kernel.
    pub rope: bool,
    /// With `rope`: `(q, k, v, cos, sin, q_norm_w, k_norm_w)`, each head row of q and k
    /// RMS-normalised over the head dim before its RoPE, as `torch_rmsnorm` with these
    /// attributes computes it (`qk_norm_eps=1e-6, qk_norm_dtype=bf16`; the norm's dtype is the
    /// model's, the weights `[head_dim]` of the model's dtype): the q/k norms of Qwen3,
    /// Qwen3-MoE, OpenELM and Llama 4 (Gemma 3's where it runs in f32). The
    /// `fuse_qk_norm_attention` transform makes it, so the CUDA executor's fused RoPE kernels
    /// normalise too instead of two more launches a layer.
    pub qk_norm: Option<NormAttrs>,
    pub scoring: Scoring,
    /// `quant=fp8`: the output as E4M3 codes (`f8e4m3`) of the value rounded to q's dtype
    /// divided by the last input's scale (one f32), the codes `torch_quant_fp8_linear` makes of
    /// its input at that scale. The `fuse_fp8_attention_out` transform sets it where FP8
    /// linears alone read the output (through views: ModelOpt's o_proj), so the CUDA executor
    /// writes a byte a value and the linear quantizes nothing.
    pub fp8_out: bool,
}

impl CachedAttn {
    fn text(&self) -> String {
        let r = if self.rope { ", rope=true" } else { "" };
        let n = match self.qk_norm {
            Some(n) => format!(", qk_norm_eps={:?}, qk_norm_dtype={}", n.eps, n.norm_dtype),
            None => String::new(),
        };
        format!(
            "backend={}, layer={}, scale={:?}{r}{n}{}{}",
            self.backend,
            self.layer,
            self.scale,
            self.scoring.text(),
            codes_out::text(self.fp8_out)
        )
    }

    /// The inputs the op takes: q, k, v; cos, sin with `rope`; the norms' weights with
    /// `qk_norm`; the output's scale with `fp8_out`, last.
    pub fn inputs(&self) -> usize {
        3 + 2 * usize::from(self.rope) + 2 * usize::from(self.qk_norm.is_some()) + usize::from(self.fp8_out)
    }

    fn parse(text: &str) -> Result<CachedAttn, String> {
        read_attrs(CACHED_ATTENTION, text, |a| {
            let backend = a.take("backend").ok_or_else(|| a.missing("backend"))?.to_string();
            let layer = a.int("layer")?;
            let layer = usize::try_from(layer).map_err(|_| a.bad("layer", &layer.to_string(), "a layer index"))?;
            let (scale, rope) = (a.f64("scale")?, a.opt_bool("rope")?.unwrap_or(false));
            let qk_norm = match a.opt_f64("qk_norm_eps")? {
                Some(eps) if !rope => return Err(a.bad("qk_norm_eps", &eps.to_string(), "set without rope=true")),
                Some(eps) if eps >= 0.0 && eps.is_finite() => Some(NormAttrs::new(eps, a.dtype("qk_norm_dtype")?)),
                Some(eps) => return Err(a.bad("qk_norm_eps", &eps.to_string(), "a finite eps >= 0")),
                None => None,
            };
            let scoring = Scoring::read(a)?;
            Ok(CachedAttn { backend, layer, scale, rope, qk_norm, scoring, fp8_out: codes_out::read(a)? })
        })
    }
}

fn cached_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let a = CachedAttn::parse(attrs)?;
    let want = a.inputs();
    if ins.len() != want {
        let n = if a.qk_norm.is_some() { " and qk_norm" } else { "" };
        let q = if a.fp8_out { " and quant=fp8" } else { "" };
        return Err(format!("takes {want} tensor inputs with rope={}{n}{q}, got {}", a.rope, ins.len()));
    }
    if let Some(n) = &a.qk_norm {
        // Each head row normalised as the unfused torch_rmsnorm would, in q's and k's own dtype.
        for (j, w, what) in [(0, 5, "q"), (1, 6, "k")] {
            let r = crate::custom_op::infer(
                super::norm::RMSNORM,
                &Op::rmsnorm(*n).attrs,
                &[ins[j].clone(), ins[w].clone()],
            )
            .map_err(|e| format!("the RMSNorm of {what}: {e}"))?;
            if r[0] != ins[j] || ins[w].dtype != ins[j].dtype {
                return Err(format!("the RMSNorm of {what} would give {} from {} and weight {}", r[0], ins[j], ins[w]));
            }
        }
    }
    if a.rope {
        // cos/sin must rotate q and k as the unfused RoPE nodes would.
        for (j, what) in [(0, "q"), (1, "k")] {
            let r = crate::custom_op::infer(
                super::rope::ROPE,
                "interleaved=false",
                &[ins[j].clone(), ins[3].clone(), ins[4].clone()],
            )
            .map_err(|e| format!("RoPE of {what}: {e}"))?;
            if r[0] != ins[j] {
                return Err(format!("RoPE of {what} would give {} from {}", r[0], ins[j]));
            }
        }
    }
    let out = attention_rule(&ins[..3], true)?;
    if !ins[0].shape[0].is_one() {
        return Err(format!("expects the flattened batch [1, heads, tokens, dim], got {}", ins[0]));
    }
    let plain = out.into_iter().next().ok_or("attention gave no output")?;
    Ok(vec![codes_out::meta(a.fp8_out, ins.last().filter(|_| a.fp8_out), plain)?])
}

/// `aten.scaled_dot_product_attention`'s attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SdpaAttrs {
    pub is_causal: bool,
    /// `None`: 1/√head_dim.
    pub scale: Option<f64>,
    /// k/v may have fewer heads than q (a whole number of q heads each).
    pub enable_gqa: bool,
    pub scoring: Scoring,
}

impl SdpaAttrs {
    fn parse(text: &str) -> Result<SdpaAttrs, String> {
        read_attrs(SDPA, text, |a| {
            let at = SdpaAttrs {
                is_causal: a.opt_bool("is_causal")?.unwrap_or(false),
                scale: a.opt_f64("scale")?,
                enable_gqa: a.opt_bool("enable_gqa")?.unwrap_or(false),
                scoring: Scoring::read(a)?,
            };
            if (at.scoring.window.is_some() || at.scoring.chunk.is_some()) && !at.is_causal {
                return Err(a.bad("window", "set", "allowed without is_causal=true"));
            }
            Ok(at)
        })
    }

    fn text(&self) -> String {
        let mut s = format!("is_causal={}", self.is_causal);
        if let Some(x) = self.scale {
            s.push_str(&format!(", scale={x:?}"));
        }
        if self.enable_gqa {
            s.push_str(", enable_gqa=true");
        }
        s + &self.scoring.text()
    }
}

/// `torch_attention`'s attributes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionAttrs {
    pub causal: bool,
    pub scale: f64,
    pub scoring: Scoring,
}

impl AttentionAttrs {
    fn parse(text: &str) -> Result<AttentionAttrs, String> {
        read_attrs(ATTENTION, text, |a| {
            let at = AttentionAttrs { causal: a.bool("causal")?, scale: a.f64("scale")?, scoring: Scoring::read(a)? };
            if (at.scoring.window.is_some() || at.scoring.chunk.is_some()) && !at.causal {
                return Err(a.bad("window", "set", "allowed without causal=true"));
            }
            Ok(at)
        })
    }
}

impl Op {
    pub fn matmul() -> Op {
        Op { name: MATMUL, attrs: String::new() }
    }

    pub fn sdpa(a: SdpaAttrs) -> Op {
        Op { name: SDPA, attrs: a.text() }
    }

    pub fn attention(a: AttentionAttrs) -> Op {
        Op { name: ATTENTION, attrs: format!("causal={}, scale={:?}{}", a.causal, a.scale, a.scoring.text()) }
    }

    /// The attributes of an `aten.scaled_dot_product_attention` node.
    pub fn sdpa_attrs(&self) -> Option<SdpaAttrs> {
        match self {
            Op { name: SDPA, attrs, .. } => SdpaAttrs::parse(attrs).ok(),
            _ => None,
        }
    }

    pub fn cached_attention(a: &CachedAttn) -> Op {
        Op { name: CACHED_ATTENTION, attrs: a.text() }
    }

    /// The attributes of an `attention_with_kv_cache` node.
    pub fn cached_attention_of(&self) -> Option<CachedAttn> {
        self.attrs_of(CACHED_ATTENTION).and_then(|a| CachedAttn::parse(a).ok())
    }

    /// `causal_mask(scores)`: the scores `[.., q_len, k_len]` with key j hidden from query i
    /// (set to -inf) past the diagonal, j > i + k_len - q_len, or outside `window` positions.
    pub fn causal_mask(window: Option<usize>) -> Op {
        Op { name: CAUSAL_MASK, attrs: window.map(|w| format!("window={w}")).unwrap_or_default() }
    }

    /// A `causal_mask` node's window (`Some(None)`: causal, no window).
    pub fn causal_mask_of(&self) -> Option<Option<usize>> {
        self.attrs_of(CAUSAL_MASK).and_then(|a| causal_mask_window(a).ok())
    }

    /// The attributes of a `torch_attention` node.
    pub fn attention_attrs(&self) -> Option<AttentionAttrs> {
        match self {
            Op { name: ATTENTION, attrs, .. } => AttentionAttrs::parse(attrs).ok(),
            _ => None,
        }
    }
}

/// The output of attention over q, k, v (`[batch, heads, seq, head_dim]`; with `gqa`, k/v may
/// have fewer heads): q's shape with v's head dim.
pub(crate) fn attention_rule(ins: &[TensorMeta], gqa: bool) -> Result<Vec<TensorMeta>, String> {
    let (q, k, v) = (&ins[0], &ins[1], &ins[2]);
    if !q.dtype.is_float() {
        return Err(format!("needs a float tensor, got {q}"));
    }
    let ok = q.shape.len() == 4
        && k.shape.len() == 4
        && v.shape.len() == 4
        && q.dtype == k.dtype
        && k.dtype == v.dtype
        && q.shape[0] == k.shape[0]
        && k.shape[0] == v.shape[0]
        && q.shape[3] == k.shape[3]
        && k.shape[1] == v.shape[1]
        && k.shape[2] == v.shape[2];
    if !ok {
        return Err(format!("q {q}, k {k}, v {v}: want [batch, heads, seq, head_dim]"));
    }
    let heads_ok = if gqa { q.shape[1].div(&k.shape[1]).is_some() } else { q.shape[1] == k.shape[1] };
    if !heads_ok {
        return Err(format!("q has {} heads, k/v {} (enable_gqa={gqa})", q.shape[1], k.shape[1]));
    }
    let mut shape = q.shape.clone();
    shape[3] = v.shape[3].clone();
    Ok(vec![TensorMeta { dtype: q.dtype, shape }])
}

fn matmul_rule(ins: &[TensorMeta]) -> Result<Vec<TensorMeta>, String> {
    let (a, b) = (&ins[0], &ins[1]);
    if a.shape.len() < 2 || b.shape.len() < 2 || a.dtype != b.dtype {
        return Err(format!("operands {a} and {b} (both need rank >= 2, one dtype)"));
    }
    let (m, k) = (&a.shape[a.shape.len() - 2], &a.shape[a.shape.len() - 1]);
    let (k2, n) = (&b.shape[b.shape.len() - 2], &b.shape[b.shape.len() - 1]);
    if k != k2 {
        return Err(format!("inner dims differ: {a} @ {b}"));
    }
    let mut shape = broadcast_shapes(&a.shape[..a.shape.len() - 2], &b.shape[..b.shape.len() - 2])?;
    shape.push(m.clone());
    shape.push(n.clone());
    Ok(vec![TensorMeta { dtype: a.dtype, shape }])
}

fn matmul_cpu(a: &Tensor, b: &Tensor, dtype: DType, out_shape: &[usize]) -> crate::Result<Tensor> {
    use crate::cpu::broadcast_strides;
    let (ar, br) = (a.rank(), b.rank());
    let (m, kk, n) = (a.shape()[ar - 2], a.shape()[ar - 1], b.shape()[br - 1]);
    let batch_shape = &out_shape[..out_shape.len() - 2];
    let batches: usize = batch_shape.iter().product();
    let sa = broadcast_strides(&a.shape()[..ar - 2], batch_shape);
    let sb = broadcast_strides(&b.shape()[..br - 2], batch_shape);
    let (av, bv) = (a.to_f32(), b.to_f32());
    let mut out = vec![0f32; batches * m * n];
    for (bi, c) in out.chunks_mut((m * n).max(1)).enumerate().take(batches) {
        let (mut oa, mut ob, mut rem) = (0, 0, bi);
        for d in (0..batch_shape.len()).rev() {
            let i = rem % batch_shape[d];
            rem /= batch_shape[d];
            oa += i * sa[d];
            ob += i * sb[d];
        }
        let a_mat = &av[oa * m * kk..(oa + 1) * m * kk];
        let b_mat = &bv[ob * kk * n..(ob + 1) * kk * n];
        k::matmul(m, n, kk, k::MatRef::row_major(a_mat, kk), k::MatRef::row_major(b_mat, n), c);
    }
    Tensor::from_f32_as(dtype, out_shape.to_vec(), out)
}

/// softmax(q·kᵀ·scale)·v on the CPU, in f32 (`scale` None: 1/√head_dim).
fn attention_cpu(
    ins: &[&Tensor],
    causal: bool,
    scale: Option<f64>,
    scoring: Scoring,
    dtype: DType,
    out_shape: &[usize],
) -> crate::Result<Tensor> {
    let (q, kt, v) = (ins[0], ins[1], ins[2]);
    let (qs, ks, vs) = (q.shape(), kt.shape(), v.shape());
    let dims = k::AttnDims {
        batch: qs[0],
        q_heads: qs[1],
        kv_heads: ks[1],
        q_len: qs[2],
        kv_len: ks[2],
        head_dim: qs[3],
        v_dim: vs[3],
    };
    let scale = scale.map(|s| s as f32).unwrap_or(1.0 / (qs[3] as f32).sqrt());
    let mut out = vec![0f32; out_shape.iter().product()];
    let causal = causal && !mutation::is(Mutation::NoCausalMask);
    let (mut kv, mut vv) = (kt.to_f32(), v.to_f32());
    if let Some((ks, vs)) = scoring.kv_fp8 {
        k::kv_fp8_round(kv.to_mut(), ks as f32);
        k::kv_fp8_round(vv.to_mut(), vs as f32);
    }
    k::attention(dims, &q.to_f32(), &kv, &vv, scoring.scores(scale, causal), &mut out);
    if mutation::is(Mutation::SwapHeads) && dims.q_heads > 1 {
        let per_head = dims.q_len * dims.v_dim;
        for b in 0..dims.batch {
            let (h0, h1) = out[b * dims.q_heads * per_head..].split_at_mut(per_head);
            h0.swap_with_slice(&mut h1[..per_head]);
        }
    }
    Tensor::from_f32_as(dtype, out_shape.to_vec(), out)
}

fn causal_mask_window(text: &str) -> Result<Option<usize>, String> {
    read_attrs(CAUSAL_MASK, text, |a| match a.opt_int("window")? {
        Some(w) if w >= 1 => Ok(Some(w as usize)),
        Some(w) => Err(a.bad("window", &w.to_string(), "a positive number of positions")),
        None => Ok(None),
    })
}

fn causal_mask_cpu(x: &Tensor, window: Option<usize>, dtype: DType, shape: &[usize]) -> crate::Result<Tensor> {
    let (q_len, k_len) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let mut v = x.to_f32().into_owned();
    for (r, row) in v.chunks_mut(k_len.max(1)).enumerate() {
        // Query i sits at key position i + k_len - q_len (its cached prefix before it).
        let at = (r % q_len.max(1)) + k_len.saturating_sub(q_len);
        for (j, s) in row.iter_mut().enumerate() {
            if j > at || window.is_some_and(|w| at - j >= w) {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_f32_as(dtype, shape.to_vec(), v)
}

/// A CPU kernel of one output: the inputs, the attribute text, the output's dtype and shape.
type OneOutput = fn(&[&Tensor], &str, &(DType, Vec<usize>)) -> crate::Result<Tensor>;

fn entry(
    name: &'static str,
    inputs: usize,
    check: fn(&str) -> Result<(), String>,
    rule: fn(&[TensorMeta], &str) -> Result<Vec<TensorMeta>, String>,
    cpu: OneOutput,
) -> CustomOp {
    CustomOp {
        name,
        version: env!("CARGO_PKG_VERSION"),
        inputs,
        outputs: Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| {
            check(attrs)?;
            rule(ins, attrs)
        })),
        origin: "built-in",
        check_attrs: Some(check),
        cpu: Arc::new(
            move |ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                Ok(vec![cpu(ins, attrs, &outs[0]).map_err(|e| e.to_string())?])
            },
        ),
        cuda: None,
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

/// The attention ops as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    // Its kernels are its attention backend's: the executors call the backend with the step.
    let no_kernel: OneOutput = |_, _, _| {
        Err(crate::Error::op(CACHED_ATTENTION, "needs a KV cache: run it through a runtime step with batch metadata"))
    };
    let cached = CustomOp {
        extra_inputs: 5,
        ..entry(CACHED_ATTENTION, 3, |a| CachedAttn::parse(a).map(|_| ()), cached_rule, no_kernel)
    };
    vec![
        cached,
        entry(MATMUL, 2, no_attrs, |ins, _| matmul_rule(ins), |ins, _, (d, s)| matmul_cpu(ins[0], ins[1], *d, s)),
        entry(
            CAUSAL_MASK,
            1,
            |a| causal_mask_window(a).map(|_| ()),
            |ins, _| {
                let x = &ins[0];
                if !x.dtype.is_float() || x.shape.len() < 2 {
                    return Err(format!("needs float scores [.., q_len, k_len], got {x}"));
                }
                Ok(vec![x.clone()])
            },
            |ins, a, (d, s)| {
                let w = causal_mask_window(a).map_err(|e| crate::Error::op(CAUSAL_MASK, e))?;
                causal_mask_cpu(ins[0], w, *d, s)
            },
        ),
        entry(
            SDPA,
            3,
            |a| SdpaAttrs::parse(a).map(|_| ()),
            |ins, a| attention_rule(ins, SdpaAttrs::parse(a)?.enable_gqa),
            |ins, a, (d, s)| {
                let at = SdpaAttrs::parse(a).map_err(|e| crate::Error::op(SDPA, e))?;
                attention_cpu(ins, at.is_causal, at.scale, at.scoring, *d, s)
            },
        ),
        entry(
            ATTENTION,
            3,
            |a| AttentionAttrs::parse(a).map(|_| ()),
            |ins, _| attention_rule(ins, true),
            |ins, a, (d, s)| {
                let at = AttentionAttrs::parse(a).map_err(|e| crate::Error::op(ATTENTION, e))?;
                attention_cpu(ins, at.causal, Some(at.scale), at.scoring, *d, s)
            },
        ),
    ]
}

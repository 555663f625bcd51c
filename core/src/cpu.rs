//! CPU implementation of every op, on host tensors.
//!
//! Floating-point math runs in f32 and each op rounds its result once to its output dtype, which
//! is what torch's CPU kernels do for bf16 and f16. Data movement (views, transposes, slices,
//! concatenation) is exact for every dtype.

use autodeploy_kernels::cpu as k;
use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gguf::GgmlType;
use crate::ir::TensorMeta;
use crate::ops::binary::{ADD, MUL};
use crate::ops::layout::Slice;
use crate::ops::Op;
use crate::shape::{static_shape, Bindings, SizeArg};
use crate::tensor::{Storage, Tensor};

/// Elementwise work below this many elements stays on one thread.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Applies `f` to the storage of the same variant, for dtype-generic data movement.
macro_rules! with_storage {
    ($s:expr, |$v:ident| $body:expr) => {
        match $s {
            $crate::tensor::Storage::F32($v) => $crate::tensor::Storage::F32($body),
            $crate::tensor::Storage::F16($v) => $crate::tensor::Storage::F16($body),
            $crate::tensor::Storage::BF16($v) => $crate::tensor::Storage::BF16($body),
            $crate::tensor::Storage::I64($v) => $crate::tensor::Storage::I64($body),
            $crate::tensor::Storage::Bool($v) => $crate::tensor::Storage::Bool($body),
            // Data movement on block-quantized weights works on the dequantized values.
            $crate::tensor::Storage::Block { ty, bytes, .. } => {
                let deq = $crate::gguf::dequantize(*ty, bytes);
                let $v = &deq;
                $crate::tensor::Storage::F32($body)
            }
            // FP8 moves as its bytes; FP4 (two values a byte) as its codes' values, unscaled
            // (only the quantized linears give low-bit weights meaning, with their scales).
            $crate::tensor::Storage::LowBit { dtype: $crate::DType::F8E4M3, bytes: $v, .. } => {
                let bytes: Vec<u8> = $body;
                $crate::tensor::Storage::LowBit { dtype: $crate::DType::F8E4M3, len: bytes.len(), bytes }
            }
            s @ $crate::tensor::Storage::LowBit { .. } => {
                let deq = $crate::tensor::Tensor::new(vec![s.len()], s.clone_low_bit())
                    .expect("same length")
                    .to_f32()
                    .into_owned();
                let $v = &deq;
                $crate::tensor::Storage::F32($body)
            }
        }
    };
}
pub(crate) use with_storage;

fn block_kind(t: GgmlType) -> Option<k::BlockKind> {
    Some(match t {
        GgmlType::Q4_0 => k::BlockKind::Q4_0,
        GgmlType::Q4_1 => k::BlockKind::Q4_1,
        GgmlType::Q8_0 => k::BlockKind::Q8_0,
        _ => return None,
    })
}

/// Inputs with at least this many rows dequantize a block weight tile by tile into an f32 GEMM;
/// fewer (decode) multiply the blocks as stored.
const QUANT_GEMM_MIN_ROWS: usize = 8;

/// Kernel choices a compile backend makes for the whole model; the default is exact f32 math
/// on the best path this CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOptions {
    /// Linears over block-quantized weights (decode-sized inputs) quantize their activations to
    /// int8 per 32-value block and multiply in integers, as llama.cpp does: faster, with the
    /// activation rounding error added (`autodeploy_kernels::quant` states it).
    pub int8_activations: bool,
    /// The CPU kernel path (within what the CPU runs).
    pub cpu: autodeploy_kernels::isa::CpuKernels,
    /// `debug_checks`: the outputs of attention backends and registered ops are checked each
    /// step ([`crate::custom_op::check_output`]).
    pub debug_checks: bool,
}

impl Default for KernelOptions {
    fn default() -> KernelOptions {
        KernelOptions {
            int8_activations: false,
            cpu: autodeploy_kernels::isa::CpuKernels::detected(),
            debug_checks: false,
        }
    }
}

use autodeploy_kernels::isa::CpuKernels::AvxVnni;

/// Readies the weights node `op` reads for `opts` before the first step: on the VNNI int8 paths
/// (AVX-512 VNNI, AVX-VNNI), the row-interleaved copy of each block weight its linears multiply
/// (`linear_f32`: the weights of ops whose table entry says `linear_weights`, `aten.linear`'s
/// and `torch_swiglu_mlp`'s) is made now rather than inside the first request. `weight(i)` is
/// input `i` when it is a weight.
pub fn prepare_weights<'a>(op: &Op, inputs: usize, weight: impl Fn(usize) -> Option<&'a Tensor>, opts: &KernelOptions) {
    if !(opts.int8_activations && opts.cpu >= AvxVnni) {
        return;
    }
    let linear = matches!(op, Op { name, .. } if crate::registry::custom_op(name).is_some_and(|c| c.linear_weights));
    if !linear {
        return;
    }
    for w in (1..inputs).filter_map(weight) {
        if w.shape().len() != 2 {
            continue;
        }
        if let Some((kind, bytes)) = w.as_blocks().and_then(|(t, b)| block_kind(t).map(|kd| (kd, b))) {
            let (n, k_) = (w.shape()[0], w.shape()[1]);
            w.packed_rows(|| autodeploy_kernels::quant::PackedRows::pack(kind, n, k_, bytes));
        }
    }
}

/// `x[m, k] · w[n, k]ᵀ (+ bias)` in f32 for any weight storage.
pub fn linear_f32(x: &[f32], m: usize, k_: usize, w: &Tensor, bias: Option<&[f32]>, opts: &KernelOptions) -> Vec<f32> {
    let n = w.shape()[0];
    let mut y = vec![0f32; m * n];
    match w.as_blocks().and_then(|(t, b)| block_kind(t).map(|kd| (kd, b))) {
        // AVX-512 VNNI or AVX-VNNI: the row-interleaved copy of the weight, made at its first use.
        Some((kind, bytes)) if m < QUANT_GEMM_MIN_ROWS && opts.int8_activations && opts.cpu >= AvxVnni => {
            match w.packed_rows(|| autodeploy_kernels::quant::PackedRows::pack(kind, n, k_, bytes)) {
                Some(p) => autodeploy_kernels::quant::qlinear_packed(opts.cpu, m, x, p, bias, &mut y),
                None => autodeploy_kernels::quant::qlinear_on(opts.cpu, true, m, n, k_, x, kind, bytes, bias, &mut y),
            }
        }
        Some((kind, bytes)) if m < QUANT_GEMM_MIN_ROWS => autodeploy_kernels::quant::qlinear_on(
            opts.cpu,
            opts.int8_activations,
            m,
            n,
            k_,
            x,
            kind,
            bytes,
            bias,
            &mut y,
        ),
        Some((kind, bytes)) => autodeploy_kernels::quant::qlinear_tiled(m, n, k_, x, kind, bytes, bias, &mut y),
        None => match w.as_dense() {
            Some(d) => autodeploy_kernels::dense::dense_linear(opts.cpu, m, n, k_, x, d, bias, &mut y),
            None => k::linear(m, n, k_, x, &w.to_f32(), bias, &mut y),
        },
    }
    y
}

pub(crate) fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1usize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Copies `src` viewed with `strides` (elements, may be 0 for broadcast) from `offset` into a
/// new contiguous buffer of `shape`.
fn strided_copy<T: Copy + Send + Sync>(src: &[T], shape: &[usize], strides: &[usize], offset: usize) -> Vec<T> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return Vec::new();
    }
    let rank = shape.len();
    if rank == 0 {
        return vec![src[offset]];
    }
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    let rows = n / inner;
    let mut out = Vec::with_capacity(n);
    for r in 0..rows {
        // Offset of row r: decompose its index over the outer dims.
        let mut rem = r;
        let mut off = offset;
        for d in (0..rank - 1).rev() {
            off += (rem % shape[d]) * strides[d];
            rem /= shape[d];
        }
        if inner_stride == 1 {
            out.extend_from_slice(&src[off..off + inner]);
        } else {
            out.extend((0..inner).map(|i| src[off + i * inner_stride]));
        }
    }
    out
}

pub(crate) fn copy_view(t: &Tensor, shape: &[usize], strides: &[usize], offset: usize) -> Result<Tensor> {
    let data = with_storage!(t.storage(), |v| strided_copy(v, shape, strides, offset));
    Tensor::new(shape.to_vec(), data)
}

/// Strides that broadcast `shape` (right-aligned) to `out` (0 where the dim is broadcast).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let cs = contiguous_strides(shape);
    let off = out.len() - shape.len();
    (0..out.len()).map(|i| if i < off || shape[i - off] == 1 { 0 } else { cs[i - off] }).collect()
}

/// `f` on every value (as f32; the result in x's dtype), over the cores for large tensors.
pub(crate) fn map_f32(x: &Tensor, f: impl Fn(f32) -> f32 + Sync + Send) -> Result<Tensor> {
    let v = x.to_f32();
    let out: Vec<f32> =
        if v.len() >= PAR_MIN { v.par_iter().map(|&a| f(a)).collect() } else { v.iter().map(|&a| f(a)).collect() };
    Tensor::from_f32_as(x.dtype(), x.shape().to_vec(), out)
}

/// The attribute text of a table op with its symbolic sizes bound (`aten.view`'s `[1, seq,
/// -1]` at seq = 5), or as it is.
fn bind_sizes<'a>(name: &str, attrs: &'a str, bind: &Bindings) -> Result<std::borrow::Cow<'a, str>> {
    let Some(map) = crate::registry::custom_op(name).and_then(|c| c.sizes) else { return Ok(attrs.into()) };
    let bound = map(attrs, &mut |d| d.eval(bind).map(crate::shape::Dim::new).map_err(|e| e.to_string()))
        .map_err(|e| Error::op(name, e))?;
    Ok(bound.into())
}

fn to_usize(shape: &[crate::shape::Dim]) -> Vec<usize> {
    shape.iter().map(|d| d.as_static().expect("concrete shape")).collect()
}

/// Evaluates one op with exact kernels. `bind` gives the values of symbolic sizes in the op's
/// attributes.
pub fn eval(op: &Op, ins: &[&Tensor], bind: &Bindings) -> Result<Tensor> {
    eval_with(op, ins, bind, &KernelOptions::default())
}

/// [`eval`] with the kernel choices `opts`, for ops with one output.
pub fn eval_with(op: &Op, ins: &[&Tensor], bind: &Bindings, opts: &KernelOptions) -> Result<Tensor> {
    eval_one(op, ins, bind, opts)
}

/// Every output of `op` on `ins`, in the order the op infers them.
pub fn eval_outputs(op: &Op, ins: &[&Tensor], bind: &Bindings, opts: &KernelOptions) -> Result<Vec<Tensor>> {
    let attrs = bind_sizes(op.name, &op.attrs, bind)?;
    let metas: Vec<TensorMeta> =
        ins.iter().map(|t| TensorMeta { dtype: t.dtype(), shape: static_shape(t.shape()) }).collect();
    let outs: Vec<(crate::DType, Vec<usize>)> = crate::custom_op::infer(op.name, &attrs, &metas)
        .map_err(|e| Error::Shape { op: op.name.to_string(), node: String::new(), msg: e })?
        .into_iter()
        .map(|m| (m.dtype, to_usize(&m.shape)))
        .collect();
    crate::custom_op::eval(op.name, &attrs, ins, &outs, opts)
}

fn eval_one(op: &Op, ins: &[&Tensor], bind: &Bindings, opts: &KernelOptions) -> Result<Tensor> {
    let mut outs = eval_outputs(op, ins, bind, opts)?;
    if outs.len() != 1 {
        return Err(Error::op(op.name(), format!("has {} outputs: evaluate it with `eval_outputs`", outs.len())));
    }
    Ok(outs.remove(0))
}

pub(crate) fn cat_storage(ins: &[&Tensor], outer: usize, inner: usize, d: usize) -> Result<Storage> {
    macro_rules! cat_as {
        ($variant:ident) => {{
            let mut out = Vec::new();
            for o in 0..outer {
                for t in ins {
                    let Storage::$variant(v) = t.storage() else {
                        return Err(Error::op("aten.cat", "inputs have different dtypes"));
                    };
                    let chunk = t.shape()[d] * inner;
                    out.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
                }
            }
            Storage::$variant(out)
        }};
    }
    Ok(match ins[0].storage() {
        Storage::F32(_) => cat_as!(F32),
        Storage::F16(_) => cat_as!(F16),
        Storage::BF16(_) => cat_as!(BF16),
        Storage::I64(_) => cat_as!(I64),
        Storage::Bool(_) => cat_as!(Bool),
        Storage::Block { .. } | Storage::LowBit { .. } => {
            return Err(Error::op("aten.cat", "block-quantized and low-bit tensors concatenate along dim 0 only"))
        }
    })
}

/// Rounds an f32 to `dtype` and back: the value an op of that output dtype would store.
#[inline]
pub fn round_as(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        DType::F16 => half::f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// erf, computed in f64 and rounded to f32: the Maclaurin series below 2.5, the continued
/// fraction of erfc above (checked against Python's math.erf: max error 6e-15 on [-8, 8]).
pub(crate) fn erf(x: f32) -> f32 {
    let x = x as f64;
    let a = x.abs();
    let r = if a < 2.5 {
        // Maclaurin series: 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1)).
        let (mut term, mut sum, x2) = (a, a, a * a);
        for n in 1..60 {
            term *= -x2 / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // Continued fraction for erfc (converges fast for a >= 2.5).
        let mut f = 0.0f64;
        for n in (1..60).rev() {
            f = (n as f64 / 2.0) / (a + f);
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
    };
    (if x < 0.0 { -r } else { r }) as f32
}

/// Softmax (or, with `log`, log-softmax) over dim `d`, in f32.
pub(crate) fn softmax(x: &Tensor, d: usize, log: bool) -> Result<Tensor> {
    let shape = x.shape();
    let n = shape[d];
    let inner: usize = shape[d + 1..].iter().product();
    let v = x.to_f32();
    let mut out = vec![0f32; v.len()];
    let outer = v.len() / (n * inner).max(1);
    for o in 0..outer {
        for i in 0..inner {
            let at = |j: usize| o * n * inner + j * inner + i;
            let max = (0..n).map(|j| v[at(j)]).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for j in 0..n {
                let e = (v[at(j)] - max).exp();
                out[at(j)] = e;
                sum += e;
            }
            if log {
                let ls = sum.ln();
                for j in 0..n {
                    out[at(j)] = v[at(j)] - max - ls;
                }
            } else {
                for j in 0..n {
                    out[at(j)] /= sum;
                }
            }
        }
    }
    Tensor::from_f32_as(x.dtype(), shape.to_vec(), out)
}

/// RoPE (rotate-half), rounding exactly where the unfused graph does: `x·cos` and `rot(x)·sin`
/// each round to the dtype, then their sum. Direct when cos/sin are one `[T, d]` table
/// broadcast over the leading dims (how the importers build them), else through the primitive
/// ops.
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool, bind: &Bindings) -> Result<Tensor> {
    let d = *x.shape().last().expect("rank >= 1");
    let r = x.rank();
    let table = |t: &Tensor| {
        r >= 2
            && t.rank() <= r
            && t.shape().len() >= 2
            && t.shape()[t.rank() - 2..] == x.shape()[r - 2..]
            && t.shape()[..t.rank() - 2].iter().all(|&n| n == 1)
    };
    let same_dtype = cos.dtype() == x.dtype() && sin.dtype() == x.dtype();
    if !interleaved && d.is_multiple_of(2) && table(cos) && table(sin) && same_dtype && x.dtype().is_float() {
        let dtype = x.dtype();
        let (xv, cv, sv) = (x.to_f32(), cos.to_f32(), sin.to_f32());
        let (h, tab) = (d / 2, cv.len());
        let mut out = vec![0f32; xv.len()];
        for ((o, xr), at) in out.chunks_mut(d).zip(xv.chunks(d)).zip((0..).map(|i: usize| (i * d) % tab)) {
            let (c, s) = (&cv[at..at + d], &sv[at..at + d]);
            for j in 0..d {
                let rot = if j < h { -xr[j + h] } else { xr[j - h] };
                o[j] = round_as(dtype, round_as(dtype, xr[j] * c[j]) + round_as(dtype, rot * s[j]));
            }
        }
        return Tensor::from_f32_as(dtype, x.shape().to_vec(), out);
    }
    let half = (d / 2) as i64;
    let x = if interleaved {
        // [..., d] holding (even, odd) pairs -> [..., d/2, 2] -> [..., 2, d/2] -> [..., d]
        let mut pairs: Vec<SizeArg> = x.shape()[..r - 1].iter().map(|&n| SizeArg::Dim(n.into())).collect();
        pairs.push(SizeArg::Dim((d / 2).into()));
        pairs.push(SizeArg::Dim(2.into()));
        let p = eval(&Op::view(pairs), &[x], bind)?;
        let t = eval(&Op::transpose(-1, -2), &[&p], bind)?;
        t.reshape(x.shape().to_vec())?
    } else {
        x.clone()
    };
    let xc = eval(&Op::binary(MUL), &[&x, cos], bind)?;
    let x1 = eval(&Op::slice(Slice::new(-1, 0, half)), &[&x], bind)?;
    let x2 = eval(&Op::slice(Slice::new(-1, half, i64::MAX)), &[&x], bind)?;
    let n2 = eval_outputs(&Op::unary("aten.neg"), &[&x2], bind, &KernelOptions::default())?.remove(0);
    let rot = eval(&Op::cat(-1), &[&n2, &x1], bind)?;
    let rs = eval(&Op::binary(MUL), &[&rot, sin], bind)?;
    eval(&Op::binary(ADD), &[&xc, &rs], bind)
}

#[cfg(test)]
mod tests {
    #[test]
    fn erf_matches_reference_values() {
        // Python's math.erf.
        for (x, want) in
            [(0.0f32, 0.0f32), (0.5, 0.520_499_9), (1.0, 0.842_700_8), (-2.0, -0.995_322_3), (3.0, 0.999_977_9)]
        {
            let got = super::erf(x);
            assert!((got - want).abs() <= 1e-6, "erf({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn softmax_and_log_softmax_match_reference_values() {
        // torch.softmax / torch.log_softmax of [[1, 2, 3], [-1, 0, 5]] along dim 1 (float64).
        let x = crate::Tensor::from_f32(vec![2, 3], vec![1.0, 2.0, 3.0, -1.0, 0.0, 5.0]).unwrap();
        let want_s: [f64; 6] = [0.090_030_57, 0.244_728_47, 0.665_240_96, 0.002_456_11, 0.006_676_41, 0.990_867_47];
        let want_l: [f64; 6] =
            [-2.407_605_96, -1.407_605_96, -0.407_605_96, -6.009_174_48, -5.009_174_48, -0.009_174_48];
        let s = super::softmax(&x, 1, false).unwrap().to_f32().into_owned();
        let l = super::softmax(&x, 1, true).unwrap().to_f32().into_owned();
        for i in 0..6 {
            assert!((s[i] as f64 - want_s[i]).abs() < 1e-6, "softmax[{i}] = {}, want {}", s[i], want_s[i]);
            assert!((l[i] as f64 - want_l[i]).abs() < 1e-5, "log_softmax[{i}] = {}, want {}", l[i], want_l[i]);
        }
        // Along dim 0 (an inner stride): each column of [[0, 0, 0], [ln 3, 0, -ln 3]].
        let y = crate::Tensor::from_f32(vec![2, 3], vec![0.0, 0.0, 0.0, 3f32.ln(), 0.0, -(3f32.ln())]).unwrap();
        let s = super::softmax(&y, 0, false).unwrap().to_f32().into_owned();
        for (got, want) in s.iter().zip([0.25, 0.5, 0.75, 0.75, 0.5, 0.25]) {
            assert!((got - want).abs() < 1e-6, "softmax dim 0: {s:?}");
        }
    }
}

//! The data-movement ops, each defined once here and registered in the op table: dtype casts,
//! views (`aten.view`, `aten.reshape`, `aten.transpose.int`, `aten.unsqueeze`,
//! `aten.slice.Tensor`), `aten.expand` and `aten.cat`. Each has its attribute reader, its shape
//! rule, its CPU kernel (exact for every dtype) and its CUDA form: a view says where its output
//! lies in its input's memory ([`View`]) and the executor queues no kernel; the others copy.
//! Graphs build them with `Op::view(..)`, `Op::transpose(..)`, ...; transforms read them with
//! `Op::view_sizes`, `Op::transpose_dims`, ....

use std::sync::Arc;

use crate::cpu::KernelOptions;
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, KernelLauncher, MapSizes, Outputs, View, ViewFn, ViewIn};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::{cuda_dt, Op};
use crate::shape::{fmt_shape, numel, Dim, Shape, SizeArg};
use crate::tensor::Tensor;
use autodeploy_kernels::cuda::exec::Strided;

pub const TO_DTYPE: &str = "aten._to_copy";
pub const VIEW: &str = "aten.view";
pub const RESHAPE: &str = "aten.reshape";
pub const EXPAND: &str = "aten.expand";
pub const TRANSPOSE: &str = "aten.transpose.int";
pub const UNSQUEEZE: &str = "aten.unsqueeze";
pub const SLICE: &str = "aten.slice.Tensor";
pub const CAT: &str = "aten.cat";

/// `aten.slice.Tensor(x, dim, start, end, step)`; `end = i64::MAX` means to the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slice {
    pub dim: i64,
    pub start: i64,
    pub end: i64,
    pub step: i64,
}

impl Slice {
    /// `x[.., start:end]` along `dim`, step 1.
    pub fn new(dim: i64, start: i64, end: i64) -> Slice {
        Slice { dim, start, end, step: 1 }
    }

    fn text(&self) -> String {
        let end = if self.end == i64::MAX { "end".to_string() } else { self.end.to_string() };
        let step = if self.step != 1 { format!(", step={}", self.step) } else { String::new() };
        format!("dim={}, start={}, end={end}{step}", self.dim, self.start)
    }

    fn parse(text: &str) -> Result<Slice, String> {
        read_attrs(SLICE, text, |a| {
            let dim = a.int("dim")?;
            let start = a.opt_int("start")?.unwrap_or(0);
            let end = match a.take("end") {
                None | Some("end") => i64::MAX,
                Some(v) => a.as_i64("end", v)?,
            };
            let step = a.opt_int("step")?.unwrap_or(1);
            if step <= 0 {
                return Err(a.bad("step", &step.to_string(), "a positive step"));
            }
            Ok(Slice { dim, start, end, step })
        })
    }
}

fn sizes_text(sizes: &[SizeArg]) -> String {
    let p: Vec<String> = sizes.iter().map(|a| a.to_string()).collect();
    format!("[{}]", p.join(", "))
}

fn parse_sizes(op: &str, text: &str) -> Result<Vec<SizeArg>, String> {
    read_attrs(op, text, |a| a.sizes())
}

fn parse_dtype(text: &str) -> Result<DType, String> {
    read_attrs(TO_DTYPE, text, |a| a.dtype("dtype"))
}

fn parse_pair(text: &str) -> Result<(i64, i64), String> {
    read_attrs(TRANSPOSE, text, |a| Ok((a.positional_i64()?, a.positional_i64()?)))
}

fn parse_one(text: &str) -> Result<i64, String> {
    read_attrs(UNSQUEEZE, text, |a| a.positional_i64())
}

fn parse_cat(text: &str) -> Result<i64, String> {
    read_attrs(CAT, text, |a| a.int("dim"))
}

fn named(name: &'static str, attrs: String) -> Op {
    Op { name, attrs }
}

impl Op {
    pub fn to_dtype(d: DType) -> Op {
        named(TO_DTYPE, format!("dtype={d}"))
    }
    pub fn view(sizes: Vec<SizeArg>) -> Op {
        named(VIEW, sizes_text(&sizes))
    }
    pub fn reshape(sizes: Vec<SizeArg>) -> Op {
        named(RESHAPE, sizes_text(&sizes))
    }
    /// `aten.expand`; `-1` keeps the input's size.
    pub fn expand(sizes: Vec<SizeArg>) -> Op {
        named(EXPAND, sizes_text(&sizes))
    }
    pub fn transpose(a: i64, b: i64) -> Op {
        named(TRANSPOSE, format!("{a}, {b}"))
    }
    pub fn unsqueeze(d: i64) -> Op {
        named(UNSQUEEZE, format!("{d}"))
    }
    pub fn slice(s: Slice) -> Op {
        named(SLICE, s.text())
    }
    pub fn cat(dim: i64) -> Op {
        named(CAT, format!("dim={dim}"))
    }

    /// The target dtype of a cast.
    pub fn to_dtype_of(&self) -> Option<DType> {
        self.attrs_of(TO_DTYPE).and_then(|a| parse_dtype(a).ok())
    }
    /// The size list of a view or reshape.
    pub fn view_sizes(&self) -> Option<Vec<SizeArg>> {
        match self {
            Op { name: VIEW | RESHAPE, attrs } => parse_sizes(VIEW, attrs).ok(),
            _ => None,
        }
    }
    pub fn expand_sizes(&self) -> Option<Vec<SizeArg>> {
        self.attrs_of(EXPAND).and_then(|a| parse_sizes(EXPAND, a).ok())
    }
    pub fn transpose_dims(&self) -> Option<(i64, i64)> {
        self.attrs_of(TRANSPOSE).and_then(|a| parse_pair(a).ok())
    }
    pub fn unsqueeze_dim(&self) -> Option<i64> {
        self.attrs_of(UNSQUEEZE).and_then(|a| parse_one(a).ok())
    }
    pub fn slice_of(&self) -> Option<Slice> {
        self.attrs_of(SLICE).and_then(|a| Slice::parse(a).ok())
    }
    pub fn cat_dim(&self) -> Option<i64> {
        self.attrs_of(CAT).and_then(|a| parse_cat(a).ok())
    }

    /// The attribute text of a table op named `name`.
    pub(crate) fn attrs_of(&self, name: &str) -> Option<&str> {
        match self {
            Op { name: n, attrs } if *n == name => Some(attrs),
            _ => None,
        }
    }
}

/// A dim index against a rank, negative from the end.
pub fn dim_index(d: i64, rank: usize) -> Result<usize, String> {
    let i = if d < 0 { d + rank as i64 } else { d };
    if i < 0 || i >= rank as i64 {
        return Err(format!("dim {d} out of range for rank {rank}"));
    }
    Ok(i as usize)
}

/// Output size list of a view/reshape, resolving one `-1`.
pub fn view_shape(input: &[Dim], sizes: &[SizeArg]) -> Result<Shape, String> {
    let total = numel(input);
    let mut known = Dim::new(1);
    let mut infer_at = None;
    for (i, s) in sizes.iter().enumerate() {
        match s {
            SizeArg::Dim(d) => known = known.mul(d),
            SizeArg::Infer if infer_at.is_none() => infer_at = Some(i),
            SizeArg::Infer => return Err("more than one -1 in the size list".into()),
        }
    }
    let mut out: Shape = sizes
        .iter()
        .map(|s| match s {
            SizeArg::Dim(d) => d.clone(),
            SizeArg::Infer => Dim::new(0),
        })
        .collect();
    let bad = || format!("cannot view {} as {}", fmt_shape(input), sizes_text(sizes));
    match infer_at {
        Some(i) => out[i] = total.div(&known).ok_or_else(bad)?,
        None if known == total => {}
        None => return Err(bad()),
    }
    Ok(out)
}

fn expand_shape(x: &TensorMeta, sizes: &[SizeArg]) -> Result<Shape, String> {
    if sizes.len() < x.shape.len() {
        return Err(format!("cannot expand {x} to {} dims", sizes.len()));
    }
    let off = sizes.len() - x.shape.len();
    let mut shape = Vec::with_capacity(sizes.len());
    for (i, s) in sizes.iter().enumerate() {
        let cur = (i >= off).then(|| &x.shape[i - off]);
        shape.push(match (s, cur) {
            (SizeArg::Infer, Some(c)) => c.clone(),
            (SizeArg::Infer, None) => return Err("-1 not allowed for a new leading dim".into()),
            (SizeArg::Dim(d), Some(c)) if c == d || c.is_one() => d.clone(),
            (SizeArg::Dim(d), None) => d.clone(),
            (SizeArg::Dim(d), Some(c)) => return Err(format!("cannot expand size {c} to {d} (input {x})")),
        });
    }
    Ok(shape)
}

/// Length of `x[start:end:step]` on a dim of `len`, with Python's clamping.
pub fn slice_len(start: i64, end: i64, step: i64, len: usize) -> Option<usize> {
    let (s, e) = slice_bounds(start, end, len);
    (step > 0).then(|| if e > s { (e - s).div_ceil(step as usize) } else { 0 })
}

pub fn slice_bounds(start: i64, end: i64, len: usize) -> (usize, usize) {
    let l = len as i64;
    let clamp = |i: i64| if i < 0 { (i + l).max(0) } else { i.min(l) } as usize;
    (clamp(start), clamp(end))
}

fn same(x: &TensorMeta, shape: Shape) -> Vec<TensorMeta> {
    vec![TensorMeta { dtype: x.dtype, shape }]
}

fn cat_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let x = &ins[0];
    let d = dim_index(parse_cat(attrs)?, x.shape.len())?;
    let mut total = 0usize;
    for m in ins {
        let ok = m.dtype == x.dtype
            && m.shape.len() == x.shape.len()
            && m.shape.iter().zip(&x.shape).enumerate().all(|(i, (a, b))| i == d || a == b);
        if !ok {
            return Err(format!("cannot concatenate {m} with {x} along dim {d}"));
        }
        total += m.shape[d].as_static().ok_or_else(|| format!("concatenating along symbolic dim {}", m.shape[d]))?;
    }
    let mut shape = x.shape.clone();
    shape[d] = Dim::new(total);
    Ok(same(x, shape))
}

// ---- strides (in elements) of views, shared by the CPU kernels and the CUDA executor ----

pub fn contiguous_strides(shape: &[usize]) -> Vec<i64> {
    let mut s = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as i64;
    }
    s
}

/// Whether a view with these sizes and strides is the contiguous layout of its shape.
pub fn is_contiguous(shape: &[usize], strides: &[i64]) -> bool {
    let mut want = 1i64;
    for (&n, &s) in shape.iter().zip(strides).rev() {
        if n != 1 && s != want {
            return false;
        }
        want *= n as i64;
    }
    true
}

/// Strides of `new` viewing memory laid out as `old` with strides `old_st`, if a view can (as
/// `torch.Tensor.view`): each run of `old` dims that are contiguous among themselves splits or
/// merges into `new` dims of the same count; None when a `new` dim would straddle two runs.
pub fn view_strides(old: &[usize], old_st: &[i64], new: &[usize]) -> Option<Vec<i64>> {
    if old.iter().product::<usize>() != new.iter().product::<usize>() {
        return None;
    }
    if old.is_empty() {
        return Some(contiguous_strides(new));
    }
    let mut st = vec![0i64; new.len()];
    let mut view_d = new.len() as isize - 1;
    let mut base = old_st[old.len() - 1];
    let (mut tensor_n, mut view_n) = (1usize, 1usize);
    for d in (0..old.len()).rev() {
        tensor_n *= old[d];
        // A run ends where the next dim out is not laid out right after this run.
        if d == 0 || (old[d - 1] != 1 && old_st[d - 1] != tensor_n as i64 * base) {
            while view_d >= 0 && (view_n < tensor_n || new[view_d as usize] == 1) {
                st[view_d as usize] = view_n as i64 * base;
                view_n *= new[view_d as usize];
                view_d -= 1;
            }
            if view_n != tensor_n {
                return None;
            }
            if d > 0 {
                base = old_st[d - 1];
                tensor_n = 1;
                view_n = 1;
            }
        }
    }
    (view_d == -1).then_some(st)
}

/// Strides that broadcast `shape` (right-aligned) to `out` (0 where the dim is broadcast).
pub use autodeploy_kernels::cuda::exec::broadcast_strides;

fn view_of_reshape(v: &ViewIn) -> View {
    match view_strides(v.in_shape, v.in_strides, v.out_shape) {
        Some(strides) => View::Strided { offset: 0, strides },
        None => View::Contiguous,
    }
}

fn view_of_transpose(v: &ViewIn) -> View {
    let Ok((a, b)) = parse_pair(v.attrs) else { return View::Kernel };
    match (dim_index(a, v.in_shape.len()), dim_index(b, v.in_shape.len())) {
        (Ok(a), Ok(b)) => {
            let mut strides = v.in_strides.to_vec();
            strides.swap(a, b);
            View::Strided { offset: 0, strides }
        }
        _ => View::Kernel,
    }
}

fn view_of_slice(v: &ViewIn) -> View {
    let Ok(s) = Slice::parse(v.attrs) else { return View::Kernel };
    let Ok(d) = dim_index(s.dim, v.in_shape.len()) else { return View::Kernel };
    let (start, _) = slice_bounds(s.start, s.end, v.in_shape[d]);
    let mut strides = v.in_strides.to_vec();
    let offset = start as i64 * strides[d];
    strides[d] *= s.step;
    View::Strided { offset, strides }
}

fn view_of_cast(v: &ViewIn) -> View {
    if v.in_dtype == v.out_dtype {
        View::Strided { offset: 0, strides: v.in_strides.to_vec() }
    } else {
        View::Kernel
    }
}

/// Maps the sizes of a size-list op's attribute text.
fn map_sizes(op: &'static str) -> MapSizes {
    fn map(op: &str, text: &str, f: &mut dyn FnMut(&Dim) -> Result<Dim, String>) -> Result<String, String> {
        let sizes = parse_sizes(op, text)?;
        let mut out = Vec::with_capacity(sizes.len());
        for s in sizes {
            out.push(match s {
                SizeArg::Dim(d) => SizeArg::Dim(f(&d)?),
                SizeArg::Infer => SizeArg::Infer,
            });
        }
        Ok(sizes_text(&out))
    }
    match op {
        VIEW => |t, f| map(VIEW, t, f),
        RESHAPE => |t, f| map(RESHAPE, t, f),
        _ => |t, f| map(EXPAND, t, f),
    }
}

// ---- CPU kernels ----

/// `x` viewed at `strides` from `offset` (elements; usize, CPU tensors are dense), copied.
fn cpu_view(x: &Tensor, shape: &[usize], strides: &[i64], offset: i64) -> Result<Tensor, String> {
    let st: Vec<usize> = strides.iter().map(|&s| s as usize).collect();
    crate::cpu::copy_view(x, shape, &st, offset as usize).map_err(|e| e.to_string())
}

fn cpu_by_view(view: ViewFn) -> crate::custom_op::CpuImpl {
    Arc::new(move |ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
        let (x, (dt, shape)) = (ins[0], &outs[0]);
        let strides = contiguous_strides(x.shape());
        let v = ViewIn {
            attrs,
            in_shape: x.shape(),
            in_strides: &strides,
            in_dtype: x.dtype(),
            out_shape: shape,
            out_dtype: *dt,
        };
        Ok(vec![match view(&v) {
            View::Contiguous => x.reshape(shape.clone()).map_err(|e| e.to_string())?,
            // All of x in order (a prefix at offset 0 is not: it is copied below).
            View::Strided { offset: 0, strides }
                if strides == contiguous_strides(shape) && x.numel() == shape.iter().product::<usize>() =>
            {
                x.reshape(shape.clone()).map_err(|e| e.to_string())?
            }
            View::Strided { offset, strides } => cpu_view(x, shape, &strides, offset)?,
            View::Kernel => return Err("is no view of this input".into()),
        }])
    })
}

fn cat_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let x = ins[0];
    let d = dim_index(parse_cat(attrs)?, x.rank())?;
    let shape = outs[0].1.clone();
    if let (Some((ty, _)), 0) = (x.as_blocks(), d) {
        // Whole rows of blocks: concatenating rows is concatenating bytes.
        let mut bytes = Vec::new();
        for t in ins {
            match t.as_blocks() {
                Some((t2, b)) if t2 == ty => bytes.extend_from_slice(b),
                _ => return Err("cannot concatenate different weight formats".into()),
            }
        }
        return Ok(vec![Tensor::from_blocks(ty, shape, bytes).map_err(|e| e.to_string())?]);
    }
    if let (true, 0) = (x.dtype().is_low_bit(), d) {
        // Low-bit weights (whole bytes a row): their rows' bytes one after another.
        let mut bytes = Vec::new();
        for t in ins {
            match t.as_low_bit() {
                Some(b) if t.dtype() == x.dtype() => bytes.extend_from_slice(b),
                _ => return Err("cannot concatenate different weight formats".into()),
            }
        }
        return Ok(vec![Tensor::from_low_bit(x.dtype(), shape, bytes).map_err(|e| e.to_string())?]);
    }
    let outer: usize = x.shape()[..d].iter().product();
    let inner: usize = x.shape()[d + 1..].iter().product();
    let data = crate::cpu::cat_storage(ins, outer, inner, d).map_err(|e| e.to_string())?;
    Ok(vec![Tensor::new(shape, data).map_err(|e| e.to_string())?])
}

// ---- CUDA kernels (the ops that copy) ----

fn cast_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
        let (x, y) = (&ins[0], &outs[0]);
        let n: usize = y.shape.iter().product();
        let s = Strided::new(&[n], &[1], &[0]).map_err(|e| e.0)?;
        crate::ops::gpu_of(l)?
            .copy_strided(x.ptr, cuda_dt(x.dtype)?, y.ptr, cuda_dt(y.dtype)?, n, s, false)
            .map_err(|e| e.0)
    })
}

fn expand_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
        let (x, y) = (&ins[0], &outs[0]);
        let n: usize = y.shape.iter().product();
        let s =
            Strided::new(&y.shape, &broadcast_strides(&x.shape, &y.shape), &vec![0; y.shape.len()]).map_err(|e| e.0)?;
        crate::ops::gpu_of(l)?
            .copy_strided(x.ptr, cuda_dt(x.dtype)?, y.ptr, cuda_dt(y.dtype)?, n, s, false)
            .map_err(|e| e.0)
    })
}

fn cat_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let y = &outs[0];
        let d = dim_index(parse_cat(attrs)?, y.shape.len())?;
        let ost = contiguous_strides(&y.shape);
        let size = cuda_dt(y.dtype)?.size() as u64;
        let mut at = 0usize;
        for x in ins {
            let s = Strided::new(&x.shape, &contiguous_strides(&x.shape), &ost).map_err(|e| e.0)?;
            let dst = y.ptr + (at as i64 * ost[d]) as u64 * size;
            let n = x.shape.iter().product();
            crate::ops::gpu_of(l)?
                .copy_strided(x.ptr, cuda_dt(x.dtype)?, dst, cuda_dt(y.dtype)?, n, s, true)
                .map_err(|e| e.0)?;
            at += x.shape[d];
        }
        Ok(())
    })
}

// ---- the table entries ----

/// A one-input op whose output keeps the input's dtype, shaped by `rule`.
fn shaped(
    name: &'static str,
    rule: impl Fn(&TensorMeta, &str) -> Result<Shape, String> + Send + Sync + 'static,
    check: crate::custom_op::AttrCheck,
    cpu: crate::custom_op::CpuImpl,
) -> CustomOp {
    let rule = Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| Ok(same(&ins[0], rule(&ins[0], attrs)?))));
    CustomOp::built_in(name, 1, rule, check, cpu)
}

/// A view op: its CPU kernel and its CUDA form both from `view`.
fn entry(
    name: &'static str,
    rule: impl Fn(&TensorMeta, &str) -> Result<Shape, String> + Send + Sync + 'static,
    check: crate::custom_op::AttrCheck,
    view: ViewFn,
) -> CustomOp {
    CustomOp { view: Some(view), ..shaped(name, rule, check, cpu_by_view(view)) }
}

/// The layout ops as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    let view = entry(
        VIEW,
        |x, a| view_shape(&x.shape, &parse_sizes(VIEW, a)?),
        |a| parse_sizes(VIEW, a).map(|_| ()),
        view_of_reshape,
    );
    let reshape = entry(
        RESHAPE,
        |x, a| view_shape(&x.shape, &parse_sizes(RESHAPE, a)?),
        |a| parse_sizes(RESHAPE, a).map(|_| ()),
        view_of_reshape,
    );
    let transpose = entry(
        TRANSPOSE,
        |x, a| {
            let (a, b) = parse_pair(a)?;
            let (a, b) = (dim_index(a, x.shape.len())?, dim_index(b, x.shape.len())?);
            let mut shape = x.shape.clone();
            shape.swap(a, b);
            Ok(shape)
        },
        |a| parse_pair(a).map(|_| ()),
        view_of_transpose,
    );
    let unsqueeze = entry(
        UNSQUEEZE,
        |x, a| {
            let d = dim_index(parse_one(a)?, x.shape.len() + 1)?;
            let mut shape = x.shape.clone();
            shape.insert(d, Dim::new(1));
            Ok(shape)
        },
        |a| parse_one(a).map(|_| ()),
        view_of_reshape,
    );
    let slice = entry(
        SLICE,
        |x, a| {
            let s = Slice::parse(a)?;
            let d = dim_index(s.dim, x.shape.len())?;
            let len = x.shape[d]
                .as_static()
                .ok_or_else(|| format!("slicing the symbolic dim {} is not supported", x.shape[d]))?;
            let mut shape = x.shape.clone();
            shape[d] = Dim::new(slice_len(s.start, s.end, s.step, len).ok_or("step must be > 0")?);
            Ok(shape)
        },
        |a| Slice::parse(a).map(|_| ()),
        view_of_slice,
    );
    let cast = CustomOp {
        outputs: Outputs::Rule(Arc::new(|ins: &[TensorMeta], attrs: &str| {
            Ok(vec![TensorMeta { dtype: parse_dtype(attrs)?, shape: ins[0].shape.clone() }])
        })),
        cpu: Arc::new(|ins: &[&Tensor], _: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            Ok(vec![ins[0].cast(outs[0].0).map_err(|e| e.to_string())?])
        }),
        cuda: Some(cast_cuda()),
        ..entry(TO_DTYPE, |x, _| Ok(x.shape.clone()), |a| parse_dtype(a).map(|_| ()), view_of_cast)
    };
    let expand_cpu: crate::custom_op::CpuImpl =
        Arc::new(|ins: &[&Tensor], _: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
            let (x, shape) = (ins[0], &outs[0].1);
            Ok(vec![cpu_view(x, shape, &broadcast_strides(x.shape(), shape), 0)?])
        });
    let expand = CustomOp {
        cuda: Some(expand_cuda()),
        ..shaped(
            EXPAND,
            |x, a| expand_shape(x, &parse_sizes(EXPAND, a)?),
            |a| parse_sizes(EXPAND, a).map(|_| ()),
            expand_cpu,
        )
    };
    let cat = CustomOp {
        extra_inputs: usize::MAX,
        cuda: Some(cat_cuda()),
        ..CustomOp::built_in(CAT, 1, Outputs::Rule(Arc::new(cat_rule)), |a| parse_cat(a).map(|_| ()), Arc::new(cat_cpu))
    };
    let mut out = vec![view, reshape, expand, transpose, unsqueeze, slice, cast, cat];
    for o in &mut out {
        if matches!(o.name, VIEW | RESHAPE | EXPAND) {
            o.sizes = Some(map_sizes(o.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_contiguous_only_when_their_strides_say_so() {
        // [1, seq, h, d] -> [1, h, seq, d]: a copy unless seq or h is 1.
        let st = |s: &[usize], a: usize, b: usize| {
            let mut v = contiguous_strides(s);
            v.swap(a, b);
            v
        };
        assert!(is_contiguous(&[1, 4, 1, 16], &st(&[1, 1, 4, 16], 1, 2)));
        assert!(!is_contiguous(&[1, 4, 3, 16], &st(&[1, 3, 4, 16], 1, 2)));
        // A slice of the last dim of [1, 1, 96] is contiguous; of [1, 2, 96] it is not.
        assert!(is_contiguous(&[1, 1, 32], &contiguous_strides(&[1, 1, 96])));
        assert!(!is_contiguous(&[1, 2, 32], &contiguous_strides(&[1, 2, 96])));
        assert_eq!(broadcast_strides(&[1, 16], &[1, 4, 3, 16]), vec![0, 0, 0, 1]);
    }

    #[test]
    fn views_of_strided_tensors_split_and_merge_runs_of_dims() {
        // q's columns of a fused [1, 5, 96] q/k/v output: [1, 5, 64] with strides [480, 96, 1],
        // viewed as heads of 16.
        assert_eq!(view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 5, 4, 16]), Some(vec![480, 96, 16, 1]));
        // Contiguous tensors view as anything of their size; merging dims of different runs
        // (the sliced columns with the rows) cannot.
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]), Some(vec![4, 1]));
        assert_eq!(view_strides(&[2, 3, 4], &[12, 4, 1], &[24]), Some(vec![1]));
        assert_eq!(view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 320]), None);
        assert_eq!(view_strides(&[1, 5, 64], &[480, 96, 1], &[1, 5, 64]), Some(vec![480, 96, 1]));
        // A transposed tensor merges only the dims still laid out together.
        assert_eq!(view_strides(&[4, 5, 16], &[16, 64, 1], &[4, 5, 4, 4]), Some(vec![16, 64, 4, 1]));
        assert_eq!(view_strides(&[4, 5, 16], &[16, 64, 1], &[20, 16]), None);
        assert_eq!(view_strides(&[2, 3], &[3, 1], &[7]), None);
    }

    /// Each view op's place in its input's memory, as the CUDA executor reads it: a transpose
    /// swaps strides, a slice moves the offset, a reshape of a strided input that no strides
    /// say is a contiguous copy, a cast to the same dtype is the input.
    #[test]
    fn views_say_where_their_output_lies() {
        let at = |op: Op, shape: &[usize], st: &[i64], out: &[usize], dts: (DType, DType)| {
            let Op { name, attrs } = &op;
            let c = crate::registry::custom_op(name).unwrap();
            let v =
                ViewIn { attrs, in_shape: shape, in_strides: st, in_dtype: dts.0, out_shape: out, out_dtype: dts.1 };
            c.view.expect("a view op")(&v)
        };
        let f = (DType::F32, DType::F32);
        let strided = |offset, strides: &[i64]| View::Strided { offset, strides: strides.to_vec() };
        assert_eq!(at(Op::transpose(1, -1), &[2, 3, 4], &[12, 4, 1], &[2, 4, 3], f), strided(0, &[12, 1, 4]));
        assert_eq!(
            at(Op::slice(Slice::new(-1, 32, 64)), &[1, 5, 96], &[480, 96, 1], &[1, 5, 32], f),
            strided(32, &[480, 96, 1])
        );
        let s2 = Slice { dim: 1, start: 1, end: i64::MAX, step: 2 };
        assert_eq!(at(Op::slice(s2), &[2, 6], &[6, 1], &[2, 3], f), strided(1, &[6, 2]));
        let r = Op::reshape(vec![SizeArg::Dim(Dim::new(1)), SizeArg::Infer]);
        assert_eq!(at(r.clone(), &[1, 5, 64], &[480, 96, 1], &[1, 320], f), View::Contiguous);
        assert_eq!(at(r, &[1, 5, 64], &[320, 64, 1], &[1, 320], f), strided(0, &[320, 1]));
        assert_eq!(at(Op::unsqueeze(1), &[4, 8], &[8, 1], &[4, 1, 8], f), strided(0, &[8, 8, 1]));
        assert_eq!(at(Op::to_dtype(DType::F32), &[4, 8], &[1, 4], &[4, 8], f), strided(0, &[1, 4]));
        assert_eq!(at(Op::to_dtype(DType::BF16), &[4, 8], &[8, 1], &[4, 8], (DType::F32, DType::BF16)), View::Kernel);
    }

    /// A slice of the leading rows is a prefix of x's memory: the CPU copies it (a reshape of
    /// all of x would be the wrong size).
    #[test]
    fn a_slice_of_leading_rows_is_copied_on_the_cpu() {
        let x = Tensor::from_f32(vec![4, 2], (0..8).map(|i| i as f32).collect()).unwrap();
        let y = crate::cpu::eval(&Op::slice(Slice::new(0, 0, 2)), &[&x], &Default::default()).unwrap();
        assert_eq!((y.shape(), y.to_f32().to_vec()), (&[2, 2][..], vec![0.0, 1.0, 2.0, 3.0]));
        let y = crate::cpu::eval(&Op::slice(Slice::new(0, 2, 4)), &[&x], &Default::default()).unwrap();
        assert_eq!(y.to_f32().to_vec(), vec![4.0, 5.0, 6.0, 7.0]);
    }

    #[test]
    fn layout_ops_read_back_what_they_print() {
        let s = Slice { dim: -1, start: 4, end: i64::MAX, step: 2 };
        assert_eq!(Op::slice(s).attrs(), "dim=-1, start=4, end=end, step=2");
        assert_eq!(Op::slice(s).slice_of(), Some(s));
        assert_eq!(Op::transpose(1, 2).transpose_dims(), Some((1, 2)));
        assert_eq!(Op::unsqueeze(-1).unsqueeze_dim(), Some(-1));
        assert_eq!(Op::cat(-1).cat_dim(), Some(-1));
        assert_eq!(Op::to_dtype(DType::BF16).to_dtype_of(), Some(DType::BF16));
        let sizes = vec![SizeArg::Dim(Dim::new(1)), SizeArg::Dim(Dim::sym("seq").mul(&Dim::new(2))), SizeArg::Infer];
        assert_eq!(Op::view(sizes.clone()).view_sizes(), Some(sizes.clone()));
        assert_eq!(Op::expand(sizes.clone()).expand_sizes(), Some(sizes));
        assert_eq!(Op::transpose(1, 2).slice_of(), None);
        let e = crate::op_text::parse_op(SLICE, "dim=0, start=0, end=4, step=0").unwrap_err().to_string();
        assert!(e.contains("step") && e.contains("positive"), "{e}");
    }
}

#[cfg(test)]
mod symbol_tests {
    use super::*;
    use crate::ir::GraphBuilder;

    /// A size list's symbols follow the graph: `specialize` fixes them in the attribute text
    /// (the kvcache transform fixes `batch` to 1), and the CPU binds the rest at run time.
    #[test]
    fn size_lists_specialise_and_bind_their_symbols() {
        let mut b = GraphBuilder::new(std::sync::Arc::new(crate::weights::WeightStore::new("test")));
        let (batch, seq) = (Dim::sym("batch"), Dim::sym("seq"));
        let x = b.input("x", DType::F32, vec![batch.clone(), seq.clone(), Dim::new(8)]);
        let sizes = vec![SizeArg::Dim(batch), SizeArg::Dim(seq), SizeArg::Dim(Dim::new(2)), SizeArg::Infer];
        let v = b.op("v", Op::view(sizes), &[x]).unwrap();
        b.output(v);
        let mut g = b.finish().unwrap();
        g.specialize("batch", 1);
        assert_eq!(g.nodes[0].op.attrs, "[1, seq, 2, -1]");
        assert_eq!(g.meta(g.outputs[0]).to_string(), "f32[1, seq, 2, 4]");
        let t = Tensor::from_f32(vec![1, 3, 8], (0..24).map(|i| i as f32).collect()).unwrap();
        let bind: crate::shape::Bindings = [("seq".to_string(), 3)].into_iter().collect();
        let y = crate::cpu::eval(&g.nodes[0].op, &[&t], &bind).unwrap();
        assert_eq!(y.shape(), &[1, 3, 2, 4]);
        let e = crate::cpu::eval(&g.nodes[0].op, &[&t], &Default::default()).unwrap_err().to_string();
        assert!(e.contains("seq") && e.contains("not bound"), "{e}");
    }
}

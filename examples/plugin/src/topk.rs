//! `example.topk(x)`, attrs `k=<1..=8>`: a typed op with two outputs, the k largest values of
//! each row of x (x's float type) and their indices (i64), largest first, ties to the lower
//! index. Its shape rule (`topk_outputs`) says so from x's metadata; the CPU kernel reads x as
//! stored (f32, bf16 or f16 bytes); the CUDA kernel is `topk.cu`.
//!
//! `add_topk_outputs` (transform, stage `compile`, off unless enabled; option `k`) appends the
//! top-k of the logits to the graph's outputs (values, then indices): candidates a caller can
//! read without copying the whole vocabulary back.

use autodeploy_sdk::abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec};
use autodeploy_sdk::ffi::{
    CudaLauncherRef, DeviceDtype, DeviceTensorView, Dim3, DimSpec, GraphRef, InputMeta, KernelArg, OutputSpec,
    Transform, TypedView, TypedViewMut,
};

/// `k` from the attribute text (`k=2`), 1..=8.
fn k_of(attrs: &str) -> Result<usize, String> {
    match super::attr(attrs, "k").map(str::parse::<usize>) {
        Some(Ok(k)) if (1..=8).contains(&k) => Ok(k),
        _ => Err(format!("attrs `{attrs}`: k must be 1..=8")),
    }
}

/// Values like x with the last size k, indices i64 of the same shape.
pub extern "C" fn topk_outputs(ins: RSlice<'_, InputMeta>, attrs: RStr<'_>) -> RResult<RVec<OutputSpec>, RString> {
    let k = match k_of(attrs.as_str()) {
        Ok(k) => k,
        Err(e) => return RResult::RErr(e.into()),
    };
    let x = &ins[0];
    if x.dtype == DeviceDtype::I64 || x.dims.is_empty() {
        return RResult::RErr(
            format!("x must be a float tensor of rank >= 1, got {:?} of rank {}", x.dtype, x.dims.len()).into(),
        );
    }
    if let ROption::RSome(n) = x.dims[x.dims.len() - 1] {
        if (n as usize) < k {
            return RResult::RErr(format!("rows of {n} cannot give the top {k}").into());
        }
    }
    let mut dims: RVec<DimSpec> = (0..x.dims.len() - 1).map(|d| DimSpec::Of { input: 0, dim: d as u32 }).collect();
    dims.push(DimSpec::Fixed(k as u64));
    RResult::ROk(
        vec![OutputSpec { dtype: x.dtype, dims: dims.clone() }, OutputSpec { dtype: DeviceDtype::I64, dims }].into(),
    )
}

/// Element `i` of a float tensor's little-endian bytes, as f32.
fn read(dtype: DeviceDtype, b: &[u8], i: usize) -> f32 {
    match dtype {
        DeviceDtype::F32 => f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap_or_default()),
        DeviceDtype::BF16 => f32::from_bits((u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32) << 16),
        DeviceDtype::F16 => half_to_f32(u16::from_le_bytes([b[2 * i], b[2 * i + 1]])),
        DeviceDtype::I64 => i64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap_or_default()) as f32,
    }
}

/// IEEE half to f32 (the example depends on the SDK only).
fn half_to_f32(h: u16) -> f32 {
    let (sign, exp, frac) = ((h >> 15) as u32, ((h >> 10) & 0x1f) as u32, (h & 0x3ff) as u32);
    let bits = match (exp, frac) {
        (0, 0) => sign << 31,
        (0, _) => return if sign == 1 { -1.0 } else { 1.0 } * frac as f32 * 2f32.powi(-24),
        (31, _) => (sign << 31) | 0x7f80_0000 | (frac << 13),
        _ => (sign << 31) | ((exp + 112) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

/// Copies element `i` of `src` (same dtype) to element `j` of `dst`.
fn copy_elem(dtype: DeviceDtype, src: &[u8], i: usize, dst: &mut [u8], j: usize) {
    let s = dtype.size();
    dst[j * s..(j + 1) * s].copy_from_slice(&src[i * s..(i + 1) * s]);
}

pub extern "C" fn topk_cpu(
    ins: RSlice<'_, TypedView<'_>>,
    attrs: RStr<'_>,
    outs: RSliceMut<'_, TypedViewMut<'_>>,
) -> RResult<(), RString> {
    let k = match k_of(attrs.as_str()) {
        Ok(k) => k,
        Err(e) => return RResult::RErr(e.into()),
    };
    let x = ins[0];
    let n = *x.shape.last().unwrap_or(&0);
    let rows = if n == 0 { 0 } else { x.bytes.len() / x.dtype.size() / n };
    let outs = outs.into_mut_slice();
    let [values, indices] = outs else { return RResult::RErr(format!("{} outputs, expected 2", outs.len()).into()) };
    let mut order: Vec<usize> = Vec::with_capacity(n);
    for r in 0..rows {
        order.clear();
        order.extend(0..n);
        // Largest first; ties to the lower index (a stable sort keeps index order).
        order.sort_by(|&a, &b| read(x.dtype, &x.bytes, r * n + b).total_cmp(&read(x.dtype, &x.bytes, r * n + a)));
        for (j, &i) in order.iter().take(k).enumerate() {
            copy_elem(x.dtype, &x.bytes, r * n + i, &mut values.bytes, r * k + j);
            indices.bytes[8 * (r * k + j)..8 * (r * k + j + 1)].copy_from_slice(&(i as i64).to_le_bytes());
        }
    }
    RResult::ROk(())
}

pub extern "C" fn topk_cuda(
    ins: RSlice<'_, DeviceTensorView<'_>>,
    outs: RSlice<'_, DeviceTensorView<'_>>,
    attrs: RStr<'_>,
    mut gpu: CudaLauncherRef<'_>,
) -> RResult<(), RString> {
    let k = match k_of(attrs.as_str()) {
        Ok(k) => k,
        Err(e) => return RResult::RErr(e.into()),
    };
    let x = ins[0];
    let entry = match x.dtype {
        DeviceDtype::F32 => "example_topk_f32",
        DeviceDtype::BF16 => "example_topk_bf16",
        other => return RResult::RErr(format!("example.topk has no {other:?} kernel").into()),
    };
    let n = *x.shape.last().unwrap_or(&0);
    let rows = if n == 0 { 0 } else { x.shape.iter().product::<usize>() / n };
    if rows == 0 {
        return RResult::ROk(());
    }
    let args = [
        KernelArg::ptr(x.ptr),
        KernelArg::ptr(outs[0].ptr),
        KernelArg::ptr(outs[1].ptr),
        KernelArg::i64(rows as i64),
        KernelArg::i32(n as i32),
        KernelArg::i32(k as i32),
    ];
    gpu.launch(
        include_str!("topk.cu").into(),
        entry.into(),
        Dim3 { x: rows.div_ceil(128) as u32, y: 1, z: 1 },
        Dim3 { x: 128, y: 1, z: 1 },
        0,
        args.as_slice().into(),
    )
}

pub struct AddTopkOutputs;

impl Transform for AddTopkOutputs {
    fn apply(&self, mut graph: GraphRef<'_>, options: RStr<'_>) -> RResult<RString, RString> {
        let k = options
            .as_str()
            .lines()
            .find_map(|l| l.split_once('=').filter(|(key, _)| key.trim() == "k").map(|(_, v)| v.trim().to_string()))
            .unwrap_or_else(|| "4".into());
        let outputs = graph.outputs();
        let Some(&logits) = outputs.first() else { return RResult::RErr("the graph has no output".into()) };
        let at = graph.num_nodes();
        let made = graph.insert_node_outputs(
            at,
            "logits_topk".into(),
            "example.topk".into(),
            [logits][..].into(),
            format!("k={k}").as_str().into(),
        );
        let vs = match made {
            RResult::ROk(v) => v,
            RResult::RErr(e) => return RResult::RErr(e),
        };
        for &v in vs.iter() {
            let n = graph.outputs().len();
            if let RResult::RErr(e) = graph.set_output(n, v) {
                return RResult::RErr(e);
            }
        }
        RResult::ROk(format!("appended the logits' top {k} (values, indices) to the outputs").into())
    }
}

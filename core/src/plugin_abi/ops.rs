//! Plugin ops across the ABI: a library's f32 ops (one output shaped like an input, values as
//! f32) and typed ops (f32/bf16/f16/i64 tensors as stored, several outputs, their own shape
//! rule) as host [`CustomOp`]s, their CPU kernels on host tensors and CUDA kernels through the
//! host's launcher.

use std::sync::Arc;

use autodeploy_sdk::abi_stable::sabi_trait::TD_Opaque;
use autodeploy_sdk::abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString};
use autodeploy_sdk::ffi;

use crate::custom_op::{CustomOp, DeviceTensor, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::shape::Dim;
use crate::tensor::Tensor;

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// A library's f32 op (`PluginDecl::op`, `op_with_cuda`).
pub(super) fn f32_op(
    name: &str,
    version: &str,
    origin: &str,
    inputs: u32,
    output_like: u32,
    cpu: ffi::CpuKernel,
    cuda: ROption<ffi::CudaKernel>,
) -> CustomOp {
    CustomOp {
        name: leak(name),
        version: leak(version),
        inputs: inputs as usize,
        outputs: Outputs::Like(output_like as usize),
        origin: leak(origin),
        check_attrs: None,
        cpu: Arc::new(
            move |ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                let y = run_cpu_kernel(cpu, ins, attrs, output_like as usize)?;
                let (dtype, shape) = outs.first().cloned().ok_or("no output")?;
                Ok(vec![Tensor::from_f32_as(dtype, shape, y).map_err(|e| e.to_string())?])
            },
        ),
        cuda: cuda.into_option().map(|k| {
            Arc::new(
                move |ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, launcher: &mut dyn KernelLauncher| {
                    let out = outs.first().ok_or("no output")?;
                    run_cuda_kernel(k, ins, out, attrs, launcher)
                },
            ) as crate::custom_op::CudaImpl
        }),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

/// A library's typed op (`PluginDecl::typed_op`).
pub(super) fn typed_op(
    name: &str,
    version: &str,
    origin: &str,
    inputs: u32,
    outputs: ffi::OutputsFn,
    cpu: ffi::TypedCpuKernel,
    cuda: ROption<ffi::TypedCudaKernel>,
) -> CustomOp {
    CustomOp {
        name: leak(name),
        version: leak(version),
        inputs: inputs as usize,
        outputs: Outputs::Rule(Arc::new(move |ins: &[TensorMeta], attrs: &str| typed_outputs(outputs, ins, attrs))),
        origin: leak(origin),
        check_attrs: None,
        cpu: Arc::new(
            move |ins: &[&Tensor], attrs: &str, outs: &[(DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                run_typed_cpu_kernel(cpu, ins, attrs, outs)
            },
        ),
        cuda: cuda.into_option().map(|k| {
            Arc::new(
                move |ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, launcher: &mut dyn KernelLauncher| {
                    run_typed_cuda_kernel(k, ins, outs, attrs, launcher)
                },
            ) as crate::custom_op::CudaImpl
        }),
        extra_inputs: 0,
        sizes: None,
        view: None,
        linear_weights: false,
        cuda_scratch: None,
        cuda_attrs: None,
    }
}

fn elem_type(d: DType) -> Result<ffi::DeviceDtype, String> {
    match d {
        DType::I64 => Ok(ffi::DeviceDtype::I64),
        d => device_dtype(d),
    }
}

fn host_dtype(d: ffi::DeviceDtype) -> DType {
    match d {
        ffi::DeviceDtype::F32 => DType::F32,
        ffi::DeviceDtype::BF16 => DType::BF16,
        ffi::DeviceDtype::F16 => DType::F16,
        ffi::DeviceDtype::I64 => DType::I64,
    }
}

/// The library's shape rule on the host's metadata: symbolic sizes go over as unknown and come
/// back as the input's own size expression.
fn typed_outputs(rule: ffi::OutputsFn, ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let metas = ins
        .iter()
        .map(|m| {
            Ok(ffi::InputMeta {
                dtype: elem_type(m.dtype)?,
                dims: m.shape.iter().map(|d| d.as_static().map(|n| n as u64).into()).collect(),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let specs = rule(metas.as_slice().into(), attrs.into()).into_result().map_err(|e| e.into_string())?;
    specs
        .iter()
        .enumerate()
        .map(|(k, o)| {
            let shape = o
                .dims
                .iter()
                .map(|d| match *d {
                    ffi::DimSpec::Fixed(n) => Ok(Dim::new(n as usize)),
                    ffi::DimSpec::Of { input, dim } => ins
                        .get(input as usize)
                        .and_then(|m| m.shape.get(dim as usize))
                        .cloned()
                        .ok_or_else(|| format!("output {k}: input {input} has no dim {dim}")),
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(TensorMeta { dtype: host_dtype(o.dtype), shape })
        })
        .collect()
}

/// What a typed float output holds before the kernel writes it (the f32 mark, or its top half
/// for bf16/f16, which is the same NaN there); integer outputs start as zeros.
fn marked(dtype: DType, n: usize) -> Vec<u8> {
    let mark = crate::custom_op::UNWRITTEN.to_bits();
    match dtype {
        DType::F32 => mark.to_le_bytes().repeat(n),
        DType::BF16 => ((mark >> 16) as u16).to_le_bytes().repeat(n),
        DType::F16 => half::f16::from_f32(crate::custom_op::UNWRITTEN).to_bits().to_le_bytes().repeat(n),
        _ => vec![0u8; n * dtype.size_in_bytes()],
    }
}

fn run_typed_cpu_kernel(
    k: ffi::TypedCpuKernel,
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
) -> Result<Vec<Tensor>, String> {
    let bytes = ins.iter().map(|t| t.to_le_bytes().map_err(|e| e.to_string())).collect::<Result<Vec<_>, String>>()?;
    let views = ins
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            Ok(ffi::TypedView { dtype: elem_type(t.dtype())?, shape: t.shape().into(), bytes: b.as_slice().into() })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut out_bytes: Vec<Vec<u8>> = outs.iter().map(|(d, s)| marked(*d, s.iter().product())).collect();
    let mut out_views = Vec::with_capacity(outs.len());
    for ((d, s), b) in outs.iter().zip(out_bytes.iter_mut()) {
        out_views.push(ffi::TypedViewMut {
            dtype: elem_type(*d)?,
            shape: s.as_slice().into(),
            bytes: b.as_mut_slice().into(),
        });
    }
    k(views.as_slice().into(), attrs.into(), out_views.as_mut_slice().into())
        .into_result()
        .map_err(|e| e.into_string())?;
    drop(out_views);
    outs.iter()
        .zip(out_bytes)
        .map(|((d, s), b)| Tensor::from_le_bytes(*d, s.clone(), &b).map_err(|e| e.to_string()))
        .collect()
}

fn device_view(t: &DeviceTensor) -> Result<ffi::DeviceTensorView<'_>, String> {
    Ok(ffi::DeviceTensorView { ptr: t.ptr, shape: t.shape.as_slice().into(), dtype: elem_type(t.dtype)? })
}

fn run_typed_cuda_kernel(
    k: ffi::TypedCudaKernel,
    ins: &[DeviceTensor],
    outs: &[DeviceTensor],
    attrs: &str,
    launcher: &mut dyn KernelLauncher,
) -> Result<(), String> {
    let ins = ins.iter().map(device_view).collect::<Result<Vec<_>, _>>()?;
    let outs = outs.iter().map(device_view).collect::<Result<Vec<_>, _>>()?;
    let mut host = HostLauncher(launcher);
    k(ins.as_slice().into(), outs.as_slice().into(), attrs.into(), ffi::CudaLauncher_TO::from_ptr(&mut host, TD_Opaque))
        .into_result()
        .map_err(|e| e.into_string())
}

/// Calls a library's CPU kernel on host tensors.
fn run_cpu_kernel(
    k: ffi::CpuKernel,
    ins: &[&Tensor],
    attrs: &str,
    output_like: usize,
) -> std::result::Result<Vec<f32>, String> {
    let data: Vec<std::borrow::Cow<[f32]>> = ins.iter().map(|t| t.to_f32()).collect();
    let views: Vec<ffi::TensorView> = ins
        .iter()
        .zip(&data)
        .map(|(t, d)| ffi::TensorView { shape: t.shape().into(), data: d.as_ref().into() })
        .collect();
    let n = ins.get(output_like).map_or(0, |t| t.numel());
    // Marked, so `debug_checks` can tell values the kernel never wrote.
    let mut out = vec![crate::custom_op::UNWRITTEN; n];
    match k(views.as_slice().into(), attrs.into(), out.as_mut_slice().into()) {
        RResult::ROk(()) => Ok(out),
        RResult::RErr(e) => Err(e.into_string()),
    }
}

/// The host's launcher as the ABI's `CudaLauncher`.
pub(super) struct HostLauncher<'a>(pub(super) &'a mut dyn crate::custom_op::KernelLauncher);

impl ffi::CudaLauncher for HostLauncher<'_> {
    fn launch(
        &mut self,
        source: RStr<'_>,
        entry: RStr<'_>,
        grid: ffi::Dim3,
        block: ffi::Dim3,
        shared_mem_bytes: u32,
        args: RSlice<'_, ffi::KernelArg>,
    ) -> RResult<(), RString> {
        use crate::custom_op::KernelArg as A;
        let args: Vec<A> = args
            .iter()
            .map(|a| match a.kind {
                ffi::ArgKind::Ptr => A::Ptr(a.bits),
                ffi::ArgKind::I32 => A::I32(a.bits as u32 as i32),
                ffi::ArgKind::I64 => A::I64(a.bits as i64),
                ffi::ArgKind::F32 => A::F32(f32::from_bits(a.bits as u32)),
            })
            .collect();
        let dims = crate::custom_op::LaunchDims {
            grid: [grid.x, grid.y, grid.z],
            block: [block.x, block.y, block.z],
            shared_mem_bytes,
        };
        match self.0.launch(source.as_str(), entry.as_str(), dims, &args) {
            Ok(()) => RResult::ROk(()),
            Err(e) => RResult::RErr(e.into()),
        }
    }
}

pub(super) fn device_dtype(d: DType) -> std::result::Result<ffi::DeviceDtype, String> {
    match d {
        DType::F32 => Ok(ffi::DeviceDtype::F32),
        DType::BF16 => Ok(ffi::DeviceDtype::BF16),
        DType::F16 => Ok(ffi::DeviceDtype::F16),
        other => Err(format!("a plugin's CUDA kernel takes f32, bf16 or f16 tensors, not {other:?}")),
    }
}

/// Calls a library's CUDA kernel on device tensors.
fn run_cuda_kernel(
    k: ffi::CudaKernel,
    ins: &[DeviceTensor],
    out: &DeviceTensor,
    attrs: &str,
    launcher: &mut dyn KernelLauncher,
) -> std::result::Result<(), String> {
    fn view(t: &DeviceTensor) -> std::result::Result<ffi::DeviceTensorView<'_>, String> {
        Ok(ffi::DeviceTensorView { ptr: t.ptr, shape: t.shape.as_slice().into(), dtype: device_dtype(t.dtype)? })
    }
    let views = ins.iter().map(view).collect::<std::result::Result<Vec<_>, _>>()?;
    let out = view(out)?;
    let mut host = HostLauncher(launcher);
    match k(views.as_slice().into(), out, attrs.into(), ffi::CudaLauncher_TO::from_ptr(&mut host, TD_Opaque)) {
        RResult::ROk(()) => Ok(()),
        RResult::RErr(e) => Err(e.into_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{infer, Op};
    use autodeploy_sdk::abi_stable::std_types::{RSliceMut, RVec};

    /// `test.double_argmax(x)`: (2·x in x's dtype, each row's argmax as i64 [rows]); attrs
    /// `bad=dim` makes its rule name a dim x lacks, `bad=skip` leaves the doubled values unwritten.
    extern "C" fn rule(ins: RSlice<'_, ffi::InputMeta>, attrs: RStr<'_>) -> RResult<RVec<ffi::OutputSpec>, RString> {
        let x = &ins[0];
        let r = x.dims.len() as u32;
        let same: RVec<ffi::DimSpec> = (0..r).map(|d| ffi::DimSpec::Of { input: 0, dim: d }).collect();
        let mut rows: RVec<ffi::DimSpec> = (0..r - 1).map(|d| ffi::DimSpec::Of { input: 0, dim: d }).collect();
        if attrs.as_str() == "bad=dim" {
            rows.push(ffi::DimSpec::Of { input: 0, dim: 9 });
        }
        RResult::ROk(
            vec![
                ffi::OutputSpec { dtype: x.dtype, dims: same },
                ffi::OutputSpec { dtype: ffi::DeviceDtype::I64, dims: rows },
            ]
            .into(),
        )
    }

    extern "C" fn cpu(
        ins: RSlice<'_, ffi::TypedView<'_>>,
        attrs: RStr<'_>,
        outs: RSliceMut<'_, ffi::TypedViewMut<'_>>,
    ) -> RResult<(), RString> {
        let x = ins[0];
        assert_eq!(x.dtype, ffi::DeviceDtype::BF16);
        let v: Vec<f32> =
            x.bytes.chunks(2).map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16)).collect();
        let n = *x.shape.last().unwrap();
        let outs = outs.into_mut_slice();
        if attrs.as_str() != "bad=skip" {
            for (i, a) in v.iter().enumerate() {
                let h = ((2.0 * a).to_bits() >> 16) as u16;
                outs[0].bytes[2 * i..2 * i + 2].copy_from_slice(&h.to_le_bytes());
            }
        }
        for (r, row) in v.chunks(n).enumerate() {
            let arg = (0..n).fold(0, |b, i| if row[i] > row[b] { i } else { b }) as i64;
            outs[1].bytes[8 * r..8 * r + 8].copy_from_slice(&arg.to_le_bytes());
        }
        RResult::ROk(())
    }

    /// A typed op across the ABI: its rule keeps symbolic sizes, gives an i64 output, and its
    /// kernel reads bf16 as stored; a rule naming a dim that does not exist and an output left
    /// unwritten are caught.
    #[test]
    fn a_typed_op_has_its_own_dtypes_shapes_and_outputs() {
        let op = typed_op("test.double_argmax", "0.1.0", "test", 1, rule, cpu, ROption::RNone);
        crate::registry::register_op(op).unwrap();
        let the_op = Op { name: "test.double_argmax", attrs: String::new() };
        let x = TensorMeta { dtype: DType::BF16, shape: vec![Dim::sym("seq"), Dim::new(4)] };
        let out = infer(&the_op, std::slice::from_ref(&x)).unwrap();
        assert_eq!(out[0], x);
        assert_eq!(out[1].to_string(), "i64[seq]");
        let bad = Op { name: "test.double_argmax", attrs: "bad=dim".into() };
        let e = infer(&bad, &[x]).unwrap_err().to_string();
        assert!(e.contains("input 0 has no dim 9") && e.contains("test.double_argmax"), "{e}");

        let t = Tensor::from_f32_as(DType::BF16, vec![2, 4], vec![1.0, 3.0, -2.0, 0.5, -1.0, -4.0, 2.5, 2.0]).unwrap();
        let opts = crate::cpu::KernelOptions::default();
        let got = crate::cpu::eval_outputs(&the_op, &[&t], &Default::default(), &opts).unwrap();
        assert_eq!(got[0].dtype(), DType::BF16);
        assert_eq!(got[0].to_f32().as_ref(), [2.0, 6.0, -4.0, 1.0, -2.0, -8.0, 5.0, 4.0]);
        assert_eq!((got[1].dtype(), got[1].shape()), (DType::I64, &[2usize][..]));
        assert_eq!(got[1].to_i64().as_ref(), [1, 2]);
        let e = crate::cpu::eval_with(&the_op, &[&t], &Default::default(), &opts).unwrap_err().to_string();
        assert!(e.contains("has 2 outputs"), "{e}");

        let skip = Op { name: "test.double_argmax", attrs: "bad=skip".into() };
        let got = crate::cpu::eval_outputs(&skip, &[&t], &Default::default(), &opts).unwrap();
        let e = crate::custom_op::check_output("op `test.double_argmax`", &got[0].to_f32()).unwrap_err().to_string();
        assert!(e.contains("left 8 of 8 outputs unwritten"), "{e}");
    }
}

//! Ops registered at run time (by plugin libraries): a name, an arity, which input the output
//! copies its dtype and shape from, a CPU implementation and optionally a CUDA one.
//! `Op::Custom` nodes dispatch here.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ops::Op;
use crate::tensor::Tensor;

/// A CPU implementation: the inputs as f32 and the node's attribute text in, the output's f32
/// values out (the host rounds them to the output dtype).
pub type CpuImpl = Arc<dyn Fn(&[&Tensor], &str) -> std::result::Result<Vec<f32>, String> + Send + Sync>;

/// A tensor on the GPU as a CUDA implementation sees it (dense, row-major).
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    pub ptr: u64,
    pub shape: Vec<usize>,
    pub dtype: crate::DType,
}

/// A kernel argument, and a launch's grid and block sizes: the CUDA executor's own.
pub use autodeploy_kernels::cuda::exec::{KernelArg, LaunchDims};

/// What a CUDA implementation launches through (the CUDA compile backend implements it):
/// compiles `source` for the device (cached) and queues `entry` on the step's stream.
pub trait KernelLauncher {
    fn launch(
        &mut self,
        source: &str,
        entry: &str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> std::result::Result<(), String>;
}

/// A CUDA implementation: the inputs and the output on the device, the node's attribute text,
/// and the launcher; it queues kernels and returns.
pub type CudaImpl = Arc<
    dyn Fn(&[DeviceTensor], &DeviceTensor, &str, &mut dyn KernelLauncher) -> std::result::Result<(), String>
        + Send
        + Sync,
>;

pub struct CustomOp {
    pub name: &'static str,
    pub version: &'static str,
    pub inputs: usize,
    pub output_like: usize,
    /// `built-in` or the library that registered it.
    pub origin: &'static str,
    pub cpu: CpuImpl,
    /// None: CPU only (a CUDA engine with this op is refused at build, naming it).
    pub cuda: Option<CudaImpl>,
}

/// The graph op for a registered op with `attrs`.
pub fn op(name: &str, attrs: &str) -> Result<Op> {
    let c =
        crate::registry::custom_op(name).ok_or_else(|| Error::Msg(format!("no op named `{name}` is registered")))?;
    Ok(Op::Custom { name: c.name, inputs: c.inputs, output_like: c.output_like, attrs: attrs.to_string() })
}

/// Runs a registered op on the CPU.
pub fn eval(
    name: &str,
    attrs: &str,
    ins: &[&Tensor],
    out_shape: Vec<usize>,
    out_dtype: crate::DType,
) -> Result<Tensor> {
    let c = crate::registry::custom_op(name)
        .ok_or_else(|| Error::op(name, "no implementation is registered for this op"))?;
    let n: usize = out_shape.iter().product();
    let y = (c.cpu)(ins, attrs).map_err(|e| Error::op(name, format!("{e} (from {})", c.origin)))?;
    if y.len() != n {
        return Err(Error::op(
            name,
            format!("returned {} values for an output of shape {out_shape:?} ({})", y.len(), c.origin),
        ));
    }
    Tensor::from_f32_as(out_dtype, out_shape, y)
}

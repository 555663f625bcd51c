//! Ops registered at run time (by plugin libraries): a name, an arity, a shape rule giving each
//! output's dtype and shape, a CPU implementation and optionally a CUDA one. `Op::Custom` nodes
//! dispatch here.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ir::TensorMeta;
use crate::ops::Op;
use crate::shape::Dim;
use crate::tensor::Tensor;

/// An op's outputs from its inputs' metadata and its attribute text: every output's dtype and
/// (symbolic) shape, or why the inputs do not fit.
pub type OutputRuleFn = Arc<dyn Fn(&[TensorMeta], &str) -> std::result::Result<Vec<TensorMeta>, String> + Send + Sync>;

/// Checks an op's attribute text.
pub type AttrCheck = fn(&str) -> std::result::Result<(), String>;

/// How an op's outputs are shaped.
#[derive(Clone)]
pub enum Outputs {
    /// One output with the dtype and shape of this input.
    Like(usize),
    /// The op's own rule.
    Rule(OutputRuleFn),
}

/// A CPU implementation: the inputs, the node's attribute text, the outputs' concrete
/// metadata and the compile backend's kernel choices in, the outputs out (the host checks their
/// dtypes and shapes).
pub type CpuImpl = Arc<
    dyn Fn(&[&Tensor], &str, &[(crate::DType, Vec<usize>)], &KernelOptions) -> std::result::Result<Vec<Tensor>, String>
        + Send
        + Sync,
>;

use crate::cpu::KernelOptions;

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

    /// The host's GPU itself, for the built-in ops' lowerings (its kernels, not source).
    fn gpu(&self) -> Option<&autodeploy_kernels::cuda::exec::Gpu> {
        None
    }

    /// Where a kernel sets error flag `f` (the step fails naming it when set), if the
    /// executor has them.
    fn error_flag(&self, _f: ErrorFlag) -> Option<u64> {
        None
    }

    /// Scratch region `k` the op's entry asked for (`cuda_scratch`).
    fn scratch(&self, _k: usize) -> Option<u64> {
        None
    }
}

/// The step's error flags: a kernel that finds an index out of range sets its flag instead of
/// reading past a buffer; the executor reads them after the step and fails it, naming the op
/// and the index (`autodeploy_kernels::cuda::exec::bad_index` decodes a flag).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorFlag {
    /// `aten.embedding`: a token id outside the table (past it, or negative).
    Embedding,
    /// `aten.index_select`: an index outside the dim.
    Gather,
}

impl ErrorFlag {
    /// Its byte offset in the flags buffer.
    pub fn offset(self) -> u64 {
        match self {
            ErrorFlag::Embedding => 0,
            ErrorFlag::Gather => 8,
        }
    }
}

/// A CUDA implementation: the inputs and the outputs on the device, the node's attribute text,
/// and the launcher; it queues kernels and returns.
pub type CudaImpl = Arc<
    dyn Fn(&[DeviceTensor], &[DeviceTensor], &str, &mut dyn KernelLauncher) -> std::result::Result<(), String>
        + Send
        + Sync,
>;

pub struct CustomOp {
    pub name: &'static str,
    pub version: &'static str,
    /// How many tensor inputs it takes, and how many more it may take (`aten.linear`'s bias: 1;
    /// `aten.cat`: `usize::MAX`).
    pub inputs: usize,
    pub extra_inputs: usize,
    pub outputs: Outputs,
    /// `built-in` or the library that registered it.
    pub origin: &'static str,
    /// Checks the attribute text when a node is made (a dump parsed back, a transform's
    /// insertion); `None`: the shape rule alone sees it.
    pub check_attrs: Option<AttrCheck>,
    pub cpu: CpuImpl,
    /// None: CPU only (a CUDA engine with this op is refused at build, naming it).
    pub cuda: Option<CudaImpl>,
    /// The attributes the CUDA implementation handles, checked when a CUDA engine is built
    /// (`aten.mean.dim` over the last dim only); `None`: any the op takes.
    pub cuda_attrs: Option<AttrCheck>,
    /// For ops whose attributes hold sizes (`aten.view`'s `[1, seq, -1]`): the attribute text
    /// with every size mapped, to bind or specialise symbolic sizes.
    pub sizes: Option<MapSizes>,
    /// For ops whose output may read its first input's memory (views): where, given the
    /// input's layout; the CUDA executor then queues no kernel.
    pub view: Option<ViewFn>,
    /// Its inputs past the first that are 2-D block-quantized weights are multiplied as linear
    /// weights (`cpu::linear_f32`): the CPU backend readies them for its kernels at load.
    pub linear_weights: bool,
    /// The scratch regions (bytes) its CUDA implementation needs besides its outputs, for
    /// inputs of these dtypes and (largest) shapes; the launcher hands them out.
    pub cuda_scratch: Option<ScratchFn>,
}

impl CustomOp {
    /// A built-in op's entry with none of the optional hooks: no CUDA kernel, no view, no
    /// sizes, no scratch; callers set what their op has with struct update syntax.
    pub fn built_in(name: &'static str, inputs: usize, outputs: Outputs, check: AttrCheck, cpu: CpuImpl) -> CustomOp {
        CustomOp {
            name,
            version: env!("CARGO_PKG_VERSION"),
            inputs,
            extra_inputs: 0,
            outputs,
            origin: "built-in",
            check_attrs: Some(check),
            cpu,
            cuda: None,
            cuda_attrs: None,
            sizes: None,
            view: None,
            linear_weights: false,
            cuda_scratch: None,
        }
    }
}

pub type ScratchFn = fn(&[(crate::DType, Vec<usize>)], &str) -> Vec<usize>;

/// Rewrites the sizes in an op's attribute text with `f`.
pub type MapSizes =
    fn(&str, &mut dyn FnMut(&Dim) -> std::result::Result<Dim, String>) -> std::result::Result<String, String>;

/// The first input's layout and the output a view op is asked for.
pub struct ViewIn<'a> {
    pub attrs: &'a str,
    pub in_shape: &'a [usize],
    /// In elements; the contiguous ones when the input is dense.
    pub in_strides: &'a [i64],
    pub in_dtype: crate::DType,
    pub out_shape: &'a [usize],
    pub out_dtype: crate::DType,
}

/// Where a view op's output lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum View {
    /// In the input's memory, `offset` elements on, at these strides.
    Strided { offset: i64, strides: Vec<i64> },
    /// The input's elements in row-major order (a reshape no strides can say): the input made
    /// contiguous is the output.
    Contiguous,
    /// Not a view for these inputs: the op's kernel runs (on a contiguous input).
    Kernel,
}

pub type ViewFn = fn(&ViewIn) -> View;

/// The graph op for a registered op with `attrs`.
pub fn op(name: &str, attrs: &str) -> Result<Op> {
    let c =
        crate::registry::custom_op(name).ok_or_else(|| Error::Msg(format!("no op named `{name}` is registered")))?;
    if let Some(check) = c.check_attrs {
        check(attrs).map_err(|e| Error::op(name, e))?;
    }
    Ok(Op { name: c.name, attrs: attrs.to_string() })
}

/// The outputs of registered op `name` on inputs `ins`: its shape rule, checked.
pub fn infer(name: &str, attrs: &str, ins: &[TensorMeta]) -> std::result::Result<Vec<TensorMeta>, String> {
    let c = crate::registry::custom_op(name).ok_or_else(|| "no op of this name is registered".to_string())?;
    let (lo, extra) = (c.inputs, c.extra_inputs);
    if ins.len() < lo || ins.len() - lo > extra {
        return Err(match extra {
            0 => format!("takes {lo} tensor inputs, got {}", ins.len()),
            usize::MAX => format!("takes at least {lo} tensor inputs, got {}", ins.len()),
            _ => format!("takes {lo} to {} tensor inputs, got {}", lo + extra, ins.len()),
        });
    }
    let out = match &c.outputs {
        Outputs::Like(i) => {
            vec![ins.get(*i).cloned().ok_or_else(|| format!("output like input {i} of {}", ins.len()))?]
        }
        Outputs::Rule(rule) => rule(ins, attrs).map_err(|e| format!("{e} ({})", c.origin))?,
    };
    if out.is_empty() {
        return Err(format!("its shape rule gave no outputs ({})", c.origin));
    }
    Ok(out)
}

/// Runs a registered op on the CPU; `outs` are its outputs' concrete dtypes and shapes.
pub fn eval(
    name: &str,
    attrs: &str,
    ins: &[&Tensor],
    outs: &[(crate::DType, Vec<usize>)],
    opts: &KernelOptions,
) -> Result<Vec<Tensor>> {
    let c = crate::registry::custom_op(name)
        .ok_or_else(|| Error::op(name, "no implementation is registered for this op"))?;
    let got = (c.cpu)(ins, attrs, outs, opts).map_err(|e| Error::op(name, format!("{e} ({})", c.origin)))?;
    if got.len() != outs.len() || got.iter().zip(outs).any(|(t, (d, s))| t.dtype() != *d || t.shape() != s.as_slice()) {
        let got: Vec<String> = got.iter().map(|t| format!("{}{:?}", t.dtype(), t.shape())).collect();
        let want: Vec<String> = outs.iter().map(|(d, s)| format!("{d}{s:?}")).collect();
        return Err(Error::op(
            name,
            format!("returned {} where its shape rule says {} ({})", got.join(", "), want.join(", "), c.origin),
        ));
    }
    Ok(got)
}

/// What a plugin's output buffer holds before the plugin writes it: a quiet NaN whose payload
/// sits in the top 16 bits, so it survives rounding to bf16 or f16 and back. A value still
/// equal to it after the call was never written.
pub const UNWRITTEN: f32 = f32::from_bits(0x7fd5_0000);

/// The `debug_checks` test of an op's output: values left [`UNWRITTEN`], NaN or Inf fail with
/// the count and the first index, naming `what` (the op and where it came from).
pub fn check_output(what: &str, out: &[f32]) -> Result<()> {
    let unwritten = out.iter().filter(|v| v.to_bits() == UNWRITTEN.to_bits()).count();
    if unwritten > 0 {
        let first = out.iter().position(|v| v.to_bits() == UNWRITTEN.to_bits()).unwrap_or(0);
        return Err(Error::Msg(format!(
            "debug_checks: {what} left {unwritten} of {} outputs unwritten (first at index {first})",
            out.len()
        )));
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        let bad = out.iter().filter(|v| !v.is_finite()).count();
        return Err(Error::Msg(format!(
            "debug_checks: {what} produced {bad} non-finite outputs of {} (first: {} at index {i})",
            out.len(),
            out[i]
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_output_tells_unwritten_from_nan_and_inf() {
        assert!(check_output("op `x`", &[0.0, 1.5, -2.0]).is_ok());
        let e = check_output("op `x`", &[0.0, UNWRITTEN, UNWRITTEN]).unwrap_err().to_string();
        assert!(e.contains("op `x` left 2 of 3 outputs unwritten (first at index 1)"), "{e}");
        let e = check_output("op `x`", &[0.0, f32::NAN, f32::INFINITY]).unwrap_err().to_string();
        assert!(e.contains("op `x` produced 2 non-finite outputs of 3 (first: NaN at index 1)"), "{e}");
        // The mark survives the round trip through bf16 and f16 (an op whose output is stored
        // in the model's dtype).
        assert_eq!(half::bf16::from_f32(UNWRITTEN).to_f32().to_bits(), UNWRITTEN.to_bits());
        assert_eq!(half::f16::from_f32(UNWRITTEN).to_f32().to_bits(), UNWRITTEN.to_bits());
    }
}

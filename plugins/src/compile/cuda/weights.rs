//! The weights on the device: read (or generated) on the host's cores a few at a time and
//! uploaded at the graph's dtypes, or, when a weight is generated values throughout
//! (`load_format = "dummy"`), made on the GPU.

use std::collections::HashMap;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::weights::{Synthetic, SYNTHETIC_CHUNK};
use autodeploy_core::{Graph, Tensor};
use autodeploy_kernels::cuda::exec::{Buffer, Dt, Gpu, Ptr};

use super::{dt, gpu_err};

/// Every weight of `graph` on the GPU, with a bar while they load: the buffers (kept alive)
/// and each param value's device address.
pub(super) fn upload(gpu: &Gpu, graph: &Graph) -> Result<(Vec<Buffer>, HashMap<usize, Ptr>)> {
    let bar = indicatif::ProgressBar::new(graph.params.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("uploading weights {bar:30} {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut params = Vec::with_capacity(graph.params.len());
    let mut param_ptr = HashMap::new();
    // Low-bit weights go up as stored; only their quantized linears read them.
    for p in graph.params.iter().filter(|p| !graph.meta(p.value).dtype.is_low_bit()) {
        dt(graph.meta(p.value).dtype, &p.weight)?;
    }
    // Read (or generate) a few weights at a time on the host's cores, then upload them.
    // Weights that are generated values throughout (`load_format = "dummy"`) are made on the
    // GPU instead: the same values, without the host's work and the copy.
    let on_device = |p: &autodeploy_core::ir::Param| -> Option<(Dt, Vec<(usize, Synthetic)>)> {
        let d = dt(graph.meta(p.value).dtype, &p.weight).ok()?;
        matches!(d, Dt::F32 | Dt::BF16 | Dt::F16).then_some(())?;
        Some((d, graph.weights.synthetic_parts(&p.weight)?))
    };
    for chunk in graph.params.chunks(8) {
        use rayon::prelude::*;
        let made: Vec<_> = chunk.iter().map(on_device).collect();
        let loaded: Vec<Result<Option<Tensor>>> = chunk
            .par_iter()
            .zip(&made)
            .map(|(p, made)| {
                if made.is_some() {
                    return Ok(None);
                }
                let meta = graph.meta(p.value);
                let t = graph.weights.load(&p.weight, meta.dtype)?;
                let want: Vec<usize> = meta.shape.iter().filter_map(|d| d.as_static()).collect();
                if t.shape() != want.as_slice() {
                    return Err(Error::TensorShape {
                        file: graph.weights.location(&p.weight).into(),
                        name: p.weight.clone(),
                        expected: want,
                        found: t.shape().to_vec(),
                    });
                }
                Ok(Some(t))
            })
            .collect();
        for ((p, t), made) in chunk.iter().zip(loaded).zip(made) {
            bar.set_message(p.weight.clone());
            bar.inc(1);
            if let Some((d, parts)) = made {
                let buf = generate(gpu, graph, p, d, &parts)?;
                param_ptr.insert(p.value.0 as usize, buf.ptr);
                params.push(buf);
                continue;
            }
            let t = t?.expect("loaded on the host when not made on the GPU");
            let bytes = host_bytes(&t)?;
            let buf = gpu.alloc(bytes.len(), &format!("weight `{}`", p.weight)).map_err(gpu_err)?;
            gpu.upload(buf.ptr, bytes).map_err(gpu_err)?;
            // The upload may read the host copy after it returns: wait before dropping it.
            gpu.sync().map_err(gpu_err)?;
            param_ptr.insert(p.value.0 as usize, buf.ptr);
            params.push(buf);
        }
    }
    gpu.sync().map_err(gpu_err)?;
    bar.finish_and_clear();
    Ok((params, param_ptr))
}

/// A weight made of generated values (`WeightStore::synthetic_parts`) made on the GPU, part by
/// part, in `d`.
fn generate(
    gpu: &Gpu,
    graph: &Graph,
    p: &autodeploy_core::ir::Param,
    d: Dt,
    parts: &[(usize, Synthetic)],
) -> Result<Buffer> {
    let want: usize = graph.meta(p.value).shape.iter().filter_map(|x| x.as_static()).product();
    let total: usize = parts.iter().map(|(n, _)| n).sum();
    if total != want {
        return Err(Error::Msg(format!(
            "weight `{}` ({}): {total} generated values for a parameter of {want}",
            p.weight,
            graph.weights.location(&p.weight)
        )));
    }
    let buf = gpu.alloc(want * d.size(), &format!("weight `{}`", p.weight)).map_err(gpu_err)?;
    let err = |e: autodeploy_kernels::cuda::Unavailable| Error::Msg(format!("generating weight `{}`: {e}", p.weight));
    // Runs of uniform parts (a MoE weight's experts) in one launch each.
    let (mut at, mut run_at, mut run) = (buf.ptr, buf.ptr, Vec::new());
    for &(n, v) in parts {
        match v {
            Synthetic::Uniform { seed, scale } => run.push((n, seed, scale)),
            Synthetic::Const(c) => {
                gpu.fill_uniform(run_at, d, &std::mem::take(&mut run), SYNTHETIC_CHUNK).map_err(err)?;
                gpu.fill_const(at, d, n, c).map_err(err)?;
                run_at = at + (n * d.size()) as u64;
            }
        }
        at += (n * d.size()) as u64;
    }
    gpu.fill_uniform(run_at, d, &run, SYNTHETIC_CHUNK).map_err(err)?;
    Ok(buf)
}

/// The bytes of a host tensor, as stored (little-endian on every host we build for).
pub(super) fn host_bytes(t: &Tensor) -> Result<&[u8]> {
    use autodeploy_core::tensor::Storage;
    fn bytes<T: Copy>(v: &[T]) -> &[u8] {
        // SAFETY: plain numeric element types without padding, read as bytes.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    Ok(match t.storage() {
        Storage::F32(v) => bytes(v),
        Storage::F16(v) => bytes(v),
        Storage::BF16(v) => bytes(v),
        Storage::I64(v) => bytes(v),
        Storage::Bool(v) => bytes(v),
        Storage::Block { .. } => return Err(Error::Msg("block-quantized tensors cannot be uploaded as is".into())),
        Storage::LowBit { bytes, .. } => bytes,
    })
}

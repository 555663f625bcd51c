//! A quantized Hugging Face checkpoint's weights (core/src/quant.rs reads its declaration):
//! the weights it scales marked and their scales checked, and for `load_format = "dummy"`
//! generated weights in the checkpoint's layout.

use autodeploy_core::error::{Error, Result};
use autodeploy_core::quant::{CheckpointQuant, QuantAlgo};
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{DType, Tensor};

/// Marks the weights a quantized checkpoint scales (every `<module>.weight` beside a
/// `<module>.weight_scale`) so they load only in their stored dtype, and checks their scales'
/// dtypes and shapes against the algorithm; a module the checkpoint says it excluded must not
/// be quantized.
pub fn mark_quantized(q: &CheckpointQuant, store: &mut WeightStore) -> Result<()> {
    let modules: Vec<String> =
        store.names().into_iter().filter_map(|n| n.strip_suffix(".weight_scale").map(str::to_string)).collect();
    if modules.is_empty() {
        return Err(Error::config(
            &q.file,
            &q.key,
            format!("a {} checkpoint, but no tensor `*.weight_scale` is in {}", q.algo.name(), store.describe()),
        ));
    }
    for m in &modules {
        let weight = format!("{m}.weight");
        if q.excluded(m) {
            return Err(Error::config(
                &q.file,
                &q.key,
                format!("`{m}` is excluded from quantization there but has a `{m}.weight_scale`"),
            ));
        }
        store.mark_scaled(&weight)?;
        let (dt, shape) = store.stored_meta(&weight)?;
        let want = match q.algo {
            QuantAlgo::Fp8 => DType::F8E4M3,
            QuantAlgo::Nvfp4 => DType::F4E2M1,
        };
        let scale = |name: &str| -> Result<(DType, Vec<usize>)> {
            let n = format!("{m}.{name}");
            store.stored_meta(&n).map_err(|_| Error::MissingTensor { name: n, where_: store.describe() })
        };
        let bad = |name: &str, found: (DType, Vec<usize>), expected: &str| Error::TensorDtype {
            file: store.location(&format!("{m}.{name}")).into(),
            name: format!("{m}.{name}"),
            expected: expected.into(),
            found: format!("{} {:?}", found.0, found.1),
        };
        if dt != want {
            return Err(bad("weight", (dt, shape), &format!("{} weights ({} checkpoint)", want, q.algo.name())));
        }
        let one = |s: &[usize]| s.iter().product::<usize>() == 1;
        match q.algo {
            QuantAlgo::Fp8 => {
                let ws = scale("weight_scale")?;
                if ws.0 != DType::F32 || !(one(&ws.1) || ws.1 == [shape[0]] || ws.1 == [shape[0], 1]) {
                    return Err(bad("weight_scale", ws, "f32, one value or one a row"));
                }
                let is = scale("input_scale")?;
                if is.0 != DType::F32 || !one(&is.1) {
                    return Err(bad("input_scale", is, "one f32 (static per-tensor activation scale)"));
                }
            }
            QuantAlgo::Nvfp4 => {
                let ws = scale("weight_scale")?;
                let want = [shape[0], shape[1] / 16];
                if ws.0 != DType::F8E4M3 || ws.1 != want || shape[1] % 16 != 0 {
                    return Err(bad("weight_scale", ws, &format!("f8e4m3 {want:?} (one a block of 16)")));
                }
                let s2 = scale("weight_scale_2")?;
                if s2.0 != DType::F32 || !one(&s2.1) {
                    return Err(bad("weight_scale_2", s2, "one f32"));
                }
            }
        }
    }
    Ok(())
}

/// For `load_format = "dummy"` on a quantized checkpoint's config: every 2-D linear weight of
/// `store` (the dummy float weights) the checkpoint does not exclude becomes generated codes in
/// its format, with scales that keep the dummy weights' magnitudes (±1/√in), laid out as
/// ModelOpt writes them: FP8 codes uniform in ±448 with a per-tensor `weight_scale` and an
/// `input_scale` of 4/448; NVFP4 random E2M1 codes with block scales of 1 and a global scale.
pub fn dummy_quantized(q: &CheckpointQuant, store: &mut WeightStore) -> Result<()> {
    use autodeploy_core::weights::Synthetic;
    let scalar = |v: f32| Tensor::from_f32(vec![], vec![v]);
    for name in store.names() {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        let (_, shape) = store.stored_meta(&name)?;
        if shape.len() != 2 || q.excluded(module) || module.ends_with("embed_tokens") || module.ends_with("norm") {
            continue;
        }
        let (n, k) = (shape[0], shape[1]);
        let bound = 1.0 / (k as f32).sqrt();
        let origin = format!("random {} codes of `{name}` (load_format = \"dummy\")", q.algo.name());
        match q.algo {
            QuantAlgo::Fp8 => {
                let values = Synthetic::uniform_named(&name, 448.0);
                let s = shape.clone();
                let load = std::sync::Arc::new(move || {
                    let mut v = vec![0f32; s.iter().product()];
                    values.fill(&mut v);
                    Tensor::from_f32_as(DType::F8E4M3, s.clone(), v)
                });
                store.add_lazy_typed(&name, shape, DType::F8E4M3, origin, load);
                store.add_tensor(&format!("{module}.weight_scale"), scalar(bound / 448.0)?);
                store.add_tensor(&format!("{module}.input_scale"), scalar(4.0 / 448.0)?);
            }
            QuantAlgo::Nvfp4 => {
                if k % 16 != 0 {
                    return Err(Error::Msg(format!("`{name}` [{n}, {k}]: NVFP4 rows are whole blocks of 16")));
                }
                let values = Synthetic::uniform_named(&name, 1.0);
                let s = shape.clone();
                let load = std::sync::Arc::new(move || {
                    let mut v = vec![0f32; n * k / 2];
                    values.fill(&mut v);
                    // Each byte two codes from the value's bits: any nibble is a valid E2M1 code.
                    let bytes = v.iter().map(|x| (x.to_bits() >> 7) as u8).collect();
                    Tensor::from_low_bit(DType::F4E2M1, s.clone(), bytes)
                });
                store.add_lazy_typed(&name, shape, DType::F4E2M1, origin.clone(), load);
                let bs = vec![n, k / 16];
                let load = std::sync::Arc::new(move || {
                    Tensor::from_low_bit(DType::F8E4M3, bs.clone(), vec![0x38; n * k / 16])
                });
                store.add_lazy_typed(&format!("{module}.weight_scale"), vec![n, k / 16], DType::F8E4M3, origin, load);
                store.add_tensor(&format!("{module}.weight_scale_2"), scalar(bound / 6.0)?);
                store.add_tensor(&format!("{module}.input_scale"), scalar(4.0 / 448.0)?);
            }
        }
    }
    Ok(())
}

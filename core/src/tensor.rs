//! Host (CPU) tensors: contiguous, row-major, shared storage so views and weights are cheap.

use std::borrow::Cow;
use std::sync::Arc;

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::gguf::GgmlType;

#[derive(Debug)]
pub enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    /// Block-quantized rows, as stored in GGUF; `len` counts values, not bytes.
    Block {
        ty: GgmlType,
        bytes: Vec<u8>,
        len: usize,
        /// The rows interleaved for the AVX-512 VNNI decode kernel, made at the first such
        /// linear (`Tensor::packed_rows`); as many bytes again as `bytes`.
        packed: std::sync::OnceLock<autodeploy_kernels::quant::PackedRows>,
    },
    /// A low-bit float format as stored ([`DType::is_low_bit`]): FP8 one value a byte, FP4 two
    /// (the lower nibble first); `len` counts values.
    LowBit {
        dtype: DType,
        bytes: Vec<u8>,
        len: usize,
    },
}

impl Storage {
    pub fn len(&self) -> usize {
        match self {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            Storage::I64(v) => v.len(),
            Storage::Bool(v) => v.len(),
            Storage::Block { len, .. } | Storage::LowBit { len, .. } => *len,
        }
    }

    /// A copy of low-bit storage (other storage: an empty f32 one).
    pub fn clone_low_bit(&self) -> Storage {
        match self {
            Storage::LowBit { dtype, bytes, len } => Storage::LowBit { dtype: *dtype, bytes: bytes.clone(), len: *len },
            _ => Storage::F32(Vec::new()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            Storage::I64(_) => DType::I64,
            Storage::Bool(_) => DType::Bool,
            Storage::Block { ty, .. } => DType::Block(*ty),
            Storage::LowBit { dtype, .. } => *dtype,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    data: Arc<Storage>,
}

/// Converting large buffers is worth spreading over the cores; small ones are not.
const PAR_MIN: usize = 1 << 14;

impl Tensor {
    /// A tensor from little-endian bytes of `dtype` (float, i64 or bool), row-major.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, b: &[u8]) -> Result<Tensor> {
        fn chunks<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N).map(|c| f(c.try_into().expect("exact chunk"))).collect()
        }
        let n: usize = shape.iter().product();
        if dtype.is_low_bit() {
            return Tensor::from_low_bit(dtype, shape, b.to_vec());
        }
        if dtype.is_block() || b.len() != n * dtype.size_in_bytes() {
            return Err(crate::error::Error::Msg(format!(
                "{} bytes do not hold a {dtype} tensor of shape {shape:?}",
                b.len()
            )));
        }
        let storage = match dtype {
            DType::F32 => Storage::F32(chunks(b, f32::from_le_bytes)),
            DType::BF16 => Storage::BF16(chunks(b, |x: [u8; 2]| bf16::from_bits(u16::from_le_bytes(x)))),
            DType::F16 => Storage::F16(chunks(b, |x: [u8; 2]| f16::from_bits(u16::from_le_bytes(x)))),
            DType::I64 => Storage::I64(chunks(b, i64::from_le_bytes)),
            DType::Bool => Storage::Bool(b.iter().map(|&x| x != 0).collect()),
            DType::Block(_) | DType::F8E4M3 | DType::F4E2M1 => unreachable!("handled above"),
        };
        Tensor::new(shape, storage)
    }

    /// The values as little-endian bytes (the inverse of [`Tensor::from_le_bytes`]); block
    /// tensors have none.
    pub fn to_le_bytes(&self) -> Result<Vec<u8>> {
        Ok(match self.storage() {
            Storage::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::BF16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Storage::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            Storage::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Storage::Bool(v) => v.iter().map(|&x| x as u8).collect(),
            Storage::Block { .. } => return Err(Error::Msg("a block-quantized tensor has no element bytes".into())),
            Storage::LowBit { bytes, .. } => bytes.clone(),
        })
    }

    pub fn new(shape: Vec<usize>, data: Storage) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Msg(format!("tensor of shape {shape:?} needs {n} elements, got {}", data.len())));
        }
        Ok(Tensor { shape, data: Arc::new(data) })
    }

    pub fn from_f32(shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
        Tensor::new(shape, Storage::F32(v))
    }

    pub fn from_i64(shape: Vec<usize>, v: Vec<i64>) -> Result<Tensor> {
        Tensor::new(shape, Storage::I64(v))
    }

    /// A float tensor of `dtype` from f32 values, rounding to nearest even as torch does.
    pub fn from_f32_as(dtype: DType, shape: Vec<usize>, v: Vec<f32>) -> Result<Tensor> {
        let data = match dtype {
            DType::F32 => Storage::F32(v),
            DType::BF16 => Storage::BF16(map_par(&v, bf16::from_f32)),
            DType::F16 => Storage::F16(map_par(&v, f16::from_f32)),
            DType::I64 => Storage::I64(v.iter().map(|&x| x as i64).collect()),
            DType::Bool => Storage::Bool(v.iter().map(|&x| x != 0.0).collect()),
            DType::Block(t) => {
                return Err(Error::Msg(format!(
                    "cannot quantize to {} here; block weights come from the checkpoint",
                    t.name()
                )))
            }
            // Saturating, ties to even: torch's `clamp(-448, 448).to(float8_e4m3fn)`.
            DType::F8E4M3 => Storage::LowBit {
                dtype,
                len: v.len(),
                bytes: map_par(&v, autodeploy_kernels::quant::lowbit::f32_to_e4m3),
            },
            DType::F4E2M1 => {
                return Err(Error::Msg("cannot quantize to f4e2m1 here; nvfp4 weights come from the checkpoint".into()))
            }
        };
        Tensor::new(shape, data)
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn storage(&self) -> &Storage {
        &self.data
    }

    /// The same data under another shape with the same element count.
    pub fn reshape(&self, shape: Vec<usize>) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(Error::Msg(format!("cannot view {:?} ({} elements) as {shape:?}", self.shape, self.numel())));
        }
        Ok(Tensor { shape, data: self.data.clone() })
    }

    /// Block-quantized rows `[rows, cols]`, checked to be whole blocks.
    pub fn from_blocks(ty: GgmlType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Tensor> {
        let (per, size) = ty.block();
        let cols = *shape.last().unwrap_or(&0);
        let len: usize = shape.iter().product();
        if shape.len() != 2 || !cols.is_multiple_of(per) || bytes.len() != len / per * size {
            return Err(Error::Msg(format!("{} blocks do not fit shape {shape:?} ({} bytes)", ty.name(), bytes.len())));
        }
        Ok(Tensor { shape, data: Arc::new(Storage::Block { ty, bytes, len, packed: Default::default() }) })
    }

    /// A low-bit tensor from its stored bytes (FP4: two values a byte, so `shape`'s values
    /// must be even in number).
    pub fn from_low_bit(dtype: DType, shape: Vec<usize>, bytes: Vec<u8>) -> Result<Tensor> {
        let len: usize = shape.iter().product();
        if !dtype.is_low_bit() || bytes.len() * (1 + (dtype == DType::F4E2M1) as usize) != len {
            return Err(Error::Msg(format!("{} bytes do not hold a {dtype} tensor of shape {shape:?}", bytes.len())));
        }
        Ok(Tensor { shape, data: Arc::new(Storage::LowBit { dtype, bytes, len }) })
    }

    /// A low-bit tensor's stored bytes.
    pub fn as_low_bit(&self) -> Option<&[u8]> {
        match &*self.data {
            Storage::LowBit { bytes, .. } => Some(bytes),
            _ => None,
        }
    }

    /// The row-interleaved copy of a block tensor, `make` run once (the first caller's);
    /// `None` for other storage.
    pub fn packed_rows(
        &self,
        make: impl FnOnce() -> autodeploy_kernels::quant::PackedRows,
    ) -> Option<&autodeploy_kernels::quant::PackedRows> {
        match &*self.data {
            Storage::Block { packed, .. } => Some(packed.get_or_init(make)),
            _ => None,
        }
    }

    pub fn as_blocks(&self) -> Option<(GgmlType, &[u8])> {
        match &*self.data {
            Storage::Block { ty, bytes, .. } => Some((*ty, bytes)),
            _ => None,
        }
    }

    /// The weight as stored, for the dense linear kernels (f32, bf16, f16).
    pub fn as_dense(&self) -> Option<autodeploy_kernels::dense::Dense<'_>> {
        use autodeploy_kernels::dense::Dense;
        match &*self.data {
            Storage::F32(v) => Some(Dense::F32(v)),
            Storage::BF16(v) => Some(Dense::BF16(v)),
            Storage::F16(v) => Some(Dense::F16(v)),
            _ => None,
        }
    }

    pub fn as_f32(&self) -> Option<&[f32]> {
        match &*self.data {
            Storage::F32(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<&[i64]> {
        match &*self.data {
            Storage::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The values as f32 (borrowed when already f32). Integers and bools convert by value.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        match &*self.data {
            Storage::F32(v) => Cow::Borrowed(v),
            Storage::BF16(v) => Cow::Owned(map_par(v, |x| x.to_f32())),
            Storage::F16(v) => Cow::Owned(map_par(v, |x| x.to_f32())),
            Storage::I64(v) => Cow::Owned(v.iter().map(|&x| x as f32).collect()),
            Storage::Bool(v) => Cow::Owned(v.iter().map(|&x| x as u8 as f32).collect()),
            Storage::Block { ty, bytes, .. } => Cow::Owned(crate::gguf::dequantize(*ty, bytes)),
            // The codes' values, unscaled.
            Storage::LowBit { dtype: DType::F8E4M3, bytes, .. } => {
                Cow::Owned(map_par(bytes, autodeploy_kernels::quant::lowbit::e4m3_to_f32))
            }
            Storage::LowBit { bytes, .. } => {
                use autodeploy_kernels::quant::lowbit::e2m1_to_f32;
                Cow::Owned(bytes.iter().flat_map(|&b| [e2m1_to_f32(b & 15), e2m1_to_f32(b >> 4)]).collect())
            }
        }
    }

    pub fn to_i64(&self) -> Cow<'_, [i64]> {
        match &*self.data {
            Storage::I64(v) => Cow::Borrowed(v),
            _ => Cow::Owned(self.to_f32().iter().map(|&x| x as i64).collect()),
        }
    }

    /// `aten._to_copy(dtype=...)`.
    pub fn cast(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if dtype == DType::I64 {
            return Tensor::from_i64(self.shape.clone(), self.to_f32().iter().map(|&x| x as i64).collect());
        }
        Tensor::from_f32_as(dtype, self.shape.clone(), self.to_f32().into_owned())
    }
}

fn map_par<A: Copy + Sync, B: Send>(v: &[A], f: impl Fn(A) -> B + Sync + Send) -> Vec<B> {
    if v.len() >= PAR_MIN {
        v.par_iter().map(|&x| f(x)).collect()
    } else {
        v.iter().map(|&x| f(x)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_cast_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values; ties go to the even mantissa (1.0).
        let t = Tensor::from_f32(vec![3], vec![1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, -2.5]).unwrap();
        let b = t.cast(DType::BF16).unwrap();
        assert_eq!(b.to_f32().as_ref(), &[1.0, 1.0 + 4.0 / 256.0, -2.5]);
        assert!(Tensor::from_f32(vec![2, 2], vec![0.0; 3]).is_err());
        assert!(t.reshape(vec![2, 2]).is_err());
    }
}

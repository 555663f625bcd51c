//! Element types.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    Bool,
    /// Block-quantized weights kept as stored (GGUF Q4_0, Q4_1, Q8_0): a 2-D `[rows, cols]`
    /// tensor whose rows are whole blocks. Only weights have this dtype.
    Block(crate::gguf::GgmlType),
    /// FP8 E4M3 (`float8_e4m3fn`), one byte a value: ModelOpt FP8 weights and NVFP4 block
    /// scales, read with their scales by the quantized linears.
    F8E4M3,
    /// NVFP4's E2M1 values, two a byte (the lower nibble first), a 2-D `[rows, cols]` weight
    /// whose logical shape counts values; only weights have this dtype.
    F4E2M1,
}

impl DType {
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::Bool | DType::Block(_) | DType::F8E4M3 | DType::F4E2M1 => 1,
        }
    }

    /// Short name as printed in graph dumps.
    pub fn as_str(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::Bool => "bool",
            DType::Block(t) => t.dtype_name(),
            DType::F8E4M3 => "f8e4m3",
            DType::F4E2M1 => "f4e2m1",
        }
    }

    /// Accepts our short names and the names `torch` and Hugging Face configs use.
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" | "float32" | "float" | "torch.float32" => DType::F32,
            "f16" | "float16" | "half" | "torch.float16" => DType::F16,
            "bf16" | "bfloat16" | "torch.bfloat16" => DType::BF16,
            "i64" | "int64" | "long" | "torch.int64" => DType::I64,
            "bool" | "torch.bool" => DType::Bool,
            "f8e4m3" | "float8_e4m3fn" | "torch.float8_e4m3fn" => DType::F8E4M3,
            "f4e2m1" => DType::F4E2M1,
            _ => return None,
        })
    }

    pub fn is_block(self) -> bool {
        matches!(self, DType::Block(_))
    }

    /// A low-bit float format of quantized checkpoints (FP8 E4M3, NVFP4's E2M1), whose values
    /// mean something only with their scales.
    pub fn is_low_bit(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::F4E2M1)
    }

    /// Bytes `n` values of this dtype take in memory (block dtypes: see `GgmlType::block`).
    pub fn bytes_for(self, n: usize) -> usize {
        match self {
            DType::F4E2M1 => n.div_ceil(2),
            DType::Block(t) => {
                let (per, size) = t.block();
                n.div_ceil(per) * size
            }
            d => n * d.size_in_bytes(),
        }
    }

    /// torch's result type for a binary op on two tensors of these dtypes.
    pub fn promote(a: DType, b: DType) -> DType {
        use DType::*;
        if a == b {
            return a;
        }
        match (a, b) {
            (F32, _) | (_, F32) => F32,
            (BF16, F16) | (F16, BF16) => F32,
            (BF16, _) | (_, BF16) => BF16,
            (F16, _) | (_, F16) => F16,
            (I64, _) | (_, I64) => I64,
            (Block(_), _) | (_, Block(_)) => F32,
            (F8E4M3 | F4E2M1, _) | (_, F8E4M3 | F4E2M1) => F32,
            _ => Bool,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

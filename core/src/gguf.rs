//! GGUF v2/v3 reader and dequantization (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K,
//! Q3_K, Q4_K, Q5_K, Q6_K).
//!
//! Every read is bounds-checked against the buffer: a truncated or corrupt file is an error
//! naming the file and the key or tensor, never a panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// Any integer type, as the spec allows writers to pick the width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    BF16,
}

/// The name ggml gives type `id` (every type of the GGUF spec, read or not), for messages.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied()
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }
    /// (values per block, bytes per block)
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q5_0 => (32, 22),
            GgmlType::Q5_1 => (32, 24),
            GgmlType::Q8_0 => (32, 34),
            GgmlType::Q2K => (256, 84),
            GgmlType::Q3K => (256, 110),
            GgmlType::Q4K => (256, 144),
            GgmlType::Q5K => (256, 176),
            GgmlType::Q6K => (256, 210),
        }
    }
    /// Name in graph dumps (`q4_1[576, 576]`).
    pub fn dtype_name(self) -> &'static str {
        match self {
            GgmlType::F32 => "f32",
            GgmlType::F16 => "f16",
            GgmlType::Q4_0 => "q4_0",
            GgmlType::Q4_1 => "q4_1",
            GgmlType::Q5_0 => "q5_0",
            GgmlType::Q5_1 => "q5_1",
            GgmlType::Q8_0 => "q8_0",
            GgmlType::Q2K => "q2_k",
            GgmlType::Q3K => "q3_k",
            GgmlType::Q4K => "q4_k",
            GgmlType::Q5K => "q5_k",
            GgmlType::Q6K => "q6_k",
            GgmlType::BF16 => "bf16",
        }
    }

    /// Types the CPU kernels compute on directly, without dequantizing the weight first.
    pub fn computes_quantized(self) -> bool {
        matches!(self, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q2K => "Q2_K",
            GgmlType::Q3K => "Q3_K",
            GgmlType::Q4K => "Q4_K",
            GgmlType::Q5K => "Q5_K",
            GgmlType::Q6K => "Q6_K",
            GgmlType::BF16 => "BF16",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost (contiguous) dim first.
    pub dims: Vec<u64>,
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// PyTorch order: outermost first.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
    pub fn numel(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// The parsed header: metadata and tensor directory.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub kv: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: usize,
    /// `general.alignment` (32 when absent): every tensor's offset is a multiple of it.
    pub alignment: usize,
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            format!("truncated: {what} needs {n} bytes at offset {}, file has {}", self.at, self.b.len())
        })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> std::result::Result<[u8; N], String> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }
    fn u32(&mut self, what: &str) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn remaining(&self) -> usize {
        self.b.len() - self.at
    }
    fn string(&mut self, what: &str) -> std::result::Result<String, String> {
        let n = self.u64(what)?;
        if n > self.remaining() as u64 {
            return Err(format!("truncated: {what} claims {n} bytes, {} remain", self.remaining()));
        }
        let bytes = self.take(n as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> std::result::Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deep"));
                }
                let et = self.u32(what)?;
                let n = self.u64(what)?;
                // Every element takes at least one byte: a count beyond the file is corrupt.
                if n > self.remaining() as u64 {
                    return Err(format!("truncated: {what} claims {n} elements, {} bytes remain", self.remaining()));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(et, what, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

impl Header {
    /// Parses the header of a GGUF file held in `b`. Errors are plain text; callers add the path.
    pub fn parse(b: &[u8]) -> std::result::Result<Header, String> {
        let mut c = Cursor { b, at: 0 };
        if c.take(4, "magic")? != b"GGUF" {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version} is not supported (2 or 3)"));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        if n_tensors > c.remaining() as u64 || n_kv > c.remaining() as u64 {
            return Err(format!("truncated: header claims {n_tensors} tensors and {n_kv} keys"));
        }
        let mut kv = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            kv.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&format!("tensor name #{i}"))?;
            let n_dims = c.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(format!("tensor `{name}`: {n_dims} dims (1 to 4 supported)"));
            }
            let mut dims = Vec::new();
            for _ in 0..n_dims {
                dims.push(c.u64(&name)?);
            }
            if dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).is_none_or(|n| n > (1u64 << 40)) {
                return Err(format!("tensor `{name}`: dims {dims:?} are too large"));
            }
            let type_id = c.u32(&name)?;
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo { name, dims, type_id, offset });
        }
        let align = match kv.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 16 => a as usize,
                _ => return Err(format!("general.alignment {v:?} is not a power of two")),
            },
        };
        let data_start = c.at.div_ceil(align) * align;
        Ok(Header { version, kv, tensors, data_start, alignment: align })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.kv.get(key)
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Type and byte range of tensor `t` in a file of `file_len` bytes, checked.
    pub fn tensor_range(
        &self,
        file_len: usize,
        t: &TensorInfo,
    ) -> std::result::Result<(GgmlType, std::ops::Range<usize>), String> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| match ggml_type_name(t.type_id) {
            Some(n) => format!(
                "tensor `{}`: ggml type {n} ({}) is not supported (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K are)",
                t.name, t.type_id
            ),
            None => format!("tensor `{}`: ggml type {} is not a type of the GGUF format", t.name, t.type_id),
        })?;
        // A misaligned offset means the writer and this reader disagree about where data
        // starts: the bytes would be read shifted, silently wrong.
        if !t.offset.is_multiple_of(self.alignment as u64) {
            return Err(format!(
                "tensor `{}`: offset {} is not a multiple of the file's alignment {}",
                t.name, t.offset, self.alignment
            ));
        }
        let (per, bytes) = ty.block();
        let row = t.dims[0] as usize;
        if !row.is_multiple_of(per) {
            return Err(format!(
                "tensor `{}`: row of {row} is not a multiple of the {} block ({per})",
                t.name,
                ty.name()
            ));
        }
        let numel = t.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        let Some(size) = numel.and_then(|n| (n / per as u64).checked_mul(bytes as u64)) else {
            return Err(format!("tensor `{}`: dims {:?} overflow 64 bits", t.name, t.dims));
        };
        let start = (self.data_start as u64).checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(size)).filter(|&e| e <= file_len as u64);
        match (start, end) {
            (Some(s), Some(e)) => Ok((ty, s as usize..e as usize)),
            _ => Err(format!(
                "tensor `{}`: {} bytes at offset {} run past the end of the file ({file_len} bytes; truncated?)",
                t.name,
                size,
                self.data_start as u64 + t.offset,
            )),
        }
    }

    /// The bytes of tensor `t` within the file buffer `b`.
    pub fn tensor_bytes<'b>(&self, b: &'b [u8], t: &TensorInfo) -> std::result::Result<(GgmlType, &'b [u8]), String> {
        let (ty, r) = self.tensor_range(b.len(), t)?;
        Ok((ty, &b[r]))
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    mmap: Mmap,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file we do not modify; see weights.rs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let header = Header::parse(&mmap).map_err(|msg| Error::BadFile { file: path.into(), msg })?;
        Ok(GgufFile { path: path.into(), header, mmap })
    }

    pub fn len(&self) -> usize {
        self.mmap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    /// The stored bytes of a tensor.
    pub fn raw(&self, name: &str) -> Result<&[u8]> {
        self.typed(name).map(|(_, bytes)| bytes)
    }

    /// A tensor's type and stored bytes.
    pub fn typed(&self, name: &str) -> Result<(GgmlType, &[u8])> {
        let t = self
            .header
            .tensor(name)
            .ok_or_else(|| Error::MissingTensor { name: name.into(), where_: self.path.display().to_string() })?;
        self.header.tensor_bytes(&self.mmap, t).map_err(|msg| Error::BadFile { file: self.path.clone(), msg })
    }

    /// Dequantized values of a tensor, in ggml order (which is PyTorch's row-major order).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let (ty, bytes) = self.typed(name)?;
        Ok(dequantize(ty, bytes))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Scale and min of sub-block `j` (of 8) from the 12 packed 6-bit pairs of Q4_K and Q5_K.
fn k_scale_min(sc: &[u8; 12], j: usize) -> (f32, f32) {
    if j < 4 {
        ((sc[j] & 63) as f32, (sc[j + 4] & 63) as f32)
    } else {
        (((sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4)) as f32, ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)) as f32)
    }
}

/// Dequantizes whole blocks of `ty` (the caller sized `b` to whole blocks).
pub fn dequantize(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let (per, bytes) = ty.block();
    let mut y = Vec::with_capacity(b.len() / bytes * per);
    for blk in b.chunks_exact(bytes) {
        match ty {
            GgmlType::F32 => y.push(f32::from_le_bytes(blk.try_into().expect("4 bytes"))),
            GgmlType::F16 => y.push(f16_at(blk, 0)),
            GgmlType::BF16 => y.push(bf16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32()),
            GgmlType::Q8_0 => {
                let d = f16_at(blk, 0);
                y.extend(blk[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
            GgmlType::Q4_0 => {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                y.extend(qs.iter().map(|&q| ((q & 15) as i32 - 8) as f32 * d));
                y.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                let qs = &blk[4..20];
                y.extend(qs.iter().map(|&q| (q & 15) as f32 * d + m));
                y.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
            GgmlType::Q5_0 | GgmlType::Q5_1 => {
                // d (and m for Q5_1), the 32 fifth bits, then 16 bytes of low nibbles: byte j
                // holds value j (low) and value j + 16 (high).
                let (d, m, at) = match ty {
                    GgmlType::Q5_1 => (f16_at(blk, 0), f16_at(blk, 2), 4),
                    _ => (f16_at(blk, 0), 0.0, 2),
                };
                let qh = u32::from_le_bytes(blk[at..at + 4].try_into().expect("4 bytes"));
                let qs = &blk[at + 4..at + 20];
                let offset = if ty == GgmlType::Q5_0 { 16 } else { 0 };
                let q = |i: usize| {
                    let nib = if i < 16 { qs[i] & 15 } else { qs[i - 16] >> 4 };
                    (nib as i32 | (((qh >> i) & 1) as i32) << 4) - offset
                };
                y.extend((0..32).map(|i| d * q(i) as f32 + m));
            }
            GgmlType::Q2K => {
                // 16 sub-blocks of 16: a 4-bit scale and a 4-bit min each; 2-bit values, byte l
                // of each 32-byte half holds values l, l + 32, l + 64, l + 96 of that half.
                let (sc, qs) = (&blk[..16], &blk[16..80]);
                let (d, dmin) = (f16_at(blk, 80), f16_at(blk, 82));
                y.extend((0..256).map(|i| {
                    let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
                    let q = (qs[32 * half + l] >> (2 * shift)) & 3;
                    let s = sc[i / 16];
                    d * (s & 15) as f32 * q as f32 - dmin * (s >> 4) as f32
                }));
            }
            GgmlType::Q3K => {
                // 2 low bits as in Q2_K, the third bit of value 32·b + l in bit b of hmask[l]
                // (set: no offset; clear: minus 4), 16 signed 6-bit scales.
                let (hmask, qs, sc) = (&blk[..32], &blk[32..96], &blk[96..108]);
                let d = f16_at(blk, 108);
                let scale = |j: usize| {
                    let low = (sc[j % 8] >> (4 * (j / 8))) & 15;
                    let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
                    ((low | (high << 4)) as i32 - 32) as f32
                };
                y.extend((0..256).map(|i| {
                    let (half, shift, l) = (i / 128, (i % 128) / 32, i % 32);
                    let low = ((qs[32 * half + l] >> (2 * shift)) & 3) as i32;
                    let h = ((hmask[i % 32] >> (i / 32)) & 1) as i32;
                    d * scale(i / 16) * (low - 4 * (1 - h)) as f32
                }));
            }
            GgmlType::Q4K => {
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let sc: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
                let qs = &blk[16..144];
                for c in 0..4 {
                    let q = &qs[32 * c..32 * c + 32];
                    let (s1, m1) = k_scale_min(sc, 2 * c);
                    let (s2, m2) = k_scale_min(sc, 2 * c + 1);
                    let (d1, m1) = (d * s1, dmin * m1);
                    let (d2, m2) = (d * s2, dmin * m2);
                    y.extend(q.iter().map(|&x| d1 * (x & 15) as f32 - m1));
                    y.extend(q.iter().map(|&x| d2 * (x >> 4) as f32 - m2));
                }
            }
            GgmlType::Q5K => {
                // Q4_K's scales and nibbles, the fifth bit of value 32·b + l in bit b of qh[l].
                let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                let sc: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
                let (qh, qs) = (&blk[16..48], &blk[48..176]);
                y.extend((0..256).map(|i| {
                    let (c, high, l) = (i / 64, (i % 64) / 32, i % 32);
                    let nib = (qs[32 * c + l] >> (4 * high)) & 15;
                    let q = nib | (((qh[l] >> (i / 32)) & 1) << 4);
                    let (s, m) = k_scale_min(sc, i / 32);
                    d * s * q as f32 - dmin * m
                }));
            }
            GgmlType::Q6K => {
                let d = f16_at(blk, 208);
                let mut out = [0f32; 256];
                for n in 0..2 {
                    let ql = &blk[64 * n..64 * n + 64];
                    let qh = &blk[128 + 32 * n..128 + 32 * n + 32];
                    let sc = &blk[192 + 8 * n..192 + 8 * n + 8];
                    let y0 = &mut out[128 * n..128 * n + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 15) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        let s = |k: usize| sc[k] as i8 as f32;
                        y0[l] = d * s(is) * q1 as f32;
                        y0[l + 32] = d * s(is + 2) * q2 as f32;
                        y0[l + 64] = d * s(is + 4) * q3 as f32;
                        y0[l + 96] = d * s(is + 6) * q4 as f32;
                    }
                }
                y.extend_from_slice(&out);
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_and_q4_1_blocks() {
        let mut b = vec![0u8; 34];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 4;
        b[3] = (-6i8) as u8;
        let y = dequantize(GgmlType::Q8_0, &b);
        assert_eq!((y.len(), y[0], y[1], y[2]), (32, 2.0, -3.0, 0.0));
        let mut b = vec![0u8; 20];
        b[..2].copy_from_slice(&f16::from_f32(2.0).to_bits().to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_bits().to_le_bytes());
        b[4] = 0x3A; // low nibble 10 -> y[0], high nibble 3 -> y[16]
        let y = dequantize(GgmlType::Q4_1, &b);
        assert_eq!((y[0], y[16], y[1]), (19.0, 5.0, -1.0));
    }

    #[test]
    fn truncated_headers_are_errors() {
        let mut h = b"GGUF".to_vec();
        h.extend(3u32.to_le_bytes());
        h.extend(1u64.to_le_bytes());
        h.extend(1u64.to_le_bytes());
        for cut in 0..h.len() {
            assert!(Header::parse(&h[..cut]).is_err());
        }
        assert!(Header::parse(&h).unwrap_err().contains("truncated"));
        assert!(Header::parse(b"GGML....").unwrap_err().contains("magic"));
    }
}

//! Weights by name: memory-mapped safetensors files (read only when a tensor is asked for) and
//! tensors the importer computed itself (such as RoPE inverse frequencies).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors, TensorInfo};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One memory-mapped `.safetensors` file with its validated header.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    meta: Metadata,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only; like every mmap-based loader we rely on the
        // checkpoint not being rewritten while the engine runs.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::BadFile {
            file: path.to_path_buf(),
            msg: format!("not a valid safetensors file (truncated or corrupt?): {e}"),
        })?;
        Ok(SafetensorsFile { path: path.to_path_buf(), mmap, data_start: 8 + n, meta })
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.meta.tensors().into_keys().collect();
        v.sort();
        v
    }

    fn bytes(&self, info: &TensorInfo) -> &[u8] {
        let (a, b) = info.data_offsets;
        &self.mmap[self.data_start + a..self.data_start + b]
    }
}

/// Maps a safetensors dtype to ours, for the dtypes weights may be stored in.
pub fn float_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        StDtype::F8_E4M3 => Some(DType::F8E4M3),
        _ => None,
    }
}

/// Produces a weight on demand (dequantizing, permuting) in f32.
pub type LazyLoad = std::sync::Arc<dyn Fn() -> Result<Tensor> + Send + Sync>;

/// Values a synthetic weight (`load_format = "dummy"`) holds, defined so that any device can
/// make them where they will live and get the same numbers: a backend that sees
/// [`WeightStore::synthetic_parts`] may generate a weight instead of uploading it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Synthetic {
    /// Every value this one.
    Const(f32),
    /// Uniform in ±`scale`: the values cut in chunks of [`SYNTHETIC_CHUNK`], chunk `c` one
    /// xorshift32 stream (shifts 13, 17, 5) from `(seed ^ c·0x9e3779b9) | 1`, each value
    /// `(x / u32::MAX · 2 − 1) · scale` in f32 arithmetic, one rounding a step.
    Uniform { seed: u32, scale: f32 },
}

/// Values of one [`Synthetic::Uniform`] stream.
pub const SYNTHETIC_CHUNK: usize = 1 << 16;

impl Synthetic {
    /// Uniform values seeded by a weight's name (FNV-1a), in ±`scale`.
    pub fn uniform_named(name: &str, scale: f32) -> Synthetic {
        let seed = name.bytes().fold(0x811c9dc5u32, |h, b| (h ^ b as u32).wrapping_mul(0x01000193));
        Synthetic::Uniform { seed, scale }
    }

    /// The values, in parallel over the chunks.
    pub fn fill(&self, out: &mut [f32]) {
        use rayon::prelude::*;
        match *self {
            Synthetic::Const(v) => out.fill(v),
            Synthetic::Uniform { seed, scale } => {
                out.par_chunks_mut(SYNTHETIC_CHUNK).enumerate().for_each(|(c, out)| {
                    let mut x = (seed ^ (c as u32).wrapping_mul(0x9e37_79b9)) | 1;
                    for v in out {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        *v = (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale;
                    }
                })
            }
        }
    }
}

#[derive(Clone)]
enum Entry {
    File(usize),
    Owned(Tensor),
    /// Computed when loaded: shape, where it comes from (for messages), and the loader.
    Lazy(Vec<usize>, DType, String, LazyLoad),
    /// Generated when loaded: shape, origin, values.
    Synthetic(Vec<usize>, String, Synthetic),
    /// Other weights of this store concatenated along dim 0 (fused linears), in `dtype`,
    /// assembled when loaded.
    Concat {
        parts: Vec<String>,
        shape: Vec<usize>,
        dtype: DType,
    },
    /// An op over other weights of this store (each read in its dtype), computed on the CPU
    /// when loaded (a small weight-only computation folded out of the graph: Gemma's `1 + w`).
    Computed {
        op: crate::Op,
        inputs: Vec<(String, DType)>,
        shape: Vec<usize>,
        dtype: DType,
    },
    /// Another weight of this store under the name the graph uses (a family whose checkpoints
    /// name their tensors their own way).
    Alias(String),
    /// Another weight of this store `[G, A, B]` as `[G, B, A]` (a checkpoint that stores
    /// each expert's matrices as `[in, out]`), transposed when loaded.
    Transposed {
        of: String,
        shape: Vec<usize>,
        dtype: DType,
    },
    /// Rows `start..start + shape[0]` of another weight of this store (a fused checkpoint
    /// tensor's part), read when loaded.
    Rows {
        of: String,
        start: usize,
        shape: Vec<usize>,
        dtype: DType,
    },
    /// A file's u8 tensor `[rows, cols / 2]` read as `[rows, cols]` E2M1 values, two a byte
    /// (an NVFP4 weight).
    PackedFp4(usize),
    /// One rank's slice of another weight of this store (a sharded linear's): along `dim`,
    /// part `rank` of `world` of each of `blocks` equal blocks of that dim (2 for a fused
    /// gate/up weight, whose gate rows and up rows are split alike). Read when loaded, from the
    /// file's bytes of those rows or columns alone where `of` is a plain file tensor.
    Shard {
        of: String,
        dim: usize,
        blocks: usize,
        rank: usize,
        world: usize,
        shape: Vec<usize>,
        dtype: DType,
    },
}

/// Cloning is cheap: files are shared, owned tensors share their storage.
#[derive(Default, Clone)]
pub struct WeightStore {
    files: Vec<std::sync::Arc<SafetensorsFile>>,
    entries: HashMap<String, Entry>,
    origin: String,
    /// The checkpoint's quantization, and the weights whose stored values mean something only
    /// with their scales (loaded only in their stored dtype, by a quantized linear).
    quant: Option<crate::quant::CheckpointQuant>,
    scaled: std::collections::BTreeSet<String>,
}

impl WeightStore {
    pub fn new(origin: impl Into<String>) -> WeightStore {
        WeightStore { origin: origin.into(), ..Default::default() }
    }

    /// Adds every tensor of a file. With `only`, just those names (a sharded checkpoint's index
    /// says which file holds which tensor).
    pub fn add_file(&mut self, file: SafetensorsFile, only: Option<&[String]>) {
        let idx = self.files.len();
        let names = match only {
            Some(n) => n.to_vec(),
            None => file.names(),
        };
        for n in names {
            self.entries.insert(n, Entry::File(idx));
        }
        self.files.push(std::sync::Arc::new(file));
    }

    /// The quantization the checkpoint declares (the importer reads it; transforms see it).
    pub fn set_quantization(&mut self, q: crate::quant::CheckpointQuant) {
        self.quant = Some(q);
    }

    pub fn quantization(&self) -> Option<&crate::quant::CheckpointQuant> {
        self.quant.as_ref()
    }

    /// Marks `name` as a weight whose values need their scales: it is loaded only in its
    /// stored dtype. A file's u8 tensor becomes `[rows, 2 · cols]` E2M1 values (NVFP4's
    /// packing); E4M3 tensors are read as they are.
    pub fn mark_scaled(&mut self, name: &str) -> Result<()> {
        if let Some(Entry::File(i)) = self.entries.get(name) {
            let i = *i;
            let f = &self.files[i];
            let info = f
                .info(name)
                .ok_or_else(|| Error::MissingTensor { name: name.into(), where_: f.path.display().to_string() })?;
            if info.dtype == StDtype::U8 {
                if info.shape.len() != 2 {
                    return Err(Error::TensorDtype {
                        file: f.path.clone(),
                        name: name.into(),
                        expected: "u8 [rows, cols / 2] (nvfp4, two values a byte)".into(),
                        found: format!("u8 {:?}", info.shape),
                    });
                }
                self.entries.insert(name.to_string(), Entry::PackedFp4(i));
            }
        }
        let (dt, _) = self.stored_meta(name)?;
        if !dt.is_low_bit() {
            return Err(Error::TensorDtype {
                file: self.location(name).into(),
                name: name.into(),
                expected: "a quantized weight (f8_e4m3, or u8 nvfp4)".into(),
                found: dt.to_string(),
            });
        }
        self.scaled.insert(name.to_string());
        Ok(())
    }

    /// Whether `name` was marked by [`WeightStore::mark_scaled`].
    pub fn is_scaled(&self, name: &str) -> bool {
        self.scaled.contains(name)
    }

    pub fn add_tensor(&mut self, name: &str, t: Tensor) {
        self.entries.insert(name.to_string(), Entry::Owned(t));
    }

    /// A weight produced on demand by `load` (f32, of `shape`); `origin` names its source.
    pub fn add_lazy(&mut self, name: &str, shape: Vec<usize>, origin: String, load: LazyLoad) {
        self.entries.insert(name.to_string(), Entry::Lazy(shape, DType::F32, origin, load));
    }

    /// A weight produced on demand by `load` in `dtype` (a low-bit one: generated codes of a
    /// quantized checkpoint's shapes), of `shape`.
    pub fn add_lazy_typed(&mut self, name: &str, shape: Vec<usize>, dtype: DType, origin: String, load: LazyLoad) {
        self.entries.insert(name.to_string(), Entry::Lazy(shape, dtype, origin, load));
    }

    /// A weight of generated values (f32, of `shape`); `origin` names its source.
    pub fn add_synthetic(&mut self, name: &str, shape: Vec<usize>, origin: String, values: Synthetic) {
        self.entries.insert(name.to_string(), Entry::Synthetic(shape, origin, values));
    }

    /// A weight that is `parts` (weights of this store) concatenated along dim 0, in `dtype`;
    /// nothing is read until it is loaded. Errors name a missing part, or parts whose other
    /// dims differ.
    pub fn add_concat(&mut self, name: &str, parts: &[String], dtype: DType) -> Result<()> {
        let mut shape: Vec<usize> = Vec::new();
        for p in parts {
            let (_, s) = self.stored_meta(p)?;
            if shape.is_empty() {
                shape = s;
            } else if !s.is_empty() && s.len() == shape.len() && s[1..] == shape[1..] {
                shape[0] += s[0];
            } else {
                return Err(Error::Msg(format!(
                    "weight `{name}`: `{p}` {s:?} does not stack on dim 0 with {shape:?} (`{}`)",
                    parts[0]
                )));
            }
        }
        if shape.is_empty() {
            return Err(Error::Msg(format!("weight `{name}`: nothing to concatenate")));
        }
        self.entries.insert(name.to_string(), Entry::Concat { parts: parts.to_vec(), shape, dtype });
        Ok(())
    }

    /// A weight that is `groups` stacked on a new leading dim, each group its parts concatenated
    /// along dim 0 (a MoE layer's experts: `[gate_e; up_e]` for each expert `e` gives
    /// `[E, 2I, H]`); nothing is read until it is loaded. Errors name a missing part, parts that
    /// do not stack, or groups of different sizes.
    pub fn add_stacked(&mut self, name: &str, groups: &[Vec<String>], dtype: DType) -> Result<()> {
        let mut rows = Vec::with_capacity(groups.len());
        for g in groups {
            let mut r = 0;
            for p in g {
                r += self.stored_meta(p)?.1.first().copied().unwrap_or(0);
            }
            rows.push(r);
        }
        if let Some(i) = rows.iter().position(|&r| r != rows[0]) {
            return Err(Error::Msg(format!(
                "weight `{name}`: group {i} (`{}`) has {} rows, group 0 (`{}`) {}",
                groups[i].join("`, `"),
                rows[i],
                groups[0].join("`, `"),
                rows[0]
            )));
        }
        self.add_concat(name, &groups.concat(), dtype)?;
        if let Some(Entry::Concat { shape, .. }) = self.entries.get_mut(name) {
            let mut s = vec![groups.len(), rows[0]];
            s.extend_from_slice(&shape[1..]);
            *shape = s;
        }
        Ok(())
    }

    /// A weight that is `op` over weights of this store, each read as the dtype given, of
    /// `shape` and `dtype` (the op's output, as the graph inferred it); computed when loaded.
    pub fn add_computed(
        &mut self,
        name: &str,
        op: crate::Op,
        inputs: Vec<(String, DType)>,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Result<()> {
        for (i, _) in &inputs {
            self.stored_meta(i)?;
        }
        self.entries.insert(name.to_string(), Entry::Computed { op, inputs, shape, dtype });
        Ok(())
    }

    /// Weight `of` also under `name` (nothing is read or copied); errors name `of` when missing.
    pub fn add_alias(&mut self, name: &str, of: &str) -> Result<()> {
        self.stored_meta(of)?;
        self.entries.insert(name.to_string(), Entry::Alias(of.to_string()));
        Ok(())
    }

    /// Every name this store answers to, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    /// A weight that is rows `start..start + rows` of weight `of` (a checkpoint's fused q/k/v
    /// or gate/up tensor, split): nothing is read until it is loaded. Errors name `of` when it
    /// is missing or the rows are not inside it.
    pub fn add_rows(&mut self, name: &str, of: &str, start: usize, rows: usize) -> Result<()> {
        let (dtype, s) = self.stored_meta(of)?;
        if s.is_empty() || start.checked_add(rows).is_none_or(|end| end > s[0]) || rows == 0 {
            return Err(Error::Msg(format!(
                "weight `{name}`: rows {start}..{} are not inside `{of}` {s:?}",
                start + rows
            )));
        }
        let mut shape = s;
        shape[0] = rows;
        self.entries.insert(name.to_string(), Entry::Rows { of: of.to_string(), start, shape, dtype });
        Ok(())
    }

    /// A weight that is rank `rank`'s slice of weight `of` along `dim` (see `Entry::Shard`):
    /// nothing is read until it is loaded. Errors name `of` when it is missing or the dim does
    /// not split into `blocks · world` equal parts.
    pub fn add_shard(
        &mut self,
        name: &str,
        of: &str,
        dim: usize,
        blocks: usize,
        rank: usize,
        world: usize,
    ) -> Result<()> {
        let (dtype, s) = self.stored_meta(of)?;
        let parts = blocks * world;
        if dim >= s.len() || parts == 0 || rank >= world || !s[dim].is_multiple_of(parts) {
            return Err(Error::Msg(format!(
                "weight `{name}`: dim {dim} of `{of}` {s:?} does not split into {world} ranks' parts (of {blocks} block(s))"
            )));
        }
        if dtype.is_block() {
            return Err(Error::Msg(format!(
                "weight `{of}` is stored as {dtype}: sharding takes float and low-bit weights"
            )));
        }
        if dtype == DType::F4E2M1 && (s.len() != 2 || (dim == 1 && !(s[1] / 2).is_multiple_of(parts))) {
            return Err(Error::Msg(format!(
                "weight `{name}`: `{of}` {s:?} of E2M1 codes (two a byte) does not split into {world} ranks' bytes"
            )));
        }
        let mut shape = s;
        shape[dim] /= world;
        let entry = Entry::Shard { of: of.to_string(), dim, blocks, rank, world, shape, dtype };
        self.entries.insert(name.to_string(), entry);
        Ok(())
    }

    /// Rank `r`'s part of weight `of` along dim `d` (of `b` blocks, `w` ranks), as `shape`: from
    /// the file's bytes of its rows or columns where `of` is a file tensor; from the parts it
    /// needs where `of` stacks parts a group (a MoE weight of per-expert tensors: its rank's
    /// experts, or each expert's own rows or columns); else sliced from `of` loaded whole.
    fn shard(
        &self,
        of: &str,
        (d, b, r, w): (usize, usize, usize, usize),
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        match self.entries.get(of) {
            Some(Entry::File(i)) if !self.scaled.contains(of) => {
                return self.shard_from_file(*i, of, d, b, r, w, shape)?.cast(dtype);
            }
            Some(Entry::Concat { parts, shape: full, .. }) if full.len() >= 3 && parts.len() % full[0] == 0 => {
                let (groups, per) = (full[0], parts.len() / full[0]);
                let loaded: Option<Vec<Tensor>> = match d {
                    // Whole groups: only this rank's.
                    0 if b == 1 => {
                        let (from, to) = (r * groups / w, (r + 1) * groups / w);
                        Some(parts[from * per..to * per].iter().map(|p| self.load(p, dtype)).collect::<Result<_>>()?)
                    }
                    // Each group's rows in blocks of one part each (parts of equal rows): each
                    // part's own rows.
                    1 if b == per && self.rows_each(parts)? == Some(full[1] / per) => {
                        Some(parts.iter().map(|p| self.shard_part(p, (0, 1, r, w), dtype)).collect::<Result<_>>()?)
                    }
                    // A later dim: the same dim of every part, one dim earlier.
                    d if d >= 2 => {
                        Some(parts.iter().map(|p| self.shard_part(p, (d - 1, b, r, w), dtype)).collect::<Result<_>>()?)
                    }
                    _ => None,
                };
                if let Some(ts) = loaded {
                    let refs: Vec<&Tensor> = ts.iter().collect();
                    let t = crate::cpu::eval(&crate::Op::cat(0), &refs, &Default::default())?;
                    return t.reshape(shape.to_vec());
                }
            }
            _ => {}
        }
        let t = self.load(of, dtype)?;
        if let Some(codes) = t.as_low_bit() {
            // Low-bit codes: their bytes sliced as a file's are (E2M1: two a byte along a row).
            let mut bytes_shape = t.shape().to_vec();
            if t.dtype() == DType::F4E2M1 {
                *bytes_shape.last_mut().expect("checked by add_shard") /= 2;
            }
            let bytes = shard_bytes(codes, &bytes_shape, 1, (d, b, r, w));
            return Tensor::from_le_bytes(t.dtype(), shape.to_vec(), &bytes);
        }
        WeightStore::shard_of(&t, d, b, r, w)
    }

    /// The rows every one of `parts` has, if they all have the same.
    fn rows_each(&self, parts: &[String]) -> Result<Option<usize>> {
        let mut rows = None;
        for p in parts {
            let r = self.stored_meta(p)?.1.first().copied();
            if rows.is_some() && rows != r {
                return Ok(None);
            }
            rows = r;
        }
        Ok(rows)
    }

    /// A part's shard (what `shard` reads of a stacked weight's parts), its shape from the part's.
    fn shard_part(&self, part: &str, (d, b, r, w): (usize, usize, usize, usize), dtype: DType) -> Result<Tensor> {
        let (_, mut shape) = self.stored_meta(part)?;
        if d >= shape.len() || !shape[d].is_multiple_of(b * w) {
            return Err(Error::Msg(format!("weight `{part}` {shape:?}: dim {d} does not split into {w} ranks' parts")));
        }
        shape[d] /= w;
        self.shard(part, (d, b, r, w), &shape, dtype)
    }

    /// Rank `rank`'s slice of `t` along `dim` (`Entry::Shard`), from `t` itself.
    fn shard_of(t: &Tensor, dim: usize, blocks: usize, rank: usize, world: usize) -> Result<Tensor> {
        let n = t.shape()[dim];
        let (block, part) = (n / blocks, n / blocks / world);
        let pieces: Vec<Tensor> = (0..blocks)
            .map(|b| {
                let start = (b * block + rank * part) as i64;
                let s = crate::ops::layout::Slice::new(dim as i64, start, start + part as i64);
                crate::cpu::eval(&crate::Op::slice(s), &[t], &Default::default())
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = pieces.iter().collect();
        crate::cpu::eval(&crate::Op::cat(dim as i64), &refs, &Default::default())
    }

    /// Rank `rank`'s slice along `dim` straight from a file tensor's bytes: the rows (dim 0) or
    /// each row's columns (the last dim) it covers, nothing else read.
    #[allow(clippy::too_many_arguments)]
    fn shard_from_file(
        &self,
        i: usize,
        of: &str,
        dim: usize,
        blocks: usize,
        rank: usize,
        world: usize,
        shape: &[usize],
    ) -> Result<Tensor> {
        let (stored, full) = self.stored_meta(of)?;
        let f = &self.files[i];
        let b = f.bytes(f.info(of).expect("checked by stored_meta"));
        let out = shard_bytes(b, &full, stored.size_in_bytes(), (dim, blocks, rank, world));
        Tensor::from_le_bytes(stored, shape.to_vec(), &out)
    }

    /// Weight `of` (`[G, A, B]`) with its last two dims swapped, `[G, B, A]`: nothing is read
    /// until it is loaded. Errors name `of` when it is missing or not three-dimensional. A
    /// transposed synthetic weight is a synthetic weight of the new shape (random values need no
    /// order), so devices still generate it where it lives.
    pub fn add_transposed(&mut self, name: &str, of: &str) -> Result<()> {
        let (dtype, s) = self.stored_meta(of)?;
        if s.len() != 3 {
            return Err(Error::Msg(format!("weight `{name}`: `{of}` {s:?} is not [groups, rows, columns]")));
        }
        let shape = vec![s[0], s[2], s[1]];
        let entry = match self.entries.get(of) {
            Some(Entry::Synthetic(_, origin, v)) => Entry::Synthetic(shape, format!("{origin}, transposed"), *v),
            _ => Entry::Transposed { of: of.to_string(), shape, dtype },
        };
        self.entries.insert(name.to_string(), entry);
        Ok(())
    }

    /// When a weight is generated values throughout: its pieces in storage order (element
    /// count, values), a concatenation's parts one after another.
    pub fn synthetic_parts(&self, name: &str) -> Option<Vec<(usize, Synthetic)>> {
        match self.entries.get(name)? {
            Entry::Synthetic(shape, _, v) => Some(vec![(shape.iter().product(), *v)]),
            Entry::Alias(of) => self.synthetic_parts(of),
            Entry::Concat { parts, .. } => {
                let mut all = Vec::new();
                for p in parts {
                    all.extend(self.synthetic_parts(p)?);
                }
                Some(all)
            }
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn describe(&self) -> String {
        format!("{} ({} files)", self.origin, self.files.len())
    }

    /// Where a tensor lives, for error messages.
    pub fn location(&self, name: &str) -> String {
        match self.entries.get(name) {
            Some(Entry::File(i) | Entry::PackedFp4(i)) => self.files[*i].path.display().to_string(),
            Some(Entry::Owned(_)) => "computed by the importer".into(),
            Some(Entry::Lazy(_, _, origin, _) | Entry::Synthetic(_, origin, _)) => origin.clone(),
            Some(Entry::Concat { parts, .. }) => format!("{} concatenated", parts.join(" + ")),
            Some(Entry::Rows { of, start, shape, .. }) => format!("rows {start}..{} of {of}", start + shape[0]),
            Some(Entry::Transposed { of, .. }) => format!("`{of}` transposed"),
            Some(Entry::Shard { of, dim, rank, world, .. }) => {
                format!("rank {rank} of {world}'s part of dim {dim} of `{of}` ({})", self.location(of))
            }
            Some(Entry::Alias(of)) => format!("`{of}` in {}", self.location(of)),
            Some(Entry::Computed { op, inputs, .. }) => {
                let ins: Vec<&str> = inputs.iter().map(|(n, _)| n.as_str()).collect();
                format!("{}({}) computed at load", op.name(), ins.join(", "))
            }
            None => self.origin.clone(),
        }
    }

    /// Stored dtype and shape, without reading data.
    pub fn stored_meta(&self, name: &str) -> Result<(DType, Vec<usize>)> {
        match self.entries.get(name) {
            Some(Entry::File(i)) => {
                let f = &self.files[*i];
                let info = f
                    .info(name)
                    .ok_or_else(|| Error::MissingTensor { name: name.into(), where_: f.path.display().to_string() })?;
                let dt = float_dtype(info.dtype).ok_or_else(|| Error::TensorDtype {
                    file: f.path.clone(),
                    name: name.into(),
                    expected: "f32, f16 or bf16".into(),
                    found: format!("{:?}", info.dtype),
                })?;
                Ok((dt, info.shape.clone()))
            }
            Some(Entry::Owned(t)) => Ok((t.dtype(), t.shape().to_vec())),
            Some(Entry::PackedFp4(i)) => {
                let info = self.files[*i].info(name).expect("checked when marked");
                Ok((DType::F4E2M1, vec![info.shape[0], 2 * info.shape[1]]))
            }
            Some(Entry::Alias(of)) => self.stored_meta(of),
            Some(Entry::Lazy(shape, dtype, ..)) => Ok((*dtype, shape.clone())),
            Some(Entry::Synthetic(shape, ..)) => Ok((DType::F32, shape.clone())),
            Some(
                Entry::Concat { shape, dtype, .. }
                | Entry::Rows { shape, dtype, .. }
                | Entry::Transposed { shape, dtype, .. }
                | Entry::Shard { shape, dtype, .. }
                | Entry::Computed { shape, dtype, .. },
            ) => Ok((*dtype, shape.clone())),
            None => Err(Error::MissingTensor { name: name.into(), where_: self.origin.clone() }),
        }
    }

    /// Reads a tensor, converted to `dtype`. A weight marked scaled is read only in its stored
    /// dtype: converted, its values would lack their scales.
    pub fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        if self.scaled.contains(name) {
            let (stored, _) = self.stored_meta(name)?;
            if stored != dtype {
                let (plugin, transform) = self
                    .quant
                    .as_ref()
                    .map(|q| (q.algo.plugin(), q.algo.transform()))
                    .unwrap_or(("fp8", "quantize_fp8_linear_from_config"));
                return Err(Error::Msg(format!(
                    "weight `{name}` ({}) is stored as {stored} with scales, but the graph reads it as {dtype}: only \
                     a quantized linear reads it, and the `{plugin}` plugin's `{transform}` did not make one \
                     (is [transforms.{transform}] disabled in the config?)",
                    self.location(name)
                )));
            }
        }
        let i = match self.entries.get(name) {
            Some(Entry::PackedFp4(i)) => {
                let info = self.files[*i].info(name).expect("checked when marked");
                let (_, shape) = self.stored_meta(name)?;
                return Tensor::from_low_bit(DType::F4E2M1, shape, self.files[*i].bytes(info).to_vec())?.cast(dtype);
            }
            Some(Entry::Owned(t)) => return t.cast(dtype),
            Some(Entry::Alias(of)) => return self.load(of, dtype),
            Some(Entry::Lazy(shape, _, origin, f)) => {
                let t = f()?;
                if t.shape() != shape.as_slice() {
                    return Err(Error::TensorShape {
                        file: origin.into(),
                        name: name.into(),
                        expected: shape.clone(),
                        found: t.shape().to_vec(),
                    });
                }
                return t.cast(dtype);
            }
            Some(Entry::Synthetic(shape, _, v)) => {
                let mut values = vec![0f32; shape.iter().product()];
                v.fill(&mut values);
                return Tensor::from_f32(shape.clone(), values)?.cast(dtype);
            }
            Some(Entry::Concat { parts, shape, .. }) => {
                let ts: Vec<Tensor> = parts.iter().map(|p| self.load(p, dtype)).collect::<Result<_>>()?;
                let refs: Vec<&Tensor> = ts.iter().collect();
                let t = crate::cpu::eval(&crate::Op::cat(0), &refs, &Default::default())?;
                // Stacked (`add_stacked`): the same values under a leading group dim.
                return if t.shape() == shape.as_slice() { Ok(t) } else { t.reshape(shape.clone()) };
            }
            Some(Entry::Computed { op, inputs, shape, .. }) => {
                let ts: Vec<Tensor> = inputs.iter().map(|(n, d)| self.load(n, *d)).collect::<Result<_>>()?;
                let refs: Vec<&Tensor> = ts.iter().collect();
                let t = crate::cpu::eval(op, &refs, &Default::default())?;
                if t.shape() != shape.as_slice() {
                    return Err(Error::TensorShape {
                        file: self.location(name).into(),
                        name: name.into(),
                        expected: shape.clone(),
                        found: t.shape().to_vec(),
                    });
                }
                return t.cast(dtype);
            }
            Some(Entry::Rows { of, start, shape, .. }) => {
                let t = self.load(of, dtype)?;
                let s = crate::ops::layout::Slice::new(0, *start as i64, (start + shape[0]) as i64);
                return crate::cpu::eval(&crate::Op::slice(s), &[&t], &Default::default());
            }
            Some(Entry::Transposed { of, .. }) => {
                let t = self.load(of, dtype)?;
                return crate::cpu::eval(&crate::Op::transpose(1, 2), &[&t], &Default::default());
            }
            Some(Entry::Shard { of, dim, blocks, rank, world, shape, .. }) => {
                return self.shard(of, (*dim, *blocks, *rank, *world), shape, dtype);
            }
            Some(Entry::File(i)) => *i,
            None => return Err(Error::MissingTensor { name: name.into(), where_: self.origin.clone() }),
        };
        let (stored, shape) = self.stored_meta(name)?;
        let f = &self.files[i];
        let info = f.info(name).expect("checked by stored_meta");
        let b = f.bytes(info);
        Tensor::from_le_bytes(stored, shape, b)?.cast(dtype)
    }
}

/// Rank `rank`'s part along `dim` (of `blocks` blocks, `world` ranks) of a tensor `full` whose
/// elements are `elem` bytes each, stored row-major in `b`: in each block, the rank's share of
/// the indices of `dim`, every dim after it whole.
fn shard_bytes(
    b: &[u8],
    full: &[usize],
    elem: usize,
    (dim, blocks, rank, world): (usize, usize, usize, usize),
) -> Vec<u8> {
    // Bytes of one index of `dim` (all dims after it), and how many times `dim` repeats.
    let inner: usize = full[dim + 1..].iter().product::<usize>() * elem;
    let outer: usize = full[..dim].iter().product();
    let (block, part) = (full[dim] / blocks, full[dim] / blocks / world);
    let mut out = Vec::with_capacity(outer * blocks * part * inner);
    for o in 0..outer {
        let row = &b[o * full[dim] * inner..(o + 1) * full[dim] * inner];
        for k in 0..blocks {
            let start = (k * block + rank * part) * inner;
            out.extend_from_slice(&row[start..start + part * inner]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_of_stacked_experts_read_their_parts_and_equal_slices_of_the_whole() {
        // 4 experts, each [gate (4 x 4); up (4 x 4)] and down (4 x 6).
        let mut st = WeightStore::default();
        let (mut gu, mut down) = (Vec::new(), Vec::new());
        for e in 0..4 {
            for (part, rows, cols) in [("gate", 4, 4), ("up", 4, 4), ("down", 4, 6)] {
                let name = format!("e{e}.{part}");
                let v: Vec<f32> = (0..rows * cols).map(|i| (e * 1000 + i) as f32 + part.len() as f32 * 0.1).collect();
                st.add_tensor(&name, Tensor::from_f32(vec![rows, cols], v).unwrap());
                if part == "down" {
                    down.push(vec![name]);
                } else if part == "gate" {
                    gu.push(vec![name]);
                } else {
                    gu.last_mut().unwrap().push(name);
                }
            }
        }
        st.add_stacked("gu", &gu, DType::F32).unwrap();
        st.add_stacked("down", &down, DType::F32).unwrap();
        let cases = [("gu", 0, 1), ("gu", 1, 2), ("gu", 2, 1), ("down", 0, 1), ("down", 2, 1), ("down", 1, 1)];
        for (of, dim, blocks) in cases {
            for (r, w) in [(0, 2), (1, 2)] {
                let name = format!("{of}.d{dim}.{r}");
                st.add_shard(&name, of, dim, blocks, r, w).unwrap();
                let got = st.load(&name, DType::F32).unwrap();
                let want = WeightStore::shard_of(&st.load(of, DType::F32).unwrap(), dim, blocks, r, w).unwrap();
                assert_eq!(got.shape(), want.shape(), "{name}");
                assert_eq!(got.to_f32(), want.to_f32(), "{name}");
            }
        }
    }

    #[test]
    fn uniform_values_are_the_defined_streams() {
        // Two chunks and a part of a third: each chunk restarts its own stream.
        let n = 2 * SYNTHETIC_CHUNK + 5;
        let v = Synthetic::Uniform { seed: 7, scale: 0.5 };
        let mut out = vec![0f32; n];
        v.fill(&mut out);
        let stream = |c: u32, i: usize| {
            let mut x = (7u32 ^ c.wrapping_mul(0x9e37_79b9)) | 1;
            for _ in 0..=i {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
            }
            (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * 0.5
        };
        assert_eq!(out[0], stream(0, 0));
        assert_eq!(out[SYNTHETIC_CHUNK + 3], stream(1, 3));
        assert_eq!(out[n - 1], stream(2, 4));
        assert!(out.iter().all(|x| x.abs() <= 0.5));
        let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
    }

    #[test]
    fn a_transposed_weight_swaps_its_last_two_dims_when_loaded() {
        let mut s = WeightStore::new("test");
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        s.add_tensor("w", Tensor::from_f32(vec![2, 2, 3], v).unwrap());
        s.add_transposed("wt", "w").unwrap();
        assert_eq!(s.stored_meta("wt").unwrap(), (DType::F32, vec![2, 3, 2]));
        let t = s.load("wt", DType::F32).unwrap();
        assert_eq!(t.shape(), &[2, 3, 2]);
        assert_eq!(t.to_f32().into_owned(), vec![0., 3., 1., 4., 2., 5., 6., 9., 7., 10., 8., 11.]);
        assert!(s.location("wt").contains("`w` transposed"));
        let err = s.add_transposed("x", "missing").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        s.add_tensor("flat", Tensor::from_f32(vec![4], vec![0.; 4]).unwrap());
        assert!(s.add_transposed("y", "flat").unwrap_err().to_string().contains("not [groups"));
        // Synthetic: generated in the new shape, still generated on a device.
        s.add_synthetic("r", vec![2, 4, 3], "random r".into(), Synthetic::uniform_named("r", 1.0));
        s.add_transposed("rt", "r").unwrap();
        assert_eq!(s.stored_meta("rt").unwrap().1, vec![2, 3, 4]);
        assert_eq!(s.synthetic_parts("rt").unwrap(), vec![(24, Synthetic::uniform_named("r", 1.0))]);
    }

    #[test]
    fn a_concatenation_loads_its_parts_stacked_and_says_what_it_is_made_of() {
        let mut s = WeightStore::new("test");
        s.add_synthetic("a", vec![2, 3], "random a".into(), Synthetic::uniform_named("a", 1.0));
        s.add_synthetic("b", vec![1, 3], "ones b".into(), Synthetic::Const(1.0));
        s.add_concat("ab", &["a".into(), "b".into()], DType::BF16).unwrap();
        assert_eq!(s.stored_meta("ab").unwrap(), (DType::BF16, vec![3, 3]));
        let (a, b, ab) =
            (s.load("a", DType::BF16).unwrap(), s.load("b", DType::BF16).unwrap(), s.load("ab", DType::BF16).unwrap());
        assert_eq!(ab.shape(), &[3, 3]);
        let want: Vec<f32> = a.to_f32().iter().chain(b.to_f32().iter()).copied().collect();
        assert_eq!(ab.to_f32().into_owned(), want);
        assert_eq!(
            s.synthetic_parts("ab").unwrap(),
            vec![(6, Synthetic::uniform_named("a", 1.0)), (3, Synthetic::Const(1.0))]
        );
        // A part that is not generated: no synthetic description of the whole.
        s.add_tensor("c", Tensor::from_f32(vec![1, 3], vec![0.0; 3]).unwrap());
        s.add_concat("ac", &["a".into(), "c".into()], DType::F32).unwrap();
        assert!(s.synthetic_parts("ac").is_none());
        assert_eq!(s.location("ac"), "a + c concatenated");
        // Parts that do not stack, and a missing part, are refused by name.
        s.add_tensor("d", Tensor::from_f32(vec![2, 2], vec![0.0; 4]).unwrap());
        let e = s.add_concat("ad", &["a".into(), "d".into()], DType::F32).unwrap_err().to_string();
        assert!(e.contains("`ad`") && e.contains("`d`"), "{e}");
        let e = s.add_concat("ax", &["a".into(), "x".into()], DType::F32).unwrap_err().to_string();
        assert!(e.contains('x'), "{e}");
    }
}

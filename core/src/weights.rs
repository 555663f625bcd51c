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
        _ => None,
    }
}

/// Produces a weight on demand (dequantizing, permuting) in f32.
pub type LazyLoad = std::sync::Arc<dyn Fn() -> Result<Tensor> + Send + Sync>;

#[derive(Clone)]
enum Entry {
    File(usize),
    Owned(Tensor),
    /// Computed when loaded: shape, where it comes from (for messages), and the loader.
    Lazy(Vec<usize>, String, LazyLoad),
}

/// Cloning is cheap: files are shared, owned tensors share their storage.
#[derive(Default, Clone)]
pub struct WeightStore {
    files: Vec<std::sync::Arc<SafetensorsFile>>,
    entries: HashMap<String, Entry>,
    origin: String,
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

    pub fn add_tensor(&mut self, name: &str, t: Tensor) {
        self.entries.insert(name.to_string(), Entry::Owned(t));
    }

    /// A weight produced on demand by `load` (f32, of `shape`); `origin` names its source.
    pub fn add_lazy(&mut self, name: &str, shape: Vec<usize>, origin: String, load: LazyLoad) {
        self.entries.insert(name.to_string(), Entry::Lazy(shape, origin, load));
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
            Some(Entry::File(i)) => self.files[*i].path.display().to_string(),
            Some(Entry::Owned(_)) => "computed by the importer".into(),
            Some(Entry::Lazy(_, origin, _)) => origin.clone(),
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
            Some(Entry::Lazy(shape, ..)) => Ok((DType::F32, shape.clone())),
            None => Err(Error::MissingTensor { name: name.into(), where_: self.origin.clone() }),
        }
    }

    /// Reads a tensor, converted to `dtype`.
    pub fn load(&self, name: &str, dtype: DType) -> Result<Tensor> {
        let i = match self.entries.get(name) {
            Some(Entry::Owned(t)) => return t.cast(dtype),
            Some(Entry::Lazy(shape, origin, f)) => {
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

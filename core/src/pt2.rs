//! torch.export archives (`.pt2`, written by `torch.export.save`): the model's graph JSON and
//! its weights, read without Python. Two layouts:
//!
//! - PT2 archive (torch >= 2.8), one top-level folder, the archive's name:
//!   `<a>/archive_format` (`pt2`), `<a>/models/<model>.json` (the serialized ExportedProgram),
//!   `<a>/data/weights/<model>_weights_config.json` (per weight: file, dtype, sizes, strides,
//!   storage offset) and the raw storages `<a>/data/weights/weight_N`; constants likewise under
//!   `data/constants`.
//! - Legacy (torch 2.6, 2.7): `serialized_exported_program.json` and the state dict and constants
//!   as `torch.save` containers (`serialized_state_dict.pt`, `serialized_constants.pt`: a zip
//!   of a pickle and raw storages). The pickles are read by the `pytorch-reader` crate (a
//!   pickle reader that understands torch's storages and never runs code); it opens files, so
//!   the two inner containers are copied to a private temporary folder for the archive's life.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// One weight as the archive describes it.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightInfo {
    pub name: String,
    /// The storage's entry in the zip.
    pub file: String,
    pub dtype: DType,
    pub sizes: Vec<usize>,
    pub strides: Vec<usize>,
    pub storage_offset: usize,
    pub is_param: bool,
}

/// An opened `.pt2` archive.
pub struct Pt2Archive {
    pub path: PathBuf,
    /// The top-level folder every entry lives in.
    pub prefix: String,
    pub model_name: String,
    /// The serialized ExportedProgram (`models/<model>.json`).
    pub program: Value,
    pub weights: Vec<WeightInfo>,
    /// For the legacy layout: where the inner `torch.save` containers were copied.
    legacy: Option<LegacyFiles>,
}

/// The legacy layout's inner containers, copied out of the archive; removed on drop.
struct LegacyFiles {
    dir: PathBuf,
}

impl Drop for LegacyFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The legacy layout's two `torch.save` containers: parameters and persistent buffers, then
/// constants (non-persistent buffers, lifted tensors).
const LEGACY_CONTAINERS: [&str; 2] = ["serialized_state_dict.pt", "serialized_constants.pt"];

fn reader_dtype(d: pytorch_reader::DType) -> Option<DType> {
    use pytorch_reader::DType as P;
    Some(match d {
        P::F32 => DType::F32,
        P::F16 => DType::F16,
        P::BF16 => DType::BF16,
        P::I64 => DType::I64,
        P::Bool => DType::Bool,
        _ => return None,
    })
}

/// torch's ScalarType numbering in the export schema, for the dtypes the host computes in.
pub fn scalar_type(code: i64) -> Option<DType> {
    Some(match code {
        5 => DType::I64,
        6 => DType::F16,
        7 => DType::F32,
        12 => DType::Bool,
        13 => DType::BF16,
        _ => return None,
    })
}

fn as_int(v: &Value) -> Option<i64> {
    v.get("as_int").and_then(Value::as_i64)
}

impl Pt2Archive {
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::BadFile { file: self.path.clone(), msg: msg.into() }
    }

    fn zip(path: &Path) -> Result<zip::ZipArchive<std::fs::File>> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // The archive starts at byte 0 (torch writes nothing before it). The reader's default,
        // detecting an offset, is misled by the zip archive torch stores inside the .pt2 and
        // refused some valid files (those named with 8 characters, among others).
        let config = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
        zip::ZipArchive::with_config(config, f)
            .map_err(|e| Error::BadFile { file: path.into(), msg: format!("not a readable zip archive: {e}") })
    }

    /// Entry `name`, read with caps: at most `limit` bytes, and no entry that inflates past
    /// `MAX_RATIO` times its compressed size once past `RATIO_FLOOR` (a zip bomb), whatever its
    /// header claims (the read stops at the cap).
    fn read_entry(path: &Path, z: &mut zip::ZipArchive<std::fs::File>, name: &str, limit: u64) -> Result<Vec<u8>> {
        const MAX_RATIO: u64 = 100;
        const RATIO_FLOOR: u64 = 64 << 20;
        let bad = |msg: String| Error::BadFile { file: path.into(), msg };
        let e = z.by_name(name).map_err(|_| bad(format!("missing entry `{name}`")))?;
        let (size, packed) = (e.size(), e.compressed_size());
        // Past the floor, what the compressed bytes may inflate to is capped too.
        let limit = limit.min(RATIO_FLOOR.max(packed.saturating_mul(MAX_RATIO)));
        if size > limit {
            return Err(bad(format!(
                "entry `{name}` is {size} bytes uncompressed ({packed} compressed); refused past {limit} bytes"
            )));
        }
        let mut buf = Vec::with_capacity(size as usize);
        e.take(limit + 1).read_to_end(&mut buf).map_err(|err| bad(format!("entry `{name}`: {err}")))?;
        if buf.len() as u64 > limit {
            return Err(bad(format!(
                "entry `{name}` inflates past {limit} bytes ({packed} compressed; its header said {size})"
            )));
        }
        Ok(buf)
    }

    fn json(path: &Path, z: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Result<Value> {
        // The graph and its tables: tens of MB for the largest models.
        let bytes = Self::read_entry(path, z, name, 1 << 30)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::BadFile { file: path.into(), msg: format!("entry `{name}`: invalid JSON: {e}") })
    }

    /// Reads one `*_config.json` table of stored tensors (weights or constants) into `out`.
    fn read_table(path: &Path, cfg: &Value, cfg_name: &str, dir: &str, out: &mut Vec<WeightInfo>) -> Result<()> {
        let bad = |msg: String| Error::BadFile { file: path.into(), msg };
        let table = cfg
            .get("config")
            .and_then(Value::as_object)
            .ok_or_else(|| bad(format!("{cfg_name}: no `config` object")))?;
        for (name, w) in table {
            let field = |k: &str| bad(format!("{cfg_name}: weight `{name}`: missing or bad `{k}`"));
            let meta = w.get("tensor_meta").ok_or_else(|| field("tensor_meta"))?;
            let code = meta.get("dtype").and_then(Value::as_i64).ok_or_else(|| field("tensor_meta.dtype"))?;
            let dtype = scalar_type(code)
                .ok_or_else(|| bad(format!("{cfg_name}: weight `{name}`: dtype code {code} is not supported")))?;
            let ints = |k: &str| -> Result<Vec<usize>> {
                meta.get(k)
                    .and_then(Value::as_array)
                    .ok_or_else(|| field(&format!("tensor_meta.{k}")))?
                    .iter()
                    .map(|v| {
                        as_int(v)
                            .and_then(|i| usize::try_from(i).ok())
                            .ok_or_else(|| field(&format!("tensor_meta.{k}")))
                    })
                    .collect()
            };
            let (sizes, strides) = (ints("sizes")?, ints("strides")?);
            if sizes.len() != strides.len() {
                return Err(field("tensor_meta.strides"));
            }
            let storage_offset = meta
                .get("storage_offset")
                .and_then(as_int)
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| field("tensor_meta.storage_offset"))?;
            if w.get("use_pickle").and_then(Value::as_bool) == Some(true) {
                return Err(bad(format!("{cfg_name}: weight `{name}` is pickled; only raw storages are read")));
            }
            let file = w.get("path_name").and_then(Value::as_str).ok_or_else(|| field("path_name"))?;
            out.push(WeightInfo {
                name: name.clone(),
                file: format!("{dir}{file}"),
                dtype,
                sizes,
                strides,
                storage_offset,
                is_param: w.get("is_param").and_then(Value::as_bool).unwrap_or(false),
            });
        }
        Ok(())
    }

    /// Opens the archive and reads its graph JSON and weight table (not the weights).
    pub fn open(path: &Path) -> Result<Pt2Archive> {
        let mut z = Self::zip(path)?;
        let bad = |msg: String| Error::BadFile { file: path.into(), msg };
        let names: Vec<String> = z
            .file_names()
            .map(|n| n.map(|n| n.into_owned()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad(format!("unreadable zip directory: {e}")))?;
        if names.iter().any(|n| n == "serialized_exported_program.json") {
            return Self::open_legacy(path, &mut z, &names);
        }
        let format = names
            .iter()
            .find(|n| n.ends_with("/archive_format"))
            .ok_or_else(|| {
                bad("neither an archive_format entry (PT2 archive, torch >= 2.8) nor serialized_exported_program.json \
                     (torch 2.6/2.7): not a torch.export archive"
                    .into())
            })?
            .clone();
        let prefix = format.trim_end_matches("archive_format").to_string();
        let kind = String::from_utf8_lossy(&Self::read_entry(path, &mut z, &format, 4096)?).trim().to_string();
        if kind != "pt2" {
            return Err(bad(format!("archive_format is `{kind}`, expected `pt2`")));
        }
        let model_json = names
            .iter()
            .find(|n| n.starts_with(&format!("{prefix}models/")) && n.ends_with(".json"))
            .ok_or_else(|| bad(format!("no {prefix}models/<name>.json entry")))?
            .clone();
        let model_name =
            model_json.trim_start_matches(&format!("{prefix}models/")).trim_end_matches(".json").to_string();
        let program = Self::json(path, &mut z, &model_json)?;
        // Parameters and persistent buffers under data/weights; non-persistent buffers and
        // other constants under data/constants (absent when the model has none).
        let mut weights = Vec::new();
        for dir in ["weights", "constants"] {
            let cfg_name = format!("{prefix}data/{dir}/{model_name}_{dir}_config.json");
            if dir == "constants" && !names.contains(&cfg_name) {
                continue;
            }
            let cfg = Self::json(path, &mut z, &cfg_name)?;
            Self::read_table(path, &cfg, &cfg_name, &format!("{prefix}data/{dir}/"), &mut weights)?;
        }
        Ok(Pt2Archive { path: path.into(), prefix, model_name, program, weights, legacy: None })
    }

    /// The legacy layout: the program JSON, and the tensors of the two inner containers.
    fn open_legacy(path: &Path, z: &mut zip::ZipArchive<std::fs::File>, names: &[String]) -> Result<Pt2Archive> {
        let bad = |msg: String| Error::BadFile { file: path.into(), msg };
        let program = Self::json(path, z, "serialized_exported_program.json")?;
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("autodeploy-pt2-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let files = LegacyFiles { dir };
        let mut weights = Vec::new();
        for entry in LEGACY_CONTAINERS {
            if !names.iter().any(|n| n == entry) {
                if entry == LEGACY_CONTAINERS[0] {
                    return Err(bad(format!("missing entry `{entry}`")));
                }
                continue;
            }
            let copy = files.dir.join(entry);
            std::fs::write(&copy, Self::read_entry(path, z, entry, 1 << 40)?).map_err(|e| Error::io(&copy, e))?;
            let r = pytorch_reader::PytorchReader::new(&copy)
                .map_err(|e| bad(format!("entry `{entry}`: not a readable torch.save container: {e}")))?;
            let mut keys = r.keys();
            keys.sort();
            for name in keys {
                let t = r.get(&name).expect("listed key");
                let dtype = reader_dtype(t.dtype()).ok_or_else(|| {
                    bad(format!("entry `{entry}`: tensor `{name}` has dtype {:?}, which is not supported", t.dtype()))
                })?;
                let sizes = t.shape().to_vec();
                let mut strides = vec![1; sizes.len()];
                for d in (0..sizes.len().saturating_sub(1)).rev() {
                    strides[d] = strides[d + 1] * sizes[d + 1];
                }
                weights.push(WeightInfo {
                    name,
                    file: entry.to_string(),
                    dtype,
                    sizes,
                    strides,
                    storage_offset: 0,
                    is_param: entry == LEGACY_CONTAINERS[0],
                });
            }
        }
        Ok(Pt2Archive {
            path: path.into(),
            prefix: String::new(),
            model_name: "model".into(),
            program,
            weights,
            legacy: Some(files),
        })
    }

    /// Reads one weight of the legacy layout from its copied container.
    fn load_legacy(&self, dir: &Path, w: &WeightInfo) -> Result<Tensor> {
        let copy = dir.join(&w.file);
        let r = pytorch_reader::PytorchReader::new(&copy)
            .map_err(|e| self.bad(format!("entry `{}`: not a readable torch.save container: {e}", w.file)))?;
        let t = r.get(&w.name).ok_or_else(|| self.bad(format!("entry `{}` no longer holds `{}`", w.file, w.name)))?;
        let bytes = t.read().map_err(|e| self.bad(format!("entry `{}`: tensor `{}`: {e}", w.file, w.name)))?;
        Tensor::from_le_bytes(w.dtype, w.sizes.clone(), &bytes)
            .map_err(|e| self.bad(format!("weight `{}`: {e}", w.name)))
    }

    /// Reads one weight: its storage's bytes viewed with the sizes, strides and offset the
    /// archive records (tied weights share a storage), copied out contiguous.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let w = self
            .weights
            .iter()
            .find(|w| w.name == name)
            .ok_or_else(|| Error::MissingTensor { name: name.into(), where_: self.path.display().to_string() })?;
        if let Some(l) = &self.legacy {
            return self.load_legacy(&l.dir, w);
        }
        let mut z = Self::zip(&self.path)?;
        // A weight's storage: as large as the model needs (1 TiB), within the inflation cap.
        let bytes = Self::read_entry(&self.path, &mut z, &w.file, 1 << 40)?;
        let esz = w.dtype.size_in_bytes();
        // The last element the view reaches must lie inside the storage.
        let n = w.sizes.iter().try_fold(1usize, |a, &s| a.checked_mul(s));
        let reach = w.sizes.iter().zip(&w.strides).try_fold(w.storage_offset, |acc, (s, st)| {
            s.saturating_sub(1).checked_mul(*st).and_then(|x| acc.checked_add(x))
        });
        let end = reach.and_then(|r| r.checked_add(1)).and_then(|r| r.checked_mul(esz));
        let n = match (n, end) {
            (Some(0), _) => 0,
            (Some(n), Some(end)) if end <= bytes.len() => n,
            _ => {
                return Err(self.bad(format!(
                    "weight `{name}`: sizes {:?}, strides {:?}, offset {} reach past its storage `{}` of {} bytes",
                    w.sizes,
                    w.strides,
                    w.storage_offset,
                    w.file,
                    bytes.len()
                )))
            }
        };
        let mut out = Vec::with_capacity(n * esz);
        let rank = w.sizes.len();
        for i in 0..n {
            let (mut rem, mut at) = (i, w.storage_offset);
            for d in (0..rank).rev() {
                at += (rem % w.sizes[d]) * w.strides[d];
                rem /= w.sizes[d];
            }
            out.extend_from_slice(&bytes[at * esz..(at + 1) * esz]);
        }
        Tensor::from_le_bytes(w.dtype, w.sizes.clone(), &out).map_err(|e| self.bad(format!("weight `{name}`: {e}")))
    }

    /// The ATen targets of the graph's nodes, in order.
    pub fn node_targets(&self) -> Vec<String> {
        self.program["graph_module"]["graph"]["nodes"]
            .as_array()
            .map(|ns| ns.iter().filter_map(|n| n["target"].as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    }
}

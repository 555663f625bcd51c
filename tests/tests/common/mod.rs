#![allow(dead_code)]
//! Shared helpers: fixture paths, reference tensors, building and running a fixture model.

use std::path::PathBuf;

use autodeploy_core::backend::{CompiledModel, ImportRequest};
use autodeploy_core::registry;
use autodeploy_core::{DType, Graph, Tensor};
use safetensors::SafeTensors;

pub mod edit;
pub mod gpu;
pub mod steps;

pub const FAMILIES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen2-window",
    "qwen3",
    "qwen3_moe",
    "mixtral",
    "llama4_text",
    "llama-rope-linear",
    "llama-rope-dynamic",
    "granite",
    "nemotron-nas",
    "openelm",
    "phi3",
    "phi3-longrope",
    "gemma",
    "gemma2",
    "gemma3_text",
    "starcoder2",
];

/// The mixture-of-experts fixtures. Their routing is a discontinuity: where a token's k-th and
/// (k+1)-th router logits are closer than rounding moves them (transformers' own bf16 router
/// logits move up to 0.2 from its f32 ones on these fixtures, against a median gap of 0.7),
/// two engines in bf16 or f16 can choose different experts and that position's logits jump.
/// Reduced-precision comparisons of these families therefore bound the mean error by
/// transformers' own bf16 noise instead of bounding each logit; f32 (exact routing) is held to
/// the same bounds as every family.
pub const ROUTED: &[&str] = &["qwen3_moe", "mixtral", "llama4_text"];

/// The fixtures with layers that apply no RoPE (Llama 4's every fourth), and how many: their
/// cached attentions have nothing to fuse.
pub const NOPE_LAYERS: &[(&str, usize)] = &[("llama4_text", 1)];

/// How many of `family`'s layers apply no RoPE.
pub fn nope_layers(family: &str) -> usize {
    NOPE_LAYERS.iter().find(|(f, _)| *f == family).map_or(0, |&(_, n)| n)
}

/// The fixtures whose RoPE rotates part of each head (`partial_rotary_factor`): the rotated
/// part is concatenated with the rest, so `fuse_rope_attention` leaves their RoPEs apart.
pub const PARTIAL_ROTARY: &[&str] = &["phi3-longrope"];

// Tolerances against transformers' logits (tests/parity.rs; tests/pt2.rs uses the same).
/// f32: measured at most 2.1e-5 (llama); 1e-4 leaves 4.8x for another CPU's summation order.
/// bf16: errors relative to the logit's size (bf16 keeps 8 significant bits, so one rounding of
/// a logit near 5 is 0.03). Measured worst cases (tests/README.md), each bound 1.4-1.5x above.
pub const F32_MAX_ABS: f32 = 1e-4;
/// max over positions of max |got - want| / max |want| (error against the row's logit scale);
/// measured at most 3.56e-2 (nemotron-nas, whose own transformers bf16 is 5.9e-2 from its f32
/// by this measure; qwen3 2.37e-2 next).
pub const BF16_MAX_REL: f32 = 0.05;
/// sum |got - want| / sum |want|; measured at most 1.06e-2 (qwen3).
pub const BF16_MEAN_REL: f32 = 0.015;
/// bf16: argmax may differ only where the reference's top two logits are closer than this.
pub const BF16_TIE: f32 = 0.5;

/// Max |a - b| over two equally long, non-empty outputs; NaN anywhere fails (a NaN would
/// otherwise vanish in a max). `what` names the comparison in the panic.
pub fn max_abs_diff(a: &[f32], b: &[f32], what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    assert!(!a.is_empty(), "{what}: nothing to compare");
    let mut d = 0f32;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let e = (x - y).abs();
        assert!(!e.is_nan(), "{what}: NaN at {i} ({x} vs {y})");
        d = d.max(e);
    }
    d
}

pub fn fixture(name: &str) -> PathBuf {
    autodeploy_plugins::link();
    // A test binary built on one machine and run on another (the GPU machine) is pointed at
    // the fixtures with AUTODEPLOY_FIXTURES.
    let root = std::env::var_os("AUTODEPLOY_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"));
    root.join(name)
}

/// Reference outputs of one fixture, as written by `fixtures/make_fixtures.py`.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load(family: &str) -> Reference {
        let p = fixture(family).join("reference.safetensors");
        Reference { bytes: std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) }
    }

    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).unwrap().tensor(name).is_ok()
    }

    fn view(&self, name: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|e| panic!("reference tensor {name}: {e}"));
        (t.shape().to_vec(), t.data().to_vec(), t.dtype())
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d, dt) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::F32);
        (s, d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (s, d, dt) = self.view(name);
        assert_eq!(dt, safetensors::Dtype::I64);
        (s, d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    }
}

pub fn import(family: &str, dtype: DType) -> Graph {
    import_dir(&fixture(family), dtype)
}

/// The HF folder `dir`, up to 8 sequences of up to 128 tokens.
pub fn import_dir(dir: &std::path::Path, dtype: DType) -> Graph {
    let req = ImportRequest {
        path: dir.to_path_buf(),
        dtype: Some(dtype),
        max_batch_size: 8,
        max_seq_len: 128,
        dummy_weights: false,
    };
    registry::importer("hf").unwrap().import(&req).unwrap_or_else(|e| panic!("import {}: {e}", dir.display()))
}

pub fn compile(g: &Graph) -> Box<dyn CompiledModel> {
    registry::compile_backend("simple").unwrap().compile(g, &Default::default()).unwrap()
}

/// Logits `[batch, seq, vocab]` as f32 for token ids `[batch, seq]`, positions 0..seq.
pub fn logits(model: &mut dyn CompiledModel, shape: &[usize], ids: &[i64]) -> Vec<f32> {
    let (b, s) = (shape[0], shape[1]);
    let pos: Vec<i64> = (0..b).flat_map(|_| 0..s as i64).collect();
    let out = model
        .forward(
            &[Tensor::from_i64(vec![b, s], ids.to_vec()).unwrap(), Tensor::from_i64(vec![b, s], pos).unwrap()],
            None,
        )
        .unwrap();
    out[0].to_f32().into_owned()
}

pub fn config_text(family: &str, extra: &str) -> String {
    let seq = if extra.contains("max_seq_len") { "" } else { "max_seq_len = 128\n" };
    let dtype = if extra.contains("dtype") { "" } else { "dtype = \"float32\"\n" };
    format!("model = {:?}\n{dtype}{seq}{extra}", fixture(family).display().to_string())
}

/// Whether a fixture's attention has a sliding window or chunks shorter than its sequences, or a
/// soft-cap (its cached attention needs a backend that applies them: `torch` on the CPU,
/// `flashinfer` on CUDA; `triton` and library backends are refused at build).
#[allow(dead_code)] // not every test binary uses it
pub fn scored(family: &str) -> bool {
    scored_with(family, "")
}

/// The same with extra config lines. (An FP8 KV cache, `kv_cache_dtype = "fp8"`, is not
/// counted: both CUDA backends read one; `attention_backend_lacks` says which apply what.)
pub fn scored_with(family: &str, extra: &str) -> bool {
    autodeploy_plugins::link();
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&config_text(family, extra), None).unwrap();
    let g = autodeploy_core::pipeline::graph_after(&cfg, autodeploy_sdk::Stage::Quantize).unwrap();
    let dump = g.dump();
    dump.lines()
        .any(|l| l.contains("= torch_attention(") && ["window=", "chunk=", "softcap="].iter().any(|s| l.contains(s)))
}

/// The build error of a fixture whose windowed or soft-capped attention the configured backend
/// cannot apply; it must name the backend and what it lacks.
#[allow(dead_code)]
pub fn refused_scoring(family: &str, extra: &str, backend: &str) {
    let toml = config_text(family, extra);
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let e = autodeploy_core::pipeline::build(&cfg).err().unwrap_or_else(|| panic!("{family} {backend}: built"));
    let e = e.to_string();
    assert!(e.contains(&format!("`{backend}`")) && e.contains("chunked attention, soft-capping"), "{family}: {e}");
}

/// Builds the engine for a fixture with extra config lines.
pub fn engine(family: &str, extra: &str) -> autodeploy_core::pipeline::Engine {
    let toml = config_text(family, extra);
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    cfg.validate(std::path::Path::new("test.toml")).unwrap();
    autodeploy_core::pipeline::build(&cfg).unwrap_or_else(|e| panic!("build {family}: {e}"))
}

/// Generates for `requests` with the demollm runtime configured by `extra`.
pub fn generate(
    family: &str,
    extra: &str,
    requests: &[autodeploy_core::runtime::Request],
) -> Vec<autodeploy_core::Result<autodeploy_core::runtime::Completion>> {
    let toml = config_text(family, extra);
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let mut e = engine(family, extra);
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    rt.generate(&mut e, requests).0
}

pub fn greedy(prompt: &[i64], n: usize) -> autodeploy_core::runtime::Request {
    autodeploy_core::runtime::Request {
        prompt: prompt.to_vec(),
        sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: n, ..Default::default() },
    }
}

/// The argmax the runtime's greedy sampler uses (first index on ties, as torch).
#[allow(unused_imports)] // not every test binary uses it
pub use autodeploy_core::sampling::argmax;

/// What to do with one zip entry: its new bytes, or `None` to leave it out.
pub type EntryEdit<'a> = dyn Fn(&str, Vec<u8>) -> Option<Vec<u8>> + 'a;

/// Writes archive `src` to `out` with each entry passed through `edit`.
pub fn rewrite_archive(src: &[u8], out: &std::path::Path, edit: &EntryEdit<'_>) -> std::path::PathBuf {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(src)).unwrap();
    let mut w = zip::ZipWriter::new(std::fs::File::create(out).unwrap());
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let n = f.name().unwrap().into_owned();
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut buf).unwrap();
        if let Some(b) = edit(&n, buf) {
            w.start_file(n, zip::write::SimpleFileOptions::default()).unwrap();
            std::io::Write::write_all(&mut w, &b).unwrap();
        }
    }
    w.finish().unwrap();
    out.to_path_buf()
}

/// `f(config)` for each config (one a rank, in rank order) on a thread of its own, each rank
/// with its communicator of one group of threads (`comm::local_group`); results in rank order.
#[allow(dead_code)] // not every test binary uses it
pub fn on_ranks<T: Send + 'static>(
    configs: Vec<autodeploy_core::config::PipelineConfig>,
    f: impl Fn(autodeploy_core::config::PipelineConfig) -> T + Send + Sync + 'static,
) -> Vec<T> {
    use autodeploy_core::comm;
    let f = std::sync::Arc::new(f);
    let group = comm::local_group(configs.len(), std::time::Duration::from_secs(60));
    let handles: Vec<_> = group
        .into_iter()
        .zip(configs)
        .map(|(c, cfg)| {
            let f = f.clone();
            std::thread::spawn(move || comm::with_thread(c, || f(cfg)))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
}

/// Rank 0's runtime over the whole group (the other ranks follow its steps): a greedy request,
/// a sampled one (seeded), and one that fails alone (a token id past the vocabulary). Each
/// result as its tokens or its error; followers return nothing.
#[allow(dead_code)] // not every test binary uses it
pub fn ranked_tokens(cfg: autodeploy_core::config::PipelineConfig) -> Vec<Result<Vec<i64>, String>> {
    let mut e = autodeploy_core::pipeline::build(&cfg).unwrap_or_else(|err| panic!("build rank {}: {err}", cfg.rank));
    if cfg.rank > 0 {
        e.follow().unwrap_or_else(|err| panic!("rank {}: {err}", cfg.rank));
        return Vec::new();
    }
    let mut sampled = greedy(&[1, 200, 3], 10);
    sampled.sampling.temperature = 0.8;
    sampled.sampling.top_k = 20;
    sampled.sampling.seed = Some(7);
    let requests = vec![greedy(&[1, 17, 42, 99, 5], 10), sampled, greedy(&[1, 1_000_000], 4)];
    let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
    rt.generate(&mut e, &requests).0.into_iter().map(|r| r.map(|c| c.tokens).map_err(|e| e.to_string())).collect()
}

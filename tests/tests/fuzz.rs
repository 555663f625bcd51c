//! Fuzzing every reader of files a user may be handed (issue 21): a model's `config.json`, the
//! pipeline TOML, GGUF files, safetensors files and `.pt2` archives. Each case is a valid
//! fixture mutated (bytes flipped, truncated or spliced; JSON values replaced by other kinds,
//! extreme numbers or the document's own strings, or dropped; TOML values replaced) and run
//! through the reader, the importer and the loading of every weight. A case passes when it
//! returns, `Ok` or an error, without a panic, within 10 s, and without any single allocation
//! over 2 GiB: a counting allocator wraps the system's, and a watchdog names a case that runs
//! past 60 s and ends the process (a hang would otherwise stall the suite).
//!
//! `FUZZ_CASES=N` cases per reader (256 by default, what CI runs); `FUZZ_SEED=S`. The recorded
//! run of 10,000 each is in tests/README.md.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use autodeploy_core::backend::ImportRequest;
use autodeploy_core::pt2::Pt2Archive;
use autodeploy_core::{registry, DType};
use common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The largest single allocation asked for since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_ALLOCATION: usize = 2 << 30;
const MAX_CASE_TIME: Duration = Duration::from_secs(10);
const WATCHDOG: Duration = Duration::from_secs(60);

/// The case running now (for the watchdog): when it started and what it is.
static CURRENT: Mutex<Option<(Instant, String)>> = Mutex::new(None);

fn cases() -> usize {
    std::env::var("FUZZ_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256)
}

/// What the cases of one reader came to.
#[derive(Default)]
struct Tally {
    cases: usize,
    accepted: usize,
    slowest: Duration,
    largest: usize,
}

impl Tally {
    /// Runs one case: `f` returns whether the input was accepted. Fails on a panic, a case
    /// over `MAX_CASE_TIME` or an allocation over `MAX_ALLOCATION`, naming the case.
    fn run(&mut self, what: &str, f: impl FnOnce() -> bool) {
        *CURRENT.lock().unwrap() = Some((Instant::now(), what.to_string()));
        LARGEST.store(0, Ordering::Relaxed);
        let t0 = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let (took, largest) = (t0.elapsed(), LARGEST.load(Ordering::Relaxed));
        *CURRENT.lock().unwrap() = None;
        let ok = r.unwrap_or_else(|_| panic!("{what}: panicked"));
        assert!(took <= MAX_CASE_TIME, "{what}: took {took:?}");
        assert!(largest <= MAX_ALLOCATION, "{what}: allocated {largest} bytes at once");
        self.cases += 1;
        self.accepted += ok as usize;
        self.slowest = self.slowest.max(took);
        self.largest = self.largest.max(largest);
    }

    fn report(&self, reader: &str) {
        eprintln!(
            "fuzz {reader}: {} cases, {} accepted, slowest {:.1} ms, largest allocation {:.1} MiB; no panic",
            self.cases,
            self.accepted,
            self.slowest.as_secs_f64() * 1e3,
            self.largest as f64 / (1 << 20) as f64
        );
    }
}

fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_secs(1));
            if let Some((t, what)) = CURRENT.lock().unwrap().as_ref() {
                if t.elapsed() > WATCHDOG {
                    eprintln!("fuzz: {what} has run {:?}; stopping", t.elapsed());
                    std::process::exit(1);
                }
            }
        });
    });
}

/// Byte damage: a few flipped bytes, a spliced run, a truncation (each sometimes).
fn damage(base: &[u8], rng: &mut impl Rng) -> (Vec<u8>, String) {
    let mut b = base.to_vec();
    let mut did = Vec::new();
    for _ in 0..rng.random_range(0..8) {
        let i = rng.random_range(0..b.len());
        b[i] = rng.random();
        did.push(format!("byte {i}"));
    }
    if rng.random_bool(0.3) {
        let at = rng.random_range(0..b.len());
        let run: Vec<u8> = (0..rng.random_range(1..64)).map(|_| rng.random()).collect();
        let end = (at + run.len()).min(b.len());
        b[at..end].copy_from_slice(&run[..end - at]);
        did.push(format!("splice at {at}"));
    }
    if did.is_empty() || rng.random_bool(0.3) {
        let cut = rng.random_range(0..b.len());
        b.truncate(cut);
        did.push(format!("cut at {cut}"));
    }
    (b, did.join(", "))
}

/// Every JSON node's path (object keys and array indices) under `v`.
fn json_paths(v: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                at.push(k.clone());
                json_paths(x, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                at.push(i.to_string());
                json_paths(x, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn json_at<'v>(v: &'v mut Value, path: &[String]) -> &'v mut Value {
    path.iter().fold(v, |v, k| match v {
        Value::Object(m) => m.get_mut(k).expect("a path json_paths found"),
        Value::Array(a) => &mut a[k.parse::<usize>().expect("an index")],
        _ => unreachable!("a path json_paths found"),
    })
}

/// One to three structural edits: a node replaced by another kind of value, an extreme number
/// or one of the document's strings, or dropped. Returns what was done.
fn mutate_json(doc: &mut Value, rng: &mut impl Rng) -> String {
    let mut paths = Vec::new();
    json_paths(doc, &mut Vec::new(), &mut paths);
    let strings: Vec<String> = paths.iter().filter_map(|p| json_at(doc, p).as_str().map(str::to_string)).collect();
    let mut did = Vec::new();
    for _ in 0..rng.random_range(1..4) {
        let mut paths = Vec::new();
        json_paths(doc, &mut Vec::new(), &mut paths);
        let path = paths[rng.random_range(0..paths.len())].clone();
        if !path.is_empty() && rng.random_bool(0.2) {
            let (last, parent) = path.split_last().expect("not empty");
            match json_at(doc, parent) {
                Value::Object(m) => {
                    m.remove(last);
                }
                Value::Array(a) => {
                    a.remove(last.parse::<usize>().expect("an index"));
                }
                _ => {}
            }
            did.push(format!("drop {}", path.join(".")));
            continue;
        }
        let v = match rng.random_range(0..14) {
            0 => json!(null),
            1 => json!(-1),
            2 => json!(0),
            3 => json!(i64::MAX),
            4 => json!(u64::MAX),
            5 => json!(1u64 << 31),
            6 => json!(1u64 << 40),
            7 => json!(1e308),
            8 => json!(3.5),
            9 => json!(-0.0),
            10 => json!([]),
            11 => json!({}),
            12 => json!(true),
            _ if strings.is_empty() => json!("?"),
            _ => json!(strings[rng.random_range(0..strings.len())]),
        };
        did.push(format!("{} = {v}", path.join(".")));
        *json_at(doc, &path) = v;
    }
    did.join("; ")
}

fn import_with(importer: &str, path: &std::path::Path, dummy: bool) -> autodeploy_core::Result<autodeploy_core::Graph> {
    let req = ImportRequest {
        path: path.into(),
        dtype: Some(DType::F32),
        max_batch_size: 4,
        max_seq_len: 64,
        dummy_weights: dummy,
    };
    registry::importer(importer).expect("built in").import(&req)
}

/// Imports and, when that succeeds, loads every weight; whether all of it was accepted.
fn import_and_load(importer: &str, path: &std::path::Path) -> bool {
    let Ok(g) = import_with(importer, path, false) else { return false };
    g.params.iter().all(|p| g.weights.load(&p.weight, DType::F32).is_ok())
}

/// Reads every weight of an archive, then imports it; whether both were accepted.
fn read_pt2(path: &std::path::Path) -> bool {
    let read = Pt2Archive::open(path).map(|a| a.weights.iter().all(|w| a.load(&w.name).is_ok())).unwrap_or(false);
    let req =
        ImportRequest { path: path.into(), dtype: None, max_batch_size: 8, max_seq_len: 128, dummy_weights: false };
    read && registry::importer("torch-export").expect("built in").import(&req).is_ok()
}

/// A JSON file's bytes mutated: mostly a value edited (`mutate_json`), else bytes damaged.
fn mutate_json_file(text: &[u8], rng: &mut impl Rng) -> (Vec<u8>, String) {
    if rng.random_bool(0.8) {
        let mut doc: Value = serde_json::from_slice(text).unwrap();
        let did = mutate_json(&mut doc, rng);
        (serde_json::to_vec(&doc).unwrap(), did)
    } else {
        damage(text, rng)
    }
}

fn config_json(n: usize, rng: &mut impl Rng, dir: &std::path::Path) -> Tally {
    let mut t = Tally::default();
    for i in 0..n {
        let family = FAMILIES[i % FAMILIES.len()];
        let src = fixture(family);
        let text = std::fs::read(src.join("config.json")).unwrap();
        let (bytes, did) = mutate_json_file(&text, rng);
        let case = dir.join(format!("config{i}"));
        std::fs::create_dir_all(&case).unwrap();
        std::fs::write(case.join("config.json"), &bytes).unwrap();
        for f in std::fs::read_dir(&src).unwrap() {
            let name = f.unwrap().file_name().into_string().unwrap();
            if name.starts_with("model") {
                std::fs::copy(src.join(&name), case.join(&name)).unwrap();
            }
        }
        t.run(&format!("config.json case {i} ({family}: {did})"), || {
            // With the checkpoint's weights, and with generated ones (sizes from the config
            // alone: the graph and its byte count, nothing loaded).
            let real = import_and_load("hf", &case);
            let dummy = import_with("hf", &case, true).map(|g| autodeploy_core::pipeline::weight_bytes(&g)).is_ok();
            real && dummy
        });
        let _ = std::fs::remove_dir_all(&case);
    }
    t
}

/// A ModelOpt checkpoint's `hf_quant_config.json` (the quantized fixtures), mutated as
/// `config.json` is; the checkpoint's own config and tensors beside it.
fn hf_quant_config(n: usize, rng: &mut impl Rng, dir: &std::path::Path) -> Tally {
    const QUANTIZED: [&str; 3] = ["llama-fp8", "qwen3-fp8", "mistral-nvfp4"];
    let mut t = Tally::default();
    for i in 0..n {
        let name = QUANTIZED[i % QUANTIZED.len()];
        let src = fixture(name);
        let text = std::fs::read(src.join("hf_quant_config.json")).unwrap();
        let (bytes, did) = mutate_json_file(&text, rng);
        let case = dir.join(format!("quant{i}"));
        std::fs::create_dir_all(&case).unwrap();
        std::fs::write(case.join("hf_quant_config.json"), &bytes).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), case.join(f)).unwrap();
        }
        t.run(&format!("hf_quant_config.json case {i} ({name}: {did})"), || {
            // Every weight read as stored (a scaled one reads only so).
            let real = import_with("hf", &case, false).is_ok_and(|g| {
                g.params.iter().all(|p| {
                    g.weights.stored_meta(&p.weight).is_ok_and(|(dt, _)| g.weights.load(&p.weight, dt).is_ok())
                })
            });
            let dummy = import_with("hf", &case, true).map(|g| autodeploy_core::pipeline::weight_bytes(&g)).is_ok();
            real && dummy
        });
        let _ = std::fs::remove_dir_all(&case);
    }
    t
}

const PIPELINE_TOML: &str = r#"model = "MODEL"
dtype = "float32"
device = "cpu"
compile_backend = "simple"
attn_backend = "torch"
runtime = "demollm"
max_batch_size = 8
max_seq_len = 128
max_num_tokens = 256
attn_page_size = 16
kv_cache_budget_mib = 64
max_new_tokens = 8
temperature = 0.7
top_p = 0.9
top_k = 40
seed = 1

[transforms.match_rope]
enabled = true

[[prompts]]
token_ids = [1, 17, 42, 99, 5]

[[prompts]]
text = "Hello"
"#;

fn pipeline_toml(n: usize, rng: &mut impl Rng) -> Tally {
    let base = PIPELINE_TOML.replace("MODEL", &fixture("llama").display().to_string());
    let values = [
        "-1",
        "0",
        "1e308",
        "nan",
        "inf",
        "9223372036854775807",
        "4294967297",
        "1099511627776",
        "\"\"",
        "\"x\"",
        "[]",
        "{}",
        "true",
        "[[1, 2], 3]",
        "\"../../../../etc/passwd\"",
    ];
    let mut t = Tally::default();
    for i in 0..n {
        let (text, did) = if rng.random_bool(0.8) {
            let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
            let mut did = Vec::new();
            for _ in 0..rng.random_range(1..4) {
                let k = rng.random_range(0..lines.len());
                if let Some((key, _)) = lines[k].split_once(" = ") {
                    let v = values[rng.random_range(0..values.len())];
                    did.push(format!("{key} = {v}"));
                    lines[k] = format!("{key} = {v}");
                }
            }
            (lines.join("\n"), did.join("; "))
        } else {
            let (b, did) = damage(base.as_bytes(), rng);
            (String::from_utf8_lossy(&b).into_owned(), did)
        };
        t.run(&format!("pipeline TOML case {i} ({did})"), || {
            autodeploy_core::config::PipelineConfig::from_toml_str(&text, None)
                .and_then(|c| c.validate(std::path::Path::new("fuzz.toml")))
                .is_ok()
        });
    }
    t
}

fn gguf(n: usize, rng: &mut impl Rng, dir: &std::path::Path) -> Tally {
    let base = std::fs::read(fixture("gguf").join("tiny-mistral.gguf")).unwrap();
    let mut t = Tally::default();
    for i in 0..n {
        let (bytes, did) = damage(&base, rng);
        let p = dir.join(format!("case{i}.gguf"));
        std::fs::write(&p, &bytes).unwrap();
        t.run(&format!("GGUF case {i} ({did})"), || {
            let parsed = autodeploy_core::gguf::Header::parse(&bytes).is_ok();
            parsed && import_and_load("gguf", &p)
        });
        let _ = std::fs::remove_file(&p);
    }
    t
}

fn safetensors_files(n: usize, rng: &mut impl Rng, dir: &std::path::Path) -> Tally {
    let src = fixture("qwen2");
    let base = std::fs::read(src.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let mut t = Tally::default();
    let case = dir.join("safetensors");
    std::fs::create_dir_all(&case).unwrap();
    std::fs::copy(src.join("config.json"), case.join("config.json")).unwrap();
    for i in 0..n {
        // Half the cases edit the JSON header (dtypes, shapes, offsets), half damage bytes.
        let (bytes, did) = if rng.random_bool(0.5) {
            let mut doc: Value = serde_json::from_slice(&base[8..8 + header_len]).unwrap();
            let did = mutate_json(&mut doc, rng);
            let h = serde_json::to_vec(&doc).unwrap();
            let mut b = (h.len() as u64).to_le_bytes().to_vec();
            b.extend_from_slice(&h);
            b.extend_from_slice(&base[8 + header_len..]);
            (b, did)
        } else {
            damage(&base, rng)
        };
        std::fs::write(case.join("model.safetensors"), &bytes).unwrap();
        t.run(&format!("safetensors case {i} ({did})"), || import_and_load("hf", &case));
    }
    t
}

fn pt2_archives(n: usize, rng: &mut impl Rng, dir: &std::path::Path) -> Tally {
    let archives = ["mlp.pt2", "llama.pt2", "llama-legacy.pt2", "mistral-window48.pt2"];
    let sources: Vec<Vec<u8>> = archives.iter().map(|a| std::fs::read(fixture(&format!("pt2/{a}"))).unwrap()).collect();
    let mut t = Tally::default();
    for i in 0..n {
        let k = i % archives.len();
        let (name, src) = (archives[k], &sources[k]);
        let p = dir.join(format!("case{i}.pt2"));
        // Three in four cases edit a JSON entry of the archive, the rest damage its bytes.
        let did = if rng.random_bool(0.75) {
            let mut z = zip::ZipArchive::new(std::io::Cursor::new(src)).unwrap();
            let entries: Vec<String> = (0..z.len())
                .map(|j| z.by_index(j).unwrap().name().unwrap().into_owned())
                .filter(|n| n.ends_with(".json"))
                .collect();
            let entry = entries[rng.random_range(0..entries.len())].clone();
            let mut text = Vec::new();
            std::io::Read::read_to_end(&mut z.by_name(&entry).unwrap(), &mut text).unwrap();
            let mut doc: Value = serde_json::from_slice(&text).unwrap();
            let did = mutate_json(&mut doc, rng);
            let bytes = serde_json::to_vec(&doc).unwrap();
            rewrite_archive(src, &p, &|n, b| Some(if n == entry { bytes.clone() } else { b }));
            format!("{entry}: {did}")
        } else {
            let (b, did) = damage(src, rng);
            std::fs::write(&p, b).unwrap();
            did
        };
        t.run(&format!(".pt2 case {i} ({name}, {did})"), || read_pt2(&p));
        let _ = std::fs::remove_file(&p);
    }
    t
}

/// Every reader, `FUZZ_CASES` mutated inputs each (one test, so the allocation count is the
/// case's own).
#[test]
fn every_reader_survives_mutated_files() {
    watchdog();
    let n = cases();
    let seed = std::env::var("FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(21);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    eprintln!("fuzz: {n} cases per reader, seed {seed}");
    // The harness itself: an allocation past the limit is seen (so a reader's would be).
    LARGEST.store(0, Ordering::Relaxed);
    std::hint::black_box(vec![0u8; 64 << 20]);
    assert!(LARGEST.load(Ordering::Relaxed) >= 64 << 20, "the counting allocator sees allocations");
    let t0 = Instant::now();
    let (mut accepted, mut total) = (0, 0);
    for (reader, tally) in [
        ("config.json", config_json(n, &mut rng, dir.path())),
        ("hf_quant_config.json", hf_quant_config(n, &mut rng, dir.path())),
        ("pipeline TOML", pipeline_toml(n, &mut rng)),
        ("GGUF", gguf(n, &mut rng, dir.path())),
        ("safetensors", safetensors_files(n, &mut rng, dir.path())),
        (".pt2", pt2_archives(n, &mut rng, dir.path())),
    ] {
        tally.report(reader);
        assert_eq!(tally.cases, n);
        accepted += tally.accepted;
        total += tally.cases;
    }
    // The mutations reach past the first check: some cases are still accepted, most are not.
    assert!(accepted > 0 && accepted < total, "{accepted} of {total} accepted");
    eprintln!("fuzz: {total} cases in {:.1} s", t0.elapsed().as_secs_f64());
}

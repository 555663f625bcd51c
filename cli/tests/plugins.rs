//! The plugin ABI end to end: the host binary is built once (by cargo, for this test), the
//! example plugin library (`examples/plugin`, depending only on the SDK) is built separately,
//! and the unchanged host loads it from `plugin-registry.toml`.

mod common;

use common::{root, smollm2};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds the plugin crate at `manifest` (release, its own workspace) into the shared
/// `target/plugin-example` folder; returns the library's path.
fn build_plugin(manifest: &Path, lib_name: &str) -> PathBuf {
    let target = root().join("target/plugin-example");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(out.status.success(), "building {}: {}", manifest.display(), String::from_utf8_lossy(&out.stderr));
    let lib = target.join("release").join(format!(
        "{}{lib_name}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

fn example_plugin() -> PathBuf {
    build_plugin(&root().join("examples/plugin/Cargo.toml"), "autodeploy_example_plugin")
}

/// A fresh folder for a config and its `plugin-registry.toml`.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("autodeploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_registry(dir: &Path, libs: &[&Path]) {
    let mut s = String::new();
    for l in libs {
        s += &format!("[[library]]\npath = {:?}\n\n", l.display().to_string());
    }
    std::fs::write(dir.join("plugin-registry.toml"), s).unwrap();
}

/// Runs the host with `args`, the config at `dir/cfg.toml` holding `toml`, and the libraries of
/// `dir/plugin-registry.toml` chosen (`--plugins`; `plugins --load` lists their plugins).
fn host(dir: &Path, toml: &str, args: &[&str]) -> (bool, String, String) {
    let cfg = dir.join("cfg.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
        .args(args)
        .args(if args.first() == Some(&"plugins") { &["--load"][..] } else { &[] })
        .arg("--config")
        .arg(&cfg)
        .arg("--plugins")
        .arg(dir.join("plugin-registry.toml"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn file_hash(p: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

fn smollm2_config(model: &Path, attn: &str, fold: &str) -> String {
    format!(
        "model = {:?}\ndtype = \"float32\"\nattn_backend = \"{attn}\"\nmax_seq_len = 256\nmax_new_tokens = 16\n\
         [[prompts]]\ntext = \"The three primary colors are\"\n\n[transforms.fold_norm_scale]\n{fold}\n",
        model.display().to_string()
    )
}

fn output_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.contains("] output")).collect()
}

#[test]
fn the_host_loads_the_example_plugin_and_runs_it_unchanged() {
    let Some(model) = smollm2() else { return };
    let host_bin = PathBuf::from(env!("CARGO_BIN_EXE_autodeploy"));
    let before = file_hash(&host_bin);
    let lib = example_plugin();
    let dir = scratch("plugin-load");
    write_registry(&dir, &[&lib]);

    // Listed with kind, name, version and the library it came from.
    let (ok, out, err) = host(&dir, &smollm2_config(&model, "torch", ""), &["plugins"]);
    assert!(ok, "{err}");
    let lib_s = lib.display().to_string();
    for (kind, name) in [
        ("attention-backend", "naive_cpu"),
        ("attention-backend", "naive"),
        ("transform", "fold_norm_scale"),
        ("transform", "use_example_rmsnorm"),
        ("op", "example.rms_norm"),
        ("op", "example.topk"),
        ("model-importer", "llama2c"),
        ("runtime", "sequential"),
        ("compile-backend", "checked"),
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(kind) && l.contains(name) && l.contains("0.1.0") && l.ends_with(&lib_s)),
            "{kind} {name} missing: {out}"
        );
    }
    assert!(out.lines().any(|l| l.contains(" torch ") && l.ends_with("built-in")), "{out}");
    // Which devices each attention backend runs on: `naive` has a CUDA side, `naive_cpu` not.
    let devices = out.split("attention backends (attn_backend), by device:").nth(1).unwrap_or_default();
    let on =
        |name: &str| devices.lines().find(|l| l.split_whitespace().next() == Some(name)).map(|l| l.trim().to_string());
    assert_eq!(on("naive").as_deref(), Some("naive                        cpu, cuda"), "{out}");
    assert_eq!(on("naive_cpu").as_deref(), Some("naive_cpu                    cpu"), "{out}");
    assert_eq!(on("flashinfer").as_deref(), Some("flashinfer                   cuda"), "{out}");
    // Each transform with its stage, whether it is on by default, and its options' defaults.
    let table =
        out.split("transforms, in the order they run").nth(1).unwrap_or_else(|| panic!("no transforms table: {out}"));
    let row = |name: &str| table.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).unwrap_or("");
    let fold: Vec<&str> = row("fold_norm_scale").split_whitespace().collect();
    assert_eq!(fold, ["post_load_fusion", "fold_norm_scale", "on", "require_all", "=", "false"], "{out}");
    assert!(out.contains("fail unless every RMSNorm could be folded"), "{out}");
    let ex: Vec<&str> = row("use_example_rmsnorm").split_whitespace().collect();
    assert_eq!(ex, ["post_load_fusion", "use_example_rmsnorm", "off", "-"], "{out}");
    let m: Vec<&str> = row("match_rmsnorm").split_whitespace().collect();
    assert_eq!(m, ["pattern_matcher", "match_rmsnorm", "on", "-"], "{out}");

    // The backend's options: listed, set in `[attention_backends.naive_cpu]`, checked against
    // what it declares; the value reaches the backend (a span past it fails the step).
    assert!(out.contains("naive_cpu                    max_positions = 0"), "{out}");
    let opt = |table: &str| {
        format!("{}[attention_backends.naive_cpu]\n{table}\n", smollm2_config(&model, "naive_cpu", "enabled = false"))
    };
    let (_, capped, err) = host(&dir, &opt("max_positions = 4"), &[]);
    assert!(capped.contains("[0] error:") && capped.contains("past max_positions = 4"), "{capped}{err}");
    let (ok, _, err) = host(&dir, &opt("max_position = 4"), &[]);
    assert!(
        !ok && err.contains("attention_backends.naive_cpu.max_position")
            && err.contains("has no option `max_position`; options: max_positions"),
        "{err}"
    );
    let (ok, _, err) = host(&dir, &opt("max_positions = \"many\""), &[]);
    assert!(
        !ok && err.contains("attention_backends.naive_cpu.max_positions")
            && err.contains("expected integer, found string"),
        "{err}"
    );
    let (ok, _, err) = host(&dir, &opt("max_positions = -1"), &[]);
    assert!(
        !ok && err.contains("attention backend `naive_cpu`") && err.contains("max_positions must be 0 or more"),
        "{err}"
    );
    let builtin =
        format!("{}[attention_backends.torch]\nthreads = 2\n", smollm2_config(&model, "torch", "enabled = false"));
    let (ok, _, err) = host(&dir, &builtin, &[]);
    assert!(!ok && err.contains("attention_backends.torch.threads") && err.contains("it takes none"), "{err}");

    // The plugin's attention backend gives the built-in backend's greedy tokens.
    let (ok, reference, err) = host(&dir, &smollm2_config(&model, "torch", "enabled = false"), &[]);
    assert!(ok, "{err}");
    let (ok, plugged, err) = host(&dir, &smollm2_config(&model, "naive_cpu", "enabled = false"), &[]);
    assert!(ok, "{err}");
    assert!(!output_lines(&reference).is_empty(), "{reference}");
    assert_eq!(output_lines(&plugged), output_lines(&reference));
    // `naive` (the same CPU side, with a CUDA side the GPU tests run) too, under `opt`: the
    // RoPE stays apart for a library backend (only built-ins take RoPE-fused ops).
    let naive = format!("compile_backend = \"opt\"\n{}", smollm2_config(&model, "naive", "enabled = false"));
    let (ok, plugged, err) = host(&dir, &naive, &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&plugged), output_lines(&reference));
    let (ok, graph, err) = host(&dir, &naive, &["graph", "--stage", "compile"]);
    assert!(ok && graph.contains("backend=naive") && !graph.contains("rope=true"), "{graph}{err}");

    // The plugin's transform runs at post_load_fusion (before fuse_gemms), shows in the graph,
    // and keeps the greedy tokens (f32: the folded products differ only in rounding).
    let (ok, graph, err) = host(&dir, &smollm2_config(&model, "torch", ""), &["graph", "--stage", "post_load_fusion"]);
    assert!(ok, "{err}");
    let history: Vec<&str> = graph.lines().filter(|l| l.starts_with("# [stage=post_load_fusion")).collect();
    assert!(history[0].contains("transform=fold_norm_scale] folded 31 rmsnorm scales into 91 linears"), "{history:?}");
    assert!(history[1].contains("transform=use_example_rmsnorm] disabled"), "{history:?}");
    assert!(history[2].contains("transform=fold_weight_ops] folded 0 weight-only ops"), "{history:?}");
    assert!(history[3].contains("transform=deinterleave_rope] made 0"), "{history:?}");
    assert!(history[4].contains("transform=fuse_gemms"), "{history:?}");
    assert!(graph.contains("%model.norm.weight.folded: f32[576] = weight"), "the folded final norm");
    let (ok, folded, err) = host(&dir, &smollm2_config(&model, "naive_cpu", ""), &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&folded), output_lines(&reference));
    // A library backend gets no sliding window or soft-cap through the sdk: a model whose
    // attention has them (the gemma2 fixture) is refused at build, naming the backend.
    let gemma2 = format!(
        "model = {:?}\nattn_backend = \"naive_cpu\"\n",
        root().join("tests/fixtures/gemma2").display().to_string()
    );
    let (ok, _, err) = host(&dir, &gemma2, &[]);
    assert!(!ok && err.contains("`naive_cpu`") && err.contains("chunked attention, soft-capping"), "{err}");
    // Qwen3's q/k norms are read by transposes, not linears: those stay, the rest fold.
    let qwen3 = format!("model = {:?}\n", root().join("tests/fixtures/qwen3").display().to_string());
    let (ok, graph, err) = host(&dir, &qwen3, &["graph", "--stage", "post_load_fusion"]);
    assert!(ok, "{err}");
    assert!(graph.contains("transform=fold_norm_scale] folded 3 rmsnorm scales into 7 linears"), "{graph}");
    let (_, graph_off, _) =
        host(&dir, &smollm2_config(&model, "torch", "enabled = false"), &["graph", "--stage", "post_load_fusion"]);
    assert!(graph_off.contains("[stage=post_load_fusion, transform=fold_norm_scale] disabled"), "{graph_off}");

    // The plugin's own op: its transform (off by default) puts `example.rms_norm`, computed by
    // the plugin's CPU kernel, in place of every torch_rmsnorm; the tokens stay the same.
    let own_op = smollm2_config(&model, "torch", "enabled = false\n[transforms.use_example_rmsnorm]\nenabled = true");
    let (ok, graph, err) = host(&dir, &own_op, &["graph", "--stage", "post_load_fusion"]);
    assert!(ok, "{err}");
    assert!(
        graph.contains("transform=use_example_rmsnorm] replaced 61 torch_rmsnorm with example.rms_norm"),
        "{graph}"
    );
    assert!(!graph.contains("= torch_rmsnorm("), "every norm replaced");
    // Found by the host's pattern matcher, put in by `insert_after` under the names it chose.
    assert!(
        graph.contains("%l0.input_norm.rmsnorm.example: f32[batch, seq, 576] = example.rms_norm(%embed"),
        "{graph}"
    );
    let (ok, own, err) = host(&dir, &own_op, &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&own), output_lines(&reference));
    // A typed op with two outputs (f32 values and i64 indices), its shape rule keeping the
    // symbolic `gather`: the plugin's compile-stage transform appends the logits' top 3 to the
    // graph's outputs, and the engine runs it (under `debug_checks`, so every float value is
    // checked written) with the tokens unchanged.
    let topk = format!(
        "debug_checks = true\n{}[transforms.add_topk_outputs]\nenabled = true\nk = 3\n",
        smollm2_config(&model, "torch", "enabled = false")
    );
    let (ok, graph, err) = host(&dir, &topk, &["graph", "--stage", "compile"]);
    assert!(ok, "{err}");
    assert!(
        graph.contains(
            "%logits_topk: f32[1, gather, 3], %logits_topk.1: i64[1, gather, 3] = example.topk(%logits, k=3)"
        ) && graph.contains("return %logits, %logits_topk, %logits_topk.1"),
        "{graph}"
    );
    let (ok, out, err) = host(&dir, &topk, &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&out), output_lines(&reference));
    let (ok, _, err) = host(&dir, &topk.replace("k = 3", "k = 9"), &["graph", "--stage", "compile"]);
    assert!(!ok && err.contains("example.topk") && err.contains("k must be 1..=8"), "{err}");
    // The plugin's runtime (one request at a time) gives the built-in runtime's (batching)
    // greedy tokens for two prompts.
    let two = |runtime: &str| {
        format!(
            "model = {:?}\ndtype = \"float32\"\nruntime = \"{runtime}\"\nmax_seq_len = 256\nmax_new_tokens = 12\n\
             [[prompts]]\ntext = \"The three primary colors are\"\n[[prompts]]\ntext = \"Water boils at\"\n",
            model.display().to_string()
        )
    };
    let (ok, batched, err) = host(&dir, &two("demollm"), &[]);
    assert!(ok, "{err}");
    let (ok, sequential, err) = host(&dir, &two("sequential"), &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&batched).len(), 2, "{batched}");
    assert_eq!(output_lines(&sequential), output_lines(&batched));

    // The plugin's compile backend (node by node on the host's kernels, checking every value)
    // gives the built-in `simple` backend's tokens.
    let checked = two("demollm").replace("runtime = \"demollm\"", "compile_backend = \"checked\"");
    let (ok, out, err) = host(&dir, &checked, &[]);
    assert!(ok, "{err}");
    assert_eq!(output_lines(&out), output_lines(&batched));

    // An error from the plugin's transform fails the build with the plugin's message.
    let (ok, _, err) = host(&dir, &smollm2_config(&model, "torch", "require_all = true"), &[]);
    assert!(!ok);
    assert!(
        err.contains("transform fold_norm_scale from")
            && err.contains(&lib_s)
            && err.contains("require_all: 30 norm outputs are read by ops other than linear (torch_swiglu_mlp)"),
        "{err}"
    );
    // Options are checked against what the plugin declared.
    let (ok, _, err) = host(&dir, &smollm2_config(&model, "torch", "require_al = true"), &[]);
    assert!(!ok && err.contains("transforms.fold_norm_scale.require_al") && err.contains("require_all"), "{err}");

    assert_eq!(file_hash(&host_bin), before, "the host binary changed between runs");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the example plugin built against a copy of the SDK one minor version older (0.2.0): what a
/// plugin built for an older host looks like.
fn old_sdk_plugin() -> PathBuf {
    sdk_copy_plugin("old-sdk", "0.2.0", |ffi| ffi)
}

/// The next minor version of the SDK, for `changed_sdk_plugin`.
const NEXT_SDK: &str = "0.9.0";

/// A copy of the example plugin built against a newer SDK (`NEXT_SDK`) whose interface types changed
/// (a kernel-argument kind added): abi_stable accepts the version and then finds the layouts
/// differ.
fn changed_sdk_plugin() -> PathBuf {
    let (a, b, _) = autodeploy_sdk::SDK_VERSION;
    assert_eq!(format!("{a}.{}.0", b + 1), NEXT_SDK, "update NEXT_SDK to the SDK's next minor version");
    sdk_copy_plugin("changed-sdk", NEXT_SDK, |ffi| {
        let changed = ffi.replacen("    I64,\n    F32,\n}", "    I64,\n    F32,\n    F64,\n}", 1);
        assert_ne!(changed, ffi, "ArgKind changed shape: update this test");
        changed
    })
}

/// The example plugin built against a copy of the SDK at `version`, its `ffi.rs` edited by
/// `edit`; the crate is named `autodeploy-{tag}-plugin`.
fn sdk_copy_plugin(tag: &str, version: &str, edit: impl Fn(String) -> String) -> PathBuf {
    let work = root().join(format!("target/plugin-example/{tag}-src"));
    let _ = std::fs::remove_dir_all(&work);
    let (sdk, plugin) = (work.join("sdk"), work.join("plugin"));
    std::fs::create_dir_all(sdk.join("src")).unwrap();
    std::fs::create_dir_all(plugin.join("src")).unwrap();
    for f in std::fs::read_dir(root().join("sdk/src")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, sdk.join("src").join(f.file_name().unwrap())).unwrap();
    }
    let ffi = std::fs::read_to_string(root().join("sdk/src/ffi.rs")).unwrap();
    std::fs::write(sdk.join("src/ffi.rs"), edit(ffi)).unwrap();
    // lib.rs checks SDK_VERSION against the crate version in a unit test only; the copy
    // declares the version it is built as.
    let host = autodeploy_sdk::SDK_VERSION_STR;
    let manifest = std::fs::read_to_string(root().join("sdk/Cargo.toml")).unwrap();
    let manifest = manifest
        .replace(&format!("version = \"{host}\""), &format!("version = \"{version}\""))
        .replace("edition.workspace = true", "edition = \"2021\"")
        .replace("license.workspace = true", "license = \"Apache-2.0\"");
    assert!(manifest.contains(&format!("version = \"{version}\"")), "the SDK manifest changed shape: update this test");
    std::fs::write(sdk.join("Cargo.toml"), manifest).unwrap();
    for f in std::fs::read_dir(root().join("examples/plugin/src")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, plugin.join("src").join(f.file_name().unwrap())).unwrap();
    }
    let pm = std::fs::read_to_string(root().join("examples/plugin/Cargo.toml"))
        .unwrap()
        .replace("name = \"autodeploy-example-plugin\"", &format!("name = \"autodeploy-{tag}-plugin\""))
        .replace("path = \"../../sdk\"", "path = \"../sdk\"");
    std::fs::write(plugin.join("Cargo.toml"), pm).unwrap();
    // The example's lock, so the copy resolves to the same dependency versions (and builds).
    std::fs::copy(root().join("examples/plugin/Cargo.lock"), plugin.join("Cargo.lock")).unwrap();
    build_plugin(&plugin.join("Cargo.toml"), &format!("autodeploy_{}_plugin", tag.replace('-', "_")))
}

/// A plugin whose transform panics (a bug in the plugin): its source is written here, and it is
/// built against the current SDK like the example.
fn panicking_plugin() -> PathBuf {
    let src = root().join("target/plugin-example/panicking-src");
    std::fs::create_dir_all(src.join("src")).unwrap();
    let manifest = format!(
        "[package]\nname = \"autodeploy-panicking-plugin\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\
         [lib]\ncrate-type = [\"cdylib\"]\n[dependencies]\nautodeploy-sdk = {{ path = {:?} }}\n[workspace]\n",
        root().join("sdk").display().to_string()
    );
    std::fs::write(src.join("Cargo.toml"), manifest).unwrap();
    std::fs::write(
        src.join("src/lib.rs"),
        r#"use autodeploy_sdk::abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString};
use autodeploy_sdk::ffi::{
    attention_backend_box, AttentionBackend, AttentionBackendBox, AttentionCall, CudaLauncherRef, DeviceTensorView,
    Dim3, GraphRef, KernelArg, PluginDecl, StepInfo, TensorView, Transform,
};
/// `sloppy.copy`: meant to copy its input, writes only the first half (CPU and CUDA alike).
extern "C" fn sloppy_cpu(ins: RSlice<'_, TensorView<'_>>, _: RStr<'_>, mut out: RSliceMut<'_, f32>) -> RResult<(), RString> {
    let n = out.len() / 2;
    out[..n].copy_from_slice(&ins[0].data[..n]);
    RResult::ROk(())
}
const SLOPPY_CU: &str = "extern \"C\" __global__ void sloppy_copy(const float* x, float* y, long long n) {\n\
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;\n\
    if (i < n / 2) y[i] = x[i];\n}\n";
extern "C" fn sloppy_cuda(
    ins: RSlice<'_, DeviceTensorView<'_>>,
    out: DeviceTensorView<'_>,
    _: RStr<'_>,
    mut gpu: CudaLauncherRef<'_>,
) -> RResult<(), RString> {
    let n = out.shape.iter().product::<usize>();
    let args = [KernelArg::ptr(ins[0].ptr), KernelArg::ptr(out.ptr), KernelArg::i64(n as i64)];
    let grid = Dim3 { x: (n.div_ceil(256)).max(1) as u32, y: 1, z: 1 };
    gpu.launch(SLOPPY_CU.into(), "sloppy_copy".into(), grid, Dim3 { x: 256, y: 1, z: 1 }, 0, args.as_slice().into())
}
/// Puts `sloppy.copy` after the first norm.
struct InsertSloppy;
impl Transform for InsertSloppy {
    fn apply(&self, mut graph: GraphRef<'_>, _: RStr<'_>) -> RResult<RString, RString> {
        let Some(&i) = graph.find_nodes("torch_rmsnorm".into()).first() else { return RResult::RErr("no norm".into()) };
        let ROption::RSome(n) = graph.node(i) else { return RResult::RErr("no node".into()) };
        let v = n.outputs[0];
        match graph.insert_after(v, "sloppy".into(), "sloppy.copy".into(), [v][..].into(), "".into()) {
            RResult::ROk(_) => RResult::ROk("inserted sloppy.copy".into()),
            RResult::RErr(e) => RResult::RErr(e),
        }
    }
}
struct Buggy;
struct BuggyAttention;
impl AttentionBackend for BuggyAttention {
    fn begin_step(&mut self, _: StepInfo<'_>) -> RResult<(), RString> {
        RResult::ROk(())
    }
    fn attend(&self, call: AttentionCall<'_>) -> RResult<(), RString> {
        let empty: Vec<f32> = Vec::new();
        RResult::ROk(assert!(empty.len() > call.layer, "layer {} has no cache", call.layer))
    }
}
extern "C" fn new_buggy_attention() -> AttentionBackendBox {
    attention_backend_box(BuggyAttention)
}
/// Writes only the first half of its output (`half`), or zeros with one NaN.
struct SloppyAttention { nan: bool }
impl AttentionBackend for SloppyAttention {
    fn begin_step(&mut self, _: StepInfo<'_>) -> RResult<(), RString> {
        RResult::ROk(())
    }
    fn attend(&self, call: AttentionCall<'_>) -> RResult<(), RString> {
        let out = call.out.into_mut_slice();
        let n = out.len();
        if self.nan {
            out.fill(0.0);
            out[n - 1] = f32::NAN;
        } else {
            out[..n / 2].fill(0.0);
        }
        RResult::ROk(())
    }
}
extern "C" fn new_half_attention() -> AttentionBackendBox {
    attention_backend_box(SloppyAttention { nan: false })
}
extern "C" fn new_nan_attention() -> AttentionBackendBox {
    attention_backend_box(SloppyAttention { nan: true })
}
impl Transform for Buggy {
    fn apply(&self, graph: GraphRef<'_>, _: RStr<'_>) -> RResult<RString, RString> {
        let nodes = graph.find_nodes("torch_rmsnorm".into());
        panic!("index {} out of range for {} norms", nodes.len(), nodes.len())
    }
}
fn plugins() -> Vec<PluginDecl> {
    vec![
        PluginDecl::transform("buggy", "0.1.0", autodeploy_sdk::Stage::PostLoadFusion, &[], Buggy)
            .disabled_by_default(),
        PluginDecl::attention_backend("buggy_attention", "0.1.0", new_buggy_attention),
        PluginDecl::attention_backend("half_attention", "0.1.0", new_half_attention),
        PluginDecl::op_with_cuda("sloppy.copy", "0.1.0", 1, 0, sloppy_cpu, sloppy_cuda),
        PluginDecl::transform("insert_sloppy", "0.1.0", autodeploy_sdk::Stage::PostLoadFusion, &[], InsertSloppy)
            .disabled_by_default(),
        PluginDecl::attention_backend("nan_attention", "0.1.0", new_nan_attention),
    ]
}
autodeploy_sdk::export_plugins!(plugins);
"#,
    )
    .unwrap();
    // The example's lock, so it resolves to the same dependency versions (and builds offline).
    std::fs::copy(root().join("examples/plugin/Cargo.lock"), src.join("Cargo.lock")).unwrap();
    build_plugin(&src.join("Cargo.toml"), "autodeploy_panicking_plugin")
}

#[test]
fn a_panicking_plugin_fails_what_it_was_doing_with_its_message() {
    let lib = panicking_plugin();
    let dir = scratch("plugin-panic");
    write_registry(&dir, &[&lib]);
    let cfg = format!(
        "model = {:?}\nmax_new_tokens = 2\n[[prompts]]\ntoken_ids = [1, 2]\n",
        root().join("tests/fixtures/llama").display().to_string()
    );
    // An attention backend that panics in `attend`: the requests of that step fail with the
    // panic's message; the host does not abort.
    let attn = cfg.replace("max_new_tokens", "attn_backend = \"buggy_attention\"\nmax_new_tokens");
    let (_, out, err) = host(&dir, &attn, &[]);
    assert!(
        out.contains("[0] error:") && out.contains("attention backend panicked: layer 0 has no cache"),
        "{out}\n{err}"
    );
    assert!(!err.contains("Aborting"), "the panic crossed the FFI boundary: {err}");
    // Backends that leave outputs unwritten or produce NaN: with `debug_checks` the step fails
    // naming the backend, its library and what was wrong; without, tokens come out.
    for (backend, want) in
        [("half_attention", "outputs unwritten (first at index"), ("nan_attention", "non-finite outputs")]
    {
        let c = cfg.replace("max_new_tokens", &format!("attn_backend = \"{backend}\"\nmax_new_tokens"));
        let (_, out, err) = host(&dir, &c, &[]);
        assert!(out.contains("[0] output"), "{backend} without debug_checks: {out}\n{err}");
        let (_, out, err) = host(&dir, &format!("debug_checks = true\n{c}"), &[]);
        assert!(
            out.contains("[0] error:")
                && out.contains(&format!("debug_checks: attention backend `{backend}` ({}), layer 0", lib.display()))
                && out.contains(want),
            "{backend} with debug_checks: {out}\n{err}"
        );
    }
    // An op whose kernel leaves half its output unwritten, on the CPU: caught the same way.
    let sloppy = format!("{cfg}[transforms.insert_sloppy]\nenabled = true\n");
    let (_, out, err) = host(&dir, &sloppy, &[]);
    assert!(out.contains("[0] output"), "without debug_checks: {out}\n{err}");
    let (_, out, err) = host(&dir, &format!("debug_checks = true\n{sloppy}"), &[]);
    assert!(
        out.contains("[0] error:")
            && out.contains(&format!("debug_checks: op `sloppy.copy` ({}) at node `sloppy`", lib.display()))
            && out.contains("outputs unwritten"),
        "op with debug_checks: {out}\n{err}"
    );
    // A transform that panics fails the build.
    let cfg = format!("{cfg}[transforms.buggy]\nenabled = true\n");
    for args in [&["graph", "--stage", "post_load_fusion"][..], &[]] {
        let (ok, _, err) = host(&dir, &cfg, args);
        assert!(!ok, "{args:?}");
        assert!(
            err.contains("transform buggy from")
                && err.contains(&lib.display().to_string())
                && err.contains("transform panicked: index 5 out of range for 5 norms"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("Aborting"), "the panic crossed the FFI boundary: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The plugin's op on a GPU: its CUDA kernel (CUDA C source in the plugin, compiled and
/// launched by the host) in place of every norm gives the built-in norm's greedy tokens.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn the_example_plugin_op_runs_on_cuda() {
    let gpu = autodeploy_kernels::cuda::probe(0).unwrap_or_else(|why| panic!("no usable GPU: {why}"));
    let model = smollm2().expect("the SmolLM2 GGUF (scripts/fetch-smollm2.sh)");
    let lib = example_plugin();
    let dir = scratch("plugin-cuda-op");
    write_registry(&dir, &[&lib]);
    let (ok, reference, err) = host(&dir, &smollm2_config(&model, "torch", "enabled = false"), &[]);
    assert!(ok, "{err}");
    let own_op = smollm2_config(&model, "torch", "enabled = false\n[transforms.use_example_rmsnorm]\nenabled = true");
    let on_gpu = own_op.replace("dtype = \"float32\"\n", "dtype = \"float32\"\ndevice = \"cuda\"\n");
    assert!(on_gpu.contains("device = \"cuda\""));
    let (ok, graph, err) = host(&dir, &on_gpu, &["graph", "--stage", "post_load_fusion"]);
    assert!(ok, "{gpu}: {err}");
    assert!(graph.contains("= example.rms_norm("), "{graph}");
    let (ok, out, err) = host(&dir, &on_gpu, &[]);
    assert!(ok, "{gpu}: {err}");
    assert!(!output_lines(&reference).is_empty(), "{reference}");
    assert_eq!(output_lines(&out), output_lines(&reference), "{gpu}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_plugin_libraries_are_refused_at_start_up_and_the_host_runs_on() {
    let good = example_plugin();
    let old = old_sdk_plugin();
    let dir = scratch("plugin-bad");
    let missing = dir.join("libmissing.so");
    let garbage = dir.join("libgarbage.so");
    std::fs::write(&garbage, b"not a shared library").unwrap();
    // A real shared library that is not a plugin: the Rust standard library of the toolchain
    // (rustup ships it as <sysroot>/lib/rustlib/<host>/lib/libstd-<hash>.so).
    let rustc = |arg: &str| {
        let out = Command::new("rustc").arg(arg).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let host_triple = rustc("-vV").lines().find_map(|l| l.strip_prefix("host: ")).unwrap().trim().to_string();
    let std_dir = PathBuf::from(rustc("--print=sysroot").trim()).join(format!("lib/rustlib/{host_triple}/lib"));
    let not_plugin = std::fs::read_dir(&std_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", std_dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("libstd-")))
        .unwrap_or_else(|| panic!("no libstd-*.so in {}", std_dir.display()));
    let changed = changed_sdk_plugin();
    let libs: Vec<&Path> = vec![&missing, &garbage, &old, &changed, &good, &good, &not_plugin];
    write_registry(&dir, &libs);
    let fixture = root().join("tests/fixtures/llama");
    let cfg = |attn: &str| {
        format!(
            "model = {:?}\ndtype = \"float32\"\nattn_backend = \"{attn}\"\nmax_new_tokens = 4\n[[prompts]]\ntoken_ids = [1, 17, 42]\n",
            fixture.display().to_string()
        )
    };

    let (ok, out, err) = host(&dir, &cfg("torch"), &["plugins"]);
    assert!(ok, "{err}");
    let refused: Vec<&str> = out.lines().filter(|l| l.starts_with("refused: ")).collect();
    let has =
        |path: &Path, why: &str| refused.iter().any(|l| l.contains(&path.display().to_string()) && l.contains(why));
    assert!(has(&missing, "does not exist"), "{refused:?}");
    assert!(has(&garbage, "libgarbage.so"), "{refused:?}");
    let host_sdk = autodeploy_sdk::SDK_VERSION_STR;
    assert!(
        has(&old, &format!("built against autodeploy-sdk 0.2.0, incompatible with this host's sdk {host_sdk}")),
        "{refused:?}"
    );
    // Interface types that differ: one line naming both versions and what to do, not
    // abi_stable's layout report (thousands of lines).
    assert!(
        has(
            &changed,
            &format!(
                "built against autodeploy-sdk {NEXT_SDK}, whose plugin interface types differ from this host's sdk \
                 {host_sdk}; rebuild the plugin against autodeploy-sdk {host_sdk}"
            )
        ),
        "{refused:?}"
    );
    assert!(refused.iter().all(|l| l.len() < 400), "{refused:?}");
    // Each refusal is one line: nothing but refusals between the first and the transforms table.
    let listing = out.split("\ntransforms, in the order").next().unwrap_or("");
    let block: Vec<&str> = listing.lines().skip_while(|l| !l.starts_with("refused: ")).collect();
    assert!(block.iter().all(|l| l.starts_with("refused: ") || l.is_empty()), "a refusal ran over lines:\n{out}");
    assert!(err.lines().count() < 20, "a long report:\n{err}");
    assert!(has(&good, "a transform named `fold_norm_scale` already exists"), "{refused:?}");
    assert!(has(&good, "an attention backend named `naive_cpu` already exists"), "{refused:?}");
    assert!(has(&not_plugin, "has no autodeploy root module"), "{refused:?}");
    // The good library's first listing still registered its plugins.
    assert!(out.lines().any(|l| l.contains("naive_cpu") && l.ends_with(&good.display().to_string())), "{out}");

    // A config that needs nothing from the refused libraries runs.
    let (ok, out, err) = host(&dir, &cfg("torch"), &[]);
    assert!(ok && out.contains("[0] output"), "{err}");

    // Only the old library: a config that needs its backend stops, naming the library and why.
    write_registry(&dir, &[&old]);
    let (ok, _, err) = host(&dir, &cfg("naive_cpu"), &[]);
    assert!(!ok);
    assert!(
        err.contains("unknown attn_backend `naive_cpu`")
            && err.contains(&old.display().to_string())
            && err.contains(&format!("incompatible with this host's sdk {host_sdk}")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The example plugin's `llama2c` importer: a model format the host does not know, read by the
/// library and built from the host's built-in ops by name. The same tiny Llama as a llama2.c
/// checkpoint and as a Hugging Face folder (tests/fixtures/make_llama2c_fixture.py) generates
/// what transformers generated, through either importer; bad files fail with the plugin's message.
#[test]
fn a_plugin_importer_reads_a_format_the_host_does_not_know() {
    let fixtures = root().join("tests/fixtures/llama2c");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("reference.json")).unwrap()).unwrap();
    let want = format!(
        "{:?}",
        reference["greedy"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect::<Vec<_>>()
    );
    let prompt = format!(
        "{:?}",
        reference["prompt"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap()).collect::<Vec<_>>()
    );
    let lib = example_plugin();
    let dir = scratch("plugin-importer");
    let cfg = |model: &Path, extra: &str| {
        format!(
            "{extra}model = {:?}\ndevice = \"cpu\"\nmax_new_tokens = 10\n[[prompts]]\ntoken_ids = {prompt}\n",
            model.display().to_string()
        )
    };
    let bin = fixtures.join("model.bin");

    // Without the library no importer knows the file.
    write_registry(&dir, &[]);
    let (ok, _, err) = host(&dir, &cfg(&bin, ""), &[]);
    assert!(!ok && err.contains("no importer recognises this model"), "{err}");

    write_registry(&dir, &[&lib]);
    for (model, importer) in [(bin.clone(), "llama2c"), (fixtures.join("hf"), "hf")] {
        let (ok, out, err) = host(&dir, &cfg(&model, ""), &[]);
        assert!(ok, "{importer}: {err}");
        let line = output_lines(&out).join("\n");
        assert!(line.contains(&format!("output {want}")), "{importer}: {line} (transformers: {want})");
    }
    // bf16 through the plugin: the weights are stored and computed in bf16.
    let (ok, out, err) = host(&dir, &cfg(&bin, "dtype = \"bfloat16\"\n"), &["graph", "--stage", "post_load_fusion"]);
    assert!(ok, "{err}");
    assert!(out.contains("# import: llama2c importer") && out.contains("computing in bf16"), "{out}");
    assert!(out.contains("%layers.0.wo: bf16[64, 64] = weight"), "{out}");
    // llama2.c's q/k rows are in Meta's interleaved order: matched as the interleaved RoPE, which
    // `deinterleave_rope` makes the plain one over q/k rows permuted at load.
    assert!(out.contains("transform=deinterleave_rope] made 4 interleaved RoPE plain"), "{out}");
    assert!(out.contains("torch_rope_with_explicit_cos_sin(") && !out.contains("interleaved=true"), "{out}");
    let (ok, out, err) = host(&dir, &cfg(&bin, ""), &["graph", "--stage", "pattern_matcher"]);
    assert!(ok && out.contains("interleaved=true"), "{out}{err}");

    // A truncated file: refused by the plugin with the file and the sizes.
    let short = dir.join("short.bin");
    std::fs::write(&short, &std::fs::read(&bin).unwrap()[..1000]).unwrap();
    let (ok, _, err) = host(&dir, &cfg(&short, "importer = \"llama2c\"\n"), &[]);
    assert!(!ok, "a truncated checkpoint must fail");
    assert!(
        err.contains("importer `llama2c`") && err.contains("short.bin") && err.contains("the file has 1000"),
        "{err}"
    );

    // The example compile backend `checked` stops at the first non-finite value and names the
    // node: an infinity planted in token 17's embedding row fails that request at `embed`.
    let (ok, out, err) = host(&dir, &cfg(&bin, "compile_backend = \"checked\"\n"), &[]);
    assert!(ok && output_lines(&out).join("\n").contains(&format!("output {want}")), "{err}{out}");
    let mut bytes = std::fs::read(&bin).unwrap();
    let dim = i32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let at = 28 + (17 * dim + 3) * 4;
    bytes[at..at + 4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let inf = dir.join("inf.bin");
    std::fs::write(&inf, bytes).unwrap();
    assert!(prompt.contains("17"), "the prompt reads token 17: {prompt}");
    let (ok, out, _) = host(&dir, &cfg(&inf, "compile_backend = \"checked\"\n"), &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("compile backend `checked`")
            && out.contains("`embed` (aten.embedding)")
            && out.contains("computed inf")
            && out.contains("the first non-finite value"),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Plugins are code: a registry in the working directory or beside the config is named, never
/// loaded, unless chosen (`--plugins` or `AUTODEPLOY_PLUGINS`); `plugins --plugins FILE` lists
/// its libraries without loading them until `--load`; a registry that is a FIFO is refused at
/// once instead of blocking.
#[test]
fn a_registry_nobody_chose_is_not_loaded() {
    let lib = example_plugin();
    let dir = scratch("plugin-trust");
    write_registry(&dir, &[&lib]);
    let cfg = dir.join("cfg.toml");
    let fixture = root().join("tests/fixtures/llama");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\nattn_backend = \"naive_cpu\"\nmax_new_tokens = 2\n[[prompts]]\ntoken_ids = [1, 17]\n",
            fixture.display().to_string()
        ),
    )
    .unwrap();
    let run = |args: &[&str], env: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_autodeploy"));
        c.args(args).current_dir(&dir).env("RUST_LOG", "warn").env_remove("AUTODEPLOY_PLUGINS");
        if let Some(p) = env {
            c.env("AUTODEPLOY_PLUGINS", p);
        }
        let out = c.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let reg = dir.join("plugin-registry.toml");
    let reg_s = reg.to_str().unwrap();
    // In the working directory and beside the config, not chosen: not loaded, and said so.
    let (ok, out, err) = run(&["plugins", "--load", "--config", "cfg.toml"], None);
    assert!(
        ok && !out.contains("naive_cpu") && err.contains("is not loaded") && err.contains("--plugins"),
        "{out}{err}"
    );
    let (ok, _, err) = run(&["--config", "cfg.toml"], None);
    assert!(!ok && err.contains("unknown attn_backend `naive_cpu`"), "{err}");
    // Chosen for `plugins` without --load: its libraries are listed, not loaded.
    let (ok, out, err) = run(&["plugins", "--plugins", reg_s], None);
    assert!(
        ok && out.contains(&lib.display().to_string()) && out.contains("not loaded") && !out.contains("naive_cpu"),
        "{out}{err}"
    );
    // Chosen by the flag or the variable: loaded.
    let (ok, out, err) = run(&["plugins", "--load", "--plugins", reg_s], None);
    assert!(ok && out.contains("naive_cpu"), "{out}{err}");
    let (ok, out, err) = run(&["--config", "cfg.toml"], Some(&reg));
    assert!(ok && out.contains("[0] output"), "{out}{err}");
    // A chosen registry that is missing, or is a FIFO, is an error naming it (at once).
    let (ok, _, err) = run(&["plugins", "--plugins", "nowhere.toml"], None);
    assert!(!ok && err.contains("--plugins nowhere.toml: no such file"), "{err}");
    let fifo = dir.join("fifo.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let t0 = std::time::Instant::now();
    let (ok, _, err) = run(&["--config", "cfg.toml", "--plugins", fifo.to_str().unwrap()], None);
    assert!(!ok && err.contains("fifo.toml") && err.contains("not a regular file"), "{err}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `path = "libfoo.so"`, a bare file name, is the file beside `plugin-registry.toml` (as the
/// guide says), whatever the working directory and however the registry was named, never a
/// search of the system library path.
#[test]
fn a_bare_library_name_is_the_file_beside_the_registry() {
    let lib = example_plugin();
    let dir = scratch("plugin-bare");
    let name = lib.file_name().unwrap().to_str().unwrap().to_string();
    std::fs::copy(&lib, dir.join(&name)).unwrap();
    std::fs::write(dir.join("plugin-registry.toml"), format!("[[library]]\npath = {name:?}\n")).unwrap();
    let fixture = root().join("tests/fixtures/llama");
    std::fs::write(
        dir.join("cfg.toml"),
        format!(
            "model = {:?}\nattn_backend = \"naive_cpu\"\nmax_new_tokens = 2\n[[prompts]]\ntoken_ids = [1, 17]\n",
            fixture.display().to_string()
        ),
    )
    .unwrap();
    // The registry named relative to the working directory (its folder, then its parent).
    for (cwd, reg) in [
        (dir.clone(), "plugin-registry.toml".to_string()),
        (dir.parent().unwrap().to_path_buf(), {
            format!("{}/plugin-registry.toml", dir.file_name().unwrap().to_str().unwrap())
        }),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_autodeploy"))
            .args(["--config", dir.join("cfg.toml").to_str().unwrap(), "--plugins", &reg])
            .current_dir(&cwd)
            .env("RUST_LOG", "warn")
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains("[0] output"), "from {}: {stdout}{stderr}", cwd.display());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `debug_checks` on CUDA: a plugin op's CUDA kernel that leaves half its output unwritten fails
/// the step naming the op and its library (outputs marked before the launch, read back after).
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn debug_checks_catch_a_plugin_op_on_cuda() {
    autodeploy_kernels::cuda::probe(0).unwrap_or_else(|why| panic!("no usable GPU: {why}"));
    let lib = panicking_plugin();
    let dir = scratch("plugin-debug-cuda");
    write_registry(&dir, &[&lib]);
    let cfg = format!(
        "model = {:?}\ndevice = \"cuda\"\ndtype = \"float32\"\nattn_backend = \"flashinfer\"\nmax_new_tokens = 2\n[[prompts]]\ntoken_ids = [1, 2]\n\
         [transforms.insert_sloppy]\nenabled = true\n",
        root().join("tests/fixtures/llama").display().to_string()
    );
    let (_, out, err) = host(&dir, &cfg, &[]);
    assert!(out.contains("[0] output"), "without debug_checks: {out}\n{err}");
    let (_, out, err) = host(&dir, &format!("debug_checks = true\n{cfg}"), &[]);
    assert!(
        out.contains("[0] error:")
            && out.contains(&format!("debug_checks: op `sloppy.copy` ({}) at node `sloppy`", lib.display()))
            && out.contains("outputs unwritten"),
        "{out}\n{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

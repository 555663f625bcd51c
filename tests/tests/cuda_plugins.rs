//! Plugin libraries on the GPU: the example plugin's CUDA attention backend and typed op against
//! the built-in kernels and their own CPU kernels. A binary of its own because loading a library
//! registers its transforms for the whole process (the example's default-enabled
//! `fold_norm_scale` would change every later engine's graph in tests/cuda.rs). Needs an NVIDIA
//! GPU and `AUTODEPLOY_EXAMPLE_PLUGIN`; without a GPU (CI) each test is ignored, saying why.

mod common;

use common::gpu::{gpu, launches};
use common::{greedy, FAMILIES};

const PAGE: usize = 4;

/// The example plugin's library, loaded once (`AUTODEPLOY_EXAMPLE_PLUGIN`: its path, built with
/// `cargo build --release` in examples/plugin).
fn example_plugin() {
    static LOADED: std::sync::Once = std::sync::Once::new();
    LOADED.call_once(|| {
        let lib = std::env::var("AUTODEPLOY_EXAMPLE_PLUGIN").unwrap_or_else(|_| {
            panic!("set AUTODEPLOY_EXAMPLE_PLUGIN to the example plugin's library (examples/plugin: cargo build --release)")
        });
        let lib = std::path::PathBuf::from(lib);
        let n = autodeploy_core::plugin_abi::load_libraries(&lib, std::slice::from_ref(&lib));
        assert!(n > 0, "{}: {}", lib.display(), autodeploy_core::plugin_abi::refusals_note());
    });
}

/// A library's CUDA attention backend (the example plugin's `naive`: its own NVRTC-compiled
/// kernels through the host's launcher) gives transformers' greedy tokens on every fixture
/// family in f32, under `opt` (its steps are not captured); a library backend with no CUDA
/// side is refused at build, naming it.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_library_attention_backend_runs_on_cuda() {
    let _turn = gpu();
    example_plugin();
    for family in FAMILIES {
        let r = common::Reference::load(family);
        let refs: Vec<(Vec<i64>, Vec<i64>)> =
            (0..2).map(|j| (r.i64(&format!("gen_prompt_{j}")).1, r.i64(&format!("gen_output_{j}")).1)).collect();
        let requests: Vec<_> = refs.iter().map(|(p, w)| greedy(p, w.len())).collect();
        let extra = format!(
            "attn_page_size = {PAGE}\nmax_batch_size = 4\ndevice = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"naive\"\n"
        );
        // The sdk's attention call has no window or soft-cap: refused at build, naming it.
        if common::scored(family) {
            common::refused_scoring(family, &extra, "naive");
            continue;
        }
        let (out, ran) = launches(|| common::generate(family, &extra, &requests));
        for (i, (got, (_, want))) in out.into_iter().zip(&refs).enumerate() {
            assert_eq!(&got.unwrap().tokens, want, "{family} naive prompt {i}");
        }
        assert!(ran.contains_key("plugin_source_kernel"), "{family}: {ran:?}");
        assert!(!ran.keys().any(|k| k.contains("paged") || k.contains("cuda_graph")), "{family}: {ran:?}");
    }
    let toml = format!(
        "model = {:?}\ndevice = \"cuda\"\nattn_backend = \"naive_cpu\"\n",
        common::fixture("llama").display().to_string()
    );
    let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
    let e = autodeploy_core::pipeline::build(&cfg).err().expect("naive_cpu has no CUDA side").to_string();
    assert!(e.contains("`naive_cpu`") && e.contains("no CUDA implementation"), "{e}");
}

/// The same library backend on Llama-3.1-8B's shape (dummy bf16 weights): the greedy tokens of
/// a batch of two prompts over a few decode steps equal the built-in `flashinfer`'s.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_library_attention_backend_matches_flashinfer_at_8b_shape() {
    let _turn = gpu();
    example_plugin();
    // Beside the fixtures (AUTODEPLOY_FIXTURES, when the binary was built on another machine).
    let dir = common::fixture("..").join("../benches/configs/Llama-3.1-8B-Instruct");
    let mut tokens = Vec::new();
    for attn in ["flashinfer", "naive"] {
        let toml = format!(
            "model = {:?}\nload_format = \"dummy\"\ndtype = \"bfloat16\"\ndevice = \"cuda\"\ncompile_backend = \"opt\"\nattn_backend = \"{attn}\"\nmax_batch_size = 2\nmax_seq_len = 256\n",
            dir.display().to_string()
        );
        let cfg = autodeploy_core::config::PipelineConfig::from_toml_str(&toml, None).unwrap();
        let mut e = autodeploy_core::pipeline::build(&cfg).unwrap();
        let mut rt = autodeploy_core::registry::runtime(&cfg).unwrap();
        let reqs: Vec<_> =
            [(0..40).map(|i| 100 + 7 * i).collect::<Vec<i64>>(), (0..23).map(|i| 5000 + 13 * i).collect()]
                .into_iter()
                .map(|prompt| autodeploy_core::runtime::Request {
                    prompt,
                    sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: 6, ..Default::default() },
                })
                .collect();
        let (r, _) = rt.generate(&mut e, &reqs);
        tokens.push(r.into_iter().map(|x| x.unwrap().tokens).collect::<Vec<_>>());
    }
    eprintln!("8B shape greedy: flashinfer {:?}, naive {:?}", tokens[0], tokens[1]);
    assert_eq!(tokens[0], tokens[1], "greedy tokens, flashinfer then the library's naive");
}

/// A library's typed op on the GPU (the example's `example.topk`: float values and i64 indices
/// out, its own NVRTC-compiled kernel) gives what its CPU kernel gives, f32 and bf16, on rows
/// with ties.
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored on a GPU machine"]
fn a_library_typed_op_on_cuda_matches_its_cpu_kernel() {
    use autodeploy_core::custom_op::DeviceTensor;
    use autodeploy_core::device_attention::SourceLauncher;
    use autodeploy_core::DType;
    let _turn = gpu();
    example_plugin();
    let op = autodeploy_core::registry::custom_op("example.topk").expect("example.topk is registered");
    let cuda = op.cuda.clone().expect("example.topk has a CUDA kernel");
    let g = autodeploy_kernels::cuda::exec::Gpu::open(0).unwrap();
    let (rows, n, k) = (37usize, 300usize, 5usize);
    // Values on a coarse grid, so rows hold ties the order must break by index.
    let vals: Vec<f32> = (0..rows * n).map(|i| ((i * 7919 % 61) as f32 - 30.0) / 4.0).collect();
    for dtype in [DType::F32, DType::BF16] {
        let x = autodeploy_core::Tensor::from_f32_as(dtype, vec![rows, n], vals.clone()).unwrap();
        let outs = [(dtype, vec![rows, k]), (DType::I64, vec![rows, k])];
        let want = (op.cpu)(&[&x], "k=5", &outs, &Default::default()).unwrap();
        let xb = x.to_le_bytes().unwrap();
        let (bx, bv, bi) = (
            g.alloc(xb.len(), "x").unwrap(),
            g.alloc(rows * k * dtype.size_in_bytes(), "values").unwrap(),
            g.alloc(rows * k * 8, "indices").unwrap(),
        );
        g.upload(bx.ptr, &xb).unwrap();
        let dev = |ptr, dtype, shape: &[usize]| DeviceTensor { ptr, dtype, shape: shape.to_vec() };
        let mut launcher = SourceLauncher { gpu: &g, what: "example.topk".into(), flags: 0, scratch: vec![] };
        cuda(
            &[dev(bx.ptr, dtype, &[rows, n])],
            &[dev(bv.ptr, dtype, &[rows, k]), dev(bi.ptr, DType::I64, &[rows, k])],
            "k=5",
            &mut launcher,
        )
        .unwrap();
        let mut v = vec![0u8; rows * k * dtype.size_in_bytes()];
        let mut ix = vec![0u8; rows * k * 8];
        g.download(bv.ptr, &mut v).unwrap();
        g.download(bi.ptr, &mut ix).unwrap();
        assert_eq!(v, want[0].to_le_bytes().unwrap(), "{dtype}: values");
        assert_eq!(ix, want[1].to_le_bytes().unwrap(), "{dtype}: indices");
    }
}

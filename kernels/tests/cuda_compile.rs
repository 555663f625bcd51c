//! Every CUDA kernel compiles with NVRTC for sm_80 (A100) and sm_90 (H100/H200), without a GPU.
//! CI installs NVRTC from PyPI (`nvidia-cuda-nvrtc`, see .ci/run); elsewhere the test says it
//! skipped when the library is missing.

use autodeploy_kernels::cuda::{compile, compile_all, compile_labeled, nvrtc_available, nvrtc_version, SOURCES};

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_and_is_cached() {
    if !nvrtc_available() {
        assert!(std::env::var_os("CI").is_none(), "CI must provide NVRTC (.ci/run installs nvidia-cuda-nvrtc)");
        eprintln!("SKIPPED: libnvrtc not found (pip install nvidia-cuda-nvrtc; add its lib folder to LD_LIBRARY_PATH)");
        return;
    }
    let cache = std::env::temp_dir().join(format!("autodeploy-kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::env::set_var("AUTODEPLOY_KERNEL_CACHE", &cache);
    eprintln!("NVRTC {:?}", nvrtc_version().unwrap());
    for arch in ["sm_80", "sm_90"] {
        // As a device's first run does: every module at once, on threads of their own.
        let fresh = std::sync::Mutex::new(Vec::new());
        let all = compile_all(arch, &|m, compiled| fresh.lock().unwrap().push((m.to_string(), compiled)))
            .unwrap_or_else(|e| panic!("{e}"));
        let fresh = fresh.into_inner().unwrap();
        assert_eq!(all.len(), SOURCES.len());
        assert!(fresh.len() == SOURCES.len() && fresh.iter().all(|(_, c)| *c), "{arch}: {fresh:?}");
        for ((module, src, entries), first) in SOURCES.iter().zip(all) {
            let (ptx, cached) = compile(module, src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(cached, "{module} {arch}: not cached by compile_all");
            let text = ptx.to_src();
            assert_eq!(text, first.to_src(), "{module} {arch}: compile_all and compile differ");
            assert!(text.contains(&format!(".target {arch}")), "{module}: PTX is not for {arch}");
            for e in *entries {
                assert!(text.contains(&format!(".entry {e}(")), "{module} {arch}: no entry point {e}");
            }
        }
    }
    // Plugins' CUDA sources, compiled the way the host compiles them (the shared helpers
    // prepended): the example plugin's `example.rms_norm` and `example.topk` kernels and its
    // `naive` attention backend's.
    let plugin_sources: [(&str, &str, &str, &[&str]); 3] = [
        (
            "example-rms-norm",
            "examples/plugin/src/rms_norm.cu",
            include_str!("../../examples/plugin/src/rms_norm.cu"),
            &["example_rms_norm_f32", "example_rms_norm_bf16"],
        ),
        (
            "example-naive-attention",
            "examples/plugin/src/naive_attention.cu",
            include_str!("../../examples/plugin/src/naive_attention.cu"),
            &["naive_write_kv_f32", "naive_write_kv_bf16", "naive_attend_f32", "naive_attend_bf16"],
        ),
        (
            "example-topk",
            "examples/plugin/src/topk.cu",
            include_str!("../../examples/plugin/src/topk.cu"),
            &["example_topk_f32", "example_topk_bf16"],
        ),
    ];
    for (label, what, src, entries) in plugin_sources {
        for arch in ["sm_80", "sm_90"] {
            let (ptx, _) = compile_labeled(label, what, src, arch).unwrap_or_else(|e| panic!("{e}"));
            for e in entries {
                assert!(ptx.to_src().contains(&format!(".entry {e}(")), "{what} {arch}: no entry point {e}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
}

//! The GPU test binaries' turn-taking and launch counting (tests/cuda.rs, tests/cuda_plugins.rs).

/// The GPU, one test at a time; a test run without one fails saying why. Run concurrently in
/// one process, engines capturing CUDA graphs on several threads sometimes see their capture
/// invalidated (tests/README.md); until that is understood the tests take turns.
pub fn gpu() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    match autodeploy_core::config::cuda_usable(0) {
        Ok(name) => {
            eprintln!("running on {name}");
            TURN.lock().unwrap_or_else(|e| e.into_inner())
        }
        Err(why) => panic!("a GPU test needs a usable GPU: {why}"),
    }
}

/// What `f` launched on the GPU, by kernel (and CUDA-graph captures and replays): how a test
/// confirms the path it is named after ran.
pub fn launches<T>(f: impl FnOnce() -> T) -> (T, std::collections::BTreeMap<&'static str, u64>) {
    use autodeploy_kernels::cuda::exec::launch_counts;
    let before = launch_counts();
    let out = f();
    let mut delta = launch_counts();
    for (k, v) in delta.iter_mut() {
        *v -= before.get(k).copied().unwrap_or(0);
    }
    delta.retain(|_, v| *v > 0);
    (out, delta)
}

//! One kernel module's PTX as the GPU machine's NVRTC makes it, for reading register counts,
//! spills and code size without a GPU (`ptxas -v`, `cuobjdump -sass` from PyPI's
//! `nvidia-cuda-nvcc`, `nvidia-cuda-cuobjdump`, `nvidia-cuda-nvdisasm`; docs/developing.md).
//!
//!   LD_LIBRARY_PATH=$(bash scripts/fetch-nvrtc.sh) \
//!     cargo run --release -p autodeploy-kernels --example ptx -- decode_fp8kv sm_90 > decode_fp8kv.ptx
//!
//! Modules are `SOURCES`' names (`decode`, `decode_fp8kv`, `attention`, `quant`, ...).
use autodeploy_kernels::cuda::{compile, SOURCES};

fn main() {
    let mut args = std::env::args().skip(1);
    let module = args.next().unwrap_or_default();
    let arch: &'static str = match args.next().as_deref() {
        None | Some("sm_90") => "sm_90",
        Some("sm_80") => "sm_80",
        Some(other) => fail(&format!("arch `{other}`: sm_80 or sm_90")),
    };
    let Some((name, src, _)) = SOURCES.iter().find(|(m, _, _)| *m == module) else {
        let names: Vec<_> = SOURCES.iter().map(|(m, _, _)| *m).collect();
        fail(&format!("module `{module}` is not one of {names:?}"))
    };
    match compile(name, src, arch) {
        Ok((ptx, _)) => print!("{}", ptx.to_src()),
        Err(e) => fail(&e.0),
    }
}

fn fail(why: &str) -> ! {
    eprintln!("ptx: {why}");
    std::process::exit(2)
}

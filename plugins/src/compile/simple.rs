//! The `simple` compile backend: on the CPU, an interpreter that runs every node in graph order,
//! freeing each intermediate after its last use; on CUDA, the GPU executor (compile/cuda.rs)
//! without fusion or graphs. The `cudagraph`, `compile` and `opt` backends are registered here too.

use autodeploy_core::backend::{CompileBackend, CompileOptions, CompiledModel};
use autodeploy_core::config::Device;
use autodeploy_core::cpu;
use autodeploy_core::error::{Error, Result};
pub use autodeploy_core::interp::bind_inputs;
use autodeploy_core::interp::{eval_node, initial_values, load_params};
use autodeploy_core::kvcache::{AttentionBackend, CacheSpec, StepContext};
use autodeploy_core::registry::attention_backend;
use autodeploy_core::registry::CompileBackendPlugin;
use autodeploy_core::{Graph, Tensor};

pub struct SimpleBackend;

autodeploy_core::inventory::submit! {
    CompileBackendPlugin {
        name: "simple",
        aliases: &["torch-simple"],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(SimpleBackend),
        fuses: false,
    }
}

/// The backends past `simple`: on CUDA each is the executor in a mode; on the CPU they run as
/// `simple` (CUDA graphs and kernel fusion are GPU features), saying so once.
pub struct ModeBackend {
    name: &'static str,
    mode: super::cuda::Mode,
}

autodeploy_core::inventory::submit! {
    CompileBackendPlugin {
        name: "cudagraph",
        aliases: &["torch-cudagraph"],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(ModeBackend { name: "cudagraph", mode: super::cuda::Mode { graphs: true } }),
        fuses: false,
    }
}
autodeploy_core::inventory::submit! {
    CompileBackendPlugin {
        name: "compile",
        aliases: &["torch-compile"],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(ModeBackend { name: "compile", mode: super::cuda::Mode { graphs: false } }),
        fuses: true,
    }
}
autodeploy_core::inventory::submit! {
    CompileBackendPlugin {
        name: "opt",
        aliases: &["torch-opt"],
        version: env!("CARGO_PKG_VERSION"),
        make: || Box::new(ModeBackend { name: "opt", mode: super::cuda::Mode { graphs: true } }),
        fuses: true,
    }
}

impl CompileBackend for ModeBackend {
    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn CompiledModel>> {
        match opts.device {
            Device::Cuda(n) => Ok(Box::new(super::cuda::CudaModel::compile(graph, opts, n, self.mode)?)),
            Device::Cpu => {
                tracing::info!(
                    "compile_backend `{}` on the CPU runs as `simple` (CUDA graphs and kernel fusion are GPU features)",
                    self.name
                );
                SimpleBackend.compile(graph, opts)
            }
        }
    }
}

impl CompileBackend for SimpleBackend {
    fn compile(&self, graph: &Graph, opts: &CompileOptions) -> Result<Box<dyn CompiledModel>> {
        if let Device::Cuda(n) = opts.device {
            return Ok(Box::new(super::cuda::CudaModel::compile(graph, opts, n, super::cuda::Mode::default())?));
        }
        graph.validate()?;
        // A bar while weights load (dequantizing a GGUF takes seconds); hidden when stderr is not
        // a terminal.
        let bar = indicatif::ProgressBar::new(graph.params.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:30} {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let params = load_params(graph, |name| {
            bar.set_message(name.to_string());
            bar.inc(1);
        })?;
        bar.finish_and_clear();
        tracing::info!(int8_activations = opts.kernels.int8_activations, "cpu kernels: {}", opts.kernels.cpu.name());
        // Weights readied for the kernel path (the AVX-512 VNNI copy of the linears').
        let by_value: std::collections::HashMap<usize, &Tensor> = params.iter().map(|(v, t)| (*v, t)).collect();
        for n in &graph.nodes {
            let weight = |i: usize| by_value.get(&(n.inputs[i].0 as usize)).copied();
            cpu::prepare_weights(&n.op, n.inputs.len(), weight, &opts.kernels);
        }
        // Index of the last node reading each value; graph outputs live to the end.
        let mut last_use = vec![usize::MAX; graph.values.len()];
        for (i, n) in graph.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use[v.0 as usize] = i;
            }
        }
        for o in &graph.outputs {
            last_use[o.0 as usize] = usize::MAX;
        }
        for (v, _) in &params {
            last_use[*v] = usize::MAX;
        }
        let attention = match CacheSpec::of(graph)? {
            Some(spec) => Some(attention_backend(&spec.backend, &opts.attention_options)?.1),
            None => None,
        };
        let profile = std::env::var_os("AUTODEPLOY_PROFILE").map(|_| Default::default());
        Ok(Box::new(Interpreter { graph: graph.clone(), params, last_use, attention, kernels: opts.kernels, profile }))
    }
}

struct Interpreter {
    graph: Graph,
    params: Vec<(usize, Tensor)>,
    last_use: Vec<usize>,
    /// The backend behind the graph's cached-attention ops, if it has any.
    attention: Option<Box<dyn AttentionBackend>>,
    kernels: cpu::KernelOptions,
    /// Time per op name, kept when `AUTODEPLOY_PROFILE` is set and printed when the model drops.
    profile: Option<std::collections::BTreeMap<String, (u64, std::time::Duration)>>,
}

impl Drop for Interpreter {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            print_profile("simple backend", p);
        }
    }
}

/// Prints `AUTODEPLOY_PROFILE`'s table: calls and time per op, slowest first.
pub fn print_profile<K: std::fmt::Display>(what: &str, p: &std::collections::BTreeMap<K, (u64, std::time::Duration)>) {
    let total: std::time::Duration = p.values().map(|v| v.1).sum();
    let mut rows: Vec<_> = p.iter().collect();
    rows.sort_by_key(|(_, v)| std::cmp::Reverse(v.1));
    eprintln!("op profile ({what}; {:.1} ms in ops):", total.as_secs_f64() * 1e3);
    for (op, (calls, t)) in rows {
        let share = 100.0 * t.as_secs_f64() / total.as_secs_f64().max(1e-12);
        eprintln!("  {:<32} {calls:>8} calls {:>10.1} ms {share:>5.1}%", op.to_string(), t.as_secs_f64() * 1e3);
    }
}

impl CompiledModel for Interpreter {
    fn forward(&mut self, inputs: &[Tensor], mut step: Option<&mut StepContext>) -> Result<Vec<Tensor>> {
        let g = &self.graph;
        let bind = bind_inputs(g, inputs)?;
        if let (Some(b), Some(cx)) = (self.attention.as_mut(), step.as_deref()) {
            b.begin_step(cx.plan)?;
        }
        let mut slots = initial_values(g, inputs, &self.params);
        for (i, n) in g.nodes.iter().enumerate() {
            let ins: Vec<&Tensor> = n
                .inputs
                .iter()
                .map(|v| slots[v.0 as usize].as_ref().expect("validated graph defines values before use"))
                .collect();
            let t0 = self.profile.as_ref().map(|_| std::time::Instant::now());
            let out = eval_node(g, i, &ins, &bind, &self.kernels, self.attention.as_deref(), step.as_deref_mut())?;
            if let (Some(p), Some(t0)) = (self.profile.as_mut(), t0) {
                let e = p.entry(n.op.name().to_string()).or_default();
                e.0 += 1;
                e.1 += t0.elapsed();
            }
            for (o, t) in n.outputs.iter().zip(out) {
                slots[o.0 as usize] = Some(t);
            }
            for v in &n.inputs {
                if self.last_use[v.0 as usize] == i {
                    slots[v.0 as usize] = None;
                }
            }
        }
        g.outputs
            .iter()
            .map(|v| slots[v.0 as usize].take().ok_or_else(|| Error::Msg("graph output was not computed".into())))
            .collect()
    }
}

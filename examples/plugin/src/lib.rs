//! An example plugin library: a graph transform and an attention backend, written against the
//! `autodeploy-sdk` crate only and loaded by an unchanged host through `plugin-registry.toml`.
//!
//! - `fold_norm_scale` (transform, stage `post_load_fusion`): an RMSNorm multiplies its output by
//!   a per-channel weight `w`; when every reader of that output is a linear layer, the scale can
//!   live in the linears' weights instead (`W[:, j] · w[j]`), and the norm's weight becomes ones.
//! - `naive_cpu` (attention backend): causal attention over the paged KV cache, written out
//!   loop by loop; `naive`, the same on the CPU with a CUDA side too (`naive_cuda.rs`: two
//!   plain kernels the host compiles and launches).
//! - `example.rms_norm` (op) with its CPU kernel and a CUDA one (CUDA C source in `rms_norm.cu`
//!   the host compiles and launches), and `use_example_rmsnorm` (transform, off unless the
//!   config enables it), which puts that op in place of every f32 `torch_rmsnorm`.
//! - `example.topk` (typed op: float in, float values and i64 indices out, CPU and CUDA
//!   kernels) and `add_topk_outputs` (transform, off unless enabled), which appends the logits'
//!   top k to the graph's outputs (see `topk.rs`).
//! - `llama2c` (model importer): llama2.c checkpoints (`model.bin`), built from the host's
//!   built-in ops by name (see `llama2c.rs`).
//! - `sequential` (runtime): one request at a time, prompt then one token per step (see
//!   `sequential.rs`).
//! - `checked` (compile backend): runs the graph node by node on the host's kernels and stops
//!   at the first NaN or infinity, naming the node (see `checked.rs`).

mod checked;
mod llama2c;
mod naive_cuda;
mod sequential;
mod topk;

use autodeploy_sdk::abi_stable::std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RString};
use autodeploy_sdk::ffi::{
    attention_backend_box, AttentionBackend, AttentionBackendBox, AttentionCall, CudaLauncherRef, DeviceDtype,
    DeviceTensorView, Dim3, GraphRef, HostTensor, KernelArg, PatternDecl, PluginDecl, StepInfo, TensorView, Transform,
};
use autodeploy_sdk::Stage;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn plugins() -> Vec<PluginDecl> {
    vec![
        PluginDecl::transform(
            "fold_norm_scale",
            VERSION,
            Stage::PostLoadFusion,
            &[("require_all", "false", "fail unless every RMSNorm could be folded")],
            FoldNormScale,
        ),
        PluginDecl::attention_backend_with_options(
            "naive_cpu",
            VERSION,
            &[("max_positions", "0", "the longest span one query attends over; longer steps fail (0: no limit)")],
            new_naive_cpu,
        ),
        PluginDecl::attention_backend_with_options(
            "naive",
            VERSION,
            &[("max_positions", "0", "the longest span one query attends over; longer steps fail (0: no limit)")],
            new_naive_cpu,
        )
        .with_cuda_attention(naive_cuda::new_naive_cuda),
        PluginDecl::model_importer("llama2c", VERSION, llama2c::accepts, llama2c::import),
        PluginDecl::runtime("sequential", VERSION, sequential::new_sequential),
        PluginDecl::compile_backend("checked", VERSION, checked::compile),
        PluginDecl::op_with_cuda("example.rms_norm", VERSION, 2, 0, rms_norm_cpu, rms_norm_cuda),
        PluginDecl::transform("use_example_rmsnorm", VERSION, Stage::PostLoadFusion, &[], UseExampleRmsNorm)
            .disabled_by_default(),
        PluginDecl::typed_op("example.topk", VERSION, 1, topk::topk_outputs, topk::topk_cpu)
            .with_cuda_kernel(topk::topk_cuda),
        PluginDecl::transform(
            "add_topk_outputs",
            VERSION,
            Stage::Compile,
            &[("k", "4", "how many (1..=8)")],
            topk::AddTopkOutputs,
        )
        .disabled_by_default(),
    ]
}

autodeploy_sdk::export_plugins!(plugins);

struct FoldNormScale;

/// One norm that can be folded: its node, weight value, and the linear nodes reading it.
struct Candidate {
    node: usize,
    weight: u32,
    linears: Vec<usize>,
}

impl FoldNormScale {
    /// The norms whose output only linears read (as their input, with a float weight), and the
    /// ops that keep the others from folding.
    fn candidates(g: &GraphRef<'_>) -> (Vec<Candidate>, Vec<String>) {
        let (mut found, mut blocked) = (Vec::new(), Vec::new());
        for i in g.find_nodes("torch_rmsnorm".into()) {
            let ROption::RSome(n) = g.node(i) else { continue };
            let (weight, out) = (n.inputs[1], n.outputs[0]);
            let is_weight = matches!(g.value(weight), ROption::RSome(v) if v.weight.is_some());
            let users = g.users(out);
            let mut linears = Vec::new();
            for &u in users.iter() {
                let ROption::RSome(un) = g.node(u) else { continue };
                // A linear reading the norm as its input (not as its weight), with a float weight.
                let weight_in = match un.inputs.as_slice() {
                    [x, w, ..] if un.op.as_str() == "aten.linear" && *x == out && *w != out => Some(*w),
                    _ => None,
                };
                let float_weight = weight_in.is_some_and(|w| {
                    matches!(g.value(w),
                    ROption::RSome(v) if v.weight.is_some() && ["f32", "bf16", "f16"].contains(&v.dtype.as_str()))
                });
                if float_weight {
                    linears.push(u);
                } else {
                    blocked.push(un.op.to_string());
                }
            }
            if is_weight && !g.is_output(out) && !users.is_empty() && linears.len() == users.len() {
                found.push(Candidate { node: i, weight, linears });
            }
        }
        (found, blocked)
    }

    fn fold(g: &mut GraphRef<'_>, c: &Candidate) -> Result<(), String> {
        let w = g.read_weight(c.weight).into_result()?;
        let wname = match g.value(c.weight) {
            ROption::RSome(v) => v.weight.map(|s| s.to_string()).unwrap_or_default(),
            ROption::RNone => return Err(format!("value {} vanished", c.weight)),
        };
        let k = w.data.len();
        for &l in &c.linears {
            let ROption::RSome(ln) = g.node(l) else { return Err(format!("node {l} vanished")) };
            let wv = ln.inputs[1];
            let ROption::RSome(info) = g.value(wv) else { return Err(format!("value {wv} vanished")) };
            let mut lw = g.read_weight(wv).into_result()?;
            if lw.shape.len() != 2 || lw.shape[1] as usize != k {
                return Err(format!("linear weight {} is {:?}, the norm has {k} channels", info.name, lw.shape));
            }
            for row in lw.data.chunks_mut(k) {
                for (x, s) in row.iter_mut().zip(w.data.iter()) {
                    *x *= s;
                }
            }
            let lname = info.weight.map(|s| s.to_string()).unwrap_or_else(|| info.name.to_string());
            let new = g
                .add_weight(format!("{lname}*{wname}").as_str().into(), info.dtype.as_str().into(), lw)
                .into_result()?;
            g.set_input(l, 1, new).into_result()?;
        }
        let ROption::RSome(wi) = g.value(c.weight) else { return Err("norm weight vanished".into()) };
        let ones = HostTensor { shape: w.shape.clone(), data: vec![1.0f32; k].into() };
        let one =
            g.add_weight(format!("{wname}.folded").as_str().into(), wi.dtype.as_str().into(), ones).into_result()?;
        g.set_input(c.node, 1, one).into_result()?;
        Ok(())
    }
}

impl Transform for FoldNormScale {
    fn apply(&self, mut graph: GraphRef<'_>, options: RStr<'_>) -> RResult<RString, RString> {
        let require_all = options.as_str().lines().any(|l| l.replace(' ', "") == "require_all=true");
        let (found, blocked) = Self::candidates(&graph);
        if require_all && !blocked.is_empty() {
            let mut ops = blocked.clone();
            ops.sort();
            ops.dedup();
            return RResult::RErr(
                format!(
                    "require_all: {} norm outputs are read by ops other than linear ({})",
                    blocked.len(),
                    ops.join(", ")
                )
                .into(),
            );
        }
        for c in &found {
            if let Err(e) = Self::fold(&mut graph, c) {
                return RResult::RErr(e.into());
            }
        }
        let dead = graph.remove_dead_nodes();
        RResult::ROk(
            format!(
                "folded {} rmsnorm scales into {} linears ({dead} nodes removed)",
                found.len(),
                found.iter().map(|c| c.linears.len()).sum::<usize>()
            )
            .into(),
        )
    }
}

/// Causal attention over the paged cache, loop by loop. `begin_step` resolves every (sequence,
/// position) of the step to its cache slot once; each layer's `attend` reuses that table.
#[derive(Default)]
struct NaiveCpu {
    /// Per token: the slots of positions `0..=pos` of its sequence, in order.
    slots: Vec<Vec<usize>>,
    /// Option `max_positions`: the longest span one query may attend over (0: no limit). Each
    /// query costs time in its span here, so a deployment may cap it.
    max_positions: usize,
}

/// Makes the backend from its options (TOML text from the host: `max_positions = N`).
extern "C" fn new_naive_cpu(options: RStr<'_>) -> RResult<AttentionBackendBox, RString> {
    match max_positions(options.as_str()) {
        Ok(max_positions) => RResult::ROk(attention_backend_box(NaiveCpu { max_positions, ..Default::default() })),
        Err(e) => RResult::RErr(e.into()),
    }
}

/// Option `max_positions` from the options text (`max_positions = N`; 0 when absent).
fn max_positions(options: &str) -> Result<usize, String> {
    for line in options.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        if k.trim() == "max_positions" {
            return match v.trim().parse::<i64>() {
                Ok(n) if n >= 0 => Ok(n as usize),
                _ => Err(format!("max_positions must be 0 or more, got `{}`", v.trim())),
            };
        }
    }
    Ok(0)
}

impl AttentionBackend for NaiveCpu {
    fn begin_step(&mut self, step: StepInfo<'_>) -> RResult<(), RString> {
        self.slots.clear();
        for tok in 0..step.tokens {
            let (s, pos) = (step.token_seq[tok], step.token_pos[tok]);
            let (Some(&first), Some(&end)) = (step.page_indptr.get(s), step.page_indptr.get(s + 1)) else {
                return RResult::RErr(format!("token {tok}: sequence {s} has no page table").into());
            };
            if self.max_positions > 0 && pos >= self.max_positions {
                return RResult::RErr(
                    format!(
                        "token {tok} at position {pos} would attend over {} positions, past max_positions = {}",
                        pos + 1,
                        self.max_positions
                    )
                    .into(),
                );
            }
            let pages = &step.page_indices[first..end];
            if pos / step.page_size >= pages.len() {
                return RResult::RErr(format!("token {tok}: position {pos} is past sequence {s}'s pages").into());
            }
            self.slots.push(
                (0..=pos).map(|p| pages[p / step.page_size] as usize * step.page_size + p % step.page_size).collect(),
            );
        }
        RResult::ROk(())
    }

    fn attend(&self, c: AttentionCall<'_>) -> RResult<(), RString> {
        let d = c.head_dim;
        let (h, kvh, t) = (c.heads, c.kv_heads, c.tokens);
        if h == 0 || kvh == 0 || h % kvh != 0 {
            return RResult::RErr(format!("{h} query heads cannot share {kvh} kv heads").into());
        }
        if self.slots.len() != t {
            return RResult::RErr(format!("the step was planned for {} tokens, not {t}", self.slots.len()).into());
        }
        let (k_cache, v_cache, out) = (c.k_cache.into_mut_slice(), c.v_cache.into_mut_slice(), c.out.into_mut_slice());
        let max_slot = self.slots.iter().flatten().copied().max().unwrap_or(0);
        if (max_slot + 1) * kvh * d > k_cache.len().min(v_cache.len()) {
            return RResult::RErr(format!("slot {max_slot} is outside the cache").into());
        }
        // This step's keys and values into their slots (each token's own position is its last).
        for (tok, slots) in self.slots.iter().enumerate() {
            let sl = slots[slots.len() - 1];
            for j in 0..kvh {
                let (src, dst) = ((j * t + tok) * d, (sl * kvh + j) * d);
                k_cache[dst..dst + d].copy_from_slice(&c.k[src..src + d]);
                v_cache[dst..dst + d].copy_from_slice(&c.v[src..src + d]);
            }
        }
        // Each query row attends to its sequence's positions 0..=pos.
        let mut scores = Vec::new();
        for head in 0..h {
            let j = head / (h / kvh);
            for (tok, slots) in self.slots.iter().enumerate() {
                let q = &c.q[(head * t + tok) * d..(head * t + tok + 1) * d];
                scores.clear();
                for &sl in slots {
                    let at = (sl * kvh + j) * d;
                    let dot: f32 = q.iter().zip(&k_cache[at..at + d]).map(|(a, b)| a * b).sum();
                    scores.push(dot * c.scale);
                }
                let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
                let mut sum = 0.0;
                for x in scores.iter_mut() {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let o = &mut out[(head * t + tok) * d..(head * t + tok + 1) * d];
                o.fill(0.0);
                for (&sl, w) in slots.iter().zip(&scores) {
                    let at = (sl * kvh + j) * d;
                    for (x, v) in o.iter_mut().zip(&v_cache[at..at + d]) {
                        *x += w / sum * v;
                    }
                }
            }
        }
        RResult::ROk(())
    }
}

/// `example.rms_norm(x, w)`, attrs `eps=<value>`: `x / sqrt(mean(x²) + eps) · w` over the last dim.
extern "C" fn rms_norm_cpu(
    ins: RSlice<'_, TensorView<'_>>,
    attrs: RStr<'_>,
    out: RSliceMut<'_, f32>,
) -> RResult<(), RString> {
    let Some(eps) = attr(attrs.as_str(), "eps").and_then(|v| v.parse::<f32>().ok()) else {
        return RResult::RErr(format!("attrs `{attrs}` have no eps").into());
    };
    let (x, w) = (ins[0], ins[1]);
    let n = w.data.len();
    if n == 0 || x.shape.last() != Some(&n) {
        return RResult::RErr(
            format!("x {:?} and w {:?} disagree on the last dim", x.shape.as_slice(), w.shape.as_slice()).into(),
        );
    }
    let out = out.into_mut_slice();
    for (xr, o) in x.data.chunks(n).zip(out.chunks_mut(n)) {
        let var = xr.iter().map(|a| a * a).sum::<f32>() / n as f32;
        let r = 1.0 / (var + eps).sqrt();
        for ((o, a), wv) in o.iter_mut().zip(xr).zip(w.data.iter()) {
            *o = wv * (a * r);
        }
    }
    RResult::ROk(())
}

/// The same op on the GPU: the kernels of `rms_norm.cu`, one block per row.
extern "C" fn rms_norm_cuda(
    ins: RSlice<'_, DeviceTensorView<'_>>,
    out: DeviceTensorView<'_>,
    attrs: RStr<'_>,
    mut gpu: CudaLauncherRef<'_>,
) -> RResult<(), RString> {
    let Some(eps) = attr(attrs.as_str(), "eps").and_then(|v| v.parse::<f32>().ok()) else {
        return RResult::RErr(format!("attrs `{attrs}` have no eps").into());
    };
    let (x, w) = (ins[0], ins[1]);
    let n = w.shape.iter().product::<usize>();
    if n == 0 || x.shape.last() != Some(&n) || x.dtype != w.dtype || x.dtype != out.dtype {
        return RResult::RErr(
            format!(
                "x {:?} {:?}, w {:?} {:?}, out {:?}: want one dtype and w as long as x's last dim",
                x.shape.as_slice(),
                x.dtype,
                w.shape.as_slice(),
                w.dtype,
                out.dtype
            )
            .into(),
        );
    }
    let entry = match x.dtype {
        DeviceDtype::F32 => "example_rms_norm_f32",
        DeviceDtype::BF16 => "example_rms_norm_bf16",
        other => return RResult::RErr(format!("example.rms_norm has no {other:?} kernel").into()),
    };
    let rows = x.shape.iter().product::<usize>() / n;
    if rows == 0 {
        return RResult::ROk(());
    }
    let block = (n.div_ceil(32) * 32).clamp(32, 1024) as u32;
    let args = [
        KernelArg::ptr(x.ptr),
        KernelArg::ptr(w.ptr),
        KernelArg::ptr(out.ptr),
        KernelArg::i32(n as i32),
        KernelArg::f32(eps),
    ];
    gpu.launch(
        include_str!("rms_norm.cu").into(),
        entry.into(),
        Dim3 { x: rows as u32, y: 1, z: 1 },
        Dim3 { x: block, y: 1, z: 1 },
        0,
        args.as_slice().into(),
    )
}

/// The value of `key` in attribute text such as `eps=1e-5, norm_dtype=f32`.
pub(crate) fn attr<'a>(attrs: &'a str, key: &str) -> Option<&'a str> {
    attrs.split(',').map(str::trim).find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

struct UseExampleRmsNorm;

impl Transform for UseExampleRmsNorm {
    fn apply(&self, mut graph: GraphRef<'_>, _options: RStr<'_>) -> RResult<RString, RString> {
        // The host's pattern matcher finds each norm: `torch_rmsnorm(x, w)`.
        let mut p = PatternDecl::new();
        let (x, w) = (p.input("x"), p.input("w"));
        p.op("torch_rmsnorm", &[x, w]);
        let matches = match graph.find_pattern(&p) {
            RResult::ROk(m) => m,
            RResult::RErr(e) => return RResult::RErr(e),
        };
        // Read every match first: node indices move with each insertion (value ids do not).
        let mut norms = Vec::new();
        for m in matches {
            let ROption::RSome(n) = graph.node(m.nodes[0]) else { continue };
            let ROption::RSome(out) = graph.value(m.output) else { continue };
            let (Some(eps), Some("f32"), "f32") =
                (attr(&n.attrs, "eps"), attr(&n.attrs, "norm_dtype"), out.dtype.as_str())
            else {
                continue;
            };
            if let (Some(x), Some(w)) = (m.input("x"), m.input("w")) {
                norms.push((m.output, format!("{}.example", out.name), [x, w], format!("eps={eps}")));
            }
        }
        let mut replaced = 0;
        for (value, name, ins, eps) in norms {
            // Right after the norm, reading its inputs; the norm's readers move to it.
            if let RResult::RErr(e) = graph.insert_after(
                value,
                name.as_str().into(),
                "example.rms_norm".into(),
                ins[..].into(),
                eps.as_str().into(),
            ) {
                return RResult::RErr(e);
            }
            replaced += 1;
        }
        let dead = graph.remove_dead_nodes();
        RResult::ROk(format!("replaced {replaced} torch_rmsnorm with example.rms_norm ({dead} nodes removed)").into())
    }
}

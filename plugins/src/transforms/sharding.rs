//! Tensor parallelism as a transform (stage `sharding`): `detect_sharding` reads the canonical
//! graph the matchers left and gives rank `rank` of `world_size` its slice, with the
//! collectives as ordinary ops. Name-blind: it finds the splits from the ops and shapes alone.
//!
//! - Attention (`torch_attention`): q, k and v come from linears (through views, transposes,
//!   RoPE and per-head norms); their weights (and biases) are split by rows in whole KV-head
//!   groups, so each rank keeps `kv_heads / world` KV heads and their query heads. The output
//!   projection (the linear the attention's output reaches through transposes and reshapes) is
//!   split by columns, its partial sums meet in an `all_reduce`, and its bias is added after.
//! - MLPs (`torch_swiglu_mlp`, `torch_mlp`): gate/up (or fc, with its bias) by rows, down (proj)
//!   by columns, an `all_reduce` after (proj's bias added after it).
//! - The LM head (a linear whose output reaches a graph output through elementwise ops, the
//!   logits' soft-cap): by vocabulary rows, an `all_gather` of the logits' last dim after it.
//!
//! - MLPs the matchers left as linears (the `quantize` stage's FP8 linears with their
//!   activation and product as separate ops): the linears whose outputs meet only through
//!   element-wise ops (`act(gate) * up`, `act(fc)`) before one linear reads them: those by
//!   rows, that one by columns, an `all_reduce` after.
//!
//! FP8 linears (`torch_quant_fp8_linear`, E4M3 weights) split as float ones: by rows with their
//! per-row weight scale (if they have one) and bias, by columns with their scales whole (the
//! input's scale and a one-value weight scale apply to every column; a per-row weight scale to
//! the output rows each rank still computes whole). NVFP4 linears likewise: E2M1 codes (two a
//! byte) and their E4M3 block scales sliced together, by rows or by columns in whole blocks of
//! 16, the global scale whole. Not split by columns: a linear quantizing each token at its own
//! scale (`quantize = "fp8"`: a rank would see only its columns' maximum).
//!
//! With fewer KV heads than ranks (`world_size` a multiple of them), each KV head stays whole on
//! the ranks whose query heads read it (its k/v rows a `.part<i>of<kv_heads>` slice). What does
//! not split evenly (query heads, the MLP width or the vocabulary not a multiple of
//! `world_size`) and what is not split above stays replicated: every rank computes it whole,
//! which is correct, only not sharded; the summary line says what was left.
//!
//! Mixture-of-experts layers (`torch_moe`): the experts spread over `ep_size` groups of ranks
//! (each group's ranks hold a contiguous share of the experts; the op's `expert_offset` says
//! where it starts), and each expert's width split over the group's `world_size / ep_size`
//! ranks like an MLP's; the partial outputs meet in an `all_reduce`.
//!
//! The token embedding is split by vocabulary rows too (`vocab_parallel_embedding`: zeros for
//! the ids of other ranks' rows, exact once the ranks' rows meet in an `all_reduce`).
//!
//! The manual override is the config's `[sharding]`: each kind of layer can be left whole
//! (`attention`, `mlp`, `moe`, `lm_head`, `embedding` = false), and `replicate` lists checkpoint
//! weight names (`*` wildcards) whose layers stay whole. The names are the user's; the detection
//! itself reads no names.

use std::sync::Arc;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::ir::{Graph, TensorMeta};
use autodeploy_core::ops::attention::ATTENTION;
use autodeploy_core::ops::binary::{ADD, MUL};
use autodeploy_core::ops::collective::Gather;
use autodeploy_core::ops::gather::{VocabSlice, EMBEDDING};
use autodeploy_core::ops::layout::{CAT, RESHAPE, SLICE, TO_DTYPE, TRANSPOSE, VIEW};
use autodeploy_core::ops::linear::{LINEAR, MLP, SWIGLU};
use autodeploy_core::ops::moe::{Moe, MOE};
use autodeploy_core::ops::norm::RMSNORM;
use autodeploy_core::ops::rope::ROPE;
use autodeploy_core::registry::TransformPlugin;
use autodeploy_core::transform::{Transform, TransformContext};
use autodeploy_core::{DType, Op, ValueId};
use autodeploy_sdk::Stage;

autodeploy_core::inventory::submit! {
    TransformPlugin {
        name: "detect_sharding",
        stage: Stage::Sharding,
        order: 10,
        enabled_by_default: true,
        options: &[],
        version: env!("CARGO_PKG_VERSION"),
        origin: "built-in",
        make: || Box::new(DetectSharding),
    }
}

pub struct DetectSharding;

/// A weight input to replace by this rank's slice: node, input index, dim, blocks, and which
/// part of how many it takes when not the rank's own of `world_size` (the KV heads of a layer
/// with fewer of them than ranks: each shared by `world / kv_heads` ranks).
struct Slice {
    node: usize,
    input: usize,
    dim: usize,
    blocks: usize,
    part: Option<(usize, usize)>,
}

/// What the graph reads between a linear and the attention it feeds (or that reads the
/// attention's output): ops that keep each head's values apart.
const PER_HEAD: &[&str] = &[VIEW, RESHAPE, TRANSPOSE, TO_DTYPE, ROPE, RMSNORM, SLICE, CAT];

/// Element-wise ops an unfused MLP's activation and product are made of (value by value, so a
/// split of their columns computes each rank's own).
const ELEMENTWISE: &[&str] = &["aten.silu", "aten.gelu", "aten.relu", "aten.sigmoid", "aten.tanh", TO_DTYPE, MUL];

#[derive(Default)]
struct Plan {
    slices: Vec<Slice>,
    /// A node whose last input (a bias) moves after its output's all_reduce.
    drop_bias: Vec<usize>,
    /// A bias input only rank 0 adds (the others read zeros): an op that cannot drop it
    /// (`torch_mlp`'s proj bias), whose partial sums then sum to the one bias.
    rank0_bias: Vec<(usize, usize)>,
    /// Partial sums to all-reduce, with the bias to add after.
    reduces: Vec<(ValueId, Option<ValueId>)>,
    /// Vocabulary slices of logits to gather along the last dim.
    gathers: Vec<ValueId>,
    /// Embeddings that become `vocab_parallel_embedding` over the rank's rows.
    embeddings: Vec<(usize, VocabSlice)>,
    /// `torch_moe` nodes given this rank's experts (`expert_offset`).
    expert_offsets: Vec<(usize, usize)>,
    attention: usize,
    mlps: usize,
    moes: usize,
    /// `replicate`: weight-name patterns whose layers stay whole.
    replicate: Vec<String>,
    heads: usize,
    left: Vec<String>,
    /// Linears already split (attention projections, MLPs, the LM head).
    planned: Vec<usize>,
}

fn is_float_param(g: &Graph, v: ValueId) -> bool {
    g.params.iter().any(|p| p.value == v) && g.meta(v).dtype.is_float()
}

/// A linear's weight: a float one, or FP8 or NVFP4 codes (a weight `detect_sharding` can slice).
fn is_linear_weight(g: &Graph, v: ValueId) -> bool {
    is_float_param(g, v)
        || (g.params.iter().any(|p| p.value == v) && [DType::F8E4M3, DType::F4E2M1].contains(&g.meta(v).dtype))
}

/// Where a linear-like node keeps what its splits slice with its weight (input 1): a scale a
/// weight row (sliced with the rows), scales along its columns (NVFP4's block scales: sliced
/// with the columns), and its bias (the last input). `aten.linear`, plain FP8 and NVFP4 linears.
#[derive(Clone, Copy)]
struct LinearIo {
    row_scale: Option<usize>,
    col_scale: Option<usize>,
    bias: Option<usize>,
}

fn linear_io(g: &Graph, n: usize) -> Option<LinearIo> {
    let node = &g.nodes[n];
    let has = |i: usize| (node.inputs.len() > i).then_some(i);
    if node.op.name == LINEAR {
        return Some(LinearIo { row_scale: None, col_scale: None, bias: has(2) });
    }
    if node.op.is_plain_nvfp4_linear() {
        return Some(LinearIo { row_scale: Some(2), col_scale: Some(2), bias: has(4) });
    }
    let (s_w, bias) = node.op.fp8_linear_inputs()?;
    let rows = static_dim(g, node.inputs[1], 0);
    let scale = g.meta(*node.inputs.get(s_w)?);
    let per_row = scale.shape.len() == 1 && rows.is_some_and(|r| r > 1) && scale.shape[0].as_static() == rows;
    Some(LinearIo { row_scale: per_row.then_some(s_w), col_scale: None, bias: has(bias) })
}

/// Why linear `n` cannot be split by columns over `world` ranks, if it cannot: an FP8 linear
/// quantizing each token at its own scale (a rank would see only its columns' maximum), an
/// NVFP4 one whose columns do not split in whole blocks of 16.
fn columns_unsplittable(g: &Graph, n: usize, world: usize) -> Option<&'static str> {
    let node = &g.nodes[n];
    if node.op.fp8_linear_of() == Some(true) {
        return Some("quantizes each token at its own scale");
    }
    let cols = static_dim(g, node.inputs[1], 1);
    if node.op.is_plain_nvfp4_linear() && !cols.is_some_and(|k| k.is_multiple_of(16 * world)) {
        return Some("has NVFP4 columns that do not split in blocks of 16");
    }
    None
}

fn static_dim(g: &Graph, v: ValueId, d: usize) -> Option<usize> {
    g.meta(v).shape.get(d).and_then(|x| x.as_static())
}

impl Plan {
    /// The first of `weights` a `replicate` pattern names, if any: its layer stays whole.
    fn pinned(&mut self, g: &Graph, what: &str, weights: &[ValueId]) -> bool {
        let names = weights.iter().filter_map(|&v| g.params.iter().find(|p| p.value == v)).map(|p| &p.weight);
        for w in names {
            if let Some(p) = self.replicate.iter().find(|p| autodeploy_core::quant::wildcard(p, w)) {
                self.left.push(format!("{what}: `{w}` matches [sharding] replicate \"{p}\""));
                return true;
            }
        }
        false
    }

    /// The linear `v` comes from through per-head ops, if it does.
    fn linear_before(g: &Graph, producers: &[Option<usize>], mut v: ValueId) -> Option<usize> {
        for _ in 0..16 {
            let n = producers[v.0 as usize]?;
            let node = &g.nodes[n];
            if linear_io(g, n).is_some() {
                return Some(n);
            }
            // A norm keeps heads apart only over each head's values (q/k norms after the view
            // into heads), not over the whole projection.
            let per_head = PER_HEAD.contains(&node.op.name)
                && (node.op.name != RMSNORM || g.meta(node.inputs[0]).shape.len() >= 4);
            if !per_head {
                return None;
            }
            v = node.inputs[0];
        }
        None
    }

    /// The linear that reads `v` through per-head ops, each the only reader of the one before.
    fn linear_after(g: &Graph, readers: &[Vec<usize>], mut v: ValueId) -> Option<usize> {
        for _ in 0..16 {
            let [n] = readers[v.0 as usize][..] else { return None };
            let node = &g.nodes[n];
            if linear_io(g, n).is_some() && node.inputs[0] == v {
                return Some(n);
            }
            if ![VIEW, RESHAPE, TRANSPOSE, TO_DTYPE].contains(&node.op.name) {
                return None;
            }
            v = node.outputs[0];
        }
        None
    }

    /// A linear's weight (and bias) split by rows: a column-parallel linear (`part`: see
    /// `Slice`).
    fn column(&mut self, g: &Graph, n: usize, blocks: usize, part: Option<(usize, usize)>) {
        let io = linear_io(g, n).expect("the callers found a linear");
        for input in std::iter::once(1).chain(io.row_scale).chain(io.bias) {
            self.slices.push(Slice { node: n, input, dim: 0, blocks, part });
        }
        self.planned.push(n);
    }

    /// A linear's weight split by columns, its output all-reduced and its bias added after.
    fn row(&mut self, g: &Graph, n: usize) {
        let io = linear_io(g, n).expect("the callers found a linear");
        for input in std::iter::once(1).chain(io.col_scale) {
            self.slices.push(Slice { node: n, input, dim: 1, blocks: 1, part: None });
        }
        let bias = io.bias.map(|i| g.nodes[n].inputs[i]);
        if bias.is_some() {
            self.drop_bias.push(n);
        }
        self.reduces.push((g.nodes[n].outputs[0], bias));
        self.planned.push(n);
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &mut self,
        g: &Graph,
        producers: &[Option<usize>],
        readers: &[Vec<usize>],
        n: usize,
        rank: usize,
        world: usize,
    ) {
        let node = &g.nodes[n];
        let name = &g.value(node.outputs[0]).name;
        let (q, k, v) = (node.inputs[0], node.inputs[1], node.inputs[2]);
        let (Some(hq), Some(hkv)) = (static_dim(g, q, 1), static_dim(g, k, 1)) else {
            self.left.push(format!("{name}: head counts not fixed"));
            return;
        };
        // Fewer KV heads than ranks: each KV head whole on the world / kv_heads ranks whose
        // query heads read it.
        let kv_part = match (hkv.is_multiple_of(world), world.is_multiple_of(hkv)) {
            _ if hq % world != 0 => None,
            (true, _) => Some(None),
            (false, true) => Some(Some((rank * hkv / world, hkv))),
            _ => None,
        };
        let Some(kv_part) = kv_part else {
            self.left.push(format!("{name}: {hq} query and {hkv} KV heads do not split over {world} ranks"));
            return;
        };
        let lins = [q, k, v].map(|x| Plan::linear_before(g, producers, x));
        let out = Plan::linear_after(g, readers, node.outputs[0]);
        let (Some(lq), Some(lk), Some(lv), Some(lo)) = (lins[0], lins[1], lins[2], out) else {
            self.left.push(format!("{name}: q/k/v or the output projection is not a float, FP8 or NVFP4 linear"));
            return;
        };
        if let Some(why) = columns_unsplittable(g, lo, world) {
            self.left.push(format!("{name}: its output projection {why}"));
            return;
        }
        let weights = [lq, lk, lv, lo].map(|l| g.nodes[l].inputs[1]);
        if !weights.iter().all(|&w| is_linear_weight(g, w)) || lq == lk || lk == lv {
            self.left.push(format!("{name}: its projections are not separate float or low-bit weights"));
            return;
        }
        if self.pinned(g, name, &weights) {
            return;
        }
        self.column(g, lq, 1, None);
        for l in [lk, lv] {
            self.column(g, l, 1, kv_part);
        }
        self.row(g, lo);
        self.attention += 1;
        self.heads = hq / world;
    }

    fn mlp(&mut self, g: &Graph, n: usize, world: usize) {
        let node = &g.nodes[n];
        let name = g.value(node.outputs[0]).name.clone();
        let ins = &node.inputs;
        // (input index, dim, blocks) of each weight, and the proj's bias if any.
        let (parts, bias): (Vec<(usize, usize, usize)>, Option<usize>) = if let Some(s) = node.op.swiglu_of() {
            if s.fused {
                (vec![(1, 0, 2), (2, 1, 1)], None)
            } else {
                (vec![(1, 0, 1), (2, 0, 1), (3, 1, 1)], None)
            }
        } else if ins.len() == 5 {
            (vec![(1, 0, 1), (3, 0, 1), (2, 1, 1)], Some(4))
        } else {
            (vec![(1, 0, 1), (2, 1, 1)], None)
        };
        let even = parts.iter().all(|&(i, d, b)| {
            is_float_param(g, ins[i]) && static_dim(g, ins[i], d).is_some_and(|n| n % (b * world) == 0)
        });
        if !even {
            self.left.push(format!("{name}: its width does not split over {world} ranks"));
            return;
        }
        if self.pinned(g, &name, &ins[1..]) {
            return;
        }
        for (i, d, b) in parts {
            self.slices.push(Slice { node: n, input: i, dim: d, blocks: b, part: None });
        }
        if let Some(i) = bias {
            self.rank0_bias.push((n, i));
        }
        self.reduces.push((node.outputs[0], None));
        self.mlps += 1;
    }

    /// An MLP the matchers left as linears: `n` a linear whose input comes only through
    /// element-wise ops (`act(gate) * up`, `act(fc)`) from linears that read one input. Those
    /// split by rows, `n` by columns, an all_reduce after.
    fn unfused_mlp(&mut self, g: &Graph, producers: &[Option<usize>], readers: &[Vec<usize>], n: usize, world: usize) {
        let node = &g.nodes[n];
        let hidden = node.inputs[0];
        if self.planned.contains(&n) || readers[hidden.0 as usize].len() != 1 || g.outputs.contains(&hidden) {
            return;
        }
        let Some(ups) = Plan::linears_into(g, producers, readers, hidden, 0) else { return };
        // The MLP's input: what every one of `ups` reads.
        let x = g.nodes[ups[0]].inputs[0];
        let mut seen = ups.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != ups.len() || ups.iter().any(|&u| g.nodes[u].inputs[0] != x || self.planned.contains(&u)) {
            return;
        }
        let name = g.value(node.outputs[0]).name.clone();
        if let Some(why) = columns_unsplittable(g, n, world) {
            self.left.push(format!("{name}: it {why}"));
            return;
        }
        let weights: Vec<ValueId> = ups.iter().chain([&n]).map(|&l| g.nodes[l].inputs[1]).collect();
        let even = ups.iter().all(|&u| static_dim(g, g.nodes[u].inputs[1], 0).is_some_and(|r| r % world == 0))
            && static_dim(g, node.inputs[1], 1).is_some_and(|c| c % world == 0);
        if !weights.iter().all(|&w| is_linear_weight(g, w)) || !even {
            self.left.push(format!("{name}: its linears' width does not split over {world} ranks"));
            return;
        }
        if self.pinned(g, &name, &weights) {
            return;
        }
        for &u in &ups {
            self.column(g, u, 1, None);
        }
        self.row(g, n);
        self.mlps += 1;
    }

    /// The linears whose outputs reach `v` through element-wise ops alone, each value on the
    /// way read only by the next op (not a graph output either) and of its shape; None where
    /// anything else does.
    fn linears_into(
        g: &Graph,
        producers: &[Option<usize>],
        readers: &[Vec<usize>],
        v: ValueId,
        depth: usize,
    ) -> Option<Vec<usize>> {
        let n = producers[v.0 as usize]?;
        if linear_io(g, n).is_some() {
            return Some(vec![n]);
        }
        let node = &g.nodes[n];
        if depth > 8 || !ELEMENTWISE.contains(&node.op.name) {
            return None;
        }
        let shape = &g.meta(node.outputs[0]).shape;
        let mut found = Vec::new();
        for &i in &node.inputs {
            if readers[i.0 as usize].len() != 1 || g.outputs.contains(&i) || &g.meta(i).shape != shape {
                return None;
            }
            found.extend(Plan::linears_into(g, producers, readers, i, depth + 1)?);
        }
        Some(found)
    }

    /// A mixture-of-experts layer: the experts spread over `ep` groups of ranks (the group's
    /// share a slice of the weights' expert dim, the op told where its experts start), each
    /// expert's width split over the `world / ep` ranks of a group (gate/up rows alike, down
    /// columns), the partial outputs all-reduced. The router stays whole on every rank.
    fn moe(&mut self, g: &Graph, n: usize, rank: usize, world: usize, ep: usize) {
        let node = &g.nodes[n];
        let name = g.value(node.outputs[0]).name.clone();
        let (gu, down) = (node.inputs[2], node.inputs[3]);
        let tp = world / ep;
        let (experts, inter) = (static_dim(g, gu, 0), static_dim(g, down, 2));
        let even = experts.is_some_and(|e| e % ep == 0) && inter.is_some_and(|i| i % tp == 0);
        if !even || !is_float_param(g, gu) || !is_float_param(g, down) {
            self.left.push(format!("{name}: its experts or their width do not split over {ep} x {tp} ranks"));
            return;
        }
        if self.pinned(g, &name, &[gu, down]) {
            return;
        }
        let (group, t) = (rank / tp, rank % tp);
        let experts = experts.unwrap_or(0);
        if ep > 1 {
            for input in [2, 3] {
                self.slices.push(Slice { node: n, input, dim: 0, blocks: 1, part: Some((group, ep)) });
            }
            self.expert_offsets.push((n, group * experts / ep));
        }
        if tp > 1 {
            self.slices.push(Slice { node: n, input: 2, dim: 1, blocks: 2, part: Some((t, tp)) });
            self.slices.push(Slice { node: n, input: 3, dim: 2, blocks: 1, part: Some((t, tp)) });
        }
        self.reduces.push((node.outputs[0], None));
        self.moes += 1;
    }

    /// A token embedding split by vocabulary rows: this rank looks up its rows (zeros for the
    /// others' ids) and the ranks' rows meet in an all_reduce.
    fn embedding(&mut self, g: &Graph, n: usize, rank: usize, world: usize) {
        let node = &g.nodes[n];
        let (w, name) = (node.inputs[0], g.value(node.outputs[0]).name.clone());
        if self.pinned(g, &name, &[w]) {
            return;
        }
        match static_dim(g, w, 0) {
            Some(vocab) if vocab % world == 0 && is_float_param(g, w) => {
                self.slices.push(Slice { node: n, input: 0, dim: 0, blocks: 1, part: None });
                self.embeddings.push((n, VocabSlice { start: rank * vocab / world, vocab }));
                self.reduces.push((node.outputs[0], None));
            }
            _ => self.left.push(format!("{name}: the vocabulary does not split over {world} ranks")),
        }
    }

    /// The linear producing graph output `o` through elementwise ops (the logits' soft-cap).
    fn lm_head(&mut self, g: &Graph, producers: &[Option<usize>], o: ValueId, world: usize) {
        let mut v = o;
        for _ in 0..8 {
            let Some(n) = producers[v.0 as usize] else { return };
            let node = &g.nodes[n];
            if linear_io(g, n).is_some() {
                let (w, name) = (node.inputs[1], g.value(node.outputs[0]).name.clone());
                // (A linear already split as part of a layer is not also the LM head.)
                if self.planned.contains(&n) || self.pinned(g, &name, &[w]) {
                    return;
                }
                match static_dim(g, w, 0) {
                    Some(vocab) if vocab % world == 0 && is_linear_weight(g, w) => {
                        self.column(g, n, 1, None);
                        self.gathers.push(node.outputs[0]);
                    }
                    _ => self.left.push(format!("{name}: the vocabulary does not split over {world} ranks")),
                }
                return;
            }
            let m = g.meta(node.outputs[0]);
            if node.inputs.is_empty() || g.meta(node.inputs[0]).shape != m.shape {
                return;
            }
            v = node.inputs[0];
        }
    }
}

impl Transform for DetectSharding {
    fn apply(&self, g: &mut Graph, cx: &TransformContext) -> Result<String> {
        let (world, rank) = (cx.config.world_size, cx.config.rank);
        if world == 1 {
            return Ok("skipped: world_size = 1".into());
        }
        let producers = g.producers();
        let mut readers = vec![Vec::new(); g.values.len()];
        for (i, n) in g.nodes.iter().enumerate() {
            for v in &n.inputs {
                readers[v.0 as usize].push(i);
            }
        }
        let over = &cx.config.sharding;
        let mut plan = Plan { replicate: over.replicate.clone(), ..Default::default() };
        let (attention, mlp, moe, embedding) = (over.attention, over.mlp, over.moe, over.embedding);
        for (n, node) in g.nodes.iter().enumerate() {
            match node.op.name {
                ATTENTION if attention => plan.attention(g, &producers, &readers, n, rank, world),
                SWIGLU | MLP if mlp => plan.mlp(g, n, world),
                MOE if moe => plan.moe(g, n, rank, world, cx.config.ep_size),
                EMBEDDING if embedding => plan.embedding(g, n, rank, world),
                _ => {}
            }
        }
        if mlp {
            // After the loop above: the attention projections are planned and left alone.
            for n in 0..g.nodes.len() {
                if linear_io(g, n).is_some() {
                    plan.unfused_mlp(g, &producers, &readers, n, world);
                }
            }
        }
        if over.lm_head {
            for o in g.outputs.clone() {
                plan.lm_head(g, &producers, o, world);
            }
        }
        let sliced = apply_plan(g, &plan, rank, world)?;
        let moe = match (plan.moes, cx.config.ep_size) {
            (0, _) => String::new(),
            (m, 1) => format!("{m} MoE (each expert split), "),
            (m, ep) => format!("{m} MoE (experts over {ep} groups), "),
        };
        let mut s = format!(
            "rank {rank} of {world}: {} attention ({} query heads each), {} MLPs, {moe}{} LM head, {} embedding split; \
             {sliced} weights sliced, {} all_reduce, {} all_gather",
            plan.attention,
            plan.heads,
            plan.mlps,
            plan.gathers.len(),
            plan.embeddings.len(),
            plan.reduces.len(),
            plan.gathers.len()
        );
        if !plan.left.is_empty() {
            s.push_str(&format!("; replicated: {}", plan.left.join("; ")));
        }
        Ok(s)
    }
}

/// Slices the weights, moves the biases, inserts the collectives and re-infers the shapes.
fn apply_plan(g: &mut Graph, plan: &Plan, rank: usize, world: usize) -> Result<usize> {
    let mut sliced = 0;
    for s in &plan.slices {
        let v = g.nodes[s.node].inputs[s.input];
        let Some(p) = g.params.iter().find(|p| p.value == v) else { continue };
        let weight = p.weight.clone();
        let (r, w) = s.part.unwrap_or((rank, world));
        let name = if s.part.is_some() { format!("{weight}.part{r}of{w}") } else { format!("{weight}.tp{r}of{w}") };
        Arc::make_mut(&mut g.weights).add_shard(&name, &weight, s.dim, s.blocks, r, w)?;
        let mut meta: TensorMeta = g.meta(v).clone();
        let full =
            meta.shape[s.dim].as_static().ok_or_else(|| Error::Msg(format!("weight `{weight}`: dynamic shape")))?;
        meta.shape[s.dim] = autodeploy_core::Dim::new(full / w);
        let nv = g.add_param(&name, meta);
        g.nodes[s.node].inputs[s.input] = nv;
        sliced += 1;
    }
    for &n in &plan.drop_bias {
        g.nodes[n].inputs.pop();
    }
    for &(n, v) in &plan.embeddings {
        g.nodes[n].op = Op::vocab_embedding(v);
    }
    for &(n, offset) in &plan.expert_offsets {
        let a = g.nodes[n].op.moe_of().ok_or_else(|| Error::Msg("a sharded MoE node lost its op".into()))?;
        g.nodes[n].op = Op::moe(Moe { expert_offset: Some(offset), ..a });
    }
    for &(n, i) in plan.rank0_bias.iter().filter(|_| rank != 0) {
        let v = g.nodes[n].inputs[i];
        let Some(p) = g.params.iter().find(|p| p.value == v) else { continue };
        let name = format!("{}.zero", p.weight);
        let meta = g.meta(v).clone();
        let shape = meta.shape.iter().map(|d| d.as_static().unwrap_or(0)).collect();
        let origin = format!("zeros: rank {rank} leaves `{}` to rank 0", p.weight);
        Arc::make_mut(&mut g.weights).add_synthetic(
            &name,
            shape,
            origin,
            autodeploy_core::weights::Synthetic::Const(0.0),
        );
        g.nodes[n].inputs[i] = g.add_param(&name, meta);
    }
    // Collectives after their producers, the latest first so earlier positions stay put.
    let producers = g.producers();
    let mut at: Vec<(usize, ValueId, Option<ValueId>, bool)> = plan
        .reduces
        .iter()
        .map(|&(v, b)| (producers[v.0 as usize].unwrap_or(0), v, b, false))
        .chain(plan.gathers.iter().map(|&v| (producers[v.0 as usize].unwrap_or(0), v, None, true)))
        .collect();
    at.sort_by_key(|a| std::cmp::Reverse(a.0));
    for (p, v, bias, gather) in at {
        let hint = g.value(v).name.clone();
        let op = if gather { Op::all_gather(Gather { dim: -1, world }) } else { Op::all_reduce() };
        let mut out = g.insert_node(p + 1, &format!("{hint}.{}", op.name), op, &[v])?;
        let mut next = p + 2;
        if let Some(b) = bias {
            out = g.insert_node(next, &format!("{hint}.bias"), Op::binary(ADD), &[out, b])?;
            next += 1;
        }
        g.replace_uses_from(v, out, next);
    }
    g.reinfer()?;
    g.dce();
    Ok(sliced)
}

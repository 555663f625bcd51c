//! The host graph behind the plugin-facing `GraphEdit` interface: what a library's transform
//! reads and rewrites, with every edit checked by the op's shape rules and the graph's order.

use std::sync::Arc;

use autodeploy_sdk::abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use autodeploy_sdk::ffi;

use crate::dtype::DType;
use crate::ir::{Graph, TensorMeta, ValueId};
use crate::shape::static_shape;

use super::host_weight;

/// Node `index` of `g` as a plugin sees it.
pub(super) fn node_info(g: &Graph, index: usize) -> ROption<ffi::NodeInfo> {
    g.nodes
        .get(index)
        .map(|n| ffi::NodeInfo {
            op: n.op.name().into(),
            attrs: n.op.attrs().into(),
            inputs: n.inputs.iter().map(|v| v.0).collect(),
            outputs: n.outputs.iter().map(|v| v.0).collect(),
        })
        .into()
}

/// Value `value` of `g` as a plugin sees it.
pub(super) fn value_info(g: &Graph, value: u32) -> ROption<ffi::ValueInfo> {
    if value as usize >= g.values.len() {
        return ROption::RNone;
    }
    let info = g.value(ValueId(value));
    let weight = g.params.iter().find(|p| p.value.0 == value).map(|p| RString::from(p.weight.as_str()));
    ROption::RSome(ffi::ValueInfo {
        name: info.name.as_str().into(),
        dtype: info.meta.dtype.to_string().into(),
        shape: info.meta.shape.iter().map(|d| d.as_static().unwrap_or(0) as u64).collect(),
        shape_text: info.meta.to_string().into(),
        weight: weight.into(),
    })
}

/// A plugin's pattern as the host's matcher: op nodes match by op name (as dumps print it),
/// inputs by name; every node reads earlier ones, the last is the output.
fn host_pattern(decl: &ffi::PatternDecl) -> Result<crate::pattern::Pattern, String> {
    use crate::pattern::PatternBuilder;
    if decl.nodes.is_empty() {
        return Err("the pattern has no nodes".into());
    }
    let mut b = PatternBuilder::new();
    let mut ids = Vec::with_capacity(decl.nodes.len());
    for (i, n) in decl.nodes.iter().enumerate() {
        if let Some(&bad) = n.inputs.iter().find(|&&j| j as usize >= i) {
            return Err(format!("node {i} ({}) reads node {bad}, which is not an earlier node", n.name));
        }
        let ins: Vec<usize> = n.inputs.iter().map(|&j| ids[j as usize]).collect();
        let name = n.name.to_string();
        let is = move |op: &crate::ops::Op, _: &mut crate::pattern::Captures| op.name() == name;
        let arity = |k: usize| -> Result<(), String> {
            if ins.len() == k {
                Ok(())
            } else {
                Err(format!("node {i} ({}) is {:?} and reads {} nodes, not {k}", n.name, n.kind, ins.len()))
            }
        };
        let id = match n.kind {
            ffi::PatternKind::Input => {
                arity(0)?;
                b.input(n.name.to_string())
            }
            ffi::PatternKind::Op => b.op(is, &ins),
            ffi::PatternKind::Commutative => {
                arity(2)?;
                b.commutative(is, ins[0], ins[1])
            }
            ffi::PatternKind::Optional => {
                arity(1)?;
                b.optional(is, ins[0])
            }
        };
        ids.push(id);
    }
    Ok(b.build(*ids.last().expect("not empty")))
}

/// The host graph behind the plugin-facing `GraphEdit` interface.
pub(super) struct HostGraph<'g> {
    pub(super) g: &'g mut Graph,
}

impl HostGraph<'_> {
    /// The output a node of `op` with `attrs` would give on `inputs` (the op's shape rules).
    fn output_meta(&self, op: &str, inputs: &[u32], attrs: &str) -> Result<TensorMeta, String> {
        let mut out = self.output_metas(op, inputs, attrs)?;
        if out.len() != 1 {
            return Err(format!("expected one output, got {}", out.len()));
        }
        Ok(out.remove(0))
    }

    fn output_metas(&self, op: &str, inputs: &[u32], attrs: &str) -> Result<Vec<TensorMeta>, String> {
        let the_op = crate::op_text::parse_op(op, attrs).map_err(|e| e.to_string())?;
        if let Some(&v) = inputs.iter().find(|&&v| !self.valid(v)) {
            return Err(format!("value {v} does not exist"));
        }
        let metas: Vec<TensorMeta> = inputs.iter().map(|&v| self.g.meta(ValueId(v)).clone()).collect();
        crate::ops::infer(&the_op, &metas).map_err(|e| e.to_string())
    }

    /// A node of `op` at position `before`, its output named after `name`: every input must be
    /// defined before that position, and the op's shape rules must accept them.
    fn insert(
        &mut self,
        what: &str,
        before: usize,
        name: &str,
        op: &str,
        inputs: &[u32],
        attrs: &str,
    ) -> Result<Vec<u32>, String> {
        let fail = |m: String| format!("{what} {op}: {m}");
        if before > self.g.nodes.len() {
            return Err(fail(format!("position {before} is past the {} nodes", self.g.nodes.len())));
        }
        let the_op = crate::op_text::parse_op(op, attrs).map_err(|e| fail(e.to_string()))?;
        // Every input must exist before `before`: a graph input, a weight, or an earlier node's output.
        let producers = self.g.producers();
        for &v in inputs {
            if !self.valid(v) {
                return Err(fail(format!("value {v} does not exist")));
            }
            if let Some(p) = producers[v as usize] {
                if p >= before {
                    return Err(fail(format!("value {v} is produced by node {p}, not before node {before}")));
                }
            }
        }
        let ins: Vec<ValueId> = inputs.iter().map(|&v| ValueId(v)).collect();
        let name = if name.trim().is_empty() { op } else { name };
        let outs = self.g.insert_node_outputs(before, name, the_op, &ins).map_err(|e| fail(e.to_string()))?;
        Ok(outs.into_iter().map(|v| v.0).collect())
    }

    /// [`HostGraph::insert`] of an op with one output.
    fn insert_one(
        &mut self,
        what: &str,
        before: usize,
        name: &str,
        op: &str,
        inputs: &[u32],
        attrs: &str,
    ) -> Result<u32, String> {
        // Checked before inserting, so a refused call leaves the graph as it was.
        let n = self.output_metas(op, inputs, attrs).map_err(|e| format!("{what} {op}: {e}"))?.len();
        if n != 1 {
            return Err(format!("{what} {op}: it has {n} outputs; insert it with insert_node_outputs"));
        }
        Ok(self.insert(what, before, name, op, inputs, attrs)?[0])
    }

    fn valid(&self, v: u32) -> bool {
        (v as usize) < self.g.values.len()
    }
    fn weight_name(&self, v: u32) -> Option<String> {
        self.g.params.iter().find(|p| p.value.0 == v).map(|p| p.weight.clone())
    }
}

impl ffi::GraphEdit for HostGraph<'_> {
    fn num_nodes(&self) -> usize {
        self.g.nodes.len()
    }

    fn node(&self, index: usize) -> ROption<ffi::NodeInfo> {
        node_info(self.g, index)
    }

    fn find_nodes(&self, op: RStr<'_>) -> RVec<usize> {
        self.g.nodes.iter().enumerate().filter(|(_, n)| n.op.name() == op.as_str()).map(|(i, _)| i).collect()
    }

    fn value(&self, value: u32) -> ROption<ffi::ValueInfo> {
        value_info(self.g, value)
    }

    fn users(&self, value: u32) -> RVec<usize> {
        self.g.nodes.iter().enumerate().filter(|(_, n)| n.inputs.contains(&ValueId(value))).map(|(i, _)| i).collect()
    }

    fn is_output(&self, value: u32) -> bool {
        self.g.outputs.contains(&ValueId(value))
    }

    fn read_weight(&self, value: u32) -> RResult<ffi::HostTensor, RString> {
        let Some(name) = self.weight_name(value) else {
            return RResult::RErr(format!("value {value} is not a weight").into());
        };
        match self.g.weights.load(&name, DType::F32) {
            Ok(t) => RResult::ROk(ffi::HostTensor {
                shape: t.shape().iter().map(|&n| n as u64).collect(),
                data: t.to_f32().into_owned().into(),
            }),
            Err(e) => RResult::RErr(format!("reading weight `{name}`: {e}").into()),
        }
    }

    fn add_weight(&mut self, name: RStr<'_>, dtype: RStr<'_>, tensor: ffi::HostTensor) -> RResult<u32, RString> {
        if self.g.weights.contains(name.as_str()) {
            return RResult::RErr(format!("add_weight: a weight named `{name}` exists").into());
        }
        let (dt, shape, t) = match host_weight(name.as_str(), dtype.as_str(), tensor) {
            Ok(w) => w,
            Err(e) => return RResult::RErr(format!("add_weight {e}").into()),
        };
        Arc::make_mut(&mut self.g.weights).add_tensor(name.as_str(), t);
        let v = self.g.add_param(name.as_str(), TensorMeta { dtype: dt, shape: static_shape(&shape) });
        RResult::ROk(v.0)
    }

    fn set_input(&mut self, node: usize, slot: usize, value: u32) -> RResult<(), RString> {
        if !self.valid(value) {
            return RResult::RErr(format!("set_input: value {value} does not exist").into());
        }
        let Some(n) = self.g.nodes.get(node) else {
            return RResult::RErr(format!("set_input: node {node} does not exist").into());
        };
        if slot >= n.inputs.len() {
            return RResult::RErr(
                format!("set_input: node {node} ({}) has {} inputs", n.op.name(), n.inputs.len()).into(),
            );
        }
        // The new input must give the node the same output types (the op's shape rules).
        let mut ins: Vec<TensorMeta> = n.inputs.iter().map(|&v| self.g.meta(v).clone()).collect();
        ins[slot] = self.g.meta(ValueId(value)).clone();
        let want: Vec<TensorMeta> = n.outputs.iter().map(|&v| self.g.meta(v).clone()).collect();
        match crate::ops::infer(&n.op, &ins) {
            Ok(got) if got == want => {}
            Ok(got) => {
                let g: Vec<String> = got.iter().map(|m| m.to_string()).collect();
                let w: Vec<String> = want.iter().map(|m| m.to_string()).collect();
                return RResult::RErr(
                    format!("set_input: node {node} ({}) would produce {g:?} instead of {w:?}", n.op.name()).into(),
                );
            }
            Err(e) => return RResult::RErr(format!("set_input: node {node} ({}): {e}", n.op.name()).into()),
        }
        self.g.nodes[node].inputs[slot] = ValueId(value);
        RResult::ROk(())
    }

    fn insert_node(
        &mut self,
        before: usize,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString> {
        self.insert_one("insert_node", before, op.as_str(), op.as_str(), &inputs, attrs.as_str())
            .map_err(RString::from)
            .into()
    }

    fn insert_node_named(
        &mut self,
        before: usize,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString> {
        self.insert_one("insert_node_named", before, name.as_str(), op.as_str(), &inputs, attrs.as_str())
            .map_err(RString::from)
            .into()
    }

    fn insert_node_outputs(
        &mut self,
        before: usize,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<RVec<u32>, RString> {
        self.insert("insert_node_outputs", before, name.as_str(), op.as_str(), &inputs, attrs.as_str())
            .map(RVec::from)
            .map_err(RString::from)
            .into()
    }

    fn insert_after(
        &mut self,
        value: u32,
        name: RStr<'_>,
        op: RStr<'_>,
        inputs: RSlice<'_, u32>,
        attrs: RStr<'_>,
    ) -> RResult<u32, RString> {
        let fail = |m: String| RResult::RErr(format!("insert_after {op}: {m}").into());
        if !self.valid(value) {
            return fail(format!("value {value} does not exist"));
        }
        let at = self.g.producers()[value as usize].map_or(0, |p| p + 1);
        // The new output must fit every reader `value` had: its dtype and shape.
        let want = self.g.meta(ValueId(value)).clone();
        match self.output_meta(op.as_str(), &inputs, attrs.as_str()) {
            Ok(got) if got == want => {}
            Ok(got) => return fail(format!("its output {got} differs from value {value}'s {want}")),
            Err(e) => return fail(e),
        }
        let readers: Vec<usize> = self
            .g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.contains(&ValueId(value)))
            .map(|(i, _)| i)
            .collect();
        let new = match self.insert_one("insert_after", at, name.as_str(), op.as_str(), &inputs, attrs.as_str()) {
            Ok(v) => v,
            Err(e) => return RResult::RErr(e.into()),
        };
        // Readers sat at or after `at`; the insertion moved each one place on.
        for i in readers {
            for input in &mut self.g.nodes[i + 1].inputs {
                if *input == ValueId(value) {
                    *input = ValueId(new);
                }
            }
        }
        for o in &mut self.g.outputs {
            if *o == ValueId(value) {
                *o = ValueId(new);
            }
        }
        RResult::ROk(new)
    }

    fn outputs(&self) -> RVec<u32> {
        self.g.outputs.iter().map(|v| v.0).collect()
    }

    fn set_output(&mut self, index: usize, value: u32) -> RResult<(), RString> {
        if !self.valid(value) {
            return RResult::RErr(format!("set_output: value {value} does not exist").into());
        }
        let n = self.g.outputs.len();
        match index.cmp(&n) {
            std::cmp::Ordering::Less => self.g.outputs[index] = ValueId(value),
            std::cmp::Ordering::Equal => self.g.outputs.push(ValueId(value)),
            std::cmp::Ordering::Greater => {
                return RResult::RErr(format!("set_output: index {index} is past the {n} outputs").into())
            }
        }
        RResult::ROk(())
    }

    fn find_pattern(&self, pattern: &ffi::PatternDecl) -> RResult<RVec<ffi::PatternMatch>, RString> {
        let p = match host_pattern(pattern) {
            Ok(p) => p,
            Err(e) => return RResult::RErr(format!("find_pattern: {e}").into()),
        };
        let matches = p
            .find_all(self.g)
            .into_iter()
            .map(|m| {
                let mut inputs: Vec<ffi::PatternBinding> = m
                    .inputs
                    .iter()
                    .map(|(name, v)| ffi::PatternBinding { name: name.as_str().into(), value: v.0 })
                    .collect();
                inputs.sort_by(|a, b| a.name.cmp(&b.name));
                ffi::PatternMatch { inputs: inputs.into(), nodes: m.nodes.into_iter().collect(), output: m.output.0 }
            })
            .collect();
        RResult::ROk(matches)
    }

    fn replace_uses(&mut self, old: u32, new: u32) -> RResult<(), RString> {
        if !self.valid(old) || !self.valid(new) {
            return RResult::RErr(format!("replace_uses: value {old} or {new} does not exist").into());
        }
        let (a, b) = (self.g.meta(ValueId(old)), self.g.meta(ValueId(new)));
        if a != b {
            return RResult::RErr(format!("replace_uses: {a} and {b} differ").into());
        }
        // A reader of `old` placed before `new`'s producer would break the order.
        let producers = self.g.producers();
        if let Some(p) = producers[new as usize] {
            if let Some(first) = self.g.nodes.iter().position(|n| n.inputs.contains(&ValueId(old))) {
                if first <= p {
                    return RResult::RErr(
                        format!("replace_uses: node {first} reads value {old} before node {p} computes {new}").into(),
                    );
                }
            }
        }
        self.g.replace_uses(ValueId(old), ValueId(new));
        RResult::ROk(())
    }

    fn remove_dead_nodes(&mut self) -> usize {
        self.g.dce()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::GraphBuilder;
    use crate::ops::binary::MUL;
    use crate::DType;
    use ffi::GraphEdit;

    /// `insert_node` takes built-in ops by their dump spelling, runs their shape rules, and
    /// refuses bad attribute text naming the op.
    #[test]
    fn insert_node_takes_built_in_ops_by_name() {
        let mut b = GraphBuilder::new(Arc::new(crate::weights::WeightStore::new("test")));
        let x = b.input("x", DType::F32, static_shape(&[2, 6]));
        let y = b.op("y", crate::ops::Op::unary("aten.neg"), &[x]).unwrap();
        b.output(y);
        let mut g = b.finish().unwrap();
        let mut host = HostGraph { g: &mut g };
        let v = host.insert_node(1, "aten.slice.Tensor".into(), [x.0][..].into(), "dim=-1, start=0, end=4".into());
        let v = v.into_result().unwrap();
        assert_eq!(host.value(v).unwrap().shape_text.as_str(), "f32[2, 4]");
        let h = host.insert_node(2, "aten.mul.Scalar".into(), [v][..].into(), "0.5".into()).into_result().unwrap();
        assert_eq!(host.node(2).unwrap().op.as_str(), "aten.mul.Scalar");
        assert_eq!(host.node(2).unwrap().attrs.as_str(), "0.5");
        assert_eq!(host.value(h).unwrap().shape_text.as_str(), "f32[2, 4]");
        let e = host.insert_node(0, "aten.cat".into(), [x.0][..].into(), "axis=1".into()).into_result().unwrap_err();
        assert!(e.contains("aten.cat") && e.contains("`dim` is missing"), "{e}");
        // The op's shape rules run: a transpose of a dim the input lacks is refused.
        let e = host
            .insert_node(0, "aten.transpose.int".into(), [x.0][..].into(), "0, 5".into())
            .into_result()
            .unwrap_err();
        assert!(e.contains("dim 5 out of range"), "{e}");
    }

    /// An op with two outputs goes in through `insert_node_outputs` (each output named, in the
    /// op's order); `insert_node` refuses it, leaving the graph as it was.
    #[test]
    fn ops_with_several_outputs_insert_through_insert_node_outputs() {
        let mut b = GraphBuilder::new(Arc::new(crate::weights::WeightStore::new("test")));
        let x = b.input("x", DType::F32, static_shape(&[2, 6]));
        let r = b.input("r", DType::F32, static_shape(&[2, 6]));
        let w = b.input("w", DType::F32, static_shape(&[6]));
        let y = b.op("y", crate::ops::Op::unary("aten.neg"), &[x]).unwrap();
        b.output(y);
        let mut g = b.finish().unwrap();
        let mut host = HostGraph { g: &mut g };
        let (op, attrs) = ("fused_add_rmsnorm", "eps=1e-6, norm_dtype=f32");
        let e = host.insert_node(0, op.into(), [x.0, r.0, w.0][..].into(), attrs.into()).into_result().unwrap_err();
        assert!(e.contains("it has 2 outputs; insert it with insert_node_outputs"), "{e}");
        assert_eq!(host.num_nodes(), 1);
        let vs = host
            .insert_node_outputs(0, "n".into(), op.into(), [x.0, r.0, w.0][..].into(), attrs.into())
            .into_result()
            .unwrap();
        assert_eq!(vs.len(), 2);
        let names: Vec<String> = vs.iter().map(|&v| host.value(v).unwrap().name.to_string()).collect();
        assert_eq!(names, ["n", "n.1"]);
        assert_eq!(host.node(0).unwrap().outputs.as_slice(), vs.as_slice());
        g.validate().unwrap();
    }

    /// `insert_after` puts a node between a value and its readers (nodes and outputs), names
    /// it, and refuses an output of another shape; `set_output` replaces or appends outputs.
    #[test]
    fn insert_after_moves_the_readers_and_set_output_sets_outputs() {
        let mut b = GraphBuilder::new(Arc::new(crate::weights::WeightStore::new("test")));
        let x = b.input("x", DType::F32, static_shape(&[2, 6]));
        let y = b.op("y", crate::ops::Op::unary("aten.neg"), &[x]).unwrap();
        let z = b.op("z", crate::ops::Op::unary("aten.silu"), &[y]).unwrap();
        b.output(y);
        b.output(z);
        let mut g = b.finish().unwrap();
        let mut host = HostGraph { g: &mut g };
        let h = host
            .insert_after(y.0, "y.half".into(), "aten.mul.Scalar".into(), [y.0][..].into(), "0.5".into())
            .into_result()
            .unwrap();
        assert_eq!(host.value(h).unwrap().name.as_str(), "y.half");
        assert_eq!(host.node(1).unwrap().op.as_str(), "aten.mul.Scalar", "right after y's node");
        assert_eq!(host.node(1).unwrap().inputs.as_slice(), &[y.0], "it still reads y");
        assert_eq!(host.node(2).unwrap().inputs.as_slice(), &[h], "y's reader moved");
        assert_eq!(host.outputs().as_slice(), &[h, z.0], "the output moved");
        // After a graph input: at the start.
        let n =
            host.insert_after(x.0, "".into(), "aten.neg".into(), [x.0][..].into(), "".into()).into_result().unwrap();
        assert_eq!(host.node(0).unwrap().outputs.as_slice(), &[n]);
        assert_eq!(host.node(1).unwrap().inputs.as_slice(), &[n]);
        // An output of another shape cannot take the readers.
        let e = host
            .insert_after(
                z.0,
                "s".into(),
                "aten.slice.Tensor".into(),
                [z.0][..].into(),
                "dim=-1, start=0, end=4".into(),
            )
            .into_result()
            .unwrap_err();
        assert!(e.contains("insert_after aten.slice.Tensor") && e.contains("f32[2, 4] differs"), "{e}");
        let named = host
            .insert_node_named(4, "my.neg".into(), "aten.neg".into(), [z.0][..].into(), "".into())
            .into_result()
            .unwrap();
        assert_eq!(host.value(named).unwrap().name.as_str(), "my.neg");
        host.set_output(0, named).into_result().unwrap();
        host.set_output(2, y.0).into_result().unwrap();
        assert_eq!(host.outputs().as_slice(), &[named, z.0, y.0]);
        assert!(host.set_output(4, y.0).into_result().unwrap_err().contains("index 4 is past the 3 outputs"));
        assert!(host.set_output(0, 999).into_result().unwrap_err().contains("value 999 does not exist"));
        assert!(g.validate().is_ok());
    }

    /// `find_pattern` runs the host's matcher on a plugin's pattern: commutative inputs in
    /// either order, optional casts present or not, the same input name the same value.
    #[test]
    fn find_pattern_matches_like_the_host_matcher() {
        use crate::ops::Op;
        let mut b = GraphBuilder::new(Arc::new(crate::weights::WeightStore::new("test")));
        let x = b.input("x", DType::F32, static_shape(&[4]));
        let w = b.input("w", DType::F32, static_shape(&[4]));
        let m1 = b.op("m1", Op::binary(MUL), &[x, w]).unwrap(); // x * w
        let m2 = b.op("m2", Op::binary(MUL), &[w, x]).unwrap(); // w * x: commutative
        let c = b.op("c", Op::to_dtype(DType::F32), &[x]).unwrap();
        let m3 = b.op("m3", Op::binary(MUL), &[c, w]).unwrap(); // cast(x) * w: optional cast
        let sq = b.op("sq", Op::binary(MUL), &[x, x]).unwrap(); // x * x: binds "a" and "b" to one value
        for v in [m1, m2, m3, sq] {
            b.output(v);
        }
        let mut g = b.finish().unwrap();
        let host = HostGraph { g: &mut g };
        let mut p = ffi::PatternDecl::new();
        let (a, bb) = (p.input("a"), p.input("b"));
        let a_cast = p.optional("aten._to_copy", a);
        p.commutative("aten.mul.Tensor", a_cast, bb);
        let found = host.find_pattern(&p).into_result().unwrap();
        let outs: Vec<u32> = found.iter().map(|m| m.output).collect();
        assert_eq!(outs, vec![m1.0, m2.0, m3.0, sq.0]);
        assert_eq!((found[2].input("a"), found[2].input("b")), (Some(x.0), Some(w.0)), "through the cast");
        assert_eq!(found[2].nodes.len(), 2, "the cast and the mul");
        // Distinct names must bind distinct roles but may bind one value (x * x).
        let mut same = ffi::PatternDecl::new();
        let s = same.input("s");
        same.op("aten.mul.Tensor", &[s, s]);
        let found = host.find_pattern(&same).into_result().unwrap();
        assert_eq!(found.iter().map(|m| m.output).collect::<Vec<_>>(), vec![sq.0]);
        // Malformed patterns are refused with the node at fault.
        let mut bad = ffi::PatternDecl::new();
        bad.op("aten.neg", &[3]);
        let e = host.find_pattern(&bad).into_result().unwrap_err();
        assert!(e.contains("node 0 (aten.neg) reads node 3, which is not an earlier node"), "{e}");
        let e = host.find_pattern(&ffi::PatternDecl::new()).into_result().unwrap_err();
        assert!(e.contains("the pattern has no nodes"), "{e}");
    }
}

//! The graph IR: SSA values with dtype and symbolic shape, nodes in topological order, weights
//! referenced by name (loaded lazily from the [`WeightStore`]).

use std::collections::{BTreeMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::Arc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{infer, Op};
use crate::shape::{fmt_shape, Shape, SymRange};
use crate::weights::WeightStore;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

#[derive(Clone, Debug, PartialEq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Shape,
}

impl fmt::Display for TensorMeta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, fmt_shape(&self.shape))
    }
}

#[derive(Clone, Debug)]
pub struct ValueInfo {
    pub name: String,
    pub meta: TensorMeta,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<ValueId>,
    pub outputs: Vec<ValueId>,
}

/// A graph parameter: a value whose contents come from the weight store under `weight`.
#[derive(Clone, Debug)]
pub struct Param {
    pub value: ValueId,
    pub weight: String,
}

#[derive(Clone)]
pub struct Graph {
    pub values: Vec<ValueInfo>,
    pub inputs: Vec<ValueId>,
    pub params: Vec<Param>,
    pub nodes: Vec<Node>,
    pub outputs: Vec<ValueId>,
    /// Range constraints of the symbolic dimensions.
    pub symbols: BTreeMap<String, SymRange>,
    pub weights: Arc<WeightStore>,
    /// What each stage and transform did, in order.
    pub history: Vec<String>,
}

impl Graph {
    pub fn value(&self, v: ValueId) -> &ValueInfo {
        &self.values[v.0 as usize]
    }

    pub fn meta(&self, v: ValueId) -> &TensorMeta {
        &self.values[v.0 as usize].meta
    }

    /// Checks the invariants: every value is defined once before use, params and inputs are
    /// distinct, and each node's recorded output metadata equals what its op infers.
    pub fn validate(&self) -> Result<()> {
        let mut defined: HashSet<ValueId> = HashSet::new();
        let define = |defined: &mut HashSet<ValueId>, v: ValueId, what: &str| -> Result<()> {
            if v.0 as usize >= self.values.len() {
                return Err(Error::Msg(format!("{what}: value %{} does not exist", v.0)));
            }
            if !defined.insert(v) {
                return Err(Error::Msg(format!("{what}: value %{} defined twice", self.value(v).name)));
            }
            Ok(())
        };
        for &v in &self.inputs {
            define(&mut defined, v, "graph input")?;
        }
        for p in &self.params {
            define(&mut defined, p.value, "param")?;
        }
        for n in &self.nodes {
            let name = n.outputs.first().map(|&v| self.value(v).name.clone()).unwrap_or_default();
            for &i in &n.inputs {
                if !defined.contains(&i) {
                    return Err(Error::Shape {
                        op: n.op.name().into(),
                        node: name,
                        msg: format!("input %{} is used before it is defined", self.value(i).name),
                    });
                }
            }
            let metas: Vec<TensorMeta> = n.inputs.iter().map(|&i| self.meta(i).clone()).collect();
            let out = infer(&n.op, &metas).map_err(|e| e.at_node(&name))?;
            if out.len() != n.outputs.len() {
                return Err(Error::Shape {
                    op: n.op.name().into(),
                    node: name,
                    msg: format!("op gives {} outputs, node lists {}", out.len(), n.outputs.len()),
                });
            }
            for (m, &o) in out.iter().zip(&n.outputs) {
                if m != self.meta(o) {
                    return Err(Error::Shape {
                        op: n.op.name().into(),
                        node: name,
                        msg: format!("recorded {} but the op infers {m}", self.meta(o)),
                    });
                }
                define(&mut defined, o, "node output")?;
            }
        }
        for &o in &self.outputs {
            if !defined.contains(&o) {
                return Err(Error::Msg(format!("graph output %{} is never defined", self.value(o).name)));
            }
        }
        Ok(())
    }

    /// Readable text form: inputs, symbol ranges, weights, one line per node, outputs.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let sig: Vec<String> =
            self.inputs.iter().map(|&v| format!("%{}: {}", self.value(v).name, self.meta(v))).collect();
        let _ = writeln!(s, "graph({}) {{", sig.join(", "));
        if !self.symbols.is_empty() {
            let syms: Vec<String> =
                self.symbols.iter().map(|(k, r)| format!("{k} in [{}, {}]", r.min, r.max)).collect();
            let _ = writeln!(s, "  # symbols: {}", syms.join(", "));
        }
        let _ = writeln!(s, "  # weights: {} tensors from {}", self.params.len(), self.weights.describe());
        for p in &self.params {
            let v = self.value(p.value);
            if v.name == p.weight {
                let _ = writeln!(s, "  %{}: {} = weight", v.name, v.meta);
            } else {
                let _ = writeln!(s, "  %{}: {} = weight \"{}\"", v.name, v.meta, p.weight);
            }
        }
        for n in &self.nodes {
            let outs: Vec<String> =
                n.outputs.iter().map(|&v| format!("%{}: {}", self.value(v).name, self.meta(v))).collect();
            let ins: Vec<String> = n.inputs.iter().map(|&v| format!("%{}", self.value(v).name)).collect();
            let attrs = n.op.attrs();
            let args = if attrs.is_empty() { ins.join(", ") } else { [ins.join(", "), attrs].join(", ") };
            let _ = writeln!(s, "  {} = {}({})", outs.join(", "), n.op.name(), args);
        }
        let outs: Vec<String> = self.outputs.iter().map(|&v| format!("%{}", self.value(v).name)).collect();
        let _ = writeln!(s, "  return {}", outs.join(", "));
        s.push_str("}\n");
        s
    }

    /// Count of nodes per op name, for summaries and tests.
    pub fn op_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for n in &self.nodes {
            *m.entry(n.op.name()).or_insert(0) += 1;
        }
        m
    }
}

/// Builds a graph node by node, inferring each output's dtype and shape as it goes.
pub struct GraphBuilder {
    g: Graph,
    names: HashSet<String>,
}

impl GraphBuilder {
    pub fn new(weights: Arc<WeightStore>) -> GraphBuilder {
        GraphBuilder {
            g: Graph {
                values: Vec::new(),
                inputs: Vec::new(),
                params: Vec::new(),
                nodes: Vec::new(),
                outputs: Vec::new(),
                symbols: BTreeMap::new(),
                weights,
                history: Vec::new(),
            },
            names: HashSet::new(),
        }
    }

    fn fresh(&mut self, hint: &str, meta: TensorMeta) -> ValueId {
        let mut name = hint.to_string();
        let mut k = 1;
        while self.names.contains(&name) {
            name = format!("{hint}_{k}");
            k += 1;
        }
        self.names.insert(name.clone());
        let id = ValueId(self.g.values.len() as u32);
        self.g.values.push(ValueInfo { name, meta });
        id
    }

    pub fn symbol(&mut self, name: &str, min: usize, max: usize) {
        self.g.symbols.insert(name.to_string(), SymRange { min, max });
    }

    pub fn input(&mut self, name: &str, dtype: DType, shape: Shape) -> ValueId {
        let v = self.fresh(name, TensorMeta { dtype, shape });
        self.g.inputs.push(v);
        v
    }

    /// A weight of the given dtype and shape; the store converts what the file holds.
    pub fn param(&mut self, weight: &str, dtype: DType, shape: Shape) -> ValueId {
        if let Some(p) = self.g.params.iter().find(|p| p.weight == weight) {
            return p.value;
        }
        let v = self.fresh(weight, TensorMeta { dtype, shape });
        self.g.params.push(Param { value: v, weight: weight.to_string() });
        v
    }

    /// Adds `op(inputs)` with one output named after `hint`.
    pub fn op(&mut self, hint: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.g.meta(i).clone()).collect();
        let mut out = infer(&op, &metas).map_err(|e| e.at_node(hint))?;
        if out.len() != 1 {
            return Err(Error::op(op.name(), format!("expected one output, got {}", out.len())));
        }
        let v = self.fresh(hint, out.remove(0));
        self.g.nodes.push(Node { op, inputs: inputs.to_vec(), outputs: vec![v] });
        Ok(v)
    }

    pub fn meta(&self, v: ValueId) -> &TensorMeta {
        self.g.meta(v)
    }

    /// The graph so far.
    pub fn graph(&self) -> &Graph {
        &self.g
    }

    /// The weight store, while nothing else shares it (an importer adding tensors as it builds).
    pub fn weights_mut(&mut self) -> Option<&mut WeightStore> {
        Arc::get_mut(&mut self.g.weights)
    }

    pub fn output(&mut self, v: ValueId) {
        self.g.outputs.push(v);
    }

    pub fn note(&mut self, entry: String) {
        self.g.history.push(entry);
    }

    pub fn finish(self) -> Result<Graph> {
        self.g.validate()?;
        Ok(self.g)
    }
}

/// Rewriting: insert nodes, redirect uses, drop dead code.
impl Graph {
    /// `hint`, or `hint_k` past every `k` already used: one scan of the names, without
    /// building a set or trying suffixes one by one (a rewrite of thousands of layers inserts
    /// thousands of nodes with one hint).
    fn unique_name(&self, hint: &str) -> String {
        let mut taken = false;
        let mut last = 0u64;
        for v in &self.values {
            let Some(rest) = v.name.strip_prefix(hint) else { continue };
            if rest.is_empty() {
                taken = true;
            } else if let Some(k) = rest.strip_prefix('_').and_then(|k| k.parse::<u64>().ok()) {
                last = last.max(k);
            }
        }
        if !taken {
            return hint.to_string();
        }
        format!("{hint}_{}", last + 1)
    }

    /// Index of the node that defines `v`, if a node does.
    pub fn producer(&self, v: ValueId) -> Option<usize> {
        self.nodes.iter().position(|n| n.outputs.contains(&v))
    }

    /// Map from value to defining node index, for passes that look up many producers.
    pub fn producers(&self) -> Vec<Option<usize>> {
        let mut p = vec![None; self.values.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for o in &n.outputs {
                p[o.0 as usize] = Some(i);
            }
        }
        p
    }

    /// Number of nodes reading each value (graph outputs count as a use).
    pub fn use_counts(&self) -> Vec<usize> {
        let mut c = vec![0; self.values.len()];
        for n in &self.nodes {
            for i in &n.inputs {
                c[i.0 as usize] += 1;
            }
        }
        for o in &self.outputs {
            c[o.0 as usize] += 1;
        }
        c
    }

    /// Inserts `op(inputs)` as node `pos`, inferring its output; returns the output value.
    pub fn insert_node(&mut self, pos: usize, hint: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.meta(i).clone()).collect();
        let n = infer(&op, &metas).map_err(|e| e.at_node(hint))?.len();
        if n != 1 {
            return Err(Error::op(op.name(), format!("has {n} outputs: insert it with insert_node_outputs")));
        }
        Ok(self.insert_node_outputs(pos, hint, op, inputs)?[0])
    }

    /// Inserts `op(inputs)` as node `pos`, inferring its outputs; returns them in the op's
    /// order, the first named after `hint`, the others `hint.1`, `hint.2`, ...
    pub fn insert_node_outputs(&mut self, pos: usize, hint: &str, op: Op, inputs: &[ValueId]) -> Result<Vec<ValueId>> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.meta(i).clone()).collect();
        let out = infer(&op, &metas).map_err(|e| e.at_node(hint))?;
        let mut vs = Vec::with_capacity(out.len());
        for (k, meta) in out.into_iter().enumerate() {
            let name = self.unique_name(&if k == 0 { hint.to_string() } else { format!("{hint}.{k}") });
            let v = ValueId(self.values.len() as u32);
            self.values.push(ValueInfo { name, meta });
            vs.push(v);
        }
        self.nodes.insert(pos, Node { op, inputs: inputs.to_vec(), outputs: vs.clone() });
        Ok(vs)
    }

    /// Fixes symbol `name` to `n` everywhere: value shapes and size arguments of ops.
    pub fn specialize(&mut self, name: &str, n: usize) {
        for v in &mut self.values {
            for d in &mut v.meta.shape {
                *d = d.substitute(name, n);
            }
        }
        for node in &mut self.nodes {
            let op = &mut node.op;
            let map = crate::registry::custom_op(op.name).and_then(|c| c.sizes);
            // The text came from the op's own printer, so it reads back.
            if let Some(Ok(t)) = map.map(|m| m(&op.attrs, &mut |d| Ok(d.substitute(name, n)))) {
                op.attrs = t;
            }
        }
        self.symbols.remove(name);
    }

    /// Appends a graph input.
    pub fn add_input(&mut self, name: &str, meta: TensorMeta) -> ValueId {
        let name = self.unique_name(name);
        let v = ValueId(self.values.len() as u32);
        self.values.push(ValueInfo { name, meta });
        self.inputs.push(v);
        v
    }

    /// Adds a weight parameter backed by the store entry `weight`.
    pub fn add_param(&mut self, weight: &str, meta: TensorMeta) -> ValueId {
        if let Some(p) = self.params.iter().find(|p| p.weight == weight) {
            return p.value;
        }
        let name = self.unique_name(weight);
        let v = ValueId(self.values.len() as u32);
        self.values.push(ValueInfo { name, meta });
        self.params.push(Param { value: v, weight: weight.to_string() });
        v
    }

    /// Makes every reader of `old` (nodes and graph outputs) read `new` instead.
    pub fn replace_uses(&mut self, old: ValueId, new: ValueId) {
        for n in &mut self.nodes {
            for i in &mut n.inputs {
                if *i == old {
                    *i = new;
                }
            }
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Recomputes every node's output dtype and shape from its inputs' (after a transform
    /// changed a weight's shape: a rank's slice of it); the error names the node whose op no
    /// longer fits its inputs.
    pub fn reinfer(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let name = n.outputs.first().map(|&v| self.value(v).name.clone()).unwrap_or_default();
            let metas: Vec<TensorMeta> = n.inputs.iter().map(|&v| self.meta(v).clone()).collect();
            let out = infer(&n.op, &metas).map_err(|e| e.at_node(&name))?;
            let outputs = n.outputs.clone();
            for (m, o) in out.into_iter().zip(outputs) {
                self.values[o.0 as usize].meta = m;
            }
        }
        Ok(())
    }

    /// Makes the readers of `old` in nodes `from..` and the graph outputs read `new` instead
    /// (a node inserted at `from - 1` keeps reading `old`).
    pub fn replace_uses_from(&mut self, old: ValueId, new: ValueId, from: usize) {
        for n in self.nodes.iter_mut().skip(from) {
            for i in &mut n.inputs {
                if *i == old {
                    *i = new;
                }
            }
        }
        for o in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes nodes and params whose results nobody reads. Returns how many nodes went.
    pub fn dce(&mut self) -> usize {
        let before = self.nodes.len();
        let mut used = vec![false; self.values.len()];
        for o in &self.outputs {
            used[o.0 as usize] = true;
        }
        let mut keep = vec![false; self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate().rev() {
            if n.outputs.iter().any(|o| used[o.0 as usize]) {
                keep[i] = true;
                for x in &n.inputs {
                    used[x.0 as usize] = true;
                }
            }
        }
        let mut k = keep.into_iter();
        self.nodes.retain(|_| k.next().unwrap_or(false));
        self.params.retain(|p| used[p.value.0 as usize]);
        before - self.nodes.len()
    }
}

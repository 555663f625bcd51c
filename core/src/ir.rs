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

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
                return Err(Error::Msg(format!(
                    "{what}: value %{} defined twice",
                    self.value(v).name
                )));
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
            let name = n
                .outputs
                .first()
                .map(|&v| self.value(v).name.clone())
                .unwrap_or_default();
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
                    msg: format!(
                        "op gives {} outputs, node lists {}",
                        out.len(),
                        n.outputs.len()
                    ),
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
                return Err(Error::Msg(format!(
                    "graph output %{} is never defined",
                    self.value(o).name
                )));
            }
        }
        Ok(())
    }

    /// Readable text form: inputs, symbol ranges, weights, one line per node, outputs.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let sig: Vec<String> = self
            .inputs
            .iter()
            .map(|&v| format!("%{}: {}", self.value(v).name, self.meta(v)))
            .collect();
        let _ = writeln!(s, "graph({}) {{", sig.join(", "));
        if !self.symbols.is_empty() {
            let syms: Vec<String> = self
                .symbols
                .iter()
                .map(|(k, r)| format!("{k} in [{}, {}]", r.min, r.max))
                .collect();
            let _ = writeln!(s, "  # symbols: {}", syms.join(", "));
        }
        let _ = writeln!(
            s,
            "  # weights: {} tensors from {}",
            self.params.len(),
            self.weights.describe()
        );
        for p in &self.params {
            let v = self.value(p.value);
            if v.name == p.weight {
                let _ = writeln!(s, "  %{}: {} = weight", v.name, v.meta);
            } else {
                let _ = writeln!(s, "  %{}: {} = weight \"{}\"", v.name, v.meta, p.weight);
            }
        }
        for n in &self.nodes {
            let outs: Vec<String> = n
                .outputs
                .iter()
                .map(|&v| format!("%{}: {}", self.value(v).name, self.meta(v)))
                .collect();
            let ins: Vec<String> = n
                .inputs
                .iter()
                .map(|&v| format!("%{}", self.value(v).name))
                .collect();
            let attrs = n.op.attrs();
            let args = if attrs.is_empty() {
                ins.join(", ")
            } else {
                [ins.join(", "), attrs].join(", ")
            };
            let _ = writeln!(s, "  {} = {}({})", outs.join(", "), n.op.name(), args);
        }
        let outs: Vec<String> = self
            .outputs
            .iter()
            .map(|&v| format!("%{}", self.value(v).name))
            .collect();
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
        self.g
            .symbols
            .insert(name.to_string(), SymRange { min, max });
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
        self.g.params.push(Param {
            value: v,
            weight: weight.to_string(),
        });
        v
    }

    /// Adds `op(inputs)` with one output named after `hint`.
    pub fn op(&mut self, hint: &str, op: Op, inputs: &[ValueId]) -> Result<ValueId> {
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.g.meta(i).clone()).collect();
        let mut out = infer(&op, &metas).map_err(|e| e.at_node(hint))?;
        if out.len() != 1 {
            return Err(Error::op(
                op.name(),
                format!("expected one output, got {}", out.len()),
            ));
        }
        let v = self.fresh(hint, out.remove(0));
        self.g.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: vec![v],
        });
        Ok(v)
    }

    pub fn meta(&self, v: ValueId) -> &TensorMeta {
        self.g.meta(v)
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

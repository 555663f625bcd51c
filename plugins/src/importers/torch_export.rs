//! `torch-export`: an archive written by `torch.export.save` (the PT2 layout of torch >= 2.8,
//! read by core/src/pt2.rs) into the IR. Parameters and buffers become weights (read lazily,
//! as stored), user inputs become graph inputs with the export's symbolic sizes and their range
//! constraints, and each ATen node becomes the op of the same name. An op the host does not
//! know is an error naming the op and the node and quoting where in the user's model it came
//! from (the node's stack trace).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use autodeploy_core::error::{Error, Result};
use autodeploy_core::pt2::{scalar_type, Pt2Archive};
use autodeploy_core::registry::{ImportRequest, ImporterPlugin, ModelImporter};
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{Dim, Graph, GraphBuilder, Op, Shape, ValueId};
use serde_json::Value;

pub struct TorchExportImporter;

autodeploy_core::inventory::submit! {
    ImporterPlugin { name: "torch-export", version: env!("CARGO_PKG_VERSION"), make: || Box::new(TorchExportImporter) }
}

impl ModelImporter for TorchExportImporter {
    fn accepts(&self, path: &Path) -> bool {
        path.is_file() && path.extension().is_some_and(|e| e == "pt2")
    }

    fn import(&self, req: &ImportRequest) -> Result<Graph> {
        if req.dummy_weights {
            return Err(Error::Msg(format!(
                "{}: load_format = \"dummy\" needs a Hugging Face config.json; a .pt2 archive carries its own weights",
                req.path.display()
            )));
        }
        let archive = Arc::new(Pt2Archive::open(&req.path)?);
        Importer { a: &archive, values: HashMap::new() }.build(&archive)
    }
}

struct Importer<'a> {
    a: &'a Pt2Archive,
    values: HashMap<String, ValueId>,
}

/// A size from the export: an int, or a sympy expression over symbols (`Symbol('s70', ...)`,
/// `Mul(Integer(16), Symbol('s70', ...))`).
fn parse_dim(v: &Value) -> Option<Dim> {
    if let Some(i) = v.get("as_int").and_then(Value::as_i64) {
        return usize::try_from(i).ok().map(Dim::new);
    }
    let e = v.get("as_expr")?.get("expr_str")?.as_str()?;
    parse_expr(e.trim())
}

fn parse_expr(e: &str) -> Option<Dim> {
    if let Some(rest) = e.strip_prefix("Symbol(") {
        let name = rest.split(',').next()?.trim().trim_matches(|c| c == '\'' || c == '"' || c == ')');
        return Some(Dim::sym(name));
    }
    if let Some(rest) = e.strip_prefix("Integer(") {
        return rest.trim_end_matches(')').trim().parse().ok().map(Dim::new);
    }
    if let Some(inner) = e.strip_prefix("Mul(").and_then(|r| r.strip_suffix(')')) {
        // Split the top-level arguments.
        let (mut depth, mut start, mut acc) = (0i32, 0usize, Dim::new(1));
        for (i, c) in inner.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    acc = acc.mul(&parse_expr(inner[start..i].trim())?);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return Some(acc.mul(&parse_expr(inner[start..].trim())?));
    }
    None
}

impl Importer<'_> {
    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::BadFile { file: self.a.path.clone(), msg: msg.into() }
    }

    fn graph_json(&self) -> &Value {
        &self.a.program["graph_module"]["graph"]
    }

    /// dtype and shape of a tensor value from the graph's `tensor_values`.
    fn meta(&self, name: &str) -> Result<(autodeploy_core::DType, Shape)> {
        let t = &self.graph_json()["tensor_values"][name];
        let code = t["dtype"].as_i64().ok_or_else(|| self.bad(format!("tensor `{name}` has no dtype")))?;
        let dtype = scalar_type(code)
            .ok_or_else(|| self.bad(format!("tensor `{name}`: dtype code {code} is not supported")))?;
        let sizes = t["sizes"].as_array().ok_or_else(|| self.bad(format!("tensor `{name}` has no sizes")))?;
        let shape = sizes
            .iter()
            .map(|s| parse_dim(s).ok_or_else(|| self.bad(format!("tensor `{name}`: size {s} is not understood"))))
            .collect::<Result<Shape>>()?;
        Ok((dtype, shape))
    }

    fn build(mut self, archive: &Arc<Pt2Archive>) -> Result<Graph> {
        let a = self.a;
        let mut store = WeightStore::new(a.path.display().to_string());
        for w in &a.weights {
            let (ar, name) = (archive.clone(), w.name.clone());
            let origin = format!("{} ({})", a.path.display(), w.file);
            store.add_lazy(&w.name, w.sizes.clone(), origin, Arc::new(move || ar.load(&name)));
        }
        let mut b = GraphBuilder::new(Arc::new(store));
        if let Some(ranges) = a.program["range_constraints"].as_object() {
            for (sym, r) in ranges {
                let min = r["min_val"].as_u64().unwrap_or(1) as usize;
                // An unbounded symbol (int_oo) gets the widest range the host can hold.
                let max = r["max_val"].as_u64().map_or(u32::MAX as usize, |m| m as usize);
                b.symbol(sym, min, max);
            }
        }
        let sig = &a.program["graph_module"]["signature"];
        for spec in sig["input_specs"].as_array().ok_or_else(|| self.bad("signature has no input_specs"))? {
            let (kind, body) = spec
                .as_object()
                .and_then(|o| o.iter().next())
                .ok_or_else(|| self.bad(format!("input spec {spec} is not understood")))?;
            match kind.as_str() {
                "parameter" | "buffer" => {
                    let arg = body["arg"]["name"].as_str().ok_or_else(|| self.bad(format!("{kind} spec {body}")))?;
                    let target = body[if kind == "parameter" { "parameter_name" } else { "buffer_name" }]
                        .as_str()
                        .ok_or_else(|| self.bad(format!("{kind} spec {body}")))?;
                    if !a.weights.iter().any(|w| w.name == target) {
                        return Err(self.bad(format!("{kind} `{target}` is not among the archive's stored tensors")));
                    }
                    let (dtype, shape) = self.meta(arg)?;
                    let v = b.param(target, dtype, shape);
                    self.values.insert(arg.to_string(), v);
                }
                "user_input" => {
                    let arg = body["arg"]["as_tensor"]["name"].as_str().ok_or_else(|| {
                        self.bad(format!("user input {body} is not a tensor (only tensor inputs are supported)"))
                    })?;
                    let (dtype, shape) = self.meta(arg)?;
                    let v = b.input(arg, dtype, shape);
                    self.values.insert(arg.to_string(), v);
                }
                other => return Err(self.bad(format!("input spec kind `{other}` is not supported ({body})"))),
            }
        }
        let nodes = self.graph_json()["nodes"].as_array().cloned().unwrap_or_default();
        for n in &nodes {
            self.node(&mut b, n)?;
        }
        for spec in sig["output_specs"].as_array().ok_or_else(|| self.bad("signature has no output_specs"))? {
            let name = spec["user_output"]["arg"]["as_tensor"]["name"]
                .as_str()
                .ok_or_else(|| self.bad(format!("output spec {spec} is not a user tensor output")))?;
            let v = *self.values.get(name).ok_or_else(|| self.bad(format!("output `{name}` is never computed")))?;
            b.output(v);
        }
        b.note(format!(
            "import: torch-export importer read {} (torch {}, {} nodes, {} stored tensors)",
            a.path.display(),
            a.program["torch_version"].as_str().unwrap_or("?"),
            nodes.len(),
            a.weights.len()
        ));
        b.finish()
    }

    fn node(&mut self, b: &mut GraphBuilder, n: &Value) -> Result<()> {
        let target = n["target"].as_str().unwrap_or("?");
        let name = n["name"].as_str().unwrap_or("?").to_string();
        let args: HashMap<&str, &Value> = n["inputs"]
            .as_array()
            .map(|v| v.iter().filter_map(|a| Some((a["name"].as_str()?, &a["arg"]))).collect())
            .unwrap_or_default();
        let unsupported = |why: &str| {
            let trace = n["metadata"]["stack_trace"].as_str().unwrap_or("(no stack trace recorded)");
            Error::Op {
                op: target.to_string(),
                msg: format!(
                    "node `{name}`: {why}; the torch-export importer supports {}.\n  exported from:\n    {}",
                    SUPPORTED.join(", "),
                    trace.trim().replace('\n', "\n    ")
                ),
            }
        };
        let tensor = |k: &str| -> Result<ValueId> {
            let t = args
                .get(k)
                .and_then(|a| a["as_tensor"]["name"].as_str())
                .ok_or_else(|| unsupported(&format!("argument `{k}` is not a tensor")))?;
            self.values
                .get(t)
                .copied()
                .ok_or_else(|| unsupported(&format!("argument `{k}` reads `{t}`, which is not defined before it")))
        };
        let int = |k: &str, default: i64| -> Result<i64> {
            match args.get(k) {
                None => Ok(default),
                Some(a) => a["as_int"].as_i64().ok_or_else(|| unsupported(&format!("argument `{k}` is not an int"))),
            }
        };
        let is_none = |k: &str| args.get(k).is_none_or(|a| a.get("as_none").is_some());
        let (op, inputs) = match target {
            "torch.ops.aten.embedding.default" => (Op::Embedding, vec![tensor("weight")?, tensor("indices")?]),
            "torch.ops.aten.linear.default" => {
                let mut ins = vec![tensor("input")?, tensor("weight")?];
                if !is_none("bias") {
                    ins.push(tensor("bias")?);
                }
                (Op::Linear, ins)
            }
            "torch.ops.aten.gelu.default" => {
                let approx = args.get("approximate").and_then(|a| a["as_string"].as_str()).unwrap_or("none");
                match approx {
                    "none" | "tanh" => (Op::Gelu { tanh: approx == "tanh" }, vec![tensor("self")?]),
                    _ => return Err(unsupported(&format!("gelu approximate=`{approx}`"))),
                }
            }
            "torch.ops.aten.log_softmax.int" | "torch.ops.aten._log_softmax.default" => {
                if !is_none("dtype") {
                    return Err(unsupported("log_softmax with a dtype"));
                }
                (Op::LogSoftmax { dim: int("dim", -1)? }, vec![tensor("self")?])
            }
            "torch.ops.aten._softmax.default" | "torch.ops.aten.softmax.int" => {
                (Op::Softmax { dim: int("dim", -1)? }, vec![tensor("self")?])
            }
            "torch.ops.aten.silu.default" => (Op::Silu, vec![tensor("self")?]),
            "torch.ops.aten.neg.default" => (Op::Neg, vec![tensor("self")?]),
            "torch.ops.aten.rsqrt.default" => (Op::Rsqrt, vec![tensor("self")?]),
            "torch.ops.aten.cos.default" => (Op::Cos, vec![tensor("self")?]),
            "torch.ops.aten.sin.default" => (Op::Sin, vec![tensor("self")?]),
            "torch.ops.aten.add.Tensor"
            | "torch.ops.aten.sub.Tensor"
            | "torch.ops.aten.mul.Tensor"
            | "torch.ops.aten.div.Tensor" => {
                if args.get("alpha").is_some_and(|a| a["as_int"].as_i64() != Some(1)) {
                    return Err(unsupported("add/sub with alpha != 1"));
                }
                let op = match target {
                    "torch.ops.aten.add.Tensor" => Op::Add,
                    "torch.ops.aten.sub.Tensor" => Op::Sub,
                    "torch.ops.aten.mul.Tensor" => Op::Mul,
                    _ => Op::Div,
                };
                (op, vec![tensor("self")?, tensor("other")?])
            }
            "torch.ops.aten.transpose.int" => (Op::Transpose(int("dim0", 0)?, int("dim1", 1)?), vec![tensor("self")?]),
            "torch.ops.aten.unsqueeze.default" => (Op::Unsqueeze(int("dim", 0)?), vec![tensor("self")?]),
            _ => return Err(unsupported("not supported yet")),
        };
        let outs = n["outputs"].as_array().cloned().unwrap_or_default();
        let out = match outs.as_slice() {
            [o] => {
                o["as_tensor"]["name"].as_str().ok_or_else(|| unsupported("its output is not one tensor"))?.to_string()
            }
            _ => return Err(unsupported("it has more than one output")),
        };
        let v = b.op(&out, op, &inputs).map_err(|e| unsupported(&format!("its shapes do not check: {e}")))?;
        // The export's own metadata must agree with the shape rules.
        let (dtype, shape) = self.meta(&out)?;
        let got = b.meta(v);
        if got.dtype != dtype || got.shape != shape {
            return Err(unsupported(&format!("the export says {dtype}{shape:?}, the host's shape rules give {got}")));
        }
        self.values.insert(out, v);
        Ok(())
    }
}

/// The ATen targets this importer translates.
const SUPPORTED: &[&str] = &[
    "embedding",
    "linear",
    "gelu",
    "log_softmax",
    "_softmax",
    "silu",
    "neg",
    "rsqrt",
    "cos",
    "sin",
    "add.Tensor",
    "sub.Tensor",
    "mul.Tensor",
    "div.Tensor",
    "transpose.int",
    "unsqueeze",
];

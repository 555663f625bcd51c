//! `torch-export`: an archive written by `torch.export.save` (the PT2 layout of torch >= 2.8,
//! read by core/src/pt2.rs) into the IR. Parameters and buffers become weights (read lazily,
//! as stored), user inputs become graph inputs with the export's symbolic sizes and their range
//! constraints, and each ATen node becomes the op of the same name. An op the host does not
//! know is an error naming the op and the node and quoting where in the user's model it came
//! from (the node's stack trace).
//!
//! Three things make a transformers export read like the HF importer's graph:
//! - symbols: the export names its dims `s44`, `s70`; the batch and sequence dims of
//!   `input_ids` become the host's `batch` and `seq`, which the runtime and cache transforms use;
//! - only what the outputs need is translated (transformers' mask construction, the
//!   `_assert_tensor_metadata` checks and `sym_size` reads are not graph ops here);
//! - an SDPA attention mask built inside the graph is evaluated by `mask` and, when it is the
//!   causal mask, becomes `is_causal = true` (the form the attention matcher and the cached
//!   attention take); any other mask is refused naming the node.

mod aten;
mod mask;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use autodeploy_core::backend::{ImportRequest, ModelImporter};
use autodeploy_core::error::{Error, Result};
use autodeploy_core::ops::attention::{Scoring, SdpaAttrs};
use autodeploy_core::ops::binary::{ADD, ADD_SCALAR, DIV, DIV_SCALAR, MUL, MUL_SCALAR, POW_SCALAR, SUB};
use autodeploy_core::ops::layout::Slice;
use autodeploy_core::pt2::{scalar_type, Pt2Archive};
use autodeploy_core::registry::ImporterPlugin;
use autodeploy_core::weights::WeightStore;
use autodeploy_core::{DType, Dim, Graph, GraphBuilder, Op, Shape, SizeArg, ValueId};
use serde_json::Value;

pub struct TorchExportImporter;

autodeploy_core::inventory::submit! {
    ImporterPlugin { name: "torch-export", version: env!("CARGO_PKG_VERSION"), make: || Box::new(TorchExportImporter) }
}

impl ModelImporter for TorchExportImporter {
    fn accepts(&self, path: &Path) -> bool {
        path.is_file() && path.extension().is_some_and(|e| e == "pt2")
    }

    /// The tokenizer scripts/export.py saves beside the archive: `model.pt2` → `model.tokenizer/`.
    fn tokenizer(&self, path: &Path) -> Result<Option<autodeploy_core::tokenizer::Tokenizer>> {
        let dir = path.with_extension("tokenizer");
        if !dir.is_dir() {
            tracing::info!("{}: no {} beside it; prompts must be token ids", path.display(), dir.display());
            return Ok(None);
        }
        autodeploy_core::tokenizer::Tokenizer::from_hf_dir(&dir)
    }

    fn import(&self, req: &ImportRequest) -> Result<Graph> {
        if req.dummy_weights {
            return Err(Error::Msg(format!(
                "{}: load_format = \"dummy\" needs a Hugging Face config.json; a .pt2 archive carries its own weights",
                req.path.display()
            )));
        }
        let archive = Arc::new(Pt2Archive::open(&req.path)?);
        let g = Importer::new(&archive).build(&archive)?;
        // The export fixed the compute dtype; converting it is not this importer's job.
        if let Some(want) = req.dtype {
            let have: Vec<DType> = g.params.iter().map(|p| g.meta(p.value).dtype).filter(|d| d.is_float()).collect();
            if let Some(&d) = have.iter().find(|&&d| d != want) {
                return Err(Error::BadFile {
                    file: req.path.clone(),
                    msg: format!(
                        "the export computes in {d}, the config asks for {want}; set dtype = \"auto\" or re-export \
                         with scripts/export.py --dtype"
                    ),
                });
            }
        }
        Ok(g)
    }
}

/// A size from the export: an int, or a sympy expression over symbols (`Symbol('s70', ...)`,
/// `Mul(Integer(16), Symbol('s70', ...))`), with symbols renamed by `rename`.
fn parse_dim(v: &Value, rename: &HashMap<String, String>) -> Option<Dim> {
    if let Some(i) = v.get("as_int").and_then(Value::as_i64) {
        return usize::try_from(i).ok().map(Dim::new);
    }
    let e = v.get("as_expr")?.get("expr_str")?.as_str()?;
    parse_expr(e.trim(), rename)
}

/// The symbol a sympy `Symbol('name', ...)` expression names.
fn symbol_name(e: &str) -> Option<&str> {
    let rest = e.strip_prefix("Symbol(")?;
    Some(rest.split(',').next()?.trim().trim_matches(|c| c == '\'' || c == '"' || c == ')'))
}

fn parse_expr(e: &str, rename: &HashMap<String, String>) -> Option<Dim> {
    if let Some(name) = symbol_name(e) {
        return Some(Dim::sym(rename.get(name).map_or(name, String::as_str)));
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
                    acc = acc.mul(&parse_expr(inner[start..i].trim(), rename)?);
                    start = i + 1;
                }
                _ => {}
            }
        }
        return Some(acc.mul(&parse_expr(inner[start..].trim(), rename)?));
    }
    None
}

/// Names of the tensors an argument reads (`as_tensor`, `as_tensors`, `as_optional_tensors`).
fn tensor_args(arg: &Value, out: &mut Vec<String>) {
    if let Some(n) = arg.get("as_tensor").and_then(|t| t["name"].as_str()) {
        out.push(n.to_string());
    }
    for k in ["as_tensors", "as_optional_tensors"] {
        for t in arg.get(k).and_then(Value::as_array).into_iter().flatten() {
            if let Some(n) = t["name"].as_str() {
                out.push(n.to_string());
            }
            tensor_args(t, out);
        }
    }
}

/// The attention masks the host runs, for the errors that refuse another.
const MASKS_TAKEN: &str = "the host's attention is causal over each sequence, optionally within a sliding window or \
                           Llama 4's chunks (padding and bidirectional masks are not supported)";

const SDPA: &str = "torch.ops.aten.scaled_dot_product_attention.default";
const ADD_TENSOR: &str = "torch.ops.aten.add.Tensor";

struct Importer<'a> {
    a: &'a Pt2Archive,
    /// Export tensor name → graph value (identity ops map their output to their input's value).
    values: HashMap<String, ValueId>,
    /// Export symbol → host symbol (`s44` → `batch`).
    rename: HashMap<String, String>,
    /// The graph's symbolic ints (`sym_size_int_14`) as dims.
    sym_ints: HashMap<String, Dim>,
    /// The node that computes each tensor, by tensor name.
    producers: HashMap<String, Value>,
    /// User inputs: name, dtype, shape (for evaluating masks).
    user_inputs: Vec<(String, DType, Shape)>,
    /// How many SDPA masks were found to be sliding windows or chunks.
    windows: usize,
}

impl<'a> Importer<'a> {
    fn new(a: &'a Pt2Archive) -> Importer<'a> {
        Importer {
            a,
            values: HashMap::new(),
            rename: HashMap::new(),
            sym_ints: HashMap::new(),
            producers: HashMap::new(),
            user_inputs: Vec::new(),
            windows: 0,
        }
    }

    fn bad(&self, msg: impl Into<String>) -> Error {
        Error::BadFile { file: self.a.path.clone(), msg: msg.into() }
    }

    fn graph_json(&self) -> &'a Value {
        &self.a.program["graph_module"]["graph"]
    }

    /// dtype and shape of a tensor value from the graph's `tensor_values`.
    fn meta(&self, name: &str) -> Result<(DType, Shape)> {
        let t = &self.graph_json()["tensor_values"][name];
        let code = t["dtype"].as_i64().ok_or_else(|| self.bad(format!("tensor `{name}` has no dtype")))?;
        let dtype = scalar_type(code)
            .ok_or_else(|| self.bad(format!("tensor `{name}`: dtype code {code} is not supported")))?;
        let sizes = t["sizes"].as_array().ok_or_else(|| self.bad(format!("tensor `{name}` has no sizes")))?;
        let shape = sizes
            .iter()
            .map(|s| {
                parse_dim(s, &self.rename)
                    .ok_or_else(|| self.bad(format!("tensor `{name}`: size {s} is not understood")))
            })
            .collect::<Result<Shape>>()?;
        Ok((dtype, shape))
    }

    /// The host names the dims of `input_ids` `[batch, seq]`; the export's symbols for them
    /// are renamed so the runtime's transforms find them.
    fn plan_renames(&mut self, specs: &[Value]) {
        let user = |name: &str| {
            specs.iter().find_map(|s| s["user_input"]["arg"]["as_tensor"]["name"].as_str().filter(|n| *n == name))
        };
        let Some(ids) = user("input_ids") else { return };
        let sizes = self.graph_json()["tensor_values"][ids]["sizes"].as_array().cloned().unwrap_or_default();
        let host = if sizes.len() == 2 { ["batch", "seq"].as_slice() } else { &[] };
        for (s, h) in sizes.iter().zip(host) {
            if let Some(sym) = s["as_expr"]["expr_str"].as_str().and_then(|e| symbol_name(e.trim())) {
                self.rename.insert(sym.to_string(), h.to_string());
            }
        }
    }

    fn build(mut self, archive: &Arc<Pt2Archive>) -> Result<Graph> {
        let a = self.a;
        let mut store = WeightStore::new(a.path.display().to_string());
        for w in &a.weights {
            let (ar, name) = (archive.clone(), w.name.clone());
            let origin = format!("{} ({})", a.path.display(), w.file);
            store.add_lazy(&w.name, w.sizes.clone(), origin, Arc::new(move || ar.load(&name)));
        }
        let sig = &a.program["graph_module"]["signature"];
        let specs = sig["input_specs"].as_array().ok_or_else(|| self.bad("signature has no input_specs"))?;
        self.plan_renames(specs);
        if let Some(syms) = self.graph_json()["sym_int_values"].as_object() {
            for (name, v) in syms {
                if let Some(d) = parse_dim(v, &self.rename) {
                    self.sym_ints.insert(name.clone(), d);
                }
            }
        }
        let mut b = GraphBuilder::new(Arc::new(store));
        if let Some(ranges) = a.program["range_constraints"].as_object() {
            for (sym, r) in ranges {
                let min = r["min_val"].as_u64().unwrap_or(1) as usize;
                // An unbounded symbol (int_oo) gets the widest range the host can hold.
                let max = r["max_val"].as_u64().map_or(u32::MAX as usize, |m| m as usize);
                b.symbol(self.rename.get(sym).map_or(sym.as_str(), String::as_str), min, max);
            }
        }
        for spec in specs {
            let (kind, body) = spec
                .as_object()
                .and_then(|o| o.iter().next())
                .ok_or_else(|| self.bad(format!("input spec {spec} is not understood")))?;
            match kind.as_str() {
                "parameter" | "buffer" | "constant_tensor" | "tensor_constant" => {
                    let arg = body["arg"]["name"].as_str().ok_or_else(|| self.bad(format!("{kind} spec {body}")))?;
                    let key = match kind.as_str() {
                        "parameter" => "parameter_name",
                        "buffer" => "buffer_name",
                        _ => "tensor_constant_name",
                    };
                    let target = body[key].as_str().ok_or_else(|| self.bad(format!("{kind} spec {body}")))?;
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
                    let v = b.input(arg, dtype, shape.clone());
                    self.values.insert(arg.to_string(), v);
                    self.user_inputs.push((arg.to_string(), dtype, shape));
                }
                other => return Err(self.bad(format!("input spec kind `{other}` is not supported ({body})"))),
            }
        }
        let nodes = self.graph_json()["nodes"].as_array().cloned().unwrap_or_default();
        let mut outputs = Vec::new();
        for spec in sig["output_specs"].as_array().ok_or_else(|| self.bad("signature has no output_specs"))? {
            let name = spec["user_output"]["arg"]["as_tensor"]["name"]
                .as_str()
                .ok_or_else(|| self.bad(format!("output spec {spec} is not a user tensor output")))?;
            outputs.push(name.to_string());
        }
        for n in &nodes {
            for name in output_names(n) {
                self.producers.insert(name.to_string(), n.clone());
            }
        }
        // Translate only what the outputs need; an SDPA's mask is checked, not translated.
        let mut live: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut stack = outputs.clone();
        while let Some(t) = stack.pop() {
            if !live.insert(t.clone()) {
                continue;
            }
            let Some(n) = self.producers.get(&t) else { continue };
            for i in n["inputs"].as_array().into_iter().flatten() {
                if n["target"] == SDPA && i["name"] == "attn_mask" {
                    continue;
                }
                // The eager form's `scores + mask`: the mask is evaluated, not translated.
                if n["target"] == ADD_TENSOR
                    && i["arg"]["as_tensor"]["name"].as_str().is_some_and(|t| self.additive_mask(t).is_some())
                {
                    continue;
                }
                tensor_args(&i["arg"], &mut stack);
            }
        }
        let mut translated = 0;
        for n in &nodes {
            let produces_live = output_names(n).iter().any(|t| live.contains(*t));
            if produces_live {
                self.node(&mut b, n)?;
                translated += 1;
            }
        }
        for name in &outputs {
            let v = *self.values.get(name).ok_or_else(|| self.bad(format!("output `{name}` is never computed")))?;
            b.output(v);
        }
        b.note(format!(
            "import: torch-export importer read {} (torch {}, {} nodes, {translated} translated, {} stored tensors)",
            a.path.display(),
            a.program["torch_version"].as_str().unwrap_or("?"),
            nodes.len(),
            a.weights.len()
        ));
        if self.windows > 0 {
            b.note(format!(
                "import: {} attention masks are sliding windows or chunks (the attention nodes carry `window` or `chunk`)",
                self.windows
            ));
        }
        let mut g = b.finish()?;
        g.dce();
        Ok(g)
    }

    /// A size list (`as_ints` or `as_sym_ints`) as the IR's size arguments; `-1` infers/keeps.
    fn size_list(&self, a: &Value) -> Option<Vec<SizeArg>> {
        let list = a.get("as_ints").or_else(|| a.get("as_sym_ints"))?.as_array()?;
        list.iter()
            .map(|x| {
                let i = x.as_i64().or_else(|| x.get("as_int").and_then(Value::as_i64));
                match i {
                    Some(-1) => Some(SizeArg::Infer),
                    Some(n) => usize::try_from(n).ok().map(|n| SizeArg::Dim(Dim::new(n))),
                    None => self.sym_ints.get(x.get("as_name")?.as_str()?).cloned().map(SizeArg::Dim),
                }
            })
            .collect()
    }

    /// The boolean mask under an additive attention mask `t`: transformers' eager form,
    /// `where(mask, 0, finfo.min)` (slices of it to the key length allowed), or `None`.
    fn additive_mask(&self, t: &str) -> Option<String> {
        let mut t = t;
        loop {
            let n = self.producers.get(t)?;
            let arg = |k: &str| n["inputs"].as_array()?.iter().find(|i| i["name"] == k).map(|i| &i["arg"]);
            match n["target"].as_str()? {
                "torch.ops.aten.slice.Tensor" => t = arg("self")?["as_tensor"]["name"].as_str()?,
                "torch.ops.aten.where.ScalarOther" => {
                    let zero = arg("self")?["as_tensor"]["name"].as_str().and_then(|z| self.producers.get(z))?;
                    let hidden = arg("other")?["as_float"].as_f64()?;
                    if zero["target"] != "torch.ops.aten.zeros.default" || hidden > -1e30 {
                        return None;
                    }
                    return arg("condition")?["as_tensor"]["name"].as_str().map(str::to_string);
                }
                _ => return None,
            }
        }
    }

    /// What an SDPA's `attn_mask` keeps (causal, a sliding window, chunks), or why the host
    /// cannot take it (`mask::MaskSource::kind`).
    fn mask_kind(&self, mask: &str) -> std::result::Result<mask::MaskKind, String> {
        if self.meta(mask).map(|m| m.0).ok() != Some(DType::Bool) {
            return Err(format!("the mask `{mask}` is not boolean (additive float masks are not recognised)"));
        }
        mask::MaskSource { nodes: &self.producers, sym_ints: &self.sym_ints, user_inputs: &self.user_inputs }.kind(mask)
    }
}

/// The tensors a node writes: its one tensor, or each of a tensor list (a split's pieces).
fn output_names(n: &Value) -> Vec<&str> {
    let mut v = Vec::new();
    for o in n["outputs"].as_array().into_iter().flatten() {
        if let Some(name) = o["as_tensor"]["name"].as_str() {
            v.push(name);
        }
        v.extend(o["as_tensors"].as_array().into_iter().flatten().filter_map(|t| t["name"].as_str()));
    }
    v
}

/// Targets that build attention masks (evaluated by `mask`, never translated).
const MASK_OPS: &[&str] = &[
    "torch.ops.aten.arange.default",
    "torch.ops.aten.arange.start",
    "torch.ops.aten.arange.start_step",
    "torch.ops.aten.diff.default",
    "torch.ops.aten.cumsum.default",
    "torch.ops.aten.index.Tensor",
    "torch.ops.aten.le.Tensor",
    "torch.ops.aten.eq.Tensor",
    "torch.ops.aten.ne.Scalar",
    "torch.ops.aten.__and__.Tensor",
    "torch.ops.aten.new_ones.default",
    "torch.ops.aten.floor_divide.default",
];

//! The attention masks an export builds for itself.
//!
//! transformers (5.x) computes the SDPA mask inside the traced forward: from `position_ids` it
//! derives a causal mask (`arange`, `index`, `le`) and a packed-sequence mask (`diff`, `ne`,
//! `cumsum`, `eq`), joined with `&`. The host's cached attention is causal over each sequence,
//! so the importer does not translate these ops into the graph: it evaluates the mask's
//! subgraph here, on small integer tensors, for a few batches of contiguous positions (what the
//! runtime feeds), and accepts the SDPA as causal only when the mask is exactly the causal one
//! or a sliding window (causal, each query seeing itself and the `w - 1` tokens before it).
//! A window no evaluated length reaches (4096 tokens, say) is found by substituting small values
//! for the integer literals of the mask's ops: a literal that moves the window one token per unit
//! is the window's size. Anything else (bidirectional prefixes, padding masks) is refused by name.

use std::collections::HashMap;

use autodeploy_core::shape::{Bindings, Shape};
use autodeploy_core::DType;
use serde_json::Value;

/// An integer (or bool, as 0/1) tensor, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct IntTensor {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

impl IntTensor {
    fn new(shape: Vec<usize>, data: Vec<i64>) -> IntTensor {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        IntTensor { shape, data }
    }

    fn strides(shape: &[usize]) -> Vec<usize> {
        let mut s = vec![1; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            s[d] = s[d + 1] * shape[d + 1];
        }
        s
    }

    /// The element at a multi-index of a shape this tensor broadcasts to (`idx` aligned right).
    fn at_broadcast(&self, idx: &[usize]) -> i64 {
        let st = Self::strides(&self.shape);
        let off = idx.len() - self.shape.len();
        let mut at = 0;
        for (d, (&n, &s)) in self.shape.iter().zip(&st).enumerate() {
            if n != 1 {
                at += idx[off + d] * s;
            }
        }
        self.data[at]
    }

    /// Every multi-index of `shape`, in row-major order.
    fn indices(shape: &[usize]) -> impl Iterator<Item = Vec<usize>> + '_ {
        let n: usize = shape.iter().product();
        (0..n).map(move |mut i| {
            let mut idx = vec![0; shape.len()];
            for d in (0..shape.len()).rev() {
                idx[d] = i % shape[d];
                i /= shape[d];
            }
            idx
        })
    }
}

/// The mask check evaluates masks of a handful of tokens; anything bigger is a malformed graph.
const MAX_ELEMENTS: usize = 1 << 20;

fn check_size(shape: &[usize]) -> Result<(), String> {
    match shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)) {
        Some(n) if n <= MAX_ELEMENTS => Ok(()),
        _ => Err(format!("a tensor of shape {shape:?} is too large for a mask of a few tokens")),
    }
}

fn broadcast_shape(a: &[usize], b: &[usize]) -> Result<Vec<usize>, String> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let x = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let y = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            match (x, y) {
                (x, y) if x == y => Ok(x),
                (1, y) => Ok(y),
                (x, 1) => Ok(x),
                _ => Err(format!("shapes {a:?} and {b:?} do not broadcast")),
            }
        })
        .collect()
}

fn binary(a: &IntTensor, b: &IntTensor, f: impl Fn(i64, i64) -> i64) -> Result<IntTensor, String> {
    let shape = broadcast_shape(&a.shape, &b.shape)?;
    check_size(&shape)?;
    let data = IntTensor::indices(&shape).map(|i| f(a.at_broadcast(&i), b.at_broadcast(&i))).collect();
    Ok(IntTensor::new(shape, data))
}

/// Python's `//` on integers: the quotient rounded down (the divisor checked nonzero).
fn floor_div(a: i64, b: i64) -> i64 {
    let q = a.wrapping_div(b);
    if a.wrapping_rem(b) != 0 && ((a < 0) != (b < 0)) {
        q - 1
    } else {
        q
    }
}

fn norm_dim(d: i64, rank: usize) -> Result<usize, String> {
    let r = rank as i64;
    let d = if d < 0 { d + r } else { d };
    if (0..r).contains(&d) {
        Ok(d as usize)
    } else {
        Err(format!("dim {d} out of range for rank {rank}"))
    }
}

/// Evaluates tensors of the export's graph on concrete integer inputs.
pub struct MaskEval<'a> {
    /// Producing node of each tensor, by name.
    pub nodes: &'a HashMap<String, Value>,
    /// Symbolic ints of the graph (`sym_size_int_N`) as host dims, evaluated with `bind`.
    pub sym_ints: &'a HashMap<String, autodeploy_core::Dim>,
    pub bind: Bindings,
    pub values: HashMap<String, IntTensor>,
    /// Integer arguments evaluated with other values: (tensor, argument name, value).
    pub patch: Vec<(String, String, i64)>,
}

fn short(target: &str) -> &str {
    target.strip_prefix("torch.ops.aten.").unwrap_or(target)
}

impl MaskEval<'_> {
    fn int(&self, a: &Value) -> Result<i64, String> {
        if let Some(i) = a.get("as_int").and_then(Value::as_i64) {
            return Ok(i);
        }
        if let Some(b) = a.get("as_bool").and_then(Value::as_bool) {
            return Ok(b as i64);
        }
        let name = a
            .get("as_sym_int")
            .and_then(|s| s.get("as_name"))
            .or_else(|| a.get("as_name"))
            .and_then(Value::as_str)
            .ok_or_else(|| format!("argument {a} is not an int"))?;
        let d = self.sym_ints.get(name).ok_or_else(|| format!("symbolic int `{name}` is not known"))?;
        d.eval(&self.bind).map(|n| n as i64).map_err(|e| e.to_string())
    }

    fn ints(&self, a: &Value) -> Result<Vec<i64>, String> {
        let list = a
            .get("as_ints")
            .or_else(|| a.get("as_sym_ints"))
            .and_then(Value::as_array)
            .ok_or_else(|| format!("argument {a} is not an int list"))?;
        list.iter().map(|x| self.int(x)).collect()
    }

    /// The value of tensor `name`.
    pub fn eval(&mut self, name: &str) -> Result<IntTensor, String> {
        if let Some(t) = self.values.get(name) {
            return Ok(t.clone());
        }
        let nodes = self.nodes;
        let mut n = nodes.get(name).ok_or_else(|| format!("`{name}` is not computed by a node of the graph"))?;
        let patched;
        let here: Vec<_> = self.patch.iter().filter(|p| p.0 == name).collect();
        if !here.is_empty() {
            let mut c = n.clone();
            for i in c["inputs"].as_array_mut().into_iter().flatten() {
                if let Some((_, _, v)) = here.iter().find(|p| i["name"] == p.1.as_str()) {
                    i["arg"] = serde_json::json!({ "as_int": v });
                }
            }
            patched = c;
            n = &patched;
        }
        let target = n["target"].as_str().unwrap_or("?");
        let args: HashMap<&str, &Value> = n["inputs"]
            .as_array()
            .map(|v| v.iter().filter_map(|a| Some((a["name"].as_str()?, &a["arg"]))).collect())
            .unwrap_or_default();
        let node = n["name"].as_str().unwrap_or("?").to_string();
        let out = self.node(short(target), &args).map_err(|e| format!("{target} (node `{node}`): {e}"))?;
        self.values.insert(name.to_string(), out.clone());
        Ok(out)
    }

    fn tensor(&mut self, args: &HashMap<&str, &Value>, k: &str) -> Result<IntTensor, String> {
        let name = args
            .get(k)
            .and_then(|a| a["as_tensor"]["name"].as_str())
            .ok_or_else(|| format!("argument `{k}` is not a tensor"))?
            .to_string();
        self.eval(&name)
    }

    /// A binary op's `other`: a tensor, or a number as a one-element tensor.
    fn other(&mut self, args: &HashMap<&str, &Value>) -> Result<IntTensor, String> {
        let other = args.get("other").ok_or("no `other`")?;
        if other.get("as_tensor").is_some() {
            self.tensor(args, "other")
        } else {
            Ok(IntTensor::new(vec![], vec![self.int(other)?]))
        }
    }

    fn opt<'v>(args: &HashMap<&str, &'v Value>, k: &str) -> Option<&'v Value> {
        args.get(k).copied().filter(|a| a.get("as_none").is_none())
    }

    fn node(&mut self, target: &str, args: &HashMap<&str, &Value>) -> Result<IntTensor, String> {
        let int_or = |s: &Self, k: &str, d: i64| Self::opt(args, k).map_or(Ok(d), |a| s.int(a));
        Ok(match target {
            "arange.default" | "arange.start" | "arange.start_step" => {
                let (start, end, step) = (int_or(self, "start", 0)?, int_or(self, "end", 0)?, int_or(self, "step", 1)?);
                if step <= 0 {
                    return Err(format!("step {step}"));
                }
                if end.saturating_sub(start) / step > MAX_ELEMENTS as i64 {
                    return Err(format!("arange({start}, {end}, {step}) is too long"));
                }
                let data: Vec<i64> = (start..end).step_by(step as usize).collect();
                IntTensor::new(vec![data.len()], data)
            }
            "alias.default" | "clone.default" | "contiguous.default" | "lift_fresh_copy.default" => {
                self.tensor(args, "self")?
            }
            "to.dtype" | "to.dtype_layout" | "to.device" | "_to_copy.default" => {
                let x = self.tensor(args, "self")?;
                match Self::opt(args, "dtype").and_then(|d| d["as_scalar_type"].as_i64()) {
                    Some(12) => IntTensor::new(x.shape, x.data.iter().map(|&v| (v != 0) as i64).collect()),
                    None | Some(5) | Some(3) | Some(4) | Some(2) | Some(1) => x,
                    Some(code) => return Err(format!("conversion to dtype code {code} (a float mask)")),
                }
            }
            "unsqueeze.default" => {
                let mut x = self.tensor(args, "self")?;
                let d = norm_dim(int_or(self, "dim", 0)?, x.shape.len() + 1)?;
                x.shape.insert(d, 1);
                x
            }
            "view.default" | "reshape.default" | "_unsafe_view.default" => {
                let x = self.tensor(args, "self")?;
                let sizes = self.ints(args.get("size").or_else(|| args.get("shape")).ok_or("no size")?)?;
                let known = sizes
                    .iter()
                    .filter(|&&s| s >= 0)
                    .try_fold(1i64, |a, &s| a.checked_mul(s))
                    .ok_or("size overflow")?;
                let shape: Vec<usize> = sizes
                    .iter()
                    .map(|&s| if s < 0 { x.data.len() / known.max(1) as usize } else { s as usize })
                    .collect();
                check_size(&shape)?;
                if shape.iter().product::<usize>() != x.data.len() {
                    return Err(format!("view of {:?} as {sizes:?}", x.shape));
                }
                IntTensor::new(shape, x.data)
            }
            "expand.default" => {
                let x = self.tensor(args, "self")?;
                let sizes = self.ints(args.get("size").ok_or("no size")?)?;
                let off = sizes.len().checked_sub(x.shape.len()).ok_or("expand to a lower rank")?;
                let shape: Vec<usize> = sizes
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| match (s, i.checked_sub(off)) {
                        (s, _) if s >= 0 => Ok(s as usize),
                        (_, Some(j)) => Ok(x.shape[j]),
                        _ => Err("-1 for a new leading dim".to_string()),
                    })
                    .collect::<Result<_, _>>()?;
                // Only size-1 dims stretch.
                if x.shape.iter().zip(&shape[off..]).any(|(&have, &want)| have != 1 && have != want) {
                    return Err(format!("expand of {:?} to {shape:?}", x.shape));
                }
                check_size(&shape)?;
                let data = IntTensor::indices(&shape).map(|i| x.at_broadcast(&i)).collect();
                IntTensor::new(shape, data)
            }
            "slice.Tensor" => {
                let x = self.tensor(args, "self")?;
                let d = norm_dim(int_or(self, "dim", 0)?, x.shape.len())?;
                let n = x.shape[d] as i64;
                let clamp = |v: i64| if v < 0 { (v + n).max(0) } else { v.min(n) };
                let (start, end, step) =
                    (clamp(int_or(self, "start", 0)?), clamp(int_or(self, "end", i64::MAX)?), int_or(self, "step", 1)?);
                if step <= 0 {
                    return Err(format!("step {step}"));
                }
                let keep: Vec<usize> = (start..end.max(start)).step_by(step as usize).map(|i| i as usize).collect();
                let mut shape = x.shape.clone();
                shape[d] = keep.len();
                let data = IntTensor::indices(&shape)
                    .map(|mut i| {
                        i[d] = keep[i[d]];
                        x.at_broadcast(&i)
                    })
                    .collect();
                IntTensor::new(shape, data)
            }
            "add.Tensor" | "sub.Tensor" | "mul.Tensor" | "add.Scalar" | "sub.Scalar" | "mul.Scalar" => {
                let x = self.tensor(args, "self")?;
                let y = self.other(args)?;
                let alpha = int_or(self, "alpha", 1)?;
                match &target[..3] {
                    "add" => binary(&x, &y, |a, b| a + alpha * b)?,
                    "sub" => binary(&x, &y, |a, b| a - alpha * b)?,
                    _ => binary(&x, &y, |a, b| a * b)?,
                }
            }
            "ne.Scalar" | "eq.Scalar" | "le.Scalar" | "lt.Scalar" | "ge.Scalar" | "gt.Scalar" | "ne.Tensor"
            | "eq.Tensor" | "le.Tensor" | "lt.Tensor" | "ge.Tensor" | "gt.Tensor" => {
                let x = self.tensor(args, "self")?;
                let y = self.other(args)?;
                let f: fn(i64, i64) -> bool = match &target[..2] {
                    "ne" => |a, b| a != b,
                    "eq" => |a, b| a == b,
                    "le" => |a, b| a <= b,
                    "lt" => |a, b| a < b,
                    "ge" => |a, b| a >= b,
                    _ => |a, b| a > b,
                };
                binary(&x, &y, |a, b| f(a, b) as i64)?
            }
            "__and__.Tensor" | "bitwise_and.Tensor" | "logical_and.default" => {
                let (x, y) = (self.tensor(args, "self")?, self.tensor(args, "other")?);
                binary(&x, &y, |a, b| ((a != 0) && (b != 0)) as i64)?
            }
            "__or__.Tensor" | "bitwise_or.Tensor" | "logical_or.default" => {
                let (x, y) = (self.tensor(args, "self")?, self.tensor(args, "other")?);
                binary(&x, &y, |a, b| ((a != 0) || (b != 0)) as i64)?
            }
            "logical_not.default" | "bitwise_not.default" => {
                let x = self.tensor(args, "self")?;
                IntTensor::new(x.shape, x.data.iter().map(|&v| (v == 0) as i64).collect())
            }
            "floor_divide.default" | "floor_divide.Scalar" => {
                let x = self.tensor(args, "self")?;
                let y = self.other(args)?;
                if y.data.contains(&0) {
                    return Err("floor_divide by zero".into());
                }
                binary(&x, &y, floor_div)?
            }
            "zeros.default" | "ones.default" => {
                let shape: Vec<usize> =
                    self.ints(args.get("size").ok_or("no size")?)?.into_iter().map(|s| s.max(0) as usize).collect();
                check_size(&shape)?;
                let n = shape.iter().product();
                IntTensor::new(shape, vec![target.starts_with("ones") as i64; n])
            }
            "new_ones.default" | "new_zeros.default" => {
                let shape: Vec<usize> =
                    self.ints(args.get("size").ok_or("no size")?)?.into_iter().map(|s| s.max(0) as usize).collect();
                check_size(&shape)?;
                let v = target.starts_with("new_ones") as i64;
                let n = shape.iter().product();
                IntTensor::new(shape, vec![v; n])
            }
            "cumsum.default" => {
                let x = self.tensor(args, "self")?;
                let d = norm_dim(int_or(self, "dim", 0)?, x.shape.len())?;
                let st = IntTensor::strides(&x.shape);
                let mut data = x.data.clone();
                for i in 0..data.len() {
                    if !(i / st[d]).is_multiple_of(x.shape[d]) {
                        data[i] += data[i - st[d]];
                    }
                }
                IntTensor::new(x.shape, data)
            }
            "diff.default" => {
                if int_or(self, "n", 1)? != 1 {
                    return Err("only n = 1".into());
                }
                let mut x = self.tensor(args, "self")?;
                let d = norm_dim(int_or(self, "dim", -1)?, x.shape.len())?;
                if Self::opt(args, "prepend").is_some() {
                    x = cat(&self.tensor(args, "prepend")?, &x, d)?;
                }
                if Self::opt(args, "append").is_some() {
                    x = cat(&x, &self.tensor(args, "append")?, d)?;
                }
                let mut shape = x.shape.clone();
                shape[d] = shape[d].checked_sub(1).ok_or("diff of an empty dim")?;
                let data = IntTensor::indices(&shape)
                    .map(|mut i| {
                        let a = x.at_broadcast(&i);
                        i[d] += 1;
                        x.at_broadcast(&i) - a
                    })
                    .collect();
                IntTensor::new(shape, data)
            }
            "index.Tensor" => {
                let x = self.tensor(args, "self")?;
                let list = args
                    .get("indices")
                    .and_then(|a| a.get("as_optional_tensors").or_else(|| a.get("as_tensors")))
                    .and_then(Value::as_array)
                    .ok_or("`indices` is not a tensor list")?
                    .clone();
                let mut idx = Vec::new();
                for t in &list {
                    let name = t
                        .get("as_tensor")
                        .and_then(|t| t["name"].as_str())
                        .or_else(|| t["name"].as_str())
                        .ok_or("only leading, non-None index tensors are supported")?;
                    idx.push(self.eval(name)?);
                }
                if idx.len() > x.shape.len() {
                    return Err("more indices than dims".into());
                }
                let mut bshape: Vec<usize> = vec![];
                for t in &idx {
                    bshape = broadcast_shape(&bshape, &t.shape)?;
                }
                let rest = &x.shape[idx.len()..];
                let mut shape = bshape.clone();
                shape.extend_from_slice(rest);
                check_size(&shape)?;
                let mut data = Vec::with_capacity(shape.iter().product());
                for i in IntTensor::indices(&shape) {
                    let mut src: Vec<usize> = Vec::with_capacity(x.shape.len());
                    for (k, t) in idx.iter().enumerate() {
                        let v = t.at_broadcast(&i[..bshape.len()]);
                        let n = x.shape[k] as i64;
                        let v = if v < 0 { v + n } else { v };
                        if !(0..n).contains(&v) {
                            return Err(format!("index {v} out of range for size {n}"));
                        }
                        src.push(v as usize);
                    }
                    src.extend_from_slice(&i[bshape.len()..]);
                    data.push(x.at_broadcast(&src));
                }
                IntTensor::new(shape, data)
            }
            other => return Err(format!("`{other}` is not an op the mask check can evaluate")),
        })
    }
}

fn cat(a: &IntTensor, b: &IntTensor, d: usize) -> Result<IntTensor, String> {
    let mut shape = a.shape.clone();
    if a.shape.len() != b.shape.len() || a.shape.iter().zip(&b.shape).enumerate().any(|(i, (x, y))| i != d && x != y) {
        return Err(format!("cat of {:?} and {:?}", a.shape, b.shape));
    }
    shape[d] += b.shape[d];
    let data = IntTensor::indices(&shape)
        .map(|mut i| {
            if i[d] < a.shape[d] {
                a.at_broadcast(&i)
            } else {
                i[d] -= a.shape[d];
                b.at_broadcast(&i)
            }
        })
        .collect();
    Ok(IntTensor::new(shape, data))
}

/// What the evaluated masks are for: (rows, tokens per row, each row's first position).
const CASES: [(usize, usize, [i64; 3]); 4] =
    [(2, 5, [0, 3, 0]), (1, 7, [11, 0, 0]), (3, 1, [0, 4, 9]), (1, 33, [0, 0, 0])];

/// The tokens of the one row a literal's substitutes are evaluated with (room for a window of
/// up to 11 tokens).
const PROBE_SEQ: usize = 12;

/// An export's graph, as far as evaluating an SDPA mask needs it.
pub struct MaskSource<'a> {
    pub nodes: &'a HashMap<String, Value>,
    pub sym_ints: &'a HashMap<String, autodeploy_core::Dim>,
    /// The graph's user inputs: name, dtype, shape.
    pub user_inputs: &'a [(String, DType, Shape)],
}

impl MaskSource<'_> {
    /// `mask` for `batch` rows of `seq` contiguous positions starting at `offsets`.
    fn eval(
        &self,
        mask: &str,
        (batch, seq, offsets): (usize, usize, &[i64]),
        patch: Vec<(String, String, i64)>,
    ) -> Result<IntTensor, String> {
        let mut bind = Bindings::new();
        bind.insert("batch".into(), batch);
        bind.insert("seq".into(), seq);
        let mut values = HashMap::new();
        for (name, _, shape) in self.user_inputs {
            let Ok(dims) = autodeploy_core::shape::eval_shape(shape, &bind) else { continue };
            let data = match name.as_str() {
                "position_ids" if dims.len() == 2 => (0..dims[0])
                    .flat_map(|r| (0..dims[1] as i64).map(move |i| offsets.get(r).unwrap_or(&0) + i))
                    .collect(),
                "input_ids" => vec![1; dims.iter().product()],
                _ => continue,
            };
            values.insert(name.clone(), IntTensor::new(dims, data));
        }
        MaskEval { nodes: self.nodes, sym_ints: self.sym_ints, bind, values, patch }
            .eval(mask)
            .map_err(|e| format!("the mask `{mask}` could not be evaluated: {e}"))
    }

    /// What `mask` keeps (causal, a sliding window or chunks), or why it is none of them.
    pub fn kind(&self, mask: &str) -> Result<MaskKind, String> {
        let mut evaluated = Vec::new();
        let mut found = MaskKind::Causal;
        for (batch, seq, offsets) in CASES {
            let m = self.eval(mask, (batch, seq, &offsets), Vec::new())?;
            let k = classify(&m, batch, seq, &offsets).map_err(|e| {
                format!("the mask `{mask}` is not the causal mask (for {batch} rows of {seq} positions it {e})")
            })?;
            if k != MaskKind::Causal {
                if found != MaskKind::Causal && found != k {
                    return Err(format!("the mask `{mask}` keeps both {} and {}", found.describe(), k.describe()));
                }
                found = k;
            }
            evaluated.push((m, batch, seq, offsets));
        }
        if found == MaskKind::Causal {
            return Ok(self.literal_kinds(mask).into_iter().min_by_key(|k| k.size()).unwrap_or(MaskKind::Causal));
        }
        // Every evaluated case must agree with it (a window that the longer sequences do not
        // keep, chunks that other offsets do not start at multiples of, are neither).
        for (m, batch, seq, offsets) in &evaluated {
            check(m, *batch, *seq, offsets, found).map_err(|e| {
                format!(
                    "the mask `{mask}` keeps {} for some sequences, but for {batch} rows of {seq} it {e}",
                    found.describe()
                )
            })?;
        }
        Ok(found)
    }

    /// Windows and chunks too wide for the evaluated lengths: each integer literal `c` of the
    /// mask's ops (`|c| >= 2`; every operand of that value at once, as Llama 4's chunk divides
    /// the query's and the key's positions alike) is replaced by ±2, ±3 and ±4; when the mask
    /// then keeps windows (or chunks) that move by one token per unit, the size at `c` follows.
    fn literal_kinds(&self, mask: &str) -> Vec<MaskKind> {
        let mut found = Vec::new();
        let all = self.literals(mask);
        let mut values: Vec<i64> = all.iter().map(|l| l.2).collect();
        values.sort_unstable();
        values.dedup();
        for c in values {
            let sign = c.signum();
            let at = |k: i64| -> Vec<(String, String, i64)> {
                all.iter().filter(|l| l.2 == c).map(|(t, a, _)| (t.clone(), a.clone(), sign * k)).collect()
            };
            let kinds: Vec<Option<MaskKind>> = [2, 3, 4]
                .iter()
                .map(|&k| {
                    let m = self.eval(mask, (1, PROBE_SEQ, &[0]), at(k)).ok()?;
                    classify(&m, 1, PROBE_SEQ, &[0]).ok().filter(|k| *k != MaskKind::Causal)
                })
                .collect();
            let [Some(k2), Some(k3), Some(k4)] = kinds[..] else { continue };
            if !(k2.same_kind(k3) && k3.same_kind(k4)) {
                continue;
            }
            let (w2, w3, w4) = (k2.size() as i64, k3.size() as i64, k4.size() as i64);
            // Substitutes step by `sign`; a size that follows them steps by ±1.
            let slope = (w3 - w2) * sign;
            if slope.abs() != 1 || w4 - w3 != w3 - w2 {
                continue;
            }
            if let Some(w) = c.checked_sub(2 * sign).and_then(|d| d.checked_mul(slope)).and_then(|d| d.checked_add(w2))
            {
                if w >= 1 {
                    found.push(k2.with_size(usize::try_from(w).unwrap_or(usize::MAX)));
                }
            }
        }
        found
    }

    /// The scalar integer operands (`other`, `|value| >= 2`) of the ops `mask` is computed from.
    fn literals(&self, mask: &str) -> Vec<(String, String, i64)> {
        let (mut out, mut stack, mut seen) = (Vec::new(), vec![mask.to_string()], std::collections::HashSet::new());
        while let Some(t) = stack.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            let Some(n) = self.nodes.get(&t) else { continue };
            for i in n["inputs"].as_array().into_iter().flatten() {
                let arg = &i["arg"];
                super::tensor_args(arg, &mut stack);
                if let (Some("other"), Some(c)) = (i["name"].as_str(), arg["as_int"].as_i64()) {
                    if c.abs() >= 2 {
                        out.push((t.clone(), "other".to_string(), c));
                    }
                }
            }
        }
        out
    }
}

/// What an attention mask keeps, as the host's attention runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaskKind {
    /// Each query sees itself and every earlier token of its sequence.
    Causal,
    /// A sliding window: each query sees itself and the `w - 1` tokens before it.
    Window(usize),
    /// Chunked (Llama 4's local layers): a query at position `p` sees the earlier tokens whose
    /// positions share `p / c`.
    Chunk(usize),
}

impl MaskKind {
    fn size(self) -> usize {
        match self {
            MaskKind::Causal => usize::MAX,
            MaskKind::Window(n) | MaskKind::Chunk(n) => n,
        }
    }

    fn same_kind(self, o: MaskKind) -> bool {
        std::mem::discriminant(&self) == std::mem::discriminant(&o)
    }

    fn with_size(self, n: usize) -> MaskKind {
        match self {
            MaskKind::Causal => MaskKind::Causal,
            MaskKind::Window(_) => MaskKind::Window(n),
            MaskKind::Chunk(_) => MaskKind::Chunk(n),
        }
    }

    fn describe(self) -> String {
        match self {
            MaskKind::Causal => "the causal mask".into(),
            MaskKind::Window(n) => format!("a window of {n} tokens"),
            MaskKind::Chunk(n) => format!("chunks of {n} positions"),
        }
    }

    /// Whether query `i` attends key `j` of a row whose first position is `offset`.
    fn attends(self, offset: i64, i: usize, j: usize) -> bool {
        j <= i
            && match self {
                MaskKind::Causal => true,
                MaskKind::Window(w) => i - j < w,
                MaskKind::Chunk(c) => {
                    let c = c as i64;
                    floor_div(offset + j as i64, c) == floor_div(offset + i as i64, c)
                }
            }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What `mask` (`[batch|1, heads|1, seq, seq]`, nonzero = attend) keeps for `batch` rows of
/// `seq` tokens, row `r` starting at position `offsets[r]`: the causal mask, a sliding window
/// (`w < seq`), or chunks (found from where the rows' first attended keys move); else where
/// it departs from the causal mask.
pub fn classify(mask: &IntTensor, batch: usize, seq: usize, offsets: &[i64]) -> Result<MaskKind, String> {
    let Err(causal) = check(mask, batch, seq, offsets, MaskKind::Causal) else { return Ok(MaskKind::Causal) };
    let s = &mask.shape;
    let rows = if s[0] == 1 { 1 } else { batch };
    // The window the last query of the first row sees.
    let w = (0..seq).filter(|&j| mask.at_broadcast(&[0, 0, seq - 1, j]) != 0).count();
    if w > 0 && w < seq && check(mask, batch, seq, offsets, MaskKind::Window(w)).is_ok() {
        return Ok(MaskKind::Window(w));
    }
    // Chunk starts: the positions at which a query's first attended key moves past its
    // row's first token; the chunk size divides each of them.
    let mut c = 0;
    for r in 0..rows {
        let off = offsets.get(r).copied().unwrap_or(0);
        for i in 0..seq {
            if let Some(j0) = (0..=i).find(|&j| mask.at_broadcast(&[r, 0, i, j]) != 0).filter(|&j| j > 0) {
                c = gcd(c, usize::try_from(off + j0 as i64).unwrap_or(0));
            }
        }
    }
    if c > 0 && check(mask, batch, seq, offsets, MaskKind::Chunk(c)).is_ok() {
        return Ok(MaskKind::Chunk(c));
    }
    Err(causal)
}

/// Whether `mask` (`[batch|1, heads|1, seq, seq]`, nonzero = attend) is exactly `kind` for
/// `batch` rows of `seq` tokens starting at `offsets`; else where it departs.
pub fn check(mask: &IntTensor, batch: usize, seq: usize, offsets: &[i64], kind: MaskKind) -> Result<(), String> {
    let s = &mask.shape;
    if s.len() != 4 || !(s[0] == batch || s[0] == 1) || s[2] != seq || s[3] != seq {
        return Err(format!("has shape {s:?}, not [{batch}, heads, {seq}, {seq}]"));
    }
    for idx in IntTensor::indices(s) {
        let (i, j) = (idx[2], idx[3]);
        let attend = mask.at_broadcast(&idx) != 0;
        // A mask of one row for all sequences must hold for each row's offset.
        let rows: Vec<usize> = if s[0] == 1 { (0..batch).collect() } else { vec![idx[0]] };
        for r in rows {
            let want = kind.attends(offsets.get(r).copied().unwrap_or(0), i, j);
            if attend != want {
                return Err(format!(
                    "at row {r} query {i} key {j} it {} attend, where {} {}",
                    if attend { "does" } else { "does not" },
                    kind.describe(),
                    if want { "does" } else { "does not" }
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_compare_and_causal_check() {
        let rows = IntTensor::new(vec![3, 1], vec![0, 1, 2]);
        let cols = IntTensor::new(vec![1, 3], vec![0, 1, 2]);
        let m = binary(&cols, &rows, |a, b| (a <= b) as i64).unwrap();
        assert_eq!(m.data, vec![1, 0, 0, 1, 1, 0, 1, 1, 1]);
        let m4 = IntTensor::new(vec![1, 1, 3, 3], m.data.clone());
        assert!(check(&m4, 2, 3, &[0, 5], MaskKind::Causal).is_ok());
        let full = IntTensor::new(vec![1, 1, 3, 3], vec![1; 9]);
        let e = check(&full, 1, 3, &[0], MaskKind::Causal).unwrap_err();
        assert!(e.contains("query 0 key 1"), "{e}");
    }

    fn mask(seq: usize, f: &dyn Fn(usize, usize) -> bool) -> IntTensor {
        let data = (0..seq * seq).map(|k| f(k / seq, k % seq) as i64).collect();
        IntTensor::new(vec![1, 1, seq, seq], data)
    }

    #[test]
    fn a_sliding_window_is_told_from_causal_and_from_other_masks() {
        assert_eq!(classify(&mask(7, &|i, j| j <= i), 1, 7, &[0]), Ok(MaskKind::Causal));
        assert_eq!(classify(&mask(7, &|i, j| j <= i && i - j < 3), 1, 7, &[0]), Ok(MaskKind::Window(3)));
        // A window as wide as the sequence is the causal mask.
        assert_eq!(classify(&mask(7, &|i, j| j <= i && i - j < 7), 1, 7, &[0]), Ok(MaskKind::Causal));
        // Windowed except for one query that sees everything: neither.
        let e = classify(&mask(7, &|i, j| j <= i && (i - j < 3 || i == 4)), 1, 7, &[0]).unwrap_err();
        assert!(e.contains("query 3 key 0 it does not attend"), "{e}");
        assert!(classify(&mask(7, &|i, j| i - j.min(i) < 3), 1, 7, &[0]).is_err(), "attends to the future");
    }

    #[test]
    fn chunks_are_found_from_absolute_positions() {
        // Llama 4's local layers: positions p and q attend when q <= p and p / c == q / c.
        let chunked =
            |c: i64, off: i64| move |i: usize, j: usize| j <= i && (off + i as i64) / c == (off + j as i64) / c;
        assert_eq!(classify(&mask(12, &chunked(4, 0)), 1, 12, &[0]), Ok(MaskKind::Chunk(4)));
        // A row starting at 6: chunk starts at 8 (and 12, 16), still chunks of 4.
        assert_eq!(classify(&mask(12, &chunked(4, 6)), 1, 12, &[6]), Ok(MaskKind::Chunk(4)));
        // Chunks that ignore the row's first position (relative to the row) are not the host's.
        assert!(check(&mask(12, &chunked(4, 0)), 1, 12, &[6], MaskKind::Chunk(4)).is_err());
        // One chunk start at 9 from position 0 is chunks of 9; a second at 13 is not chunks.
        assert_eq!(classify(&mask(12, &chunked(9, 0)), 1, 12, &[0]), Ok(MaskKind::Chunk(9)));
        let uneven = |i: usize, j: usize| j <= i && (i < 9) == (j < 9) && (i < 13) == (j < 13);
        assert_eq!(classify(&mask(16, &uneven), 1, 16, &[0]).ok(), None);
        assert_eq!(floor_div(-7, 2), -4);
        assert_eq!(floor_div(7, -2), -4);
        assert_eq!(floor_div(-8, 2), -4);
    }

    #[test]
    fn cat_and_strides() {
        let a = IntTensor::new(vec![2, 1], vec![1, 2]);
        let b = IntTensor::new(vec![2, 2], vec![3, 4, 5, 6]);
        assert_eq!(cat(&a, &b, 1).unwrap().data, vec![1, 3, 4, 2, 5, 6]);
        assert!(cat(&a, &b, 0).is_err());
    }
}

//! The ATen translation table of the torch-export importer: each node of the export's graph
//! (an ATen target with named arguments) as the host op of the same meaning, or an error naming
//! the node, what it lacks, and where in the user's model it came from.

use super::*;

impl Importer<'_> {
    pub(super) fn node(&mut self, b: &mut GraphBuilder, n: &Value) -> Result<()> {
        let target = n["target"].as_str().unwrap_or("?");
        // Nodes of torch 2.6/2.7 exports have no name of their own: they go by their first output.
        let name =
            n["name"].as_str().or_else(|| n["outputs"][0]["as_tensor"]["name"].as_str()).unwrap_or("?").to_string();
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
            self.values.get(t).copied().ok_or_else(|| {
                let why = if self.producers.get(t).is_some_and(|p| MASK_OPS.iter().any(|m| p["target"] == *m)) {
                    "which is built by attention-mask ops the host only takes as an SDPA attn_mask"
                } else {
                    "which is not defined before it"
                };
                unsupported(&format!("argument `{k}` reads `{t}`, {why}"))
            })
        };
        let is_none = |k: &str| args.get(k).is_none_or(|a| a.get("as_none").is_some());
        let int = |k: &str, default: i64| -> Result<i64> {
            if is_none(k) {
                return Ok(default);
            }
            args[k]["as_int"].as_i64().ok_or_else(|| unsupported(&format!("argument `{k}` is not an int")))
        };
        let float = |k: &str| -> Option<f64> {
            let a = args.get(k)?;
            a["as_float"].as_f64().or_else(|| a["as_int"].as_i64().map(|i| i as f64))
        };
        let boolean = |k: &str| args.get(k).and_then(|a| a["as_bool"].as_bool()).unwrap_or(false);
        let sizes = |k: &str| {
            args.get(k)
                .and_then(|a| self.size_list(a))
                .ok_or_else(|| unsupported(&format!("argument `{k}` is not a size list the host understands")))
        };
        let short = target.strip_prefix("torch.ops.aten.").unwrap_or(target);
        // Splits into several outputs (a fused gate/up chunked in two): one slice each.
        if let "chunk.default" | "split.Tensor" | "split_with_sizes.default" = short {
            let x = tensor("self")?;
            let dim = int("dim", 0)?;
            let shape = &b.meta(x).shape;
            let d = autodeploy_core::ops::norm_dim(&Op::cat(dim), dim, shape.len())
                .map_err(|e| unsupported(&e.to_string()))?;
            let len = shape[d].as_static().ok_or_else(|| unsupported("a split along a dynamic dim"))?;
            let outs: Vec<String> = n["outputs"][0]["as_tensors"]
                .as_array()
                .map(|v| v.iter().filter_map(|t| t["name"].as_str().map(str::to_string)).collect())
                .ok_or_else(|| unsupported("its outputs are not a tensor list"))?;
            let sizes: Vec<usize> = match short {
                "split_with_sizes.default" => args
                    .get("split_sizes")
                    .and_then(|a| a["as_ints"].as_array())
                    .map(|v| v.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
                    .ok_or_else(|| unsupported("argument `split_sizes` is not an int list"))?,
                _ => {
                    let each = match short {
                        "chunk.default" => len.div_ceil(int("chunks", 1)?.max(1) as usize),
                        _ => int("split_size", 1)?.max(1) as usize,
                    };
                    (0..len.div_ceil(each)).map(|i| each.min(len - i * each)).collect()
                }
            };
            if sizes.len() != outs.len() || sizes.iter().sum::<usize>() != len {
                return Err(unsupported(&format!("{} pieces of {sizes:?} for a dim of {len}", outs.len())));
            }
            let mut start = 0;
            for (o, size) in outs.iter().zip(sizes) {
                let op = Op::slice(Slice { dim, start: start as i64, end: (start + size) as i64, step: 1 });
                let v = b.op(o, op, &[x]).map_err(|e| unsupported(&format!("its shapes do not check: {e}")))?;
                self.values.insert(o.clone(), v);
                start += size;
            }
            return Ok(());
        }
        // `repeat_interleave(x, n, dim)` with a constant count (OpenELM's GQA: each KV head
        // repeated for its query group): unsqueeze after `dim`, expand it to n, merge the two,
        // which is transformers' repeat_kv, so the attention matchers see GQA either way.
        if short == "repeat_interleave.self_int" {
            let x = tensor("self")?;
            let shape = b.meta(x).shape.clone();
            let dim =
                autodeploy_core::ops::norm_dim(&Op::cat(0), int("dim", i64::MIN)?, shape.len()).map_err(|_| {
                    unsupported("argument `dim` is missing or out of range (a flattening repeat is not supported)")
                })?;
            let r = usize::try_from(int("repeats", 0)?)
                .ok()
                .filter(|&r| r > 0)
                .ok_or_else(|| unsupported("argument `repeats` is not a positive int"))?;
            let out = output_names(n).first().map(|o| o.to_string()).ok_or_else(|| unsupported("it has no output"))?;
            let mut wide: Vec<SizeArg> = shape.iter().cloned().map(SizeArg::Dim).collect();
            wide.insert(dim + 1, SizeArg::Dim(Dim::new(r)));
            let mut merged: Vec<SizeArg> = shape.iter().cloned().map(SizeArg::Dim).collect();
            merged[dim] = SizeArg::Dim(
                shape[dim]
                    .as_static()
                    .map(|d| Dim::new(d * r))
                    .ok_or_else(|| unsupported("a repeat along a dynamic dim"))?,
            );
            let check = |e: autodeploy_core::Error| unsupported(&format!("its shapes do not check: {e}"));
            let u = b.op(&format!("{out}.unsqueezed"), Op::unsqueeze(dim as i64 + 1), &[x]).map_err(check)?;
            let e = b.op(&format!("{out}.expanded"), Op::expand(wide), &[u]).map_err(check)?;
            let v = b.op(&out, Op::reshape(merged), &[e]).map_err(check)?;
            self.values.insert(out, v);
            return Ok(());
        }
        let translated: Option<(Op, Vec<ValueId>)> = match short {
            "layer_norm.default" => {
                let x = tensor("input")?;
                let shape = args
                    .get("normalized_shape")
                    .and_then(|a| self.size_list(a))
                    .ok_or_else(|| unsupported("argument `normalized_shape` is not a size list"))?;
                if shape.len() != 1 || is_none("weight") || is_none("bias") {
                    return Err(unsupported("layer_norm over more than the last dim, or without weight and bias"));
                }
                let eps = float("eps").unwrap_or(1e-5);
                Some((Op::layer_norm(eps), vec![x, tensor("weight")?, tensor("bias")?]))
            }
            "embedding.default" => Some((Op::embedding(), vec![tensor("weight")?, tensor("indices")?])),
            "linear.default" => {
                let mut ins = vec![tensor("input")?, tensor("weight")?];
                if !is_none("bias") {
                    ins.push(tensor("bias")?);
                }
                Some((Op::linear(), ins))
            }
            "matmul.default" => Some((Op::matmul(), vec![tensor("self")?, tensor("other")?])),
            "log_softmax.int" | "_log_softmax.default" => {
                if !is_none("dtype") {
                    return Err(unsupported("log_softmax with a dtype"));
                }
                Some((Op::log_softmax(int("dim", -1)?), vec![tensor("self")?]))
            }
            "_softmax.default" | "softmax.int" => Some((Op::softmax(int("dim", -1)?), vec![tensor("self")?])),
            // The unary ops of the op table (ops/unary.rs), by their ATen targets.
            "gelu.default" => {
                let approx = args.get("approximate").and_then(|a| a["as_string"].as_str()).unwrap_or("none");
                let op = autodeploy_core::custom_op::op("aten.gelu", &format!("approximate={approx}"))
                    .map_err(|_| unsupported(&format!("gelu approximate=`{approx}`")))?;
                Some((op, vec![tensor("self")?]))
            }
            t if autodeploy_core::ops::unary::from_aten(t).is_some() => {
                let name = autodeploy_core::ops::unary::from_aten(t).unwrap_or_default();
                Some((Op::unary(name), vec![tensor("self")?]))
            }
            // scripts/export.py's MoE patch (AutoDeploy's way): one op for a sparse block.
            "torch.ops.autodeploy.torch_moe.default" => {
                let top_k = usize::try_from(int("top_k", 0)?)
                    .ok()
                    .filter(|&k| k >= 1)
                    .ok_or_else(|| unsupported("argument `top_k` must be at least 1"))?;
                let op = Op::moe(autodeploy_core::ops::moe::Moe {
                    top_k,
                    norm: boolean("norm"),
                    act: autodeploy_core::ops::linear::GateAct::Silu,
                    weights_f32: boolean("weights_f32"),
                    // Absent in archives of the patch before Llama 4's: softmax.
                    router: match args.get("router").and_then(|a| a["as_string"].as_str()) {
                        None | Some("softmax") => autodeploy_core::ops::moe::Router::Softmax,
                        Some("sigmoid") => autodeploy_core::ops::moe::Router::Sigmoid,
                        Some(r) => {
                            return Err(unsupported(&format!("argument `router` is `{r}`, not softmax or sigmoid")))
                        }
                    },
                    expert_offset: None,
                    router_weight: false,
                });
                Some((op, vec![tensor("x")?, tensor("router_logits")?, tensor("w_gate_up")?, tensor("w_down")?]))
            }
            // Scores plus an additive mask (the eager attention form): the mask evaluated as
            // causal, or a sliding window, and the scores masked by `causal_mask`.
            "add.Tensor"
                if args
                    .get("other")
                    .and_then(|a| a["as_tensor"]["name"].as_str())
                    .is_some_and(|t| self.additive_mask(t).is_some()) =>
            {
                let m =
                    args["other"]["as_tensor"]["name"].as_str().and_then(|t| self.additive_mask(t)).unwrap_or_default();
                let window = match self.mask_kind(&m) {
                    Ok(mask::MaskKind::Causal) => None,
                    Ok(mask::MaskKind::Window(w)) => Some(w),
                    Ok(mask::MaskKind::Chunk(c)) => {
                        return Err(unsupported(&format!(
                            "eager attention with chunks of {c} positions (export the model with SDPA attention)"
                        )))
                    }
                    Err(e) => return Err(unsupported(&format!("{e}; {MASKS_TAKEN}"))),
                };
                if window.is_some() {
                    self.windows += 1;
                }
                Some((Op::causal_mask(window), vec![tensor("self")?]))
            }
            "add.Tensor" | "sub.Tensor" | "mul.Tensor" | "div.Tensor" | "add.Scalar" | "sub.Scalar" | "mul.Scalar"
            | "div.Scalar" => {
                let alpha = float("alpha").unwrap_or(1.0);
                let kind = &short[..3];
                if args.get("other").is_some_and(|a| a.get("as_tensor").is_some()) {
                    if alpha != 1.0 {
                        return Err(unsupported("add/sub of a tensor with alpha != 1"));
                    }
                    let op = match kind {
                        "add" => Op::binary(ADD),
                        "sub" => Op::binary(SUB),
                        "mul" => Op::binary(MUL),
                        _ => Op::binary(DIV),
                    };
                    Some((op, vec![tensor("self")?, tensor("other")?]))
                } else {
                    let x = float("other").ok_or_else(|| unsupported("argument `other` is not a tensor or number"))?;
                    let op = match kind {
                        "add" => Op::scalar(ADD_SCALAR, alpha * x),
                        "sub" => Op::scalar(ADD_SCALAR, -alpha * x),
                        "mul" => Op::scalar(MUL_SCALAR, x),
                        _ => Op::scalar(DIV_SCALAR, x),
                    };
                    Some((op, vec![tensor("self")?]))
                }
            }
            "pow.Tensor_Scalar" => {
                let e = float("exponent").ok_or_else(|| unsupported("argument `exponent` is not a number"))?;
                Some((Op::scalar(POW_SCALAR, e), vec![tensor("self")?]))
            }
            "mean.dim" => {
                if !is_none("dtype") {
                    return Err(unsupported("mean with a dtype"));
                }
                let dims = args
                    .get("dim")
                    .and_then(|a| a["as_ints"].as_array())
                    .map(|v| v.iter().filter_map(Value::as_i64).collect::<Vec<_>>())
                    .ok_or_else(|| unsupported("argument `dim` is not an int list"))?;
                Some((Op::mean(dims, boolean("keepdim")), vec![tensor("self")?]))
            }
            "to.dtype" | "to.dtype_layout" | "to.device" | "_to_copy.default" => {
                let x = tensor("self")?;
                let want = match args.get("dtype").and_then(|a| a["as_scalar_type"].as_i64()) {
                    Some(c) => Some(scalar_type(c).ok_or_else(|| unsupported(&format!("dtype code {c}")))?),
                    None => None,
                };
                match want {
                    Some(d) if d != b.meta(x).dtype => Some((Op::to_dtype(d), vec![x])),
                    _ => None,
                }
            }
            // Ops that pass their input through: the output is the input's value.
            "alias.default" | "clone.default" | "contiguous.default" | "lift_fresh_copy.default" => None,
            // Dropout in an eval-mode export (train false) passes its input through.
            "dropout.default" if !boolean("train") => None,
            "type_as.default" => {
                let (x, other) = (tensor("self")?, tensor("other")?);
                match b.meta(other).dtype {
                    d if d != b.meta(x).dtype => Some((Op::to_dtype(d), vec![x])),
                    _ => None,
                }
            }
            "view.default" | "_unsafe_view.default" => Some((Op::view(sizes("size")?), vec![tensor("self")?])),
            "reshape.default" => Some((Op::reshape(sizes("shape")?), vec![tensor("self")?])),
            "expand.default" => Some((Op::expand(sizes("size")?), vec![tensor("self")?])),
            "transpose.int" => Some((Op::transpose(int("dim0", 0)?, int("dim1", 1)?), vec![tensor("self")?])),
            "unsqueeze.default" => Some((Op::unsqueeze(int("dim", 0)?), vec![tensor("self")?])),
            "slice.Tensor" => {
                let op = Op::slice(Slice {
                    dim: int("dim", 0)?,
                    start: int("start", 0)?,
                    end: int("end", i64::MAX)?,
                    step: int("step", 1)?,
                });
                Some((op, vec![tensor("self")?]))
            }
            "cat.default" => {
                let names = args
                    .get("tensors")
                    .and_then(|a| a["as_tensors"].as_array())
                    .ok_or_else(|| unsupported("argument `tensors` is not a tensor list"))?;
                let mut ins = Vec::new();
                for t in names {
                    let t = t["name"].as_str().unwrap_or("?");
                    ins.push(self.values.get(t).copied().ok_or_else(|| {
                        unsupported(&format!("argument `tensors` reads `{t}`, which is not defined before it"))
                    })?);
                }
                Some((Op::cat(int("dim", 0)?), ins))
            }
            "scaled_dot_product_attention.default" => {
                if float("dropout_p").is_some_and(|p| p != 0.0) {
                    return Err(unsupported("SDPA with dropout"));
                }
                let mut is_causal = boolean("is_causal");
                let mut scoring = Scoring::default();
                if !is_none("attn_mask") {
                    let m = args["attn_mask"]["as_tensor"]["name"]
                        .as_str()
                        .ok_or_else(|| unsupported("argument `attn_mask` is not a tensor"))?;
                    if is_causal {
                        return Err(unsupported("SDPA with both a mask and is_causal"));
                    }
                    match self.mask_kind(m).map_err(|e| unsupported(&format!("{e}; {MASKS_TAKEN}")))? {
                        mask::MaskKind::Causal => {}
                        mask::MaskKind::Window(w) => {
                            self.windows += 1;
                            scoring.window = Some(w);
                        }
                        mask::MaskKind::Chunk(c) => {
                            self.windows += 1;
                            scoring.chunk = Some(c);
                        }
                    }
                    is_causal = true;
                }
                let (scale, enable_gqa) = (float("scale"), boolean("enable_gqa"));
                let op = Op::sdpa(SdpaAttrs { is_causal, scale, enable_gqa, scoring });
                Some((op, vec![tensor("query")?, tensor("key")?, tensor("value")?]))
            }
            _ => return Err(unsupported("not supported yet")),
        };
        let outs = n["outputs"].as_array().cloned().unwrap_or_default();
        let out = match outs.as_slice() {
            [o] => {
                o["as_tensor"]["name"].as_str().ok_or_else(|| unsupported("its output is not one tensor"))?.to_string()
            }
            _ => return Err(unsupported("it has more than one output")),
        };
        let v = match translated {
            // An op that changes nothing (a whole-dim slice, which torch 2.6/2.7 exports spell
            // out; a view to the shape its input has) is its input.
            Some((op, inputs)) if inputs.first().is_some_and(|&x| is_identity(&op, b.meta(x))) => inputs[0],
            Some((op, inputs)) => {
                b.op(&out, op, &inputs).map_err(|e| unsupported(&format!("its shapes do not check: {e}")))?
            }
            // An identity op: its one tensor argument.
            None => tensor(if args.contains_key("self") { "self" } else { "input" })?,
        };
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

/// Whether `op` on `x` gives `x` back: a slice from 0 to the end with step 1, or a view,
/// reshape, expand or slice whose shape rule returns `x`'s own shape.
fn is_identity(op: &Op, x: &autodeploy_core::TensorMeta) -> bool {
    match op.slice_of() {
        Some(Slice { start: 0, end: i64::MAX, step: 1, .. }) => true,
        _ if op.slice_of().is_some() || op.view_sizes().is_some() || op.expand_sizes().is_some() => {
            autodeploy_core::ops::infer(op, std::slice::from_ref(x)).is_ok_and(|o| o.first() == Some(x))
        }
        _ => false,
    }
}

/// The ATen targets this importer translates into graph ops.
const SUPPORTED: &[&str] = &[
    "embedding",
    "linear",
    "matmul",
    "gelu",
    "log_softmax",
    "_softmax",
    "silu, neg, rsqrt, cos, sin, tanh, floor, log1p (the unary ops)",
    "add/sub/mul/div (tensor or scalar)",
    "pow.Tensor_Scalar",
    "mean.dim",
    "to/_to_copy",
    "alias/clone/contiguous, dropout (eval), type_as, chunk/split (into slices), layer_norm (last dim)",
    "view",
    "reshape",
    "expand",
    "transpose.int",
    "unsqueeze",
    "repeat_interleave (a constant count along a dim)",
    "slice.Tensor",
    "cat",
    "scaled_dot_product_attention (causal, or with the causal, sliding-window or chunked mask transformers builds)",
    "the eager attention's scores plus that mask as an additive tensor (`causal_mask`)",
    "autodeploy::torch_moe (scripts/export.py's patch of mixture-of-experts blocks; softmax or sigmoid routing)",
];

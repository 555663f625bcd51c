//! Op lowering: every node of the graph as the kernels it launches on the step's stream, at the
//! addresses the plan gave it (`enqueue`), and the helpers only lowering uses.

use super::*;
use autodeploy_kernels::cuda::exec::ScoreMods;

/// Fills `n` values of `dtype` at `p` with the debug checks' mark for values never written.
pub(super) fn mark_unwritten(gpu: &Gpu, p: Ptr, dtype: DType, n: usize) -> Result<()> {
    let bits = autodeploy_core::custom_op::UNWRITTEN.to_bits();
    let (elem, pattern) = match dtype {
        DType::F32 => (4, bits),
        DType::BF16 => (2, bits >> 16),
        DType::F16 => (2, half::f16::from_f32(autodeploy_core::custom_op::UNWRITTEN).to_bits() as u32),
        d => return Err(Error::Msg(format!("debug_checks: no mark for {d} outputs"))),
    };
    gpu.memset_bits(p, elem, pattern, n).map_err(gpu_err)
}

/// `n` values of `dtype` at `p`, as f32 on the host (after the stream finishes).
pub(super) fn read_back(gpu: &Gpu, p: Ptr, dtype: DType, n: usize) -> Result<Vec<f32>> {
    let mut bytes = vec![0u8; n * dtype.size_in_bytes()];
    gpu.download(p, &mut bytes).map_err(gpu_err)?;
    Ok(match dtype {
        DType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        d => return Err(Error::Msg(format!("debug_checks: cannot read {d} outputs"))),
    })
}

/// A strided view (`src` read through `strides`, shape `xs`) copied to contiguous memory at `to`.
pub(super) fn copy_contiguous(
    gpu: &Gpu,
    src: Ptr,
    d: Dt,
    xs: &[usize],
    strides: &[i64],
    to: Ptr,
) -> std::result::Result<(), Unavailable> {
    let s = Strided::new(xs, strides, &vec![0; xs.len()])?;
    gpu.copy_strided(src, d, to, d, xs.iter().product(), s, false)
}

impl CudaModel {
    /// Queues every node's kernels for inputs of these shapes (nothing is read back).
    pub(super) fn enqueue(&self, bind: &Bindings, staged: &Staged, capturing: bool) -> Result<(Ptr, Vec<usize>)> {
        let g = &self.graph;
        let gpu = &self.gpu;
        let mut ptr: Vec<Ptr> = vec![0; g.values.len()];
        // Strided views: a view op's output is its input's memory read through `lay` strides
        // (None: contiguous), copied to `home` (the view op's planned memory) by the first node
        // that reads it as contiguous memory.
        let mut lay: Vec<Option<Vec<i64>>> = vec![None; g.values.len()];
        let mut home: Vec<Ptr> = vec![0; g.values.len()];
        for (&v, &p) in g.inputs.iter().zip(&staged.input_ptrs) {
            ptr[v.0 as usize] = p;
        }
        for (&v, &p) in &self.param_ptr {
            ptr[v] = p;
        }
        gpu.memset(self.flags.ptr, 64).map_err(gpu_err)?;
        let shape_of = |v: autodeploy_core::ValueId| eval_shape(&g.meta(v).shape, bind);
        let dt_of = |v: autodeploy_core::ValueId| dt(g.meta(v).dtype, &g.value(v).name);
        // The dtype a value's elements are copied as: E4M3 codes (`quant=fp8` outputs, and the
        // layout ops over them) move as bytes (a copy between equal dtypes moves raw elements).
        let copy_dt = |v: autodeploy_core::ValueId| match g.meta(v).dtype {
            DType::F8E4M3 => Ok(Dt::Bool),
            _ => dt_of(v),
        };
        let base = self.arena.ptr;
        // Per-op times (synchronising after every node) when profiling and not capturing.
        let profiling = self.profile_on && !capturing;
        for (i, node) in g.nodes.iter().enumerate() {
            // Outputs past the first live in their planned memory (the ops that have them write
            // there); the first may be a view of an input or the attention's own layout.
            for (&o, &at) in node.outputs.iter().zip(&self.plan[i].outs).skip(1) {
                ptr[o.0 as usize] = base + at as u64;
            }
            if !self.skip_ops.is_empty() && self.skip_ops.iter().any(|s| s == node.op.name()) {
                // Timing only: the node is not run; its output is whatever its memory holds.
                ptr[node.outputs[0].0 as usize] = base + self.plan[i].outs[0] as u64;
                continue;
            }
            let outv = node.outputs[0];
            let name = &g.value(outv).name;
            let out_shape = shape_of(outv)?;
            // (Asked only where a view needs it: an op writing E4M3 codes, `quant=fp8`, has an
            // output dtype no executor kernel takes as a code; views move them as bytes.)
            let odt = || copy_dt(outv);
            let n_out: usize = out_shape.iter().product();
            let planned = base + self.plan[i].outs[0] as u64;
            // A view op's output in its input's memory (as its table entry says for this
            // input's layout), or None: the op runs its kernel.
            let view = match (&node.op, self.table[i].as_ref().and_then(|c| c.view)) {
                (Op { attrs, .. }, Some(view_of)) => {
                    let x = node.inputs[0];
                    let xs = shape_of(x)?;
                    let st = lay[x.0 as usize].clone().unwrap_or_else(|| contiguous_strides(&xs));
                    let v = view_of(&ViewIn {
                        attrs,
                        in_shape: &xs,
                        in_strides: &st,
                        in_dtype: g.meta(x).dtype,
                        out_shape: &out_shape,
                        out_dtype: g.meta(outv).dtype,
                    });
                    (v != View::Kernel).then_some(v)
                }
                _ => None,
            };
            // What may stay strided: a view's input; the q, k and v of a RoPE-fused cached
            // attention whose RoPE + KV write kernel reads them in place.
            let attn_strided = self.attn_attrs[i].is_some() && self.attn_reads_strided(i, staged);
            let strided_ok = |v: autodeploy_core::ValueId| {
                if view.is_some() {
                    v == node.inputs[0]
                } else {
                    attn_strided && node.inputs[..3].contains(&v)
                }
            };
            for &v in &node.inputs {
                let vi = v.0 as usize;
                if lay[vi].is_none() || strided_ok(v) {
                    continue;
                }
                let (xs, xdt) = (shape_of(v)?, copy_dt(v)?);
                let st = lay[vi].take().unwrap_or_default();
                let to = home[vi];
                if to == 0 {
                    return Err(Error::Op {
                        op: node.op.name().into(),
                        msg: format!(
                            "node `{name}`: input `{}` is strided with no memory to copy it to",
                            g.value(v).name
                        ),
                    });
                }
                copy_contiguous(gpu, ptr[vi], xdt, &xs, &st, to).map_err(|e| Error::Op {
                    op: node.op.name().into(),
                    msg: format!("node `{name}`: copying input `{}` to contiguous memory: {}", g.value(v).name, e.0),
                })?;
                ptr[vi] = to;
            }
            let mut out_lay: Option<Vec<i64>> = None;
            let scratch = |k: usize| base + self.plan[i].scratch[k] as u64;
            let inp = |k: usize| ptr[node.inputs[k].0 as usize];
            let in_lay = |k: usize| lay[node.inputs[k].0 as usize].as_deref();
            let in_shape = |k: usize| shape_of(node.inputs[k]);
            let fail = |e: Unavailable| Error::Op { op: node.op.name().into(), msg: format!("node `{name}`: {}", e.0) };
            let mut out = planned;
            let t0 = profiling.then(std::time::Instant::now);
            match (&node.op, self.attn_attrs[i].as_ref()) {
                _ if view.is_some() => match view.as_ref() {
                    Some(View::Strided { offset, strides }) => {
                        out = inp(0) + (offset * odt()?.size() as i64) as u64;
                        out_lay = (!is_contiguous(&out_shape, strides)).then(|| strides.clone());
                    }
                    _ => match in_lay(0) {
                        // No strides say it: the input copied here, contiguous.
                        Some(st) => copy_contiguous(gpu, inp(0), odt()?, &in_shape(0)?, st, planned).map_err(fail)?,
                        None => out = inp(0),
                    },
                },
                (_, Some(CachedAttn { layer, scale, rope: fused_rope, qk_norm, scoring, fp8_out, .. })) => {
                    let meta = staged.meta.as_ref().ok_or_else(|| {
                        Error::Msg("this graph has cached attention: forward needs a step context".into())
                    })?;
                    let l = &self.cache[*layer];
                    let qs = in_shape(0)?;
                    let heads = qs[1];
                    let backend = &self.attn[self.attn_of[i]].1;
                    // Where the step's token rows of an operand lie (strided only where the
                    // backend reads them in place: `attn_reads_strided`).
                    let operand = |v: autodeploy_core::ValueId| -> Result<Operand> {
                        let rows = head_rows(&shape_of(v)?, lay[v.0 as usize].as_deref()).ok_or_else(|| {
                            fail(Unavailable(format!("`{}` has no contiguous head rows", g.value(v).name)))
                        })?;
                        Ok(Operand { ptr: ptr[v.0 as usize], rows })
                    };
                    // RoPE fused into this op: the raw q and k, and one cos/sin table each.
                    let rope = if *fused_rope {
                        let cs = shape_of(node.inputs[3])?;
                        if cs.len() < 2
                            || cs[cs.len() - 2..] != [qs[2], l.head_dim]
                            || cs[..cs.len() - 2].iter().any(|&x| x != 1)
                        {
                            return Err(fail(Unavailable(format!(
                                "cos/sin {cs:?} are not one [tokens, head_dim] table"
                            ))));
                        }
                        Some((inp(3), inp(4)))
                    } else {
                        None
                    };
                    // The attention's own dtype (q's), and where its values go: the output, or
                    // with `quant=fp8` the node's second scratch region, its codes then written
                    // token-major to the output (what the o projection reads).
                    let adt = g.meta(node.inputs[0]).dtype;
                    let values_at = if *fp8_out { scratch(1) } else { planned };
                    // The q/k norms fused too: their weights, one [head_dim] row each in the
                    // model's dtype, normalised in it (what the kernels round to).
                    let qk_norm = match qk_norm {
                        Some(n) => {
                            let bad = [5, 6].iter().find(|&&w| in_shape(w).ok() != Some(vec![l.head_dim]));
                            if n.norm_dtype != adt || bad.is_some() {
                                return Err(fail(Unavailable(format!(
                                    "q/k norms in {} with weights {:?}, {:?}: the kernels normalise in the model's dtype ({adt}) with [head_dim] weights",
                                    n.norm_dtype,
                                    in_shape(5)?,
                                    in_shape(6)?
                                ))));
                            }
                            Some((inp(5), inp(6), n.eps as f32))
                        }
                        None => None,
                    };
                    let call = DeviceAttentionCall {
                        layer: *layer,
                        scale: *scale as f32,
                        mods: ScoreMods {
                            window: scoring.window,
                            chunk: scoring.chunk,
                            softcap: scoring.softcap.map(|c| c as f32),
                            kv_fp8: scoring.kv_fp8.map(|(k, v)| (k as f32, v as f32)),
                        },
                        heads,
                        kv_heads: l.kv_heads,
                        head_dim: l.head_dim,
                        dtype: adt,
                        q: operand(node.inputs[0])?,
                        k: operand(node.inputs[1])?,
                        v: operand(node.inputs[2])?,
                        rope,
                        qk_norm,
                        scratch: if *fused_rope { scratch(0) } else { 0 },
                        out: values_at,
                        tokens_major_ok: self.attn_tokens_major[i] && backend.tokens_major_out(),
                        k_cache: l.k.ptr,
                        v_cache: l.v.ptr,
                        step: meta,
                    };
                    if self.debug_checks {
                        mark_unwritten(gpu, values_at, adt, n_out)?;
                    }
                    let rows = backend
                        .attend(&call, gpu)
                        .map_err(|e| Error::Op { op: node.op.name().into(), msg: format!("node `{name}`: {e}") })?;
                    if self.debug_checks {
                        let b = &self.attn[self.attn_of[i]].0;
                        let what = format!(
                            "attention backend `{b}` ({}), layer {layer} at node `{name}`",
                            autodeploy_core::registry::attention_backend_origin(b)
                        );
                        let vals = read_back(gpu, values_at, adt, n_out)?;
                        autodeploy_core::custom_op::check_output(&what, &vals)?;
                    }
                    if *fp8_out {
                        let s_in = inp(node.inputs.len() - 1);
                        gpu.e4m3_heads(values_at, dt(adt, name)?, rows, heads, qs[2], l.head_dim, s_in, planned)
                            .map_err(fail)?;
                        let st = vec![n_out as i64, l.head_dim as i64, (heads * l.head_dim) as i64, 1];
                        out_lay = (!is_contiguous(&out_shape, &st)).then_some(st);
                    } else if rows != HeadRows::heads_major(qs[2], l.head_dim) {
                        // The output [1, heads, tokens, d] at the rows' strides.
                        let st = vec![n_out as i64, rows.head, rows.token, 1];
                        out_lay = (!is_contiguous(&out_shape, &st)).then_some(st);
                    }
                }
                (Op { name: op_name, attrs }, None) => {
                    let c = autodeploy_core::registry::custom_op(op_name)
                        .ok_or_else(|| fail(Unavailable("no op of this name is registered".into())))?;
                    let cuda = c.cuda.clone().ok_or_else(|| fail(Unavailable("no CUDA kernel registered".into())))?;
                    let device = |v: autodeploy_core::ValueId, p: Ptr| -> Result<DeviceTensor> {
                        Ok(DeviceTensor { ptr: p, shape: shape_of(v)?, dtype: g.meta(v).dtype })
                    };
                    let ins = node.inputs.iter().map(|&v| device(v, ptr[v.0 as usize])).collect::<Result<Vec<_>>>()?;
                    // The first output at this node's planned memory, the others where the loop's
                    // start put them.
                    let outs = node
                        .outputs
                        .iter()
                        .enumerate()
                        .map(|(k, &v)| device(v, if k == 0 { planned } else { ptr[v.0 as usize] }))
                        .collect::<Result<Vec<_>>>()?;
                    let what = format!("op `{op_name}` ({}) at node `{name}`", c.origin);
                    let mut launcher = SourceLauncher {
                        gpu,
                        what: format!("plugin op `{op_name}` ({})", c.origin),
                        flags: self.flags.ptr,
                        scratch: self.plan[i].scratch.iter().map(|&at| base + at as u64).collect(),
                    };
                    // Checked: a library's op (the built-in ones are the host's own kernels).
                    let check = self.debug_checks && c.origin != "built-in";
                    if check {
                        for o in outs.iter().filter(|o| o.dtype.is_float()) {
                            mark_unwritten(gpu, o.ptr, o.dtype, o.shape.iter().product())?;
                        }
                    }
                    cuda(&ins, &outs, attrs, &mut launcher).map_err(|e| Error::Op {
                        op: op_name.to_string(),
                        msg: format!("node `{name}`: {e} (from {})", c.origin),
                    })?;
                    if check {
                        for o in outs.iter().filter(|o| o.dtype.is_float()) {
                            let vals = read_back(gpu, o.ptr, o.dtype, o.shape.iter().product())?;
                            autodeploy_core::custom_op::check_output(&what, &vals)?;
                        }
                    }
                }
            }
            if let Some(t0) = t0 {
                gpu.sync().map_err(gpu_err)?;
                let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
                let e = p.entry(node.op.name()).or_default();
                e.0 += 1;
                e.1 += t0.elapsed();
            }
            ptr[outv.0 as usize] = out;
            // (A strided output in the node's own memory, the attention's, has nowhere to go.)
            home[outv.0 as usize] = if out_lay.is_some() && out != planned { planned } else { 0 };
            lay[outv.0 as usize] = out_lay;
        }
        let o = g.outputs[0];
        if let Some(st) = &lay[o.0 as usize] {
            // A strided view as the output: made contiguous in its view op's memory.
            let xs = shape_of(o)?;
            copy_contiguous(gpu, ptr[o.0 as usize], dt_of(o)?, &xs, st, home[o.0 as usize]).map_err(gpu_err)?;
            return Ok((home[o.0 as usize], xs));
        }
        Ok((ptr[o.0 as usize], shape_of(o)?))
    }

    /// Whether cached attention node `i` reads this step's q, k, v in place (strided), as its
    /// backend says for this step's token count.
    pub(super) fn attn_reads_strided(&self, i: usize, staged: &Staged) -> bool {
        let tokens = staged.meta.as_ref().map_or(usize::MAX, |m| m.tokens);
        let rope = self.attn_attrs[i].as_ref().is_some_and(|a| a.rope);
        self.attn.get(self.attn_of[i]).is_some_and(|(_, b)| b.reads_strided(tokens, rope))
    }

    pub(super) fn note(&self, what: &'static str, d: std::time::Duration) {
        let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(what).or_default();
        e.0 += 1;
        e.1 += d;
    }
}

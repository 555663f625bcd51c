//! The gathers, each defined once here and registered in the op table: `aten.embedding(weight,
//! indices)` (rows of a table; a block-quantized table dequantizes only the rows it looks up)
//! and `aten.index_select(x, dim, index)` (the runtime's logits gather). Their CPU kernels
//! refuse an index out of range naming it; their CUDA kernels set the step's error flag
//! instead, which the executor reads back after the step.

use std::sync::Arc;

use crate::cpu::KernelOptions;
use crate::custom_op::{CudaImpl, CustomOp, DeviceTensor, ErrorFlag, KernelLauncher, Outputs};
use crate::dtype::DType;
use crate::ir::TensorMeta;
use crate::op_text::read_attrs;
use crate::ops::layout::dim_index;
use crate::ops::{cuda_dt, no_attrs, Op};
use crate::tensor::Tensor;

pub const EMBEDDING: &str = "aten.embedding";
/// A rank's slice of a vocabulary-split embedding (`detect_sharding`): rows `start..start +
/// rows` of a `vocab`-row table; ids outside the slice give zero rows (the ranks' rows then sum
/// to the table's in an `all_reduce`), ids outside `0..vocab` are refused as by `aten.embedding`.
pub const VOCAB_EMBEDDING: &str = "vocab_parallel_embedding";
pub const INDEX_SELECT: &str = "aten.index_select";

/// `vocab_parallel_embedding`'s attributes: the slice's first row and the whole table's rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabSlice {
    pub start: usize,
    pub vocab: usize,
}

fn parse_vocab(text: &str) -> Result<VocabSlice, String> {
    read_attrs(VOCAB_EMBEDDING, text, |a| {
        let (start, vocab) = (a.int("start")?, a.int("vocab")?);
        if start < 0 || vocab < 1 || start >= vocab {
            return Err(a.bad("start", &start.to_string(), &format!("a row inside the {vocab}-row table")));
        }
        Ok(VocabSlice { start: start as usize, vocab: vocab as usize })
    })
}

fn parse_dim(text: &str) -> Result<i64, String> {
    read_attrs(INDEX_SELECT, text, |a| a.int("dim"))
}

impl Op {
    pub fn embedding() -> Op {
        Op { name: EMBEDDING, attrs: String::new() }
    }
    pub fn vocab_embedding(v: VocabSlice) -> Op {
        Op { name: VOCAB_EMBEDDING, attrs: format!("start={}, vocab={}", v.start, v.vocab) }
    }
    pub fn vocab_embedding_of(&self) -> Option<VocabSlice> {
        self.attrs_of(VOCAB_EMBEDDING).and_then(|a| parse_vocab(a).ok())
    }
    pub fn index_select(dim: i64) -> Op {
        Op { name: INDEX_SELECT, attrs: format!("dim={dim}") }
    }
    pub fn index_select_dim(&self) -> Option<i64> {
        self.attrs_of(INDEX_SELECT).and_then(|a| parse_dim(a).ok())
    }
}

fn embedding_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    no_attrs(attrs)?;
    let (w, idx) = (&ins[0], &ins[1]);
    if w.shape.len() != 2 {
        return Err(format!("weight must be 2-D, got {w}"));
    }
    if idx.dtype != DType::I64 {
        return Err(format!("indices must be i64, got {idx}"));
    }
    let mut shape = idx.shape.clone();
    shape.push(w.shape[1].clone());
    // Block-quantized tables give f32 rows.
    let dtype = if w.dtype.is_block() { DType::F32 } else { w.dtype };
    Ok(vec![TensorMeta { dtype, shape }])
}

fn vocab_embedding_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let v = parse_vocab(attrs)?;
    let w = &ins[0];
    if w.dtype.is_block() || !w.dtype.is_float() {
        return Err(format!("the table slice must be f32, bf16 or f16, got {w}"));
    }
    if w.shape.first().and_then(|d| d.as_static()).is_none_or(|rows| v.start + rows > v.vocab) {
        return Err(format!("slice {w} from row {} does not fit a {}-row table", v.start, v.vocab));
    }
    embedding_rule(ins, "")
}

fn vocab_embedding_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let v = parse_vocab(attrs)?;
    let (w, idx) = (ins[0], ins[1]);
    let (rows, dim) = (w.shape()[0], w.shape()[1]);
    let ids = idx.to_i64();
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= v.vocab) {
        return Err(format!("index {bad} out of range for {} rows", v.vocab));
    }
    let mine = |i: i64| (v.start..v.start + rows).contains(&(i as usize));
    let local: Vec<i64> = ids.iter().map(|&i| if mine(i) { (i as usize - v.start) as i64 } else { 0 }).collect();
    let t = gather_rows(w, &local, 1, rows, dim, outs[0].1.clone())?;
    if ids.iter().all(|&i| mine(i)) {
        return Ok(vec![t]);
    }
    let mut b = t.to_le_bytes().map_err(|e| e.to_string())?;
    let row = dim * t.dtype().size_in_bytes();
    for (k, &i) in ids.iter().enumerate() {
        if !mine(i) {
            b[k * row..(k + 1) * row].fill(0);
        }
    }
    Tensor::from_le_bytes(t.dtype(), t.shape().to_vec(), &b).map_err(|e| e.to_string()).map(|t| vec![t])
}

fn index_select_rule(ins: &[TensorMeta], attrs: &str) -> Result<Vec<TensorMeta>, String> {
    let (x, idx) = (&ins[0], &ins[1]);
    let d = dim_index(parse_dim(attrs)?, x.shape.len())?;
    if idx.dtype != DType::I64 || idx.shape.len() != 1 {
        return Err(format!("index must be a 1-D i64 tensor, got {idx}"));
    }
    let mut shape = x.shape.clone();
    shape[d] = idx.shape[0].clone();
    Ok(vec![TensorMeta { dtype: x.dtype, shape }])
}

/// Rows `idx` of each of `outer` blocks of `len` rows of `inner` values.
fn gather_rows(
    x: &Tensor,
    idx: &[i64],
    outer: usize,
    len: usize,
    inner: usize,
    shape: Vec<usize>,
) -> Result<Tensor, String> {
    let data = crate::cpu::with_storage!(x.storage(), |v| {
        let mut out = Vec::with_capacity(outer * idx.len() * inner);
        for o in 0..outer {
            for &i in idx {
                let at = (o * len + i as usize) * inner;
                out.extend_from_slice(&v[at..at + inner]);
            }
        }
        out
    });
    Tensor::new(shape, data).map_err(|e| e.to_string())
}

fn embedding_cpu(
    ins: &[&Tensor],
    _: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let (w, idx) = (ins[0], ins[1]);
    let (rows, dim) = (w.shape()[0], w.shape()[1]);
    let ids = idx.to_i64();
    if let Some(&bad) = ids.iter().find(|&&i| i < 0 || i as usize >= rows) {
        return Err(format!("index {bad} out of range for {rows} rows"));
    }
    let (dt, shape) = (outs[0].0, outs[0].1.clone());
    if let Some((ty, bytes)) = w.as_blocks() {
        // Dequantize only the rows looked up.
        let rb = dim / ty.block().0 * ty.block().1;
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &i in ids.iter() {
            out.extend(crate::gguf::dequantize(ty, &bytes[i as usize * rb..(i as usize + 1) * rb]));
        }
        return Ok(vec![Tensor::from_f32_as(dt, shape, out).map_err(|e| e.to_string())?]);
    }
    Ok(vec![gather_rows(w, &ids, 1, rows, dim, shape)?])
}

fn index_select_cpu(
    ins: &[&Tensor],
    attrs: &str,
    outs: &[(DType, Vec<usize>)],
    _: &KernelOptions,
) -> Result<Vec<Tensor>, String> {
    let x = ins[0];
    let d = dim_index(parse_dim(attrs)?, x.rank())?;
    let idx = ins[1].to_i64();
    let len = x.shape()[d];
    if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i as usize >= len) {
        return Err(format!("index {bad} out of range for size {len}"));
    }
    let outer: usize = x.shape()[..d].iter().product();
    let inner: usize = x.shape()[d + 1..].iter().product();
    Ok(vec![gather_rows(x, &idx, outer, len, inner, outs[0].1.clone())?])
}

fn flag(l: &dyn KernelLauncher, f: ErrorFlag) -> Result<u64, String> {
    l.error_flag(f).ok_or_else(|| "needs the executor's error flags".to_string())
}

fn embedding_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], _: &str, l: &mut dyn KernelLauncher| {
        let (w, ids, y) = (&ins[0], &ins[1], &outs[0]);
        let row_bytes = w.shape[1] * cuda_dt(w.dtype)?.size();
        let tokens = ids.shape.iter().product();
        let at = flag(l, ErrorFlag::Embedding)?;
        let gpu = crate::ops::gpu_of(l)?;
        let rows = w.shape[0];
        gpu.embedding(w.ptr, ids.ptr, y.ptr, tokens, row_bytes, (rows, 0, rows), at).map_err(|e| e.0)
    })
}

fn vocab_embedding_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let v = parse_vocab(attrs)?;
        let (w, ids, y) = (&ins[0], &ins[1], &outs[0]);
        let row_bytes = w.shape[1] * cuda_dt(w.dtype)?.size();
        let tokens = ids.shape.iter().product();
        let at = flag(l, ErrorFlag::Embedding)?;
        let gpu = crate::ops::gpu_of(l)?;
        gpu.embedding(w.ptr, ids.ptr, y.ptr, tokens, row_bytes, (w.shape[0], v.start, v.vocab), at).map_err(|e| e.0)
    })
}

fn index_select_cuda() -> CudaImpl {
    Arc::new(|ins: &[DeviceTensor], outs: &[DeviceTensor], attrs: &str, l: &mut dyn KernelLauncher| {
        let (x, idx, y) = (&ins[0], &ins[1], &outs[0]);
        let d = dim_index(parse_dim(attrs)?, x.shape.len())?;
        let outer: usize = x.shape[..d].iter().product();
        let inner: usize = x.shape[d + 1..].iter().product();
        let nidx = idx.shape.iter().product();
        let at = flag(l, ErrorFlag::Gather)?;
        let gpu = crate::ops::gpu_of(l)?;
        gpu.index_select(x.ptr, idx.ptr, y.ptr, outer, nidx, x.shape[d], inner * cuda_dt(y.dtype)?.size(), at)
            .map_err(|e| e.0)
    })
}

/// The gathers as op-table entries.
pub fn ops() -> Vec<CustomOp> {
    let entry = |name, rule: fn(&[TensorMeta], &str) -> Result<Vec<TensorMeta>, String>, check, cpu, cuda| CustomOp {
        cuda: Some(cuda),
        ..CustomOp::built_in(name, 2, Outputs::Rule(Arc::new(rule)), check, cpu)
    };
    vec![
        entry(EMBEDDING, embedding_rule, no_attrs, Arc::new(embedding_cpu), embedding_cuda()),
        entry(
            INDEX_SELECT,
            index_select_rule,
            |a| parse_dim(a).map(|_| ()),
            Arc::new(index_select_cpu),
            index_select_cuda(),
        ),
        entry(
            VOCAB_EMBEDDING,
            vocab_embedding_rule,
            |a| parse_vocab(a).map(|_| ()),
            Arc::new(vocab_embedding_cpu),
            vocab_embedding_cuda(),
        ),
    ]
}

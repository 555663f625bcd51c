//! Ops from their text form: the name and attribute text a graph dump prints
//! (`aten.slice.Tensor` with `dim=-1, start=0, end=64`), the inverse of [`Op::name`] and
//! [`Op::attrs`]. Plugins build and rewrite graphs across the ABI with this spelling, so an op
//! any dump shows can be written back by name.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::Op;
use crate::shape::{Dim, SizeArg};

/// The op named `name` with attributes `attrs` (as [`Op::attrs`] prints them); plugin ops
/// (registered with `custom_op`) by their own name and attribute text.
pub fn parse_op(name: &str, attrs: &str) -> Result<Op> {
    crate::custom_op::op(name, attrs)
}

/// Reads attribute text `text` of op `op` with `read`, every attribute used: what an op
/// table entry's attribute check and kernels call; the error names the attribute, not the op.
pub(crate) fn read_attrs<T>(
    op: &str,
    text: &str,
    read: impl FnOnce(&mut Attrs) -> Result<T>,
) -> std::result::Result<T, String> {
    let inner = |e: Error| match e {
        Error::Op { msg, .. } => msg,
        e => e.to_string(),
    };
    let mut a = Attrs::new(op, text).map_err(inner)?;
    let v = read(&mut a).map_err(inner)?;
    a.finish().map_err(inner)?;
    Ok(v)
}

/// Attribute text split at its top-level commas: `key=value` items and positional ones.
pub(crate) struct Attrs<'a> {
    op: &'a str,
    keyed: Vec<(&'a str, &'a str)>,
    positional: std::collections::VecDeque<&'a str>,
}

impl<'a> Attrs<'a> {
    pub(crate) fn new(op: &'a str, text: &'a str) -> Result<Attrs<'a>> {
        let mut items = Vec::new();
        let (mut depth, mut start) = (0i32, 0usize);
        for (i, c) in text.char_indices() {
            match c {
                '[' | '(' => depth += 1,
                ']' | ')' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
            if depth < 0 {
                return Err(Error::op(op, format!("unbalanced brackets in attributes `{text}`")));
            }
        }
        if depth != 0 {
            return Err(Error::op(op, format!("unbalanced brackets in attributes `{text}`")));
        }
        items.push(&text[start..]);
        let mut a = Attrs { op, keyed: Vec::new(), positional: Default::default() };
        for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((k, v)) if !k.trim().starts_with('[') => a.keyed.push((k.trim(), v.trim())),
                _ => a.positional.push_back(item),
            }
        }
        Ok(a)
    }

    pub(crate) fn take(&mut self, key: &str) -> Option<&'a str> {
        let i = self.keyed.iter().position(|(k, _)| *k == key)?;
        Some(self.keyed.remove(i).1)
    }

    pub(crate) fn missing(&self, key: &str) -> Error {
        Error::op(self.op, format!("attribute `{key}` is missing"))
    }

    pub(crate) fn bad(&self, key: &str, value: &str, want: &str) -> Error {
        Error::op(self.op, format!("attribute `{key}` is `{value}`, not {want}"))
    }

    pub(crate) fn as_i64(&self, key: &str, v: &str) -> Result<i64> {
        v.parse().map_err(|_| self.bad(key, v, "an integer"))
    }

    fn as_f64(&self, key: &str, v: &str) -> Result<f64> {
        v.parse().map_err(|_| self.bad(key, v, "a number"))
    }

    fn as_bool(&self, key: &str, v: &str) -> Result<bool> {
        match v {
            "true" | "True" => Ok(true),
            "false" | "False" => Ok(false),
            _ => Err(self.bad(key, v, "true or false")),
        }
    }

    pub(crate) fn int(&mut self, key: &str) -> Result<i64> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_int(&mut self, key: &str) -> Result<Option<i64>> {
        self.take(key).map(|v| self.as_i64(key, v)).transpose()
    }

    pub(crate) fn f64(&mut self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_f64(&mut self, key: &str) -> Result<Option<f64>> {
        self.take(key).map(|v| self.as_f64(key, v)).transpose()
    }

    pub(crate) fn bool(&mut self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_bool(&mut self, key: &str) -> Result<Option<bool>> {
        self.take(key).map(|v| self.as_bool(key, v)).transpose()
    }

    pub(crate) fn dtype(&mut self, key: &str) -> Result<DType> {
        let v = self.take(key).ok_or_else(|| self.missing(key))?;
        DType::parse(v).ok_or_else(|| self.bad(key, v, "a dtype (f32, bf16, f16, i64, bool)"))
    }

    pub(crate) fn opt_int_list(&mut self, key: &str) -> Result<Option<Vec<i64>>> {
        if self.keyed.iter().any(|(k, _)| *k == key) {
            self.int_list(key).map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn int_list(&mut self, key: &str) -> Result<Vec<i64>> {
        let v = self.take(key).ok_or_else(|| self.missing(key))?;
        let inner = v.strip_prefix('[').and_then(|s| s.strip_suffix(']')).ok_or_else(|| self.bad(key, v, "a list"))?;
        inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|x| self.as_i64(key, x)).collect()
    }

    fn positional(&mut self, what: &str) -> Result<&'a str> {
        self.positional.pop_front().ok_or_else(|| Error::op(self.op, format!("{what} is missing")))
    }

    pub(crate) fn positional_i64(&mut self) -> Result<i64> {
        let v = self.positional("an integer argument")?;
        self.as_i64("(positional)", v)
    }

    /// A size list such as `[1, seq, -1, 64]` or `[2*batch*seq]`.
    pub(crate) fn sizes(&mut self) -> Result<Vec<SizeArg>> {
        let v = self.positional("the size list")?;
        let inner = v
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| self.bad("sizes", v, "a list like [1, seq, -1]"))?;
        inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s == "-1" {
                    Ok(SizeArg::Infer)
                } else {
                    parse_dim(s).map(SizeArg::Dim).ok_or_else(|| self.bad("sizes", s, "a size (64, seq, 2*seq or -1)"))
                }
            })
            .collect()
    }

    /// Refuses what no rule consumed.
    pub(crate) fn finish(self) -> Result<()> {
        if let Some((k, _)) = self.keyed.first() {
            return Err(Error::op(self.op, format!("unknown attribute `{k}`")));
        }
        if let Some(p) = self.positional.front() {
            return Err(Error::op(self.op, format!("unexpected argument `{p}`")));
        }
        Ok(())
    }
}

/// A size as a dump prints it: `64`, `seq`, `2*batch*seq`.
pub fn parse_dim(s: &str) -> Option<Dim> {
    let mut d = Dim::new(1);
    for part in s.split('*').map(str::trim) {
        let f = if let Ok(n) = part.parse::<usize>() {
            Dim::new(n)
        } else if !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Dim::sym(part)
        } else {
            return None;
        };
        d = d.mul(&f);
    }
    Some(d)
}

/// A shape as a dump prints it: `[1, seq, 64]`.
pub fn parse_shape(s: &str) -> Option<Vec<Dim>> {
    let inner = s.trim().strip_prefix('[')?.strip_suffix(']')?;
    inner.split(',').map(str::trim).filter(|p| !p.is_empty()).map(parse_dim).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{AttentionAttrs, CachedAttn, Scoring, SdpaAttrs};
    use crate::ops::binary::*;
    use crate::ops::layout::Slice;
    use crate::ops::linear::{GateAct, SwiGlu};
    use crate::ops::norm::NormAttrs;

    fn every_op() -> Vec<Op> {
        let sizes = vec![SizeArg::Dim(Dim::new(1)), SizeArg::Dim(Dim::sym("seq").mul(&Dim::new(2))), SizeArg::Infer];
        vec![
            Op::embedding(),
            Op::linear(),
            Op::matmul(),
            Op::binary(ADD),
            Op::binary(SUB),
            Op::binary(MUL),
            Op::binary(DIV),
            Op::scalar(ADD_SCALAR, 1e-5),
            Op::scalar(MUL_SCALAR, -0.125),
            Op::scalar(POW_SCALAR, 2.0),
            Op::unary("aten.neg"),
            Op::unary("aten.rsqrt"),
            Op::unary("aten.silu"),
            Op::unary("aten.cos"),
            Op::unary("aten.sin"),
            Op::unary("aten.tanh"),
            Op::scalar(crate::ops::binary::DIV_SCALAR, 30.0),
            Op::mean(vec![-1], true),
            Op::mean(vec![1, 2], false),
            Op::to_dtype(DType::BF16),
            Op::view(sizes.clone()),
            Op::reshape(sizes.clone()),
            Op::expand(sizes),
            Op::transpose(1, 2),
            Op::unsqueeze(-1),
            Op::slice(Slice::new(-1, 0, 64)),
            Op::slice(Slice { dim: 2, start: 3, end: i64::MAX, step: 2 }),
            Op::embedding(),
            Op::cat(-1),
            Op::sdpa(SdpaAttrs { is_causal: true, scale: None, enable_gqa: false, scoring: Scoring::default() }),
            Op::sdpa(SdpaAttrs { is_causal: false, scale: Some(0.125), enable_gqa: true, scoring: Scoring::default() }),
            Op::sdpa(SdpaAttrs {
                is_causal: true,
                scale: Some(0.0625),
                enable_gqa: true,
                scoring: Scoring { window: Some(4096), chunk: None, softcap: Some(50.0), kv_fp8: None },
            }),
            Op::softmax(-1),
            Op::log_softmax(1),
            crate::custom_op::op("aten.gelu", "approximate=tanh").unwrap(),
            crate::custom_op::op("aten.gelu", "approximate=none").unwrap(),
            Op::rmsnorm(NormAttrs::new(1e-6, DType::F32)),
            Op::add_rmsnorm(NormAttrs::new(1e-5, DType::BF16)),
            Op::add_rmsnorm(NormAttrs { fp8_out: true, ..NormAttrs::new(1e-5, DType::F32) }),
            Op::rope(true),
            Op::attention(AttentionAttrs { causal: true, scale: 0.088, scoring: Scoring::default() }),
            Op::attention(AttentionAttrs {
                causal: true,
                scale: 0.088,
                scoring: Scoring { window: Some(8), chunk: None, softcap: None, kv_fp8: None },
            }),
            Op::attention(AttentionAttrs {
                causal: true,
                scale: 0.088,
                scoring: Scoring { window: None, chunk: Some(8192), softcap: None, kv_fp8: None },
            }),
            Op::causal_mask(None),
            Op::causal_mask(Some(8)),
            Op::swiglu(SwiGlu { fused: true, epilogue: false, act: GateAct::Silu }),
            Op::swiglu(SwiGlu { fused: true, epilogue: true, act: GateAct::Silu }),
            Op::swiglu(SwiGlu { fused: false, epilogue: false, act: GateAct::GeluTanh }),
            Op::swiglu(SwiGlu { fused: true, epilogue: false, act: GateAct::Gelu }),
            Op::index_select(1),
            Op::cached_attention(&CachedAttn {
                backend: "flashinfer".into(),
                layer: 3,
                scale: 0.125,
                rope: false,
                qk_norm: None,
                scoring: Scoring::default(),
                fp8_out: false,
            }),
            Op::cached_attention(&CachedAttn {
                backend: "torch".into(),
                layer: 0,
                scale: 0.125,
                rope: true,
                qk_norm: Some(crate::ops::norm::NormAttrs::new(1e-6, crate::dtype::DType::BF16)),
                scoring: Scoring {
                    window: Some(512),
                    chunk: None,
                    softcap: Some(30.0),
                    kv_fp8: Some((0.02, 0.0234375)),
                },
                fp8_out: true,
            }),
        ]
    }

    #[test]
    fn every_op_round_trips_through_its_printed_form() {
        for op in every_op() {
            let back =
                parse_op(op.name(), &op.attrs()).unwrap_or_else(|e| panic!("{} `{}`: {e}", op.name(), op.attrs()));
            assert_eq!(back, op, "{} `{}`", op.name(), op.attrs());
        }
    }

    #[test]
    fn bad_attribute_text_names_the_op_and_the_attribute() {
        let e = |n: &str, a: &str| parse_op(n, a).unwrap_err().to_string();
        assert!(e("aten.cat", "").contains("`dim` is missing"), "{}", e("aten.cat", ""));
        assert!(e("aten.cat", "dim=x").contains("attribute `dim` is `x`, not an integer"));
        assert!(e("aten.cat", "dim=1, axis=2").contains("unknown attribute `axis`"));
        assert!(e("aten.add.Tensor", "3").contains("unexpected argument `3`"));
        assert!(e("aten.view", "[1, seq").contains("unbalanced"));
        assert!(e("aten.view", "[1, se-q]").contains("not a size"));
        assert!(e("torch_rmsnorm", "eps=1e-5, norm_dtype=int8").contains("not a dtype"));
        assert!(e("aten.gelu", "approximate=erf").contains("`none` or `tanh`"));
        let unknown = e("my.op", "");
        assert!(unknown.contains("no op named `my.op`"), "{unknown}");
    }

    #[test]
    fn shapes_parse_as_dumps_print_them() {
        let s = parse_shape("[1, seq, 2*batch*seq, 64]").unwrap();
        assert_eq!(crate::shape::fmt_shape(&s), "[1, seq, 2*batch*seq, 64]");
        assert!(parse_shape("[1, seq").is_none());
        assert!(parse_shape("[1, -2]").is_none());
    }
}

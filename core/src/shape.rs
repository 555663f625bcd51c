//! Shapes with symbolic dimensions.
//!
//! A dimension is a monomial: a constant factor times a product of named symbols (`batch`,
//! `seq`, `batch*seq`, `2*seq`, `64`). That is closed under the products and exact quotients that
//! reshapes of transformer graphs need, and evaluates to a number once the symbols are bound.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{Error, Result};

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Dim {
    factor: usize,
    /// Symbol names, sorted, with repetition.
    syms: Vec<String>,
}

impl Dim {
    pub fn new(n: usize) -> Dim {
        Dim { factor: n, syms: Vec::new() }
    }

    pub fn sym(name: &str) -> Dim {
        Dim { factor: 1, syms: vec![name.to_string()] }
    }

    pub fn as_static(&self) -> Option<usize> {
        self.syms.is_empty().then_some(self.factor)
    }

    pub fn is_one(&self) -> bool {
        self.as_static() == Some(1)
    }

    pub fn symbols(&self) -> &[String] {
        &self.syms
    }

    pub fn mul(&self, o: &Dim) -> Dim {
        let mut syms = self.syms.clone();
        syms.extend(o.syms.iter().cloned());
        syms.sort();
        // Saturates: a size that large fails every later check instead of wrapping.
        let factor = self.factor.saturating_mul(o.factor);
        if factor == 0 {
            return Dim::new(0);
        }
        Dim { factor, syms }
    }

    /// Exact quotient, if there is one.
    pub fn div(&self, o: &Dim) -> Option<Dim> {
        if o.factor == 0 || !self.factor.is_multiple_of(o.factor) {
            return None;
        }
        let mut syms = self.syms.clone();
        for s in &o.syms {
            let i = syms.iter().position(|x| x == s)?;
            syms.remove(i);
        }
        Some(Dim { factor: self.factor / o.factor, syms })
    }

    /// Replaces symbol `name` by the number `n`.
    pub fn substitute(&self, name: &str, n: usize) -> Dim {
        let mut out = Dim { factor: self.factor, syms: Vec::new() };
        for s in &self.syms {
            if s == name {
                out.factor *= n;
            } else {
                out.syms.push(s.clone());
            }
        }
        if out.factor == 0 {
            return Dim::new(0);
        }
        out
    }

    pub fn eval(&self, bind: &Bindings) -> Result<usize> {
        let mut n = self.factor;
        for s in &self.syms {
            let v = bind.get(s).ok_or_else(|| Error::Msg(format!("symbol `{s}` is not bound")))?;
            n *= v;
        }
        Ok(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.syms.is_empty() {
            return write!(f, "{}", self.factor);
        }
        if self.factor != 1 {
            write!(f, "{}*", self.factor)?;
        }
        write!(f, "{}", self.syms.join("*"))
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::new(n)
    }
}

pub type Shape = Vec<Dim>;

/// Values of the symbols for one run.
pub type Bindings = BTreeMap<String, usize>;

pub fn static_shape(dims: &[usize]) -> Shape {
    dims.iter().map(|&d| Dim::new(d)).collect()
}

pub fn eval_shape(shape: &[Dim], bind: &Bindings) -> Result<Vec<usize>> {
    shape.iter().map(|d| d.eval(bind)).collect()
}

pub fn numel(shape: &[Dim]) -> Dim {
    shape.iter().fold(Dim::new(1), |acc, d| acc.mul(d))
}

pub fn fmt_shape(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// An entry of a size list argument (`aten.view`, `aten.expand`): a dimension, or `-1`
/// (inferred for view, kept for expand).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SizeArg {
    Dim(Dim),
    Infer,
}

impl fmt::Display for SizeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeArg::Dim(d) => write!(f, "{d}"),
            SizeArg::Infer => f.write_str("-1"),
        }
    }
}

impl SizeArg {
    pub fn eval(&self, bind: &Bindings) -> Result<SizeArg> {
        Ok(match self {
            SizeArg::Dim(d) => SizeArg::Dim(Dim::new(d.eval(bind)?)),
            SizeArg::Infer => SizeArg::Infer,
        })
    }
}

/// Inclusive range of a symbol's values (torch.export's range constraints).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SymRange {
    pub min: usize,
    pub max: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monomial_arithmetic() {
        let b = Dim::sym("batch");
        let s = Dim::sym("seq");
        let bs = b.mul(&s).mul(&Dim::new(64));
        assert_eq!(bs.to_string(), "64*batch*seq");
        assert_eq!(bs.div(&s.mul(&Dim::new(16))).unwrap().to_string(), "4*batch");
        assert_eq!(bs.div(&Dim::new(3)), None);
        assert_eq!(b.div(&s), None);
        let mut bind = Bindings::new();
        bind.insert("batch".into(), 2);
        bind.insert("seq".into(), 5);
        assert_eq!(bs.eval(&bind).unwrap(), 640);
        assert!(Dim::sym("other").eval(&bind).is_err());
    }
}

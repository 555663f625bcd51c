//! The op table: ops defined through the registry (the built-in ones of
//! `ops/{unary,binary,reduce,attention,norm,rope,layout,gather,linear}.rs` and plugin libraries' ops); `Op::Custom`
//! nodes dispatch to them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, RwLock};

use crate::custom_op::CustomOp;

type Table = HashMap<&'static str, Arc<CustomOp>>;

static OPS: LazyLock<RwLock<Table>> = LazyLock::new(|| {
    let built_in = crate::ops::unary::ops()
        .into_iter()
        .chain(crate::ops::binary::ops())
        .chain(crate::ops::reduce::ops())
        .chain(crate::ops::attention::ops())
        .chain(crate::ops::norm::ops())
        .chain(crate::ops::rope::ops())
        .chain(crate::ops::layout::ops())
        .chain(crate::ops::gather::ops())
        .chain(crate::ops::linear::ops())
        .chain(crate::ops::gated_act::ops())
        .chain(crate::ops::moe::ops())
        .chain(crate::ops::quant_linear::ops())
        .chain(crate::ops::collective::ops());
    RwLock::new(built_in.map(|o| (o.name, Arc::new(o))).collect())
});

/// Registers an op; refused if the name is taken (by a built-in op or another registration).
pub fn register_op(op: CustomOp) -> std::result::Result<(), String> {
    if let crate::custom_op::Outputs::Like(i) = op.outputs {
        if i >= op.inputs {
            return Err(format!("op `{}`: output_like {i} but {} inputs", op.name, op.inputs));
        }
    }
    let mut map = OPS.write().unwrap_or_else(|e| e.into_inner());
    if let Some(prev) = map.get(op.name) {
        return Err(format!("an op named `{}` already exists ({})", op.name, prev.origin));
    }
    map.insert(op.name, Arc::new(op));
    Ok(())
}

/// Every registered op.
pub fn custom_ops() -> Vec<Arc<CustomOp>> {
    let mut v: Vec<Arc<CustomOp>> = OPS.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
    v.sort_by_key(|o| o.name);
    v
}

/// The op named `name`.
pub fn custom_op(name: &str) -> Option<Arc<CustomOp>> {
    OPS.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A library cannot take a built-in op's name: the table holds both, and the refusal names
    /// the op and who has it.
    #[test]
    fn an_op_named_like_a_built_in_one_is_refused() {
        let add = custom_op(crate::ops::binary::ADD).expect("aten.add.Tensor is in the table");
        assert_eq!(add.origin, "built-in");
        let clash = CustomOp {
            name: crate::ops::binary::ADD,
            version: "0",
            inputs: 2,
            outputs: crate::custom_op::Outputs::Like(0),
            origin: "libclash.so",
            check_attrs: None,
            cpu: Arc::new(
                |_: &[&crate::Tensor], _: &str, _: &[(crate::DType, Vec<usize>)], _: &crate::cpu::KernelOptions| {
                    Ok(vec![])
                },
            ),
            cuda: None,
            extra_inputs: 0,
            sizes: None,
            view: None,
            linear_weights: false,
            cuda_scratch: None,
            cuda_attrs: None,
        };
        let e = register_op(clash).unwrap_err();
        assert_eq!(e, "an op named `aten.add.Tensor` already exists (built-in)");
        assert_eq!(custom_op(crate::ops::binary::ADD).unwrap().origin, "built-in");
        for name in ["aten.neg", "aten.mean.dim", "torch_attention", "fused_add_rmsnorm", crate::ops::rope::ROPE] {
            assert!(custom_ops().iter().any(|o| o.name == name), "{name} is not listed");
        }
    }
}

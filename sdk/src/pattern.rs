//! Patterns a plugin transform hands the host's matcher (`GraphEdit::find_pattern`): a small
//! graph of inputs and ops by name, and the matches it gives back. Re-exported from `ffi`.

use abi_stable::std_types::{RString, RVec};
use abi_stable::StableAbi;

/// What a pattern node matches.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternKind {
    /// Any value; the same name binds the same value everywhere in the pattern.
    Input,
    /// A node of op `name` whose inputs match `inputs` in order.
    Op,
    /// A two-input op whose inputs may match in either order (`aten.add.Tensor`, `aten.mul.Tensor`).
    Commutative,
    /// A one-input op (`name`) that the graph may or may not have between `inputs[0]` and its
    /// reader, typically a cast.
    Optional,
}

/// One node of a [`PatternDecl`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PatternNode {
    pub kind: PatternKind,
    /// The input's name, or the op's name as graph dumps print it.
    pub name: RString,
    /// Earlier pattern nodes this op reads (indices into [`PatternDecl::nodes`]).
    pub inputs: RVec<u32>,
}

/// A small graph to find, written with [`PatternDecl::input`], [`PatternDecl::op`] and friends;
/// its last node is what a match's `output` binds.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, Default, PartialEq)]
pub struct PatternDecl {
    pub nodes: RVec<PatternNode>,
}

impl PatternDecl {
    pub fn new() -> PatternDecl {
        PatternDecl::default()
    }

    fn push(&mut self, kind: PatternKind, name: &str, inputs: &[u32]) -> u32 {
        self.nodes.push(PatternNode { kind, name: name.into(), inputs: inputs.iter().copied().collect() });
        self.nodes.len() as u32 - 1
    }

    /// A free input named `name`.
    pub fn input(&mut self, name: &str) -> u32 {
        self.push(PatternKind::Input, name, &[])
    }

    /// An op node: op `op` reading `inputs` in order.
    pub fn op(&mut self, op: &str, inputs: &[u32]) -> u32 {
        self.push(PatternKind::Op, op, inputs)
    }

    /// A two-input op matched with its inputs in either order.
    pub fn commutative(&mut self, op: &str, a: u32, b: u32) -> u32 {
        self.push(PatternKind::Commutative, op, &[a, b])
    }

    /// A one-input op the graph may or may not have on `input`'s way to its reader.
    pub fn optional(&mut self, op: &str, input: u32) -> u32 {
        self.push(PatternKind::Optional, op, &[input])
    }
}

/// A pattern input and the value it bound.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PatternBinding {
    pub name: RString,
    pub value: u32,
}

/// One match of a [`PatternDecl`]: the value each input bound, the graph nodes it covers (node
/// indices, ascending; read their attributes with [`crate::ffi::GraphEdit::node`]) and the value the
/// pattern's last node matched.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PatternMatch {
    pub inputs: RVec<PatternBinding>,
    pub nodes: RVec<usize>,
    pub output: u32,
}

impl PatternMatch {
    /// The value input `name` bound.
    pub fn input(&self, name: &str) -> Option<u32> {
        self.inputs.iter().find(|b| b.name.as_str() == name).map(|b| b.value)
    }
}

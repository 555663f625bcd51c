//! A declarative pattern matcher. A pattern is a small graph written once with [`PatternBuilder`]:
//! free inputs bind to any value (the same input to the same value), op nodes test the graph's op
//! and may capture attributes, commutative nodes match their two inputs in either order, and
//! optional nodes (typically casts) match whether or not the graph has them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::HashSet;

use crate::ir::{Graph, ValueId};
use crate::ops::Op;

pub type PId = usize;

/// Values a pattern captured from attributes (`eps`, `scale`, ...).
#[derive(Clone, Debug, Default)]
pub struct Captures {
    pub f: HashMap<&'static str, f64>,
    pub b: HashMap<&'static str, bool>,
}

type Pred = Box<dyn Fn(&Op, &mut Captures) -> bool + Send + Sync>;

enum PNode {
    Input(Cow<'static, str>),
    Op {
        pred: Pred,
        inputs: Vec<PId>,
        commutative: bool,
    },
    /// A one-input op that the graph may or may not have between `input` and its user.
    Optional {
        pred: Pred,
        input: PId,
    },
}

pub struct Pattern {
    nodes: Vec<PNode>,
    output: PId,
}

#[derive(Default)]
pub struct PatternBuilder {
    nodes: Vec<PNode>,
}

impl PatternBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn input(&mut self, name: impl Into<Cow<'static, str>>) -> PId {
        self.nodes.push(PNode::Input(name.into()));
        self.nodes.len() - 1
    }

    /// An op node; `pred` decides whether a graph op fits and records captures.
    pub fn op(&mut self, pred: impl Fn(&Op, &mut Captures) -> bool + Send + Sync + 'static, inputs: &[PId]) -> PId {
        self.nodes.push(PNode::Op { pred: Box::new(pred), inputs: inputs.to_vec(), commutative: false });
        self.nodes.len() - 1
    }

    /// A two-input op whose inputs may appear in either order (add, mul).
    pub fn commutative(
        &mut self,
        pred: impl Fn(&Op, &mut Captures) -> bool + Send + Sync + 'static,
        a: PId,
        b: PId,
    ) -> PId {
        self.nodes.push(PNode::Op { pred: Box::new(pred), inputs: vec![a, b], commutative: true });
        self.nodes.len() - 1
    }

    pub fn optional(&mut self, pred: impl Fn(&Op, &mut Captures) -> bool + Send + Sync + 'static, input: PId) -> PId {
        self.nodes.push(PNode::Optional { pred: Box::new(pred), input });
        self.nodes.len() - 1
    }

    /// An optional dtype cast (`aten._to_copy`), as real exports put around norms.
    pub fn opt_cast(&mut self, input: PId) -> PId {
        self.optional(|op, _| op.to_dtype_of().is_some(), input)
    }

    pub fn build(self, output: PId) -> Pattern {
        Pattern { nodes: self.nodes, output }
    }
}

/// One match: the values bound to each pattern node, the captures, and the graph nodes covered.
#[derive(Clone, Debug, Default)]
pub struct Match {
    pub bound: HashMap<PId, ValueId>,
    pub inputs: HashMap<String, ValueId>,
    pub caps: Captures,
    /// Graph node indices the pattern covered.
    pub nodes: Vec<usize>,
    pub output: ValueId,
}

impl Match {
    pub fn input(&self, name: &str) -> ValueId {
        self.inputs[name]
    }
}

impl Pattern {
    /// Matches rooted at each node of `g`, in graph order. Matches may overlap; callers that
    /// rewrite should skip a match whose nodes an earlier rewrite already consumed.
    pub fn find_all(&self, g: &Graph) -> Vec<Match> {
        let prod = g.producers();
        let mut out = Vec::new();
        for n in &g.nodes {
            for &o in &n.outputs {
                let start = Match { output: o, ..Default::default() };
                if let Some(mut m) = self.m(g, &prod, self.output, o, start).into_iter().next() {
                    m.nodes.sort_unstable();
                    m.nodes.dedup();
                    out.push(m);
                }
            }
        }
        out
    }

    /// Every consistent extension of `st` that binds pattern node `p` to value `v`. Returning all
    /// alternatives (not the first) lets a later mismatch undo an earlier commutative or optional
    /// choice.
    fn m(&self, g: &Graph, prod: &[Option<usize>], p: PId, v: ValueId, mut st: Match) -> Vec<Match> {
        if let Some(&b) = st.bound.get(&p) {
            return if b == v { vec![st] } else { Vec::new() };
        }
        let mut out = match &self.nodes[p] {
            PNode::Input(name) => match st.inputs.get(name.as_ref()) {
                Some(&b) if b != v => Vec::new(),
                _ => {
                    st.inputs.insert(name.to_string(), v);
                    vec![st]
                }
            },
            PNode::Op { pred, inputs, commutative } => {
                let Some(ni) = prod[v.0 as usize] else { return Vec::new() };
                let node = &g.nodes[ni];
                if node.inputs.len() != inputs.len() || !pred(&node.op, &mut st.caps) {
                    return Vec::new();
                }
                st.nodes.push(ni);
                let orders: Vec<Vec<usize>> =
                    if *commutative { vec![vec![0, 1], vec![1, 0]] } else { vec![(0..inputs.len()).collect()] };
                let mut all = Vec::new();
                for ord in orders {
                    let mut states = vec![st.clone()];
                    for (&gi, &pi) in ord.iter().zip(inputs) {
                        states = states.into_iter().flat_map(|s| self.m(g, prod, pi, node.inputs[gi], s)).collect();
                    }
                    all.extend(states);
                }
                all
            }
            PNode::Optional { pred, input } => {
                let mut all = Vec::new();
                if let Some(ni) = prod[v.0 as usize] {
                    let node = &g.nodes[ni];
                    let mut s = st.clone();
                    if node.inputs.len() == 1 && pred(&node.op, &mut s.caps) {
                        s.nodes.push(ni);
                        all.extend(self.m(g, prod, *input, node.inputs[0], s));
                    }
                }
                all.extend(self.m(g, prod, *input, v, st));
                all
            }
        };
        for s in &mut out {
            s.bound.insert(p, v);
        }
        out
    }
}

/// Applies `rewrite` to each non-overlapping match of `pattern`, then drops dead code. The
/// rewrite returns the value replacing the match's output (or `None` to skip the match).
/// Returns the number of rewrites.
///
/// In passes: each pass finds every match once, keeps those that share no node with an earlier
/// kept one (graph order, as rewriting one at a time would), and rewrites them from the last to
/// the first, so a rewrite's inserted nodes (after its match) never move the nodes of the
/// matches still to come; dead code goes once per pass. Passes repeat until one rewrites
/// nothing, so a rewrite that uncovers a new match is still seen. A pass costs one search, not
/// one per match: a 4,096-layer graph no longer takes minutes.
pub fn rewrite_all(
    g: &mut Graph,
    pattern: &Pattern,
    mut rewrite: impl FnMut(&mut Graph, &Match, usize) -> crate::Result<Option<ValueId>>,
) -> crate::Result<usize> {
    let mut count = 0;
    // Matches the rewrite declined, by output: not offered again, and they block nothing.
    let mut declined: HashSet<ValueId> = HashSet::new();
    loop {
        let mut taken: HashSet<usize> = HashSet::new();
        let chosen: Vec<Match> = pattern
            .find_all(g)
            .into_iter()
            .filter(|m| !declined.contains(&m.output))
            .filter(|m| {
                let free = m.nodes.iter().all(|n| !taken.contains(n));
                if free {
                    taken.extend(m.nodes.iter().copied());
                }
                free
            })
            .collect();
        let mut rewrote = 0;
        // Valid for every chosen match: rewrites insert only after their own match.
        let prod = g.producers();
        for m in chosen.iter().rev() {
            let pos = prod[m.output.0 as usize].expect("a match's output is a node output") + 1;
            match rewrite(g, m, pos)? {
                Some(new) => {
                    g.replace_uses(m.output, new);
                    rewrote += 1;
                }
                None => {
                    declined.insert(m.output);
                }
            }
        }
        if rewrote == 0 {
            break;
        }
        g.dce();
        count += rewrote;
    }
    Ok(count)
}

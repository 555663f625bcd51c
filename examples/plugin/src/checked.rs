//! `checked`: a compile backend for hunting numerical bugs (a transform that divides by zero, a
//! weight that overflows in fp16). It runs every node in graph order on the host's CPU kernels,
//! reads back each node's output and stops at the first value that is NaN or infinite, naming
//! the node, its op and where in the tensor; each value is released after its last reader.
//! Reading every output back makes it several times slower than `simple`: a debugging tool.

use autodeploy_sdk::abi_stable::std_types::{RResult, RStr, RString};
use autodeploy_sdk::ffi::{compiled_graph_box, CompiledGraph, CompiledGraphBox, RunGraphRef};

pub extern "C" fn compile(_options: RStr<'_>) -> RResult<CompiledGraphBox, RString> {
    RResult::ROk(compiled_graph_box(Checked { last_use: Vec::new() }))
}

struct Checked {
    /// Per value id, the last node reading it (`usize::MAX`: a graph output, kept); planned on
    /// the first forward.
    last_use: Vec<usize>,
}

macro_rules! tri {
    ($e:expr) => {
        match $e {
            RResult::ROk(v) => v,
            RResult::RErr(e) => return RResult::RErr(e),
        }
    };
}

impl CompiledGraph for Checked {
    fn forward(&mut self, mut run: RunGraphRef<'_>) -> RResult<(), RString> {
        let n = run.num_nodes();
        if self.last_use.is_empty() {
            for i in 0..n {
                if let Some(node) = run.node(i).into_option() {
                    for &v in node.inputs.iter().chain(node.outputs.iter()) {
                        let v = v as usize;
                        if self.last_use.len() <= v {
                            self.last_use.resize(v + 1, 0);
                        }
                        self.last_use[v] = i;
                    }
                }
            }
            for o in run.outputs() {
                if let Some(u) = self.last_use.get_mut(o as usize) {
                    *u = usize::MAX;
                }
            }
        }
        for i in 0..n {
            tri!(run.run_node(i));
            let Some(node) = run.node(i).into_option() else { continue };
            for &o in node.outputs.iter() {
                let t = tri!(run.read(o));
                if let Some(at) = t.data.iter().position(|x| !x.is_finite()) {
                    let name = run.value(o).into_option().map(|v| v.name.to_string()).unwrap_or_default();
                    return RResult::RErr(
                        format!(
                            "node {i} `{name}` ({}{}{}) computed {} at flat index {at} of shape {:?}: the first \
                             non-finite value",
                            node.op,
                            if node.attrs.is_empty() { "" } else { " " },
                            node.attrs,
                            t.data[at],
                            t.shape
                        )
                        .into(),
                    );
                }
            }
            for &v in node.inputs.iter() {
                if self.last_use.get(v as usize) == Some(&i) {
                    run.release(v);
                }
            }
        }
        RResult::ROk(())
    }
}

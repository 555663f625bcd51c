//! CUDA-graph capture and replay: a decode step of a batch-size bucket runs eagerly once, is
//! captured, and is replayed for every later step of that bucket (`cudagraph`, `opt`).

use super::*;

pub(super) struct Captured {
    pub(super) graph: autodeploy_kernels::cuda::cudarc::driver::CudaGraph,
    /// Where the captured launches leave the graph output, and its shape.
    pub(super) out: (Ptr, Vec<usize>),
}

// SAFETY: a captured graph is launched only by the model that owns it, from one thread at a
// time (`CompiledModel` is `Send`, not `Sync`); CUDA allows graph execs on any thread.
unsafe impl Send for Captured {}

impl CudaModel {
    /// The bucket a decode step of `rows` sequences replays, if graphs are on and it fits.
    pub(super) fn bucket(&self, step: Option<&StepContext>, rows: usize) -> Option<usize> {
        let cx = step?;
        if !self.mode.graphs || cx.plan.token_seq.len() != cx.plan.page_tables.len() {
            return None;
        }
        self.buckets.iter().copied().find(|&b| b >= rows)
    }

    /// Runs a step; the result's device address, shape and dtype are those of the graph output.
    pub(super) fn run(&mut self, inputs: &[Tensor], step: Option<&StepContext>) -> Result<(Ptr, Vec<usize>, usize)> {
        let rows = self.gather_rows(inputs);
        if let Some(cx) = step {
            // Each attention backend sees the step's batch on the host first.
            for (_, a) in &mut self.attn {
                a.begin_step(cx.plan)?;
            }
        }
        let bucket = self.bucket(step, rows);
        let (staged, inputs) = self.stage(inputs, step, bucket)?;
        let bind = crate::compile::simple::bind_inputs(&self.graph, &inputs)?;
        if bind.get("seq").is_some_and(|&t| t > self.max_tokens) {
            return Err(Error::Msg(format!("{} tokens in one step; the plan holds {}", bind["seq"], self.max_tokens)));
        }
        let Some(b) = bucket else {
            let (p, s) = self.enqueue(&bind, &staged, false)?;
            return Ok((p, s, staged.rows));
        };
        if let Some(c) = self.graphs.get(&b) {
            c.graph.launch().map_err(|e| Error::Msg(format!("replaying the CUDA graph of batch {b}: {e:?}")))?;
            autodeploy_kernels::cuda::exec::count_launch("cuda_graph_replay");
            return Ok((c.out.0, c.out.1.clone(), staged.rows));
        }
        // First step of this bucket: run it eagerly (its results are this step's), then capture
        // the same launches for the next ones.
        let (p, s) = self.enqueue(&bind, &staged, false)?;
        self.gpu.sync().map_err(gpu_err)?;
        let stream = self.gpu.stream.clone();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| Error::Msg(format!("starting CUDA graph capture for batch {b}: {e:?}")))?;
        let res = self.enqueue(&bind, &staged, true);
        let graph = stream.end_capture(
            autodeploy_kernels::cuda::cudarc::driver::sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
        );
        let out = res?;
        match graph {
            Ok(Some(graph)) => {
                tracing::info!(batch = b, "captured a CUDA graph for decode");
                autodeploy_kernels::cuda::exec::count_launch("cuda_graph_capture");
                self.graphs.insert(b, Captured { graph, out });
            }
            Ok(None) => return Err(Error::Msg(format!("CUDA graph capture for batch {b} recorded nothing"))),
            Err(e) => return Err(Error::Msg(format!("capturing the CUDA graph of batch {b}: {e:?}"))),
        }
        Ok((p, s, staged.rows))
    }
}

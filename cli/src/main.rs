//! `autodeploy`: build an inference engine from a model and run it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use autodeploy_core::registry;
use autodeploy_core::runtime::Request;
use autodeploy_core::sampling::SamplingParams;
use autodeploy_core::tokenizer::{ChatMessage, StreamDecoder};
use autodeploy_sdk::Stage;
use clap::{Parser, Subcommand};

mod plugins;
use plugins::check_plugin_registry;

#[derive(Parser)]
#[command(name = "autodeploy", version, about = "Turn a model into an inference engine and run it")]
struct Cli {
    /// Pipeline configuration (TOML).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Override `model` (a local folder or a Hugging Face Hub id).
    #[arg(long, global = true)]
    model: Option<String>,
    /// Override `dtype` (auto, float32, bfloat16, float16).
    #[arg(long, global = true)]
    dtype: Option<String>,
    /// Override `max_new_tokens`.
    #[arg(long, global = true)]
    max_new_tokens: Option<usize>,
    /// Override `world_size` (ranks the model is sharded over).
    #[arg(long, global = true)]
    world_size: Option<usize>,
    /// Override `device` (auto, cpu, cuda, cuda:N).
    #[arg(long, global = true)]
    device: Option<String>,
    /// Override `compile_backend` (simple, cudagraph, compile, opt).
    #[arg(long, global = true)]
    compile_backend: Option<String>,
    /// Override `attn_backend`.
    #[arg(long, global = true)]
    attn_backend: Option<String>,
    /// Override `runtime` (demollm, trtllm, or a plugin's).
    #[arg(long, global = true)]
    runtime: Option<String>,
    /// A `plugin-registry.toml` whose libraries to load. Plugins are code that runs in this
    /// process, so none is loaded unless chosen here or by the `AUTODEPLOY_PLUGINS` variable
    /// (a registry beside the config or in the working directory is not loaded by itself).
    #[arg(long, global = true, value_name = "FILE")]
    plugins: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the engine and generate completions: for `-p` prompts, else the config's (the
    /// default command). `autodeploy run --model M -p "text"` needs no config file.
    Run {
        /// A prompt (repeat for several, run as one batch); replaces the config's prompts.
        #[arg(short = 'p', long = "prompt", value_name = "TEXT")]
        prompts: Vec<String>,
        /// Send each prompt as a user message through the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Sampling temperature (0: greedy).
        #[arg(long)]
        temperature: Option<f32>,
        /// Nucleus sampling: keep the most likely tokens up to this much probability.
        #[arg(long)]
        top_p: Option<f32>,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long)]
        top_k: Option<usize>,
        /// Seed of the sampler, for reproducible sampled completions.
        #[arg(long)]
        seed: Option<u64>,
        /// Print each completion as one JSON object per line (text, token ids, finish reason,
        /// timings) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the graph after a pipeline stage.
    Graph {
        /// import, post_import, pattern_matcher, quantize, sharding, weight_load,
        /// post_load_fusion, cache_init or compile.
        #[arg(long, default_value = "import")]
        stage: String,
        /// With `world_size` > 1: the rank whose graph to show (from the `sharding` stage on,
        /// each rank's graph holds its slices and the collectives).
        #[arg(long, default_value_t = 0)]
        rank: usize,
    },
    /// Chat with the model in the terminal, the answer streamed as it is generated.
    Chat {
        /// A system message to start the conversation with.
        #[arg(long)]
        system: Option<String>,
    },
    /// Serve the model over HTTP with OpenAI's API (`/v1/completions`,
    /// `/v1/chat/completions`, `/v1/models`), `/health` and Prometheus `/metrics`, until SIGTERM
    /// or Ctrl-C (then the requests in flight finish first).
    Serve {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The model name clients send and `/v1/models` lists (default: the config's `model`).
        #[arg(long)]
        served_model_name: Option<String>,
    },
    /// List the plugins this binary knows; with `--plugins FILE`, the libraries that registry
    /// names (not loaded unless `--load`).
    Plugins {
        /// Load the chosen registry's libraries and list their plugins too.
        #[arg(long)]
        load: bool,
    },
    /// Time prefill and decode on synthetic prompts and print one JSON object: the
    /// configuration, the device, build time, prefill ms, decode ms per step, output tok/s, and
    /// the weight bandwidth achieved next to the floor measured in the same run.
    Bench {
        /// `latency` (one batch of `--batch`, default 1), `throughput` (default batch: the
        /// config's max_batch_size) or `offline` (`--num-requests` queued at once through the
        /// runtime, as trtllm-bench measures: end-to-end output tok/s and requests/s).
        #[arg(long, default_value = "latency")]
        mode: String,
        /// Requests queued at once in `offline` mode.
        #[arg(long, default_value_t = 1000)]
        num_requests: usize,
        /// Prompt tokens per request.
        #[arg(long, default_value_t = 128)]
        isl: usize,
        /// Generated tokens per request.
        #[arg(long, default_value_t = 128)]
        osl: usize,
        /// Requests run together.
        #[arg(long)]
        batch: Option<usize>,
        /// Timed runs in `latency`/`throughput` mode (the median is reported, with the spread).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
    },
}

fn load_config(cli: &Cli) -> Result<PipelineConfig> {
    let mut cfg = match &cli.config {
        // Validated below, once the command line's overrides are in.
        Some(p) => PipelineConfig::from_toml_str(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            Some(p),
        )?,
        None => match &cli.model {
            Some(m) => PipelineConfig::from_toml_str(&format!("model = {m:?}"), None)?,
            None => anyhow::bail!(
                "no --config given (and no --model); try `autodeploy --config examples/llama-fixture.toml`"
            ),
        },
    };
    if let Some(m) = &cli.model {
        // A path on the command line is relative to the working directory, as in every CLI
        // (`model = ` in a config file stays relative to that file).
        let p = std::path::Path::new(m);
        cfg.model = if p.is_relative() && p.exists() {
            std::env::current_dir().context("the working directory")?.join(p).display().to_string()
        } else {
            m.clone()
        };
    }
    if let Some(d) = &cli.device {
        cfg.device = d.clone();
    }
    if let Some(b) = &cli.compile_backend {
        cfg.compile_backend = b.clone();
    }
    if let Some(b) = &cli.attn_backend {
        cfg.attn_backend = b.clone();
    }
    if let Some(r) = &cli.runtime {
        cfg.runtime = r.clone();
    }
    if let Some(d) = &cli.dtype {
        cfg.dtype = d.clone();
    }
    if let Some(n) = cli.world_size {
        cfg.world_size = n;
    }
    if let Some(n) = cli.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    if let Some(Cmd::Run { prompts, chat, temperature, top_p, top_k, seed, .. }) = &cli.cmd {
        if !prompts.is_empty() {
            cfg.prompts = prompts
                .iter()
                .map(|t| {
                    let mut p = autodeploy_core::config::Prompt::default();
                    if *chat {
                        p.messages = Some(vec![ChatMessage { role: "user".into(), content: t.clone() }]);
                    } else {
                        p.text = Some(t.clone());
                    }
                    p
                })
                .collect();
        } else if *chat {
            anyhow::bail!("--chat applies to -p prompts; give at least one");
        }
        cfg.temperature = temperature.unwrap_or(cfg.temperature);
        cfg.top_p = top_p.unwrap_or(cfg.top_p);
        cfg.top_k = top_k.unwrap_or(cfg.top_k);
        cfg.seed = seed.or(cfg.seed);
    }
    if let Err(e) = cfg.validate(cli.config.as_deref().unwrap_or("<command line>".as_ref())) {
        // A value the command line set is the flag's fault, not the config file's.
        if let autodeploy_core::Error::Config { key, msg, .. } = &e {
            let flag = match key.as_str() {
                "device" => cli.device.as_ref().map(|v| ("--device", v.clone())),
                "dtype" => cli.dtype.as_ref().map(|v| ("--dtype", v.clone())),
                "max_new_tokens" => cli.max_new_tokens.map(|v| ("--max-new-tokens", v.to_string())),
                "temperature" | "top_p" | "top_k" => match &cli.cmd {
                    Some(Cmd::Run { temperature, top_p, top_k, .. }) => match key.as_str() {
                        "temperature" => temperature.map(|v| ("--temperature", v.to_string())),
                        "top_p" => top_p.map(|v| ("--top-p", v.to_string())),
                        _ => top_k.map(|v| ("--top-k", v.to_string())),
                    },
                    _ => None,
                },
                _ => None,
            };
            if let Some((flag, value)) = flag {
                anyhow::bail!("{flag} {value}: {msg}");
            }
        }
        return Err(e.into());
    }
    Ok(cfg)
}

/// `command` on this process's rank. Alone (world_size = 1) it just runs. Sharded, this is one
/// of the ranks `mpirun` started, or, without `mpirun`, rank 0 starts the others itself as
/// children running this command line (comm/spawn.rs): rank 0 runs `command` (its engine sends
/// every step to the others: comm/steps.rs), and every other rank builds its slice and runs
/// rank 0's steps until rank 0's engine goes.
fn ranked(cli: &Cli, command: impl FnOnce(&PipelineConfig) -> Result<()>) -> Result<()> {
    let mut cfg = load_config(cli)?;
    if cfg.world_size > 1 {
        cfg.rank = autodeploy_core::comm::join(cfg.world_size).map_err(anyhow::Error::msg)?;
        if cfg.rank > 0 {
            let mut engine = pipeline::build(&cfg)?;
            return Ok(engine.follow()?);
        }
    }
    command(&cfg)
}

fn run(cfg: &PipelineConfig, json: bool) -> Result<()> {
    let mut engine = pipeline::build(cfg)?;
    if json {
        return run_json(cfg, &mut engine);
    }
    let dtype = engine.graph.meta(engine.graph.outputs[0]).dtype;
    let mode = match &engine.cache {
        Some(c) => format!(
            "paged KV cache ({} layers, attn_backend {}, page {})",
            c.layers.len(),
            c.backend,
            cfg.attn_page_size
        ),
        None => "no KV cache (full recompute per token)".into(),
    };
    println!(
        "model: {}  dtype: {dtype}  compile_backend: {}  runtime: {}",
        cfg.model, cfg.compile_backend, cfg.runtime
    );
    println!("engine: {mode}");
    println!(
        "build: {:.1} ms ({} nodes, {} weights)",
        engine.build_time.as_secs_f64() * 1e3,
        engine.graph.nodes.len(),
        engine.graph.params.len()
    );
    if cfg.prompts.is_empty() {
        println!("no prompts in the config; nothing to generate");
        return Ok(());
    }
    let tok = engine.tokenizer.clone();
    let prepared = prepare_requests(cfg, &engine);
    let requests: Vec<Request> = prepared.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    let mut rt = registry::runtime(cfg)?;
    let (results, stats) = rt.generate(&mut engine, &requests);
    let mut results = results.into_iter();
    let mut failed = 0;
    for (i, prep) in prepared.iter().enumerate() {
        let res = match prep {
            Ok(req) => results.next().expect("one result per request").map_err(|e| e.to_string()).map(|c| (req, c)),
            Err(e) => Err(e.clone()),
        };
        let p = &cfg.prompts[i];
        match (&p.text, &p.messages, &tok) {
            (Some(t), _, _) => println!("[{i}] prompt: {t:?}"),
            (_, Some(m), _) => println!("[{i}] chat: {:?}", m.last().map(|m| m.content.as_str()).unwrap_or("")),
            _ => {}
        }
        match res {
            Ok((req, c)) => {
                if tok.is_none() {
                    println!("[{i}] prompt {:?}", req.prompt);
                }
                match &c.text {
                    Some(t) => println!("[{i}] output ({} tokens, {:?}): {t:?}", c.tokens.len(), c.finish),
                    None => println!("[{i}] output {:?} ({:?})", c.tokens, c.finish),
                }
            }
            Err(e) => {
                failed += 1;
                println!("[{i}] error: {e}");
            }
        }
    }
    let rate = |n: usize, t: std::time::Duration| n as f64 / t.as_secs_f64().max(1e-9);
    println!(
        "timing: prefill {} tokens in {:.1} ms ({:.0} tok/s); decode {} tokens in {:.1} ms ({:.1} tok/s); {} steps, peak {} KV pages ({:.1} MiB cache)",
        stats.prefill_tokens,
        stats.prefill_time.as_secs_f64() * 1e3,
        rate(stats.prefill_tokens, stats.prefill_time),
        stats.decode_tokens,
        stats.decode_time.as_secs_f64() * 1e3,
        rate(stats.decode_tokens, stats.decode_time),
        stats.steps,
        stats.peak_pages,
        stats.cache_bytes as f64 / (1 << 20) as f64,
    );
    if failed > 0 {
        anyhow::bail!("{failed} of {} prompts failed", prepared.len());
    }
    Ok(())
}

/// The config's prompts as requests; a prompt that cannot be tokenized fails alone (its error),
/// like any bad request.
fn prepare_requests(cfg: &PipelineConfig, engine: &pipeline::Engine) -> Vec<std::result::Result<Request, String>> {
    let tok = engine.tokenizer.as_deref();
    (0..cfg.prompts.len())
        .map(|i| {
            cfg.prompt_ids(i, tok)
                .map(|ids| Request {
                    prompt: ids,
                    sampling: sampling_with_eos(cfg, cfg.sampling(Some(&cfg.prompts[i])), engine),
                })
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// `run --json`: one JSON object per prompt, in order: its text (or token ids), the completion's
/// text and token ids, finish reason, and timings from the batch's start (first token, last
/// token); a prompt that fails has `error` instead. Nothing else goes to stdout.
fn run_json(cfg: &PipelineConfig, engine: &mut pipeline::Engine) -> Result<()> {
    use serde_json::json;
    let prepared = prepare_requests(cfg, engine);
    let requests: Vec<Request> = prepared.iter().filter_map(|r| r.as_ref().ok().cloned()).collect();
    let mut rt = registry::runtime(cfg)?;
    let t0 = std::time::Instant::now();
    // First and last token times of each request, from the batch's start.
    let mut times: Vec<(Option<f64>, Option<f64>)> = vec![(None, None); requests.len()];
    let (results, _) = rt.generate_streaming(engine, &requests, &mut |r, _| {
        let at = t0.elapsed().as_secs_f64() * 1e3;
        let t = &mut times[r];
        t.0.get_or_insert(at);
        t.1 = Some(at);
    });
    let mut results = results.into_iter().zip(times);
    let mut failed = 0;
    for (i, prep) in prepared.iter().enumerate() {
        let p = &cfg.prompts[i];
        let prompt = match (&p.text, &p.messages) {
            (Some(t), _) => json!(t),
            (_, Some(m)) => json!(m.last().map(|m| m.content.as_str()).unwrap_or("")),
            _ => json!(p.token_ids),
        };
        let line = match prep {
            Err(e) => {
                failed += 1;
                json!({"index": i, "prompt": prompt, "error": e})
            }
            Ok(req) => match results.next().expect("one result per request") {
                (Ok(c), (first, last)) => json!({
                    "index": i,
                    "prompt": prompt,
                    "prompt_tokens": req.prompt.len(),
                    "text": c.text,
                    "token_ids": c.tokens,
                    "completion_tokens": c.tokens.len(),
                    "finish_reason": match c.finish {
                        autodeploy_core::runtime::FinishReason::Length => "length",
                        autodeploy_core::runtime::FinishReason::Stop => "stop",
                    },
                    "time_to_first_token_ms": first,
                    "total_ms": last,
                }),
                (Err(e), _) => {
                    failed += 1;
                    json!({"index": i, "prompt": prompt, "error": e.to_string()})
                }
            },
        };
        println!("{line}");
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} prompts failed", prepared.len());
    }
    Ok(())
}

/// Bytes of the weights a decode step of `batch` tokens reads: every weight but the embedding
/// tables (a step reads one row of those per token), unless a table is also read whole (a tied
/// LM head); of a mixture of experts' stacked weights, the experts the step's tokens choose: `k`
/// of `E` for one token, for a batch the expected number of distinct experts if routing were
/// uniform, `E·(1 − (1 − k/E)^batch)`.
fn weight_bytes(g: &autodeploy_core::Graph, batch: usize) -> usize {
    use autodeploy_core::ops::{gather::EMBEDDING, moe::MOE};
    let uses = |v: autodeploy_core::ValueId| -> Vec<&autodeploy_core::ir::Node> {
        g.nodes.iter().filter(|n| n.inputs.contains(&v)).collect()
    };
    g.params
        .iter()
        .map(|p| {
            let (v, bytes) = (p.value, autodeploy_core::pipeline::param_bytes(g, p).unwrap_or(0) as f64);
            let u = uses(v);
            if !u.is_empty() && u.iter().all(|n| n.op.is(EMBEDDING) && n.inputs[0] == v && n.inputs[1] != v) {
                return 0.0;
            }
            let experts = g.meta(v).shape.first().and_then(|d| d.as_static()).unwrap_or(1) as f64;
            let expert_stack = |n: &&autodeploy_core::ir::Node| n.op.is(MOE) && n.inputs[..2].iter().all(|&i| i != v);
            match u.first().and_then(|n| n.op.moe_of()) {
                Some(m) if u.iter().all(expert_stack) => {
                    let chosen = experts * (1.0 - (1.0 - m.top_k as f64 / experts).powi(batch as i32));
                    bytes * chosen / experts
                }
                _ => bytes,
            }
        })
        .sum::<f64>() as usize
}

/// Deterministic prompts of ordinary token ids, different per request.
fn bench_requests(cfg: &PipelineConfig, engine: &pipeline::Engine, n: usize, isl: usize, osl: usize) -> Vec<Request> {
    let vocab = engine.graph.meta(engine.graph.outputs[0]).shape.last().and_then(|d| d.as_static()).unwrap_or(2);
    (0..n)
        .map(|r| Request {
            prompt: (0..isl).map(|i| ((i * 7919 + r * 104729 + 13) % (vocab - 1) + 1) as i64).collect(),
            sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: osl, ..cfg.sampling(None) },
        })
        .collect()
}

/// `bench --mode offline`: `n` requests queued at once through the configured runtime, timed
/// end to end (after an untimed pass of one batch that loads kernels and captures graphs).
fn bench_offline(cfg: &PipelineConfig, n: usize, isl: usize, osl: usize) -> Result<()> {
    anyhow::ensure!(n >= 1 && isl >= 1 && osl >= 1, "--num-requests, --isl and --osl must be at least 1");
    let mut engine = pipeline::build(cfg)?;
    let requests = bench_requests(cfg, &engine, n, isl, osl);
    let mut rt = registry::runtime(cfg)?;
    let warmup: Vec<Request> = requests
        .iter()
        .take(cfg.max_batch_size)
        .map(|r| Request {
            prompt: r.prompt.clone(),
            sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: 2, ..r.sampling.clone() },
        })
        .collect();
    if let Some(e) = rt.generate(&mut engine, &warmup).0.iter().find_map(|r| r.as_ref().err()) {
        anyhow::bail!("the bench's warm-up pass failed: {e}");
    }
    // A fresh runtime for the timed run: nothing of the warm-up's (its prefix cache) carries over.
    let mut rt = registry::runtime(cfg)?;
    let t0 = std::time::Instant::now();
    let (results, stats) = rt.generate(&mut engine, &requests);
    let wall = t0.elapsed().as_secs_f64();
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        anyhow::bail!("a bench request failed: {e}");
    }
    let generated: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(|c| c.tokens.len()).sum();
    let out = serde_json::json!({
        "config": {
            "model": cfg.model, "dtype": engine.graph.meta(engine.graph.outputs[0]).dtype.to_string(),
            "device": cfg.device, "compile_backend": cfg.compile_backend, "attn_backend": cfg.attn_backend,
            "runtime": cfg.runtime, "max_batch_size": cfg.max_batch_size, "max_num_tokens": cfg.max_num_tokens(),
            "world_size": cfg.world_size,
            "mode": "offline", "num_requests": n, "isl": isl, "osl": osl,
            "warmup": "one untimed pass of max_batch_size requests (prefill + 1 decode step)",
        },
        "wall_s": wall,
        "output_tokens": generated,
        "output_tok_per_s": generated as f64 / wall,
        "requests_per_s": n as f64 / wall,
        "steps": stats.steps,
        "mean_step_ms": wall * 1e3 / stats.steps.max(1) as f64,
        "max_step_tokens": stats.max_step_tokens,
        "prefill_s": stats.prefill_time.as_secs_f64(),
        "decode_only_s": stats.decode_time.as_secs_f64(),
        // Time in steps outside the forward calls: scheduling and bookkeeping the device waits for.
        "host_s": (stats.step_time.saturating_sub(stats.prefill_time + stats.decode_time)).as_secs_f64(),
        "outside_steps_s": (wall - stats.step_time.as_secs_f64()).max(0.0),
        "peak_kv_pages": stats.peak_pages,
        "kv_pages": engine.kv_pages,
        "preemptions": stats.preemptions,
    });
    println!("{out}");
    Ok(())
}

fn bench(cfg: &PipelineConfig, mode: &str, isl: usize, osl: usize, batch: Option<usize>, repeats: usize) -> Result<()> {
    let batch = match (mode, batch) {
        ("latency" | "throughput", Some(b)) => b,
        ("latency", None) => 1,
        ("throughput", None) => cfg.max_batch_size,
        (m, _) => anyhow::bail!("--mode {m}: expected latency, throughput or offline"),
    };
    anyhow::ensure!(batch >= 1 && isl >= 1 && osl >= 1, "--batch, --isl and --osl must be at least 1");
    anyhow::ensure!((1..=100).contains(&repeats), "--repeats {repeats}: expected 1 to 100");
    anyhow::ensure!(
        batch <= cfg.max_batch_size,
        "--batch {batch} is more than max_batch_size = {} in the config",
        cfg.max_batch_size
    );
    let mut engine = pipeline::build(cfg)?;
    let requests = bench_requests(cfg, &engine, batch, isl, osl);
    let mut rt = registry::runtime(cfg)?;
    // One untimed pass first (the same batch, prefill and one decode step): first-use costs
    // (kernel loading, cuBLAS's plans, capturing this batch's CUDA graph) stay out of the numbers.
    let warmup: Vec<Request> = requests
        .iter()
        .map(|r| Request {
            prompt: r.prompt.clone(),
            sampling: autodeploy_core::sampling::SamplingParams { max_new_tokens: 2, ..r.sampling.clone() },
        })
        .collect();
    let (results, _) = rt.generate(&mut engine, &warmup);
    if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
        anyhow::bail!("the bench's warm-up pass failed: {e}");
    }
    // The CPU's floor is measured before and after the timed runs and the better taken, so a
    // machine that was busy during one measurement does not make the floor look low.
    let cpu_floor_before = matches!(cfg.resolved_device(), autodeploy_core::config::Device::Cpu)
        .then(autodeploy_kernels::cpu::measure_read_bandwidth);
    // `repeats` timed runs of the same batch, each on a fresh runtime: the median is reported,
    // with every run's decode step and the spread.
    let mut runs = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let mut rt = registry::runtime(cfg)?;
        let (results, stats) = rt.generate(&mut engine, &requests);
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            anyhow::bail!("a bench request failed: {e}");
        }
        runs.push(stats);
    }
    let step_ms = |st: &autodeploy_core::runtime::RunStats| {
        st.decode_time.as_secs_f64() * 1e3 / (st.decode_tokens as f64 / batch as f64).max(1.0)
    };
    let mut order: Vec<usize> = (0..runs.len()).collect();
    order.sort_by(|&a, &b| step_ms(&runs[a]).total_cmp(&step_ms(&runs[b])));
    let stats = runs[order[order.len() / 2]].clone();
    let run_ms: Vec<f64> = runs.iter().map(step_ms).collect();
    let spread = (step_ms(&runs[order[order.len() - 1]]) - step_ms(&runs[order[0]])) / step_ms(&stats).max(1e-12);
    let (device, floor, floor_method) = match cfg.resolved_device() {
        autodeploy_core::config::Device::Cpu => (
            format!(
                "cpu, {} threads ({} cores)",
                autodeploy_kernels::pool::threads(),
                std::thread::available_parallelism().map_or(1, |n| n.get())
            ),
            cpu_floor_before.unwrap_or(0.0).max(autodeploy_kernels::cpu::measure_read_bandwidth()),
            "read of a 512 MiB buffer on the decode pool, best of 3, before and after the timed runs, same run",
        ),
        autodeploy_core::config::Device::Cuda(n) => {
            let gpu = autodeploy_kernels::cuda::exec::Gpu::open(n).map_err(|e| anyhow::anyhow!("{e}"))?;
            let bw = gpu.copy_bandwidth(1 << 30, 20).map_err(|e| anyhow::anyhow!("{e}"))?;
            (
                format!("cuda:{n} {}", gpu.dev.name),
                bw,
                "device-to-device copy of 1 GiB (read + write bytes), 20 copies, best of 3, same run",
            )
        }
    };
    let bytes = weight_bytes(&engine.graph, batch);
    let steps = stats.decode_tokens as f64 / batch as f64;
    let decode_ms = stats.decode_time.as_secs_f64() * 1e3 / steps.max(1.0);
    let achieved = bytes as f64 / (decode_ms / 1e3);
    // The AUTODEPLOY_* settings of this process (kernel knobs change the numbers): sorted.
    let env: std::collections::BTreeMap<String, String> =
        std::env::vars().filter(|(k, _)| k.starts_with("AUTODEPLOY_")).collect();
    // What each transform did to this engine's graph ("disabled" where off), from its history:
    // the defaults change between versions, and the fusions change the numbers.
    let transforms: serde_json::Map<String, serde_json::Value> = engine
        .graph
        .history
        .iter()
        .filter_map(|line| {
            let (head, what) = line.strip_prefix("[stage=")?.split_once("] ")?;
            let name = head.split_once(", transform=")?.1;
            Some((name.to_string(), serde_json::Value::String(what.to_string())))
        })
        .collect();
    let out = serde_json::json!({
        "config": {
            "model": cfg.model, "dtype": engine.graph.meta(engine.graph.outputs[0]).dtype.to_string(),
            "device": cfg.device, "compile_backend": cfg.compile_backend, "attn_backend": cfg.attn_backend,
            "activation_quant": format!("{:?}", cfg.activation_quant).to_lowercase(),
            "load_format": format!("{:?}", cfg.load_format).to_lowercase(),
            "mode": mode, "isl": isl, "osl": osl, "batch": batch, "warmup": "one untimed pass (prefill + 1 decode step)",
            "world_size": cfg.world_size,
            "repeats": format!("{repeats} timed runs; the median run's numbers, every run's decode step in decode_ms_per_step_runs"),
            "env": env,
            "kernels": cfg.kernels,
            "transforms": transforms,
        },
        "device": device,
        "build_ms": engine.build_time.as_secs_f64() * 1e3,
        "prefill_ms": stats.prefill_time.as_secs_f64() * 1e3,
        "prefill_tok_per_s": stats.prefill_tokens as f64 / stats.prefill_time.as_secs_f64(),
        "decode_ms_per_step": decode_ms,
        "output_tok_per_s": stats.decode_tokens as f64 / stats.decode_time.as_secs_f64(),
        "weight_bytes": bytes,
        "achieved_weight_gb_per_s": achieved / 1e9,
        "floor_gb_per_s": floor / 1e9,
        "floor_method": floor_method,
        "fraction_of_floor": achieved / floor,
        "repeats": repeats,
        "decode_ms_per_step_runs": run_ms,
        "decode_spread": spread,
    });
    let mut out = out;
    if achieved > floor {
        // Reading the weights faster than the measured bandwidth means the floor is low (the
        // weights sit in a cache the floor's buffer does not fit) or the runs were too short.
        out["warning"] = serde_json::json!(format!(
            "fraction_of_floor {:.3} is above 1: the floor measurement is low for this model (weights of {} bytes may \
             sit in cache) or the runs were too short; compare decode_ms_per_step across runs instead",
            achieved / floor,
            bytes
        ));
    }
    println!("{out}");
    Ok(())
}

/// The model's end-of-sequence token ends generation unless `ignore_eos` is set.
fn sampling_with_eos(cfg: &PipelineConfig, mut s: SamplingParams, engine: &pipeline::Engine) -> SamplingParams {
    for &eos in &engine.eos_ids {
        if !cfg.ignore_eos && !s.stop_token_ids.contains(&eos) {
            s.stop_token_ids.push(eos);
        }
    }
    s
}

/// `autodeploy chat`: a read-eval-print loop over the chat template, answers streamed.
fn chat(cfg: &PipelineConfig, system: Option<&str>) -> Result<()> {
    use std::io::{BufRead, Write};
    let mut engine = pipeline::build(cfg)?;
    let tok = engine.tokenizer.clone().context("this model has no tokenizer, so it cannot chat")?;
    if tok.chat_template.is_none() {
        anyhow::bail!("{}: the model has no chat template", tok.source.display());
    }
    let mut rt = registry::runtime(cfg)?;
    let mut history: Vec<ChatMessage> = Vec::new();
    if let Some(s) = system {
        history.push(ChatMessage { role: "system".into(), content: s.into() });
    }
    eprintln!(
        "chatting with {} (build {:.1} s). /reset clears the conversation, /exit or Ctrl-D quits.",
        cfg.model,
        engine.build_time.as_secs_f64()
    );
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        history.push(ChatMessage { role: "user".into(), content: line.into() });
        // A conversation longer than max_seq_len loses its oldest turns (said, not silent); a
        // message that does not fit alone is refused.
        let max_len = engine.max_seq_len(cfg);
        let mut dropped = 0;
        let ids = loop {
            let ids = tok.encode(&tok.apply_chat_template(&history, true)?, true)?;
            if ids.len() < max_len {
                break Some(ids);
            }
            let first = history.iter().position(|m| m.role != "system").unwrap_or(0);
            if first + 1 >= history.len() {
                break None;
            }
            history.remove(first);
            dropped += 1;
        };
        if dropped > 0 {
            eprintln!(
                "[the conversation outgrew max_seq_len = {max_len} tokens: dropped its oldest {dropped} messages; /reset starts over]"
            );
        }
        let Some(ids) = ids else {
            eprintln!("[this message alone needs {max_len} tokens or more (max_seq_len = {max_len}); shorten it]");
            history.pop();
            continue;
        };
        let req = Request { prompt: ids, sampling: sampling_with_eos(cfg, cfg.sampling(None), &engine) };
        let mut dec = StreamDecoder::new(tok.as_ref());
        let eos = tok.eos_id;
        let t0 = std::time::Instant::now();
        let (res, stats) = rt.generate_streaming(&mut engine, &[req], &mut |_, t| {
            if Some(t) != eos {
                if let Some(piece) = dec.push(t) {
                    let _ = write!(out, "{piece}");
                    let _ = out.flush();
                }
            }
        });
        println!();
        match res.into_iter().next().expect("one request") {
            Ok(c) => {
                let answer = c.text.unwrap_or_default();
                eprintln!(
                    "[{} tokens, {:.1} tok/s decode, {:.2} s]",
                    c.tokens.len(),
                    stats.decode_tokens as f64 / stats.decode_time.as_secs_f64().max(1e-9),
                    t0.elapsed().as_secs_f64()
                );
                history.push(ChatMessage {
                    role: "assistant".into(),
                    content: answer.trim_end_matches("<|im_end|>").into(),
                });
            }
            Err(e) => {
                eprintln!("error: {e}");
                history.pop();
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    autodeploy_plugins::link();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "autodeploy=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Err(e) = check_plugin_registry(&cli) {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let res = match &cli.cmd {
        Some(Cmd::Plugins { .. }) => {
            plugins::list();
            Ok(())
        }
        Some(Cmd::Graph { stage, rank }) => (|| {
            let s = Stage::parse(stage).with_context(|| {
                let all: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown stage `{stage}`; stages: {}", all.join(", "))
            })?;
            let mut cfg = load_config(&cli)?;
            if *rank >= cfg.world_size {
                anyhow::bail!("--rank {rank}: the ranks are 0..{} (world_size = {})", cfg.world_size, cfg.world_size);
            }
            cfg.rank = *rank;
            let g = pipeline::graph_after(&cfg, s)?;
            for h in &g.history {
                println!("# {h}");
            }
            print!("{}", g.dump());
            Ok(())
        })(),
        Some(Cmd::Serve { host, port, served_model_name }) => {
            ranked(&cli, |c| autodeploy_serve::serve(c, host, *port, served_model_name.as_deref()))
        }
        Some(Cmd::Chat { system }) => ranked(&cli, |c| chat(c, system.as_deref())),
        Some(Cmd::Bench { mode, num_requests, isl, osl, .. }) if mode == "offline" => {
            ranked(&cli, |c| bench_offline(c, *num_requests, *isl, *osl))
        }
        Some(Cmd::Bench { mode, isl, osl, batch, repeats, .. }) => {
            ranked(&cli, |c| bench(c, mode, *isl, *osl, *batch, *repeats))
        }
        Some(Cmd::Run { json, .. }) => ranked(&cli, |c| run(c, *json)),
        None => ranked(&cli, |c| run(c, false)),
    };
    autodeploy_core::comm::finish_process(res.is_ok());
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `autodeploy`: build an inference engine from a model and run it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use autodeploy_core::config::PipelineConfig;
use autodeploy_core::pipeline;
use autodeploy_core::registry;
use autodeploy_core::runtime::{self, Request};
use autodeploy_sdk::Stage;
use clap::{Parser, Subcommand};

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
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the engine and generate completions for the config's prompts (the default).
    Run,
    /// Print the graph after a pipeline stage.
    Graph {
        /// import, post_import, pattern_matcher, quantize, sharding, weight_load,
        /// post_load_fusion, cache_init or compile.
        #[arg(long, default_value = "import")]
        stage: String,
    },
    /// List the plugins this binary knows.
    Plugins,
}

fn load_config(cli: &Cli) -> Result<PipelineConfig> {
    let mut cfg = match &cli.config {
        Some(p) => PipelineConfig::from_file(p)?,
        None => match &cli.model {
            Some(m) => PipelineConfig::from_toml_str(&format!("model = {m:?}"), None)?,
            None => anyhow::bail!(
                "no --config given (and no --model); try `autodeploy --config examples/llama-fixture.toml`"
            ),
        },
    };
    if let Some(m) = &cli.model {
        cfg.model = m.clone();
    }
    if let Some(d) = &cli.dtype {
        cfg.dtype = d.clone();
    }
    if let Some(n) = cli.max_new_tokens {
        cfg.max_new_tokens = n;
    }
    cfg.validate(cli.config.as_deref().unwrap_or("<command line>".as_ref()))?;
    Ok(cfg)
}

fn run(cfg: &PipelineConfig) -> Result<()> {
    let mut engine = pipeline::build(cfg)?;
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
    let requests: Vec<Request> =
        cfg.prompts.iter().map(|p| Request { prompt: p.token_ids.clone(), sampling: cfg.sampling(Some(p)) }).collect();
    let mut rt = runtime::runtime(cfg)?;
    let (results, stats) = rt.generate(&mut engine, &requests);
    let mut failed = 0;
    for (i, (r, req)) in results.iter().zip(&requests).enumerate() {
        println!("[{i}] prompt {:?}", req.prompt);
        match r {
            Ok(c) => println!("[{i}] output {:?} ({:?})", c.tokens, c.finish),
            Err(e) => {
                failed += 1;
                println!("[{i}] error: prompts[{i}]: {e}");
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
        anyhow::bail!("{failed} of {} prompts failed", requests.len());
    }
    Ok(())
}

/// `plugin-registry.toml` beside the config file, else in the working directory.
fn check_plugin_registry(cli: &Cli) -> Result<()> {
    let beside = cli.config.as_ref().and_then(|c| c.parent()).map(|d| d.join("plugin-registry.toml"));
    let path = beside.filter(|p| p.exists()).unwrap_or_else(|| PathBuf::from("plugin-registry.toml"));
    registry::read_plugin_registry(&path)?;
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
        Some(Cmd::Plugins) => {
            println!("{:<18} {:<12} {:<8} origin", "kind", "name", "version");
            for p in registry::list_plugins() {
                println!("{:<18} {:<12} {:<8} {}", p.kind.as_str(), p.name, p.version, p.origin);
            }
            Ok(())
        }
        Some(Cmd::Graph { stage }) => (|| {
            let s = Stage::parse(stage).with_context(|| {
                let all: Vec<&str> = Stage::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown stage `{stage}`; stages: {}", all.join(", "))
            })?;
            let cfg = load_config(&cli)?;
            let g = pipeline::graph_after(&cfg, s)?;
            for h in &g.history {
                println!("# {h}");
            }
            print!("{}", g.dump());
            Ok(())
        })(),
        Some(Cmd::Run) | None => load_config(&cli).and_then(|c| run(&c)),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! Serving: `LLM`, an engine on its own thread that requests join and leave between steps (the
//! Rust API the CLI and the server share), and `autodeploy serve`, an OpenAI-compatible HTTP
//! server in front of it (`http`, `openai`, `metrics`).

pub mod http;
pub mod llm;
pub mod metrics;
pub mod openai;

use std::sync::Arc;

use anyhow::Context;
use autodeploy_core::config::PipelineConfig;

pub use llm::{LlmInfo, Output, Submission, SubmitError, LLM};

/// Builds the engine, then serves it on `host:port` (as `name`, default the config's `model`)
/// until SIGTERM or Ctrl-C: then it stops accepting connections, lets the requests in flight
/// finish, and returns.
pub fn serve(cfg: &PipelineConfig, host: &str, port: u16, name: Option<&str>) -> anyhow::Result<()> {
    let mut llm = LLM::new(cfg)?;
    if let Some(n) = name {
        llm.set_served_name(n);
    }
    let llm = Arc::new(llm);
    let rt = tokio::runtime::Builder::new_multi_thread()
        // The engine thread does the heavy work; HTTP needs little.
        .worker_threads(2)
        .thread_name("autodeploy-http")
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| format!("cannot listen on {host}:{port}"))?;
        let addr = listener.local_addr()?;
        eprintln!("serving `{}` on http://{addr} (OpenAI API under /v1; /health, /metrics)", llm.info().model);
        axum::serve(listener, http::router(llm.clone()))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the HTTP server failed")
    })?;
    eprintln!("stopped accepting requests; finishing those in flight");
    // The runtime's tasks (and their handles) are gone with it; dropping the last handle
    // finishes what the engine still has in flight and stops its thread.
    drop(rt);
    drop(llm);
    eprintln!("stopped");
    Ok(())
}

/// Resolves at SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("signal received: shutting down");
}

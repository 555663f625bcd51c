//! The HTTP front: axum routes over an `LLM`. Each request is parsed and checked here
//! (`openai::parse`), submitted, and answered whole or streamed as server-sent events; a
//! client that goes away drops its submissions, which aborts them in the engine.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use autodeploy_core::runtime::Request;
use autodeploy_core::sampling::TokenLogprobs;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde_json::{json, Value};

use crate::llm::{Output, Submission, SubmitError, LLM};
use crate::openai::{self, ApiError, Job, Kind};

#[derive(Clone)]
struct App {
    llm: Arc<LLM>,
    next_id: Arc<AtomicU64>,
}

/// The server's routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`,
/// `/metrics`.
pub fn router(llm: Arc<LLM>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(App { llm, next_id: Arc::new(AtomicU64::new(0)) })
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(e.body())).into_response()
}

async fn health(State(app): State<App>) -> Response {
    if app.llm.is_alive() {
        StatusCode::OK.into_response()
    } else {
        error(ApiError::status(503, "service_unavailable", format!("the engine has stopped: {}", app.llm.death())))
    }
}

async fn models(State(app): State<App>) -> Json<Value> {
    let info = app.llm.info();
    Json(json!({
        "object": "list",
        "data": [{
            "id": info.model, "object": "model", "created": info.created, "owned_by": "autodeploy",
            "max_model_len": info.max_seq_len,
        }],
    }))
}

async fn metrics(State(app): State<App>) -> Response {
    let text = app.llm.metrics().render(&app.llm.info().model);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn completions(State(app): State<App>, body: Bytes) -> Response {
    respond(app, Kind::Completion, body).await.unwrap_or_else(error)
}

async fn chat(State(app): State<App>, body: Bytes) -> Response {
    respond(app, Kind::Chat, body).await.unwrap_or_else(error)
}

/// Parses, submits every choice (prompt i's copy j is choice `i * n + j`; a seed is offset by
/// j so the copies differ and each is reproducible), waits until the engine accepts them all,
/// then answers.
async fn respond(app: App, kind: Kind, body: Bytes) -> Result<Response, ApiError> {
    let job = openai::parse(kind, &body, app.llm.info())?;
    let mut reqs = Vec::with_capacity(job.prompts.len() * job.n);
    for p in &job.prompts {
        for j in 0..job.n {
            let mut s = job.sampling.clone();
            s.seed = s.seed.map(|x| x.wrapping_add(j as u64));
            reqs.push(Request { prompt: p.clone(), sampling: app.llm.with_eos(s, job.ignore_eos) });
        }
    }
    let mut subs = app.llm.submit_all(reqs).map_err(|e| match e {
        SubmitError::Overloaded(_) => ApiError::status(429, "rate_limit_error", e.to_string()),
        SubmitError::Dead(_) => ApiError::status(503, "service_unavailable", e.to_string()),
    })?;
    for s in subs.iter_mut() {
        match s.next().await {
            Some(Output::Accepted) => {}
            Some(Output::Finished(Err(e))) => return Err(ApiError::from_engine(&e, kind == Kind::Chat)),
            _ => return Err(ApiError::status(500, "internal_error", "the engine answered out of order")),
        }
    }
    let id = format!(
        "{}-{}{:06}",
        if kind == Kind::Chat { "chatcmpl" } else { "cmpl" },
        app.llm.info().created,
        app.next_id.fetch_add(1, Ordering::Relaxed)
    );
    if job.stream {
        Ok(stream_response(app, job, subs, id))
    } else {
        collect_response(&app, &job, subs, &id).await
    }
}

fn object(kind: Kind, chunk: bool) -> &'static str {
    match (kind, chunk) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    }
}

fn created() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn collect_response(app: &App, job: &Job, subs: Vec<Submission>, id: &str) -> Result<Response, ApiError> {
    let info = app.llm.info();
    let mut choices = Vec::new();
    let mut completion_tokens = 0;
    for (i, mut s) in subs.into_iter().enumerate() {
        let mut lps: Vec<(i64, TokenLogprobs)> = Vec::new();
        let c = loop {
            match s.next().await {
                Some(Output::Token { token, logprobs: Some(l), .. }) => lps.push((token, l)),
                Some(Output::Finished(Ok(c))) => break c,
                Some(Output::Finished(Err(e))) => {
                    return Err(ApiError::status(500, "internal_error", format!("choice {i} failed: {e}")))
                }
                Some(_) => {}
                None => return Err(ApiError::status(500, "internal_error", "the request ended without a result")),
            }
        };
        completion_tokens += c.tokens.len();
        let lp = job.logprobs.then(|| {
            let refs: Vec<(i64, &TokenLogprobs)> = lps.iter().map(|(t, l)| (*t, l)).collect();
            openai::logprobs_json(job.kind, info, &refs, 0)
        });
        choices.push(openai::choice(job.kind, i, &c, lp));
    }
    let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
    Ok(Json(json!({
        "id": id,
        "object": object(job.kind, false),
        "created": created(),
        "model": info.model,
        "choices": choices,
        "usage": openai::usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

/// Streams chunks as the engine produces them: a task forwards the submissions' outputs into
/// the response body and stops (dropping, so aborting, the submissions) as soon as the client
/// has gone.
fn stream_response(app: App, job: Job, subs: Vec<Submission>, id: String) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let info = app.llm.info();
        let model = info.model.clone();
        let created = created();
        let kind = job.kind;
        let chunk = |choices: Vec<Value>, usage: Option<Value>| -> String {
            let mut c =
                json!({"id": id, "object": object(kind, true), "created": created, "model": model, "choices": choices});
            if let Some(u) = usage {
                c["usage"] = u;
            }
            c.to_string()
        };
        let n = subs.len();
        let mut merged = stream::select_all(subs.into_iter().enumerate().map(|(i, s)| {
            Box::pin(stream::unfold(s, move |mut s| async move { s.next().await.map(|o| ((i, o), s)) }))
        }));
        if kind == Kind::Chat {
            let first: Vec<Value> = (0..n)
                .map(|i| json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}))
                .collect();
            if tx.send(chunk(first, None)).await.is_err() {
                return;
            }
        }
        let mut sent = vec![0usize; n];
        let mut completion_tokens = 0;
        loop {
            let item = tokio::select! {
                x = merged.next() => x,
                _ = tx.closed() => return,
            };
            let Some((i, out)) = item else { break };
            let msg = match out {
                Output::Accepted => continue,
                Output::Token { token, text, logprobs } => {
                    completion_tokens += 1;
                    // A token whose text is held back (an incomplete character, a possible stop
                    // string) sends nothing yet; without a tokenizer every token is a chunk.
                    if text.is_empty() && logprobs.is_none() && info.tokenizer.is_some() {
                        continue;
                    }
                    let lp = logprobs
                        .filter(|_| job.logprobs)
                        .map(|l| openai::logprobs_json(kind, info, &[(token, &l)], sent[i]));
                    sent[i] += text.len();
                    chunk(vec![openai::chunk_choice(kind, i, &text, lp, None)], None)
                }
                Output::Finished(Ok(c)) => {
                    let rest = c.text.as_deref().and_then(|t| t.get(sent[i]..)).unwrap_or_default();
                    let reason = openai::finish_reason(c.finish);
                    chunk(vec![openai::chunk_choice(kind, i, rest, None, Some(reason))], None)
                }
                Output::Finished(Err(e)) => {
                    let e = ApiError::status(500, "internal_error", format!("choice {i} failed: {e}"));
                    let _ = tx.send(e.body().to_string()).await;
                    return;
                }
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
        if job.include_usage {
            let prompt_tokens: usize = job.prompts.iter().map(Vec::len).sum();
            let _ = tx.send(chunk(Vec::new(), Some(openai::usage(prompt_tokens, completion_tokens)))).await;
        }
        let _ = tx.send("[DONE]".into()).await;
    });
    let body = stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|data| (Ok::<_, Infallible>(SseEvent::default().data(data)), rx))
    });
    Sse::new(body).keep_alive(KeepAlive::default()).into_response()
}

//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`,
//! `GET /customers/{id}` and `GET /segments`. Every error is JSON:
//! `{"error": "...", ...}` with a fitting status.

use crate::ingest::Readiness;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::engine::Engine;
use crate::event::MAX_CUSTOMER_ID_BYTES;
use crate::telemetry::Metrics;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    /// The engine, for lookups and member counts.
    pub engine: Engine,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// Whether the instance owns its partitions, restored, and can serve (`/readyz`).
    pub ready: Arc<Readiness>,
    /// Extra gauges refreshed at scrape time (the producer queue).
    pub on_scrape: Arc<dyn Fn() + Send + Sync>,
}

/// The routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/customers/{id}", get(customer))
        .route("/segments", get(segments))
        .fallback(not_found)
        .with_state(state)
}

/// A running HTTP server.
pub struct HttpServer {
    /// The bound address (port 0 in the config picks a free port).
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    /// Stops accepting, finishes in-flight requests and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Binds `addr` and serves the routes until [`HttpServer::stop`].
pub async fn serve(addr: SocketAddr, state: AppState) -> std::io::Result<HttpServer> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let app = router(state);
    let task = tokio::spawn(async move {
        let until_stopped = async move {
            let _ = stopped.wait_for(|stopped| *stopped).await;
        };
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(until_stopped)
            .await
        {
            tracing::error!(error = %err, "HTTP server failed.");
        }
    });
    Ok(HttpServer { addr, stop, task })
}

fn error(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let counts = state.engine.member_counts();
    for (segment, count) in state.engine.rules().segments.iter().zip(counts) {
        state
            .metrics
            .members
            .with_label_values(&[&*segment.id])
            .set(count);
    }
    state
        .metrics
        .customers
        .set(state.engine.store().len() as i64);
    (state.on_scrape)();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    match state.ready.status() {
        Ok(()) => axum::Json(json!({"status": "ready"})).into_response(),
        Err(why) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not ready", "error": why}),
        ),
    }
}

async fn customer(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    if id.is_empty() || id.len() > MAX_CUSTOMER_ID_BYTES {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("a customer id is 1 to {MAX_CUSTOMER_ID_BYTES} bytes")}),
        );
    }
    // Render under the shard's read lock, release it, then respond.
    let body = state
        .engine
        .store()
        .read(&id, |customer| state.engine.customer_json(&id, customer));
    match body {
        Some(body) => axum::Json(body).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            json!({"error": "customer not found", "customer_id": id}),
        ),
    }
}

async fn segments(State(state): State<AppState>) -> Response {
    let rules = state.engine.rules();
    let counts = state.engine.member_counts();
    let list: Vec<Value> = rules
        .segments
        .iter()
        .zip(counts)
        .map(|(s, members)| {
            json!({
                "id": &*s.id,
                "description": s.description,
                "enter": s.enter.text,
                "exit": s.exit.as_ref().map(|e| &e.text),
                "members": members,
            })
        })
        .collect();
    axum::Json(json!({"rules_version": &*rules.version, "segments": list})).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        json!({"error": "no such endpoint", "path": uri.path(),
               "endpoints": ["/metrics", "/healthz", "/readyz", "/customers/{id}", "/segments"]}),
    )
}

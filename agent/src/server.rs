//! HTTP endpoints: /metrics (read at scrape time), /healthz, /readyz.

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use prometheus::Registry;

use crate::app::App;

#[derive(Clone)]
struct Ctx {
    app: Arc<App>,
    registry: Registry,
}

pub fn router(app: Arc<App>, registry: Registry) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(Ctx { app, registry })
}

async fn metrics(State(ctx): State<Ctx>) -> impl IntoResponse {
    // Map reads are syscalls; keep them off the async workers.
    let text =
        tokio::task::spawn_blocking(move || crate::metrics::encode(&ctx.registry.gather())).await;
    match text {
        Ok(body) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("gather failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn readyz(State(ctx): State<Ctx>) -> impl IntoResponse {
    let mut body = String::new();
    for p in &ctx.app.probes {
        match &p.result {
            Ok(progs) => body.push_str(&format!("{}: attached ({})\n", p.name, progs.join(", "))),
            Err(e) => body.push_str(&format!("{}: not attached: {e}\n", p.name)),
        }
    }
    let code = if ctx.app.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

//! The agent's HTTP listener (`--metrics-addr`, loopback by default):
//! `/metrics` for Prometheus, `/` a live stats page like HAProxy's,
//! `/status.json`, the document of `discovery-agent status --json`, which
//! the page polls, and `/map.svg`, the fleet map (`discovery-agent map`,
//! read from etcd; `?service=NAME` or `?node=NODE` narrows it,
//! `?collapse_above=N` is `map --collapse-above`). The page is embedded in
//! the binary and loads nothing from anywhere else.
use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::metrics::Metrics;

/// The stats page.
const PAGE: &str = include_str!("page.html");

/// Where `/status.json` reads from: the agent's own pins and status file.
#[derive(Debug, Clone)]
pub struct StatusSource {
    pub pin_dir: PathBuf,
    pub status_file: PathBuf,
    /// etcd and the prefix, for the fleet map.
    pub etcd: crate::etcd::EtcdConfig,
    pub prefix: String,
}

/// `/map.svg`, read from etcd now.
async fn map_svg(src: &StatusSource, query: Option<&str>) -> (StatusCode, &'static str, String) {
    let param = |name: &str| {
        query?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| v.to_owned())
        })
    };
    let (service, node) = (param("service"), param("node"));
    let collapse = match param("collapse_above").map(|n| n.parse::<usize>()) {
        None => crate::fleet::COLLAPSE_ABOVE,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            return (
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("fleet map: collapse_above: {e}\n"),
            );
        }
    };
    let drawn = async {
        let f = crate::fleet::read(&src.etcd, &src.prefix)
            .await?
            .filter(service.as_deref(), node.as_deref())
            .collapse_above(collapse);
        tokio::task::spawn_blocking(move || crate::fleet::svg(&f)).await?
    };
    match drawn.await {
        Ok(svg) => (StatusCode::OK, "image/svg+xml", svg),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            format!("fleet map: {e:#}\n"),
        ),
    }
}

fn status_json(src: &StatusSource) -> (StatusCode, String) {
    match crate::status::collect(&src.pin_dir, &src.status_file)
        .and_then(|r| Ok(serde_json::to_string(&r)?))
    {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": format!("{e:#}") }).to_string(),
        ),
    }
}

fn respond(
    m: &Metrics,
    src: &StatusSource,
    req: &Request<Incoming>,
) -> Response<Full<bytes::Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        ),
        "/" | "/stats" => (StatusCode::OK, "text/html; charset=utf-8", PAGE.to_owned()),
        "/status.json" => {
            let (s, body) = status_json(src);
            (s, "application/json", body)
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        // The page is the agent's own view: never from a cache.
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts")
}

/// Binds `addr` and serves until the process ends; returns the bound
/// address (useful with port 0).
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    src: StatusSource,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (--metrics-addr)"))?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics and stats page listening");
    let src = Arc::new(src);
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (m, src) = (metrics.clone(), src.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    // status.json reads the maps: off the async workers.
                    let (m, src) = (m.clone(), src.clone());
                    async move {
                        if req.uri().path() == "/map.svg" {
                            let (status, ctype, body) = map_svg(&src, req.uri().query()).await;
                            return Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", ctype)
                                    .header("cache-control", "no-store")
                                    .body(Full::new(body.into()))
                                    .expect("static response parts"),
                            );
                        }
                        let resp = tokio::task::spawn_blocking(move || respond(&m, &src, &req))
                            .await
                            .unwrap_or_else(|_| {
                                Response::builder()
                                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                                    .body(Full::new("internal error\n".into()))
                                    .expect("static response parts")
                            });
                        Ok::<_, Infallible>(resp)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(%peer, error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(local)
}

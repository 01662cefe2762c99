//! Prometheus metrics of the agent, served as text at `/metrics`.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::net::TcpListener;
use tracing::{debug, info};

/// A service entry that could not be written to the maps.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct NotApplied {
    pub service: String,
    pub frontend: String,
    /// The map that refused the write (full, out of memory).
    pub map: String,
}

pub struct Metrics {
    registry: Registry,
    pub not_applied: Family<NotApplied, Gauge>,
    pub invalid_keys: Gauge,
    pub etcd_revision: Gauge,
    pub services: Gauge,
    pub ejected: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("discovery");
        let not_applied = Family::<NotApplied, Gauge>::default();
        registry.register(
            "service_not_applied",
            "1 for each service frontend that could not be written to the maps, by map",
            not_applied.clone(),
        );
        let invalid_keys = Gauge::default();
        registry.register(
            "invalid_keys",
            "etcd keys under the prefix skipped as invalid",
            invalid_keys.clone(),
        );
        let etcd_revision = Gauge::default();
        registry.register(
            "etcd_revision",
            "etcd revision last applied to the maps",
            etcd_revision.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services",
            "service frontends (address, port, protocol) in the maps",
            services.clone(),
        );
        let ejected = Gauge::default();
        registry.register(
            "backends_ejected",
            "backends out of rotation on this node because their active check fails",
            ejected.clone(),
        );
        Self {
            registry,
            not_applied,
            invalid_keys,
            etcd_revision,
            services,
            ejected,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

fn respond(m: &Metrics, req: &Request<Incoming>) -> Response<Full<bytes::Bytes>> {
    let (status, ctype, body) = if req.uri().path() == "/metrics" {
        (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.encode(),
        )
    } else {
        (
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        )
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

/// Binds `addr` and serves `/metrics` until the process ends; returns the
/// bound address (useful with port 0).
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr} (--metrics-addr)"))?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = respond(&m, &req);
                    async move { Ok::<_, Infallible>(resp) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_the_discovery_prefix_and_labels() {
        let m = Metrics::new();
        m.not_applied
            .get_or_create(&NotApplied {
                service: "web".into(),
                frontend: "127.0.0.1:80/tcp".into(),
                map: "disc_slots".into(),
            })
            .set(1);
        m.etcd_revision.set(42);
        let text = m.encode();
        assert!(
            text.contains("# TYPE discovery_service_not_applied gauge"),
            "{text}"
        );
        assert!(
            text.contains(r#"discovery_service_not_applied{service="web",frontend="127.0.0.1:80/tcp",map="disc_slots"} 1"#),
            "{text}"
        );
        assert!(text.contains("discovery_etcd_revision 42"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}

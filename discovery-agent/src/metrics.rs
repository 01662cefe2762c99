//! Prometheus metrics of the agent, served as text at `/metrics` (see
//! `web`).

use discovery_common::ServiceKey;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _, text::encode},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use tracing::debug;

/// A service entry that could not be written to the maps.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct NotApplied {
    pub service: String,
    pub frontend: String,
    /// The map that refused the write (full, out of memory).
    pub map: String,
}

/// A socket protocol.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ProtocolLabels {
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// Who ejected a backend passively.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct EjectorLabels {
    /// `kernel` or `agent` (`--passive-ejector`).
    pub by: String,
}

/// A frontend this node refuses to route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RefusedLabels {
    pub service: String,
    pub frontend: String,
    /// `reserved` (etcd endpoint, metrics address) or `listener`.
    pub reason: String,
}

pub struct Metrics {
    registry: Registry,
    pub not_applied: Family<NotApplied, Gauge>,
    pub refused: Family<RefusedLabels, Gauge>,
    pub invalid_keys: Gauge,
    pub etcd_revision: Gauge,
    pub etcd_connected: Gauge,
    pub services: Gauge,
    pub ejected: Gauge,
    pub passive_ejections: Family<EjectorLabels, Counter>,
    pub sockets_destroyed: Family<ProtocolLabels, Counter>,
    pub last_reconcile: Gauge,
    pub reconcile_duration: Histogram,
    pub resteer_duration: Histogram,
}

/// Reads the kernel's counters from the pinned maps at each scrape, so the
/// numbers are never older than the scrape.
#[derive(Debug)]
pub struct KernelCollector {
    pub pin_dir: std::path::PathBuf,
    /// Frontend → service name, as last applied.
    pub names: tokio::sync::watch::Receiver<std::collections::HashMap<ServiceKey, String>>,
    pub etcd_revision: Gauge,
    /// The newest revision the etcd source has seen, kept by the source
    /// itself (updates may still wait in the channel to the controller).
    pub seen_revision: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

type Labels = Vec<(&'static str, String)>;

fn counters(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for KernelCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let seen = self
            .seen_revision
            .load(std::sync::atomic::Ordering::Relaxed);
        gauges(
            &mut e,
            "etcd_watch_revision",
            "newest etcd revision seen on the watch",
            &[(vec![], seen)],
        )?;
        let lag = (seen - self.etcd_revision.get()).max(0);
        gauges(
            &mut e,
            "etcd_watch_lag_revisions",
            "etcd revisions seen on the watch but not yet applied to the maps",
            &[(vec![], lag)],
        )?;
        // Before the agent pinned its maps there is nothing to read.
        let view = match crate::maps::BpfMaps::open(&self.pin_dir).and_then(|m| m.view()) {
            Ok(v) => v,
            Err(err) => {
                debug!(error = %format!("{err:#}"), "metrics: kernel view unavailable");
                return Ok(());
            }
        };
        let names = self.names.borrow().clone();
        let svc_labels = |k: &ServiceKey| -> Labels {
            vec![
                (
                    "service",
                    names.get(k).cloned().unwrap_or_else(|| "?".into()),
                ),
                ("frontend", crate::addr::frontend(k)),
            ]
        };
        let per_svc = |f: fn(&discovery_common::ServiceStats) -> u64| -> Vec<(Labels, u64)> {
            view.services
                .iter()
                .map(|s| (svc_labels(&s.key), f(&s.stats)))
                .collect()
        };
        counters(
            &mut e,
            "service_connects",
            "connect() calls redirected (TCP and connected UDP)",
            &per_svc(|s| s.connects),
        )?;
        counters(
            &mut e,
            "service_datagrams",
            "unconnected UDP datagrams redirected",
            &per_svc(|s| s.datagrams),
        )?;
        counters(
            &mut e,
            "service_no_backend",
            "calls refused because the service had no backend",
            &per_svc(|s| s.no_backend),
        )?;
        counters(
            &mut e,
            "service_connect_failures",
            "redirected TCP connects that failed (refused or timed out)",
            &per_svc(|s| s.connect_failed),
        )?;
        let per_backend = |f: fn(&crate::maps::BackendView) -> u64| -> Vec<(Labels, u64)> {
            view.backends
                .iter()
                .map(|(a, v)| (vec![("backend", crate::addr::show(*a))], f(v)))
                .collect()
        };
        counters(
            &mut e,
            "backend_connects",
            "connect() calls redirected to this backend",
            &per_backend(|v| v.stats.connects),
        )?;
        counters(
            &mut e,
            "backend_datagrams",
            "unconnected UDP datagrams redirected to this backend",
            &per_backend(|v| v.stats.datagrams),
        )?;
        counters(
            &mut e,
            "backend_connect_failures",
            "redirected TCP connects to this backend that failed",
            &per_backend(|v| v.health.failures),
        )?;
        let live: Vec<(Labels, i64)> = per_backend(|v| u64::from(v.health.live))
            .into_iter()
            .map(|(l, v)| (l, v as i64))
            .collect();
        gauges(
            &mut e,
            "backend_connections",
            "redirected TCP connections open now",
            &live,
        )?;
        let events: Vec<(Labels, u64)> = view
            .counters
            .iter()
            .map(|(n, v)| (vec![("event", (*n).to_owned())], *v))
            .collect();
        counters(
            &mut e,
            "kernel_events",
            "program events summed over CPUs, by kind",
            &events,
        )?;
        let usage = |pick: fn(usize, usize) -> usize| -> Vec<(Labels, i64)> {
            view.usage
                .iter()
                .map(|(m, n, cap)| (vec![("map", (*m).to_owned())], pick(*n, *cap) as i64))
                .collect()
        };
        gauges(
            &mut e,
            "map_entries",
            "entries in use per map",
            &usage(|n, _| n),
        )?;
        gauges(
            &mut e,
            "map_capacity",
            "maximum entries per map",
            &usage(|_, c| c),
        )?;
        Ok(())
    }
}

impl Metrics {
    pub fn new(kernel: Option<KernelCollector>) -> Self {
        let mut registry = Registry::with_prefix("discovery");
        let not_applied = Family::<NotApplied, Gauge>::default();
        registry.register(
            "service_not_applied",
            "1 for each service frontend that could not be written to the maps, by map",
            not_applied.clone(),
        );
        let refused = Family::<RefusedLabels, Gauge>::default();
        registry.register(
            "frontend_refused",
            "1 for each frontend this node does not route although a service claims it: \
             reserved (an etcd endpoint, the metrics address) or a socket listens there",
            refused.clone(),
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
        let etcd_connected = Gauge::default();
        registry.register(
            "etcd_connected",
            "1 while the agent holds a consistent list and a live watch",
            etcd_connected.clone(),
        );
        let last_reconcile = Gauge::default();
        registry.register_with_unit(
            "last_reconcile_timestamp",
            "Unix time of the last reconcile of the maps",
            Unit::Seconds,
            last_reconcile.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register_with_unit(
            "reconcile_duration",
            "time to diff the desired table against the maps and write the difference",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        let resteer_duration = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register_with_unit(
            "resteer_duration",
            "time from the map write to the end of the re-steering sweep it started (listing \
             redirected sockets in every namespace, destroying those of backends that left)",
            Unit::Seconds,
            resteer_duration.clone(),
        );
        if let Some(mut k) = kernel {
            k.etcd_revision = etcd_revision.clone();
            registry.register_collector(Box::new(k));
        }
        let services = Gauge::default();
        registry.register(
            "services",
            "service frontends (address, port, protocol) in the maps",
            services.clone(),
        );
        let ejected = Gauge::default();
        registry.register(
            "backends_ejected",
            "backends out of rotation on this node: their active check fails, or passively ejected",
            ejected.clone(),
        );
        let passive_ejections = Family::<EjectorLabels, Counter>::default();
        registry.register(
            "passive_ejections",
            "backends taken out on this node after --passive-failures failed connects in a row, \
             by who decided (the kernel's sock_ops program or the agent's poll)",
            passive_ejections.clone(),
        );
        let sockets_destroyed = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "sockets_destroyed",
            "redirected sockets destroyed because their backend left (connected UDP; TCP of \
             services with shutdown_sessions)",
            sockets_destroyed.clone(),
        );
        // At 0 from the start: a series born at 1 hides its first event
        // from rate() and increase().
        for by in ["kernel", "agent"] {
            drop(passive_ejections.get_or_create(&EjectorLabels { by: by.to_owned() }));
        }
        for protocol in ["tcp", "udp"] {
            drop(sockets_destroyed.get_or_create(&ProtocolLabels {
                protocol: protocol.to_owned(),
            }));
        }
        Self {
            registry,
            passive_ejections,
            sockets_destroyed,
            not_applied,
            refused,
            invalid_keys,
            etcd_revision,
            etcd_connected,
            services,
            ejected,
            last_reconcile,
            reconcile_duration,
            resteer_duration,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_the_discovery_prefix_and_labels() {
        let m = Metrics::new(None);
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

//! The fleet map (`discovery-agent map`, and `/map.svg` on the stats
//! page): who talks to whom across the fleet, from etcd alone: the consumer summaries every agent publishes
//! (`<prefix>consumers/<service>/<node>`) and the services and backends.
//! Workloads (node and cgroup) → services → backends, with call counts;
//! services without a backend in red, and workloads still calling a
//! service that was removed, in grey. Written as DOT (for graphviz) or as
//! SVG laid out by the layout-rs crate from that same DOT.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use anyhow::Context as _;
use etcd_client::GetOptions;

use crate::{
    consumers::Summary,
    etcd::connect,
    schema::{KeyRef, parse_backend, parse_key},
};

/// What the map shows, read from etcd.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Service → its frontends (from the raw value, as written).
    pub services: BTreeMap<String, String>,
    /// Service → backend addresses.
    pub backends: BTreeMap<String, BTreeSet<String>>,
    /// (node, cgroup, service) → calls.
    pub calls: BTreeMap<(String, String, String), u64>,
}

impl Fleet {
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.calls.is_empty()
    }
}

impl Fleet {
    /// Keeps what `service` and `node` select (None: all).
    pub fn filter(mut self, service: Option<&str>, node: Option<&str>) -> Self {
        self.calls
            .retain(|(n, _, s), _| service.is_none_or(|x| x == s) && node.is_none_or(|x| x == n));
        if let Some(s) = service {
            self.services.retain(|k, _| k == s);
            self.backends.retain(|k, _| k == s);
        } else if node.is_some() {
            let used: BTreeSet<String> = self.calls.keys().map(|(_, _, s)| s.clone()).collect();
            self.services.retain(|k, _| used.contains(k));
            self.backends.retain(|k, _| used.contains(k));
        }
        self
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph in DOT.
pub fn dot(f: &Fleet) -> String {
    let mut o = String::from("digraph fleet {\n  rankdir=LR;\n");
    let workloads: BTreeSet<(&str, &str)> = f
        .calls
        .keys()
        .map(|(n, c, _)| (n.as_str(), c.as_str()))
        .collect();
    for (n, c) in &workloads {
        let _ = writeln!(
            o,
            "  {} [shape=box, label={}];",
            quote(&format!("w:{n}:{c}")),
            quote(&format!("{n} {c}"))
        );
    }
    let called: BTreeSet<&str> = f.calls.keys().map(|(_, _, s)| s.as_str()).collect();
    let names: BTreeSet<&str> = f
        .services
        .keys()
        .map(String::as_str)
        .chain(called.iter().copied())
        .collect();
    for s in names {
        let (label, style) = match f.services.get(s) {
            None => (
                format!("{s} (removed)"),
                "style=filled, fillcolor=lightgrey",
            ),
            Some(fe) if f.backends.get(s).is_none_or(BTreeSet::is_empty) => (
                format!("{s} {fe} (no backend)"),
                "style=filled, fillcolor=salmon",
            ),
            Some(fe) => (format!("{s} {fe}"), "style=filled, fillcolor=lightblue"),
        };
        let _ = writeln!(
            o,
            "  {} [shape=ellipse, label={}, {style}];",
            quote(&format!("s:{s}")),
            quote(&label)
        );
    }
    for (s, bs) in &f.backends {
        if !f.services.contains_key(s) {
            continue;
        }
        for b in bs {
            let _ = writeln!(
                o,
                "  {} [shape=box, label={}];\n  {} -> {};",
                quote(&format!("b:{b}")),
                quote(b),
                quote(&format!("s:{s}")),
                quote(&format!("b:{b}"))
            );
        }
    }
    for ((n, c, s), calls) in &f.calls {
        let _ = writeln!(
            o,
            "  {} -> {} [label={}];",
            quote(&format!("w:{n}:{c}")),
            quote(&format!("s:{s}")),
            quote(&calls.to_string())
        );
    }
    o.push_str("}\n");
    o
}

/// The graph as SVG: the DOT above, laid out by layout-rs.
pub fn svg(f: &Fleet) -> anyhow::Result<String> {
    let text = dot(f);
    let mut parser = layout::gv::DotParser::new(&text);
    let graph = parser
        .process()
        .map_err(|e| anyhow::anyhow!("laying out the map: {e}"))?;
    let mut builder = layout::gv::GraphBuilder::new();
    builder.visit_graph(&graph);
    let mut vg = builder.get();
    let mut out = layout::backends::svg::SVGWriter::new();
    vg.do_it(false, false, false, &mut out);
    Ok(out.finalize())
}

/// Reads the fleet from etcd under `prefix`.
pub async fn read(etcd: &crate::etcd::EtcdConfig, prefix: &str) -> anyhow::Result<Fleet> {
    let mut client = connect(etcd).await.context("connecting to etcd")?;
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .with_context(|| format!("listing {prefix}"))?;
    let mut f = Fleet::default();
    let consumers = format!("{prefix}consumers/");
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        if let Some(rest) = key.strip_prefix(&consumers) {
            let Some((service, _node)) = rest.split_once('/') else {
                continue;
            };
            // A summary from a newer agent with more fields still reads.
            let Ok(s) = serde_json::from_slice::<Summary>(kv.value()) else {
                continue;
            };
            for w in s.workloads {
                *f.calls
                    .entry((s.node.clone(), w.cgroup, service.to_owned()))
                    .or_default() += w.calls;
            }
            continue;
        }
        match parse_key(prefix, &key) {
            Ok(Some(KeyRef::Service(name))) => {
                let fe = serde_json::from_slice::<serde_json::Value>(kv.value())
                    .ok()
                    .map(|v| match &v["frontend"] {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                    .unwrap_or_default();
                f.services.insert(name, fe);
            }
            Ok(Some(KeyRef::Backend { service, .. })) => {
                if let Ok(b) = parse_backend(kv.value()) {
                    f.backends
                        .entry(service)
                        .or_default()
                        .insert(b.addr.to_string());
                }
            }
            _ => {}
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet() -> Fleet {
        let mut f = Fleet::default();
        f.services.insert("web".into(), "127.0.0.1:80".into());
        f.services.insert("db".into(), "127.0.0.1:5432".into());
        f.backends
            .entry("web".into())
            .or_default()
            .insert("10.0.0.5:80".into());
        f.calls
            .insert(("n1".into(), "/app.slice".into(), "web".into()), 42);
        f.calls
            .insert(("n2".into(), "/old.slice".into(), "gone".into()), 7);
        f
    }

    #[test]
    fn the_map_marks_missing_backends_and_removed_services() {
        let d = dot(&fleet());
        assert!(
            d.contains("\"w:n1:/app.slice\" -> \"s:web\" [label=\"42\"]"),
            "{d}"
        );
        assert!(d.contains("\"s:web\" -> \"b:10.0.0.5:80\""), "{d}");
        assert!(d.contains("db 127.0.0.1:5432 (no backend)"), "{d}");
        assert!(d.contains("gone (removed)"), "{d}");
        let s = svg(&fleet()).unwrap();
        assert!(s.starts_with("<svg") || s.contains("<svg"), "{s}");
        assert!(s.contains("gone (removed)"));
        let only = fleet().filter(None, Some("n2"));
        assert_eq!(only.calls.len(), 1);
        assert!(only.services.is_empty(), "n2 calls only a removed service");
    }
}

//! The fleet map (`discovery-agent map`, and `/map.svg` on the stats
//! page): who talks to whom across the fleet, from etcd alone: the consumer summaries every agent publishes
//! (`<prefix>consumers/<service>/<node>`) and the services and backends.
//! Workloads (node and cgroup) → services → backends, with call counts;
//! services without a backend in red, and workloads still calling a
//! service that was removed, in grey. Written as DOT (for graphviz) or as
//! SVG laid out by the layout-rs crate from that same DOT.
//!
//! Large fleets: above [`COLLAPSE_ABOVE`] backends on the map (after
//! `--service`/`--node`; `--collapse-above`), each service's backends are
//! drawn as one node with their count; a map of one service shows them.
//! layout-rs's time grows about as the cube of the nodes (10 s at 570), so
//! a map of more than [`LAYOUT_RS_NODES`] nodes is drawn in three columns
//! instead (workloads, services in name order, backends), each workload at
//! the height of the services it calls: linear, 1,000 services in
//! milliseconds.
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
    /// Each service's backends drawn as one node with their count.
    pub collapsed: bool,
}

/// The default of `--collapse-above`: more backends than this on the map
/// and they are drawn as one count per service.
pub const COLLAPSE_ABOVE: usize = 200;

/// The largest map (in nodes) layout-rs lays out; see the module comment.
const LAYOUT_RS_NODES: usize = 120;

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

    /// Backends on the map (of services that exist).
    pub fn backend_count(&self) -> usize {
        self.backends
            .iter()
            .filter(|(s, _)| self.services.contains_key(*s))
            .map(|(_, b)| b.len())
            .sum()
    }

    /// Draws each service's backends as one count if there are more than
    /// `above` on the map, unless they are one service's (`--service`):
    /// then they are the detail asked for.
    pub fn collapse_above(mut self, above: usize) -> Self {
        let with_backends = self
            .backends
            .iter()
            .filter(|(s, b)| !b.is_empty() && self.services.contains_key(*s))
            .count();
        self.collapsed = with_backends > 1 && self.backend_count() > above;
        self
    }

    /// The workloads (node, cgroup), sorted.
    fn workloads(&self) -> BTreeSet<(&str, &str)> {
        self.calls
            .keys()
            .map(|(n, c, _)| (n.as_str(), c.as_str()))
            .collect()
    }

    /// Every service on the map: those in etcd and those still called.
    fn service_names(&self) -> BTreeSet<&str> {
        self.services
            .keys()
            .map(String::as_str)
            .chain(self.calls.keys().map(|(_, _, s)| s.as_str()))
            .collect()
    }

    /// The backends of `service` as drawn: `Err(count)` when collapsed.
    fn drawn_backends(&self, service: &str) -> Result<Vec<&str>, usize> {
        let bs = match (
            self.services.contains_key(service),
            self.backends.get(service),
        ) {
            (true, Some(bs)) => bs,
            _ => return Ok(vec![]),
        };
        if self.collapsed {
            Err(bs.len())
        } else {
            Ok(bs.iter().map(String::as_str).collect())
        }
    }

    /// Nodes on the map.
    fn node_count(&self) -> usize {
        let names = self.service_names();
        let backends: usize = names
            .iter()
            .map(|s| match self.drawn_backends(s) {
                Ok(bs) => bs.len(),
                Err(_) => 1,
            })
            .sum();
        self.workloads().len() + names.len() + backends
    }

    /// A service's label and fill colour.
    fn service_look(&self, s: &str) -> (String, &'static str) {
        match self.services.get(s) {
            None => (format!("{s} (removed)"), "lightgrey"),
            Some(fe) if self.backends.get(s).is_none_or(BTreeSet::is_empty) => {
                (format!("{s} {fe} (no backend)"), "salmon")
            }
            Some(fe) => (format!("{s} {fe}"), "lightblue"),
        }
    }
}

/// "1 backend", "10 backends".
fn count_label(n: usize) -> String {
    format!("{n} backend{}", if n == 1 { "" } else { "s" })
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph in DOT.
pub fn dot(f: &Fleet) -> String {
    let mut o = String::from("digraph fleet {\n  rankdir=LR;\n");
    for (n, c) in f.workloads() {
        let _ = writeln!(
            o,
            "  {} [shape=box, label={}];",
            quote(&format!("w:{n}:{c}")),
            quote(&format!("{n} {c}"))
        );
    }
    let names = f.service_names();
    for s in &names {
        let (label, fill) = f.service_look(s);
        let _ = writeln!(
            o,
            "  {} [shape=ellipse, label={}, style=filled, fillcolor={fill}];",
            quote(&format!("s:{s}")),
            quote(&label)
        );
    }
    for s in &names {
        let drawn: Vec<(String, String)> = match f.drawn_backends(s) {
            Ok(bs) => bs
                .into_iter()
                .map(|b| (format!("b:{b}"), b.to_owned()))
                .collect(),
            Err(n) => vec![(format!("n:{s}"), count_label(n))],
        };
        for (id, label) in drawn {
            let _ = writeln!(
                o,
                "  {} [shape=box, label={}];\n  {} -> {};",
                quote(&id),
                quote(&label),
                quote(&format!("s:{s}")),
                quote(&id)
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

/// The graph as SVG: the DOT above laid out by layout-rs, or, for a map of
/// more than [`LAYOUT_RS_NODES`] nodes, in columns.
pub fn svg(f: &Fleet) -> anyhow::Result<String> {
    if f.node_count() > LAYOUT_RS_NODES {
        return Ok(columns(f));
    }
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

/// The columns' row height and a character's width (12 px sans-serif).
const ROW: f64 = 26.0;
const CHAR: f64 = 7.0;

fn xml(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The width of a box around `label`.
fn box_width(label: &str) -> f64 {
    label.chars().count() as f64 * CHAR + 16.0
}

/// Orders names as a person would: digit runs by their value ("s2" before
/// "s10").
fn natural(a: &str, b: &str) -> std::cmp::Ordering {
    /// Whether `s` starts with digits, its first run of digits or of other
    /// characters, and the rest.
    fn split(s: &str) -> (bool, &str, &str) {
        let digits = s.starts_with(|c: char| c.is_ascii_digit());
        let n = s
            .find(|c: char| c.is_ascii_digit() != digits)
            .unwrap_or(s.len());
        (digits, &s[..n], &s[n..])
    }
    let (mut a, mut b) = (a, b);
    loop {
        if a.is_empty() || b.is_empty() {
            return a.len().cmp(&b.len());
        }
        let ((da, xa, ra), (db, xb, rb)) = (split(a), split(b));
        let o = if da && db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len().cmp(&tb.len()).then(ta.cmp(tb))
        } else {
            xa.cmp(xb)
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
        (a, b) = (ra, rb);
    }
}

/// The map in three columns (see the module comment): workloads, services
/// in natural name order (each as tall as its backends), backends beside
/// their service, and at the end of each service's row who calls it. A
/// call is a curve with the whole story in its tooltip (`<title>`): a
/// thousand labels on curves cannot be read.
fn columns(f: &Fleet) -> String {
    const TOP: f64 = 36.0;
    const MARGIN: f64 = 20.0;
    let mut names: Vec<&str> = f.service_names().into_iter().collect();
    names.sort_by(|a, b| natural(a, b).then(a.cmp(b)));
    let mut callers: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for ((_, _, s), calls) in &f.calls {
        let c = callers.entry(s.as_str()).or_default();
        c.0 += 1;
        c.1 += calls;
    }
    // Services top to bottom.
    let mut rows = Vec::with_capacity(names.len());
    let mut y = TOP;
    let mut at = BTreeMap::new();
    for s in &names {
        let bs: Vec<String> = match f.drawn_backends(s) {
            Ok(bs) => bs.into_iter().map(str::to_owned).collect(),
            Err(n) => vec![count_label(n)],
        };
        at.insert(*s, y);
        let (label, fill) = f.service_look(s);
        let tall = bs.len().max(1);
        rows.push((y, label, fill, bs, callers.get(s).copied()));
        y += ROW * tall as f64;
    }
    let mut height = y;
    // Workloads at the mean height of the services they call, in that
    // order, a row apart at least.
    let mut calls_of: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for (n, c, s) in f.calls.keys() {
        if let Some(y) = at.get(s.as_str()) {
            calls_of.entry((n, c)).or_default().push(*y);
        }
    }
    let mut ws: Vec<((&str, &str), f64)> = calls_of
        .into_iter()
        .map(|(w, ys)| (w, ys.iter().sum::<f64>() / ys.len() as f64))
        .collect();
    ws.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut last = f64::NEG_INFINITY;
    let mut wy = BTreeMap::new();
    for (w, bary) in &ws {
        let y = bary.max(last + ROW).max(TOP);
        wy.insert(*w, y);
        last = y;
        height = height.max(y + ROW);
    }
    let ww = ws
        .iter()
        .map(|((n, c), _)| box_width(&format!("{n} {c}")))
        .fold(0.0, f64::max);
    let sw = rows.iter().map(|r| box_width(&r.1)).fold(0.0, f64::max);
    let bw = rows
        .iter()
        .flat_map(|r| r.3.iter().map(|b| box_width(b)))
        .fold(0.0, f64::max);
    let xs = if ws.is_empty() {
        MARGIN
    } else {
        MARGIN + ww + 240.0
    };
    let xb = xs + sw + 40.0;
    let xc = xb + bw + 16.0;
    let who = |c: Option<(usize, u64)>| match c {
        None => String::new(),
        Some((1, calls)) => format!("1 caller, {calls} calls"),
        Some((n, calls)) => format!("{n} callers, {calls} calls"),
    };
    let backends = f.backend_count();
    let title = format!(
        "{} services, {backends} backends, {} workloads{}",
        names.len(),
        ws.len(),
        if f.collapsed {
            "; backends counted per service (see each: --service or ?service=, or a \
             higher --collapse-above); hover over a call for its count"
        } else {
            "; hover over a call for its count"
        }
    );
    let width = rows
        .iter()
        .map(|r| xc + who(r.4).len() as f64 * CHAR)
        .fold(title.len() as f64 * CHAR, f64::max)
        + MARGIN;
    let height = height + MARGIN;
    let mid = ROW / 2.0;
    let mut o = String::with_capacity(200 * (f.calls.len() + rows.len() * 2));
    let _ = writeln!(
        o,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <style>rect{{stroke:#444}} .w,.b{{fill:#fff}} path{{fill:none;stroke:#888}} \
         .c{{stroke-opacity:.45}} .c:hover{{stroke:#d00;stroke-opacity:1;stroke-width:2}} \
         .who{{fill:#555}}</style>"
    );
    let _ = writeln!(
        o,
        "<text x=\"{MARGIN}\" y=\"20\" font-size=\"14\">{}</text>",
        xml(&title)
    );
    // Edges first, under the boxes.
    for ((n, c, s), calls) in &f.calls {
        let (Some(y1), Some(y2)) = (wy.get(&(n.as_str(), c.as_str())), at.get(s.as_str())) else {
            continue;
        };
        let (x1, x2, y1, y2) = (MARGIN + ww, xs, y1 + mid, y2 + mid);
        let xm = (x1 + x2) / 2.0;
        let _ = writeln!(
            o,
            "<path class=\"c\" d=\"M{x1:.0},{y1:.0} C{xm:.0},{y1:.0} {xm:.0},{y2:.0} \
             {x2:.0},{y2:.0}\"><title>{} → {}: {calls} calls</title></path>",
            xml(&format!("{n} {c}")),
            xml(s),
        );
    }
    for (y, label, _, bs, _) in &rows {
        let x1 = xs + box_width(label);
        for i in 0..bs.len() {
            let y2 = y + ROW * i as f64 + mid;
            let _ = writeln!(o, "<path d=\"M{x1:.0},{:.0} L{xb:.0},{y2:.0}\"/>", y + mid);
        }
    }
    let node = |o: &mut String, x: f64, y: f64, label: &str, attrs: &str| {
        let _ = writeln!(
            o,
            "<rect x=\"{x:.0}\" y=\"{:.0}\" width=\"{:.0}\" height=\"{:.0}\" {attrs}/>\
             <text x=\"{:.0}\" y=\"{:.0}\">{}</text>",
            y + 3.0,
            box_width(label),
            ROW - 6.0,
            x + 8.0,
            y + mid + 4.0,
            xml(label)
        );
    };
    for ((n, c), y) in &wy {
        node(&mut o, MARGIN, *y, &format!("{n} {c}"), "class=\"w\"");
    }
    for (y, label, fill, bs, c) in &rows {
        node(&mut o, xs, *y, label, &format!("rx=\"10\" fill=\"{fill}\""));
        for (i, b) in bs.iter().enumerate() {
            node(&mut o, xb, y + ROW * i as f64, b, "class=\"b\"");
        }
        if c.is_some() {
            let _ = writeln!(
                o,
                "<text class=\"who\" x=\"{xc:.0}\" y=\"{:.0}\">{}</text>",
                y + mid + 4.0,
                who(*c)
            );
        }
    }
    o.push_str("</svg>\n");
    o
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

    /// `n` services of 10 backends, each called from one of 5 workloads.
    fn big(n: usize) -> Fleet {
        let mut f = Fleet::default();
        for i in 0..n {
            let s = format!("s{i}");
            f.services
                .insert(s.clone(), format!("127.0.0.1:{}", 1000 + i));
            for j in 0..10 {
                f.backends
                    .entry(s.clone())
                    .or_default()
                    .insert(format!("10.0.{i}.{j}:80"));
            }
            f.calls
                .insert((format!("n{}", i % 5), "/app.slice".into(), s), i as u64);
        }
        f
    }

    #[test]
    fn names_sort_naturally() {
        let mut v = vec!["s10", "s2", "s1", "a", "s02", "b1x", "b1", ""];
        v.sort_by(|a, b| natural(a, b).then(a.cmp(b)));
        assert_eq!(v, ["", "a", "b1", "b1x", "s1", "s02", "s2", "s10"]);
    }

    #[test]
    fn a_large_map_counts_backends_per_service_until_filtered() {
        let f = big(1000).filter(None, None).collapse_above(COLLAPSE_ABOVE);
        assert!(f.collapsed);
        let d = dot(&f);
        assert!(
            d.contains("\"n:s7\" [shape=box, label=\"10 backends\"]"),
            "{d:.2000}"
        );
        assert!(!d.contains("\"b:10.0.7.1:80\""));
        // Drawn in columns: every service, its count, the calls.
        let s = svg(&f).unwrap();
        assert!(s.starts_with("<svg"), "{s:.300}");
        assert_eq!(s.matches(">10 backends</text>").count(), 1000);
        assert!(s.contains(">s999 127.0.0.1:1999</text>"));
        assert_eq!(s.matches("<path class=\"c\"").count(), 1000);
        assert!(s.contains("<title>n4 /app.slice → s999: 999 calls</title>"));
        assert!(s.contains(">1 caller, 999 calls</text>"));
        // In natural order: s2 above s10.
        assert!(s.find(">s2 127.0.0.1:1002<") < s.find(">s10 127.0.0.1:1010<"));
        // One service: every backend again, laid out by layout-rs.
        let one = big(1000)
            .filter(Some("s7"), None)
            .collapse_above(COLLAPSE_ABOVE);
        assert!(!one.collapsed);
        // Even with more than the threshold.
        assert!(
            !big(1000)
                .filter(Some("s7"), None)
                .collapse_above(5)
                .collapsed
        );
        let s = svg(&one).unwrap();
        assert!(
            s.contains("10.0.7.9:80") && !s.contains("backends</text>"),
            "{s:.300}"
        );
        // Labels are escaped.
        let mut odd = big(130).collapse_above(0);
        odd.services.insert("a<b&c".into(), "\"x\"".into());
        let s = svg(&odd).unwrap();
        assert!(
            s.contains("a&lt;b&amp;c &quot;x&quot; (no backend)"),
            "{s:.300}"
        );
    }
}

//! The stats page and the fleet map at 1k services / 10k backends, in real
//! time: an agent (the tests' harness) with 1,000 services of 10 backends
//! each and consumers summaries from 20 nodes in etcd; Debian's headless
//! Chromium (driven over the DevTools protocol, tests/src/cdp.rs) loads the page and
//! the map. Times in the browser come from performance.now() in the page
//! (zero at navigation start); "painted" is the first task after the next
//! animation frame (requestAnimationFrame, then a MessageChannel message),
//! after the layout was forced.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use discovery_tests::{World, cdp::Browser};
use serde_json::Value;

use super::{Bins, Plan, summarise, which};
use crate::report::{PageRow, Results};

const SERVICES: usize = 1000;
const BACKENDS: usize = 10;
const NODES: usize = 20;
/// Workloads (cgroups) per node; each calls some services.
const WORKLOADS: usize = 5;

/// Installed in every document before its own scripts (see the module
/// comment): records each render the page's poll makes (`body
/// data-loaded` counts them) and drives the filters.
const PROBE_JS: &str = r##"(() => {
  const frame = () => new Promise(resolve => requestAnimationFrame(() => {
    const c = new MessageChannel();
    c.port1.onmessage = () => resolve(performance.now());
    c.port2.postMessage(0);
  }));
  const rows = () => document.querySelectorAll("#services tr[data-instance]").length;
  const count = () => (document.getElementById("count") || {}).textContent || "";
  // The page's list (a top-level `let` of its script) is complete: the
  // page builds 10,000 rows in slices, body[data-built] counts the builds
  // it finished.
  const done = () => typeof shown !== "undefined" && shown !== null && shown.done;
  let builtWaiters = [];
  const built = () => new Promise(res => {
    const chk = () => done() ? res() : builtWaiters.push(chk);
    chk();
  });
  const loads = [];
  let waiters = [];
  const next = () => new Promise(r => waiters.push(r));
  const b = { frame, loads, next };
  b.first = next();
  // From setting the value and dispatching the event: the first frame
  // painted (the first slice of rows) and, once every row is in, the frame
  // after.
  b.filter = async (id, value, type) => {
    // Right after a poll's frame: the next poll is a second away.
    await next();
    const el = document.getElementById(id);
    const t0 = performance.now();
    el.value = value;
    el.dispatchEvent(new Event(type, { bubbles: true }));
    const sync = done();
    document.body.offsetHeight;
    const first = await frame();
    let all = first;
    if (!sync) {
      await built();
      document.body.offsetHeight;
      all = await frame();
    }
    return { first: first - t0, all: all - t0, rows: rows(), count: count() };
  };
  // Scrolls to the end (y < 0) or to y; the services coming into view
  // are laid out in that frame (content-visibility).
  b.scroll = async y => {
    await next();
    const t0 = performance.now();
    window.scrollTo(0, y < 0 ? document.documentElement.scrollHeight : y);
    document.body.offsetHeight;
    const painted = await frame();
    return { ms: painted - t0, y: window.scrollY, rows: rows(), count: count() };
  };
  const seen = async () => {
    const rendered = performance.now();
    const n = Number(document.body.dataset.loaded);
    const sync = done();
    document.body.offsetHeight;
    const laidOut = performance.now();
    const res = performance.getEntriesByType("resource")
      .filter(e => e.name.endsWith("/status.json")).pop();
    const rec = { n, rendered, laidOut, firstRows: rows(),
      renderMs: Number(document.body.dataset.renderMs),
      parseMs: Number(document.body.dataset.fetchMs),
      fetchStart: res ? res.startTime : null, responseEnd: res ? res.responseEnd : null };
    rec.painted = await frame();
    rec.all = rec.painted;
    if (!sync) {
      await built();
      document.body.offsetHeight;
      rec.all = await frame();
    }
    rec.rows = rows();
    rec.count = count();
    loads.push(rec);
    const w = waiters;
    waiters = [];
    w.forEach(f => f(rec));
  };
  new MutationObserver(records => {
    for (const r of records) {
      if (r.attributeName === "data-loaded") seen();
      if (r.attributeName === "data-built") {
        const w = builtWaiters;
        builtWaiters = [];
        w.forEach(f => f());
      }
    }
  }).observe(document, { subtree: true, attributes: true,
                         attributeFilter: ["data-loaded", "data-built"] });
  if (performance.setResourceTimingBufferSize) performance.setResourceTimingBufferSize(100000);
  window.__bench = b;
})();"##;

pub fn run(bins: &Bins, plan: &Plan, results: &mut Results) -> anyhow::Result<()> {
    eprintln!("bench: stats page and fleet map, {SERVICES} services × {BACKENDS} backends");
    let chromium = which("chromium")
        .context("chromium is not installed (Debian's package; `cargo xtask bootstrap`)")?;
    let reps = (plan.rounds * 2).max(2);
    let w = World::start(
        &bins.probe.display().to_string(),
        "bench-page",
        &[
            "--max-services",
            "2048",
            "--max-backends",
            "16384",
            "--node",
            "bench-node",
        ],
    );
    let (kvs, draining, maintenance) = fleet();
    w.etcd.put_many(&kvs);
    w.agent
        .wait_status("1000 services", Duration::from_secs(120), |v| {
            v["services"]
                .as_array()
                .is_some_and(|s| s.len() == SERVICES)
        });
    let metrics = w
        .agent
        .snapshot()
        .and_then(|v| v["metrics_addr"].as_str().map(str::to_owned))
        .context("the agent's status file names no metrics address")?;
    // The agent's status.json shows maintenance from its own view once it
    // applied it: wait until the page would show every state.
    let t = Instant::now();
    loop {
        let v = w.agent.status();
        let n = |state: &str| {
            v["services"].as_array().map_or(0, |ss| {
                ss.iter()
                    .flat_map(|s| s["backends"].as_array().into_iter().flatten())
                    .filter(|b| b["state"] == state)
                    .count()
            })
        };
        if n("maintenance") == maintenance && n("draining") == draining {
            break;
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!(
                "status shows {} draining and {} in maintenance, not {draining} and {maintenance}",
                n("draining"),
                n("maintenance")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut b = Browser::start(&chromium, "1300,900")?;
    b.call(
        "Page.addScriptToEvaluateOnNewDocument",
        serde_json::json!({ "source": PROBE_JS }),
    )?;
    let all = SERVICES * BACKENDS;
    let page = format!("http://{metrics}/");

    // Page loads, each a new navigation in the same browser.
    let mut load = Samples::default();
    let mut first_rows = 0;
    for i in 0..reps {
        b.navigate(&page)?;
        let r = b.eval("__bench.first")?;
        check_rows(&r, all, &format!("page load {i}"))?;
        load.push(&r, "all", "total");
        load.push(&r, "painted", "first");
        load.diff(&r, "fetchStart", "responseEnd", "status");
        load.push(&r, "parseMs", "parse");
        load.push(&r, "renderMs", "render");
        load.diff(&r, "rendered", "laidOut", "layout");
        load.diff(&r, "laidOut", "painted", "paint");
        load.diff(&r, "painted", "all", "rest");
        first_rows = r["firstRows"].as_u64().unwrap_or(0);
    }
    let row = |figure: &str, spans: &str, xs: &[f64]| PageRow {
        figure: figure.to_owned(),
        spans: spans.to_owned(),
        ms: summarise(xs),
    };
    results.page.push(row(
        &format!("page load, {all} backend rows"),
        "navigation start → every row in the DOM, the frame after painted",
        load.get("total"),
    ));
    results.page.push(row(
        "",
        &format!(
            "navigation start → first frame painted, the first slice of rows in ({first_rows} \
             in the last run; a screen shows about 40)"
        ),
        load.get("first"),
    ));
    for (k, what) in [
        (
            "status",
            "of which: status.json, request → last byte (the agent reads its maps)",
        ),
        ("parse", "of which: response.json() (body and JSON parse)"),
        (
            "render",
            "of which: render(), the filters and the first slice's innerHTML",
        ),
        ("layout", "of which: style and layout (forced)"),
        ("paint", "of which: to the frame painted"),
        (
            "rest",
            "then: the other rows, in slices of 1,000 (a task each), to the frame after",
        ),
    ] {
        results.page.push(row("", what, load.get(k)));
    }

    // Filters, each from the input event to the frame painted; the text
    // box and the state select, and back to everything.
    let steps: [(&str, &str, &str, &str, usize); 6] = [
        ("q", "s999", "input", "search \"s999\"", BACKENDS),
        ("q", "", "input", "search cleared", all),
        ("state", "draining", "change", "state: draining", draining),
        ("state", "", "change", "state: every state", all),
        (
            "state",
            "maintenance",
            "change",
            "state: maintenance",
            maintenance,
        ),
        ("state", "", "change", "state: every state", all),
    ];
    let mut filt: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); steps.len()];
    for _ in 0..reps {
        for (i, (id, value, ev, what, want)) in steps.iter().enumerate() {
            let r = b.eval(&format!(
                "__bench.filter({}, {}, {})",
                Value::from(*id),
                Value::from(*value),
                Value::from(*ev)
            ))?;
            check_rows(&r, *want, what)?;
            filt[i].0.push(r["all"].as_f64().unwrap_or(f64::NAN));
            filt[i].1.push(r["first"].as_f64().unwrap_or(f64::NAN));
        }
    }
    let mut rows_before = all;
    for ((_, _, _, what, want), (all_ms, first_ms)) in steps.iter().zip(&filt) {
        results.page.push(row(
            &format!("{what}: {rows_before} → {want} rows"),
            "input/change event dispatched → every row in, the frame after painted",
            all_ms,
        ));
        if *want > 1000 {
            results.page.push(row(
                "",
                "event dispatched → first frame painted (the first slice of rows)",
                first_ms,
            ));
        }
        rows_before = *want;
    }

    // Scrolling through the whole list and back.
    let (mut down, mut up) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        for (y, xs) in [(-1, &mut down), (0, &mut up)] {
            let r = b.eval(&format!("__bench.scroll({y})"))?;
            check_rows(&r, all, "scroll")?;
            if y < 0 && r["y"].as_f64().unwrap_or(0.0) < 10_000.0 {
                bail!("scrolling to the end reached only y={}", r["y"]);
            }
            xs.push(r["ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    results.page.push(row(
        "scroll to the last service",
        "scrollTo → frame painted (the services now in view laid out)",
        &down,
    ));
    results.page.push(row(
        "scroll back to the top",
        "scrollTo → frame painted",
        &up,
    ));

    // The page polls status.json every second and renders again.
    let have = b.eval("__bench.loads.length")?.as_u64().unwrap_or(0);
    let r = b.eval(&format!(
        "(async () => {{ while (__bench.loads.length < {}) await __bench.next(); \
         return __bench.loads.slice({have}); }})()",
        have + reps as u64
    ))?;
    let polls: Vec<f64> = r
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["rows"].as_u64() == Some(all as u64))
        .filter_map(|l| Some(l["painted"].as_f64()? - l["fetchStart"].as_f64()?))
        .collect();
    results.page.push(row(
        &format!("every poll (1 s), {all} rows"),
        "status.json fetch start → frame painted with the rows updated",
        &polls,
    ));

    // The fleet map: from the agent (/map.svg and `discovery-agent map`),
    // then loaded and painted in the browser.
    let url_map = format!("http://{metrics}/map.svg");
    for (what, query) in [
        ("whole fleet", ""),
        ("?service=s999", "?service=s999"),
        ("?node=node-07", "?node=node-07"),
    ] {
        let mut agent_ms = Vec::new();
        let mut size = 0;
        for _ in 0..reps {
            let t = Instant::now();
            let body = get(&metrics, &format!("/map.svg{query}"))?;
            agent_ms.push(t.elapsed().as_secs_f64() * 1e3);
            size = body.len();
            if !body.contains("<svg") {
                bail!("/map.svg{query} is no SVG: {:.200}", body);
            }
        }
        let mut shown = Vec::new();
        for _ in 0..reps {
            b.navigate(&format!("{url_map}{query}"))?;
            let r = b.eval("__bench.frame()")?;
            shown.push(r.as_f64().unwrap_or(f64::NAN));
        }
        results.page.push(row(
            &format!("/map.svg {what} ({} KiB)", size / 1024),
            "agent: request → last byte (reads etcd, lays out, writes SVG)",
            &agent_ms,
        ));
        results.page.push(row(
            "",
            "Chromium: navigation start → first frame after the load event",
            &shown,
        ));
    }
    let mut cli = Vec::new();
    let dir = tempfile::tempdir().context("creating a directory for the map")?;
    let out = dir.path().join("fleet.svg");
    for _ in 0..reps {
        let t = Instant::now();
        let o = Command::new(&bins.agent)
            .args(["map", "--etcd", &w.etcd.url, "--out"])
            .arg(&out)
            .output()
            .context("running discovery-agent map")?;
        cli.push(t.elapsed().as_secs_f64() * 1e3);
        if !o.status.success() {
            bail!(
                "discovery-agent map failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    results.page.push(row(
        "`discovery-agent map --out FILE`, whole fleet",
        "process start → exit (connects to etcd, reads, lays out, writes)",
        &cli,
    ));
    for r in &results.page {
        eprintln!("bench: {r:?}");
    }
    drop(b);
    drop(w);
    Ok(())
}

/// The etcd keys: services s0…s999 with 10 backends each (b9 of every 10th
/// service at weight 0, draining; b8 of every 50th in maintenance), and
/// consumers summaries: 20 nodes, 5 workloads each, each service called
/// from two of them. Returns the keys, the draining and the maintenance
/// count.
fn fleet() -> (Vec<(String, String)>, usize, usize) {
    let mut kvs = Vec::new();
    let (mut draining, mut maintenance) = (0, 0);
    for i in 0..SERVICES {
        kvs.push((
            format!("/discovery/services/s{i}"),
            format!(
                r#"{{"frontend":"127.0.{}.{}:9000"}}"#,
                i / 250 + 1,
                i % 250 + 1
            ),
        ));
        for j in 0..BACKENDS {
            let addr = format!("10.{}.{}.{}:80", i / 250, i % 250, j + 1);
            let value = if j == 9 && i % 10 == 0 {
                draining += 1;
                format!(r#"{{"addr":"{addr}","weight":0}}"#)
            } else {
                addr
            };
            kvs.push((format!("/discovery/backends/s{i}/b{j}"), value));
        }
        if i % 50 == 0 {
            maintenance += 1;
            kvs.push((
                format!("/discovery/maintenance/s{i}/b8"),
                r#"{"reason":"bench"}"#.to_owned(),
            ));
        }
        for k in 0..2 {
            let node = (i + k * 7) % NODES;
            let workload = (i / NODES + k) % WORKLOADS;
            kvs.push((
                format!("/discovery/consumers/s{i}/node-{node:02}"),
                format!(
                    r#"{{"node":"node-{node:02}","updated_unix":1,"workloads":[{{"cgroup":"/app-{workload}.slice","calls":{}}}]}}"#,
                    (i * 37 + k * 11) % 5000 + 1
                ),
            ));
        }
    }
    (kvs, draining, maintenance)
}

/// The rows a measurement saw, checked.
fn check_rows(r: &Value, want: usize, what: &str) -> anyhow::Result<()> {
    let rows = r["rows"].as_u64().unwrap_or(0) as usize;
    if rows != want {
        bail!(
            "{what}: the page showed {rows} rows, not {want} ({})",
            r["count"]
        );
    }
    Ok(())
}

/// `path` from the agent's HTTP listener; the body.
fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut c = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .with_context(|| format!("sending GET {path}"))?;
    let mut resp = String::new();
    c.read_to_string(&mut resp)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("{path}: no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{path}: {} {body:.300}",
            head.lines().next().unwrap_or_default()
        );
    }
    Ok(body.to_owned())
}

/// Named samples in milliseconds.
#[derive(Default)]
struct Samples(std::collections::BTreeMap<&'static str, Vec<f64>>);

impl Samples {
    fn push(&mut self, r: &Value, field: &str, name: &'static str) {
        if let Some(x) = r[field].as_f64() {
            self.0.entry(name).or_default().push(x);
        }
    }

    fn diff(&mut self, r: &Value, from: &str, to: &str, name: &'static str) {
        if let (Some(a), Some(b)) = (r[from].as_f64(), r[to].as_f64()) {
            self.0.entry(name).or_default().push(b - a);
        }
    }

    fn get(&self, name: &str) -> &[f64] {
        self.0.get(name).map_or(&[], Vec::as_slice)
    }
}

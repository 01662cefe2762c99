//! The Grafana dashboard and the Prometheus alert rules in contrib/ against
//! the real agent: the rules pass `promtool check rules` and their own unit
//! tests (`promtool test rules`), and every `discovery_*` metric the
//! dashboard or the rules query is one a running agent exports, with the
//! labels their legends, variables and annotations name. A renamed metric
//! or label breaks this test, not a dashboard nobody looks at until an
//! outage.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use discovery_tests::{Agent, Backend, Load, Outcome, World, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const RULES: &str = "prometheus/discovery-alerts.yml";
const RULE_TESTS: &str = "prometheus/discovery-alerts.test.yml";
const DASHBOARD: &str = "grafana/discovery.json";
/// Labels Prometheus adds to every series from the target, not the agent.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn contrib(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(rel)
}

fn read(rel: &str) -> String {
    let p = contrib(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn promtool(args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(contrib(""))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (Debian's prometheus package; run `cargo xtask bootstrap`)")
        })
}

// ------------------------------------------------------------ exposition

/// One scrape: each family's type (`# TYPE`), and for each sample name the
/// label names its samples carry.
#[derive(Debug, Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut e = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("# TYPE name type");
                e.types.insert(name.to_owned(), ty.to_owned());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let labels = e.samples.entry(line[..end].to_owned()).or_default();
            if let Some(mut rest) = line[end..].strip_prefix('{') {
                // name="value" pairs; values may hold escaped quotes.
                while let Some((name, after)) = rest.split_once("=\"") {
                    labels.insert(name.trim_start_matches(',').to_owned());
                    let mut escaped = false;
                    let close = after
                        .char_indices()
                        .find(|&(_, c)| {
                            let end = c == '"' && !escaped;
                            escaped = c == '\\' && !escaped;
                            end
                        })
                        .map(|(i, _)| i)
                        .unwrap_or_else(|| panic!("unterminated label value: {line}"));
                    rest = &after[close + 1..];
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
        }
        e
    }

    /// The series names Prometheus stores from this scrape. OpenMetrics
    /// names a counter family `x` and its sample `x_total`; a histogram
    /// family `x` has the samples `x_bucket`, `x_sum` and `x_count`.
    fn series_names(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for (name, ty) in &self.types {
            let suffixes: &[&str] = match ty.as_str() {
                "counter" => &["_total"],
                "histogram" | "gaugehistogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
        out
    }
}

// ------------------------------------------------------------ queries

/// The `discovery_*` metric names a PromQL expression selects: identifiers
/// outside string literals (a label value such as `map="disc_slots"` is not
/// a metric).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'' | b'`') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += if b[i] == b'\\' && q != b'`' { 2 } else { 1 };
                }
                i += 1;
            }
            c if ident(c) && !c.is_ascii_digit() => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let tok = &expr[start..i];
                if tok.starts_with("discovery_") {
                    out.insert(tok.to_owned());
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// Names inside `{{...}}` of a legend (`{{service}} {{frontend}}`) or
/// after `$labels.` in an annotation.
fn template_labels(text: &str) -> BTreeSet<String> {
    let word = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for part in text.split("$labels.").skip(1) {
        out.insert(word(part));
    }
    if !text.contains("$labels") {
        for part in text.split("{{").skip(1) {
            out.insert(word(part));
        }
    }
    out.retain(|l| !l.is_empty() && !TARGET_LABELS.contains(&l.as_str()));
    out
}

/// One rule of the rules file as written: its name, its `expr` and its
/// whole text (labels and annotations).
#[derive(Debug)]
struct Rule {
    name: String,
    expr: String,
    text: String,
}

/// The rules of a rules file in the layout it keeps (promtool checks the
/// YAML itself; the caller checks the count against promtool's): each
/// starts at `- alert:` or `- record:`, its `expr:` on one line or as a
/// block scalar (`|`, `>`) indented below it.
fn rules(yaml: &str) -> Vec<Rule> {
    let mut out: Vec<Rule> = Vec::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut i = 0;
    while i < lines.len() {
        let t = lines[i].trim_start();
        if let Some(name) = t
            .strip_prefix("- alert:")
            .or_else(|| t.strip_prefix("- record:"))
        {
            out.push(Rule {
                name: name.trim().to_owned(),
                expr: String::new(),
                text: String::new(),
            });
        } else if let (Some(rule), Some(v)) = (out.last_mut(), t.strip_prefix("expr:")) {
            let v = v.trim();
            if v.starts_with(['|', '>']) {
                let own = indent(lines[i]);
                while i + 1 < lines.len()
                    && (lines[i + 1].trim().is_empty() || indent(lines[i + 1]) > own)
                {
                    i += 1;
                    rule.expr.push_str(lines[i].trim());
                    rule.expr.push('\n');
                }
            } else {
                rule.expr = v.trim_matches(['"', '\'']).to_owned();
            }
        }
        if let Some(rule) = out.last_mut() {
            rule.text.push_str(lines[i]);
            rule.text.push('\n');
        }
        i += 1;
    }
    out
}

/// Every query of the dashboard, with a legend where it has one: the
/// panels' targets and the template variables' queries.
fn dashboard_queries(d: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(|e| e.as_str()) {
                    let legend = m.get("legendFormat").and_then(|l| l.as_str());
                    out.push((e.to_owned(), legend.unwrap_or_default().to_owned()));
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    for v in d["templating"]["list"].as_array().expect("templating.list") {
        if v["type"] == "query" {
            let q = v["definition"]
                .as_str()
                .expect("a query variable's definition");
            out.push((q.to_owned(), String::new()));
        }
    }
    out
}

/// `label_values(selector, label)` → (selector, label).
fn label_values(q: &str) -> Option<(&str, &str)> {
    let inner = q.strip_prefix("label_values(")?.strip_suffix(')')?;
    let (sel, label) = inner.rsplit_once(',')?;
    Some((sel.trim(), label.trim()))
}

/// What `used` (names per place) lacks in `series`, as readable lines.
fn missing(used: &BTreeMap<String, BTreeSet<String>>, series: &BTreeSet<String>) -> Vec<String> {
    used.iter()
        .flat_map(|(place, names)| {
            names
                .iter()
                .filter(|n| !series.contains(*n))
                .map(move |n| format!("{n} (in {place})"))
        })
        .collect()
}

// ------------------------------------------------------------ tests

#[test]
fn the_name_check_follows_openmetrics_suffixes_and_skips_strings() {
    let scrape = Exposition::parse(
        "# TYPE discovery_service_connects counter\n\
         discovery_service_connects_total{service=\"web\",frontend=\"127.0.0.1:8080/tcp\"} 3\n\
         # TYPE discovery_reconcile_duration_seconds histogram\n\
         # UNIT discovery_reconcile_duration_seconds seconds\n\
         discovery_reconcile_duration_seconds_bucket{le=\"+Inf\"} 1\n\
         # TYPE discovery_service_not_applied gauge\n\
         # EOF\n",
    );
    let series = scrape.series_names();
    let names = metric_names(
        "sum by (service) (rate(discovery_service_connects_total{map=\"discovery_x\"}[5m])) \
         / histogram_quantile(0.99, rate(discovery_reconcile_duration_seconds_bucket[$__rate_interval])) \
         + discovery_service_connects + discovery_reconcile_duration_bucket + discovery_service_not_applied",
    );
    let used = BTreeMap::from([("q".to_owned(), names)]);
    assert_eq!(
        missing(&used, &series),
        [
            "discovery_reconcile_duration_bucket (in q)",
            "discovery_service_connects (in q)"
        ]
    );
    assert_eq!(
        scrape.samples["discovery_service_connects_total"],
        BTreeSet::from(["frontend".to_owned(), "service".to_owned()])
    );
    assert_eq!(
        template_labels("{{ $labels.service }} on {{ $labels.instance }}: {{ $value }}"),
        BTreeSet::from(["service".to_owned()])
    );
    assert_eq!(
        template_labels("{{instance}} {{map}} entries"),
        BTreeSet::from(["map".to_owned()])
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let out = promtool(&["check", "rules", RULES]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool check rules:\n{said}");
    // The line-based reader the metric check uses sees every rule.
    let found: usize = said
        .split("SUCCESS: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rule count in:\n{said}"));
    let ours = rules(&read(RULES));
    assert_eq!(ours.len(), found, "{ours:#?}\n{said}");
    assert!(ours.iter().all(|r| !r.expr.is_empty()), "{ours:#?}");
    assert!(
        ours.iter().all(|r| r.text.contains("for: ")
            && r.text.contains("summary: ")
            && r.text.contains("description: ")),
        "every alert waits (`for:`) and says what and where: {ours:#?}"
    );
    println!("{}", said.trim());

    let out = promtool(&["test", "rules", RULE_TESTS]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool test rules:\n{said}");
    println!("{}", said.trim());
}

/// Waits until `load` (a `udp-keep` probe) prints a reply from `name`.
fn answered_by(load: &mut Load, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while let Some(l) = load.next_line(deadline.saturating_duration_since(Instant::now())) {
        let o: Outcome = serde_json::from_str(&l).expect("probe output is JSON");
        if o.backend.as_deref() == Some(name) {
            return;
        }
        seen.push(o);
    }
    panic!("never answered by {name}: {seen:?}");
}

/// Waits until `status` (the kernel's view) routes `n` backends of
/// `service`.
fn routed(w: &World, service: &str, n: usize) {
    wait_until(Duration::from_secs(10), || {
        let s = Agent::service_status(&w.agent.status(), service)?;
        let routed = s["backends"].as_array()?;
        (routed.iter().filter(|b| b["routed"] == true).count() == n).then_some(())
    })
    .unwrap_or_else(|| panic!("{service} never routed {n} backends:\n{}", w.agent.log()));
}

#[test]
fn dashboard_and_rules_query_only_what_the_agent_exports() {
    // Room for two services, so a third is refused; a long back-off, so an
    // ejected backend stays out for the whole test.
    let w = World::start(
        PROBE,
        "contrib",
        &[
            "--max-services",
            "2",
            "--passive-failures",
            "3",
            "--passive-ejection",
            "60s",
        ],
    );
    // web: a live backend and one that refuses connects. Connects, some of
    // which fail until the kernel ejects the refusing one: the per-service
    // and per-backend series, a passive ejection, a backend out.
    let a = Backend::tcp("a", "127.0.0.2:0".parse().unwrap());
    let gone = Backend::tcp("gone", "127.0.0.3:0".parse().unwrap()).addr();
    let a_addr = a.addr().to_string();
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a_addr);
    w.backend("web", "gone", &gone.to_string());
    routed(&w, "web", 2);
    let out = w.probe("tcp", "127.0.0.1:8080", 100);
    assert!(
        out.iter().any(|o| o.backend.as_deref() == Some("a")),
        "{out:?}"
    );
    // stats: a connected UDP socket whose backend leaves is destroyed
    // (re-steered).
    let (u1, u2) = (
        Backend::udp("u1", "127.0.0.4:0".parse().unwrap()),
        Backend::udp("u2", "127.0.0.5:0".parse().unwrap()),
    );
    w.service("stats", "127.0.0.1:8125", "udp");
    w.backend("stats", "u1", &u1.addr().to_string());
    routed(&w, "stats", 1);
    let mut client = w.start_probe(&["udp-keep", "127.0.0.1:8125", "30000", "connected"]);
    answered_by(&mut client, "u1");
    w.backend("stats", "u2", &u2.addr().to_string());
    w.etcd.del("/discovery/backends/stats/u1");
    answered_by(&mut client, "u2");
    let _ = client.stop();
    // spill: the full services map refuses it. reserved: on the agent's
    // own metrics address, which it never routes.
    w.service("spill", "127.0.0.1:8081", "tcp");
    w.backend("spill", "a", &a_addr);
    let metrics_addr = w.agent.snapshot().expect("status file")["metrics_addr"]
        .as_str()
        .expect("metrics_addr")
        .to_owned();
    w.service("reserved", &metrics_addr, "tcp");
    let want = [
        r#"discovery_service_connects_total{service="web""#,
        r#"discovery_passive_ejections_total{by="kernel"}"#,
        r#"discovery_sockets_destroyed_total{protocol="udp"}"#,
        r#"discovery_service_not_applied{service="spill""#,
        r#"discovery_frontend_refused{service="reserved""#,
    ];
    let text = wait_until(Duration::from_secs(10), || {
        let (_, text) = w.agent.scrape("/metrics");
        want.iter().all(|s| text.contains(s)).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "not all of {want:?} in:\n{}\n{}",
            w.agent.scrape("/metrics").1,
            w.agent.log()
        )
    });
    let scrape = Exposition::parse(&text);
    let series = scrape.series_names();
    // The suffix rules above are the agent's: every sample it printed is
    // one of the names derived from its `# TYPE` lines.
    let strays: Vec<&String> = scrape
        .samples
        .keys()
        .filter(|s| !series.contains(*s))
        .collect();
    assert!(strays.is_empty(), "{strays:?} not derived from:\n{text}");

    let dash: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("the dashboard is JSON");
    assert!(dash["schemaVersion"].as_i64() >= Some(36), "schemaVersion");
    let vars = dash["templating"]["list"].as_array().expect("variables");
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["name"] == "DS_PROMETHEUS"),
        "a DS_PROMETHEUS data source variable"
    );
    for name in ["instance", "service"] {
        assert!(vars.iter().any(|v| v["name"] == name), "variable {name}");
    }
    let mut ids = BTreeSet::new();
    for p in dash["panels"].as_array().expect("panels") {
        assert!(ids.insert(p["id"].as_i64()), "duplicate panel id: {p}");
        if p["type"] != "row" {
            assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            assert!(
                p["targets"].as_array().is_some_and(|t| !t.is_empty()),
                "{}",
                p["title"]
            );
        }
    }
    let queries = dashboard_queries(&dash);
    let rules = rules(&read(RULES));

    // 1. Names: every discovery_* series queried exists.
    let mut used: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (q, _) in &queries {
        used.entry(format!("{DASHBOARD}: {q}"))
            .or_default()
            .extend(metric_names(q));
    }
    for r in &rules {
        used.entry(format!("{RULES}: {}", r.name))
            .or_default()
            .extend(metric_names(&r.expr));
    }
    let all: BTreeSet<&String> = used.values().flatten().collect();
    assert!(all.len() >= 20, "{all:?}");
    let gone = missing(&used, &series);
    assert!(
        gone.is_empty(),
        "queried but not exported by the agent:\n  {}\nexported: {series:#?}",
        gone.join("\n  ")
    );

    // 2. Labels: those a legend, a variable or an annotation shows are on
    // the samples of a metric its query selects (every family has samples
    // in this scrape).
    let mut unchecked = BTreeSet::new();
    let mut check = |place: &str, expr: &str, labels: BTreeSet<String>| {
        let names = metric_names(expr);
        let seen: Vec<&BTreeSet<String>> =
            names.iter().filter_map(|n| scrape.samples.get(n)).collect();
        if seen.is_empty() {
            unchecked.extend(names);
            return;
        }
        for l in labels {
            assert!(
                seen.iter().any(|s| s.contains(&l)),
                "{place}: label {l} is on no sample of {names:?}:\n{text}"
            );
        }
    };
    for (q, legend) in &queries {
        match label_values(q) {
            Some((sel, label)) => {
                let labels = BTreeSet::from([label.to_owned()])
                    .into_iter()
                    .filter(|l| !TARGET_LABELS.contains(&l.as_str()))
                    .collect();
                check(q.as_str(), sel, labels)
            }
            None => check(q.as_str(), q.as_str(), template_labels(legend)),
        }
    }
    for r in &rules {
        check(r.name.as_str(), r.expr.as_str(), template_labels(&r.text));
    }
    let exported: BTreeSet<&String> = scrape.types.keys().collect();
    let unused: Vec<&&String> = exported
        .iter()
        .filter(|f| !all.iter().any(|u| u.starts_with(f.as_str())))
        .collect();
    assert!(unchecked.is_empty(), "no sample of {unchecked:?}:\n{text}");
    println!("queried: {all:?}");
    println!("exported but not queried: {unused:?}");
}

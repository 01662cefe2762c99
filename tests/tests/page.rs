//! The stats page, in a real browser: headless Chromium (Debian's) loads
//! the agent's page against real traffic, and the test reads what a person
//! would see: the service, its backends' states and counters.
use std::{net::SocketAddr, process::Command, time::Duration};

use discovery_tests::{Backend, World, cdp::Browser, clients::require, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Headless Chromium on a fresh profile, with nothing but the page to
/// load, given `args` and `url`.
fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let chromium = require("chromium", "the browser tests use Debian's chromium");
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium)
        .args(discovery_tests::cdp::CHROMIUM_FLAGS)
        // The page's scripts run, and fetch status.json, before the DOM is
        // dumped or the picture taken.
        .arg("--virtual-time-budget=5000")
        .args(args)
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run chromium")
}

/// The page's DOM after its scripts ran (and fetched status.json).
fn dom(url: &str) -> String {
    let out = chromium(&["--dump-dom"], url);
    assert!(out.status.success(), "chromium: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The state class of the row of backend `instance`, as rendered (its
/// first class; `notrouted` may follow).
fn row_class(dom: &str, instance: &str) -> Option<String> {
    let at = dom.find(&format!("data-instance=\"{instance}\""))?;
    let row = &dom[dom[..at].rfind("<tr")?..at];
    let class = row.split("class=\"").nth(1)?.split('"').next()?;
    class.split_whitespace().next().map(str::to_owned)
}

/// The connects shown for backend `instance`.
fn connects(dom: &str, instance: &str) -> Option<u64> {
    let at = dom.find(&format!("data-instance=\"{instance}\""))?;
    let rest = &dom[at..];
    let cell = rest.split("class=\"n connects\">").nth(1)?;
    cell.split('<').next()?.trim().parse().ok()
}

/// An open page's row of backend `instance`: its class and connects.
fn live_row(page: &mut Browser, instance: &str) -> Option<(String, u64)> {
    let v = page
        .eval(&format!(
            "(() => {{ const tr = document.querySelector('tr[data-instance=\"{instance}\"]'); \
             return tr && [tr.className, tr.querySelector('.connects').textContent]; }})()"
        ))
        .ok()?;
    Some((v[0].as_str()?.to_owned(), v[1].as_str()?.parse().ok()?))
}

#[test]
fn the_stats_page_shows_backends_turning_ejected_and_counters_rising() {
    let w = World::start(
        PROBE,
        "page",
        &["--passive-failures", "3", "--passive-ejection", "60s"],
    );
    let gone = {
        let b = Backend::tcp("gone", addr("127.0.0.2:0"));
        b.addr()
    };
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "gone", &gone.to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.agent.wait_status("web", Duration::from_secs(5), |v| {
        discovery_tests::Agent::backend_health(v, "web", "gone").is_some()
    });
    let metrics = w.agent.snapshot().unwrap()["metrics_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let url = format!("http://{metrics}/");
    let first = dom(&url);
    assert!(first.contains("data-service=\"web\""), "{first}");
    assert_eq!(row_class(&first, "b").as_deref(), Some("up"), "{first}");
    assert_eq!(row_class(&first, "gone").as_deref(), Some("up"));
    let before = connects(&first, "b").expect("b's connects on the page");
    // A page left open, in real time: its poll must keep it current.
    let mut live = Browser::start(
        &require("chromium", "the browser tests use Debian's chromium"),
        "1300,900",
    )
    .expect("chromium over the DevTools protocol");
    live.navigate(&url).expect("load the page");
    let shown = wait_until(Duration::from_secs(10), || live_row(&mut live, "gone"));
    assert_eq!(shown.map(|r| r.0).as_deref(), Some("up"));
    // Marks gone's row: a poll that only changes cells keeps the element.
    live.eval("document.querySelector('tr[data-instance=\"gone\"]').dataset.mark = '1'")
        .unwrap();
    // Traffic: the refusing backend is ejected in the kernel, b counts up.
    let _ = w.probe("tcp", "127.0.0.1:8080", 50);
    w.agent
        .wait_status("gone ejected", Duration::from_secs(5), |v| {
            discovery_tests::Agent::backend_health(v, "web", "gone").as_deref() == Some("ejected")
        });
    let later = wait_until(Duration::from_secs(10), || {
        let d = dom(&url);
        (row_class(&d, "gone").as_deref() == Some("ejected")).then_some(d)
    })
    .expect("the page never showed gone as ejected");
    assert!(connects(&later, "b").unwrap() > before, "{later}");
    assert!(later.contains("ejected by kernel"), "{later}");
    // The open page caught up by itself, updating the rows in place.
    let ejected = wait_until(Duration::from_secs(10), || {
        live_row(&mut live, "gone").filter(|(class, _)| class.starts_with("ejected"))
    });
    assert!(ejected.is_some(), "the open page never showed gone ejected");
    assert!(live_row(&mut live, "b").unwrap().1 > before);
    let health = live
        .eval(
            "(() => { const tr = document.querySelector('tr[data-instance=\"gone\"]'); \
             return [tr.dataset.mark || '', tr.querySelector('.health').textContent]; })()",
        )
        .unwrap();
    assert_eq!(health, serde_json::json!(["1", "ejected by kernel"]));
    drop(live);
    // The page loads nothing from elsewhere.
    let (_, page) = w.agent.scrape("/");
    assert!(!page.contains("http://") && !page.contains("https://"));
    // Its fleet map link draws from etcd.
    assert!(page.contains("href=\"map.svg\""));
    let (status, svg) = w.agent.scrape("/map.svg?service=web");
    assert!(
        status.contains("200") && svg.contains("<svg") && svg.contains("web 127.0.0.1:8080"),
        "{status} {svg}"
    );
}

/// Backend rows rendered (in the services list, not the page's script).
fn rows(dom: &str) -> usize {
    let list = dom.split("id=\"services\"").nth(1).unwrap_or("");
    list.split("<script")
        .next()
        .unwrap_or("")
        .matches("data-instance=")
        .count()
}

/// Chromium's screenshot of `url` into `png`.
fn screenshot(url: &str, png: &std::path::Path, size: &str) {
    let out = chromium(
        &[
            "--hide-scrollbars",
            &format!("--window-size={size}"),
            &format!("--screenshot={}", png.display()),
        ],
        url,
    );
    assert!(out.status.success() && png.exists(), "chromium: {out:?}");
}

#[test]
fn a_thousand_services_and_ten_thousand_backends_render_and_filter() {
    let w = World::start(
        PROBE,
        "page-big",
        &["--max-services", "2048", "--max-backends", "16384"],
    );
    let mut kvs = Vec::new();
    for i in 0..1000 {
        kvs.push((
            format!("/discovery/services/s{i}"),
            format!(
                r#"{{"frontend":"127.0.{}.{}:9000"}}"#,
                i / 250 + 1,
                i % 250 + 1
            ),
        ));
        for j in 0..10 {
            kvs.push((
                format!("/discovery/backends/s{i}/b{j}"),
                format!("10.{}.{}.{}:80", i / 250, i % 250, j + 1),
            ));
        }
    }
    w.etcd.put_many(&kvs);
    w.agent
        .wait_status("1000 services", Duration::from_secs(60), |v| {
            v["services"].as_array().is_some_and(|s| s.len() == 1000)
        });
    let metrics = w.agent.snapshot().unwrap()["metrics_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let all = dom(&format!("http://{metrics}/"));
    let count = all
        .split("id=\"count\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or("");
    assert_eq!(count, "1000 of 1000 services");
    assert_eq!(rows(&all), 10_000);
    // Filtered by name: one service and its ten backends.
    let one = dom(&format!("http://{metrics}/?q=s999"));
    assert!(one.contains("1 of 1000 services"), "filter");
    assert_eq!(rows(&one), 10);
}

/// `DISCOVERY_SCREENSHOTS=DIR cargo xtask screenshots` runs this: the page
/// and the fleet map of a small scene, as PNGs for README.
#[test]
#[ignore = "makes README's screenshots: cargo xtask screenshots"]
fn screenshots() {
    let dir = std::path::PathBuf::from(
        std::env::var_os("DISCOVERY_SCREENSHOTS").expect("DISCOVERY_SCREENSHOTS=DIR"),
    );
    let w = World::start(
        PROBE,
        "shots",
        &[
            "--passive-failures",
            "3",
            "--passive-ejection",
            "60s",
            "--consumers-interval",
            "1s",
            "--node",
            "node-a",
        ],
    );
    let a = Backend::tcp("a", addr("127.0.0.2:0"));
    let b = Backend::tcp("b", addr("127.0.0.3:0"));
    let gone = {
        let g = Backend::tcp("gone", addr("127.0.0.4:0"));
        g.addr()
    };
    w.service("web", "127.0.0.1:8080", "tcp");
    w.backend("web", "a", &a.addr().to_string());
    w.backend("web", "b", &b.addr().to_string());
    w.backend("web", "c", &gone.to_string());
    w.service("memcached", "127.0.0.1:11211", "tcp");
    w.backend("memcached", "m1", &a.addr().to_string());
    w.etcd.put(
        "/discovery/backends/memcached/m2",
        &format!(r#"{{"addr":"{}","weight":0}}"#, b.addr()),
    );
    w.service("search", "127.0.0.1:9200", "tcp");
    w.converge("tcp", "127.0.0.1:11211", 10, |t| t.contains_key("a"));
    let _ = w.probe("tcp", "127.0.0.1:8080", 60);
    w.agent
        .wait_status("c ejected", Duration::from_secs(5), |v| {
            discovery_tests::Agent::backend_health(v, "web", "c").as_deref() == Some("ejected")
        });
    w.etcd.put(
        "/discovery/consumers/billing/node-b",
        r#"{"node":"node-b","updated_unix":1,"workloads":[{"cgroup":"/legacy-cron.service","calls":12}]}"#,
    );
    wait_until(Duration::from_secs(10), || {
        w.etcd.get("/discovery/consumers/web/node-a")
    })
    .expect("consumers published");
    let metrics = w.agent.snapshot().unwrap()["metrics_addr"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::create_dir_all(&dir).unwrap();
    screenshot(
        &format!("http://{metrics}/"),
        &dir.join("stats-page.png"),
        "1300,900",
    );
    screenshot(
        &format!("http://{metrics}/map.svg"),
        &dir.join("fleet-map.png"),
        "1300,700",
    );
}

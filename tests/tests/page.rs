//! The stats page, in a real browser: headless Chromium (Debian's) loads
//! the agent's page against real traffic, and the test reads what a person
//! would see: the service, its backends' states and counters.
use std::{net::SocketAddr, process::Command, time::Duration};

use discovery_tests::{Backend, World, clients::require, wait_until};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The page's DOM after its scripts ran (and fetched status.json).
fn dom(url: &str) -> String {
    let chromium = require("chromium", "the browser tests use Debian's chromium");
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("run chromium");
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
    // The page loads nothing from elsewhere.
    let (_, page) = w.agent.scrape("/");
    assert!(!page.contains("http://") && !page.contains("https://"));
}

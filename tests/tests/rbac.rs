//! The README's etcd RBAC recipe, run exactly as written against a private
//! etcd: each user can do what its program needs and nothing more, and the
//! agent and an announcer work end to end with only those privileges.
//!
//! The script is taken from README.md between `<!-- rbac-recipe:begin -->`
//! and `<!-- rbac-recipe:end -->`, so the README and this test cannot
//! drift. `DISCOVERY_README` points the test at another copy.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use discovery_tests::{
    Agent, Backend, Etcd, Proc, SMALL_MAPS, TestCgroup, agent_bin, announce_args, tally, wait_until,
};

const PROBE: &str = env!("CARGO_BIN_EXE_discovery-probe");
const FE: &str = "127.0.0.1:8080";
const BEGIN: &str = "<!-- rbac-recipe:begin -->";
const END: &str = "<!-- rbac-recipe:end -->";
const NODE: &str = "node-rbac";

/// Users and the passwords the test gives the recipe.
const ROOT_PW: &str = "root-pw";
const OPERATOR: (&str, &str) = ("operator", "operator-pw");
const AGENT: (&str, &str) = ("agent", "agent-pw");
const ANNOUNCE_WEB: (&str, &str) = ("announce-web", "web-pw");
const ANNOUNCE_DB: (&str, &str) = ("announce-db", "db-pw");

fn readme_path() -> PathBuf {
    std::env::var_os("DISCOVERY_README")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
}

/// The script between the markers, without its ```sh fence.
fn recipe(readme: &Path) -> String {
    let text = std::fs::read_to_string(readme)
        .unwrap_or_else(|e| panic!("reading {}: {e}", readme.display()));
    let lines: Vec<&str> = text.lines().collect();
    let find = |marker: &str| -> usize {
        let at: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].trim() == marker)
            .collect();
        assert!(
            at.len() == 1,
            "{}: expected exactly one line `{marker}` around the etcd RBAC recipe, found {}. \
             This test runs the recipe from the README; keep the markers around its ```sh block.",
            readme.display(),
            at.len()
        );
        at[0]
    };
    let (begin, end) = (find(BEGIN), find(END));
    assert!(
        begin < end,
        "{}: `{END}` comes before `{BEGIN}`",
        readme.display()
    );
    let block = &lines[begin + 1..end];
    assert!(
        block.len() >= 2 && block[0].trim() == "```sh" && block[block.len() - 1].trim() == "```",
        "{}: the lines between `{BEGIN}` and `{END}` must be exactly one ```sh fenced block, got:\n{}",
        readme.display(),
        block.join("\n")
    );
    let mut script = block[1..block.len() - 1].join("\n");
    script.push('\n');
    script
}

/// A command with none of the runner's `ETCDCTL_*` settings (a stray
/// `ETCDCTL_USER` would change who the test acts as).
fn clean(program: &str) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ETCDCTL_") {
            c.env_remove(k);
        }
    }
    c
}

/// Runs the recipe with `sh`, as an operator would.
fn run_recipe(script: &Path, url: &str, services: &str, announce_pw: &str) -> Output {
    clean("sh")
        .arg(script)
        .env_remove("PREFIX")
        .env("ETCDCTL_ENDPOINTS", url)
        .env("SERVICES", services)
        .env("ROOT_PW", ROOT_PW)
        .env("OPERATOR_PW", OPERATOR.1)
        .env("AGENT_PW", AGENT.1)
        .env("ANNOUNCE_PW", announce_pw)
        .output()
        .expect("run sh")
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// etcdctl as `user` (None: no credentials).
fn ctl(url: &str, user: Option<(&str, &str)>, args: &[&str]) -> Output {
    let mut c = clean("etcdctl");
    c.env("ETCDCTL_API", "3")
        .args(["--endpoints", url, "--command-timeout", "5s"]);
    if let Some((u, p)) = user {
        c.arg(format!("--user={u}:{p}"));
    }
    c.args(args).output().expect("run etcdctl")
}

#[track_caller]
fn allowed(url: &str, user: (&str, &str), args: &[&str]) -> Output {
    let out = ctl(url, Some(user), args);
    assert!(
        out.status.success(),
        "{} should be allowed to `etcdctl {}`: {}",
        user.0,
        args.join(" "),
        show(&out)
    );
    out
}

#[track_caller]
fn denied(url: &str, user: (&str, &str), args: &[&str]) {
    let out = ctl(url, Some(user), args);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{} should be denied `etcdctl {}` (permission denied): {}",
        user.0,
        args.join(" "),
        show(&out)
    );
}

fn write_password(dir: &Path, user: (&str, &str)) -> String {
    let p = dir.join(format!("{}.pw", user.0));
    std::fs::write(&p, format!("{}\n", user.1)).expect("password file");
    p.display().to_string()
}

#[test]
fn the_readme_rbac_recipe_gives_each_program_just_what_it_needs() {
    let script = recipe(&readme_path());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("discovery-etcd-rbac.sh");
    std::fs::write(&file, &script).unwrap();

    let etcd = Etcd::start();
    let url = etcd.url.as_str();
    let out = run_recipe(&file, url, "web", ANNOUNCE_WEB.1);
    assert!(out.status.success(), "the recipe failed: {}", show(&out));

    // Authentication is on: without a user, no key can be read.
    let anon = ctl(url, None, &["get", "--prefix", "/discovery/"]);
    assert!(!anon.status.success(), "anonymous read: {}", show(&anon));

    // Operators define services and maintenance, nothing else.
    let web = format!(r#"{{"frontend":"{FE}"}}"#);
    allowed(url, OPERATOR, &["put", "/discovery/services/web", &web]);
    allowed(
        url,
        OPERATOR,
        &["put", "/discovery/maintenance/web/z", "{}"],
    );
    allowed(url, OPERATOR, &["del", "/discovery/maintenance/web/z"]);
    denied(
        url,
        OPERATOR,
        &["put", "/discovery/backends/web/x", "127.0.0.9:1"],
    );
    denied(url, OPERATOR, &["put", "/discovery/consumers/web/n", "{}"]);
    denied(url, OPERATOR, &["put", "/elsewhere", "x"]);

    // An announcer writes its own service's backends only.
    allowed(
        url,
        ANNOUNCE_WEB,
        &["put", "/discovery/backends/web/x", "127.0.0.9:1"],
    );
    allowed(url, ANNOUNCE_WEB, &["del", "/discovery/backends/web/x"]);
    denied(
        url,
        ANNOUNCE_WEB,
        &["put", "/discovery/services/evil", &web],
    );
    denied(url, ANNOUNCE_WEB, &["put", "/discovery/services/web", &web]);
    denied(
        url,
        ANNOUNCE_WEB,
        &["put", "/discovery/backends/other/x", "127.0.0.9:1"],
    );
    // The trailing '/' of the grant: web does not cover web2.
    denied(
        url,
        ANNOUNCE_WEB,
        &["put", "/discovery/backends/web2/x", "127.0.0.9:1"],
    );
    denied(
        url,
        ANNOUNCE_WEB,
        &["put", "/discovery/maintenance/web/x", "{}"],
    );
    denied(url, ANNOUNCE_WEB, &["del", "/discovery/maintenance/web/x"]);
    denied(url, ANNOUNCE_WEB, &["get", "--prefix", "/discovery/"]);

    // Agents read everything under the prefix, write consumers only.
    let all = allowed(url, AGENT, &["get", "--prefix", "/discovery/"]);
    assert!(
        String::from_utf8_lossy(&all.stdout).contains("/discovery/services/web"),
        "{}",
        show(&all)
    );
    denied(url, AGENT, &["put", "/discovery/services/web", &web]);
    denied(url, AGENT, &["put", "/discovery/services/evil", &web]);
    denied(
        url,
        AGENT,
        &["put", "/discovery/backends/web/x", "127.0.0.9:1"],
    );
    denied(url, AGENT, &["put", "/discovery/maintenance/web/x", "{}"]);
    denied(url, AGENT, &["get", "/elsewhere"]);

    // Run again for another service, with its own password, as the README
    // says: auth is on now, and announce-web, listed again, keeps its
    // password.
    let again = run_recipe(&file, url, "web db", ANNOUNCE_DB.1);
    assert!(again.status.success(), "re-run failed: {}", show(&again));
    allowed(
        url,
        ANNOUNCE_DB,
        &["put", "/discovery/backends/db/x", "127.0.0.9:1"],
    );
    allowed(url, ANNOUNCE_DB, &["del", "/discovery/backends/db/x"]);
    denied(
        url,
        ANNOUNCE_DB,
        &["put", "/discovery/backends/web/x", "127.0.0.9:1"],
    );
    allowed(
        url,
        ANNOUNCE_WEB,
        &["get", "--prefix", "/discovery/backends/web/"],
    );
    allowed(url, AGENT, &["get", "--prefix", "/discovery/"]);

    // End to end with the least privileges: the real agent as `agent`, the
    // real announcer as `announce-web`, a client redirected to the backend.
    let agent_pw = write_password(dir.path(), AGENT);
    let announce_pw = write_password(dir.path(), ANNOUNCE_WEB);
    let operator_pw = write_password(dir.path(), OPERATOR);
    let cg = TestCgroup::new("rbac");
    let mut flags: Vec<&str> = SMALL_MAPS.to_vec();
    flags.extend([
        "--etcd-user",
        AGENT.0,
        "--etcd-password-file",
        agent_pw.as_str(),
        "--consumers-interval",
        "1s",
        "--node",
        NODE,
    ]);
    let agent = Agent::start(url, &cg, &flags);
    let b = Backend::tcp("a", "127.0.0.2:0".parse::<SocketAddr>().unwrap());
    let mut args = announce_args(url, "web", "a", b.addr());
    args.extend(
        [
            "--etcd-user",
            ANNOUNCE_WEB.0,
            "--etcd-password-file",
            announce_pw.as_str(),
        ]
        .map(String::from),
    );
    let ann = Proc::spawn(args);
    let redirected = wait_until(Duration::from_secs(10), || {
        let t = tally(&cg.probe(PROBE, "tcp", FE, 5));
        (t.len() == 1 && t.contains_key("a")).then_some(())
    });
    assert!(
        redirected.is_some(),
        "clients never reached the announced backend\nagent log:\n{}\nannouncer log:\n{}",
        agent.log(),
        ann.log()
    );

    // The agent published who uses web, and an operator can read it.
    let cgroup = format!("/{}", cg.path.file_name().unwrap().to_string_lossy());
    let mut last = String::new();
    let published = wait_until(Duration::from_secs(10), || {
        let out = Command::new(agent_bin())
            .args(["status", "--consumers", "web", "--json", "--etcd", url])
            .args([
                "--etcd-user",
                OPERATOR.0,
                "--etcd-password-file",
                operator_pw.as_str(),
            ])
            .env("NO_COLOR", "1")
            .output()
            .expect("run discovery-agent status");
        last = show(&out);
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        shown.as_array()?.iter().find_map(|s| {
            (s["node"] == NODE
                && s["workloads"]
                    .as_array()?
                    .iter()
                    .any(|w| w["cgroup"] == cgroup.as_str()))
            .then_some(())
        })
    });
    assert!(
        published.is_some(),
        "consumers of web never named {cgroup} on {NODE}; last `status --consumers`: {last}\nagent log:\n{}",
        agent.log()
    );

    for (who, log) in [("agent", agent.log()), ("announcer", ann.log())] {
        assert!(
            !log.contains("permission denied"),
            "the {who} was refused something:\n{log}"
        );
    }
}

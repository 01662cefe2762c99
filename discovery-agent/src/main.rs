//! discovery-agent: watches etcd and keeps the redirect maps in sync.
mod addr;
mod admin;
mod adopt;
mod agent;
mod announce;
mod assets;
mod checks;
mod config;
mod consumers;
mod controller;
mod desired;
mod doctor;
mod etcd;
mod exempt;
mod fleet;
mod guard;
mod health;
mod hints;
mod ids;
mod lease;
mod listeners;
mod loader;
mod map;
mod maps;
mod metrics;
mod migrate;
mod model;
mod reconcile;
mod resteer;
mod schema;
mod sockets;
mod status;
mod tables;
mod util;
mod web;

use std::io::IsTerminal as _;

use config::Command;
use tracing_subscriber::EnvFilter;

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

async fn status_command(args: config::StatusArgs) -> anyhow::Result<()> {
    if let Some(service) = &args.consumers {
        let etcd = args.etcd.config()?;
        return consumers::show(&etcd, &args.etcd.prefix, service, args.json).await;
    }
    loop {
        let r = status::collect(&args.pin.pin_dir, &args.status.status_file)?;
        let text = if args.json {
            serde_json::to_string_pretty(&r)? + "\n"
        } else {
            status::render(&r)
        };
        let Some(every) = args.watch else {
            print!("{text}");
            return Ok(());
        };
        // Home and clear, then the fresh table: a `top`-like redraw.
        print!("\x1b[H\x1b[2J{text}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn main() -> std::process::ExitCode {
    let args = std::env::args_os().collect();
    let cli = match config::parse_args(args, std::env::var_os(config::CONFIG_ENV)) {
        Ok(cli) => cli,
        Err(config::ArgsError::Clap(e)) => e.exit(),
        Err(config::ArgsError::File(e)) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(2);
        }
    };
    let filter = match &cli.log {
        Some(f) => EnvFilter::try_new(f),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: invalid --log filter: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match cli.log_format {
        config::LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        config::LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    let result = match cli.command {
        Command::Run(args) => block_on(agent::run(args)),
        Command::Announce(args) => block_on(announce::run(args)),
        Command::Doctor(args) => block_on(doctor::run(args)),
        Command::Map(args) => block_on(map::run(args)),
        Command::Service(cmd) => block_on(admin::service(cmd)),
        Command::Backend(cmd) => block_on(admin::backend(cmd)),
        Command::Detach(args) => loader::detach(&args.pin_dir),
        Command::Status(args) => block_on(status_command(args)),
        Command::Counters(args) => maps::BpfMaps::open(&args.pin_dir)
            .and_then(|m| m.counters())
            .map(|cs| {
                for (name, v) in cs {
                    println!("{name} {v}");
                }
            }),
        Command::GenerateAssets(args) => assets::write(&args.dir).map(|files| {
            for f in files {
                println!("{}", f.display());
            }
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Layers only point down: no module imports one that imports it back, nor
/// one of a higher layer (`RANKS`).
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};

    /// Layers, bottom up: a module may import only modules of its own rank
    /// or below (the cycle test keeps a rank free of cycles). Every module
    /// is listed, so a new one has to be placed.
    const RANKS: &[(&str, u32)] = &[
        // Foundations.
        ("addr", 0),
        ("util", 0),
        // Adapters to etcd, the kernel and the node; probes.
        ("etcd", 1),
        ("exempt", 1),
        ("guard", 1),
        ("health", 1),
        ("lease", 1),
        ("listeners", 1),
        ("sockets", 1),
        ("loader", 1),
        ("migrate", 1),
        ("maps", 1),
        // The etcd contract.
        ("schema", 2),
        ("hints", 2),
        // The desired routing state and its builder.
        ("desired", 3),
        // The store; pure table builders and id allocators.
        ("model", 4),
        ("tables", 4),
        ("ids", 4),
        // What the controller drives: map writes, checks, reports.
        ("adopt", 5),
        ("reconcile", 5),
        ("resteer", 5),
        ("checks", 5),
        ("consumers", 5),
        ("fleet", 5),
        ("metrics", 5),
        ("status", 5),
        ("controller", 6),
        // The HTTP listener: metrics, the stats page and its JSON.
        ("web", 6),
        // The command line.
        ("config", 7),
        // Entry points.
        ("admin", 8),
        ("agent", 8),
        ("doctor", 8),
        ("map", 8),
        ("announce", 8),
        ("assets", 8),
        ("main", 9),
    ];

    /// The code of a file before its first `#[cfg(test)]` module.
    fn non_test(text: &str) -> &str {
        const ATTR: &str = "\n#[cfg(test)]\n";
        text.match_indices(ATTR)
            .find(|&(i, _)| {
                let line = text[i + ATTR.len()..].lines().next().unwrap_or("");
                line.starts_with("mod ") || (line.starts_with("pub") && line.contains(" mod "))
            })
            .map_or(text, |(i, _)| &text[..i])
    }

    /// Top-level modules each module names through `crate::` (tests
    /// excluded). A file in `src/<dir>/` belongs to module `<dir>`.
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![];
        let mut dirs = vec![src.clone()];
        while let Some(dir) = dirs.pop() {
            for e in std::fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    dirs.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    files.push(p);
                }
            }
        }
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for p in files {
            let rel = p.strip_prefix(&src).unwrap();
            let mut parts = rel.components();
            let first = parts.next().unwrap().as_os_str();
            let module = if parts.next().is_some() {
                first.to_string_lossy().into_owned()
            } else {
                rel.file_stem().unwrap().to_string_lossy().into_owned()
            };
            let text = std::fs::read_to_string(&p).unwrap();
            let code = non_test(&text);
            let deps = out.entry(module.clone()).or_default();
            // `crate::a::...` paths, and the heads of `use crate::{a, b::c}`.
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + 7..];
                let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    let mut depth = 0;
                    let end = group
                        .char_indices()
                        .find(|&(_, c)| {
                            match c {
                                '{' => depth += 1,
                                '}' if depth == 0 => return true,
                                '}' => depth -= 1,
                                _ => {}
                            }
                            false
                        })
                        .map_or(group.len(), |(j, _)| j);
                    let mut heads = vec![];
                    let (mut depth, mut start) = (0, 0);
                    for (j, c) in group[..end].char_indices() {
                        match c {
                            '{' => depth += 1,
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                heads.push(&group[start..j]);
                                start = j + 1;
                            }
                            _ => {}
                        }
                    }
                    heads.push(&group[start..end]);
                    heads
                } else {
                    vec![rest]
                };
                for n in names {
                    let head: String = n
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !head.is_empty() && head != module && head != "self" {
                        deps.insert(head);
                    }
                }
            }
        }
        out
    }

    #[test]
    fn modules_import_no_cycle() {
        let g = imports();
        assert!(
            g["controller"].contains("model"),
            "the parser sees imports: {g:?}"
        );
        assert!(
            g["announce"].contains("config") && g["config"].contains("guard"),
            "directory modules are read: {g:?}"
        );
        for (a, deps) in &g {
            for b in deps {
                // Is `a` reachable from `b`?
                let mut todo = vec![b.clone()];
                let mut seen = BTreeSet::new();
                while let Some(m) = todo.pop() {
                    assert!(m != *a, "import cycle: {a} -> {b} -> ... -> {a}");
                    if seen.insert(m.clone()) {
                        todo.extend(g.get(&m).into_iter().flatten().cloned());
                    }
                }
            }
        }
    }

    #[test]
    fn modules_import_only_their_rank_or_below() {
        let g = imports();
        let rank: BTreeMap<&str, u32> = RANKS.iter().copied().collect();
        assert_eq!(rank.len(), RANKS.len(), "a module ranked twice");
        for m in g.keys() {
            assert!(
                rank.contains_key(m.as_str()),
                "module {m} has no rank: add it to layering::RANKS"
            );
        }
        for m in rank.keys() {
            assert!(g.contains_key(*m), "RANKS lists {m}, which is no module");
        }
        for (a, deps) in &g {
            for b in deps {
                let ra = rank[a.as_str()];
                let rb = *rank
                    .get(b.as_str())
                    .unwrap_or_else(|| panic!("{a} imports {b}, which has no rank"));
                assert!(
                    rb <= ra,
                    "upward import: {a} (rank {ra}) imports {b} (rank {rb})"
                );
            }
        }
        assert!(
            g["reconcile"].contains("tables") && !g["reconcile"].contains("model"),
            "tests are excluded: {g:?}"
        );
    }
}

//! discovery-agent: watches etcd and keeps the redirect maps in sync.
mod admin;
mod agent;
mod announce;
mod checks;
mod config;
mod etcd;
mod health;
mod loader;
mod maps;
mod metrics;
mod model;
mod reconcile;

use std::io::IsTerminal as _;

use clap::Parser as _;
use config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
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
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Run(args) => block_on(agent::run(args)),
        Command::Announce(args) => block_on(announce::run(args)),
        Command::Service(cmd) => block_on(admin::service(cmd)),
        Command::Backend(cmd) => block_on(admin::backend(cmd)),
        Command::Detach(args) => loader::detach(&args.pin_dir),
        Command::Counters(args) => maps::BpfMaps::open(&args.pin_dir)
            .and_then(|m| m.counters())
            .map(|cs| {
                for (name, v) in cs {
                    println!("{name} {v}");
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

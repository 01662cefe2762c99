//! The `run` config file: a TOML file whose keys are `run` flags.
use std::path::PathBuf;

/// Expands `run --config FILE` (or DISCOVERY_CONFIG) into flags placed
/// right after `run`, so every flag can live in the file and the command
/// line still wins (`args_override_self`). Other commands pass through.
pub fn expand_config_file(
    args: Vec<std::ffi::OsString>,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    expand_config_file_from(
        args,
        std::env::var_os("DISCOVERY_CONFIG").map(PathBuf::from),
    )
}

/// Where the subcommand is: the first argument that is neither a global
/// flag nor its value. (Not the first `run` anywhere: `service put run`
/// names a service.)
fn subcommand_at(args: &[std::ffi::OsString]) -> Option<usize> {
    let mut i = 1;
    while let Some(a) = args.get(i) {
        let a = a.to_string_lossy();
        if a == "--log" || a == "--log-format" {
            i += 2;
        } else if a.starts_with('-') {
            i += 1;
        } else {
            return Some(i);
        }
    }
    None
}

fn expand_config_file_from(
    args: Vec<std::ffi::OsString>,
    env_path: Option<PathBuf>,
) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use anyhow::Context as _;
    let Some(run) = subcommand_at(&args).filter(|&i| args[i] == "run") else {
        return Ok(args);
    };
    let mut path = env_path;
    for (i, a) in args.iter().enumerate().skip(run + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let file_args =
        config_file_args(&text).with_context(|| format!("config file {}", path.display()))?;
    let mut out = args[..=run].to_vec();
    out.extend(file_args.into_iter().map(Into::into));
    out.extend(args[run + 1..].iter().cloned());
    Ok(out)
}

/// TOML keys to flags: `max_services = 100` → `--max-services 100`,
/// `true` → the bare flag, arrays → one comma-joined value.
fn config_file_args(text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = text.parse()?;
    let mut out = Vec::new();
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => anyhow::bail!(
                    "{k}: expected a string or number, found {}",
                    other.type_str()
                ),
            })
        };
        match &v {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                let items: Vec<String> = items.iter().map(scalar).collect::<anyhow::Result<_>>()?;
                out.extend([flag, items.join(",")]);
            }
            other => out.extend([flag, scalar(other)?]),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use clap::Parser as _;

    use super::super::{Cli, Command};
    use super::*;

    #[test]
    fn only_the_run_subcommand_gets_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "max_services = 7\n").unwrap();
        let os = |v: &[&str]| -> Vec<std::ffi::OsString> { v.iter().map(Into::into).collect() };
        // A service called "run" is not the run command.
        let put = os(&[
            "discovery-agent",
            "service",
            "put",
            "run",
            "--frontend",
            "127.0.0.1:1",
        ]);
        assert_eq!(
            expand_config_file_from(put.clone(), Some(file.clone())).unwrap(),
            put
        );
        let run = os(&["discovery-agent", "--log", "debug", "run", "--node", "n"]);
        assert_eq!(
            expand_config_file_from(run, Some(file)).unwrap(),
            os(&[
                "discovery-agent",
                "--log",
                "debug",
                "run",
                "--max-services",
                "7",
                "--node",
                "n"
            ])
        );
    }

    #[test]
    fn config_file_sets_flags_and_the_command_line_wins() {
        let file = "pin_dir = \"/sys/fs/bpf/x\"\nmax_services = 100\n\
                    allowed_frontends = [\"127.0.0.0/8\", \"169.254.0.0/16\"]\n\
                    detach_on_exit = true\nreplace_programs = false\n";
        let args = config_file_args(file).unwrap();
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(args);
        argv.extend(["--max-services".to_owned(), "7".to_owned()]);
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(a.pin.pin_dir, PathBuf::from("/sys/fs/bpf/x"));
        assert_eq!(a.max_services, 7, "command line overrides the file");
        assert_eq!(a.allowed_frontends.len(), 2);
        assert!(a.detach_on_exit && !a.replace_programs);
        // A key that is no flag is an error from clap, naming it.
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(config_file_args("max_sevices = 1").unwrap());
        let e = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(e.contains("--max-sevices"), "{e}");
        assert!(config_file_args("[etcd]\nx = 1").is_err());
    }

    #[test]
    fn the_contrib_config_file_is_valid() {
        let mut argv = vec!["discovery-agent".to_owned(), "run".into()];
        argv.extend(config_file_args(include_str!("../../../contrib/agent.toml")).unwrap());
        let cli = Cli::try_parse_from(argv).unwrap();
        let Command::Run(a) = cli.command else {
            panic!("expected run")
        };
        assert_eq!(a.etcd.endpoints.len(), 3);
        assert_eq!(a.passive_ejection, Duration::from_secs(10));
    }
}

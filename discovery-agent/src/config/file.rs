//! The `run` config file: reading its TOML and layering it under the
//! command line and the environment, as the defaults of the flags it names.
use std::{ffi::OsString, path::PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::{ArgAction, CommandFactory as _, FromArgMatches as _};

use super::Cli;

/// The environment variable that names the config file when `run` has no
/// `--config` (the same as that flag's `env`).
pub const CONFIG_ENV: &str = "DISCOVERY_CONFIG";

/// Why the command line was not turned into a [`Cli`].
#[derive(Debug)]
pub enum ArgsError {
    /// A bad flag or value, or `--help`/`--version`: clap's own message and
    /// exit code ([`clap::Error::exit`]).
    Clap(clap::Error),
    /// The `run` config file could not be read or is wrong; the message
    /// names the file.
    File(anyhow::Error),
}

/// Parses the command line. For `run`, the config file (`--config`, else
/// `config_env`: the value of [`CONFIG_ENV`]) gives the flags' defaults, so
/// the command line beats the environment, which beats the file, which
/// beats the built-in defaults; a list given on the command line or in the
/// environment replaces the file's list.
pub fn parse_args(args: Vec<OsString>, config_env: Option<OsString>) -> Result<Cli, ArgsError> {
    let mut cmd = Cli::command();
    if let Some((sub, path)) = config_path(&args, config_env) {
        cmd = std::fs::read_to_string(&path)
            .with_context(|| format!("reading config file {}", path.display()))
            .and_then(|text| {
                with_file_defaults(cmd, &sub, &text)
                    .with_context(|| format!("config file {}", path.display()))
            })
            .map_err(ArgsError::File)?;
    }
    let matches = cmd
        .try_get_matches_from_mut(args)
        .map_err(ArgsError::Clap)?;
    Cli::from_arg_matches(&matches).map_err(|e| ArgsError::Clap(e.format(&mut cmd)))
}

/// Where the subcommand is: the first argument that is neither a global
/// flag nor its value. (Not the first `run` anywhere: `service put run`
/// names a service.)
fn subcommand_at(args: &[OsString]) -> Option<usize> {
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

/// The config file of a `run` (or `doctor`, which checks what `run` would
/// do) command line: its last `--config`, else the environment's, with the
/// subcommand. None for other commands, which have no config file.
fn config_path(args: &[OsString], config_env: Option<OsString>) -> Option<(String, PathBuf)> {
    let run = subcommand_at(args).filter(|&i| args[i] == "run" || args[i] == "doctor")?;
    let sub = args[run].to_string_lossy().into_owned();
    let mut path = config_env.map(PathBuf::from);
    for (i, a) in args.iter().enumerate().skip(run + 1) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = args.get(i + 1).map(PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
        }
    }
    path.map(|p| (sub, p))
}

/// `cmd` with the file's values as the defaults of the `run` flags (and
/// global flags) its keys name: `max_services = 100` is `--max-services`.
/// Unknown keys, values of the wrong type and values the flag's own parser
/// refuses are errors naming the key.
fn with_file_defaults(cmd: clap::Command, sub: &str, text: &str) -> anyhow::Result<clap::Command> {
    let table: toml::Table = text.parse()?;
    let run = cmd.find_subcommand(sub).expect("the subcommand exists");
    let mut defaults = vec![];
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let named = |a: &&clap::Arg| a.get_long() == Some(long.as_str());
        let (global, arg) = match run.get_arguments().find(named) {
            Some(arg) => (false, arg),
            None => match cmd
                .get_arguments()
                .filter(|a| a.is_global_set())
                .find(named)
            {
                Some(arg) => (true, arg),
                None => bail!("unknown key {key}: `run` has no flag --{long}"),
            },
        };
        if arg.get_id() == "config" {
            bail!("{key}: a config file cannot name another one");
        }
        let values = values_of(key, value, arg)?;
        check_values(key, arg, &values)?;
        defaults.push((global, arg.get_id().clone(), values));
    }
    let mut cmd = cmd;
    for (global, id, values) in defaults {
        let set = |a: clap::Arg| a.default_values(values);
        cmd = if global {
            cmd.mut_arg(id, set)
        } else {
            cmd.mut_subcommand(sub, |run| run.mut_arg(id, set))
        };
    }
    Ok(cmd)
}

/// A TOML value as the flag's raw values: booleans for on/off flags ("true"
/// or "false"), an array (or one value) for list flags, one string or
/// number for the rest.
fn values_of(key: &str, value: &toml::Value, arg: &clap::Arg) -> anyhow::Result<Vec<String>> {
    use toml::Value;
    let scalar = |v: &Value| -> anyhow::Result<String> {
        Ok(match v {
            Value::String(s) => s.clone(),
            Value::Integer(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            other => bail!(
                "{key}: expected a string or a number, found {}",
                other.type_str()
            ),
        })
    };
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, Value::Boolean(b)) => Ok(vec![b.to_string()]),
        (ArgAction::SetTrue, other) => {
            bail!("{key}: expected true or false, found {}", other.type_str())
        }
        (ArgAction::Append, Value::Array(items)) if items.is_empty() => {
            bail!("{key}: the list is empty")
        }
        (ArgAction::Append, Value::Array(items)) => items.iter().map(scalar).collect(),
        (ArgAction::Append, other) => Ok(vec![scalar(other)?]),
        (ArgAction::Set, Value::Array(_)) => bail!("{key}: expected one value, found an array"),
        (ArgAction::Set, other) => Ok(vec![scalar(other)?]),
        _ => bail!("{key}: cannot be set in a config file"),
    }
}

/// Runs the values through the flag's own parser (and delimiter) now, so a
/// bad one is an error about the file rather than about a flag nobody typed.
fn check_values(key: &str, arg: &clap::Arg, values: &[String]) -> anyhow::Result<()> {
    use clap::error::{ContextKind, ContextValue};
    let probe = clap::Command::new("config-file").no_binary_name(true).arg(
        clap::Arg::new("value")
            .num_args(1..)
            .value_delimiter(arg.get_value_delimiter())
            .value_parser(arg.get_value_parser().clone()),
    );
    let argv = std::iter::once("--").chain(values.iter().map(String::as_str));
    let Err(e) = probe.try_get_matches_from(argv) else {
        return Ok(());
    };
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => values.join(","),
    };
    let why = match (
        std::error::Error::source(&e),
        e.get(ContextKind::ValidValue),
    ) {
        (Some(source), _) => source.to_string(),
        (None, Some(ContextValue::Strings(valid))) => {
            format!("expected one of {}", valid.join(", "))
        }
        (None, _) => e.kind().to_string(),
    };
    Err(anyhow!("{key}: invalid value {value:?}: {why}"))
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use super::super::{Command, RunArgs};
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(Into::into).collect()
    }

    /// `argv` parsed with `file` (written to a temporary file) as the
    /// DISCOVERY_CONFIG file.
    fn parse_with(file: &str, argv: &[&str]) -> Result<Cli, ArgsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, file).unwrap();
        parse_args(os(argv), Some(path.into()))
    }

    fn run_args(r: Result<Cli, ArgsError>) -> RunArgs {
        match r.unwrap().command {
            Command::Run(a) => a,
            other => panic!("expected run, got {other:?}"),
        }
    }

    fn file_error(r: Result<Cli, ArgsError>) -> String {
        match r {
            Err(ArgsError::File(e)) => format!("{e:#}"),
            other => panic!("expected a config file error, got {other:?}"),
        }
    }

    #[test]
    fn the_config_env_is_the_config_flags() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let arg = run.get_arguments().find(|a| a.get_id() == "config");
        assert_eq!(
            arg.unwrap().get_env(),
            Some(std::ffi::OsStr::new(CONFIG_ENV))
        );
    }

    #[test]
    fn the_file_is_used_when_no_flag_says_otherwise() {
        let file = "pin_dir = \"/sys/fs/bpf/x\"\nmax_services = 100\n\
                    allowed_frontends = [\"127.0.0.0/8\", \"169.254.0.0/16\"]\n\
                    etcd = \"http://a:2379,http://b:2379\"\n\
                    detach_on_exit = true\nreplace_programs = false\n\
                    passive_ejection = \"3s\"\nnode = \"from-file\"\n";
        let a = run_args(parse_with(file, &["discovery-agent", "run"]));
        assert_eq!(a.pin.pin_dir, Path::new("/sys/fs/bpf/x"));
        assert_eq!(a.max_services, 100);
        assert_eq!(a.allowed_frontends.len(), 2);
        assert_eq!(a.etcd.endpoints, ["http://a:2379", "http://b:2379"]);
        assert!(a.detach_on_exit && !a.replace_programs);
        assert_eq!(a.passive_ejection, Duration::from_secs(3));
        assert_eq!(a.node.as_deref(), Some("from-file"));
        // Untouched flags keep their built-in defaults.
        assert_eq!(a.passive_failures, 3);
    }

    #[test]
    fn the_command_line_beats_the_file_and_replaces_its_lists() {
        let file = "max_services = 100\nallowed_frontends = [\"127.0.0.0/8\", \"169.254.0.0/16\"]\n\
                    detach_on_exit = false\n";
        let a = run_args(parse_with(
            file,
            &[
                "discovery-agent",
                "run",
                "--max-services",
                "7",
                "--allowed-frontends",
                "10.0.0.0/8",
                "--detach-on-exit",
            ],
        ));
        assert_eq!(a.max_services, 7);
        assert_eq!(a.allowed_frontends, ["10.0.0.0/8".parse().unwrap()]);
        assert!(a.detach_on_exit);
        // `--config` on the command line beats the environment's file.
        let dir = tempfile::tempdir().unwrap();
        let flag_file = dir.path().join("flag.toml");
        std::fs::write(&flag_file, "max_services = 9\n").unwrap();
        let flag = format!("--config={}", flag_file.display());
        let a = run_args(parse_with(file, &["discovery-agent", "run", &flag]));
        assert_eq!(a.max_services, 9);
        assert_eq!(
            a.allowed_frontends,
            ["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            "the other file is not read: the defaults hold"
        );
    }

    #[test]
    fn global_flags_in_the_file_lose_to_the_command_line() {
        let file = "log = \"warn\"\nlog_format = \"json\"\n";
        let cli = parse_with(file, &["discovery-agent", "run"]).unwrap();
        assert_eq!(cli.log.as_deref(), Some("warn"));
        assert_eq!(cli.log_format, super::super::LogFormat::Json);
        for argv in [
            ["discovery-agent", "--log", "debug", "run"],
            ["discovery-agent", "run", "--log", "debug"],
        ] {
            let cli = parse_with(file, &argv).unwrap();
            assert_eq!(cli.log.as_deref(), Some("debug"), "{argv:?}");
        }
    }

    #[test]
    fn bad_files_are_rejected_naming_the_file_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "max_sevices = 1\n").unwrap();
        let r = parse_args(os(&["discovery-agent", "run"]), Some(path.clone().into()));
        let e = file_error(r);
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("max_sevices"), "{e}");
        for (file, words) in [
            ("max_services = true", &["max_services", "boolean"][..]),
            ("max_services = [1, 2]", &["max_services", "array"]),
            (
                "detach_on_exit = \"yes\"",
                &["detach_on_exit", "true or false"],
            ),
            ("allowed_frontends = []", &["allowed_frontends", "empty"]),
            ("max_services = 0", &["max_services", "\"0\""]),
            (
                "allowed_frontends = [\"nope\"]",
                &["allowed_frontends", "nope"],
            ),
            ("log_format = \"xml\"", &["log_format", "json"]),
            ("prefix = \"x/\"", &["prefix", "must start with '/'"]),
            ("config = \"/etc/other.toml\"", &["config"]),
            ("[etcd]\nx = 1", &["etcd", "table"]),
            ("max_services = ", &["agent.toml"]),
        ] {
            let e = file_error(parse_with(file, &["discovery-agent", "run"]));
            for w in words {
                assert!(e.contains(w), "{file:?}: {e}");
            }
        }
        let missing = dir.path().join("missing.toml");
        let r = parse_args(
            os(&["discovery-agent", "run"]),
            Some(missing.clone().into()),
        );
        let e = file_error(r);
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    #[test]
    fn bad_flags_are_still_clap_errors() {
        let r = parse_with(
            "max_services = 100\n",
            &["discovery-agent", "run", "--max-services", "x"],
        );
        let Err(ArgsError::Clap(e)) = r else {
            panic!("expected a clap error, got {r:?}")
        };
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--max-services"), "{e}");
    }

    #[test]
    fn only_the_run_subcommand_gets_the_config_file() {
        // A service called "run" is not the run command: the file (which
        // does not even exist) is not read.
        let missing = Some(OsString::from("/nonexistent/agent.toml"));
        let argv = [
            "discovery-agent",
            "service",
            "put",
            "run",
            "--frontend",
            "127.0.0.1:1",
        ];
        assert_eq!(config_path(&os(&argv), missing.clone()), None);
        let cli = parse_args(os(&argv), missing.clone()).unwrap();
        assert!(matches!(cli.command, Command::Service(_)));
        let argv = ["discovery-agent", "--log", "debug", "run", "--node", "n"];
        assert_eq!(
            config_path(&os(&argv), missing.clone()),
            Some(("run".to_owned(), PathBuf::from("/nonexistent/agent.toml")))
        );
        let argv = ["discovery-agent", "doctor", "--json"];
        assert_eq!(
            config_path(&os(&argv), missing.clone()).map(|(sub, _)| sub),
            Some("doctor".to_owned())
        );
        assert!(matches!(
            parse_args(os(&argv), missing),
            Err(ArgsError::File(_))
        ));
    }

    #[test]
    fn the_contrib_config_file_is_valid() {
        let a = run_args(parse_with(
            include_str!("../../../contrib/agent.toml"),
            &["discovery-agent", "run"],
        ));
        assert_eq!(a.etcd.endpoints.len(), 3);
        assert_eq!(a.passive_ejection, Duration::from_secs(10));
    }

    /// Set in the child process of the environment test.
    const CHILD: &str = "DISCOVERY_TEST_ENV_CHILD";

    /// The environment against the file and the command line. Checked in a
    /// child process (this test binary, running only this test) given its
    /// own environment: setting variables here would race other tests.
    #[test]
    fn the_environment_beats_the_file_and_loses_to_the_command_line() {
        let file = "max_services = 100\nallowed_frontends = [\"127.0.0.0/8\", \"169.254.0.0/16\"]\n\
                    detach_on_exit = true\nnode = \"from-file\"\n";
        if std::env::var_os(CHILD).is_none() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.toml");
            std::fs::write(&path, file).unwrap();
            let name = concat!(
                module_path!(),
                "::",
                "the_environment_beats_the_file_and_loses_to_the_command_line"
            );
            let name = name.split_once("::").unwrap().1;
            let mut child = std::process::Command::new(std::env::current_exe().unwrap());
            child.args(["--exact", name, "--test-threads=1", "--nocapture"]);
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("DISCOVERY_") {
                    child.env_remove(k);
                }
            }
            child
                .env(CHILD, "1")
                .env(CONFIG_ENV, &path)
                .env("DISCOVERY_MAX_SERVICES", "5")
                .env("DISCOVERY_ALLOWED_FRONTENDS", "10.0.0.0/8")
                .env("DISCOVERY_DETACH_ON_EXIT", "false");
            let out = child.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        // The child: the file comes from DISCOVERY_CONFIG, as in main.
        let config_env = std::env::var_os(CONFIG_ENV);
        let a = run_args(parse_args(
            os(&["discovery-agent", "run"]),
            config_env.clone(),
        ));
        assert_eq!(a.max_services, 5, "environment over file");
        assert_eq!(
            a.allowed_frontends,
            ["10.0.0.0/8".parse().unwrap()],
            "replaced"
        );
        assert!(!a.detach_on_exit, "environment false over file true");
        assert_eq!(a.node.as_deref(), Some("from-file"), "file where no env");
        let argv = [
            "discovery-agent",
            "run",
            "--max-services",
            "9",
            "--allowed-frontends",
            "127.0.0.1:1",
            "--detach-on-exit",
        ];
        let a = run_args(parse_args(os(&argv), config_env));
        assert_eq!(a.max_services, 9, "command line over environment");
        assert_eq!(a.allowed_frontends, ["127.0.0.1:1".parse().unwrap()]);
        assert!(a.detach_on_exit);
    }
}

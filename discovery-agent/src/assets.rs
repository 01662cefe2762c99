//! `discovery-agent generate-assets DIR` (hidden): man pages and shell
//! completions generated from the command line itself, so they cannot
//! drift from the flags. `cargo xtask dist` runs it and puts the files
//! where Debian expects them.
//!
//! Layout under DIR: `man/man1/discovery-agent.1` and one page per
//! subcommand (`discovery-agent-run.1`, `discovery-agent-service-put.1`,
//! ...); `completions/bash/discovery-agent`,
//! `completions/zsh/_discovery-agent`, `completions/fish/discovery-agent.fish`.
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::config::Cli;

const BIN: &str = "discovery-agent";

/// Each shell and its completion file's name (the names the shells look
/// up: bash by command name, zsh `_command`, fish `command.fish`).
const COMPLETIONS: &[(Shell, &str)] = &[
    (Shell::Bash, "discovery-agent"),
    (Shell::Zsh, "_discovery-agent"),
    (Shell::Fish, "discovery-agent.fish"),
];

/// The command line without its hidden subcommands, for the completions:
/// clap_complete offers hidden subcommands (clap_mangen skips them).
fn visible() -> clap::Command {
    let full = Cli::command();
    let mut cmd = clap::Command::new(BIN)
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        cmd = cmd.about(about.clone());
    }
    if let Some(v) = full.get_version() {
        cmd = cmd.version(v.to_owned());
    }
    cmd
}

/// Writes the man pages and completions under `dir`; returns the files
/// written, sorted.
pub fn write(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = vec![];
    let man = dir.join("man/man1");
    fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    // One page for the command and one for each visible subcommand, named
    // by its path (discovery-agent-service-put.1); hidden ones (this one)
    // and `help` get none.
    clap_mangen::generate_to(Cli::command(), &man)
        .with_context(|| format!("writing man pages into {}", man.display()))?;
    for e in fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
        files.push(e?.path());
    }
    for &(shell, name) in COMPLETIONS {
        let sub = dir.join("completions").join(shell.to_string());
        fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        let mut text = vec![];
        clap_complete::generate(shell, &mut visible(), BIN, &mut text);
        let path = sub.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        files.push(path);
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_and_completions_cover_the_visible_commands() {
        let dir = tempfile::tempdir().unwrap();
        let files = write(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for want in [
            "man/man1/discovery-agent.1",
            "man/man1/discovery-agent-run.1",
            "man/man1/discovery-agent-announce.1",
            "man/man1/discovery-agent-status.1",
            "man/man1/discovery-agent-service-put.1",
            "man/man1/discovery-agent-backend-disable.1",
            "completions/bash/discovery-agent",
            "completions/zsh/_discovery-agent",
            "completions/fish/discovery-agent.fish",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("generate-assets")),
            "the hidden command gets no page: {names:?}"
        );
        assert!(
            !names.iter().any(|n| n.ends_with("-help.1")),
            "`help` gets no page: {names:?}"
        );
        let run = fs::read_to_string(dir.path().join("man/man1/discovery-agent-run.1")).unwrap();
        assert!(
            run.contains("pin\\-dir") && run.contains("DISCOVERY_PIN_DIR"),
            "{run}"
        );
        let top = fs::read_to_string(dir.path().join("man/man1/discovery-agent.1")).unwrap();
        assert!(top.contains("discovery\\-agent\\-run(1)"), "{top}");
        for (shell, name) in COMPLETIONS {
            let path = dir
                .path()
                .join("completions")
                .join(shell.to_string())
                .join(name);
            let text = fs::read_to_string(path).unwrap();
            for sub in Cli::command().get_subcommands() {
                let name = sub.get_name();
                assert_eq!(
                    text.contains(name),
                    !sub.is_hide_set(),
                    "{shell}: {name} (hidden: {})",
                    sub.is_hide_set()
                );
            }
            for flag in ["pin-dir", "log-format", "version"] {
                assert!(text.contains(flag), "{shell}: {flag}");
            }
        }
    }
}

//! `cargo xtask dist`: a Debian package of the release agent, its eBPF
//! programs embedded, built by `dpkg-deb --build` from a staged tree in
//! target/dist/stage/. `--check` installs it into a clean Debian 12 root
//! and checks it as an operator would (see [`check`]).
//!
//! What goes where, and from which file:
//! - /usr/bin/discovery-agent: the release build, stripped;
//! - /lib/systemd/system/discovery-agent.service and
//!   discovery-announce@.service: contrib/'s units with the binary at
//!   /usr/bin;
//! - /etc/discovery/agent.toml and announce.env (conffiles), and an empty
//!   /etc/discovery/announce/: contrib/agent.toml and contrib/announce.env;
//! - /usr/share/man/man1/*.1.gz and the bash, zsh and fish completions:
//!   written by the built agent itself (`discovery-agent generate-assets`);
//! - /usr/share/doc/discovery-agent/: copyright (contrib/deb/copyright and
//!   the linked crates' licenses, from `cargo tree`) and
//!   examples/memcached.toml (contrib/announce/memcached.toml);
//! - DEBIAN/: control (contrib/deb/control with the version, the
//!   architecture, the size and the shared-library dependencies from
//!   dpkg-shlibdeps), conffiles, md5sums, and contrib/deb/'s postinst,
//!   prerm and postrm.
use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    debroot::{self, Mounts},
    root, run, target_dir,
};

#[derive(clap::Args)]
pub struct Opts {
    /// Then install the package into a clean Debian 12 root (debootstrap)
    /// and check it as an operator would: files, `--version`, man pages,
    /// completions, both units with systemd-analyze, conffiles across
    /// reinstall, remove and purge (as root; a few minutes).
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    root: debroot::RootOpts,
}

const PKG: &str = "discovery-agent";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The programs id `--version` shows for an empty eBPF object (FNV-1a 64
/// of no bytes, see discovery-agent/build.rs): an agent built without its
/// programs, which refuses to run.
const STUB_PROGRAMS_ID: &str = "programs cbf29ce484222325";
const CONFFILES: &[&str] = &["/etc/discovery/agent.toml", "/etc/discovery/announce.env"];
const UNITS: &[&str] = &["discovery-agent.service", "discovery-announce@.service"];

pub fn dist(opts: &Opts) -> anyhow::Result<()> {
    let deb = package()?;
    if opts.check {
        check(&deb, &opts.root)?;
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let o = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    String::from_utf8(o.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

fn read(path: &Path) -> anyhow::Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Writes `bytes` to `rel` under `base`, creating the directories, with
/// `mode`.
fn put(base: &Path, rel: &str, bytes: &[u8], mode: u32) -> anyhow::Result<PathBuf> {
    let path = base.join(rel.trim_start_matches('/'));
    let dir = path.parent().context("a file has a directory")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(path)
}

/// Every file and directory under `dir`, as paths relative to it, sorted.
fn walk(dir: &Path) -> anyhow::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut out = vec![];
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path().strip_prefix(dir)?.to_path_buf(), m));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// A contrib/ unit as packaged: the binary at /usr/bin, and its header
/// naming where the package puts it.
fn packaged_unit(name: &str) -> anyhow::Result<String> {
    let path = root().join("contrib").join(name);
    let text = read(&path)?;
    let (bin, packaged_bin) = ("/usr/local/bin/discovery-agent", "/usr/bin/discovery-agent");
    let header = format!("# /etc/systemd/system/{name}\n");
    if !text.contains(bin) || !text.starts_with(&header) {
        bail!(
            "{}: expected a first line {header:?} and ExecStart={bin}",
            path.display()
        );
    }
    let text = text.replacen(
        &header,
        &format!(
            "# /lib/systemd/system/{name}\n#\n\
             # Installed by the {PKG} package: change it with `systemctl edit`\n\
             # (a drop-in under /etc/systemd/system/), not here.\n"
        ),
        1,
    );
    Ok(text.replace(bin, packaged_bin))
}

/// The third-party crates linked into the agent and their licenses, as
/// the continuation lines of the copyright file's Comment field.
fn crate_licenses() -> anyhow::Result<String> {
    let tree = output(crate::cargo().args([
        "tree",
        "-p",
        PKG,
        "--edges",
        "normal,no-proc-macro",
        "--prefix",
        "none",
        "--format",
        "{p}\t{l}",
    ]))?;
    let ws = root();
    let ws = ws.to_string_lossy();
    let lines: BTreeSet<String> = tree
        .lines()
        .filter(|l| !l.contains(&*ws))
        .filter_map(|l| {
            let (p, license) = l.trim_end_matches(" (*)").split_once('\t')?;
            let license = if license.is_empty() {
                "see the crate's license file"
            } else {
                license
            };
            Some(format!(" {p}: {license}"))
        })
        .collect();
    if lines.is_empty() {
        bail!("`cargo tree -p {PKG}` listed no dependencies");
    }
    Ok(lines.into_iter().collect::<Vec<_>>().join("\n"))
}

/// Debian's names for the shared libraries the binary needs, versioned:
/// dpkg-shlibdeps, run where it expects a package (debian/control beside
/// debian/<package>/).
fn shlib_depends(stage: &Path) -> anyhow::Result<String> {
    crate::bootstrap::ensure_tool(
        "dpkg-shlibdeps",
        "dpkg-dev",
        "it finds the Debian packages of the libraries the agent links",
    )?;
    put(
        stage,
        "debian/control",
        format!("Source: discovery\n\nPackage: {PKG}\nArchitecture: any\n").as_bytes(),
        0o644,
    )?;
    let out = output(
        Command::new("dpkg-shlibdeps")
            .args(["-O", "-e"])
            .arg(format!("debian/{PKG}/usr/bin/{PKG}"))
            .current_dir(stage),
    )?;
    let deps = out
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {out:?}"))?;
    if !deps.contains("libc6") {
        bail!("dpkg-shlibdeps found no libc6 dependency: {deps:?}");
    }
    Ok(deps.to_owned())
}

/// Bootstraps, builds the release agent, stages the package tree and
/// builds target/dist/discovery-agent_<version>_<arch>.deb.
fn package() -> anyhow::Result<PathBuf> {
    if std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        bail!("AYA_BUILD_SKIP is set: the package needs the agent with its eBPF programs");
    }
    crate::bootstrap::bootstrap()?;
    let built = crate::build_packages(true, &[PKG])?.join(PKG);
    let version = output(Command::new(&built).arg("--version"))?;
    if version.contains(STUB_PROGRAMS_ID) || !version.contains(VERSION) {
        bail!(
            "{} is not a release agent with its programs ({}): run `cargo xtask bootstrap`",
            built.display(),
            version.trim()
        );
    }
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let dist = target_dir().join("dist");
    let stage = dist.join("stage");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    let pkg = stage.join("debian").join(PKG);
    let contrib = root().join("contrib");

    // The binary, stripped as Debian's packages are (its programs live in
    // .rodata, which strip keeps).
    let bin = put(&pkg, &format!("/usr/bin/{PKG}"), &[], 0o755)?;
    fs::copy(&built, &bin)
        .with_context(|| format!("copying {} to {}", built.display(), bin.display()))?;
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))?;
    run(Command::new("strip")
        .args(["--strip-unneeded", "--remove-section=.comment"])
        .arg(&bin))?;

    // Man pages and completions, from the packaged binary's own CLI.
    let assets = stage.join("assets");
    run(Command::new(&bin).arg("generate-assets").arg(&assets))?;
    let man_src = assets.join("man/man1");
    let mut pages = 0;
    for e in fs::read_dir(&man_src).with_context(|| format!("reading {}", man_src.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let page = put(
            &pkg,
            &format!("/usr/share/man/man1/{name}"),
            &fs::read(e.path())?,
            0o644,
        )?;
        // -n: no name or time stamp in the header, so rebuilds are equal.
        run(Command::new("gzip").args(["-9n", "--force"]).arg(&page))?;
        pages += 1;
    }
    if pages < 2 {
        bail!(
            "generate-assets wrote {pages} man pages into {}",
            man_src.display()
        );
    }
    for (from, to) in [
        (
            "completions/bash/discovery-agent",
            "/usr/share/bash-completion/completions/discovery-agent",
        ),
        (
            "completions/zsh/_discovery-agent",
            "/usr/share/zsh/vendor-completions/_discovery-agent",
        ),
        (
            "completions/fish/discovery-agent.fish",
            "/usr/share/fish/vendor_completions.d/discovery-agent.fish",
        ),
    ] {
        let src = assets.join(from);
        let bytes = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
        put(&pkg, to, &bytes, 0o644)?;
    }
    fs::remove_dir_all(&assets).with_context(|| format!("removing {}", assets.display()))?;

    for unit in UNITS {
        put(
            &pkg,
            &format!("/lib/systemd/system/{unit}"),
            packaged_unit(unit)?.as_bytes(),
            0o644,
        )?;
    }
    for (from, to) in [
        ("agent.toml", "/etc/discovery/agent.toml"),
        ("announce.env", "/etc/discovery/announce.env"),
        (
            "announce/memcached.toml",
            "/usr/share/doc/discovery-agent/examples/memcached.toml",
        ),
    ] {
        put(&pkg, to, read(&contrib.join(from))?.as_bytes(), 0o644)?;
    }
    let announce_dir = pkg.join("etc/discovery/announce");
    fs::create_dir_all(&announce_dir)
        .with_context(|| format!("creating {}", announce_dir.display()))?;
    let copyright = read(&contrib.join("deb/copyright"))?.replace("{crates}", &crate_licenses()?);
    put(
        &pkg,
        "/usr/share/doc/discovery-agent/copyright",
        copyright.as_bytes(),
        0o644,
    )?;

    // DEBIAN/: maintainer scripts, conffiles, md5sums, control.
    for script in ["postinst", "prerm", "postrm"] {
        let text = read(&contrib.join("deb").join(script))?;
        put(&pkg, &format!("/DEBIAN/{script}"), text.as_bytes(), 0o755)?;
    }
    put(
        &pkg,
        "/DEBIAN/conffiles",
        (CONFFILES.join("\n") + "\n").as_bytes(),
        0o644,
    )?;
    let mut files = vec![];
    let mut installed_kib = 0;
    for (rel, m) in walk(&pkg)? {
        if rel.starts_with("DEBIAN") {
            continue;
        }
        // dpkg-gencontrol's count: each file's size in KiB, rounded up,
        // and one per directory.
        installed_kib += if m.is_file() {
            m.len().div_ceil(1024)
        } else {
            1
        };
        let abs = Path::new("/").join(&rel);
        let conffile = CONFFILES.iter().any(|c| Path::new(c) == abs);
        if m.is_file() && !conffile {
            files.push(rel);
        }
    }
    let sums = output(
        Command::new("md5sum")
            .arg("--")
            .args(&files)
            .current_dir(&pkg),
    )?;
    put(&pkg, "/DEBIAN/md5sums", sums.as_bytes(), 0o644)?;
    let depends = shlib_depends(&stage)?;
    let control = read(&contrib.join("deb/control"))?
        .replace("{version}", VERSION)
        .replace("{arch}", &arch)
        .replace("{installed_size}", &installed_kib.to_string())
        .replace("{depends}", &depends);
    if control.contains('{') {
        bail!("contrib/deb/control: a {{placeholder}} is left: {control}");
    }
    put(&pkg, "/DEBIAN/control", control.as_bytes(), 0o644)?;

    // Directories 0755 whatever the umask; owners are root's in the
    // package (--root-owner-group), whoever builds it.
    for (rel, m) in walk(&pkg)? {
        if m.is_dir() {
            fs::set_permissions(pkg.join(&rel), fs::Permissions::from_mode(0o755))?;
        }
    }
    fs::set_permissions(&pkg, fs::Permissions::from_mode(0o755))?;
    let deb = dist.join(format!("{PKG}_{VERSION}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&pkg)
        .arg(&deb))?;
    run(Command::new("dpkg-deb").arg("--info").arg(&deb))?;
    run(Command::new("dpkg-deb").arg("--contents").arg(&deb))?;
    if crate::bootstrap::on_path("lintian") {
        // Reported, not enforced: lintian's opinions change between
        // releases.
        let _ = run(Command::new("lintian").args(["--info"]).arg(&deb));
    } else {
        eprintln!("dist: lintian is not installed: skipped (`apt-get install lintian` to run it)");
    }
    eprintln!("dist: {}", deb.display());
    Ok(deb)
}

/// Counts the checks and says which one failed.
struct Checks {
    log: fs::File,
    passed: usize,
}

impl Checks {
    /// A script inside the root: one check, passed when it exits 0.
    fn chroot(&mut self, root: &debroot::Root, what: &str, script: &str) -> anyhow::Result<()> {
        eprintln!("dist-check: {what}");
        debroot::run_in(root, Mounts::Basic, what, script, &mut self.log)?;
        self.ok(what)
    }

    /// A check made from the host.
    fn host(&mut self, what: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
        eprintln!("dist-check: {what}");
        f().with_context(|| format!("dist-check: {what}"))?;
        self.ok(what)
    }

    fn ok(&mut self, what: &str) -> anyhow::Result<()> {
        use std::io::Write as _;
        self.passed += 1;
        println!("dist-check: ok: {what}");
        writeln!(self.log, "ok: {what}")?;
        Ok(())
    }
}

/// Where Debian expects each file, and its mode.
const FILES: &[(&str, u32)] = &[
    ("/usr/bin/discovery-agent", 0o755),
    ("/lib/systemd/system/discovery-agent.service", 0o644),
    ("/lib/systemd/system/discovery-announce@.service", 0o644),
    ("/etc/discovery/agent.toml", 0o644),
    ("/etc/discovery/announce.env", 0o644),
    ("/usr/share/doc/discovery-agent/copyright", 0o644),
    (
        "/usr/share/doc/discovery-agent/examples/memcached.toml",
        0o644,
    ),
    ("/usr/share/man/man1/discovery-agent.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-run.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-announce.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-status.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-detach.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-counters.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-service.1.gz", 0o644),
    (
        "/usr/share/man/man1/discovery-agent-service-put.1.gz",
        0o644,
    ),
    ("/usr/share/man/man1/discovery-agent-service-rm.1.gz", 0o644),
    ("/usr/share/man/man1/discovery-agent-backend.1.gz", 0o644),
    (
        "/usr/share/man/man1/discovery-agent-backend-disable.1.gz",
        0o644,
    ),
    (
        "/usr/share/man/man1/discovery-agent-backend-enable.1.gz",
        0o644,
    ),
    (
        "/usr/share/bash-completion/completions/discovery-agent",
        0o644,
    ),
    ("/usr/share/zsh/vendor-completions/_discovery-agent", 0o644),
    (
        "/usr/share/fish/vendor_completions.d/discovery-agent.fish",
        0o644,
    ),
];

/// In a clean Debian 12 root (minbase, systemd and man-db: a machine with
/// systemd that can read man pages): install the package with apt as an
/// operator would, check every file, the binary, the man pages, the
/// completions, that nothing was enabled or started, both units with
/// systemd-analyze; then an upgrade (the same package as <version>+check)
/// that keeps a changed conffile, a remove that keeps the conffiles and a
/// purge that removes them and the links `systemctl enable` made. Install,
/// upgrade, remove and purge run as if under systemd, with a `systemctl`
/// that logs what the maintainer scripts ask of it (see [`under_systemd`]).
fn check(deb: &Path, opts: &debroot::RootOpts) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let logp = target_dir().join("dist/check.log");
    let log = fs::File::create(&logp).with_context(|| format!("creating {}", logp.display()))?;
    let mut c = Checks { log, passed: 0 };
    let r = check_in(deb, opts, &mut c);
    let secs = t0.elapsed().as_secs();
    match &r {
        Ok(()) => println!(
            "dist-check: {} checks passed in {}m{:02}s; log: {}",
            c.passed,
            secs / 60,
            secs % 60,
            logp.display()
        ),
        Err(e) => println!(
            "dist-check: FAILED after {} checks passed: {e:#}; log: {}",
            c.passed,
            logp.display()
        ),
    }
    r
}

fn check_in(deb: &Path, opts: &debroot::RootOpts, c: &mut Checks) -> anyhow::Result<()> {
    let root = debroot::create(opts, "dist-check", "systemd,man-db")?;
    let dir = root.dir.clone();
    let name = deb.file_name().context("the package has a file name")?;
    let in_root = Path::new("/tmp").join(name);
    fs::copy(deb, dir.join(in_root.strip_prefix("/")?))
        .with_context(|| format!("copying {} into {}", deb.display(), dir.display()))?;
    let in_root = in_root.display().to_string();
    let apt = "DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Use-Pty=0";

    c.chroot(
        &root,
        &format!("apt-get install {in_root}: only a daemon-reload under systemd"),
        &under_systemd(
            &format!("apt-get update -qq && {apt} install {in_root}"),
            &["--system daemon-reload"],
        ),
    )?;
    c.chroot(
        &root,
        "dpkg lists it installed at this version",
        &format!(
            "s=$(dpkg-query -W -f='${{Status}} ${{Version}}' {PKG}); echo \"$s\"; \
             [ \"$s\" = 'install ok installed {VERSION}' ]"
        ),
    )?;
    c.host("every file where Debian expects it, owned by root", || {
        for (path, mode) in FILES {
            let p = dir.join(path.trim_start_matches('/'));
            let m = fs::metadata(&p).with_context(|| format!("{path} is missing"))?;
            if !m.is_file() || m.len() == 0 {
                bail!("{path} is not a non-empty file");
            }
            if m.permissions().mode() & 0o7777 != *mode || m.uid() != 0 || m.gid() != 0 {
                bail!(
                    "{path}: mode {:o} owner {}:{}, expected {mode:o} root:root",
                    m.permissions().mode() & 0o7777,
                    m.uid(),
                    m.gid()
                );
            }
        }
        let announce = dir.join("etc/discovery/announce");
        if !announce.is_dir() {
            bail!("/etc/discovery/announce/ is missing");
        }
        let conffiles = read(&dir.join("var/lib/dpkg/info/discovery-agent.conffiles"))?;
        for f in CONFFILES {
            if !conffiles.lines().any(|l| l == *f) {
                bail!("dpkg does not list {f} as a conffile: {conffiles:?}");
            }
        }
        Ok(())
    })?;
    c.chroot(
        &root,
        "discovery-agent --version runs and has its programs",
        &format!(
            "v=$(discovery-agent --version); echo \"$v\"; \
             case \"$v\" in 'discovery-agent {VERSION} (git '*) ;; *) exit 1 ;; esac; \
             case \"$v\" in *'{STUB_PROGRAMS_ID}'*) exit 1 ;; esac; \
             discovery-agent --help | grep -q '^  announce'"
        ),
    )?;
    c.chroot(
        &root,
        "man finds and renders every page without warnings",
        "export LC_ALL=C MANWIDTH=100; man -w discovery-agent-run; \
         man -P cat discovery-agent-run | grep -q DISCOVERY_PIN_DIR; \
         man -P cat discovery-agent | grep -q 'discovery-agent-announce(1)'; \
         zcat /usr/share/man/man1/discovery-agent-announce.1.gz | grep -q '^.TH'; \
         for f in /usr/share/man/man1/discovery-agent*.1.gz; do \
           w=$(man --warnings -l \"$f\" 2>&1 >/dev/null) || { echo \"$f: $w\"; exit 1; }; \
           if [ -n \"$w\" ]; then echo \"$f: $w\"; exit 1; fi; \
         done",
    )?;
    c.chroot(
        &root,
        "the bash completion loads and completes subcommands",
        "set +eu; . /usr/share/bash-completion/completions/discovery-agent; \
         complete -p discovery-agent; \
         COMP_WORDS=(discovery-agent ann); COMP_CWORD=1; COMP_LINE='discovery-agent ann'; \
         COMP_POINT=${#COMP_LINE}; \
         f=$(complete -p discovery-agent | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p'); \
         \"$f\" discovery-agent ann discovery-agent; echo \"${COMPREPLY[*]}\"; \
         [ \"${COMPREPLY[*]}\" = announce ]",
    )?;
    c.chroot(
        &root,
        "nothing enabled or started by the install",
        "for u in discovery-agent.service discovery-announce@memcached.service; do \
           s=$(systemctl is-enabled \"$u\" || true); echo \"$u: $s\"; [ \"$s\" = disabled ]; \
         done; \
         if ls /etc/systemd/system/*.wants/ | grep discovery; then exit 1; fi",
    )?;
    verify_units(c, &root)?;
    c.chroot(
        &root,
        "an announcer instance from the example, enabled as the README says",
        "cp /usr/share/doc/discovery-agent/examples/memcached.toml /etc/discovery/announce/; \
         systemctl enable discovery-agent discovery-announce@memcached; \
         test -L /etc/systemd/system/multi-user.target.wants/discovery-announce@memcached.service",
    )?;
    let upgrade = upgraded(deb, &dir)?;
    c.chroot(
        &root,
        "upgrade: a changed conffile kept, a running agent restarted, nothing started",
        &under_systemd(
            &format!(
                "echo '# changed by the operator' >> /etc/discovery/agent.toml; \
                 DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold {upgrade}; \
                 grep -q '^# changed by the operator' /etc/discovery/agent.toml; \
                 [ \"$(dpkg-query -W -f='${{Version}}' {PKG})\" = '{VERSION}+check' ]"
            ),
            &[
                "--system daemon-reload",
                "try-restart discovery-agent.service",
            ],
        ),
    )?;
    c.chroot(
        &root,
        "remove: announcers then the agent stopped, files gone, conffiles kept",
        &under_systemd(
            &format!(
                "{apt} remove {PKG}; \
                 test ! -e /usr/bin/discovery-agent; \
                 test ! -e /lib/systemd/system/discovery-agent.service; \
                 test ! -e /usr/share/man/man1/discovery-agent.1.gz; \
                 test -f /etc/discovery/agent.toml; test -f /etc/discovery/announce.env"
            ),
            &[
                "stop discovery-announce@*.service",
                "stop discovery-agent.service",
                "--system daemon-reload",
            ],
        ),
    )?;
    c.chroot(
        &root,
        "purge: conffiles and enable links gone, the operator's files kept",
        &under_systemd(
            &format!(
                "{apt} purge {PKG}; \
                 test ! -e /etc/discovery/agent.toml; test ! -e /etc/discovery/announce.env; \
                 if ls /etc/systemd/system/*.wants/ | grep discovery; then exit 1; fi; \
                 test -f /etc/discovery/announce/memcached.toml; \
                 if dpkg-query -W {PKG} 2>/dev/null; then exit 1; fi"
            ),
            &["--system daemon-reload"],
        ),
    )?;
    Ok(())
}

/// `script` as if systemd were running (the maintainer scripts test
/// /run/systemd/system), with a `systemctl` first on PATH that only logs
/// its arguments (and first on the PATH apt gives dpkg, `DPkg::Path`);
/// passes when the maintainer scripts called exactly `calls`, in order.
fn under_systemd(script: &str, calls: &[&str]) -> String {
    let want: Vec<String> = calls.iter().map(|c| format!("'{c}'")).collect();
    let conf = "/etc/apt/apt.conf.d/99fake-systemd";
    format!(
        "mkdir -p /run/systemd/system /tmp/fake-systemd; rm -f /tmp/systemctl.log; \
         touch /tmp/systemctl.log; \
         printf '#!/bin/sh\\necho \"$*\" >> /tmp/systemctl.log\\n' > /tmp/fake-systemd/systemctl; \
         chmod 755 /tmp/fake-systemd/systemctl; export PATH=/tmp/fake-systemd:$PATH; \
         trap 'rm -f {conf}' EXIT; \
         echo 'DPkg::Path \"/tmp/fake-systemd:/usr/sbin:/usr/bin:/sbin:/bin\";' > {conf}; \
         {script}; \
         echo 'systemctl calls:'; cat /tmp/systemctl.log; \
         [ \"$(cat /tmp/systemctl.log)\" = \"$(printf '%s\\n' {})\" ]",
        want.join(" ")
    )
}

/// The package again as version <version>+check, for the upgrade check;
/// its path inside the root.
fn upgraded(deb: &Path, root: &Path) -> anyhow::Result<String> {
    let tree = deb.with_extension("upgrade");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    run(Command::new("dpkg-deb")
        .arg("--raw-extract")
        .arg(deb)
        .arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text = read(&control)?;
    let (from, to) = (
        format!("\nVersion: {VERSION}\n"),
        format!("\nVersion: {VERSION}+check\n"),
    );
    if !text.contains(&from) {
        bail!("{}: no {from:?}", control.display());
    }
    fs::write(&control, text.replace(&from, &to))
        .with_context(|| format!("writing {}", control.display()))?;
    let inside = format!("/tmp/{PKG}_{VERSION}+check.deb");
    run(Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&tree)
        .arg(root.join(inside.trim_start_matches('/'))))?;
    fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    Ok(inside)
}

/// Both units through `systemd-analyze verify`, which fails on a missing
/// binary or Documentation= page and prints (exit 0) unknown keys and bad
/// values, so any output fails too; the template is verified as an
/// instance. Twice: the host's systemd-analyze with `--root` on the
/// installed root (which has systemd's own units and the binary at
/// /usr/bin), with `--man=no` since the host's man cannot see the root's
/// pages; then the root's own (Debian 12's systemd 252), pages included.
fn verify_units(c: &mut Checks, root: &debroot::Root) -> anyhow::Result<()> {
    let units = "discovery-agent.service discovery-announce@memcached.service";
    c.chroot(
        root,
        "systemd-analyze verify accepts both units (the root's systemd, man pages included)",
        &format!(
            "systemd-analyze --version | head -1; \
             rc=0; out=$(systemd-analyze verify {units} 2>&1) || rc=$?; \
             echo \"$out\"; [ \"$rc\" = 0 ] && [ -z \"$out\" ]"
        ),
    )?;
    let dir = root.dir.clone();
    c.host(
        "systemd-analyze verify accepts both units (host's systemd, --root)",
        || {
            let out = Command::new("systemd-analyze")
                .arg(format!("--root={}", dir.display()))
                .args([
                    "--man=no",
                    "verify",
                    "discovery-agent.service",
                    "discovery-announce@memcached.service",
                ])
                .output()
                .context("starting systemd-analyze")?;
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            print!("{text}");
            if !out.status.success() || !text.trim().is_empty() {
                bail!("systemd-analyze verify ({}): {}", out.status, text.trim());
            }
            Ok(())
        },
    )
}

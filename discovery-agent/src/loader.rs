//! Loads the embedded programs, attaches them to a cgroup with bpf links and
//! pins maps and links, so traffic keeps flowing while the agent is down.
use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

use crate::migrate::{self, sys_bpf};
use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use discovery_common::{MAPS, MapKind, MapSize, names};
use nix::sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
use tracing::{info, warn};

/// The eBPF object, built from `discovery-ebpf` by build.rs; empty in a
/// stub build (no eBPF toolchain at build time).
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/discovery"));

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

pub fn ensure_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "discovery-agent must run as root: loading and attaching BPF programs needs \
             CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN"
        );
    }
    Ok(())
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    cgroup2_mount_in(&mounts).context(
        "cgroup v2 is not mounted (no cgroup2 entry in /proc/mounts); \
         mount it or pass --cgroup",
    )
}

fn cgroup2_mount_in(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// Makes sure `pin_dir` sits on a bpffs, mounting one at /sys/fs/bpf when
/// that is where it belongs and nothing is mounted there.
fn ensure_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let parent = pin_dir
        .parent()
        .context("pin dir must not be the filesystem root")?;
    let on_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if on_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new(DEFAULT_BPFFS) {
        fs::create_dir_all(parent).with_context(|| format!("creating {DEFAULT_BPFFS}"))?;
        nix::mount::mount(
            Some("bpf"),
            parent,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            Some("mode=0700"),
        )
        .with_context(|| format!("mounting bpffs at {DEFAULT_BPFFS}"))?;
        info!(path = DEFAULT_BPFFS, "mounted bpffs");
        return Ok(());
    }
    bail!(
        "pin dir {} is not on a bpf filesystem; use a directory under a bpffs mount such as {DEFAULT_BPFFS}",
        pin_dir.display()
    )
}

pub struct Sizes {
    pub max_services: u32,
    pub max_backends: u32,
}

impl Sizes {
    /// Entries of a map whose size follows the flags.
    fn entries(&self, size: MapSize) -> u32 {
        size.entries(self.max_services, self.max_backends)
    }
}

/// Loads the programs with the maps pinned under `pin_dir` (reusing pinned
/// maps if an earlier agent left them), attaches the programs to `cgroup`
/// unless links are already pinned there, and pins the links.
/// `replace`: swap attached programs for this build's even when identical
/// (upgrade drills); otherwise only programs whose code differs are swapped.
pub fn load_and_attach(
    cgroup: &Path,
    pin_dir: &Path,
    sizes: &Sizes,
    replace: bool,
) -> anyhow::Result<Loaded> {
    if PROGRAMS.is_empty() {
        bail!(
            "this discovery-agent was built without its eBPF programs (no eBPF toolchain at \
             build time, or AYA_BUILD_SKIP=1): run `cargo xtask bootstrap`, then rebuild"
        );
    }
    ensure_root()?;
    match statfs(cgroup) {
        Ok(s) if s.filesystem_type() == CGROUP2_SUPER_MAGIC => {}
        Ok(_) => bail!("{} is not a cgroup v2 directory", cgroup.display()),
        Err(e) => bail!("cgroup {}: {e}", cgroup.display()),
    }
    ensure_bpffs(pin_dir)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(pin_dir)
        .with_context(|| format!("creating pin dir {}", pin_dir.display()))?;
    fs::set_permissions(pin_dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting pin dir {}", pin_dir.display()))?;

    // A migration an earlier agent left: finish its renames, or drop the
    // copy it had not started swapping to (see `migrate`).
    let journal = migrate::Journal::read(pin_dir)?;
    match journal {
        migrate::Journal::Swapped => {
            info!(pin_dir = %pin_dir.display(), "finishing an interrupted map migration (renames)");
            migrate::commit(pin_dir)?;
        }
        migrate::Journal::None => migrate::abandon(pin_dir)?,
        migrate::Journal::Swapping => {
            info!(pin_dir = %pin_dir.display(), "resuming an interrupted map migration (swap)");
        }
    }
    let resume = journal == migrate::Journal::Swapping;
    // Every map is pinned together, so one tells whether they existed.
    let had_pins = pin_dir.join(names::SERVICES).exists();
    let want = |spec: &discovery_common::MapSpec| match spec.size {
        discovery_common::MapSize::Fixed(n) => n,
        s => sizes.entries(s),
    };
    let plan = if had_pins {
        migrate::plan(pin_dir, want)?
    } else {
        Vec::new()
    };
    let migrating: Vec<&(&str, migrate::Step)> = plan
        .iter()
        .filter(|(_, step)| *step != migrate::Step::Keep)
        .collect();
    if resume && !migrating.is_empty() {
        let was = migrate::Journal::maps(pin_dir)?;
        let mut now: Vec<String> = migrating.iter().map(|(n, _)| (*n).to_owned()).collect();
        now.sort();
        if was != now {
            bail!(
                "an interrupted migration under {} was moving maps [{}], this start would move \
                 [{}] (another build, or other --max-services/--max-backends): start the build \
                 and flags of the interrupted migration to finish it",
                pin_dir.display(),
                was.join(", "),
                now.join(", ")
            );
        }
    }
    let staging = migrate::staging(pin_dir);
    if !migrating.is_empty() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&staging)
            .with_context(|| format!("creating {}", staging.display()))?;
    }
    let paths: Vec<(&str, PathBuf)> = MAPS
        .iter()
        .map(|m| {
            let moved = migrating.iter().any(|(n, _)| *n == m.name);
            let dir = if moved { &staging } else { pin_dir };
            (m.name, dir.join(m.name))
        })
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for m in MAPS.iter().filter(|m| m.size.follows_flags()) {
        loader.map_max_entries(m.name, sizes.entries(m.size));
    }
    let hz = kernel_hz();
    if hz == 0 {
        warn!(
            "CONFIG_HZ not found in /proc/config.gz or /boot/config-*: connect timeouts \
             under 3 s keep the kernel's 1 s initial SYN retransmission"
        );
    }
    loader.override_global("HZ", &hz, true);
    let mut ebpf = loader.load(PROGRAMS).context(
        "loading the BPF programs and maps (kernel needs cgroup sock_addr programs, \
         BTF and socket storage: Linux 5.10 or newer)",
    )?;
    check_pinned_maps(&ebpf, sizes, pin_dir)?;
    let fresh = !had_pins;
    if !migrating.is_empty() && !resume {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        for (name, step) in &migrating {
            let spec = MAPS
                .iter()
                .find(|m| m.name == *name)
                .expect("a map of MAPS");
            let new = map_data(&ebpf, name)?;
            match step {
                migrate::Step::Copy { from } => {
                    let old = aya::maps::MapData::from_pin(pin_dir.join(name))
                        .with_context(|| format!("opening pinned map {name}"))?;
                    let n = migrate::copy(
                        spec,
                        old.fd().as_fd(),
                        *from,
                        new.fd().as_fd(),
                        want(spec),
                        cpus,
                    )
                    .inspect_err(|_| {
                        let _ = migrate::abandon(pin_dir);
                    })?;
                    info!(map = name, from = %from, to_value = spec.value_size, to_entries = want(spec),
                          entries = n, "map migrated: entries copied into the new layout");
                }
                migrate::Step::Fresh { from } => {
                    warn!(map = name, from = %from, to_value = spec.value_size,
                          "socket storage changed layout: sockets opened before the swap lose \
                           their reverse NAT (UDP replies from the backend's address)");
                }
                migrate::Step::Keep => {}
            }
        }
    }
    if !migrating.is_empty() && !resume {
        let names: Vec<&str> = migrating.iter().map(|(n, _)| *n).collect();
        migrate::Journal::start(pin_dir, &names)?;
    }
    if !migrating.is_empty() {
        test_abort("before-swap");
    }

    let cgroup_file =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    // A cgroup v2 directory's inode number is its cgroup id.
    let cgroup_id = cgroup_file.metadata()?.ino();
    let mut programs = Vec::new();
    for (prog_name, link_name) in names::PROGRAMS
        .iter()
        .copied()
        .chain(std::iter::once(names::SOCKOPS))
    {
        let prog = ebpf
            .program_mut(prog_name)
            .with_context(|| format!("program {prog_name} missing from the object"))?;
        let prog: &mut dyn CgroupProgram = match prog {
            aya::programs::Program::CgroupSockAddr(p) => p,
            aya::programs::Program::SockOps(p) => p,
            _ => bail!("program {prog_name} has an unexpected type"),
        };
        let how = install(
            prog,
            prog_name,
            &pin_dir.join(link_name),
            &cgroup_file,
            cgroup,
            cgroup_id,
            pin_dir,
            // New maps (or an interrupted swap): every program moves, same
            // code or not (a tag does not tell which maps it uses).
            replace || !migrating.is_empty() || resume,
        )?;
        programs.push((prog_name, how));
        if !migrating.is_empty() {
            test_abort("mid-swap");
        }
    }
    if migrating.is_empty() && resume {
        // An interrupted migration to a layout this build does not have (a
        // rollback): every link now runs this build's programs on the old
        // maps, so the staging maps go.
        migrate::abandon(pin_dir)?;
        migrate::Journal::None.write(pin_dir)?;
        info!(pin_dir = %pin_dir.display(), "rolled back an interrupted map migration");
    }
    if !migrating.is_empty() {
        migrate::Journal::Swapped.write(pin_dir)?;
        test_abort("after-swap");
        migrate::commit(pin_dir)?;
        info!(maps = ?migrating.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
              "map migration done: every program runs on the new maps");
    }
    Ok(Loaded {
        fresh,
        programs,
        migrated: migrating.iter().map(|(n, _)| *n).collect(),
    })
}

/// Crash drills for the migration tests: `DISCOVERY_TEST_ABORT_MIGRATION`
/// names the step at which the agent aborts, as a SIGKILL would stop it.
fn test_abort(step: &str) {
    if std::env::var("DISCOVERY_TEST_ABORT_MIGRATION").is_ok_and(|s| s == step) {
        eprintln!("aborting the migration at {step} (DISCOVERY_TEST_ABORT_MIGRATION)");
        std::process::abort();
    }
}

/// The map data of one of the object's maps.
fn map_data<'a>(ebpf: &'a aya::Ebpf, name: &str) -> anyhow::Result<&'a aya::maps::MapData> {
    match ebpf
        .map(name)
        .with_context(|| format!("map {name} missing"))?
    {
        aya::maps::Map::HashMap(d)
        | aya::maps::Map::Array(d)
        | aya::maps::Map::PerCpuArray(d)
        | aya::maps::Map::PerCpuHashMap(d)
        | aya::maps::Map::LruHashMap(d)
        | aya::maps::Map::SkStorage(d) => Ok(d),
        _ => bail!("map {name} has an unexpected type"),
    }
}

/// What [`load_and_attach`] did.
pub struct Loaded {
    /// The maps were created now (nothing was pinned before).
    pub fresh: bool,
    /// Maps migrated to this build's layout or size at this start.
    pub migrated: Vec<&'static str>,
    /// Each program, and how it was put in place.
    pub programs: Vec<(&'static str, Install)>,
}

/// How one program was put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Newly attached to the cgroup.
    Attached,
    /// The pinned link already ran this very program.
    Adopted,
    /// The pinned link's program was swapped for this build's.
    Replaced,
}

impl Install {
    pub fn as_str(self) -> &'static str {
        match self {
            Install::Attached => "attached",
            Install::Adopted => "adopted",
            Install::Replaced => "replaced",
        }
    }
}

/// What `install` needs of a program attached to a cgroup: the sock_addr
/// programs and the sock_ops program.
trait CgroupProgram {
    fn load_prog(&mut self) -> Result<(), aya::programs::ProgramError>;
    fn prog_info(&self) -> Result<aya::programs::ProgramInfo, aya::programs::ProgramError>;
    fn prog_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError>;
    fn attach_link(&mut self, cgroup: &fs::File) -> anyhow::Result<FdLink>;
}

macro_rules! cgroup_program {
    ($t:ty) => {
        impl CgroupProgram for $t {
            fn load_prog(&mut self) -> Result<(), aya::programs::ProgramError> {
                self.load()
            }
            fn prog_info(&self) -> Result<aya::programs::ProgramInfo, aya::programs::ProgramError> {
                self.info()
            }
            fn prog_fd(&self) -> Result<BorrowedFd<'_>, aya::programs::ProgramError> {
                Ok(self.fd()?.as_fd())
            }
            fn attach_link(&mut self, cgroup: &fs::File) -> anyhow::Result<FdLink> {
                // bpf links on cgroups always coexist with other programs;
                // the multi-attach flag is for the legacy API and EINVAL here.
                let id = self.attach(cgroup, CgroupAttachMode::Single)?;
                Ok(self.take_link(id)?.try_into()?)
            }
        }
    };
}
cgroup_program!(CgroupSockAddr);
cgroup_program!(aya::programs::SockOps);

/// Loads one program and attaches it, or adopts the pinned link (swapping
/// the program atomically when this build's differs, or with `replace`).
#[allow(clippy::too_many_arguments)]
fn install(
    prog: &mut dyn CgroupProgram,
    prog_name: &str,
    link_path: &Path,
    cgroup_file: &fs::File,
    cgroup: &Path,
    cgroup_id: u64,
    pin_dir: &Path,
    replace: bool,
) -> anyhow::Result<Install> {
    prog.load_prog()
        .with_context(|| format!("verifier rejected {prog_name}"))?;
    if link_path.exists() {
        let link = PinnedCgroupLink::open(link_path)
            .with_context(|| format!("reading pinned link {}", link_path.display()))?;
        if link.cgroup_id != Some(cgroup_id) {
            bail!(
                "pinned link {} is attached to another cgroup (id {:?}), not {} \
                 (id {cgroup_id}); run `discovery-agent detach --pin-dir {}` first or use \
                 another --pin-dir",
                link_path.display(),
                link.cgroup_id,
                cgroup.display(),
                pin_dir.display()
            );
        }
        let new = prog.prog_info()?;
        let old = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .find(|p| p.id() == link.prog_id)
            .with_context(|| {
                format!(
                    "program {} of {} is gone",
                    link.prog_id,
                    link_path.display()
                )
            })?;
        if old.tag() == new.tag() && !replace {
            info!(program = prog_name, link = %link_path.display(), "adopted attached program");
            return Ok(Install::Adopted);
        }
        // One syscall swaps the program under the link: every call runs
        // either the old program or the new one. BPF_F_REPLACE makes it
        // fail if someone else replaced it meanwhile.
        link.update(prog.prog_fd()?, old.fd()?.as_fd())
            .with_context(|| format!("replacing the program of {}", link_path.display()))?;
        info!(program = prog_name, link = %link_path.display(),
              old_tag = format!("{:016x}", old.tag()), new_tag = format!("{:016x}", new.tag()),
              "replaced the attached program atomically");
        return Ok(Install::Replaced);
    }
    let link = prog
        .attach_link(cgroup_file)
        .with_context(|| format!("attaching {prog_name} to {}", cgroup.display()))?;
    link.pin(link_path)
        .with_context(|| format!("pinning link {}", link_path.display()))?;
    info!(program = prog_name, cgroup = %cgroup.display(), "attached");
    Ok(Install::Attached)
}

/// After the load (and any migration, which already refused what it cannot
/// carry): every map the programs got has this build's layout and size.
/// A mismatch here is a bug, never traffic misread.
fn check_pinned_maps(ebpf: &aya::Ebpf, sizes: &Sizes, pin_dir: &Path) -> anyhow::Result<()> {
    for spec in MAPS.iter().filter(|m| m.kind != MapKind::SkStorage) {
        let name = spec.name;
        let map = ebpf
            .map(name)
            .with_context(|| format!("map {name} missing"))?;
        let info = match map {
            aya::maps::Map::HashMap(d)
            | aya::maps::Map::Array(d)
            | aya::maps::Map::PerCpuArray(d)
            | aya::maps::Map::PerCpuHashMap(d)
            | aya::maps::Map::LruHashMap(d) => d.info()?,
            _ => bail!("map {name} has an unexpected type"),
        };
        let (key, value) = (spec.key_size, spec.value_size);
        if (info.key_size(), info.value_size()) != (key, value) {
            bail!(
                "pinned map {} has key/value sizes {}/{}, this agent expects {key}/{value}: \
                 it was made by an incompatible version; run `discovery-agent detach --pin-dir {}` \
                 (traffic is not redirected until the agent starts again)",
                pin_dir.join(name).display(),
                info.key_size(),
                info.value_size(),
                pin_dir.display()
            );
        }
        let want = sizes.entries(spec.size);
        if spec.size.follows_flags() && info.max_entries() != want {
            bail!(
                "map {} has {} entries after the load, not the {want} asked for",
                pin_dir.join(name).display(),
                info.max_entries()
            );
        }
    }
    Ok(())
}

/// The cgroup id a pinned link is attached to (None: not a cgroup link,
/// or its cgroup is gone).
pub fn pinned_link_cgroup(pin: &Path) -> io::Result<Option<u64>> {
    Ok(PinnedCgroupLink::open(pin)?.cgroup_id)
}

/// A pinned cgroup link, read with raw bpf(2) calls: aya 0.14 exposes
/// neither a link's cgroup nor BPF_LINK_UPDATE.
struct PinnedCgroupLink {
    fd: OwnedFd,
    prog_id: u32,
    /// None for another link type or a link whose cgroup is gone.
    cgroup_id: Option<u64>,
}

impl PinnedCgroupLink {
    fn open(pin: &Path) -> io::Result<Self> {
        const BPF_OBJ_GET: libc::c_long = 7;
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        const BPF_LINK_TYPE_CGROUP: u32 = 3;
        #[repr(C)]
        #[derive(Default)]
        struct ObjGet {
            pathname: u64,
            bpf_fd: u32,
            file_flags: u32,
        }
        #[repr(C)]
        struct GetInfo {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let path = CString::new(pin.as_os_str().as_bytes()).map_err(io::Error::other)?;
        let attr = ObjGet {
            pathname: path.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: attr points at a valid, NUL-terminated path for the call.
        let fd = unsafe { sys_bpf(BPF_OBJ_GET, &attr)? };
        // SAFETY: the kernel returned a new fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // struct bpf_link_info: u32 type, id, prog_id, then for cgroup links
        // u64 cgroup_id at offset 16. The buffer is larger than the struct
        // and zeroed, as the kernel requires.
        let mut info = [0u64; 32];
        let attr = GetInfo {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        // SAFETY: info is a writable buffer of info_len bytes.
        unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &attr)? };
        let link_type = info[0] as u32;
        let prog_id = info[1] as u32;
        let cgroup_id = (link_type == BPF_LINK_TYPE_CGROUP && info[2] != 0).then_some(info[2]);
        Ok(Self {
            fd,
            prog_id,
            cgroup_id,
        })
    }

    /// BPF_LINK_UPDATE with BPF_F_REPLACE: atomically swaps `old` for `new`.
    fn update(&self, new: BorrowedFd<'_>, old: BorrowedFd<'_>) -> io::Result<()> {
        const BPF_LINK_UPDATE: libc::c_long = 29;
        const BPF_F_REPLACE: u32 = 1 << 2;
        #[repr(C)]
        struct LinkUpdate {
            link_fd: u32,
            new_prog_fd: u32,
            flags: u32,
            old_prog_fd: u32,
        }
        let attr = LinkUpdate {
            link_fd: self.fd.as_raw_fd() as u32,
            new_prog_fd: new.as_raw_fd() as u32,
            flags: BPF_F_REPLACE,
            old_prog_fd: old.as_raw_fd() as u32,
        };
        // SAFETY: all fds are open for the duration of the call.
        unsafe { sys_bpf(BPF_LINK_UPDATE, &attr)? };
        Ok(())
    }
}

/// Removes the pinned links (which detaches the programs) and maps.
pub fn detach(pin_dir: &Path) -> anyhow::Result<()> {
    ensure_root()?;
    if !pin_dir.exists() {
        info!(pin_dir = %pin_dir.display(), "nothing pinned; nothing to detach");
        return Ok(());
    }
    for (_, link) in names::PROGRAMS.iter().chain([&names::SOCKOPS]) {
        remove_pin(&pin_dir.join(link))?;
    }
    for map in &MAPS {
        remove_pin(&pin_dir.join(map.name))?;
    }
    match fs::remove_dir(pin_dir) {
        Ok(()) => info!(pin_dir = %pin_dir.display(), "detached and removed pins"),
        Err(e) => warn!(pin_dir = %pin_dir.display(), error = %e,
                        "detached; pin dir left in place (it holds other files)"),
    }
    Ok(())
}

fn remove_pin(path: &Path) -> anyhow::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// CONFIG_HZ of the running kernel, from /proc/config.gz or
/// /boot/config-<release>; 0 if neither says.
pub fn kernel_hz() -> u32 {
    kernel_config()
        .and_then(|config| parse_hz(&config))
        .unwrap_or(0)
}

/// One option of the running kernel's config (`y`, `m`, a number), if
/// the config can be read and sets it.
pub fn kernel_option(config: &str, name: &str) -> Option<String> {
    config.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix('='))
            .map(|v| v.trim().to_owned())
    })
}

/// The running kernel's config, from /proc/config.gz or
/// /boot/config-<release>.
pub fn kernel_config() -> Option<String> {
    use std::io::Read as _;
    let from_gz = || -> Option<String> {
        let f = fs::File::open("/proc/config.gz").ok()?;
        let mut s = String::new();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut s)
            .ok()?;
        Some(s)
    };
    let from_boot = || -> Option<String> {
        let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        fs::read_to_string(format!("/boot/config-{}", release.trim())).ok()
    };
    from_gz().or_else(from_boot)
}

fn parse_hz(config: &str) -> Option<u32> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_HZ="))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_programs_maps_are_the_table_in_discovery_common() {
        if PROGRAMS.is_empty() {
            eprintln!("stub build without programs: nothing to compare");
            return;
        }
        let obj = aya_obj::Object::parse(PROGRAMS).expect("parse the embedded object");
        for spec in &MAPS {
            let m = obj
                .maps
                .get(spec.name)
                .unwrap_or_else(|| panic!("the programs have no map {}", spec.name));
            assert_eq!(
                (m.key_size(), m.value_size()),
                (spec.key_size, spec.value_size),
                "{}: key/value sizes",
                spec.name
            );
            assert_eq!(
                m.max_entries(),
                spec.size.default_entries(),
                "{}: entries",
                spec.name
            );
        }
        let ours: Vec<&String> = obj.maps.keys().filter(|n| n.starts_with("disc_")).collect();
        assert_eq!(ours.len(), MAPS.len(), "maps not in the table: {ours:?}");
    }

    #[test]
    fn finds_cgroup2_mount() {
        let mounts = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount_in(mounts),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount_in("tmpfs /tmp tmpfs rw 0 0\n"), None);
    }

    #[test]
    fn reads_hz_from_a_kernel_config() {
        let config = "# CONFIG_HZ_100 is not set\nCONFIG_HZ_250=y\nCONFIG_HZ=250\n";
        assert_eq!(parse_hz(config), Some(250));
        assert_eq!(parse_hz("CONFIG_HZ_1000=y\n"), None);
    }
}

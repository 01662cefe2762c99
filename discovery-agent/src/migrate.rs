//! Pinned maps of another layout or size, carried over with no gap.
//!
//! A new agent whose maps differ from the pinned ones (a field added by an
//! upgrade or dropped by a downgrade, `--max-services`/`--max-backends`
//! changed) builds the new maps in `<pin dir>/migrating/`, copies every
//! entry into them, loads its programs against them, swaps each program
//! under its existing link (`BPF_LINK_UPDATE`, one atomic call per link)
//! and renames the new pins over the old ones (`rename(2)` on bpffs, atomic
//! per map). The old maps go when their last program does.
//!
//! The layout contract that makes this possible, kept by
//! `discovery-common`: a map's key never changes, and its value only gains
//! fields at the end (zero meaning "unset") or loses its last ones. So an
//! entry converts by zero-extending or truncating its value; a map whose
//! key or kind differs is refused, naming the map and both layouts.
//!
//! A journal makes a crash safe: `<pin dir>/migration-swapping` (a
//! directory: bpffs holds no regular files) is made before the first link
//! is touched and renamed to `migration-swapped` after the last one. The next start resumes a `swapping` migration on the maps in
//! `migrating/` (some links may already run programs that use them) and
//! finishes the renames of a `swapped` one; without a journal, a
//! `migrating/` directory is an interrupted copy and is started over. The
//! old maps keep serving until the swap, so a failed copy (a map too small
//! for what it holds) leaves everything as it was.
//!
//! What cannot be carried: the socket storage (`disc_revnat`) is per
//! socket and cannot be listed, so when its layout changes the new map
//! starts empty, and sockets opened before the swap lose their reverse NAT
//! (UDP replies from the backend's address, getpeername the backend's).
//! What the programs write between the copy and the swap (milliseconds,
//! up to about a second for the largest maps: counters, live counts,
//! ejection marks, UDP tracking entries) stays in the old maps.
use std::{
    fs, io,
    os::fd::{AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::maps::MapData;
use discovery_common::{MAPS, MapKind, MapSpec};

/// Staging directory for the new maps, inside the pin dir.
pub const STAGING: &str = "migrating";
/// The journal, inside the pin dir.
pub const JOURNAL: &str = "migration";

/// The bpf(2) syscall with one attribute struct.
///
/// # Safety
/// `attr` must be the attribute layout the kernel expects for `cmd`, and
/// any pointers in it valid for the call.
pub unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: upheld by the caller.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A map's shape as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries",
            self.map_type, self.key_size, self.value_size, self.max_entries
        )
    }
}

fn shape_of(d: &MapData) -> anyhow::Result<Shape> {
    let i = d.info()?;
    Ok(Shape {
        map_type: i.map_type()? as u32,
        key_size: i.key_size(),
        value_size: i.value_size(),
        max_entries: i.max_entries(),
    })
}

/// What to do with one pinned map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Reuse it as it is.
    Keep,
    /// Build a new one and copy every entry, converted.
    Copy { from: Shape },
    /// Build a new, empty one (socket storage of another layout).
    Fresh { from: Shape },
}

/// The plan for the pinned maps against this build's `want` sizes:
/// (map name, step). Maps not pinned yet are simply created by the load.
pub fn plan(
    pin_dir: &Path,
    want: impl Fn(&MapSpec) -> u32,
) -> anyhow::Result<Vec<(&'static str, Step)>> {
    let mut out = Vec::new();
    for spec in &MAPS {
        let path = pin_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let d = MapData::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let from = shape_of(&d).with_context(|| format!("reading map {}", path.display()))?;
        let entries = match spec.kind {
            MapKind::SkStorage => from.max_entries,
            _ => want(spec),
        };
        let this = format!(
            "key {} B, value {} B, {} entries",
            spec.key_size, spec.value_size, entries
        );
        if from.key_size != spec.key_size || !same_kind(from.map_type, spec.kind) {
            bail!(
                "pinned map {} ({from}) cannot be migrated to this build's layout ({this}, \
                 kind {:?}): its key or kind changed. Run `discovery-agent detach --pin-dir {}` \
                 and start again (frontends refuse connections until then)",
                path.display(),
                spec.kind,
                pin_dir.display()
            );
        }
        let step = if from.value_size == spec.value_size && from.max_entries == entries {
            Step::Keep
        } else if spec.kind == MapKind::SkStorage {
            Step::Fresh { from }
        } else {
            Step::Copy { from }
        };
        out.push((spec.name, step));
    }
    Ok(out)
}

/// BPF_MAP_TYPE_* of a kind.
fn same_kind(map_type: u32, kind: MapKind) -> bool {
    const HASH: u32 = 1;
    const ARRAY: u32 = 2;
    const PERCPU_ARRAY: u32 = 6;
    const LRU_HASH: u32 = 9;
    const SK_STORAGE: u32 = 24;
    map_type
        == match kind {
            MapKind::Hash => HASH,
            MapKind::Array => ARRAY,
            MapKind::PerCpuArray => PERCPU_ARRAY,
            MapKind::LruHash => LRU_HASH,
            MapKind::SkStorage => SK_STORAGE,
        }
}

/// The journal's states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journal {
    /// No migration in progress.
    None,
    /// Links may run programs on the staging maps.
    Swapping,
    /// Every link runs them; the pins are being renamed.
    Swapped,
}

impl Journal {
    /// bpffs holds no regular files, so the state is a directory's name.
    fn dir(pin_dir: &Path, state: &str) -> PathBuf {
        pin_dir.join(format!("{JOURNAL}-{state}"))
    }

    pub fn read(pin_dir: &Path) -> anyhow::Result<Self> {
        Ok(if Self::dir(pin_dir, "swapped").exists() {
            Journal::Swapped
        } else if Self::dir(pin_dir, "swapping").exists() {
            Journal::Swapping
        } else {
            Journal::None
        })
    }

    /// The maps an interrupted migration was moving (one empty directory
    /// per map inside the journal's), sorted.
    pub fn maps(pin_dir: &Path) -> anyhow::Result<Vec<String>> {
        let dir = [
            Self::dir(pin_dir, "swapped"),
            Self::dir(pin_dir, "swapping"),
        ]
        .into_iter()
        .find(|d| d.exists());
        let Some(dir) = dir else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Starts a swap of `maps`: the journal records them, so a resumed
    /// start can tell whether it would move the same ones.
    pub fn start(pin_dir: &Path, maps: &[&str]) -> anyhow::Result<()> {
        let tmp = Self::dir(pin_dir, "starting");
        let _ = fs::remove_dir_all(&tmp);
        for m in maps {
            fs::create_dir_all(tmp.join(m))
                .with_context(|| format!("migration journal {}", tmp.display()))?;
        }
        let to = Self::dir(pin_dir, "swapping");
        fs::rename(&tmp, &to).with_context(|| format!("migration journal {}", to.display()))
    }

    /// Moves to the state atomically: a directory created, renamed to the
    /// next state, removed.
    pub fn write(self, pin_dir: &Path) -> anyhow::Result<()> {
        let (swapping, swapped) = (
            Self::dir(pin_dir, "swapping"),
            Self::dir(pin_dir, "swapped"),
        );
        let ctx = |p: &Path| format!("migration journal {}", p.display());
        match self {
            Journal::Swapping => fs::create_dir_all(&swapping).with_context(|| ctx(&swapping)),
            Journal::Swapped => {
                if swapping.exists() {
                    fs::rename(&swapping, &swapped).with_context(|| ctx(&swapped))
                } else {
                    fs::create_dir_all(&swapped).with_context(|| ctx(&swapped))
                }
            }
            Journal::None => {
                for d in [&swapped, &swapping] {
                    match fs::remove_dir_all(d) {
                        Err(e) if e.kind() != io::ErrorKind::NotFound => {
                            return Err(e).with_context(|| ctx(d));
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        }
    }
}

/// The staging directory of `pin_dir`.
pub fn staging(pin_dir: &Path) -> PathBuf {
    pin_dir.join(STAGING)
}

/// Renames every staging pin over its main pin, then removes the staging
/// directory and the journal: the last step, idempotent.
pub fn commit(pin_dir: &Path) -> anyhow::Result<()> {
    let dir = staging(pin_dir);
    if dir.exists() {
        for spec in &MAPS {
            let from = dir.join(spec.name);
            if from.exists() {
                let to = pin_dir.join(spec.name);
                fs::rename(&from, &to).with_context(|| {
                    format!("renaming {} over {}", from.display(), to.display())
                })?;
            }
        }
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Journal::None.write(pin_dir)
}

/// Removes the staging maps of an interrupted copy (no link uses them).
pub fn abandon(pin_dir: &Path) -> anyhow::Result<()> {
    let dir = staging(pin_dir);
    match fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    /// value, or next_key for BPF_MAP_GET_NEXT_KEY.
    value: u64,
    flags: u64,
}

fn elem(fd: BorrowedFd<'_>, key: &[u8], value: *mut u8) -> ElemAttr {
    ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        pad: 0,
        key: key.as_ptr() as u64,
        value: value as u64,
        flags: 0,
    }
}

/// Bytes one lookup returns: per-CPU maps give one 8-byte-aligned value
/// per possible CPU.
fn value_bytes(kind: MapKind, value_size: u32, cpus: usize) -> usize {
    match kind {
        MapKind::PerCpuArray => (value_size as usize).div_ceil(8) * 8 * cpus,
        _ => value_size as usize,
    }
}

/// `old` (one value, or per-CPU values of `from` bytes each, 8-aligned)
/// as values of `to` bytes: zero-extended or truncated (the layout
/// contract: fields are only appended or dropped at the end).
pub fn convert(old: &[u8], kind: MapKind, from: u32, to: u32, cpus: usize) -> Vec<u8> {
    let (from, to) = (from as usize, to as usize);
    let (stride_from, stride_to, n) = match kind {
        MapKind::PerCpuArray => (from.div_ceil(8) * 8, to.div_ceil(8) * 8, cpus),
        _ => (from, to, 1),
    };
    let mut out = vec![0u8; stride_to * n];
    for c in 0..n {
        let src = &old[c * stride_from..c * stride_from + from];
        let len = from.min(to);
        out[c * stride_to..c * stride_to + len].copy_from_slice(&src[..len]);
    }
    out
}

/// Copies every entry of `old` into `new` (a map of `spec`'s layout),
/// converting values. An array's entries past the new size must be empty;
/// a hash map that does not fit fails with the map's name. Returns the
/// entries copied.
pub fn copy(
    spec: &MapSpec,
    old: BorrowedFd<'_>,
    from: Shape,
    new: BorrowedFd<'_>,
    new_entries: u32,
    cpus: usize,
) -> anyhow::Result<usize> {
    let name = spec.name;
    let ks = from.key_size as usize;
    let old_len = value_bytes(spec.kind, from.value_size, cpus);
    let mut value = vec![0u8; old_len];
    let mut copied = 0;
    let mut put = |key: &[u8], value: &[u8]| -> anyhow::Result<()> {
        let mut v = convert(value, spec.kind, from.value_size, spec.value_size, cpus);
        let attr = elem(new, key, v.as_mut_ptr());
        // SAFETY: key and value buffers of the new map's sizes, live for
        // the call.
        unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &attr) }.with_context(|| {
            format!(
                "copying an entry into the new map {name} ({new_entries} entries): raise its \
                 size or free entries first; the pinned maps are left as they were"
            )
        })?;
        copied += 1;
        Ok(())
    };
    match spec.kind {
        MapKind::Array | MapKind::PerCpuArray => {
            for i in 0..from.max_entries {
                let key = i.to_ne_bytes();
                let attr = elem(old, &key, value.as_mut_ptr());
                // SAFETY: a 4-byte key and a value buffer of the lookup's size.
                unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr) }
                    .with_context(|| format!("reading entry {i} of map {name}"))?;
                if value.iter().all(|b| *b == 0) {
                    continue;
                }
                if i >= new_entries && spec.kind == MapKind::PerCpuArray {
                    // Counters of an id past the new size: no service or
                    // backend can hold that id any more (their own maps
                    // would have refused), so they are a freed id's.
                    continue;
                }
                if i >= new_entries {
                    bail!(
                        "map {name}: entry {i} is in use, past the new size of {new_entries} \
                         entries; raise the size (the pinned maps are left as they were)"
                    );
                }
                put(&key, &value)?;
            }
        }
        MapKind::Hash | MapKind::LruHash => {
            let mut key: Option<Vec<u8>> = None;
            let mut next = vec![0u8; ks];
            loop {
                let cur = key.clone().unwrap_or_default();
                let attr = ElemAttr {
                    map_fd: old.as_raw_fd() as u32,
                    pad: 0,
                    key: if key.is_some() {
                        cur.as_ptr() as u64
                    } else {
                        0
                    },
                    value: next.as_mut_ptr() as u64,
                    flags: 0,
                };
                // SAFETY: key (or null for the first) and next_key buffers
                // of the key size.
                match unsafe { sys_bpf(BPF_MAP_GET_NEXT_KEY, &attr) } {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                    Err(e) => return Err(e).with_context(|| format!("listing map {name}")),
                }
                let attr = elem(old, &next, value.as_mut_ptr());
                // SAFETY: as above.
                match unsafe { sys_bpf(BPF_MAP_LOOKUP_ELEM, &attr) } {
                    Ok(_) => put(&next, &value)?,
                    // Deleted meanwhile (an LRU eviction, a program).
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => return Err(e).with_context(|| format!("reading map {name}")),
                }
                key = Some(next.clone());
            }
        }
        MapKind::SkStorage => {}
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_zero_extended_or_truncated() {
        assert_eq!(convert(&[1, 2], MapKind::Hash, 2, 4, 1), [1, 2, 0, 0]);
        assert_eq!(convert(&[1, 2, 3, 4], MapKind::Hash, 4, 2, 1), [1, 2]);
        // Per CPU: 8-byte strides, each value converted.
        let old = [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        let new = convert(&old, MapKind::PerCpuArray, 8, 12, 2);
        assert_eq!(new.len(), 32);
        assert_eq!((new[0], new[16]), (1, 2));
        assert!(new[8..16].iter().all(|b| *b == 0));
    }

    #[test]
    fn the_journal_round_trips() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(Journal::read(d.path()).unwrap(), Journal::None);
        Journal::start(d.path(), &["disc_b", "disc_a"]).unwrap();
        assert_eq!(Journal::read(d.path()).unwrap(), Journal::Swapping);
        assert_eq!(Journal::maps(d.path()).unwrap(), ["disc_a", "disc_b"]);
        Journal::Swapped.write(d.path()).unwrap();
        assert_eq!(Journal::read(d.path()).unwrap(), Journal::Swapped);
        assert_eq!(Journal::maps(d.path()).unwrap(), ["disc_a", "disc_b"]);
        Journal::None.write(d.path()).unwrap();
        assert_eq!(Journal::read(d.path()).unwrap(), Journal::None);
    }
}

//! State that outlives the gateway process: maps and program links pinned in a bpffs
//! directory.
//!
//! Layout under the pin directory (`/sys/fs/bpf/causeway` on a gateway node,
//! `/sys/fs/bpf/causeway-services` for the socket programs on any node):
//! - `maps/<MAP>`: every map the object pins (the gateway's `maps::ALL`, the socket
//!   programs' `service_maps::ALL`), found again and reused by the next load;
//! - `links/<program>@<interface>` (`@cgroup<inode>` for the socket programs): the links that
//!   keep the programs attached while no process holds them. A new process swaps its program
//!   into the same TCX/XDP link (`BPF_LINK_UPDATE`), so the interface is never without one; a
//!   cgroup link is replaced by attaching the new one before unpinning the old.
//!
//! A pinned map whose kernel definition no longer matches this build's (an upgrade changed
//! its layout) is unpinned and recreated empty rather than reused: the gateway refills it
//! from the records, which is slower than reuse but never misreads old bytes.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("pin directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("mounting a bpffs on {path}: {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("reading the eBPF object's map definitions: {0}")]
    Object(String),
}

/// A pin directory on a bpffs.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

impl PinDir {
    /// Makes `root` a usable pin directory: creates it, and mounts a bpffs where there is
    /// none (the standard `/sys/fs/bpf` when it is missing, else `root` itself).
    pub fn prepare(root: &Path) -> Result<Self, PinError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PinError::Io { path, source }
        };
        if !root.exists() {
            // The deepest existing ancestor decides: inside a bpffs, directories are made
            // there; elsewhere (sysfs's empty /sys/fs/bpf, a tmpfs) a bpffs is mounted first.
            let mut base = root.to_path_buf();
            while !base.exists() {
                if !base.pop() {
                    break;
                }
            }
            if !is_bpffs(&base)? {
                if base == Path::new("/sys/fs/bpf") {
                    mount_bpffs(&base)?;
                } else {
                    std::fs::create_dir_all(root).map_err(io_err(root))?;
                }
            }
            std::fs::create_dir_all(root).map_err(io_err(root))?;
        }
        if !is_bpffs(root)? {
            mount_bpffs(root)?;
        }
        for sub in ["maps", "links"] {
            let p = root.join(sub);
            std::fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The pin directory at `root`, as it is (for removing it).
    #[must_use]
    pub fn at(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.root.join("maps").join(name)
    }

    #[must_use]
    pub fn link(&self, program: &str, interface: &str) -> PathBuf {
        self.root.join("links").join(format!("{program}@{interface}"))
    }

    /// Unpins every map of `names` whose pinned definition differs from `object`'s (type, key
    /// and value size, capacity, flags), so that the loader creates it afresh. Returns the
    /// names kept.
    pub fn drop_incompatible_maps(
        &self,
        object: &[u8],
        names: &[&'static str],
    ) -> Result<Vec<&'static str>, PinError> {
        let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Object(e.to_string()))?;
        let mut kept = Vec::new();
        for &name in names {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let want = obj.maps.get(name).ok_or_else(|| PinError::Object(format!("no map {name}")))?;
            let verdict = match MapInfo::from_pin(&path) {
                Ok(have) => {
                    let same = have.map_type().is_ok_and(|t| t as u32 == want.map_type())
                        && have.key_size() == want.key_size()
                        && have.value_size() == want.value_size()
                        && have.max_entries() == want.max_entries()
                        && have.map_flags() == want.map_flags();
                    if same {
                        Ok(())
                    } else {
                        Err(format!(
                            "pinned key {} value {} entries {} flags {:#x}, this build wants key {} value {} entries {} flags {:#x}",
                            have.key_size(),
                            have.value_size(),
                            have.max_entries(),
                            have.map_flags(),
                            want.key_size(),
                            want.value_size(),
                            want.max_entries(),
                            want.map_flags(),
                        ))
                    }
                }
                Err(e) => Err(e.to_string()),
            };
            match verdict {
                Ok(()) => kept.push(name),
                Err(why) => {
                    warn!(map = name, %why, "pinned map does not fit this build; starting it empty");
                    std::fs::remove_file(&path).map_err(|source| PinError::Io { path, source })?;
                }
            }
        }
        if !kept.is_empty() {
            info!(maps = kept.len(), dir = %self.root.display(), "reusing pinned maps");
        }
        Ok(kept)
    }

    /// Removes every pin (maps and links): programs detach, maps are freed once no program
    /// uses them. Absent is success.
    pub fn remove(&self) -> Result<(), PinError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PinError::Io { path, source }
        };
        for sub in ["maps", "links"] {
            let dir = self.root.join(sub);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            for entry in entries {
                let path = entry.map_err(io_err(&dir))?.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
            }
            std::fs::remove_dir(&dir).map_err(io_err(&dir))?;
        }
        match std::fs::remove_dir(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // A bpffs mounted on the directory itself: empty now, the mount point stays.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(()),
            Err(source) => Err(PinError::Io { path: self.root.clone(), source }),
        }
    }
}

fn is_bpffs(path: &Path) -> Result<bool, PinError> {
    let st = nix::sys::statfs::statfs(path)
        .map_err(|e| PinError::Io { path: path.to_path_buf(), source: e.into() })?;
    Ok(st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
}

fn mount_bpffs(path: &Path) -> Result<(), PinError> {
    warn!(
        path = %path.display(),
        "no bpffs here; mounting one (state survives restarts only if this mount outlives the process: \
         on a node, mount the host's /sys/fs/bpf)"
    );
    nix::mount::mount(Some("bpffs"), path, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
        .map_err(|source| PinError::Mount { path: path.to_path_buf(), source })
}

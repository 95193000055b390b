//! Attaching programs: through links this value owns, or, with a pin directory, through
//! pinned links into which a restart swaps its programs atomically.

use std::path::{Path, PathBuf};

use aya::programs::{
    SchedClassifier, TcAttachType,
    links::{FdLink, LinkError, PinnedLink},
    tc::SchedClassifierLink,
};
use tracing::{info, warn};

use crate::{Datapath, DatapathError, PinDir, PinError};

impl Datapath {
    /// Unpins every pinned link this value did not attach (or re-attach): what an earlier run
    /// attached to an interface this one no longer serves is detached.
    pub fn prune_links(&mut self) -> Result<Vec<String>, DatapathError> {
        let Some(pins) = &self.pins else { return Ok(Vec::new()) };
        prune_pinned_links(pins, &self.attached)
    }

    /// Attaches TC program `name` to `ifname`: through a link this value owns, or with a pin
    /// directory through the pinned link, into which a program left by an earlier run is
    /// atomically replaced.
    pub(crate) fn attach_tc(
        &mut self,
        name: &'static str,
        ifname: &str,
        dir: TcAttachType,
    ) -> Result<(), DatapathError> {
        let pin = self.pins.as_ref().map(|p| p.link(name, ifname));
        let prog = self.tunnel_program(name)?;
        let perr = |source| DatapathError::Program { name, source };
        let Some(path) = pin else {
            prog.attach(ifname, dir).map_err(perr)?;
            info!(program = name, interface = ifname, direction = ?dir, "attached");
            return Ok(());
        };
        if let Some(link) = pinned_link(name, &path)? {
            match SchedClassifierLink::try_from(link) {
                Ok(link) => match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The pin holds the link; our copy of its fd may close.
                        drop(prog.take_link(id).map_err(perr)?);
                        info!(program = name, interface = ifname, direction = ?dir, "replaced the program in its pinned link");
                        self.attached.push(path);
                        return Ok(());
                    }
                    // ENOLINK: the interface it was attached to is gone.
                    Err(e) => warn!(program = name, error = %e, "pinned link is defunct; attaching afresh"),
                },
                Err(e) => {
                    warn!(program = name, error = %e, "pinned object is not a TC link; attaching afresh")
                }
            }
            unpin_stale(name, &path)?;
        }
        let id = prog.attach(ifname, dir).map_err(perr)?;
        let link = FdLink::try_from(prog.take_link(id).map_err(perr)?).map_err(link_err(name, &path))?;
        pin_link(name, link, &path)?;
        info!(program = name, interface = ifname, direction = ?dir, pinned = %path.display(), "attached");
        self.attached.push(path);
        Ok(())
    }

    /// A TC program, loaded into the kernel if it is not yet.
    pub(crate) fn tunnel_program(
        &mut self,
        name: &'static str,
    ) -> Result<&mut SchedClassifier, DatapathError> {
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(name)
            .ok_or(DatapathError::Missing { what: "program", name })?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        if prog.fd().is_err() {
            prog.load().map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(prog)
    }
}

/// Unpins every link under `pins` but `keep` (what an earlier run attached and this one no
/// longer does); returns their names.
pub(crate) fn prune_pinned_links(pins: &PinDir, keep: &[PathBuf]) -> Result<Vec<String>, DatapathError> {
    let dir = pins.root().join("links");
    let mut removed = Vec::new();
    let entries = std::fs::read_dir(&dir).map_err(|e| PinError::Io { path: dir.clone(), source: e })?;
    for entry in entries.flatten() {
        let path = entry.path();
        if !keep.contains(&path) {
            std::fs::remove_file(&path).map_err(|e| PinError::Io { path: path.clone(), source: e })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            info!(link = %name, "detached a program an earlier run attached");
            removed.push(name);
        }
    }
    Ok(removed)
}

/// The link pinned at `path`, if there is one.
pub(crate) fn pinned_link(name: &'static str, path: &Path) -> Result<Option<FdLink>, DatapathError> {
    if !path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(path) {
        Ok(p) => Ok(Some(FdLink::from(p))),
        Err(e) => {
            warn!(program = name, path = %path.display(), error = %e, "unreadable pinned link");
            unpin_stale(name, path)?;
            Ok(None)
        }
    }
}

pub(crate) fn unpin_stale(name: &'static str, path: &Path) -> Result<(), DatapathError> {
    std::fs::remove_file(path).map_err(|e| DatapathError::Link {
        name,
        path: path.display().to_string(),
        reason: format!("removing the stale pin: {e}"),
    })
}

pub(crate) fn pin_link(name: &'static str, link: FdLink, path: &Path) -> Result<(), DatapathError> {
    // Dropping the returned PinnedLink closes our fd; the pin keeps the link alive.
    link.pin(path).map(drop).map_err(|e| DatapathError::Link {
        name,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn link_err(name: &'static str, path: &Path) -> impl FnOnce(LinkError) -> DatapathError {
    let path = path.display().to_string();
    move |e| DatapathError::Link { name, path, reason: e.to_string() }
}

//! What each driver does to the guest: mount(2) a virtio-fs tag or a
//! tmpfs, bind a path, or create a directory; and the unmount when the
//! last user has gone. Targets and bind sources are pinned (`roots.rs`)
//! and mounted through their `/proc/self/fd` path.

use std::fs::{self, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::fs_group;
use super::request::{Driver, Plan, Source};
use super::roots::Kind;
use crate::error::{Error, Result};

/// What releasing a storage has to undo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Made {
    /// A mount at this real path.
    Mount(PathBuf),
    /// A directory, left in place: it holds the volume's data, which goes
    /// with the pod's directory (as in Kata).
    Directory,
}

/// Carries out `plan`. On an error nothing of it stays mounted.
pub fn create(plan: &Plan) -> Result<Made> {
    let field = &plan.target.field;
    if plan.driver == Driver::Local {
        let dir = plan.target.pin(Kind::Directory)?;
        let path = dir.proc_path();
        if let Some(gid) = plan.fsgid {
            std::os::unix::fs::chown(&path, None, Some(gid))
                .map_err(|e| Error::internal(format!("{field}: fsgid={gid}"), e))?;
        }
        if let Some(mode) = plan.mode {
            // As Kata: with an fsgid, new files inherit the group.
            let mode = if plan.fsgid.is_some() {
                mode | 0o2000
            } else {
                mode
            };
            fs::set_permissions(&path, Permissions::from_mode(mode))
                .map_err(|e| Error::internal(format!("{field}: mode {mode:o}"), e))?;
        }
        if let Some(g) = plan.fs_group {
            fs_group::apply(&dir.real, g, false)?;
        }
        return Ok(Made::Directory);
    }

    let source = match &plan.source {
        Source::Path(p) => Some(p.pin(Kind::Existing)?),
        _ => None,
    };
    let kind = match &source {
        Some(s) if !s.is_dir => Kind::File,
        _ => Kind::Directory,
    };
    let target = plan.target.pin(kind)?;
    let real = target.real.clone();
    let (from, fstype, first_flags, data): (PathBuf, Option<&str>, MsFlags, Option<&str>) =
        match (&plan.source, &source) {
            (_, Some(s)) => (
                s.proc_path(),
                None,
                plan.flags & (MsFlags::MS_BIND | MsFlags::MS_REC),
                None,
            ),
            (Source::Name(name), None) => (
                PathBuf::from(name),
                Some(plan.fstype),
                plan.flags,
                (!plan.data.is_empty()).then_some(plan.data.as_str()),
            ),
            (_, None) => {
                return Err(Error::Internal(format!(
                    "{field}: the {} driver has no source",
                    plan.driver
                )))
            }
        };
    tracing::info!(driver = %plan.driver, mount_point = %real.display(), fstype = plan.fstype, options = %plan.data, "mounting storage");
    mount(Some(&from), &target.proc_path(), fstype, first_flags, data).map_err(|e| {
        Error::Internal(format!(
            "{field}: mounting {} ({}) on {}: {e}",
            from.display(),
            plan.fstype,
            real.display()
        ))
    })?;
    let made = Made::Mount(real);
    if let Err(e) = finish(plan, &made) {
        remove(&made);
        return Err(e);
    }
    Ok(made)
}

/// Everything after the first mount(2): a bind's flags, propagation, the
/// volume's group. Works on the mount itself, pinned again now that it is
/// there (the first pin names the directory below it).
fn finish(plan: &Plan, made: &Made) -> Result<()> {
    let field = &plan.target.field;
    let rest = plan.flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
    let bind_flags = plan.driver == Driver::Bind && !rest.is_empty();
    if bind_flags || !plan.propagation.is_empty() {
        let pinned = plan.target.pin(Kind::Existing)?;
        let mounted = pinned.proc_path();
        let none: Option<&str> = None;
        if bind_flags {
            mount(
                none,
                &mounted,
                none,
                rest | MsFlags::MS_REMOUNT | MsFlags::MS_BIND,
                none,
            )
            .map_err(|e| Error::Internal(format!("{field}: applying {rest:?}: {e}")))?;
        }
        if !plan.propagation.is_empty() {
            mount(none, &mounted, none, plan.propagation, none).map_err(|e| {
                Error::Internal(format!("{field}: propagation {:?}: {e}", plan.propagation))
            })?;
        }
    }
    let Made::Mount(real) = made else {
        return Ok(());
    };
    if let Some(gid) = plan.fsgid {
        fs_group::set_root_group(real, gid)?;
    }
    if let Some(g) = plan.fs_group {
        fs_group::apply(real, g, plan.read_only())?;
    }
    Ok(())
}

/// Undoes what [`create`] made. A busy mount is detached: a process that
/// still has it open keeps it, nobody new finds it. Failures are logged:
/// the storage is gone from the agent's table either way.
pub fn remove(made: &Made) {
    let Made::Mount(path) = made else {
        return;
    };
    match unmount(path, MntFlags::empty()) {
        Err(Errno::EBUSY) => {
            tracing::warn!(mount_point = %path.display(), "storage busy: detaching it");
            if let Err(e) = unmount(path, MntFlags::MNT_DETACH) {
                tracing::warn!(mount_point = %path.display(), error = %e, "detaching storage");
            }
        }
        Err(e) => tracing::warn!(mount_point = %path.display(), error = %e, "unmounting storage"),
        Ok(()) => tracing::info!(mount_point = %path.display(), "storage unmounted"),
    }
}

fn unmount(path: &Path, flags: MntFlags) -> nix::Result<()> {
    umount2(path, flags | MntFlags::UMOUNT_NOFOLLOW)
}

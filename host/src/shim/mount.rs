//! A container's rootfs mounted on the host from containerd's snapshot
//! mounts (`<bundle>/rootfs`), held by a guard that unmounts it when the
//! container ends: after a successful teardown, or when a failed create
//! drops the half-made container.

use std::path::{Path, PathBuf};

/// One mount that makes up the rootfs, as containerd describes it.
#[derive(Debug, Clone, Default)]
pub struct RootfsMount {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("mounting the rootfs ({fs_type} {source_path}) at {}: {reason}", target.display())]
pub struct MountError {
    pub fs_type: String,
    pub source_path: String,
    pub target: PathBuf,
    pub reason: String,
}

/// The mounted rootfs; unmounted on drop.
#[derive(Debug)]
pub struct MountedRootfs {
    target: PathBuf,
    layers: usize,
}

impl MountedRootfs {
    /// Mounts `mounts` at `target`, in order; on failure nothing stays
    /// mounted.
    pub fn mount(mounts: &[RootfsMount], target: &Path) -> Result<MountedRootfs, MountError> {
        let mut mounted = MountedRootfs {
            target: target.to_path_buf(),
            layers: 0,
        };
        let fail = |m: &RootfsMount, reason: String| MountError {
            fs_type: m.fs_type.clone(),
            source_path: m.source.clone(),
            target: target.to_path_buf(),
            reason,
        };
        for m in mounts {
            if let Err(e) = std::fs::create_dir_all(target) {
                return Err(fail(m, format!("creating the mount point: {e}")));
            }
            containerd_shim::mount::mount_rootfs(
                Some(m.fs_type.as_str()),
                Some(m.source.as_str()),
                &m.options,
                target,
            )
            .map_err(|e| fail(m, e.to_string()))?;
            mounted.layers += 1;
        }
        Ok(mounted)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for MountedRootfs {
    fn drop(&mut self) {
        for _ in 0..self.layers {
            if let Err(e) = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::warn!(target = %self.target.display(), error = %e, "unmounting the rootfs");
                return;
            }
        }
    }
}

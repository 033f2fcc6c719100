//! The builtin VMM's virtio-fs device: a host directory the guest mounts
//! with `mount -t virtiofs TAG DIR`, its FUSE requests served by a
//! vhost-user-fs backend (virtiofsd) that the caller started
//! (`--fs socket=PATH,tag=TAG`).
//!
//! The VMM only plumbs: it offers the device to the guest over
//! virtio-mmio, and hands the backend the guest's memory (a memfd, see
//! [`crate::vm::boot::guest_memory`]) and rings; the backend reads and
//! answers the requests itself. Pieces, one file each:
//! - [`config`]: the `--fs` option and the config space (tag, number of
//!   request queues),
//! - [`frontend`]: the vhost-user messages and their order,
//! - [`device`]: the [`VirtioDevice`](super::VirtioDevice) and its thread,
//!   which turns the backend's call events into interrupts.
//!
//! Written against the `vhost` crate's frontend, after Cloud Hypervisor's
//! `virtio-devices/src/vhost_user/fs.rs`; no DAX window (the guest kernel
//! has no FUSE_DAX) and no reconnection: a backend that goes away takes
//! the guest's file system with it, and the launcher ends the sandbox.

pub mod config;
pub mod device;
pub mod frontend;
#[cfg(test)]
pub(crate) mod tests;

pub use config::{FsConfig, FsConfigError};
pub use device::FsDevice;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Frontend(#[from] frontend::Error),
    #[error("setting up the virtio-fs device: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Thread(#[from] crate::seccomp::Error),
}

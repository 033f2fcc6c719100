//! The guest agent's pieces, as a library: the `kestrel-agent` binary
//! (`main.rs`) is a thin `main` over them, and the fuzz targets in `fuzz/`
//! drive the same request handlers and parsers without a guest.
//!
//! - [`server`]: the ttrpc services, mapping every error to its wire code,
//! - [`unknown_service`]: UNIMPLEMENTED for services the server lacks,
//! - [`sandbox`]: the containers and processes of this guest,
//! - [`container`]: OCI spec -> namespaces, rootfs, cgroups, processes,
//! - [`copy_file`]: CopyFile into the shared directory,
//! - [`storage`]: Kata's storages (virtio-fs, local, ephemeral, bind),
//!   mounted once per mount point and counted,
//! - [`network`]: the guest's links, routes, neighbours, resolv.conf, hosts,
//! - [`init`], [`reaper`], [`stdio`]: PID 1 duties, exits, process I/O.

pub mod container;
pub mod copy_file;
pub mod error;
pub mod init;
pub mod network;
pub mod reaper;
pub mod sandbox;
pub mod server;
pub mod stdio;
pub mod storage;
pub mod unknown_service;

/// The agent's version, reported by Health.Version and GetGuestDetails.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The API flavour reported as `grpc_version` by Health.Version.
pub const API_VERSION: &str = "kata-agent-api/ttrpc";

//! The [`Hypervisor`](crate::Hypervisor) backends.

pub mod builtin;
mod child;
pub mod cloud_hypervisor;
pub mod process;
pub mod qemu;
pub mod select;

/// Every backend name the configuration may select, for error messages.
pub const NAMES: &[&str] = &["process", "builtin", "qemu", "cloud-hypervisor"];

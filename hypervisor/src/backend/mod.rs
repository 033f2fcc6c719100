//! The [`Hypervisor`](crate::Hypervisor) backends.

pub mod process;

/// Every backend name the configuration may select, for error messages.
pub const NAMES: &[&str] = &["process"];

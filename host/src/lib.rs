//! Kestrel's host runtime: reaching a Kestrel (or Kata) agent over any of
//! the transports a VMM offers ([`dial`], [`agent_client`]), sandboxes that
//! pair a hypervisor backend with that agent ([`sandbox`]), the lifecycle
//! registry that never loses a container mid-teardown ([`lifecycle`]), and
//! the containerd shim v2 built on them ([`shim`]).

pub mod agent_client;
pub mod config;
pub mod dial;
pub mod lifecycle;
pub mod oci;
pub mod rootfs;
pub mod sandbox;
pub mod shim;

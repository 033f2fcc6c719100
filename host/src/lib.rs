//! Kestrel's host runtime. For now: reaching a Kestrel (or Kata) agent over
//! any of the transports a VMM offers ([`dial`]) and asking it for its
//! health ([`agent_client`]). The sandbox, lifecycle tracking and the
//! containerd shim build on these.

pub mod agent_client;
pub mod dial;

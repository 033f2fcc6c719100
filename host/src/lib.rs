//! Kestrel's host runtime: reaching a Kestrel (or Kata) agent over any of
//! the transports a VMM offers ([`dial`], [`agent_client`]), sandboxes that
//! pair a hypervisor backend with that agent ([`sandbox`]), the lifecycle
//! registry that never loses a container mid-teardown ([`lifecycle`]), and
//! the containerd shim v2 built on them ([`shim`]), and the CNI networks
//! `kestrel run` attaches containers to ([`network`]).

pub mod agent_client;
pub mod config;
pub mod dial;
pub mod hooks;
pub mod lifecycle;
pub mod network;
pub mod oci;
pub mod pod;
pub mod rootfs;
pub mod sandbox;
pub mod shared_fs;
pub mod shim;

/// An error and each of its causes, `: `-separated, for a log line or a
/// wire message: every layer says only its own part, and a transparent
/// layer that repeats its cause's words is not repeated.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = e.source();
    }
    message
}

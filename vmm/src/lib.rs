//! kestrel-vmm: Kestrel's own minimal KVM VMM, built on rust-vmm crates.
//!
//! - [`vm`]: one KVM VM with an in-kernel irqchip and PIT, the x86_64 Linux
//!   boot protocol, an 8250 console, an i8042 whose reset ends the VM, and
//!   on virtio-mmio a virtio-vsock device and virtio-net devices on taps
//!   the caller opened (`--net`).
//! - [`vsock`]: the vsock device's core (muxer, connections, the
//!   Firecracker-style hybrid Unix socket), independent of any transport.
//! - [`vhost_user`]: the same core served to QEMU as a vhost-user vsock
//!   backend (`kestrel-vmm vhost-user-vsock`).
//! - [`seccomp`]: the per-thread seccomp filters both modes run under.
//!
//! The host runtime never links this crate: it starts the `kestrel-vmm`
//! binary through `kestrel-hypervisor`'s builtin and qemu backends.

pub mod seccomp;
pub mod vhost_user;
pub mod vm;
pub mod vsock;

/// Records that a unit test did not run and why, in the file
/// `KESTREL_SKIP_LOG` names, so `scripts/test.sh` counts and names it (the
/// `kestrel-tests` crate does the same for the end-to-end tests; this crate
/// cannot depend on it).
#[cfg(test)]
pub(crate) fn skip(test: &str, why: &str) {
    use std::io::Write;
    eprintln!("SKIP {test}: {why}");
    if let Some(log) = std::env::var_os("KESTREL_SKIP_LOG") {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .and_then(|mut f| f.write_all(format!("{test}\t{why}\n").as_bytes()))
            .expect("recording a skip in $KESTREL_SKIP_LOG");
    }
}

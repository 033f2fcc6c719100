//! Kestrel's VM layer.
//!
//! This crate will hold the builtin KVM VMM (`kestrel-vmm`), its
//! virtio-vsock device core, and the `Hypervisor` trait with its builtin,
//! QEMU, Cloud Hypervisor and process backends. Nothing is implemented yet:
//! the host-runtime and builtin-VMM issues fill it in. It is a workspace
//! member now so the layout in `shared/design.md` holds from the start.

//! Kestrel's guest image builder.
//!
//! This crate will build the guest kernel from Debian's `linux-source-6.1`
//! with the fragments under `configs/`, and a reproducible initramfs whose
//! `/init` is the static `kestrel-agent`. Nothing is implemented yet: the
//! guest-image issue fills it in. It is a workspace member now so the layout
//! in `shared/design.md` holds from the start.

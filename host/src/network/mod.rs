//! Container networking on the host: the network namespace a sandbox is
//! given ([`netns`]) and the CNI plugins that wire it up ([`cni`]), and
//! how a VM's guest reaches that namespace: taps ([`tap`]) mirrored to its
//! interfaces with tc ([`tcfilter`]).

pub mod cni;
pub mod netns;
pub mod tap;
pub mod tcfilter;

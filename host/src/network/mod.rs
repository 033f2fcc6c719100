//! Container networking on the host: the network namespace a sandbox is
//! given ([`netns`]) and the CNI plugins that wire it up ([`cni`]).

pub mod cni;
pub mod netns;

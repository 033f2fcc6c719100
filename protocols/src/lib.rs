//! The Kata agent API as Kestrel speaks it: protobuf messages and async ttrpc
//! clients and servers for `grpc.AgentService` and `grpc.Health`.
//!
//! The `.proto` files under `protos/` are ours, but every package, service,
//! method, message and field number in them matches Kata Containers'
//! `agent.proto`, `health.proto`, `oci.proto`, `types.proto` and `csi.proto`,
//! so a Kata runtime can drive the Kestrel agent and our host can drive a Kata
//! agent; `tests/kata_field_table.rs` holds them to a copy of Kata's numbers
//! (`tests/data/kata-fields.txt`). The code is generated at build time by
//! `build.rs`.
//!
//! The crate is also the one home of the other facts both sides of the
//! guest boundary must agree on: the agent's vsock port, the guest directory
//! the host copies files into, and the id rule ([`id`]).

macro_rules! generated {
    ($($name:ident),* $(,)?) => {
        $(
            #[allow(
                clippy::all,
                clippy::pedantic,
                missing_docs,
                non_camel_case_types,
                non_snake_case,
                non_upper_case_globals,
                unused_imports,
                unused_mut,
                unused_results,
                unsafe_op_in_unsafe_fn
            )]
            pub mod $name {
                include!(concat!(env!("OUT_DIR"), "/", stringify!($name), ".rs"));
            }
        )*
    };
}

generated!(agent, agent_ttrpc, csi, health, health_ttrpc, oci, types);

pub mod id;

/// The vsock port the agent listens on, as in Kata.
pub const AGENT_VSOCK_PORT: u32 = 1024;

/// The guest directory under which the host puts what it copies in for a
/// container (`<dir>/<container id>/rootfs`, `.../mounts/...`); the agent's
/// `--shared-dir` default.
pub const GUEST_SHARED_DIR: &str = "/run/kestrel/shared";

pub use protobuf;
pub use ttrpc;

//! The `kestrel` command line.

pub mod agent;
pub mod bundle;
pub mod containers;
pub mod doctor;
pub mod events;
pub mod exec;
pub mod image;
pub mod kill;
pub mod network;
pub mod ps;
pub mod rm;
pub mod run;
pub mod seccomp_profile;
pub mod security;
pub mod shim;
pub mod stdio;
pub mod terminal;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "kestrel",
    version,
    about = "Run OCI containers in lightweight KVM virtual machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Talk to a guest agent directly.
    #[command(subcommand)]
    Agent(agent::AgentCommand),
    /// Build the guest image (kernel + initramfs with the agent as /init).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Show which hypervisor `auto` picks here and why, and whether
    /// everything it needs is present (exit status 1 when not).
    Doctor(doctor::DoctorArgs),
    /// Run a container from a rootfs directory and wait for it.
    Run(run::RunArgs),
    /// List the containers `kestrel run` started.
    Ps(ps::PsArgs),
    /// Run another process in a running container.
    Exec(exec::ExecArgs),
    /// Send a signal to a container.
    Kill(kill::KillArgs),
    /// Delete a container and stop its shim.
    Rm(rm::RmArgs),
    /// Print containers' lifecycle events as they happen, until Ctrl-C.
    Events(events::EventsArgs),
}

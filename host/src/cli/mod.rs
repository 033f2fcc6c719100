//! The `kestrel` command line.

pub mod agent;
pub mod doctor;
pub mod image;

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
}

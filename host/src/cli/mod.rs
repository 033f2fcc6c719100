//! The `kestrel` command line.

pub mod agent;
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
}

//! `kestrel`: the Kestrel command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Like any Unix tool: `kestrel … | head` ends quietly when head does.
    // SAFETY: restoring the default disposition installs no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kestrel: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            cli::Command::Agent(cmd) => cli::agent::run(cmd).await,
            cli::Command::Image(cmd) => cli::image::run(cmd),
            cli::Command::Doctor(args) => cli::doctor::run(args),
        }
    });
    result.unwrap_or_else(|e| {
        eprintln!("kestrel: {e:#}");
        ExitCode::FAILURE
    })
}

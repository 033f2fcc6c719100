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
            cli::Command::Run(args) => cli::run::run(args).await,
            cli::Command::Ps(args) => cli::ps::run(args).await,
            cli::Command::Exec(args) => cli::exec::run(args).await,
            cli::Command::Kill(args) => cli::kill::run(args).await,
            cli::Command::Rm(args) => cli::rm::run(args).await,
            cli::Command::Events(args) => cli::events::run(args).await,
        }
    });
    result.unwrap_or_else(|e| {
        eprintln!("kestrel: {e:#}");
        ExitCode::FAILURE
    })
}

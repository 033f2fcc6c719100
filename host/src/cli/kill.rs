//! `kestrel kill`: a signal to a container's init process.

use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{anyhow, Result};
use clap::Args;
use nix::sys::signal::Signal;

use super::containers::Container;
use super::shim::Shim;

#[derive(Args, Debug)]
pub struct KillArgs {
    /// The container's id.
    pub id: String,
    /// A signal name (TERM, SIGKILL) or number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// Parses `KILL`, `SIGKILL`, `kill` or `9`.
pub fn parse_signal(text: &str) -> Result<u32> {
    if let Ok(number) = text.parse::<i32>() {
        return Signal::try_from(number)
            .map(|s| s as u32)
            .map_err(|_| anyhow!("{text} is not a signal number"));
    }
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name)
        .map(|s| s as u32)
        .map_err(|_| anyhow!("{text} is not a signal name"))
}

pub async fn run(args: KillArgs) -> Result<ExitCode> {
    let signal = parse_signal(&args.signal)?;
    let container = Container::open(&args.id)?;
    let shim = Shim::open(&container).await?;
    shim.kill("", signal).await?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_accepted_by_name_with_or_without_sig_and_by_number() {
        assert_eq!(parse_signal("KILL").unwrap(), 9);
        assert_eq!(parse_signal("sigterm").unwrap(), 15);
        assert_eq!(parse_signal("SIGHUP").unwrap(), 1);
        assert_eq!(parse_signal("2").unwrap(), 2);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}

//! The shim server's log: containerd's log FIFO, as containerd-shim's
//! `FifoLogger` writes it, with one change. ttrpc-rust reports at error
//! level a reply it could not write because the client had already hung
//! up: `ctr task ls` gives each State two seconds and closes its
//! connection, and under load some replies find it closed. That is the
//! client's choice, not a failure of ours, so those two reports are
//! demoted to debug; every other record passes unchanged.

use std::str::FromStr;

use containerd_shim::logger::{FifoLogger, LOG_ENV};
use log::{Level, LevelFilter, Log, Metadata, Record};

/// The log level unless `RUST_LOG` says otherwise; `-debug` raises it.
const DEFAULT_LEVEL: LevelFilter = LevelFilter::Info;

struct ShimLog<L> {
    fifo: L,
}

/// Whether `record` is ttrpc-rust's report of a peer that hung up before
/// its reply could be written.
fn peer_hung_up(record: &Record) -> bool {
    if record.level() != Level::Error || !record.target().starts_with("ttrpc") {
        return false;
    }
    let message = record.args().to_string();
    (message.starts_with("write_message got error") && message.contains("Broken pipe"))
        || (message.starts_with("respond failed for stream") && message.contains("channel closed"))
}

impl<L: Log> Log for ShimLog<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.fifo.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !peer_hung_up(record) {
            return self.fifo.log(record);
        }
        let demoted = Record::builder()
            .args(*record.args())
            .level(Level::Debug)
            .target(record.target())
            .module_path(record.module_path())
            .file(record.file())
            .line(record.line())
            .build();
        if self.fifo.enabled(demoted.metadata()) {
            self.fifo.log(&demoted);
        }
    }

    fn flush(&self) {
        self.fifo.flush();
    }
}

/// Logs to containerd's FIFO (`log` in the bundle) at `RUST_LOG`'s level,
/// at least debug with `-debug`.
pub fn init(debug: bool) -> anyhow::Result<()> {
    // Appending: `kestrel run` gives a plain file where containerd gives a
    // FIFO, and a file must not be written over from its start.
    let file = std::fs::OpenOptions::new().append(true).open("log")?;
    let fifo = FifoLogger::with_file(file);
    let configured = std::env::var(LOG_ENV)
        .ok()
        .and_then(|level| LevelFilter::from_str(&level).ok())
        .unwrap_or(DEFAULT_LEVEL);
    let level = if debug {
        configured.max(LevelFilter::Debug)
    } else {
        configured
    };
    log::set_boxed_logger(Box::new(ShimLog { fifo }))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen(Mutex<Vec<(Level, String)>>);

    impl Log for &Seen {
        fn enabled(&self, metadata: &Metadata) -> bool {
            metadata.level() <= Level::Debug
        }
        fn log(&self, record: &Record) {
            self.0
                .lock()
                .unwrap()
                .push((record.level(), record.args().to_string()));
        }
        fn flush(&self) {}
    }

    fn send(log: &ShimLog<&Seen>, level: Level, target: &str, message: &str) {
        log.log(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(target)
                .build(),
        );
    }

    #[test]
    fn a_peer_that_hung_up_is_debug_and_everything_else_passes() {
        let seen = Seen::default();
        let log = ShimLog { fifo: &seen };
        let target = "ttrpc::asynchronous::server";
        send(
            &log,
            Level::Error,
            target,
            "respond failed for stream 7: channel closed",
        );
        send(
            &log,
            Level::Error,
            "ttrpc::asynchronous::connection",
            "write_message got error: Socket(\"Broken pipe (os error 32)\")",
        );
        send(
            &log,
            Level::Error,
            target,
            "respond failed for stream 8: encode error",
        );
        send(
            &log,
            Level::Error,
            "kestrel_host::shim",
            "respond failed for stream 9: channel closed",
        );
        let levels: Vec<Level> = seen.0.lock().unwrap().iter().map(|(l, _)| *l).collect();
        assert_eq!(
            levels,
            [Level::Debug, Level::Debug, Level::Error, Level::Error]
        );
    }
}

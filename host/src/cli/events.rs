//! `kestrel events`: lifecycle changes of the CLI's containers, found by
//! asking every shim for its container's state every 200 ms and printing
//! what changed. A container that starts and dies between two looks shows
//! as started then died.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::containers::Container;
use super::ps::{row, Row};

const PERIOD: Duration = Duration::from_millis(200);

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    Started,
    Died(Option<u32>),
    Removed,
}

/// The changes from `before` to `now` of one container.
fn changes(before: Option<&Row>, now: Option<&Row>) -> Vec<Change> {
    let running = |r: Option<&Row>| r.is_some_and(|r| r.status == "RUNNING");
    let stopped = |r: Option<&Row>| r.is_some_and(|r| r.status == "STOPPED");
    let mut out = Vec::new();
    match now {
        None => {
            if before.is_some() {
                out.push(Change::Removed);
            }
        }
        Some(row) => {
            let was_up = running(before) || stopped(before);
            if (running(now) || stopped(now)) && !was_up {
                out.push(Change::Started);
            }
            if stopped(now) && !stopped(before) {
                out.push(Change::Died(row.exit));
            }
        }
    }
    out
}

pub async fn run(args: EventsArgs) -> Result<ExitCode> {
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut known = snapshot().await?;
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
            _ = terminate.recv() => return Ok(ExitCode::SUCCESS),
        }
        let now = snapshot().await?;
        let ids: std::collections::BTreeSet<&String> = known.keys().chain(now.keys()).collect();
        for id in ids {
            for change in changes(known.get(id), now.get(id)) {
                print(&args, id, change);
            }
        }
        known = now;
    }
}

async fn snapshot() -> Result<BTreeMap<String, Row>> {
    let mut rows = BTreeMap::new();
    for container in Container::list()? {
        rows.insert(container.id.clone(), row(&container).await);
    }
    Ok(rows)
}

fn print(args: &EventsArgs, id: &str, change: Change) {
    let time = utc_now();
    let (event, exit) = match change {
        Change::Started => ("started", None),
        Change::Died(exit) => ("died", exit),
        Change::Removed => ("removed", None),
    };
    if args.json {
        let mut object = serde_json::json!({"time": time, "id": id, "event": event});
        if let Some(exit) = exit {
            object["exit"] = exit.into();
        }
        println!("{object}");
    } else if let Some(exit) = exit {
        println!("{time} {id} {event} (exit {exit})");
    } else if change == Change::Died(None) {
        println!("{time} {id} died");
    } else {
        println!("{time} {id} {event}");
    }
}

/// Now as RFC 3339 UTC with milliseconds.
fn utc_now() -> String {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str, exit: Option<u32>) -> Row {
        Row {
            id: "c".into(),
            status: status.into(),
            pid: 1,
            exit,
            image: String::new(),
            sandbox_health: None,
        }
    }

    #[test]
    fn a_container_that_ran_and_died_between_looks_shows_both() {
        let now = row("STOPPED", Some(3));
        assert_eq!(
            changes(None, Some(&now)),
            vec![Change::Started, Change::Died(Some(3))]
        );
    }

    #[test]
    fn a_running_container_that_stops_died_once() {
        let (before, now) = (row("RUNNING", None), row("STOPPED", Some(143)));
        assert_eq!(
            changes(Some(&before), Some(&now)),
            vec![Change::Died(Some(143))]
        );
        assert!(changes(Some(&now), Some(&now)).is_empty());
        assert_eq!(changes(Some(&now), None), vec![Change::Removed]);
    }
}

//! What containerd's stdout / stderr string for a process names: a FIFO
//! path (its default), a `file://` URI (nerdctl, `ctr run --log-uri
//! file:///…`) or a `binary://` URI, a logging program (nerdctl's detached
//! containers, `ctr run --log-uri binary:///path?key=value`).
//!
//! The rules are those of containerd's runc shim (`pkg/process/io.go`): a
//! string without a scheme is a FIFO; a URI's path is percent-decoded; a
//! `binary://` query gives the logger's arguments, each key followed by its
//! first value (`?a=b&c` → `a b c ""`). containerd takes the keys from a Go
//! map, in no particular order; here they keep the order of the URI.
//! Where containerd silently reads `file://host/path` as `/path`, a URI with
//! a host is refused here.
//!
//! Parsed by hand: two fields and percent-decoding do not justify the `url`
//! crate and its IDNA tables in the shim.

use std::path::PathBuf;

/// Where one output of a process goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogDestination {
    /// A FIFO containerd (or its client) reads.
    Fifo(PathBuf),
    /// A file, appended to (created if missing).
    File(PathBuf),
    /// A logging program that reads the process's stdout on fd 3 and its
    /// stderr on fd 4.
    Binary(LoggerCommand),
}

/// The program of a `binary://` URI and its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggerCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("log URI {uri:?}: {reason}")]
pub struct LogUriError {
    uri: String,
    reason: String,
}

impl LogDestination {
    /// Reads a stdio string as containerd hands it over.
    pub fn parse(s: &str) -> Result<LogDestination, LogUriError> {
        let Some((scheme, rest)) = split_scheme(s) else {
            return Ok(LogDestination::Fifo(PathBuf::from(s)));
        };
        let fail = |reason: String| LogUriError {
            uri: s.into(),
            reason,
        };
        let rest = rest.split_once('#').map_or(rest, |(before, _)| before);
        let (authority_and_path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (host, path) = match authority_and_path.find('/') {
            Some(slash) => authority_and_path.split_at(slash),
            None => (authority_and_path, ""),
        };
        if !host.is_empty() {
            return Err(fail(format!(
                "has a host part ({host:?}); write {scheme}:///absolute/path"
            )));
        }
        let path = percent_decode(path, false).map_err(fail)?;
        if !path.starts_with('/') {
            return Err(fail("needs an absolute path".into()));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "fifo" => Ok(LogDestination::Fifo(path.into())),
            "file" => Ok(LogDestination::File(path.into())),
            "binary" => Ok(LogDestination::Binary(LoggerCommand {
                program: path.into(),
                args: query_args(query).map_err(fail)?,
            })),
            _ => Err(fail(format!(
                "unknown scheme {scheme:?}; FIFO paths, file:// and binary:// are supported"
            ))),
        }
    }
}

/// `scheme` and what follows `scheme://`, if `s` starts with a URI scheme
/// (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`).
fn split_scheme(s: &str) -> Option<(&str, &str)> {
    let (scheme, rest) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some((scheme, rest))
}

/// A query's arguments: each key once, in order of first appearance,
/// followed by its first value (empty for a key without `=`).
fn query_args(query: &str) -> Result<Vec<String>, String> {
    let mut seen: Vec<String> = Vec::new();
    let mut args = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(key, true)?;
        let value = percent_decode(value, true)?;
        if seen.contains(&key) {
            continue;
        }
        seen.push(key.clone());
        args.push(key);
        args.push(value);
    }
    Ok(args)
}

/// Decodes `%XX` escapes (and, in a query, `+` as a space).
fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("invalid escape at byte {i} of {s:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} does not decode to UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(program: &str, args: &[&str]) -> LogDestination {
        LogDestination::Binary(LoggerCommand {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }

    #[test]
    fn a_plain_path_is_a_fifo() {
        let path = "/run/containerd/fifo/1/c-stdout";
        assert_eq!(
            LogDestination::parse(path),
            Ok(LogDestination::Fifo(path.into()))
        );
    }

    #[test]
    fn a_file_uri_names_its_decoded_path() {
        assert_eq!(
            LogDestination::parse("file:///var/log/my%20app.log"),
            Ok(LogDestination::File("/var/log/my app.log".into()))
        );
    }

    #[test]
    fn a_binary_uri_gives_each_key_then_its_first_value_in_order() {
        assert_eq!(
            LogDestination::parse("binary:///usr/bin/logger?id=c1&dir=%2Fvar%2Flog&flag&id=c2"),
            Ok(binary(
                "/usr/bin/logger",
                &["id", "c1", "dir", "/var/log", "flag", ""]
            ))
        );
    }

    #[test]
    fn a_binary_uri_without_a_query_has_no_args() {
        assert_eq!(
            LogDestination::parse("binary:///opt/log.sh"),
            Ok(binary("/opt/log.sh", &[]))
        );
    }

    #[test]
    fn plus_is_a_space_in_the_query_only() {
        assert_eq!(
            LogDestination::parse("binary:///opt/a+b?msg=hello+world"),
            Ok(binary("/opt/a+b", &["msg", "hello world"]))
        );
    }

    #[test]
    fn a_host_a_relative_path_an_unknown_scheme_or_a_bad_escape_is_refused() {
        for bad in [
            "binary://logger?a=b",
            "file://var/log/x",
            "binary://",
            "syslog:///dev/log",
            "binary:///opt/log%zz",
            "binary:///opt/log?a=%4",
        ] {
            let err = LogDestination::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(bad), "{err} names {bad}");
        }
    }
}

//! The `--fs` option, parsed and checked as text, and the virtio-fs config
//! space the guest reads its tag from.

use std::path::PathBuf;
use std::str::FromStr;

/// The longest tag (virtio 1.2, 5.11.4: `u8 tag[36]`, not NUL-terminated
/// when it fills the field).
pub const MAX_TAG_LEN: usize = 36;
/// The request queues we offer: one, after the high-priority queue. Linux
/// 6.1's driver uses one; virtiofsd serves one.
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// The largest size of each queue when `--fs` does not say.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;
/// The largest queue size virtio allows.
const MAX_QUEUE_SIZE: u16 = 32768;
/// `struct virtio_fs_config`: the tag, then `le32 num_request_queues`.
pub const CONFIG_SPACE_LEN: usize = MAX_TAG_LEN + 4;

/// One shared filesystem, served by a vhost-user-fs backend (virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The backend's vhost-user socket, which must already listen.
    pub socket: PathBuf,
    /// What the guest mounts: `mount -t virtiofs TAG DIR`.
    pub tag: String,
    /// The largest size of each queue, a power of two.
    pub queue_size: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FsConfigError {
    #[error("`{0}` is not KEY=VALUE (expected socket=PATH,tag=TAG[,queue-size=N])")]
    NotKeyValue(String),
    #[error("unknown key `{0}` (known: socket, tag, queue-size)")]
    UnknownKey(String),
    #[error("`{0}` is given twice")]
    Repeated(String),
    #[error("`{0}` is required")]
    Missing(&'static str),
    #[error("tag `{0}` must be 1 to {MAX_TAG_LEN} bytes without spaces or control characters")]
    Tag(String),
    #[error("queue-size `{0}` must be a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(String),
}

/// Whether the guest can name `tag` on a mount command line: the spec
/// allows any UTF-8, but a space or a control character would not survive
/// `mount` or `/proc/mounts`.
fn valid_tag(tag: &str) -> bool {
    (1..=MAX_TAG_LEN).contains(&tag.len())
        && !tag.chars().any(|c| c.is_whitespace() || c.is_control())
}

impl FromStr for FsConfig {
    type Err = FsConfigError;

    fn from_str(s: &str) -> Result<FsConfig, FsConfigError> {
        let (mut socket, mut tag, mut queue_size) = (None, None, None);
        for pair in s.split(',') {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| FsConfigError::NotKeyValue(pair.to_string()))?;
            let repeated = || FsConfigError::Repeated(key.to_string());
            match key {
                "socket" => {
                    if value.is_empty() {
                        return Err(FsConfigError::Missing("socket"));
                    }
                    socket
                        .replace(PathBuf::from(value))
                        .map_or(Ok(()), |_| Err(repeated()))?;
                }
                "tag" => {
                    if !valid_tag(value) {
                        return Err(FsConfigError::Tag(value.to_string()));
                    }
                    tag.replace(value.to_string())
                        .map_or(Ok(()), |_| Err(repeated()))?;
                }
                "queue-size" => {
                    let size = value
                        .parse::<u16>()
                        .ok()
                        .filter(|n| *n >= 2 && n.is_power_of_two() && *n <= MAX_QUEUE_SIZE)
                        .ok_or_else(|| FsConfigError::QueueSize(value.to_string()))?;
                    queue_size
                        .replace(size)
                        .map_or(Ok(()), |_| Err(repeated()))?;
                }
                other => return Err(FsConfigError::UnknownKey(other.to_string())),
            }
        }
        Ok(FsConfig {
            socket: socket.ok_or(FsConfigError::Missing("socket"))?,
            tag: tag.ok_or(FsConfigError::Missing("tag"))?,
            queue_size: queue_size.unwrap_or(DEFAULT_QUEUE_SIZE),
        })
    }
}

/// The config space for `tag` (already checked to fit): the tag padded
/// with NULs, then the number of request queues, little-endian.
pub fn config_space(tag: &str) -> [u8; CONFIG_SPACE_LEN] {
    let mut space = [0u8; CONFIG_SPACE_LEN];
    let len = tag.len().min(MAX_TAG_LEN);
    space[..len].copy_from_slice(&tag.as_bytes()[..len]);
    space[MAX_TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
    space
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_and_tag_are_enough_and_queue_size_defaults() {
        let config: FsConfig = "socket=/run/x/virtiofsd.sock,tag=kestrel".parse().unwrap();
        assert_eq!(
            config,
            FsConfig {
                socket: "/run/x/virtiofsd.sock".into(),
                tag: "kestrel".into(),
                queue_size: DEFAULT_QUEUE_SIZE,
            }
        );
        let config: FsConfig = "tag=t,queue-size=128,socket=/s".parse().unwrap();
        assert_eq!(config.queue_size, 128);
    }

    #[test]
    fn malformed_fs_options_say_what_is_wrong() {
        for (option, err) in [
            ("socket=/s", FsConfigError::Missing("tag")),
            ("tag=t", FsConfigError::Missing("socket")),
            ("socket=,tag=t", FsConfigError::Missing("socket")),
            ("socket=/s,tag=t,x", FsConfigError::NotKeyValue("x".into())),
            (
                "socket=/s,tag=t,cache=on",
                FsConfigError::UnknownKey("cache".into()),
            ),
            (
                "socket=/s,tag=t,tag=u",
                FsConfigError::Repeated("tag".into()),
            ),
            ("socket=/s,tag=", FsConfigError::Tag(String::new())),
            ("socket=/s,tag=a b", FsConfigError::Tag("a b".into())),
            (
                &format!("socket=/s,tag={}", "t".repeat(37)),
                FsConfigError::Tag("t".repeat(37)),
            ),
            (
                "socket=/s,tag=t,queue-size=100",
                FsConfigError::QueueSize("100".into()),
            ),
            (
                "socket=/s,tag=t,queue-size=1",
                FsConfigError::QueueSize("1".into()),
            ),
            (
                "socket=/s,tag=t,queue-size=65536",
                FsConfigError::QueueSize("65536".into()),
            ),
        ] {
            assert_eq!(option.parse::<FsConfig>(), Err(err), "{option}");
        }
        let longest = format!("socket=/s,tag={}", "t".repeat(MAX_TAG_LEN));
        assert!(longest.parse::<FsConfig>().is_ok());
    }

    #[test]
    fn config_space_is_the_padded_tag_then_one_request_queue() {
        let space = config_space("kestrel");
        assert_eq!(&space[..7], b"kestrel");
        assert!(space[7..MAX_TAG_LEN].iter().all(|&b| b == 0));
        assert_eq!(&space[MAX_TAG_LEN..], &[1, 0, 0, 0]);

        let full = "x".repeat(MAX_TAG_LEN);
        let space = config_space(&full);
        assert_eq!(&space[..MAX_TAG_LEN], full.as_bytes(), "no NUL when full");
    }
}

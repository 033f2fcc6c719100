//! The initramfs: a "newc" cpio archive, written by hand because it is
//! 110-byte ASCII headers and padding, and because we need it byte-for-byte
//! reproducible (sorted entries, inode numbers by position, mtime 0, owner
//! root), which general cpio tools do not promise.
//!
//! [`read`] parses an archive back; the tests and `kestrel image` use it to
//! check what went in.

use std::collections::BTreeMap;

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// One thing in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// An archive under construction: paths (without a leading `/`) to nodes,
/// kept sorted so the output does not depend on insertion order.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("initramfs path {0:?} must be relative, without `.`/`..` or empty parts")]
    BadPath(String),
    #[error("initramfs entry {0:?} is larger than a newc header can say")]
    TooLarge(String),
    #[error("not a newc archive: {0}")]
    Malformed(String),
}

impl Archive {
    pub fn new() -> Self {
        Archive::default()
    }

    /// Adds `node` at `path`, creating missing parent directories (0755).
    pub fn insert(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        let parts: Vec<&str> = path.split('/').collect();
        // The trailer's name ends an archive: an entry of that name, or
        // the implied parent directory of one below it, would cut off
        // everything written after it.
        if parts[0] == TRAILER
            || parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == "..")
        {
            return Err(CpioError::BadPath(path.into()));
        }
        if let Node::File { data, .. } = &node {
            if u32::try_from(data.len()).is_err() {
                return Err(CpioError::TooLarge(path.into()));
            }
        }
        for depth in 1..parts.len() {
            self.entries
                .entry(parts[..depth].join("/"))
                .or_insert(Node::Dir { mode: 0o755 });
        }
        self.entries.insert(path.into(), node);
        Ok(())
    }

    /// The archive bytes. The same entries always give the same bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (path, node)) in self.entries.iter().enumerate() {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir { mode } => (S_IFDIR | mode, &[], (0, 0)),
                Node::File { mode, data } => (S_IFREG | mode, data, (0, 0)),
                Node::Symlink { target } => (S_IFLNK | 0o777, target.as_bytes(), (0, 0)),
                Node::CharDevice { mode, major, minor } => (S_IFCHR | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir { .. }) {
                2
            } else {
                1
            };
            // Inode numbers by position: stable, and unique (no hard links).
            write_entry(&mut out, i as u32 + 1, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), TRAILER, &[]);
        out
    }
}

fn write_entry(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime: fixed, for reproducible archives
        data.len() as u32,
        0, // dev major
        0, // dev minor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(MAGIC);
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// Reads a newc archive back into its entries (path → node), up to the
/// trailer.
pub fn read(bytes: &[u8]) -> Result<BTreeMap<String, Node>, CpioError> {
    let bad = |m: &str| CpioError::Malformed(m.into());
    let mut entries = BTreeMap::new();
    let mut at = 0;
    loop {
        let header = bytes
            .get(at..at + 110)
            .ok_or_else(|| bad("truncated header"))?;
        if &header[..6] != MAGIC {
            return Err(bad("bad magic"));
        }
        let field = |i: usize| -> Result<u32, CpioError> {
            let hex = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| bad("non-ASCII header"))?;
            u32::from_str_radix(hex, 16).map_err(|_| bad("non-hex header field"))
        };
        let (mode, size, rmajor, rminor, namesize) = (
            field(1)?,
            field(6)? as usize,
            field(9)?,
            field(10)?,
            field(11)? as usize,
        );
        let name_end = at + 110 + namesize;
        let name = bytes
            .get(at + 110..name_end - 1)
            .ok_or_else(|| bad("truncated name"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad("non-UTF-8 name"))?;
        let data_at = (name_end + 3) & !3;
        let data = bytes
            .get(data_at..data_at + size)
            .ok_or_else(|| bad("truncated data"))?
            .to_vec();
        at = (data_at + size + 3) & !3;
        if name == TRAILER {
            return Ok(entries);
        }
        let perm = mode & 0o7777;
        let node = match mode & 0o170000 {
            S_IFDIR => Node::Dir { mode: perm },
            S_IFREG => Node::File { mode: perm, data },
            S_IFLNK => Node::Symlink {
                target: String::from_utf8(data).map_err(|_| bad("non-UTF-8 link target"))?,
            },
            S_IFCHR => Node::CharDevice {
                mode: perm,
                major: rmajor,
                minor: rminor,
            },
            _ => return Err(bad("unsupported file type")),
        };
        entries.insert(name, node);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_entries() -> Vec<(&'static str, Node)> {
        vec![
            (
                "init",
                Node::File {
                    mode: 0o755,
                    data: b"\x7fELF...".to_vec(),
                },
            ),
            (
                "sbin/init",
                Node::Symlink {
                    target: "../init".into(),
                },
            ),
            (
                "etc/hostname",
                Node::File {
                    mode: 0o644,
                    data: b"kestrel\n".to_vec(),
                },
            ),
            (
                "dev/console",
                Node::CharDevice {
                    mode: 0o600,
                    major: 5,
                    minor: 1,
                },
            ),
        ]
    }

    fn archive(entries: impl IntoIterator<Item = (&'static str, Node)>) -> Archive {
        let mut a = Archive::new();
        for (path, node) in entries {
            a.insert(path, node).unwrap();
        }
        a
    }

    fn sample() -> Archive {
        archive(sample_entries())
    }

    #[test]
    fn an_archive_reads_back_with_its_parents() {
        let entries = read(&sample().to_bytes()).unwrap();
        assert_eq!(
            entries.keys().collect::<Vec<_>>(),
            [
                "dev",
                "dev/console",
                "etc",
                "etc/hostname",
                "init",
                "sbin",
                "sbin/init"
            ]
        );
        assert_eq!(
            entries["init"],
            Node::File {
                mode: 0o755,
                data: b"\x7fELF...".to_vec()
            }
        );
        assert_eq!(
            entries["sbin/init"],
            Node::Symlink {
                target: "../init".into()
            }
        );
        assert_eq!(
            entries["dev/console"],
            Node::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1
            }
        );
        assert_eq!(entries["etc"], Node::Dir { mode: 0o755 });
    }

    #[test]
    fn insertion_order_does_not_change_the_bytes() {
        let reversed = archive(sample_entries().into_iter().rev());
        assert_eq!(reversed.to_bytes(), sample().to_bytes());
    }

    #[test]
    fn entries_are_aligned_and_owned_by_root_with_no_mtime() {
        let bytes = sample().to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        // First header: uid, gid and mtime fields are zero.
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&header[22..30], "00000000");
        assert_eq!(&header[30..38], "00000000");
        assert_eq!(&header[46..54], "00000000");
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut a = Archive::new();
        for p in [
            "/init",
            "a/../b",
            "",
            "a//b",
            "./x",
            "TRAILER!!!",
            "TRAILER!!!/bin",
        ] {
            assert_eq!(
                a.insert(p, Node::Dir { mode: 0o755 }),
                Err(CpioError::BadPath(p.into()))
            );
        }
    }

    #[test]
    fn garbage_is_not_an_archive() {
        assert!(read(b"hello").is_err());
        let mut bytes = sample().to_bytes();
        bytes.truncate(200);
        assert!(read(&bytes).is_err());
    }
}

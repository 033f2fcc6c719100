//! CopyFile: the runtime's requests write below the agent's shared
//! directory, through `kestrel_agent::copy_file::copy`, the function the
//! agent's CopyFile handler calls. A few requests run in order, so a
//! symlink or file one request makes is in the way of the next.
//!
//! Paths and symlink targets are built from pieces that matter (`..`, `.`,
//! empty parts, the shared directory itself, a sibling directory, names
//! earlier requests used) plus any string. Besides "no panic": nothing
//! outside the shared directory changes, whatever the requests say.

#![no_main]

use std::fs;
use std::path::Path;

use arbitrary::Arbitrary;
use kestrel_agent::copy_file::copy;
use kestrel_protocols::agent::CopyFileRequest;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Piece {
    Name(u8),
    Parent,
    Current,
    Empty,
    Outside,
    Partial,
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Kind {
    Regular,
    Directory,
    Symlink(Vec<Piece>),
    RawMode(u32),
}

#[derive(Arbitrary, Debug)]
struct Request {
    /// Below the shared directory, or below its parent (where the fuzz
    /// run's own `outside` directory is; never the real root, in case the
    /// check this target tests were broken).
    path: Vec<Piece>,
    from_parent: bool,
    kind: Kind,
    perm: u16,
    dir_mode: u16,
    uid: i32,
    gid: i32,
    offset: i64,
    file_size: i64,
    data: Vec<u8>,
}

const NAMES: [&str; 4] = ["a", "b", "rootfs", "etc"];

fn join(pieces: &[Piece], outside: &Path) -> String {
    let parts: Vec<String> = pieces
        .iter()
        .take(8)
        .map(|p| match p {
            Piece::Name(i) => NAMES[usize::from(*i) % NAMES.len()].to_string(),
            Piece::Parent => "..".into(),
            Piece::Current => ".".into(),
            Piece::Empty => String::new(),
            Piece::Outside => outside.display().to_string(),
            Piece::Partial => "a.kestrel-partial".into(),
            Piece::Text(t) => t.clone(),
        })
        .collect();
    parts.join("/")
}

/// Everything below `dir` (paths and contents), symlinks not followed.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let meta = fs::symlink_metadata(&path).expect("stat below the fuzz dir");
            let content = if meta.is_dir() {
                stack.push(path.clone());
                b"<dir>".to_vec()
            } else if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                target.as_os_str().as_encoded_bytes().to_vec()
            } else {
                fs::read(&path).unwrap_or_default()
            };
            out.push((path.display().to_string(), content));
        }
    }
    out.sort();
    out
}

fuzz_target!(|requests: Vec<Request>| {
    let root = tempfile::tempdir().expect("tempdir");
    let shared = root.path().join("shared");
    let outside = root.path().join("outside");
    fs::create_dir_all(outside.join("etc")).expect("mkdir");
    fs::write(outside.join("etc/passwd"), b"root:x:0:0\n").expect("write");
    fs::create_dir(&shared).expect("mkdir");
    let before = snapshot(&outside);

    for r in requests.iter().take(6) {
        let mut req = CopyFileRequest::new();
        let rel = join(&r.path, &outside);
        req.path = if r.from_parent {
            format!("{}/{rel}", root.path().display())
        } else {
            format!("{}/{rel}", shared.display())
        };
        let perm = u32::from(r.perm) & 0o7777;
        req.file_mode = match &r.kind {
            Kind::Regular => libc::S_IFREG | perm,
            Kind::Directory => libc::S_IFDIR | perm,
            Kind::Symlink(_) => libc::S_IFLNK | perm,
            Kind::RawMode(m) => *m,
        };
        req.dir_mode = u32::from(r.dir_mode);
        req.uid = r.uid;
        req.gid = r.gid;
        req.offset = r.offset;
        req.file_size = r.file_size;
        req.data = match &r.kind {
            Kind::Symlink(target) => join(target, &outside).into_bytes(),
            _ => r.data.clone(),
        };
        let _ = copy(&shared, &req);
        assert_eq!(snapshot(&outside), before, "CopyFile changed {outside:?}");
        let siblings: Vec<_> = fs::read_dir(root.path())
            .expect("readdir")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            siblings.len(),
            2,
            "CopyFile wrote beside the shared dir: {siblings:?}"
        );
    }
});

//! Builds a container's filesystem view inside its new mount namespace:
//! the spec's mounts on top of the rootfs, device nodes, then pivot_root
//! into it. Runs in the setup helper (see `setup.rs`).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chdir, chroot, pivot_root, sethostname};

use super::spec::{MountConfig, RootfsConfig};

type Result<T> = std::result::Result<T, String>;

/// Device nodes every container gets, bound from the agent's /dev when the
/// spec mounts a fresh /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// The flags of a read-only view: no writes, setuid, devices or execution.
const LOCKED: MsFlags = MsFlags::MS_RDONLY
    .union(MsFlags::MS_NOSUID)
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Builds the container's view; `before_pivot` runs once the mounts are
/// made and the old root is still reachable (the createContainer hooks).
pub fn prepare<E: From<String>>(
    cfg: &RootfsConfig,
    before_pivot: impl FnOnce() -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    if cfg.cgroup_namespace {
        // Only now, inside the container's cgroup, so that it becomes the
        // namespace's root.
        unshare(CloneFlags::CLONE_NEWCGROUP).map_err(|e| format!("new cgroup namespace: {e}"))?;
    }
    // Nothing mounted from here on may propagate back to the agent.
    do_mount(None, "/", None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
    let root = cfg.root.as_path();
    do_mount(
        Some(root),
        root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;

    let mut fresh_dev = false;
    for m in &cfg.mounts {
        mount_one(root, m, cfg)?;
        fresh_dev |= m.destination == "/dev" && !m.is_bind();
    }
    if !cfg.mounts.iter().any(|m| m.destination == "/proc") {
        let target = inside(root, "/proc")?;
        fs::create_dir_all(&target).map_err(|e| format!("creating /proc: {e}"))?;
        do_mount(
            Some(Path::new("proc")),
            &target,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        )?;
    }
    if fresh_dev {
        populate_dev(root)?;
    }
    before_pivot()?;

    enter(root)?;

    for p in &cfg.masked_paths {
        mask(p)?;
    }
    for p in &cfg.readonly_paths {
        read_only(Path::new(p))?;
    }
    for (key, value) in &cfg.sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value).map_err(|e| format!("sysctl {key}={value}: {e}"))?;
    }
    if cfg.readonly {
        do_mount(
            None,
            "/",
            None,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    if let Some(name) = &cfg.hostname {
        sethostname(name).map_err(|e| format!("sethostname {name}: {e}"))?;
    }
    Ok(())
}

/// Resolves `dest` below `root`, refusing anything that would land outside
/// it through `..` or a symlink in the rootfs.
fn inside(root: &Path, dest: &str) -> Result<PathBuf> {
    let rel = dest.trim_start_matches('/');
    let joined = root.join(rel);
    // The deepest existing ancestor decides where a symlink leads.
    let mut probe = joined.as_path();
    while !probe.exists() {
        probe = probe.parent().unwrap_or(root);
    }
    let real = probe
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", probe.display()))?;
    let real_root = root
        .canonicalize()
        .map_err(|e| format!("resolving {}: {e}", root.display()))?;
    if !real.starts_with(&real_root) {
        return Err(format!(
            "mount destination {dest} resolves outside the rootfs"
        ));
    }
    Ok(joined)
}

fn mount_one(root: &Path, m: &MountConfig, cfg: &RootfsConfig) -> Result<()> {
    let target = inside(root, &m.destination)?;
    let flags = m.ms_flags();
    if m.fstype == "cgroup" && !cfg.cgroup_v1_dirs.is_empty() {
        return mount_cgroup_v1(&target, flags, cfg);
    }
    let source_is_file = m.is_bind() && Path::new(&m.source).is_file();
    if source_is_file {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        if !target.exists() {
            fs::File::create(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
        }
    } else {
        fs::create_dir_all(&target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    }
    let fstype = match m.fstype.as_str() {
        _ if m.is_bind() => None,
        "cgroup" => Some("cgroup2"),
        other => Some(other),
    };
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    let source = (!m.source.is_empty()).then(|| Path::new(&m.source));
    // Bind mounts ignore most flags on the first call; a remount applies them.
    let first = if m.is_bind() {
        flags & (MsFlags::MS_BIND | MsFlags::MS_REC)
    } else {
        flags
    };
    do_mount(source, &target, fstype, first, data)?;
    let rest = flags - (MsFlags::MS_BIND | MsFlags::MS_REC);
    if m.is_bind() && !rest.is_empty() {
        do_mount(
            None,
            &target,
            None,
            rest | MsFlags::MS_REMOUNT | MsFlags::MS_BIND,
            None,
        )?;
    }
    if m.propagation != 0 {
        do_mount(
            None,
            &target,
            None,
            MsFlags::from_bits_truncate(m.propagation),
            None,
        )?;
    }
    Ok(())
}

/// cgroup v1 has no single filesystem to mount: like runc, show the
/// container its own directory of every controller on a tmpfs.
fn mount_cgroup_v1(target: &Path, flags: MsFlags, cfg: &RootfsConfig) -> Result<()> {
    fs::create_dir_all(target).map_err(|e| format!("creating {}: {e}", target.display()))?;
    do_mount(
        Some(Path::new("tmpfs")),
        target,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=755"),
    )?;
    for (controller, dir) in &cfg.cgroup_v1_dirs {
        let sub = target.join(controller);
        fs::create_dir_all(&sub).map_err(|e| format!("creating {}: {e}", sub.display()))?;
        bind_read_only(dir, &sub, MsFlags::empty())?;
    }
    if flags.contains(MsFlags::MS_RDONLY) {
        do_mount(None, target, None, MsFlags::MS_REMOUNT | LOCKED, None)?;
    }
    Ok(())
}

fn populate_dev(root: &Path) -> Result<()> {
    let dev = root.join("dev");
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let node = dev.join(name);
        fs::File::create(&node).map_err(|e| format!("creating {}: {e}", node.display()))?;
        do_mount(Some(&host), &node, None, MsFlags::MS_BIND, None)?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if path.symlink_metadata().is_err() {
            symlink(target, &path).map_err(|e| format!("linking {}: {e}", path.display()))?;
        }
    }
    Ok(())
}

/// Makes `root` the process's `/`. pivot_root cannot leave an initramfs,
/// so where the agent itself runs from one (the guest), move the rootfs
/// over `/` and chroot, as switch_root does.
fn enter(root: &Path) -> Result<()> {
    chdir(root).map_err(|e| format!("chdir {}: {e}", root.display()))?;
    match pivot_root(".", ".") {
        Ok(()) => {
            // The old root now sits on top of the new one; drop it without
            // its unmount reaching the agent's namespace.
            do_mount(None, ".", None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)?;
            umount2(".", MntFlags::MNT_DETACH)
                .map_err(|e| format!("detaching the old root: {e}"))?;
        }
        Err(Errno::EINVAL) => {
            do_mount(Some(Path::new(".")), "/", None, MsFlags::MS_MOVE, None)?;
            chroot(".").map_err(|e| format!("chroot: {e}"))?;
        }
        Err(e) => return Err(format!("pivot_root into {}: {e}", root.display())),
    }
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

fn mask(path: &str) -> Result<()> {
    let p = Path::new(path);
    match p.metadata() {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => do_mount(
            Some(Path::new("tmpfs")),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None,
        ),
        Ok(_) => do_mount(
            Some(Path::new("/dev/null")),
            p,
            None,
            MsFlags::MS_BIND,
            None,
        ),
    }
}

fn read_only(p: &Path) -> Result<()> {
    if !p.exists() {
        return Ok(());
    }
    bind_read_only(p, p, MsFlags::MS_REC)
}

/// Binds `source` on `target` and makes the bind read-only, without setuid,
/// devices or execution.
fn bind_read_only(source: &Path, target: &Path, rec: MsFlags) -> Result<()> {
    do_mount(Some(source), target, None, MsFlags::MS_BIND | rec, None)?;
    do_mount(
        None,
        target,
        None,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | LOCKED,
        None,
    )
}

fn do_mount<P: AsRef<Path> + ?Sized>(
    source: Option<&Path>,
    target: &P,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    let target = target.as_ref();
    mount(source, target, fstype, flags, data).map_err(|e| {
        format!(
            "mounting {} on {} ({}): {e}",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind/remount")
        )
    })
}

//! The OCI bundle `kestrel run` writes: a `config.json` like the one `ctr
//! run --rootfs` gives, running the user's command in their rootfs.

use std::path::Path;

const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The runtime spec for `args` in `rootfs` (an absolute path), with a
/// terminal of `console_size` (rows, columns) if `terminal`.
pub fn spec(
    id: &str,
    rootfs: &Path,
    args: &[String],
    terminal: bool,
    console_size: Option<(u16, u16)>,
) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [PATH, "TERM=xterm"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": rootfs},
        "hostname": id,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq",
                "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    with_console_size(&mut spec["process"], console_size);
    spec
}

/// The process spec of an exec: `args` with the container's environment.
pub fn exec_process(
    args: &[String],
    terminal: bool,
    console_size: Option<(u16, u16)>,
) -> serde_json::Value {
    let mut process = serde_json::json!({
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": [PATH, "TERM=xterm"],
        "cwd": "/"
    });
    with_console_size(&mut process, console_size);
    process
}

/// The terminal's first size goes in the spec, so the program never sees a
/// terminal without one.
fn with_console_size(process: &mut serde_json::Value, console_size: Option<(u16, u16)>) {
    if let Some((rows, cols)) = console_size {
        process["consoleSize"] = serde_json::json!({"height": rows, "width": cols});
    }
}

/// Writes `dir/config.json`.
pub fn write(dir: &Path, spec: &serde_json::Value) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("config.json"), json)
}

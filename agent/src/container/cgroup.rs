//! One cgroup per container, on cgroup v2 or v1 (whichever the kernel has
//! mounted at /sys/fs/cgroup), for the controllers the agent uses:
//! memory, cpu, cpuacct, pids, freezer and cpuset.
//!
//! Written against the cgroupfs files directly: the operations needed here
//! are a few dozen reads and writes, and the `cgroups-rs` crate would add
//! more code than it removes while hiding which file failed.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kestrel_protocols::agent::{
    CgroupStats, CpuStats, CpuUsage, MemoryData, MemoryStats, PidsStats, ThrottlingData,
};
use kestrel_protocols::oci::LinuxResources;
use nix::unistd::Pid;

use super::process::send_signal;
use crate::error::{Error, Result};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const V1_CONTROLLERS: &[&str] = &["memory", "cpu", "cpuacct", "pids", "freezer", "cpuset"];
const V2_CONTROLLERS: &[&str] = &["memory", "cpu", "pids", "cpuset"];
/// How long a freeze, thaw or kill may take before it is reported as failed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// USER_HZ, the unit of cpuacct.stat.
const NANOS_PER_TICK: u64 = 10_000_000;

/// Which cgroup version the kernel presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    V2,
    /// Controller name and its mount point.
    V1(Vec<(String, PathBuf)>),
}

impl Hierarchy {
    pub fn detect() -> Hierarchy {
        let root = Path::new(CGROUP_ROOT);
        if root.join("cgroup.controllers").exists() {
            return Hierarchy::V2;
        }
        Hierarchy::V1(
            V1_CONTROLLERS
                .iter()
                .map(|c| (c.to_string(), root.join(c)))
                .filter(|(_, p)| p.is_dir())
                .collect(),
        )
    }
}

/// A container's cgroup: one directory on v2, one per controller on v1.
#[derive(Debug)]
pub struct Cgroup {
    v2: bool,
    /// (controller, directory); the controller is empty on v2.
    dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    /// Creates the cgroup at `relative` below the hierarchy and applies
    /// `resources`. On failure nothing this call created is left behind.
    pub fn create(
        hierarchy: &Hierarchy,
        relative: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup> {
        let relative = relative.trim_start_matches('/');
        if relative.is_empty() || relative.split('/').any(|c| c.is_empty() || c == "..") {
            return Err(Error::invalid(format!(
                "cgroups path {relative:?} is not a valid relative path"
            )));
        }
        let (v2, dirs): (bool, Vec<(String, PathBuf)>) = match hierarchy {
            Hierarchy::V2 => (
                true,
                vec![(String::new(), Path::new(CGROUP_ROOT).join(relative))],
            ),
            Hierarchy::V1(controllers) => (
                false,
                controllers
                    .iter()
                    .map(|(c, mount)| (c.clone(), mount.join(relative)))
                    .collect(),
            ),
        };
        if dirs.is_empty() {
            return Err(Error::FailedPrecondition(format!(
                "no cgroup controllers are mounted under {CGROUP_ROOT}"
            )));
        }
        for (_, d) in dirs.iter().filter(|(_, d)| d.exists()) {
            // An empty cgroup is what an agent killed before it could clean
            // up leaves behind (host mode); one with processes is in use.
            if std::fs::remove_dir(d).is_err() {
                return Err(Error::AlreadyExists(format!(
                    "cgroup {} already exists and is in use",
                    d.display()
                )));
            }
            tracing::info!(cgroup = %d.display(), "removed a stale empty cgroup");
        }
        let cgroup = Cgroup { v2, dirs };
        let made = cgroup.make_dirs().and_then(|()| match resources {
            Some(r) => cgroup.apply(r),
            None => Ok(()),
        });
        if let Err(e) = made {
            let _ = cgroup.destroy();
            return Err(e);
        }
        Ok(cgroup)
    }

    fn make_dirs(&self) -> Result<()> {
        for (controller, dir) in &self.dirs {
            if self.v2 {
                enable_v2_controllers(dir)?;
            }
            fs::create_dir_all(dir)
                .map_err(|e| Error::internal(format!("creating cgroup {}", dir.display()), e))?;
            if controller == "cpuset" {
                inherit_cpuset(dir)?;
            }
        }
        Ok(())
    }

    /// The per-controller directories, for the container's view of v1.
    pub fn v1_dirs(&self) -> Vec<(String, PathBuf)> {
        if self.v2 {
            Vec::new()
        } else {
            self.dirs.clone()
        }
    }

    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|(c, _)| self.v2 || c == controller)
            .map(|(_, d)| d.as_path())
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir(controller).map(|d| d.join(name))
    }

    /// Moves `pid` into the cgroup.
    pub fn add(&self, pid: Pid) -> Result<()> {
        for (_, dir) in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Applies memory, CPU and pids limits.
    pub fn apply(&self, r: &LinuxResources) -> Result<()> {
        if let Some(m) = r.Memory.as_ref() {
            if self.v2 {
                if m.Limit != 0 {
                    self.set("memory", "memory.max", limit_or_max(m.Limit))?;
                }
                if m.Reservation > 0 {
                    self.set("memory", "memory.low", m.Reservation.to_string())?;
                }
                if m.Swap > 0 && m.Limit > 0 && m.Swap >= m.Limit {
                    self.set("memory", "memory.swap.max", (m.Swap - m.Limit).to_string())?;
                }
                if m.DisableOOMKiller {
                    return Err(Error::Unimplemented(
                        "disabling the OOM killer is not possible on cgroup v2".into(),
                    ));
                }
            } else {
                if m.Limit != 0 {
                    self.set(
                        "memory",
                        "memory.limit_in_bytes",
                        m.Limit.max(-1).to_string(),
                    )?;
                }
                if m.Reservation > 0 {
                    self.set(
                        "memory",
                        "memory.soft_limit_in_bytes",
                        m.Reservation.to_string(),
                    )?;
                }
                if m.Swap != 0 {
                    self.set(
                        "memory",
                        "memory.memsw.limit_in_bytes",
                        m.Swap.max(-1).to_string(),
                    )?;
                }
                if m.DisableOOMKiller {
                    self.set("memory", "memory.oom_control", "1".into())?;
                }
            }
        }
        if let Some(c) = r.CPU.as_ref() {
            if self.v2 {
                if c.Shares > 0 {
                    let weight = 1 + (c.Shares.clamp(2, 262_144) - 2) * 9999 / 262_142;
                    self.set("cpu", "cpu.weight", weight.to_string())?;
                }
                if c.Quota != 0 || c.Period != 0 {
                    let quota = if c.Quota > 0 {
                        c.Quota.to_string()
                    } else {
                        "max".into()
                    };
                    let period = if c.Period > 0 { c.Period } else { 100_000 };
                    self.set("cpu", "cpu.max", format!("{quota} {period}"))?;
                }
            } else {
                if c.Shares > 0 {
                    self.set("cpu", "cpu.shares", c.Shares.to_string())?;
                }
                if c.Period > 0 {
                    self.set("cpu", "cpu.cfs_period_us", c.Period.to_string())?;
                }
                if c.Quota != 0 {
                    self.set("cpu", "cpu.cfs_quota_us", c.Quota.max(-1).to_string())?;
                }
            }
            if !c.Cpus.is_empty() {
                self.set("cpuset", "cpuset.cpus", c.Cpus.clone())?;
            }
            if !c.Mems.is_empty() {
                self.set("cpuset", "cpuset.mems", c.Mems.clone())?;
            }
        }
        if let Some(p) = r.Pids.as_ref() {
            if p.Limit != 0 {
                self.set("pids", "pids.max", limit_or_max(p.Limit))?;
            }
        }
        Ok(())
    }

    fn set(&self, controller: &str, name: &str, value: String) -> Result<()> {
        let file = self.file(controller, name).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "the {controller} cgroup controller is not available for {name}"
            ))
        })?;
        write(&file, &value)
    }

    /// The pids in the cgroup.
    pub fn procs(&self) -> Result<Vec<Pid>> {
        let (_, dir) = &self.dirs[0];
        let path = dir.join("cgroup.procs");
        let text = match fs::read_to_string(&path) {
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            other => {
                other.map_err(|e| Error::internal(format!("reading {}", path.display()), e))?
            }
        };
        Ok(text
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .map(Pid::from_raw)
            .collect())
    }

    /// Freezes every process of the cgroup and waits until they are frozen.
    pub async fn freeze(&self) -> Result<()> {
        self.set_frozen(true).await
    }

    pub async fn thaw(&self) -> Result<()> {
        self.set_frozen(false).await
    }

    async fn set_frozen(&self, frozen: bool) -> Result<()> {
        // v2: write cgroup.freeze, watch cgroup.events; v1: freezer.state is both.
        let (file, value, status, settled) = if self.v2 {
            let dir = &self.dirs[0].1;
            let (value, settled) = if frozen {
                ("1", "frozen 1")
            } else {
                ("0", "frozen 0")
            };
            (
                dir.join("cgroup.freeze"),
                value,
                dir.join("cgroup.events"),
                settled,
            )
        } else {
            let file = self.file("freezer", "freezer.state").ok_or_else(|| {
                Error::FailedPrecondition("the freezer cgroup controller is not mounted".into())
            })?;
            let value = if frozen { "FROZEN" } else { "THAWED" };
            (file.clone(), value, file, value)
        };
        let done = |text: &str| text.lines().any(|l| l.trim() == settled);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        loop {
            // v1 can stall in FREEZING when a task is mid-fork; writing
            // again retries, as runc does.
            write(&file, value)?;
            let now = fs::read_to_string(&status)
                .map_err(|e| Error::internal(format!("reading {}", status.display()), e))?;
            if done(&now) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "cgroup {} did not reach {value} within {SETTLE_TIMEOUT:?}",
                    self.dirs[0].1.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Sends `signal` to every process of the cgroup.
    pub fn signal_all(&self, signal: i32) -> Result<usize> {
        let procs = self.procs()?;
        for pid in &procs {
            let _ = send_signal(*pid, signal);
        }
        Ok(procs.len())
    }

    /// SIGKILLs every process, freezing first so none can fork in between.
    pub async fn kill_all(&self) -> Result<()> {
        let frozen = self.freeze().await.is_ok();
        self.signal_all(libc::SIGKILL)?;
        if frozen {
            self.thaw().await?;
        }
        Ok(())
    }

    /// The OOM kills the kernel has counted in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let name = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.file("memory", name)
            .and_then(|f| fs::read_to_string(f).ok())
            .map(|t| flat_keyed(&t))
            .and_then(|m| m.get("oom_kill").copied())
            .unwrap_or(0)
    }

    /// CPU, memory and pids usage.
    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::new();
        stats.cpu_stats = Some(self.cpu_stats()).into();
        stats.memory_stats = Some(self.memory_stats()).into();
        let mut pids = PidsStats::new();
        pids.current = self.read_u64("pids", "pids.current");
        pids.limit = self.read_u64("pids", "pids.max");
        stats.pids_stats = Some(pids).into();
        stats
    }

    fn cpu_stats(&self) -> CpuStats {
        let mut usage = CpuUsage::new();
        let mut throttling = ThrottlingData::new();
        let cpu_stat = self.read_keyed("cpu", "cpu.stat");
        if self.v2 {
            usage.total_usage = cpu_stat.get("usage_usec").copied().unwrap_or(0) * 1000;
            usage.usage_in_usermode = cpu_stat.get("user_usec").copied().unwrap_or(0) * 1000;
            usage.usage_in_kernelmode = cpu_stat.get("system_usec").copied().unwrap_or(0) * 1000;
            throttling.throttled_time = cpu_stat.get("throttled_usec").copied().unwrap_or(0) * 1000;
        } else {
            usage.total_usage = self.read_u64("cpuacct", "cpuacct.usage");
            usage.percpu_usage = self
                .file("cpuacct", "cpuacct.usage_percpu")
                .and_then(|f| fs::read_to_string(f).ok())
                .map(|t| {
                    t.split_whitespace()
                        .filter_map(|v| v.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            let ticks = self.read_keyed("cpuacct", "cpuacct.stat");
            usage.usage_in_usermode = ticks.get("user").copied().unwrap_or(0) * NANOS_PER_TICK;
            usage.usage_in_kernelmode = ticks.get("system").copied().unwrap_or(0) * NANOS_PER_TICK;
            throttling.throttled_time = cpu_stat.get("throttled_time").copied().unwrap_or(0);
        }
        throttling.periods = cpu_stat.get("nr_periods").copied().unwrap_or(0);
        throttling.throttled_periods = cpu_stat.get("nr_throttled").copied().unwrap_or(0);
        let mut cpu = CpuStats::new();
        cpu.cpu_usage = Some(usage).into();
        cpu.throttling_data = Some(throttling).into();
        cpu
    }

    fn memory_stats(&self) -> MemoryStats {
        let mut mem = MemoryStats::new();
        let stat = self.read_keyed("memory", "memory.stat");
        let mut usage = MemoryData::new();
        if self.v2 {
            usage.usage = self.read_u64("memory", "memory.current");
            usage.max_usage = self.read_u64("memory", "memory.peak");
            usage.limit = self.read_u64("memory", "memory.max");
            usage.failcnt = self
                .read_keyed("memory", "memory.events")
                .get("max")
                .copied()
                .unwrap_or(0);
            mem.cache = stat.get("file").copied().unwrap_or(0);
            let mut swap = MemoryData::new();
            swap.usage = self.read_u64("memory", "memory.swap.current");
            swap.limit = self.read_u64("memory", "memory.swap.max");
            mem.swap_usage = Some(swap).into();
        } else {
            usage.usage = self.read_u64("memory", "memory.usage_in_bytes");
            usage.max_usage = self.read_u64("memory", "memory.max_usage_in_bytes");
            usage.failcnt = self.read_u64("memory", "memory.failcnt");
            usage.limit = self.read_u64("memory", "memory.limit_in_bytes");
            mem.cache = stat.get("cache").copied().unwrap_or(0);
            mem.use_hierarchy = self.read_u64("memory", "memory.use_hierarchy") == 1;
            let mut swap = MemoryData::new();
            swap.usage = self.read_u64("memory", "memory.memsw.usage_in_bytes");
            swap.limit = self.read_u64("memory", "memory.memsw.limit_in_bytes");
            mem.swap_usage = Some(swap).into();
        }
        mem.usage = Some(usage).into();
        mem.stats = stat;
        mem
    }

    /// A single-number file; `max` reads as u64::MAX and absent files as 0.
    fn read_u64(&self, controller: &str, name: &str) -> u64 {
        self.file(controller, name)
            .and_then(|f| fs::read_to_string(f).ok())
            .and_then(|t| match t.trim() {
                "max" => Some(u64::MAX),
                v => v.parse().ok(),
            })
            .unwrap_or(0)
    }

    fn read_keyed(&self, controller: &str, name: &str) -> HashMap<String, u64> {
        self.file(controller, name)
            .and_then(|f| fs::read_to_string(f).ok())
            .map(|t| flat_keyed(&t))
            .unwrap_or_default()
    }

    /// Removes the cgroup's directories, waiting briefly for exiting
    /// processes to leave them. Parents shared with other containers stay.
    pub fn destroy(&self) -> Result<()> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for (_, dir) in &self.dirs {
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        return Err(Error::internal(
                            format!("removing cgroup {}", dir.display()),
                            e,
                        ))
                    }
                }
            }
        }
        Ok(())
    }
}

fn limit_or_max(limit: i64) -> String {
    if limit > 0 {
        limit.to_string()
    } else {
        "max".into()
    }
}

/// Parses `key value` lines (memory.stat, cpu.stat, memory.events, ...).
fn flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| Error::internal(format!("writing {value:?} to {}", path.display()), e))
}

/// On v2 a controller works in a cgroup only when every ancestor enables
/// it for its children.
fn enable_v2_controllers(dir: &Path) -> Result<()> {
    let root = Path::new(CGROUP_ROOT);
    let mut ancestors: Vec<&Path> = dir
        .ancestors()
        .skip(1)
        .take_while(|a| a.starts_with(root))
        .collect();
    ancestors.reverse();
    for parent in ancestors {
        fs::create_dir_all(parent)
            .map_err(|e| Error::internal(format!("creating cgroup {}", parent.display()), e))?;
        let available = fs::read_to_string(parent.join("cgroup.controllers")).unwrap_or_default();
        let enabled = fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
        for c in V2_CONTROLLERS {
            let has = |list: &str| list.split_whitespace().any(|x| x == *c);
            if has(&available) && !has(&enabled) {
                write(&parent.join("cgroup.subtree_control"), &format!("+{c}"))?;
            }
        }
    }
    Ok(())
}

/// A new v1 cpuset starts with no CPUs and no memory nodes: copy them down
/// from the parent at every level this container created.
fn inherit_cpuset(dir: &Path) -> Result<()> {
    let mut chain: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| a.join("cpuset.cpus").exists())
        .collect();
    chain.reverse();
    for pair in chain.windows(2) {
        for name in ["cpuset.cpus", "cpuset.mems"] {
            let child = pair[1].join(name);
            if fs::read_to_string(&child)
                .unwrap_or_default()
                .trim()
                .is_empty()
            {
                let value = fs::read_to_string(pair[0].join(name)).unwrap_or_default();
                write(&child, value.trim())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed_parses_cgroup_stat_files() {
        let m = flat_keyed("usage_usec 120\nuser_usec 100\nsystem_usec 20\nbogus\n");
        assert_eq!(m["usage_usec"], 120);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn escaping_cgroup_paths_are_rejected() {
        for bad in ["", "/", "a/../b", "a//b"] {
            assert!(
                matches!(
                    Cgroup::create(&Hierarchy::V2, bad, None),
                    Err(Error::InvalidArgument(_))
                ),
                "{bad:?}"
            );
        }
    }
}

//! Kata's storages: what CreateSandbox and CreateContainer ask the agent to
//! mount before containers use it (the host's shared filesystem over
//! virtio-fs, a pod's shm, emptyDir and local volumes), counted by mount
//! point as Kata's agent counts them.
//!
//! - [`request`]: a `Storage` message checked into a [`request::Plan`],
//! - [`roots`]: where a storage may go, and the walk that pins a path,
//! - [`mount`]: each driver's mount and unmount,
//! - [`fs_group`]: Kubernetes' fsGroup on a volume.
//!
//! A storage whose mount point is already in use is mounted once and
//! counted; each caller holds a [`Lease`] on what its call took, and the
//! mount goes when the last lease goes (a `shared` storage stays until
//! [`Storages::release_all`], at DestroySandbox). A call that fails midway
//! releases what it took, so nothing is left half made.

pub mod fs_group;
pub mod mount;
pub mod request;
pub mod roots;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kestrel_protocols::agent::Storage;

use crate::error::{Error, Result};
use mount::Made;
use request::Plan;
use roots::Roots;

/// One mount point in use.
#[derive(Debug)]
struct Entry {
    /// Driver, source and fstype: what a second user must ask for too.
    identity: String,
    made: Made,
    users: usize,
    shared: bool,
}

/// Every storage the agent has made, by mount point.
#[derive(Debug)]
pub struct Storages {
    roots: Roots,
    is_init: bool,
    table: Mutex<HashMap<PathBuf, Entry>>,
}

/// What one CreateSandbox or CreateContainer took; released when dropped.
#[derive(Debug)]
pub struct Lease {
    storages: Arc<Storages>,
    points: Vec<PathBuf>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut table = self.storages.table();
        release(&mut table, &self.points);
    }
}

impl Storages {
    pub fn new(roots: Roots, is_init: bool) -> Storages {
        Storages {
            roots,
            is_init,
            table: Mutex::new(HashMap::new()),
        }
    }

    pub fn roots(&self) -> &Roots {
        &self.roots
    }

    fn table(&self) -> MutexGuard<'_, HashMap<PathBuf, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks every storage of a request, then makes them in order. `what`
    /// names the call in errors.
    pub fn acquire(self: &Arc<Self>, what: &str, requested: &[Storage]) -> Result<Lease> {
        let plans = requested
            .iter()
            .enumerate()
            .map(|(i, s)| request::plan(i, s, &self.roots, self.is_init))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.context(what))?;
        for (i, p) in plans.iter().enumerate() {
            if let Some(j) = plans[..i]
                .iter()
                .position(|q| q.target.path == p.target.path)
            {
                return Err(Error::invalid(format!(
                    "{what}: storages[{i}].mount_point {} repeats storages[{j}]'s",
                    p.target.path.display()
                )));
            }
        }
        let mut table = self.table();
        let mut taken = Vec::with_capacity(plans.len());
        for p in &plans {
            if let Err(e) = take(&mut table, p) {
                release(&mut table, &taken);
                return Err(e.context(what));
            }
            taken.push(p.target.path.clone());
        }
        Ok(Lease {
            storages: Arc::clone(self),
            points: taken,
        })
    }

    /// Removes every storage, the deepest mount points first: the
    /// sandbox is going, whoever still holds a lease.
    pub fn release_all(&self) {
        let mut table = self.table();
        let mut entries: Vec<(PathBuf, Entry)> = table.drain().collect();
        entries.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
        for (_, entry) in entries {
            mount::remove(&entry.made);
        }
    }

    /// How many leases hold the storage at `mount_point`.
    #[cfg(test)]
    pub fn users(&self, mount_point: &std::path::Path) -> Option<usize> {
        self.table().get(mount_point).map(|e| e.users)
    }
}

fn take(table: &mut HashMap<PathBuf, Entry>, p: &Plan) -> Result<()> {
    let path = &p.target.path;
    let field = &p.target.field;
    if let Some(entry) = table.get_mut(path) {
        if entry.identity != p.identity() {
            return Err(Error::invalid(format!(
                "{field} {} already holds {}, not {}",
                path.display(),
                entry.identity,
                p.identity()
            )));
        }
        entry.users += 1;
        entry.shared |= p.shared;
        return Ok(());
    }
    if let Some(below) = table.keys().find(|k| k.starts_with(path)) {
        return Err(Error::invalid(format!(
            "{field} {} would hide the storage at {}",
            path.display(),
            below.display()
        )));
    }
    let made = mount::create(p)?;
    table.insert(
        path.clone(),
        Entry {
            identity: p.identity(),
            made,
            users: 1,
            shared: p.shared,
        },
    );
    Ok(())
}

/// Drops one use of each of `points`, last taken first.
fn release(table: &mut HashMap<PathBuf, Entry>, points: &[PathBuf]) {
    for point in points.iter().rev() {
        let Some(entry) = table.get_mut(point) else {
            continue;
        };
        entry.users = entry.users.saturating_sub(1);
        if entry.users == 0 && !entry.shared {
            if let Some(entry) = table.remove(point) {
                mount::remove(&entry.made);
            }
        }
    }
}

#[cfg(test)]
mod tests;

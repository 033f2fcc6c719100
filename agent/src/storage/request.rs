//! Kata's `Storage` message, checked: which driver, what to mount where,
//! with which flags. Every field is judged here, before anything is
//! mounted, so a bad request fails with INVALID_ARGUMENT naming the field
//! and leaves the guest as it was.

use std::fmt;

use kestrel_protocols::agent::Storage;
use kestrel_protocols::types::FSGroupChangePolicy;
use nix::mount::MsFlags;

use super::roots::{lexical, Located, Roots};
use crate::container::spec::{mount_option, MountOption};
use crate::error::{Error, Result};

/// Kata's option naming the group of a `local` or `ephemeral` volume; not
/// a mount option, so never passed to the kernel.
const FSGID: &str = "fsgid";
/// `mode=` of a `local` directory (for `ephemeral`, tmpfs's own option).
const MODE: &str = "mode";
/// The longest virtio-fs tag the device's config space holds.
const MAX_TAG: usize = 36;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `virtio-fs`: the host's shared directory, by its device tag.
    VirtioFs,
    /// `local`: a directory the agent creates (Kata's local volumes).
    Local,
    /// `ephemeral`: a tmpfs (Kata's emptyDir in memory, the pod's shm).
    Ephemeral,
    /// `bind`: a directory or file already below a root, bound elsewhere.
    Bind,
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Driver::VirtioFs => "virtio-fs",
            Driver::Local => "local",
            Driver::Ephemeral => "ephemeral",
            Driver::Bind => "bind",
        })
    }
}

/// What is mounted: a device tag, a tmpfs's name, or a bind's source.
#[derive(Debug, Clone)]
pub enum Source {
    None,
    Name(String),
    Path(Located),
}

/// Kata's `FSGroup`: the group a volume's files are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsGroup {
    pub gid: u32,
    /// Kata's `OnRootMismatch`: nothing changes when the root directory
    /// already has the group, the permissions and the setgid bit.
    pub only_on_root_mismatch: bool,
}

/// One storage, ready to be mounted.
#[derive(Debug, Clone)]
pub struct Plan {
    pub driver: Driver,
    pub source: Source,
    pub fstype: &'static str,
    pub target: Located,
    pub flags: MsFlags,
    pub propagation: MsFlags,
    /// Comma-joined filesystem options (tmpfs `size=`, virtio-fs `dax`).
    pub data: String,
    /// `mode=` of a `local` directory.
    pub mode: Option<u32>,
    /// `fsgid=`: the volume root's group, with the setgid bit.
    pub fsgid: Option<u32>,
    pub fs_group: Option<FsGroup>,
    /// Kept until the sandbox goes, even when no container uses it.
    pub shared: bool,
}

impl Plan {
    /// What a second storage at the same mount point must match to share
    /// the mount.
    pub fn identity(&self) -> String {
        let source = match &self.source {
            Source::None => String::new(),
            Source::Name(n) => n.clone(),
            Source::Path(p) => p.path.display().to_string(),
        };
        format!("{} {source:?} ({})", self.driver, self.fstype)
    }

    pub fn read_only(&self) -> bool {
        self.flags.contains(MsFlags::MS_RDONLY)
    }
}

/// Checks `storages[index]` of a request. `is_init` is false in host
/// mode, where no virtio-fs device exists.
pub fn plan(index: usize, s: &Storage, roots: &Roots, is_init: bool) -> Result<Plan> {
    let field = |name: &str| format!("storages[{index}].{name}");
    let driver = driver(&s.driver, &field("driver"))?;
    if driver == Driver::VirtioFs && !is_init {
        return Err(Error::FailedPrecondition(format!(
            "{}: host mode has no virtio-fs device to mount {:?} from",
            field("driver"),
            s.source
        )));
    }
    let target = roots.locate(&field("mount_point"), &s.mount_point)?;
    for (name, value) in [("source", &s.source), ("fstype", &s.fstype)] {
        if value.contains('\0') {
            return Err(Error::invalid(format!(
                "{} {value:?} contains a NUL byte",
                field(name)
            )));
        }
    }
    let options = options(driver, &s.options, &field("options"))?;
    let (source, fstype) = match driver {
        Driver::VirtioFs => {
            let tag = s.source.as_str();
            if tag.is_empty() || tag.len() > MAX_TAG || tag.contains('/') {
                return Err(Error::invalid(format!(
                    "{} {tag:?} is not a virtio-fs tag (1 to {MAX_TAG} bytes, no '/')",
                    field("source")
                )));
            }
            expect_fstype(&s.fstype, &["virtiofs"], &field("fstype"))?;
            (Source::Name(tag.to_string()), "virtiofs")
        }
        Driver::Ephemeral => {
            if s.fstype == "hugetlbfs" {
                return Err(Error::Unimplemented(format!(
                    "{}: ephemeral hugetlbfs storages are not supported",
                    field("fstype")
                )));
            }
            expect_fstype(&s.fstype, &["tmpfs"], &field("fstype"))?;
            let name = if s.source.is_empty() {
                "tmpfs"
            } else {
                s.source.as_str()
            };
            (Source::Name(name.to_string()), "tmpfs")
        }
        // Kata's runtime sends "local" as source and fstype: labels only.
        Driver::Local => (Source::None, "local"),
        Driver::Bind => {
            lexical(&field("source"), &s.source)?;
            let source = roots.locate(&field("source"), &s.source)?;
            expect_fstype(&s.fstype, &["bind", "none"], &field("fstype"))?;
            (Source::Path(source), "bind")
        }
    };
    let fs_group = match s.fs_group.as_ref() {
        None => None,
        Some(g) => {
            let only_on_root_mismatch = match g.group_change_policy.enum_value() {
                Ok(FSGroupChangePolicy::Always) => false,
                Ok(FSGroupChangePolicy::OnRootMismatch) => true,
                Err(v) => {
                    return Err(Error::invalid(format!(
                        "{}.group_change_policy {v} is neither Always (0) nor OnRootMismatch (1)",
                        field("fs_group")
                    )))
                }
            };
            Some(FsGroup {
                gid: g.group_id,
                only_on_root_mismatch,
            })
        }
    };
    let flags = match driver {
        Driver::Bind => options.flags | MsFlags::MS_BIND,
        _ => options.flags,
    };
    Ok(Plan {
        driver,
        source,
        fstype,
        target,
        flags,
        propagation: options.propagation,
        data: options.data.join(","),
        mode: options.mode,
        fsgid: options.fsgid,
        fs_group,
        shared: s.shared,
    })
}

fn driver(name: &str, field: &str) -> Result<Driver> {
    Ok(match name {
        "virtio-fs" => Driver::VirtioFs,
        "local" => Driver::Local,
        "ephemeral" => Driver::Ephemeral,
        "bind" => Driver::Bind,
        "" => return Err(Error::invalid(format!("{field} is empty"))),
        "blk" | "virtio-blk" | "mmioblk" | "blk-ccw" | "scsi" | "nvdimm" => {
            return Err(Error::Unimplemented(format!(
                "{field} {name:?}: block device storages are not supported; the Kestrel guest has no virtio-blk, SCSI or pmem device"
            )))
        }
        other => {
            return Err(Error::Unimplemented(format!(
                "{field} {other:?} is not supported (supported: virtio-fs, local, ephemeral, bind)"
            )))
        }
    })
}

fn expect_fstype(fstype: &str, allowed: &[&str], field: &str) -> Result<()> {
    if fstype.is_empty() || allowed.contains(&fstype) {
        return Ok(());
    }
    Err(Error::invalid(format!(
        "{field} {fstype:?} does not fit the driver (expected {})",
        allowed.join(" or ")
    )))
}

#[derive(Debug)]
struct Options {
    flags: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
    mode: Option<u32>,
    fsgid: Option<u32>,
}

/// Splits a storage's options into mount flags, propagation, filesystem
/// data and Kata's own `fsgid=` / `mode=` (for `local`).
fn options(driver: Driver, raw: &[String], field: &str) -> Result<Options> {
    let mut o = Options {
        flags: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        mode: None,
        fsgid: None,
    };
    for opt in raw.iter().filter(|o| !o.is_empty()) {
        if opt.contains('\0') {
            return Err(Error::invalid(format!(
                "{field}: {opt:?} contains a NUL byte"
            )));
        }
        let (key, value) = opt.split_once('=').unwrap_or((opt, ""));
        if key == FSGID {
            o.fsgid = Some(value.parse().map_err(|_| {
                Error::invalid(format!("{field}: {opt:?} is not fsgid=<group id>"))
            })?);
            continue;
        }
        if driver == Driver::Local {
            if key != MODE {
                return Err(Error::invalid(format!(
                    "{field}: {opt:?}: a local storage takes only mode= and fsgid="
                )));
            }
            o.mode = Some(
                u32::from_str_radix(value, 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| {
                        Error::invalid(format!("{field}: {opt:?} is not an octal mode"))
                    })?,
            );
            continue;
        }
        match mount_option(opt) {
            Some(MountOption::Set(f)) if f.contains(MsFlags::MS_BIND) && driver != Driver::Bind => {
                return Err(Error::invalid(format!(
                    "{field}: {opt:?} is only for a bind storage"
                )))
            }
            Some(MountOption::Set(f)) => o.flags |= f,
            Some(MountOption::Clear(f)) => o.flags &= !f,
            Some(MountOption::Propagation(f)) => o.propagation |= f,
            None if driver == Driver::Bind => {
                return Err(Error::invalid(format!(
                    "{field}: {opt:?} is not a mount flag, and a bind storage takes no filesystem options"
                )))
            }
            None => o.data.push(opt.clone()),
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_protocols::agent::FSGroup;

    fn roots() -> Roots {
        Roots::new(vec![
            "/run/kestrel/shared".into(),
            "/run/kata-containers".into(),
        ])
    }

    fn storage(
        driver: &str,
        source: &str,
        fstype: &str,
        mount_point: &str,
        opts: &[&str],
    ) -> Storage {
        Storage {
            driver: driver.into(),
            source: source.into(),
            fstype: fstype.into(),
            mount_point: mount_point.into(),
            options: opts.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    /// The shared filesystem as Kata's runtime sends it in CreateSandbox.
    fn kata_shared() -> Storage {
        storage(
            "virtio-fs",
            "kataShared",
            "virtiofs",
            "/run/kata-containers/shared/containers/",
            &["dax"],
        )
    }

    #[test]
    fn kata_s_shared_filesystem_is_a_virtiofs_mount_of_its_tag() {
        let p = plan(0, &kata_shared(), &roots(), true).unwrap();
        assert_eq!(p.driver, Driver::VirtioFs);
        assert!(matches!(&p.source, Source::Name(t) if t == "kataShared"));
        assert_eq!(p.fstype, "virtiofs");
        assert_eq!(
            p.target.path.to_str(),
            Some("/run/kata-containers/shared/containers")
        );
        assert_eq!(p.data, "dax");
    }

    #[test]
    fn virtio_fs_in_host_mode_is_a_failed_precondition() {
        let err = plan(0, &kata_shared(), &roots(), false).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
    }

    #[test]
    fn kata_s_shm_storage_keeps_its_flags_and_tmpfs_options() {
        let s = storage(
            "ephemeral",
            "shm",
            "tmpfs",
            "/run/kata-containers/sandbox/shm",
            &["noexec", "nosuid", "nodev", "mode=1777", "size=67108864"],
        );
        let p = plan(0, &s, &roots(), true).unwrap();
        assert_eq!(
            p.flags,
            MsFlags::MS_NOEXEC | MsFlags::MS_NOSUID | MsFlags::MS_NODEV
        );
        assert_eq!(p.data, "mode=1777,size=67108864");
    }

    #[test]
    fn local_storage_takes_an_octal_mode_and_an_fsgid() {
        let s = storage(
            "local",
            "local",
            "local",
            "/run/kata-containers/shared/containers/sb/rootfs/local/cache",
            &["mode=0777", "fsgid=2000"],
        );
        let p = plan(0, &s, &roots(), true).unwrap();
        assert_eq!((p.mode, p.fsgid), (Some(0o777), Some(2000)));
        assert_eq!(p.data, "");
        for bad in ["mode=999", "mode=17777", "size=1m", "fsgid=-1"] {
            let s = storage("local", "", "", "/run/kestrel/shared/l", &[bad]);
            let err = plan(3, &s, &roots(), true).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.starts_with("storages[3].options")),
                "{bad}: {err:?}"
            );
        }
    }

    #[test]
    fn bind_options_are_flags_only_and_other_drivers_cannot_bind() {
        let s = storage(
            "bind",
            "/run/kestrel/shared/c1/data",
            "",
            "/run/kestrel/shared/c1/view",
            &["rbind", "ro"],
        );
        let p = plan(0, &s, &roots(), true).unwrap();
        assert_eq!(
            p.flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
        let s = storage(
            "bind",
            "/run/kestrel/shared/a",
            "",
            "/run/kestrel/shared/b",
            &["size=1m"],
        );
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
        let s = storage(
            "ephemeral",
            "tmpfs",
            "tmpfs",
            "/run/kestrel/shared/e",
            &["bind"],
        );
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn bind_sources_must_be_below_a_root_too() {
        for source in ["/etc", "/", "relative", "/run/kestrel/shared/../../etc", ""] {
            let s = storage("bind", source, "", "/run/kestrel/shared/b", &[]);
            match plan(1, &s, &roots(), true) {
                Err(Error::InvalidArgument(m)) => {
                    assert!(m.starts_with("storages[1].source"), "{source}: {m}")
                }
                other => panic!("{source}: {other:?}"),
            }
        }
    }

    #[test]
    fn nul_bytes_are_refused_in_every_field() {
        let cases = [
            storage(
                "ephemeral",
                "tmp\0fs",
                "tmpfs",
                "/run/kestrel/shared/e",
                &[],
            ),
            storage(
                "ephemeral",
                "tmpfs",
                "tmp\0fs",
                "/run/kestrel/shared/e",
                &[],
            ),
            storage(
                "ephemeral",
                "tmpfs",
                "tmpfs",
                "/run/kestrel/shared/e\0",
                &[],
            ),
            storage(
                "ephemeral",
                "tmpfs",
                "tmpfs",
                "/run/kestrel/shared/e",
                &["size=1\0m"],
            ),
        ];
        for s in cases {
            assert!(
                matches!(plan(0, &s, &roots(), true), Err(Error::InvalidArgument(_))),
                "{s:?}"
            );
        }
    }

    #[test]
    fn block_and_unknown_drivers_are_unimplemented_and_name_the_driver() {
        for d in [
            "blk",
            "virtio-blk",
            "mmioblk",
            "scsi",
            "nvdimm",
            "overlayfs",
            "watchable-bind",
        ] {
            let s = storage(
                d,
                "/dev/vda",
                "ext4",
                "/run/kata-containers/sandbox/storage/x",
                &[],
            );
            match plan(0, &s, &roots(), true) {
                Err(Error::Unimplemented(m)) => assert!(m.contains(&format!("{d:?}")), "{m}"),
                other => panic!("{d}: {other:?}"),
            }
        }
        let s = storage("", "x", "", "/run/kestrel/shared/x", &[]);
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_driver_s_fstype_must_fit_it() {
        let s = storage("ephemeral", "x", "ext4", "/run/kestrel/shared/x", &[]);
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
        let s = storage("ephemeral", "x", "hugetlbfs", "/run/kestrel/shared/x", &[]);
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::Unimplemented(_))
        ));
        let mut s = kata_shared();
        s.fstype = "9p".into();
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
        s.fstype = String::new();
        s.source = "a/b".into();
        assert!(matches!(
            plan(0, &s, &roots(), true),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn fs_group_policy_is_read_and_an_unknown_one_refused() {
        let mut s = storage("ephemeral", "", "", "/run/kestrel/shared/e", &[]);
        let g = s.fs_group.mut_or_insert_default();
        g.group_id = 1234;
        g.group_change_policy = FSGroupChangePolicy::OnRootMismatch.into();
        let p = plan(0, &s, &roots(), false).unwrap();
        assert_eq!(
            p.fs_group,
            Some(FsGroup {
                gid: 1234,
                only_on_root_mismatch: true
            })
        );
        let mut g = FSGroup::new();
        g.group_change_policy = kestrel_protocols::protobuf::EnumOrUnknown::from_i32(7);
        s.fs_group = Some(g).into();
        let err = plan(0, &s, &roots(), false).unwrap_err();
        assert!(err.to_string().contains("group_change_policy 7"), "{err}");
    }
}

//! What building the guest kernel needs from the host, checked before
//! anything is extracted: the tools `make` runs, the headers objtool
//! compiles against (a fresh Debian has neither `libelf.h` nor `gelf.h`
//! until `libelf-dev` is installed), and the kernel source tarball. Each
//! missing piece is named with the Debian package that provides it, so one
//! `apt-get install` line fixes them all. `kestrel doctor` shows the same
//! list.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::kernel::{SOURCE_PACKAGE, SOURCE_TARBALL};

/// A thing the kernel build needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A program looked up on `PATH`.
    Tool(&'static str),
    /// A C header looked up in the compiler's system include directories.
    Header(&'static str),
}

/// Everything the kernel build needs, with the Debian package of each.
pub const NEEDS: &[(Need, &str)] = &[
    (Need::Tool("make"), "make"),
    (Need::Tool("gcc"), "gcc"),
    (Need::Tool("ld"), "binutils"),
    (Need::Tool("flex"), "flex"),
    (Need::Tool("bison"), "bison"),
    (Need::Tool("bc"), "bc"),
    (Need::Tool("tar"), "tar"),
    (Need::Tool("xz"), "xz-utils"),
    (Need::Tool("perl"), "perl"),
    (Need::Header("libelf.h"), "libelf-dev"),
    (Need::Header("gelf.h"), "libelf-dev"),
];

/// Where gcc looks for `#include <...>` on Debian x86_64.
pub const INCLUDE_DIRS: &[&str] = &[
    "/usr/local/include",
    "/usr/include/x86_64-linux-gnu",
    "/usr/include",
];

/// One missing prerequisite and the package that brings it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    pub what: String,
    pub package: &'static str,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (apt-get install {})", self.what, self.package)
    }
}

/// The host as the check sees it: `PATH`, the include directories and the
/// kernel source tarball.
#[derive(Debug, Clone)]
pub struct Host {
    pub path: std::ffi::OsString,
    pub include_dirs: Vec<PathBuf>,
    pub tarball: PathBuf,
}

impl Host {
    /// This machine.
    pub fn current() -> Host {
        Host {
            path: std::env::var_os("PATH").unwrap_or_default(),
            include_dirs: INCLUDE_DIRS.iter().map(PathBuf::from).collect(),
            tarball: PathBuf::from(SOURCE_TARBALL),
        }
    }

    /// This machine, building from `tarball`.
    pub fn with_tarball(tarball: &Path) -> Host {
        Host {
            tarball: tarball.to_path_buf(),
            ..Host::current()
        }
    }

    fn has(&self, need: Need) -> bool {
        match need {
            Need::Tool(tool) => on_path(&self.path, tool),
            Need::Header(header) => self.include_dirs.iter().any(|d| d.join(header).is_file()),
        }
    }

    /// Every prerequisite this host lacks, in [`NEEDS`] order, then the
    /// kernel source.
    pub fn missing(&self) -> Vec<Missing> {
        let mut missing: Vec<Missing> = NEEDS
            .iter()
            .filter(|(need, _)| !self.has(*need))
            .map(|(need, package)| Missing {
                what: match need {
                    Need::Tool(name) => format!("the {name} program"),
                    Need::Header(name) => format!("the C header {name}"),
                },
                package,
            })
            .collect();
        if !self.tarball.is_file() {
            missing.push(Missing {
                what: format!("the kernel source {}", self.tarball.display()),
                package: SOURCE_PACKAGE,
            });
        }
        missing
    }
}

fn on_path(path: &OsStr, tool: &str) -> bool {
    std::env::split_paths(path).any(|d| d.join(tool).is_file())
}

/// The packages to install for `missing`, each once, in order.
pub fn packages(missing: &[Missing]) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = Vec::new();
    for m in missing {
        if !packages.contains(&m.package) {
            packages.push(m.package);
        }
    }
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bare(root: &Path) -> Host {
        Host {
            path: root.join("bin").into_os_string(),
            include_dirs: vec![root.join("usr/include")],
            tarball: root.join("linux-source.tar.xz"),
        }
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn a_bare_host_misses_everything_and_names_each_package() {
        let root = tempfile::tempdir().unwrap();
        let missing = bare(root.path()).missing();
        assert_eq!(missing.len(), NEEDS.len() + 1);
        let text: Vec<String> = missing.iter().map(ToString::to_string).collect();
        assert!(
            text.contains(&"the flex program (apt-get install flex)".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&"the C header gelf.h (apt-get install libelf-dev)".to_string()),
            "{text:?}"
        );
        assert!(
            text.contains(&format!(
                "the kernel source {} (apt-get install {SOURCE_PACKAGE})",
                root.path().join("linux-source.tar.xz").display()
            )),
            "{text:?}"
        );
    }

    #[test]
    fn a_missing_header_names_libelf_dev_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        for (need, _) in NEEDS {
            match need {
                Need::Tool(tool) => touch(&root.path().join("bin").join(tool)),
                Need::Header("libelf.h") => touch(&root.path().join("usr/include/libelf.h")),
                Need::Header(_) => {}
            }
        }
        touch(&root.path().join("linux-source.tar.xz"));
        let missing = bare(root.path()).missing();
        assert_eq!(
            missing,
            vec![Missing {
                what: "the C header gelf.h".into(),
                package: "libelf-dev"
            }]
        );
        assert_eq!(packages(&missing), vec!["libelf-dev"]);
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let root = tempfile::tempdir().unwrap();
        for (need, _) in NEEDS {
            match need {
                Need::Tool("bc") => {}
                Need::Tool(tool) => touch(&root.path().join("bin").join(tool)),
                Need::Header(header) => touch(&root.path().join("usr/include").join(header)),
            }
        }
        touch(&root.path().join("linux-source.tar.xz"));
        assert_eq!(
            bare(root.path()).missing(),
            vec![Missing {
                what: "the bc program".into(),
                package: "bc"
            }]
        );
    }

    #[test]
    fn packages_are_listed_once() {
        let root = tempfile::tempdir().unwrap();
        let missing = bare(root.path()).missing();
        let packages = packages(&missing);
        assert_eq!(packages.iter().filter(|p| **p == "libelf-dev").count(), 1);
    }
}

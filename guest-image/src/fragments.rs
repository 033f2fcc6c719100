//! The kernel config fragments in `guest-image/configs/`, built into the
//! binary so an installed `kestrel` needs no source tree, and the check that
//! every option they set survived Kconfig.

use sha2::{Digest, Sha256};

/// (file name, contents), applied in this order after `make tinyconfig`.
pub const FRAGMENTS: &[(&str, &str)] = &[
    ("00-base.config", include_str!("../configs/00-base.config")),
    (
        "10-virtio.config",
        include_str!("../configs/10-virtio.config"),
    ),
    (
        "20-containers.config",
        include_str!("../configs/20-containers.config"),
    ),
    (
        "30-kvm-guest.config",
        include_str!("../configs/30-kvm-guest.config"),
    ),
    ("40-trim.config", include_str!("../configs/40-trim.config")),
];

/// One option a fragment asks for: `CONFIG_X=value`, or `# CONFIG_X is not
/// set` (`value` None).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub name: String,
    pub value: Option<String>,
}

/// Parses `.config` syntax: settings and "is not set" lines; other comments
/// and blank lines are skipped.
pub fn parse(text: &str) -> Vec<Setting> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# ") {
                let name = rest.strip_suffix(" is not set")?;
                return name.starts_with("CONFIG_").then(|| Setting {
                    name: name.into(),
                    value: None,
                });
            }
            let (name, value) = line.split_once('=')?;
            name.starts_with("CONFIG_").then(|| Setting {
                name: name.into(),
                value: Some(value.into()),
            })
        })
        .collect()
}

/// A fragment option the final `.config` does not have as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub fragment: String,
    pub wanted: Setting,
    /// What the final config says: None if the kernel does not know the
    /// option at all.
    pub got: Option<Setting>,
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let wanted = match &self.wanted.value {
            Some(v) => format!("{}={v}", self.wanted.name),
            None => format!("{} unset", self.wanted.name),
        };
        match &self.got {
            None => write!(f, "{wanted} ({}): unknown to this kernel", self.fragment),
            Some(Setting { value: None, .. }) => {
                write!(
                    f,
                    "{wanted} ({}): left unset (its dependencies are not met)",
                    self.fragment
                )
            }
            Some(Setting { value: Some(v), .. }) => {
                write!(f, "{wanted} ({}): is {v}", self.fragment)
            }
        }
    }
}

/// Every fragment setting that `final_config` does not carry.
pub fn dropped(fragments: &[(&str, &str)], final_config: &str) -> Vec<Dropped> {
    let have: std::collections::HashMap<String, Setting> = parse(final_config)
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let mut out = Vec::new();
    for (name, text) in fragments {
        for wanted in parse(text) {
            let got = have.get(&wanted.name);
            let ok = match (&wanted.value, got) {
                (None, None) => true, // unset and unknown: nothing asked
                (None, Some(g)) => g.value.is_none() || g.value.as_deref() == Some("n"),
                (Some(v), Some(g)) => g.value.as_deref() == Some(v.as_str()),
                (Some(_), None) => false,
            };
            if !ok {
                out.push(Dropped {
                    fragment: name.to_string(),
                    wanted,
                    got: got.cloned(),
                });
            }
        }
    }
    out
}

/// The sha256 of the fragments, names and contents, in order.
pub fn hash(fragments: &[(&str, &str)]) -> String {
    let mut h = Sha256::new();
    for (name, text) in fragments {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(text.as_bytes());
        h.update([0]);
    }
    crate::hex(&h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_and_unset_lines_parse() {
        let s = parse("# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n\n");
        assert_eq!(
            s,
            [
                Setting {
                    name: "CONFIG_A".into(),
                    value: Some("y".into())
                },
                Setting {
                    name: "CONFIG_B".into(),
                    value: None
                },
                Setting {
                    name: "CONFIG_C".into(),
                    value: Some("\"x\"".into())
                },
            ]
        );
    }

    #[test]
    fn dropped_options_say_whether_the_kernel_knows_them() {
        let frag = [(
            "f.config",
            "CONFIG_A=y\nCONFIG_B=y\nCONFIG_NOPE=y\n# CONFIG_D is not set\nCONFIG_E=64\n",
        )];
        let final_config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_D=y\nCONFIG_E=32\n";
        let d: Vec<String> = dropped(&frag, final_config)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            d,
            [
                "CONFIG_B=y (f.config): left unset (its dependencies are not met)",
                "CONFIG_NOPE=y (f.config): unknown to this kernel",
                "CONFIG_D unset (f.config): is y",
                "CONFIG_E=64 (f.config): is 32",
            ]
        );
    }

    #[test]
    fn our_fragments_parse_and_set_what_the_agent_needs() {
        let all: Vec<Setting> = FRAGMENTS.iter().flat_map(|(_, t)| parse(t)).collect();
        for needed in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_VSOCKETS",
            "CONFIG_CGROUP_FREEZER",
            "CONFIG_SERIAL_8250_CONSOLE",
            "CONFIG_BLK_DEV_INITRD",
            "CONFIG_VIRTIO_NET",
            "CONFIG_FUSE_FS",
            "CONFIG_VIRTIO_FS",
        ] {
            assert!(
                all.iter()
                    .any(|s| s.name == needed && s.value.as_deref() == Some("y")),
                "{needed}"
            );
        }
    }

    #[test]
    fn every_file_in_configs_is_a_fragment_in_order() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        let names: Vec<&str> = FRAGMENTS.iter().map(|(n, _)| *n).collect();
        assert_eq!(files, names);
    }

    #[test]
    fn the_hash_changes_with_any_fragment_byte() {
        let a = hash(&[("a", "CONFIG_A=y\n")]);
        assert_ne!(a, hash(&[("a", "CONFIG_A=n\n")]));
        assert_ne!(a, hash(&[("b", "CONFIG_A=y\n")]));
        assert_eq!(a, hash(&[("a", "CONFIG_A=y\n")]));
    }
}

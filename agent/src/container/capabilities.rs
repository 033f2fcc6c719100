//! Linux capabilities from the spec's `process.capabilities`, for a
//! container's init and for every exec'd process.
//!
//! The agent validates the names ([`Capabilities::from_spec`]); the setup
//! helper applies them in runc's order: the bounding set is cut and
//! `keepcaps` set before the identity changes ([`Capabilities::before_identity`]),
//! so that a non-root user keeps what the spec grants; the other four sets
//! follow afterwards ([`Capabilities::apply`]). A spec without a
//! capabilities section changes nothing, as with runc: the process keeps
//! what its user gets from the kernel.

use std::collections::HashSet;

use caps::{CapSet, Capability, CapsHashSet};
use kestrel_protocols::oci;
use serde::{Deserialize, Serialize};

/// Why the spec's capabilities cannot be applied as given.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    #[error("process.capabilities.{set}: unknown capability {name:?}")]
    Unknown { set: &'static str, name: String },
    #[error(
        "process.capabilities: {cap} is in the {set} set but not in the permitted set, \
         which the kernel refuses"
    )]
    NotPermitted { set: &'static str, cap: Capability },
    #[error(
        "process.capabilities.ambient: {cap} must also be inheritable, which the kernel requires"
    )]
    AmbientNotInheritable { cap: Capability },
}

/// The five capability sets of a process, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub bounding: CapsHashSet,
    pub effective: CapsHashSet,
    pub permitted: CapsHashSet,
    pub inheritable: CapsHashSet,
    pub ambient: CapsHashSet,
}

impl Capabilities {
    /// The sets the spec names, or None when the process has no
    /// capabilities section.
    pub fn from_spec(p: &oci::Process) -> Result<Option<Capabilities>, CapabilityError> {
        let Some(c) = p.Capabilities.as_ref() else {
            return Ok(None);
        };
        let caps = Capabilities {
            bounding: parse_set(&c.Bounding, "bounding")?,
            effective: parse_set(&c.Effective, "effective")?,
            permitted: parse_set(&c.Permitted, "permitted")?,
            inheritable: parse_set(&c.Inheritable, "inheritable")?,
            ambient: parse_set(&c.Ambient, "ambient")?,
        };
        // capset(2) and PR_CAP_AMBIENT_RAISE refuse these; say so now, with
        // the capability named, rather than as EPERM from the helper.
        for (set, members) in [("effective", &caps.effective), ("ambient", &caps.ambient)] {
            if let Some(cap) = members
                .difference(&caps.permitted)
                .min_by_key(|c| c.index())
            {
                return Err(CapabilityError::NotPermitted { set, cap: *cap });
            }
        }
        if let Some(cap) = caps
            .ambient
            .difference(&caps.inheritable)
            .min_by_key(|c| c.index())
        {
            return Err(CapabilityError::AmbientNotInheritable { cap: *cap });
        }
        Ok(Some(caps))
    }

    /// Runs in the setup helper before setgroups/setgid/setuid: removes
    /// from the bounding set what the spec leaves out (this needs
    /// CAP_SETPCAP, which a later non-root user no longer has) and keeps
    /// the permitted set across the change of user.
    pub fn before_identity(&self) -> Result<(), String> {
        for cap in supported().difference(&self.bounding) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(|e| format!("dropping {cap} from the bounding set: {e}"))?;
        }
        caps::securebits::set_keepcaps(true).map_err(|e| format!("keepcaps: {e}"))
    }

    /// Runs in the setup helper after the identity changes: sets the
    /// inheritable, effective, permitted and ambient sets.
    pub fn apply(&self) -> Result<(), String> {
        caps::securebits::set_keepcaps(false).map_err(|e| format!("keepcaps: {e}"))?;
        let supported = supported();
        // Inheritable first, while the permitted set is still whole (a new
        // inheritable set must lie within the old permitted one); effective
        // before permitted, because effective must stay within permitted.
        for (set, members) in [
            (CapSet::Inheritable, &self.inheritable),
            (CapSet::Effective, &self.effective),
            (CapSet::Permitted, &self.permitted),
            (CapSet::Ambient, &self.ambient),
        ] {
            // Capabilities this kernel does not know are left out, as runc
            // does: a newer runtime's default set must still run here.
            let members: CapsHashSet = members.intersection(&supported).copied().collect();
            caps::set(None, set, &members)
                .map_err(|e| format!("setting the {set:?} capabilities: {e}"))?;
        }
        Ok(())
    }
}

fn parse_set(names: &[String], set: &'static str) -> Result<CapsHashSet, CapabilityError> {
    names
        .iter()
        .map(|name| {
            name.parse::<Capability>()
                .map_err(|_| CapabilityError::Unknown {
                    set,
                    name: name.clone(),
                })
        })
        .collect()
}

/// The capabilities the running kernel knows.
fn supported() -> HashSet<Capability> {
    caps::runtime::thread_all_supported()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(sets: [&[&str]; 5]) -> oci::Process {
        let to_vec = |s: &[&str]| s.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let mut p = oci::Process::new();
        p.Capabilities = Some(oci::LinuxCapabilities {
            Bounding: to_vec(sets[0]),
            Effective: to_vec(sets[1]),
            Inheritable: to_vec(sets[2]),
            Permitted: to_vec(sets[3]),
            Ambient: to_vec(sets[4]),
            ..Default::default()
        })
        .into();
        p
    }

    #[test]
    fn no_capabilities_section_changes_nothing() {
        assert_eq!(Capabilities::from_spec(&oci::Process::new()).unwrap(), None);
    }

    #[test]
    fn empty_sets_drop_everything() {
        let caps = Capabilities::from_spec(&process([&[]; 5]))
            .unwrap()
            .unwrap();
        assert!(caps.bounding.is_empty() && caps.effective.is_empty());
    }

    #[test]
    fn named_sets_are_parsed() {
        let chown: &[&str] = &["CAP_CHOWN", "CAP_KILL"];
        let caps = Capabilities::from_spec(&process([chown, chown, &[], chown, &[]]))
            .unwrap()
            .unwrap();
        assert_eq!(
            caps.bounding,
            [Capability::CAP_CHOWN, Capability::CAP_KILL].into()
        );
    }

    #[test]
    fn an_unknown_name_is_refused_naming_set_and_name() {
        let err = Capabilities::from_spec(&process([&["CAP_CHOWN", "CHOWN"], &[], &[], &[], &[]]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "process.capabilities.bounding: unknown capability \"CHOWN\""
        );
    }

    #[test]
    fn effective_beyond_permitted_is_refused() {
        let err =
            Capabilities::from_spec(&process([&[], &["CAP_KILL"], &[], &[], &[]])).unwrap_err();
        assert!(
            err.to_string().contains("CAP_KILL is in the effective set"),
            "{err}"
        );
    }

    #[test]
    fn ambient_must_be_permitted_and_inheritable() {
        let net: &[&str] = &["CAP_NET_ADMIN"];
        let err = Capabilities::from_spec(&process([net, &[], &[], net, net])).unwrap_err();
        assert!(
            matches!(err, CapabilityError::AmbientNotInheritable { .. }),
            "{err}"
        );
        assert!(Capabilities::from_spec(&process([net, &[], net, net, net])).is_ok());
    }
}

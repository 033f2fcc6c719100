//! AppArmor and SELinux settings in a spec. The guest kernel runs neither
//! LSM, so the agent cannot enforce them; rather than fail containers that
//! docker, nerdctl or CRI label by default, it says so, once per container
//! and naming each field, so nobody mistakes the label for protection.

use kestrel_protocols::oci;

/// The spec's LSM fields that are set, by their `config.json` names.
pub fn unenforced_fields(spec: &oci::Spec) -> Vec<(&'static str, &str)> {
    let mut fields = Vec::new();
    if let Some(p) = spec.Process.as_ref() {
        fields.push(("process.apparmorProfile", p.ApparmorProfile.as_str()));
        fields.push(("process.selinuxLabel", p.SelinuxLabel.as_str()));
    }
    if let Some(l) = spec.Linux.as_ref() {
        fields.push(("linux.mountLabel", l.MountLabel.as_str()));
    }
    fields.retain(|(_, value)| !value.is_empty());
    fields
}

/// Logs one warning per set field of container `id`.
pub fn warn_unenforced(id: &str, spec: &oci::Spec) {
    for (field, value) in unenforced_fields(spec) {
        tracing::warn!(
            container_id = id,
            field,
            value,
            "{field} is set but not enforced: the guest kernel has no AppArmor or SELinux"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_set_fields_are_named() {
        let mut spec = oci::Spec::new();
        assert!(unenforced_fields(&spec).is_empty());
        spec.Process.mut_or_insert_default().ApparmorProfile = "docker-default".into();
        spec.Linux.mut_or_insert_default().MountLabel =
            "system_u:object_r:container_file_t:s0".into();
        assert_eq!(
            unenforced_fields(&spec),
            vec![
                ("process.apparmorProfile", "docker-default"),
                ("linux.mountLabel", "system_u:object_r:container_file_t:s0"),
            ]
        );
    }
}

//! The runtime options containerd passes with Create: for a runtime other
//! than runc, its CRI plugin sends the handler's `options` table as
//! `runtimeoptions.v1.Options` (`TypeUrl` = 1, `ConfigPath` = 2), and Kata
//! reads the runtime's configuration file from `ConfigPath`. So does
//! Kestrel: two RuntimeClasses can run the same shim with different
//! configurations.
//!
//! The message has two strings; it is decoded with protobuf's stream reader
//! rather than by generating code for containerd's proto file.

use std::path::PathBuf;

use containerd_shim_protos::protobuf::rt::WireType;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// The type CRI gives the options of a non-runc runtime.
pub const TYPE: &str = "runtimeoptions.v1.Options";

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("runtime options ({TYPE}): {0}")]
    Decode(String),
    #[error("runtime options ({TYPE}): ConfigPath {0:?} must be an absolute path")]
    RelativeConfigPath(PathBuf),
}

/// The `ConfigPath` of Create's options, if they are ours and set one.
/// Options of another type (a runc handler's, say) carry no configuration
/// for us and are ignored with a warning.
pub fn config_path(options: Option<&Any>) -> Result<Option<PathBuf>, OptionsError> {
    let Some(any) = options.filter(|a| !a.type_url.is_empty() || !a.value.is_empty()) else {
        return Ok(None);
    };
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    if type_name != TYPE {
        tracing::warn!(type_url = %any.type_url, "ignoring runtime options of another type");
        return Ok(None);
    }
    let path = decode_config_path(&any.value).map_err(|e| OptionsError::Decode(e.to_string()))?;
    match path {
        Some(p) if p.is_empty() => Ok(None),
        Some(p) if !p.starts_with('/') => Err(OptionsError::RelativeConfigPath(p.into())),
        other => Ok(other.map(PathBuf::from)),
    }
}

fn decode_config_path(bytes: &[u8]) -> containerd_shim_protos::protobuf::Result<Option<String>> {
    const CONFIG_PATH_FIELD: u32 = 2;
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let (field, wire_type) = (tag >> 3, tag & 7);
        if field == CONFIG_PATH_FIELD && wire_type == WireType::LengthDelimited as u32 {
            path = Some(input.read_string()?);
        } else {
            let wire_type = WireType::new(wire_type).ok_or_else(|| {
                containerd_shim_protos::protobuf::Error::from(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("field {field} has wire type {wire_type}"),
                ))
            })?;
            input.skip_field(wire_type)?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim_protos::protobuf::CodedOutputStream;

    fn options(type_url: &str, fields: &[(u32, &str)]) -> Any {
        let mut value = Vec::new();
        {
            let mut out = CodedOutputStream::vec(&mut value);
            for (field, text) in fields {
                out.write_string(*field, text).unwrap();
            }
            out.flush().unwrap();
        }
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn cri_options_give_their_config_path() {
        let any = options(
            TYPE,
            &[
                (1, "io.containerd.kestrel.v2"),
                (2, "/etc/kestrel/qemu.toml"),
            ],
        );
        assert_eq!(
            config_path(Some(&any)).unwrap(),
            Some(PathBuf::from("/etc/kestrel/qemu.toml"))
        );
        let prefixed = options(&format!("types.containerd.io/{TYPE}"), &[(2, "/k.toml")]);
        assert_eq!(
            config_path(Some(&prefixed)).unwrap(),
            Some("/k.toml".into())
        );
    }

    #[test]
    fn no_options_an_empty_path_or_another_type_give_none() {
        assert_eq!(config_path(None).unwrap(), None);
        assert_eq!(config_path(Some(&Any::new())).unwrap(), None);
        assert_eq!(
            config_path(Some(&options(TYPE, &[(1, "x")]))).unwrap(),
            None
        );
        let runc = options("containerd.runc.v1.Options", &[(2, "/not/ours")]);
        assert_eq!(config_path(Some(&runc)).unwrap(), None);
    }

    #[test]
    fn a_relative_path_or_garbage_is_refused() {
        let relative = options(TYPE, &[(2, "kestrel.toml")]);
        let err = config_path(Some(&relative)).unwrap_err().to_string();
        assert!(
            err.contains("\"kestrel.toml\" must be an absolute path"),
            "{err}"
        );
        let garbage = Any {
            type_url: TYPE.into(),
            value: vec![0x12, 0x40, b'x'],
            ..Default::default()
        };
        assert!(config_path(Some(&garbage)).is_err());
    }
}

//! config.json conversion: OCI runtime-spec JSON from a bundle (or an
//! exec's `Process`, or an Update's `LinuxResources`) into the agent's
//! protobuf messages, through `kestrel_host::oci`, as the shim and the CLI
//! call it. The first byte picks the converter; the rest is the JSON.
//!
//! Besides "no panic", what comes out must survive the protobuf wire: the
//! shim sends it to the agent as is.

#![no_main]

use kestrel_host::oci;
use kestrel_protocols::protobuf::Message;
use libfuzzer_sys::fuzz_target;

fn round_trips<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.write_to_bytes().expect("a converted spec encodes");
    let back = M::parse_from_bytes(&bytes).expect("a converted spec decodes");
    assert_eq!(&back, m, "the protobuf wire changed a converted spec");
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(spec) = oci::spec_from_json(json) {
                round_trips(&spec);
                let _ = oci::sandbox_id(&spec, "fuzz");
            }
        }
        1 => {
            if let Ok(process) = oci::process_from_json(json, "exec") {
                round_trips(&process);
            }
        }
        _ => {
            if let Ok(resources) = oci::resources_from_json(json, "update") {
                round_trips(&resources);
            }
        }
    }
});

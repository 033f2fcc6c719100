//! The initramfs reader (`kestrel_guest_image::initramfs::read`): `kestrel
//! image` and the tests read archives back with it, and a cached image on
//! disk is whatever bytes are there.
//!
//! Besides "no panic": every entry the reader returns and the writer
//! accepts comes back unchanged from the writer's own output, so reader and
//! writer agree on the format.

#![no_main]

use kestrel_guest_image::initramfs::{read, Archive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = read(data) else {
        return;
    };
    let mut archive = Archive::new();
    let mut accepted = Vec::new();
    for (path, node) in &entries {
        if archive.insert(path, node.clone()).is_ok() {
            accepted.push(path);
        }
    }
    let again = read(&archive.to_bytes()).expect("the writer's output reads back");
    for path in accepted {
        // A later entry's implied parent directory never replaces an
        // entry of its own, so each accepted entry is there as it was.
        assert_eq!(
            again.get(path.as_str()),
            entries.get(path.as_str()),
            "{path}"
        );
    }
});

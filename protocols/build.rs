//! Generates the protobuf messages and async ttrpc services from `protos/`
//! with ttrpc-codegen's pure-Rust parser, so no `protoc` is needed.

use std::{fs, path::PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["agent", "csi", "health", "oci", "types"];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let inputs: Vec<String> = PROTOS.iter().map(|p| format!("protos/{p}.proto")).collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={input}");
    }

    Codegen::new()
        .out_dir(&out)
        .inputs(&inputs)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("generating ttrpc code from protos/");

    // The generated files open with inner attributes and inner doc comments,
    // which `include!` cannot take inside a module; lib.rs sets them instead.
    for entry in fs::read_dir(&out).expect("reading OUT_DIR") {
        let path = entry.expect("reading OUT_DIR").path();
        if path.extension().is_some_and(|e| e == "rs") {
            let text = fs::read_to_string(&path).expect("reading generated code");
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    !(l.starts_with("#![") || l.starts_with("//!"))
                })
                .collect();
            fs::write(&path, kept.join("\n")).expect("writing generated code");
        }
    }
}

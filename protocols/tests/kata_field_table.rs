//! Our protos against Kata Containers' own numbers. `data/kata-fields.txt`
//! lists every RPC, message field and enum value of Kata's agent API as
//! written in Kata's protos; these tests walk the descriptors generated from
//! *our* protos and fail, naming the culprit, for anything we declare that
//! Kata does not have or numbers differently. A Kata runtime and our agent
//! then read each other's bytes the same way.

use std::collections::{BTreeSet, HashMap};

use kestrel_protocols::protobuf::descriptor::field_descriptor_proto::Type;
use kestrel_protocols::protobuf::reflect::{FieldDescriptor, FileDescriptor, MessageDescriptor};
use kestrel_protocols::{agent, csi, health, oci, types};

const TABLE: &str = include_str!("data/kata-fields.txt");

/// One field as Kata declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KataField {
    number: u32,
    label: String,
    ty: String,
}

#[derive(Default)]
struct Kata {
    /// (message, field name) -> field.
    fields: HashMap<(String, String), KataField>,
    /// (message, number) -> field name, to say what Kata has at a number.
    names: HashMap<(String, u32), String>,
    messages: BTreeSet<String>,
    /// (enum, value name) -> number.
    enum_values: HashMap<(String, String), i32>,
    /// (service, method) -> (request type, response type).
    rpcs: HashMap<(String, String), (String, String)>,
}

fn kata() -> Kata {
    let mut kata = Kata::default();
    for (n, line) in TABLE.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["message", message] => {
                kata.messages.insert(message.to_string());
            }
            ["field", message, number, name, label, ty] => {
                let number: u32 = number.parse().unwrap_or_else(|_| unreadable(n, line));
                kata.names
                    .insert((message.to_string(), number), name.to_string());
                let field = KataField {
                    number,
                    label: label.to_string(),
                    ty: ty.to_string(),
                };
                kata.fields
                    .insert((message.to_string(), name.to_string()), field);
            }
            ["enum", enumeration, number, name] => {
                let number: i32 = number.parse().unwrap_or_else(|_| unreadable(n, line));
                kata.enum_values
                    .insert((enumeration.to_string(), name.to_string()), number);
            }
            ["rpc", service, method, request, response] => {
                kata.rpcs.insert(
                    (service.to_string(), method.to_string()),
                    (request.to_string(), response.to_string()),
                );
            }
            _ => unreadable(n, line),
        }
    }
    kata
}

fn unreadable(index: usize, line: &str) -> ! {
    panic!("kata-fields.txt line {}: cannot read {line:?}", index + 1)
}

fn our_files() -> [&'static FileDescriptor; 5] {
    [
        agent::file_descriptor(),
        oci::file_descriptor(),
        types::file_descriptor(),
        csi::file_descriptor(),
        health::file_descriptor(),
    ]
}

/// Every message our protos declare, nested ones included, map entries
/// (an encoding detail of `map<,>` fields) left out.
fn our_messages() -> Vec<MessageDescriptor> {
    fn walk(m: MessageDescriptor, out: &mut Vec<MessageDescriptor>) {
        if m.is_map_entry() {
            return;
        }
        for nested in m.nested_messages() {
            walk(nested, out);
        }
        out.push(m);
    }
    let mut out = Vec::new();
    for file in our_files() {
        for m in file.messages() {
            walk(m, &mut out);
        }
    }
    out
}

/// A field's type as the table writes it: proto scalar names, full names
/// of messages and enums, `map<K,V>`.
fn type_name(field: &FieldDescriptor) -> String {
    let proto = field.proto();
    if field.is_map() {
        let entry_name = proto.type_name().trim_start_matches('.');
        let entry = field
            .containing_message()
            .nested_messages()
            .find(|m| m.full_name() == entry_name)
            .unwrap_or_else(|| panic!("{}: no map entry {entry_name}", field.full_name()));
        let part = |n| {
            type_name(
                &entry
                    .field_by_number(n)
                    .expect("map entries have key and value"),
            )
        };
        return format!("map<{},{}>", part(1), part(2));
    }
    match proto.type_() {
        Type::TYPE_DOUBLE => "double",
        Type::TYPE_FLOAT => "float",
        Type::TYPE_INT64 => "int64",
        Type::TYPE_UINT64 => "uint64",
        Type::TYPE_INT32 => "int32",
        Type::TYPE_FIXED64 => "fixed64",
        Type::TYPE_FIXED32 => "fixed32",
        Type::TYPE_BOOL => "bool",
        Type::TYPE_STRING => "string",
        Type::TYPE_BYTES => "bytes",
        Type::TYPE_UINT32 => "uint32",
        Type::TYPE_SFIXED32 => "sfixed32",
        Type::TYPE_SFIXED64 => "sfixed64",
        Type::TYPE_SINT32 => "sint32",
        Type::TYPE_SINT64 => "sint64",
        Type::TYPE_GROUP => "group",
        Type::TYPE_MESSAGE | Type::TYPE_ENUM => proto.type_name().trim_start_matches('.'),
    }
    .to_string()
}

fn label(field: &FieldDescriptor) -> String {
    if field.is_map() {
        "map".into()
    } else if let Some(oneof) = field.containing_oneof() {
        format!("oneof:{}", oneof.name())
    } else if field.proto().proto3_optional() {
        "optional".into()
    } else if field.is_repeated() {
        "repeated".into()
    } else {
        "plain".into()
    }
}

fn fail_with(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "our protos disagree with Kata's (protocols/tests/data/kata-fields.txt):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_field_we_declare_has_katas_name_number_and_type() {
    let kata = kata();
    let mut problems = Vec::new();
    for message in our_messages() {
        let m = message.full_name();
        if !kata.messages.contains(m) {
            problems.push(format!("message {m}: Kata has no such message"));
            continue;
        }
        for field in message.fields() {
            let ours = KataField {
                number: field.number() as u32,
                label: label(&field),
                ty: type_name(&field),
            };
            let name = field.name();
            match kata.fields.get(&(m.to_string(), name.to_string())) {
                None => {
                    let number = ours.number;
                    let theirs = kata
                        .names
                        .get(&(m.to_string(), number))
                        .map_or(format!("nothing at {number}"), |n| {
                            format!("`{n}` at {number}")
                        });
                    problems.push(format!(
                        "{m}.{name} = {number}: Kata has no such field (it has {theirs})"
                    ));
                }
                Some(theirs) if *theirs != ours => problems.push(format!(
                    "{m}.{name}: ours is {} {} = {}, Kata's is {} {} = {}",
                    ours.label, ours.ty, ours.number, theirs.label, theirs.ty, theirs.number
                )),
                Some(_) => {}
            }
        }
    }
    fail_with(problems);
}

#[test]
fn every_enum_value_we_declare_has_katas_number() {
    let kata = kata();
    let mut enums: Vec<_> = our_files().iter().flat_map(|f| f.enums()).collect();
    enums.extend(our_messages().iter().flat_map(|m| m.nested_enums()));
    let mut problems = Vec::new();
    for e in enums {
        for value in e.values() {
            let key = (e.full_name().to_string(), value.name().to_string());
            match kata.enum_values.get(&key) {
                None => problems.push(format!("{}.{}: Kata has no such value", key.0, key.1)),
                Some(&n) if n != value.value() => problems.push(format!(
                    "{}.{} = {}: Kata's number is {n}",
                    key.0,
                    key.1,
                    value.value()
                )),
                Some(_) => {}
            }
        }
    }
    fail_with(problems);
}

#[test]
fn we_declare_every_kata_rpc_with_its_types() {
    let kata = kata();
    let mut ours = HashMap::new();
    for file in our_files() {
        for service in file.services() {
            let name = format!("{}.{}", file.package(), service.proto().name());
            for method in service.methods() {
                ours.insert(
                    (name.clone(), method.proto().name().to_string()),
                    (
                        method.input_type().full_name().to_string(),
                        method.output_type().full_name().to_string(),
                    ),
                );
            }
        }
    }
    let mut problems = Vec::new();
    for (key, theirs) in &kata.rpcs {
        match ours.get(key) {
            None => problems.push(format!("{}/{}: Kata has it, we do not", key.0, key.1)),
            Some(mine) if mine != theirs => problems.push(format!(
                "{}/{}: ours is {mine:?}, Kata's is {theirs:?}",
                key.0, key.1
            )),
            Some(_) => {}
        }
    }
    for key in ours.keys().filter(|k| !kata.rpcs.contains_key(*k)) {
        problems.push(format!("{}/{}: Kata has no such method", key.0, key.1));
    }
    problems.sort();
    fail_with(problems);
}

/// One value of a field in Kata's encoding: the tag with Kata's number and
/// a non-default payload of the wire type Kata's type asks for.
fn encode_with_katas_number(field: &KataField) -> Vec<u8> {
    const VARINT: u32 = 0;
    const FIXED64: u32 = 1;
    const LEN: u32 = 2;
    const FIXED32: u32 = 5;
    let (wire, payload): (u32, &[u8]) = match field.ty.as_str() {
        "double" | "fixed64" | "sfixed64" => (FIXED64, &[1, 0, 0, 0, 0, 0, 0, 0]),
        "float" | "fixed32" | "sfixed32" => (FIXED32, &[1, 0, 0, 0]),
        "string" | "bytes" => (LEN, &[1, b'x']),
        "int32" | "int64" | "uint32" | "uint64" | "sint32" | "sint64" | "bool" => (VARINT, &[1]),
        // A message, or one map entry: present but empty.
        _ => (LEN, &[0]),
    };
    let mut bytes = varint(u64::from((field.number << 3) | wire));
    bytes.extend_from_slice(payload);
    bytes
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

#[test]
fn bytes_written_with_katas_numbers_decode_into_our_fields() {
    let kata = kata();
    let enums: BTreeSet<String> = kata.enum_values.keys().map(|(e, _)| e.clone()).collect();
    let mut problems = Vec::new();
    for message in our_messages() {
        for field in message.fields() {
            let key = (message.full_name().to_string(), field.name().to_string());
            // A field Kata lacks is the other test's failure.
            let Some(theirs) = kata.fields.get(&key) else {
                continue;
            };
            let mut theirs = theirs.clone();
            if enums.contains(&theirs.ty) {
                theirs.ty = "int32".into();
            }
            let bytes = encode_with_katas_number(&theirs);
            let decoded = match message.parse_from_bytes(&bytes) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(format!("{}.{}: does not decode: {e}", key.0, key.1));
                    continue;
                }
            };
            let set = if field.is_map() {
                field.get_map(&*decoded).len() == 1
            } else if field.is_repeated() {
                field.get_repeated(&*decoded).len() == 1
            } else {
                field.has_field(&*decoded)
            };
            let unknown = decoded.unknown_fields_dyn().iter().count();
            if !set || unknown != 0 {
                problems.push(format!(
                    "{}.{}: Kata's field {} did not land in it ({unknown} unknown fields)",
                    key.0, key.1, theirs.number
                ));
            }
        }
    }
    fail_with(problems);
}

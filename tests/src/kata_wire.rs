//! A Kata agent client that owes nothing to our own protos or generated
//! code: messages are encoded from Kata's field table
//! (`protocols/tests/data/kata-fields.txt`, copied line by line from Kata's
//! `.proto` files), by field *name*, with a protobuf encoder written here,
//! and sent as raw ttrpc requests. What a Kata runtime puts on the wire
//! for a name is what this puts there, so a test driving our agent with it
//! shows a Kata runtime would be understood — and where our protos drifted
//! from Kata's, this client would not.

use std::collections::HashMap;
use std::sync::OnceLock;

/// One field of Kata's table.
#[derive(Debug, Clone)]
struct Field {
    number: u32,
    label: String,
    ty: String,
}

/// Kata's messages: message name → field name → field.
fn table() -> &'static HashMap<String, HashMap<String, Field>> {
    static TABLE: OnceLock<HashMap<String, HashMap<String, Field>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let text = include_str!("../../protocols/tests/data/kata-fields.txt");
        let mut messages: HashMap<String, HashMap<String, Field>> = HashMap::new();
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["message", message] = words[..] {
                messages.entry(message.to_string()).or_default();
            }
            if let ["field", message, number, name, label, ty, ..] = words[..] {
                messages.entry(message.to_string()).or_default().insert(
                    name.to_string(),
                    Field {
                        number: number.parse().expect("field number"),
                        label: label.to_string(),
                        ty: ty.to_string(),
                    },
                );
            }
        }
        messages
    })
}

fn field(message: &str, name: &str) -> Field {
    table()
        .get(message)
        .unwrap_or_else(|| panic!("Kata has no message {message}"))
        .get(name)
        .unwrap_or_else(|| panic!("Kata's {message} has no field {name}"))
        .clone()
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Vec<u8>, number: u32, wire_type: u8) {
    varint(out, (u64::from(number) << 3) | u64::from(wire_type));
}

/// A Kata message being encoded, fields set by name.
#[derive(Debug, Clone)]
pub struct Msg {
    name: String,
    bytes: Vec<u8>,
}

impl Msg {
    /// An empty message of Kata's type `name` (`grpc.CreateSandboxRequest`,
    /// `oci.Spec`, …).
    pub fn new(name: &str) -> Msg {
        assert!(table().contains_key(name), "Kata has no message {name}");
        Msg {
            name: name.into(),
            bytes: Vec::new(),
        }
    }

    /// A string (or bytes) field; call again for each entry of a repeated one.
    pub fn str(mut self, name: &str, value: &str) -> Msg {
        let f = field(&self.name, name);
        assert!(
            matches!(f.ty.as_str(), "string" | "bytes"),
            "{}.{name} is {}, not a string",
            self.name,
            f.ty
        );
        key(&mut self.bytes, f.number, 2);
        varint(&mut self.bytes, value.len() as u64);
        self.bytes.extend_from_slice(value.as_bytes());
        self
    }

    /// Each of `values` as an entry of the repeated string field `name`.
    pub fn strs(self, name: &str, values: &[&str]) -> Msg {
        values.iter().fold(self, |m, v| m.str(name, v))
    }

    /// An integer, bool or enum field.
    pub fn int(mut self, name: &str, value: u64) -> Msg {
        let f = field(&self.name, name);
        assert!(
            !matches!(f.ty.as_str(), "string" | "bytes") && f.label != "map",
            "{}.{name} is {}, not a number",
            self.name,
            f.ty
        );
        key(&mut self.bytes, f.number, 0);
        varint(&mut self.bytes, value);
        self
    }

    /// A message field (or one entry of a repeated one).
    pub fn msg(mut self, name: &str, value: Msg) -> Msg {
        let f = field(&self.name, name);
        let expected = f.ty.trim_start_matches('.');
        assert!(
            expected == value.name
                || expected.ends_with(&format!(".{}", value.name))
                || value.name.ends_with(expected),
            "{}.{name} is {}, not {}",
            self.name,
            f.ty,
            value.name
        );
        key(&mut self.bytes, f.number, 2);
        varint(&mut self.bytes, value.bytes.len() as u64);
        self.bytes.extend_from_slice(&value.bytes);
        self
    }

    /// One entry of a `map<string, string>` field.
    pub fn map_entry(mut self, name: &str, k: &str, v: &str) -> Msg {
        let f = field(&self.name, name);
        assert_eq!(f.label, "map", "{}.{name} is not a map", self.name);
        let mut entry = Vec::new();
        for (number, text) in [(1, k), (2, v)] {
            key(&mut entry, number, 2);
            varint(&mut entry, text.len() as u64);
            entry.extend_from_slice(text.as_bytes());
        }
        key(&mut self.bytes, f.number, 2);
        varint(&mut self.bytes, entry.len() as u64);
        self.bytes.extend_from_slice(&entry);
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// The varint field `name` of a Kata `message` in `bytes` (0 if absent,
/// as protobuf reads it).
pub fn read_int(message: &str, name: &str, bytes: &[u8]) -> u64 {
    let want = field(message, name).number;
    let mut at = 0;
    let mut found = 0;
    let read_varint = |at: &mut usize| -> u64 {
        let mut value = 0u64;
        let mut shift = 0;
        loop {
            let byte = bytes[*at];
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return value;
            }
            shift += 7;
        }
    };
    while at < bytes.len() {
        let k = read_varint(&mut at);
        let (number, wire_type) = ((k >> 3) as u32, (k & 7) as u8);
        match wire_type {
            0 => {
                let v = read_varint(&mut at);
                if number == want {
                    found = v;
                }
            }
            2 => {
                let len = read_varint(&mut at) as usize;
                at += len;
            }
            5 => at += 4,
            1 => at += 8,
            other => panic!("wire type {other} in {message}"),
        }
    }
    found
}

/// Sends `payload` as `grpc.AgentService/method` and returns the response
/// payload, or the status the agent answered with.
pub async fn call(
    client: &kestrel_protocols::ttrpc::asynchronous::Client,
    method: &str,
    payload: Vec<u8>,
) -> Result<Vec<u8>, kestrel_protocols::ttrpc::Status> {
    use kestrel_protocols::ttrpc;
    let req = ttrpc::Request {
        service: "grpc.AgentService".into(),
        method: method.into(),
        payload,
        timeout_nano: 60_000_000_000,
        ..Default::default()
    };
    let response = client.request(req).await.map_err(|e| match e {
        ttrpc::Error::RpcStatus(status) => status,
        other => {
            let mut status = ttrpc::Status::new();
            status.message = other.to_string();
            status
        }
    })?;
    Ok(response.payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kata_numbers_are_read_from_the_table() {
        // CreateSandboxRequest.hostname is field 1 (a string: key 0x0a).
        let bytes = Msg::new("grpc.CreateSandboxRequest")
            .str("hostname", "h")
            .into_bytes();
        assert_eq!(bytes, [0x0a, 1, b'h']);
        let status = Msg::new("grpc.WaitProcessResponse")
            .int("status", 300)
            .into_bytes();
        assert_eq!(read_int("grpc.WaitProcessResponse", "status", &status), 300);
    }
}

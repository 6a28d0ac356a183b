//! The audit record's "which ids": for each audited RPC ([`crate::access::RULES`]), the top-level
//! request fields named `id`, `*_id`, `*_ids` (or listed in its rule) with a scalar type, found
//! once in the served descriptor set; [`AuditFields::extract`] reads them from the request's
//! protobuf bytes without knowing the message type, so no handler is touched and a new RPC needs
//! no code. Values are capped (20 per field, 128 characters each; control characters replaced)
//! so the record stays small and storable (PostgreSQL `jsonb` refuses NUL).

use std::collections::HashMap;

use prost::Message as _;
use prost_types::field_descriptor_proto::{Label, Type};
use serde_json::{Map, Value};

use crate::access::RULES;

const MAX_VALUES: usize = 20;
const MAX_CHARS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Signed,
    Unsigned,
    Bool,
}

#[derive(Debug, Clone)]
struct Field {
    name: String,
    kind: Kind,
    repeated: bool,
}

/// The recorded fields of every audited RPC, by method path and field number.
#[derive(Debug, Clone, Default)]
pub struct AuditFields {
    by_path: HashMap<String, HashMap<u32, Field>>,
}

impl AuditFields {
    /// From the encoded descriptor sets of the services served.
    pub fn new(descriptor_sets: &[&[u8]]) -> Self {
        let mut messages = HashMap::new();
        let mut inputs = HashMap::new();
        for set in descriptor_sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
                continue;
            };
            for file in set.file {
                let package = file.package().to_owned();
                for message in &file.message_type {
                    messages.insert(format!(".{package}.{}", message.name()), message.clone());
                }
                for service in &file.service {
                    for method in &service.method {
                        let path = format!("/{package}.{}/{}", service.name(), method.name());
                        inputs.insert(path, method.input_type().to_owned());
                    }
                }
            }
        }
        let mut by_path = HashMap::new();
        for rule in RULES {
            let (Some(extra), Some(input)) = (rule.audit, inputs.get(rule.path)) else {
                continue;
            };
            let Some(message) = messages.get(input) else {
                continue;
            };
            let mut fields = HashMap::new();
            for field in &message.field {
                let name = field.name();
                let wanted = name == "id"
                    || name.ends_with("_id")
                    || name.ends_with("_ids")
                    || extra.contains(&name);
                let kind = match field.r#type() {
                    Type::String => Kind::Text,
                    Type::Int64 | Type::Int32 | Type::Enum => Kind::Signed,
                    Type::Uint64 | Type::Uint32 => Kind::Unsigned,
                    Type::Bool => Kind::Bool,
                    _ => continue,
                };
                if wanted {
                    let Ok(number) = u32::try_from(field.number()) else {
                        continue;
                    };
                    fields.insert(
                        number,
                        Field {
                            name: name.to_owned(),
                            kind,
                            repeated: field.label() == Label::Repeated,
                        },
                    );
                }
            }
            by_path.insert(rule.path.to_owned(), fields);
        }
        Self { by_path }
    }

    /// The recorded fields of the request `message` (protobuf bytes, no gRPC frame) of `path`,
    /// as a JSON object; whatever does not parse is left out.
    pub fn extract(&self, path: &str, message: &[u8]) -> Value {
        let mut out = Map::new();
        let Some(fields) = self.by_path.get(path) else {
            return Value::Object(out);
        };
        let mut reader = Reader(message);
        while let Some(tag) = reader.varint() {
            let (number, wire) = ((tag >> 3) as u32, tag & 7);
            let field = fields.get(&number);
            let mut values = Vec::new();
            match wire {
                0 => {
                    let Some(v) = reader.varint() else { break };
                    if let Some(f) = field {
                        values.push(scalar(f.kind, v));
                    }
                }
                1 => {
                    if reader.take(8).is_none() {
                        break;
                    }
                }
                5 => {
                    if reader.take(4).is_none() {
                        break;
                    }
                }
                2 => {
                    let Some(len) = reader.varint().and_then(|l| usize::try_from(l).ok()) else {
                        break;
                    };
                    let Some(bytes) = reader.take(len) else { break };
                    match field {
                        Some(f) if f.kind == Kind::Text => {
                            values.push(Value::String(clean(&String::from_utf8_lossy(bytes))))
                        }
                        // Packed repeated numbers.
                        Some(f) => {
                            let mut packed = Reader(bytes);
                            while let Some(v) = packed.varint() {
                                values.push(scalar(f.kind, v));
                            }
                        }
                        None => {}
                    }
                }
                _ => break,
            }
            let Some(f) = field else { continue };
            for value in values {
                if f.repeated {
                    let entry = out
                        .entry(f.name.clone())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Value::Array(list) = entry
                        && list.len() < MAX_VALUES
                    {
                        list.push(value);
                    }
                } else {
                    out.insert(f.name.clone(), value);
                }
            }
        }
        Value::Object(out)
    }
}

fn scalar(kind: Kind, v: u64) -> Value {
    match kind {
        Kind::Signed => Value::from(v as i64),
        Kind::Bool => Value::Bool(v != 0),
        Kind::Unsigned | Kind::Text => Value::from(v),
    }
}

/// At most [`MAX_CHARS`] characters, control characters (NUL included) replaced.
fn clean(text: &str) -> String {
    text.chars()
        .take(MAX_CHARS)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.0.split_first()?;
            self.0 = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
}

/// The message of a gRPC-framed request body (uncompressed, one message); `None` otherwise.
pub fn first_message(body: &[u8]) -> Option<&[u8]> {
    let (&compressed, rest) = body.split_first()?;
    if compressed != 0 || rest.len() < 4 {
        return None;
    }
    let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    rest.get(4..4 + len)
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use sharpsend_proto::v1 as pb;

    use super::*;

    fn fields() -> AuditFields {
        AuditFields::new(&[sharpsend_proto::FILE_DESCRIPTOR_SET])
    }

    #[test]
    fn ids_and_named_fields_come_out_of_the_request_bytes() {
        let request = pb::SendAssignmentRequest {
            assignment_id: "a-1".into(),
            request_id: "r\0x".into(),
            title: "not recorded".into(),
            segment_ids: vec![3, -4],
            ..Default::default()
        };
        let ids = fields().extract(
            "/sharpsend.cio.v1.CampaignService/SendAssignment",
            &request.encode_to_vec(),
        );
        assert_eq!(
            ids,
            serde_json::json!({"assignment_id": "a-1", "request_id": "r\u{FFFD}x", "segment_ids": [3, -4]})
        );
        let run = pb::RunJobRequest {
            job: "segment-sync".into(),
            request_id: String::new(),
        };
        let ids = fields().extract("/sharpsend.cio.v1.OpsService/RunJob", &run.encode_to_vec());
        assert_eq!(ids, serde_json::json!({"job": "segment-sync"}));
    }

    #[test]
    fn workspace_audits_record_ids_and_names_never_a_credential() {
        let create = pb::CreateWorkspaceRequest {
            site_id: "site-9".into(),
            region: "eu".into(),
            track_api_key: "TRACK-SECRET".into(),
            app_api_key: "APP-SECRET".into(),
            webhook_signing_key: "HOOK-SECRET".into(),
            name: "Pub".into(),
            ..Default::default()
        };
        let update = pb::UpdateWorkspaceRequest {
            id: 7,
            track_api_key: "TRACK-SECRET".into(),
            app_api_key: "APP-SECRET".into(),
            webhook_signing_key: "HOOK-SECRET".into(),
            ..Default::default()
        };
        let f = fields();
        let created = f.extract(
            "/sharpsend.cio.v1.AdminService/CreateWorkspace",
            &create.encode_to_vec(),
        );
        assert_eq!(
            created,
            serde_json::json!({"site_id": "site-9", "region": "eu", "name": "Pub"})
        );
        let updated = f.extract(
            "/sharpsend.cio.v1.AdminService/UpdateWorkspace",
            &update.encode_to_vec(),
        );
        assert_eq!(updated, serde_json::json!({"id": 7}));
        for text in [created.to_string(), updated.to_string()] {
            assert!(!text.contains("SECRET"), "{text}");
        }
    }

    #[test]
    fn garbage_reads_and_unaudited_rpcs_give_no_ids() {
        let f = fields();
        assert_eq!(
            f.extract(
                "/sharpsend.cio.v1.SegmentService/ListSegments",
                b"\x0a\x01x"
            ),
            serde_json::json!({})
        );
        let _ = f.extract(
            "/sharpsend.cio.v1.CampaignService/SendAssignment",
            &[0xff, 0xff, 0xff, 0x0a, 0xff],
        );
        let long = pb::AddSegmentMembersRequest {
            segment_id: 9,
            customer_ids: (0..100).map(|i| format!("c{i}")).collect(),
        };
        let ids = f.extract(
            "/sharpsend.cio.v1.SegmentService/AddSegmentMembers",
            &long.encode_to_vec(),
        );
        assert_eq!(ids["segment_id"], 9);
        assert_eq!(
            ids["customer_ids"].as_array().map(Vec::len),
            Some(MAX_VALUES)
        );
    }

    #[test]
    fn the_first_message_of_a_frame() {
        assert_eq!(first_message(&[0, 0, 0, 0, 2, 8, 1]), Some(&[8u8, 1][..]));
        assert_eq!(first_message(&[1, 0, 0, 0, 2, 8, 1]), None);
        assert_eq!(first_message(&[0, 0, 0, 0, 9, 8, 1]), None);
    }
}

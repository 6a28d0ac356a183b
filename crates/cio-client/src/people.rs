//! Writes about people (Track API): v1 identify and events, the calls the official SDKs make,
//! and v2 person operations ([`PersonOp`]) sent one at a time (`/api/v2/entity`) or batched
//! (`/api/v2/batch`).
//!
//! Every call here is retried on 408/429/5xx, timeouts and lost connections: an identify
//! re-applied sets the same attributes, and every event carries an `id` (a ULID) on which
//! Customer.io drops repeats. That id is therefore required and checked locally ([`is_ulid`]).
//!
//! Sizes: the 2026 Track spec limits a v2 operation (and an `/entity` request) to "32kb" and a
//! batch request to "500kb" without saying whether a kb is 1000 or 1024 bytes. The limits here
//! ([`MAX_OP_BYTES`], [`MAX_BATCH_BYTES`]) take the smaller reading, so a request within them is
//! within the limit under either. To pack batches without serialising twice, encode each op
//! once ([`PersonOp::encode`]), measure it ([`EncodedOp::len`], [`batch_body_len`]) and send the
//! encoded ops ([`CioClient::batch_encoded`]).

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::client::CioClient;
use crate::endpoint::{Endpoint, endpoints};
use crate::error::CioError;
use crate::serde_util;

/// Largest v2 operation, in bytes of JSON: the spec's "32kb", read as 32 × 1000 (the smaller
/// of the two readings). Applies to each op of a batch and to an `/api/v2/entity` request.
pub const MAX_OP_BYTES: usize = 32 * 1000;

/// Largest `/api/v2/batch` request body, in bytes: the spec's "500kb", read as 500 × 1000
/// (the smaller of the two readings).
pub const MAX_BATCH_BYTES: usize = 500 * 1000;

const BATCH_PREFIX: &str = r#"{"batch":["#;
const BATCH_SUFFIX: &str = "]}";

/// Bytes a batch body adds around its ops: `{"batch":[` and `]}`. Ops are joined by one comma,
/// so a body of ops `a, b, c` is `BATCH_ENVELOPE_BYTES + a + b + c + 2` bytes
/// ([`batch_body_len`]).
pub const BATCH_ENVELOPE_BYTES: usize = BATCH_PREFIX.len() + BATCH_SUFFIX.len();

/// How an App API call reads a customer identifier (`id_type` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdType {
    /// The workspace's own customer id (Customer.io's default).
    #[default]
    Id,
    /// An email address.
    Email,
    /// Customer.io's `cio_id`.
    CioId,
}

impl IdType {
    /// `"id"`, `"email"` or `"cio_id"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            IdType::Id => "id",
            IdType::Email => "email",
            IdType::CioId => "cio_id",
        }
    }
}

/// The one identifier of a person in a v2 operation; serialises as `{"id":..}`,
/// `{"email":..}` or `{"cio_id":..}` (the spec allows exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Identifier {
    /// The workspace's customer id.
    Id(String),
    /// Email (only if the workspace identifies people by email).
    Email(String),
    /// Customer.io's `cio_id`.
    CioId(String),
}

impl Identifier {
    /// Which kind of identifier this is.
    pub fn id_type(&self) -> IdType {
        match self {
            Identifier::Id(_) => IdType::Id,
            Identifier::Email(_) => IdType::Email,
            Identifier::CioId(_) => IdType::CioId,
        }
    }

    /// The identifier's value.
    pub fn value(&self) -> &str {
        match self {
            Identifier::Id(v) | Identifier::Email(v) | Identifier::CioId(v) => v,
        }
    }

    /// The form a Track v1 path takes: the id or email as is, `cio_<cio_id>` for a `cio_id`.
    pub fn track_path_value(&self) -> String {
        match self {
            Identifier::Id(v) | Identifier::Email(v) => v.clone(),
            Identifier::CioId(v) => format!("cio_{v}"),
        }
    }
}

/// A custom event for a person. As a v1 body (`POST /api/v1/customers/{identifier}/events`) it
/// serialises as `{"name","id","timestamp"?,"data"}`; inside a v2 op the data goes under
/// `attributes` (see [`PersonOp`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Event name (Customer.io allows 100 bytes).
    pub name: String,
    /// A ULID unique to this event (never a customer id): Customer.io drops an event whose id
    /// it has already seen, which is what makes sending it again safe.
    pub id: String,
    /// When it happened, unix seconds; `None`: when Customer.io receives it. Only events of the
    /// last 72 hours trigger campaigns.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<i64>,
    /// Event data (Customer.io allows 100,000 bytes), usable in liquid.
    pub data: Map<String, Value>,
}

impl Event {
    /// An event with no timestamp and no data.
    pub fn new(name: impl Into<String>, id: impl Into<String>) -> Self {
        Event {
            name: name.into(),
            id: id.into(),
            timestamp: None,
            data: Map::new(),
        }
    }
}

/// What a [`PersonOp`] does.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum PersonAction {
    /// Create or update the person with these attributes (`"action":"identify"`).
    Identify {
        /// Attributes to set (reserved ones such as `_update` included).
        attributes: Map<String, Value>,
    },
    /// A custom event (`"action":"event"`); its `data` is sent as the op's `attributes`.
    Event(Event),
}

/// One v2 person operation, as the 2026 Track spec's `identify_person` and `person_event`:
///
/// ```json
/// {"type":"person","identifiers":{"id":"42"},"action":"identify","attributes":{"plan":"premium"}}
/// {"type":"person","identifiers":{"id":"42"},"action":"event","name":"purchase",
///  "id":"01JDQ7Y1M3E3XH5Q9W9G1K2ZQ4","timestamp":1772013598,"attributes":{"price":29.99}}
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PersonOp {
    /// The person.
    pub identifier: Identifier,
    /// What to do.
    pub action: PersonAction,
}

impl PersonOp {
    /// Create or update `identifier` with `attributes`.
    pub fn identify(identifier: Identifier, attributes: Map<String, Value>) -> Self {
        PersonOp {
            identifier,
            action: PersonAction::Identify { attributes },
        }
    }

    /// Event `name` for `identifier`; `id` must be a ULID unique to this event.
    pub fn event(
        identifier: Identifier,
        name: impl Into<String>,
        id: impl Into<String>,
        timestamp: Option<i64>,
        data: Map<String, Value>,
    ) -> Self {
        PersonOp {
            identifier,
            action: PersonAction::Event(Event {
                name: name.into(),
                id: id.into(),
                timestamp,
                data,
            }),
        }
    }

    /// Checks the op and serialises it once. Fails with [`CioError::Config`] (nothing is sent)
    /// when an event id is not a ULID, an identifier is empty, or the JSON exceeds
    /// [`MAX_OP_BYTES`].
    pub fn encode(&self) -> Result<EncodedOp, CioError> {
        if self.identifier.value().is_empty() {
            return Err(invalid("the person identifier is empty"));
        }
        if let PersonAction::Event(event) = &self.action {
            check_event_id(&event.id)?;
        }
        let json = serde_json::to_string(self)
            .map_err(|e| invalid(&format!("serialising a v2 operation: {e}")))?;
        if json.len() > MAX_OP_BYTES {
            return Err(invalid(&format!(
                "a v2 operation is {} bytes, over the {MAX_OP_BYTES}-byte limit",
                json.len()
            )));
        }
        Ok(EncodedOp { json })
    }
}

#[derive(Serialize)]
struct IdentifyWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    identifiers: &'a Identifier,
    action: &'static str,
    attributes: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct EventWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    identifiers: &'a Identifier,
    action: &'static str,
    name: &'a str,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    attributes: &'a Map<String, Value>,
}

impl Serialize for PersonOp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let identifiers = &self.identifier;
        match &self.action {
            PersonAction::Identify { attributes } => IdentifyWire {
                kind: "person",
                identifiers,
                action: "identify",
                attributes,
            }
            .serialize(serializer),
            PersonAction::Event(event) => EventWire {
                kind: "person",
                identifiers,
                action: "event",
                name: &event.name,
                id: &event.id,
                timestamp: event.timestamp,
                attributes: &event.data,
            }
            .serialize(serializer),
        }
    }
}

/// The wire shape read back ([`PersonOp`]'s `Deserialize`), e.g. from an outbox row.
#[derive(Deserialize)]
struct OpWire {
    #[serde(rename = "type")]
    kind: String,
    identifiers: Identifier,
    action: String,
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    attributes: Map<String, Value>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    timestamp: Option<i64>,
}

impl<'de> Deserialize<'de> for PersonOp {
    /// Reads the JSON [`Serialize`] writes (the v2 wire shape); only person `identify` and
    /// `event` ops, events with a `name` and an `id`.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let wire = OpWire::deserialize(deserializer)?;
        if wire.kind != "person" {
            return Err(D::Error::custom(format!(
                "expected a person operation, got type {:?}",
                wire.kind
            )));
        }
        match wire.action.as_str() {
            "identify" => Ok(PersonOp::identify(wire.identifiers, wire.attributes)),
            "event" => {
                let name = wire.name.ok_or_else(|| D::Error::missing_field("name"))?;
                let id = wire.id.ok_or_else(|| D::Error::missing_field("id"))?;
                Ok(PersonOp::event(
                    wire.identifiers,
                    name,
                    id,
                    wire.timestamp,
                    wire.attributes,
                ))
            }
            other => Err(D::Error::custom(format!(
                "unsupported person action {other:?}"
            ))),
        }
    }
}

/// A checked [`PersonOp`] serialised once: measure it with [`len`](Self::len), pack it into
/// batches with [`batch_body_len`], send it with [`CioClient::batch_encoded`]. At most
/// [`MAX_OP_BYTES`] long by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedOp {
    json: String,
}

impl EncodedOp {
    /// Size of the op's JSON in bytes.
    pub fn len(&self) -> usize {
        self.json.len()
    }

    /// Always false (an op is a JSON object); present for the `len` convention.
    pub fn is_empty(&self) -> bool {
        self.json.is_empty()
    }

    /// The op's JSON.
    pub fn as_str(&self) -> &str {
        &self.json
    }
}

/// Exact size in bytes of the `/api/v2/batch` body carrying `ops`. A batch may be sent while
/// this is at most [`MAX_BATCH_BYTES`]; adding one more op of `n` bytes adds `n + 1`.
pub fn batch_body_len(ops: &[EncodedOp]) -> usize {
    BATCH_ENVELOPE_BYTES
        + ops.iter().map(EncodedOp::len).sum::<usize>()
        + ops.len().saturating_sub(1)
}

pub(crate) fn batch_body(ops: &[EncodedOp]) -> Vec<u8> {
    let mut body = Vec::with_capacity(batch_body_len(ops));
    body.extend_from_slice(BATCH_PREFIX.as_bytes());
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(op.json.as_bytes());
    }
    body.extend_from_slice(BATCH_SUFFIX.as_bytes());
    body
}

/// Whether `id` is a ULID: 26 Crockford base32 characters (any case, no I, L, O or U), the
/// first at most `7`. Customer.io deduplicates events on this id.
pub fn is_ulid(id: &str) -> bool {
    let bytes = id.as_bytes();
    bytes.len() == 26
        && bytes[0] <= b'7'
        && bytes.iter().all(|b| {
            matches!(
                b.to_ascii_uppercase(),
                b'0'..=b'9' | b'A'..=b'H' | b'J' | b'K' | b'M' | b'N' | b'P'..=b'T' | b'V'..=b'Z'
            )
        })
}

fn invalid(message: &str) -> CioError {
    CioError::Config {
        message: message.to_owned(),
    }
}

fn check_event_id(id: &str) -> Result<(), CioError> {
    if is_ulid(id) {
        Ok(())
    } else {
        // The value stays out of the message, like every id in this crate's errors.
        Err(invalid(
            "an event id must be a ULID unique to the event: Customer.io deduplicates on it, \
             which is what makes retrying safe",
        ))
    }
}

fn check_path_value(what: &str, value: &str) -> Result<(), CioError> {
    if value.is_empty() {
        Err(invalid(&format!("{what} is empty")))
    } else {
        Ok(())
    }
}

/// Result of a `/api/v2/batch` call that Customer.io answered with 200 or 207.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOutcome {
    /// The ops Customer.io refused (207); every other op was accepted. Empty after a 200. One
    /// op can have several entries (one per offending field).
    pub failures: Vec<BatchFailure>,
}

impl BatchOutcome {
    /// True when every op was accepted.
    pub fn all_accepted(&self) -> bool {
        self.failures.is_empty()
    }
}

/// One refused op of a batch (an item of a 207's `errors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFailure {
    /// 0-based position of the op in the batch sent (checked to be in range).
    pub batch_index: usize,
    /// Machine-readable reason, e.g. `"required"`.
    pub reason: Option<String>,
    /// The offending field, e.g. `"identifiers"`.
    pub field: Option<String>,
    /// Human-readable text (the reason when Customer.io sent no message).
    pub message: String,
}

#[derive(Deserialize)]
struct BatchErrors {
    #[serde(default, deserialize_with = "serde_util::null_as_default")]
    errors: Vec<RawFailure>,
}

#[derive(Deserialize)]
struct RawFailure {
    #[serde(default, deserialize_with = "serde_util::opt_i64")]
    batch_index: Option<i64>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    reason: Option<String>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    field: Option<String>,
    #[serde(default, deserialize_with = "serde_util::opt_string")]
    message: Option<String>,
}

/// Parses a 207 body for a batch of `op_count` ops. A 207 that does not say which ops failed
/// is an error: the caller then treats the whole batch as failed, which is safe to retry.
pub(crate) fn parse_batch_failures(
    body: &[u8],
    op_count: usize,
) -> Result<Vec<BatchFailure>, String> {
    let parsed: BatchErrors = serde_json::from_slice(body).map_err(|e| format!("207 body: {e}"))?;
    if parsed.errors.is_empty() {
        return Err("207 without errors".to_owned());
    }
    parsed
        .errors
        .into_iter()
        .map(|raw| {
            let batch_index = raw
                .batch_index
                .and_then(|i| usize::try_from(i).ok())
                .filter(|i| *i < op_count)
                .ok_or_else(|| {
                    format!(
                        "207 error with batch_index {:?} for a batch of {op_count}",
                        raw.batch_index
                    )
                })?;
            let message = raw
                .message
                .or_else(|| raw.reason.clone())
                .unwrap_or_default();
            Ok(BatchFailure {
                batch_index,
                reason: raw.reason,
                field: raw.field,
                message,
            })
        })
        .collect()
}

fn decode_error(endpoint: &Endpoint, message: String) -> CioError {
    CioError::Decode {
        api: endpoint.api,
        endpoint: endpoint.template,
        message,
    }
}

impl CioClient {
    /// `PUT /api/v1/customers/{identifier}` with `attributes` as the body: creates or updates
    /// a person, the way the official SDKs do. `customer_id` is an id, an email or
    /// `cio_<cio_id>` ([`Identifier::track_path_value`]).
    pub async fn identify(
        &self,
        customer_id: &str,
        attributes: &Map<String, Value>,
    ) -> Result<(), CioError> {
        check_path_value("customer id", customer_id)?;
        let _: IgnoredAny = self
            .request(&endpoints::IDENTIFY, &[customer_id], &[], Some(attributes))
            .await?;
        Ok(())
    }

    /// `POST /api/v1/customers/{identifier}/events`: one event for a person. The event's `id`
    /// must be a ULID ([`is_ulid`]; otherwise [`CioError::Config`], nothing sent).
    pub async fn track_event(&self, customer_id: &str, event: &Event) -> Result<(), CioError> {
        check_path_value("customer id", customer_id)?;
        check_event_id(&event.id)?;
        let _: IgnoredAny = self
            .request(&endpoints::TRACK_EVENT, &[customer_id], &[], Some(event))
            .await?;
        Ok(())
    }

    /// `POST /api/v2/entity`: one v2 operation.
    pub async fn entity(&self, op: &PersonOp) -> Result<(), CioError> {
        let op = op.encode()?;
        self.request_bytes(&endpoints::ENTITY, &[], &[], Some(op.json.into_bytes()))
            .await?;
        Ok(())
    }

    /// `POST /api/v2/batch`: encodes `ops` ([`PersonOp::encode`]; an invalid op fails the call
    /// before anything is sent, naming its index) and sends them as one batch
    /// ([`batch_encoded`](Self::batch_encoded)).
    pub async fn batch(&self, ops: &[PersonOp]) -> Result<BatchOutcome, CioError> {
        let encoded = ops
            .iter()
            .enumerate()
            .map(|(i, op)| {
                op.encode().map_err(|e| match e {
                    CioError::Config { message } => invalid(&format!("batch op {i}: {message}")),
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.batch_encoded(&encoded).await
    }

    /// `POST /api/v2/batch` with ops encoded beforehand. 200: all accepted; 207: the refused
    /// ops are listed in [`BatchOutcome::failures`] by index into `ops`, every other op was
    /// accepted (a 207 is neither an error nor retried). 400 (the whole batch refused) is
    /// [`CioError::Rejected`]; 408/429/5xx and lost connections are retried.
    ///
    /// No request is made for an empty `ops` (an empty outcome is returned); a body over
    /// [`MAX_BATCH_BYTES`] ([`batch_body_len`]) is a [`CioError::Config`] error.
    pub async fn batch_encoded(&self, ops: &[EncodedOp]) -> Result<BatchOutcome, CioError> {
        if ops.is_empty() {
            return Ok(BatchOutcome::default());
        }
        let size = batch_body_len(ops);
        if size > MAX_BATCH_BYTES {
            return Err(invalid(&format!(
                "a batch of {} ops is {size} bytes, over the {MAX_BATCH_BYTES}-byte limit",
                ops.len()
            )));
        }
        let endpoint = &endpoints::BATCH;
        let answer = self
            .request_bytes(endpoint, &[], &[], Some(batch_body(ops)))
            .await?;
        if answer.status != 207 {
            return Ok(BatchOutcome::default());
        }
        let failures = parse_batch_failures(&answer.body, ops.len())
            .map_err(|message| decode_error(endpoint, message))?;
        Ok(BatchOutcome { failures })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    const ULID: &str = "01JDQ7Y1M3E3XH5Q9W9G1K2ZQ4";

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn identifiers_serialise_as_single_key_objects() {
        let cases = [
            (Identifier::Id("42".into()), json!({"id":"42"}), IdType::Id),
            (
                Identifier::Email("a@b.io".into()),
                json!({"email":"a@b.io"}),
                IdType::Email,
            ),
            (
                Identifier::CioId("03000001".into()),
                json!({"cio_id":"03000001"}),
                IdType::CioId,
            ),
        ];
        for (identifier, wire, id_type) in cases {
            assert_eq!(serde_json::to_value(&identifier).unwrap(), wire);
            assert_eq!(
                serde_json::from_value::<Identifier>(wire).unwrap(),
                identifier
            );
            assert_eq!(identifier.id_type(), id_type);
        }
        assert_eq!(IdType::CioId.as_str(), "cio_id");
        assert_eq!(serde_json::to_value(IdType::CioId).unwrap(), "cio_id");
        assert_eq!(IdType::default(), IdType::Id);
        assert_eq!(Identifier::CioId("9".into()).track_path_value(), "cio_9");
        assert_eq!(Identifier::Email("x@y".into()).track_path_value(), "x@y");
    }

    /// `identify_person` example of the 2026 Track spec (track-api.openapi.json, components
    /// `identify_person`).
    #[test]
    fn identify_op_matches_the_spec_example() {
        let spec: Value = serde_json::from_str(
            r#"{"type":"person","identifiers":{"id":"42"},"action":"identify",
                "attributes":{"first_name":"Jane","last_name":"Doe","plan":"premium"}}"#,
        )
        .unwrap();
        let op = PersonOp::identify(
            Identifier::Id("42".into()),
            obj(json!({"first_name":"Jane","last_name":"Doe","plan":"premium"})),
        );
        assert_eq!(serde_json::to_value(&op).unwrap(), spec);
        let encoded = op.encode().unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(encoded.as_str()).unwrap(),
            spec
        );
        assert!(
            encoded
                .as_str()
                .starts_with(r#"{"type":"person","identifiers":{"id":"42"},"action":"identify""#)
        );
    }

    /// `person_event` example of the 2026 Track spec: the event's data goes under
    /// `attributes` (not `data` as in v1), plus the dedupe `id` and `timestamp` it defines.
    #[test]
    fn event_op_matches_the_spec_example() {
        let mut spec: Value = serde_json::from_str(
            r#"{"type":"person","identifiers":{"id":"42"},"action":"event","name":"purchase",
                "attributes":{"product":"Widget","price":29.99}}"#,
        )
        .unwrap();
        let data = obj(json!({"product":"Widget","price":29.99}));
        let op = PersonOp::event(
            Identifier::Id("42".into()),
            "purchase",
            ULID,
            None,
            data.clone(),
        );
        spec["id"] = json!(ULID);
        assert_eq!(serde_json::to_value(&op).unwrap(), spec);

        let op = PersonOp::event(
            Identifier::Email("a@b.io".into()),
            "purchase",
            ULID,
            Some(1_772_013_598),
            data,
        );
        let wire = serde_json::to_value(&op).unwrap();
        assert_eq!(wire["timestamp"], 1_772_013_598);
        assert_eq!(wire["identifiers"], json!({"email":"a@b.io"}));
        assert!(wire.get("data").is_none());
    }

    #[test]
    fn ops_read_back_what_they_write() {
        let ops = [
            PersonOp::identify(Identifier::Email("a@b.io".into()), obj(json!({"x":1}))),
            PersonOp::event(
                Identifier::CioId("9".into()),
                "opened",
                ULID,
                Some(5),
                obj(json!({"y":[1]})),
            ),
            PersonOp::event(Identifier::Id("1".into()), "e", ULID, None, Map::new()),
        ];
        for op in ops {
            let json = serde_json::to_string(&op).unwrap();
            assert_eq!(
                serde_json::from_str::<PersonOp>(&json).unwrap(),
                op,
                "{json}"
            );
        }
        for bad in [
            r#"{"type":"object","identifiers":{"id":"1"},"action":"identify"}"#,
            r#"{"type":"person","identifiers":{"id":"1"},"action":"delete"}"#,
            r#"{"type":"person","identifiers":{"id":"1"},"action":"event","name":"e"}"#,
            r#"{"type":"person","identifiers":{"id":"1","email":"a@b"},"action":"identify"}"#,
        ] {
            assert!(serde_json::from_str::<PersonOp>(bad).is_err(), "{bad}");
        }
        let op: PersonOp = serde_json::from_str(
            r#"{"type":"person","identifiers":{"id":"42"},"action":"identify"}"#,
        )
        .unwrap();
        assert_eq!(
            op,
            PersonOp::identify(Identifier::Id("42".into()), Map::new())
        );
    }

    #[test]
    fn v1_event_body_uses_data() {
        let mut event = Event::new("purchase", ULID);
        event.data = obj(json!({"price":23.45,"product":"socks"}));
        assert_eq!(
            serde_json::to_value(&event).unwrap(),
            json!({"name":"purchase","id":ULID,"data":{"price":23.45,"product":"socks"}})
        );
        event.timestamp = Some(1);
        assert_eq!(serde_json::to_value(&event).unwrap()["timestamp"], 1);
    }

    #[test]
    fn ulids_are_recognised() {
        assert!(is_ulid(ULID));
        assert!(is_ulid(&ULID.to_lowercase()));
        assert!(is_ulid("7ZZZZZZZZZZZZZZZZZZZZZZZZZ"));
        assert!(!is_ulid("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), "over 128 bits");
        assert!(!is_ulid("01JDQ7Y1M3E3XH5Q9W9G1K2ZQ"), "25 chars");
        assert!(!is_ulid("01JDQ7Y1M3E3XH5Q9W9G1K2ZQU"), "U is not Crockford");
        assert!(!is_ulid("customer-42"));
        assert!(!is_ulid(""));
    }

    #[test]
    fn encode_refuses_bad_ops_without_echoing_values() {
        let bad_id = PersonOp::event(
            Identifier::Id("42".into()),
            "x",
            "cust-42",
            None,
            Map::new(),
        );
        let err = bad_id.encode().unwrap_err();
        assert!(matches!(err, CioError::Config { .. }));
        assert!(!err.to_string().contains("cust-42"));
        let empty = PersonOp::identify(Identifier::Email(String::new()), Map::new());
        assert!(empty.encode().is_err());

        let mut attributes = Map::new();
        attributes.insert("blob".into(), json!("x".repeat(MAX_OP_BYTES)));
        let err = PersonOp::identify(Identifier::Id("1".into()), attributes)
            .encode()
            .unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
    }

    #[test]
    fn an_op_of_exactly_max_op_bytes_is_accepted() {
        let empty = PersonOp::identify(Identifier::Id("1".into()), obj(json!({"a":""})));
        let base = empty.encode().unwrap().len();
        let fill = "x".repeat(MAX_OP_BYTES - base);
        let op = PersonOp::identify(Identifier::Id("1".into()), obj(json!({"a": fill})));
        assert_eq!(op.encode().unwrap().len(), MAX_OP_BYTES);
        let op = PersonOp::identify(
            Identifier::Id("1".into()),
            obj(json!({"a": format!("{fill}x")})),
        );
        assert!(op.encode().is_err());
    }

    #[test]
    fn size_constants() {
        // The spec's "32kb" / "500kb", read as decimal kilobytes (the smaller reading).
        assert_eq!(MAX_OP_BYTES, 32_000);
        assert_eq!(MAX_BATCH_BYTES, 500_000);
        const { assert!(MAX_OP_BYTES < 32 * 1024 && MAX_BATCH_BYTES < 500 * 1024) };
        assert_eq!(BATCH_ENVELOPE_BYTES, r#"{"batch":[]}"#.len());
    }

    #[test]
    fn batch_body_is_the_ops_joined_and_its_length_is_exact() {
        let ops: Vec<EncodedOp> = (0..3)
            .map(|i| {
                PersonOp::identify(Identifier::Id(i.to_string()), obj(json!({"n": i})))
                    .encode()
                    .unwrap()
            })
            .collect();
        for n in 0..=3 {
            let body = batch_body(&ops[..n]);
            assert_eq!(body.len(), batch_body_len(&ops[..n]), "{n} ops");
            let parsed: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(parsed["batch"].as_array().unwrap().len(), n);
        }
        let parsed: Value = serde_json::from_slice(&batch_body(&ops)).unwrap();
        assert_eq!(parsed["batch"][2]["identifiers"]["id"], "2");
        assert_eq!(parsed["batch"][1]["attributes"]["n"], 1);
    }

    /// The 207 body of the 2026 Track spec (`/api/v2/batch` responses).
    #[test]
    fn parses_207_failures() {
        let body = br#"{"errors":[
            {"batch_index":0,"reason":"required","field":"identifiers","message":"identifiers are required"},
            {"batch_index":"2","reason":"invalid"},
            {"batch_index":2,"field":"name","message":"too long","extra":true}
        ]}"#;
        let failures = parse_batch_failures(body, 3).unwrap();
        assert_eq!(
            failures,
            vec![
                BatchFailure {
                    batch_index: 0,
                    reason: Some("required".into()),
                    field: Some("identifiers".into()),
                    message: "identifiers are required".into(),
                },
                BatchFailure {
                    batch_index: 2,
                    reason: Some("invalid".into()),
                    field: None,
                    message: "invalid".into(),
                },
                BatchFailure {
                    batch_index: 2,
                    reason: None,
                    field: Some("name".into()),
                    message: "too long".into(),
                },
            ]
        );
    }

    #[test]
    fn a_207_that_does_not_say_what_failed_is_an_error() {
        for body in [
            &br#"{}"#[..],
            br#"{"errors":[]}"#,
            br#"{"errors":null}"#,
            br#"{"errors":[{"reason":"x"}]}"#,
            br#"{"errors":[{"batch_index":3}]}"#,
            br#"{"errors":[{"batch_index":-1}]}"#,
            b"<html>",
            b"",
        ] {
            assert!(
                parse_batch_failures(body, 3).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn outcome() {
        assert!(BatchOutcome::default().all_accepted());
    }
}

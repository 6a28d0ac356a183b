//! Profiles: validate and accept SharpSend's writes (attributes, events) into the mirror and the
//! outbox in one transaction; read profiles from the mirror or fresh from Customer.io; import
//! profiles from Customer.io into the mirror.
//!
//! Every rule is checked for the whole request before anything is accepted, so a request is
//! accepted entirely or not at all, and each violation names its field.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cio_client::{CioError, IdType};
use futures::TryStreamExt;
use serde_json::{Map, Value};
use sharpsend_db::{
    outbox::{self, AcceptedEvent, NewAttributeUpdate, NewEvent},
    profiles::{self, FetchedProfile, Lookup, Profile, ProfileSegment},
};

use crate::{AppContext, CoreError, FieldViolation, input};

/// Customer.io's limits (Track API) and ours.
pub mod limits {
    /// Bytes in a customer id.
    pub const CUSTOMER_ID_BYTES: usize = 150;
    /// Bytes in an attribute name.
    pub const ATTRIBUTE_NAME_BYTES: usize = 150;
    /// Bytes in an attribute value, as JSON.
    pub const ATTRIBUTE_VALUE_BYTES: usize = 1000;
    /// Attributes in one update.
    pub const ATTRIBUTES_PER_UPDATE: usize = 300;
    /// Bytes in an event name.
    pub const EVENT_NAME_BYTES: usize = 100;
    /// Bytes of event data, as JSON.
    pub const EVENT_DATA_BYTES: usize = 100_000;
    /// Bytes in a caller's idempotency key.
    pub const IDEMPOTENCY_KEY_BYTES: usize = 200;
    /// Updates or events in one batch call.
    pub const BATCH_ITEMS: usize = 1000;
    /// Ids in one import.
    pub const IMPORT_IDS: usize = 10_000;
    /// How far after the server's clock an event's timestamp may be (clock skew); earlier than
    /// 1970 is refused too (Customer.io takes unix seconds).
    pub const EVENT_FUTURE_SKEW: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
}

/// Whether Customer.io's URL-path endpoints can address `id`: URLs collapse the dot segments
/// `.` and `..`, so people with those ids are reachable only through request bodies.
pub fn addressable_in_path(id: &str) -> bool {
    !matches!(id, "." | "..")
}

/// Attribute keys Customer.io reserves that SharpSend may not set as plain attributes.
const RESERVED_KEYS: &[&str] = &["id", "cio_id", "anonymous_id", "cio_relationships"];

/// One attribute update as received.
#[derive(Debug, Clone)]
pub struct AttributeUpdate {
    pub customer_id: String,
    pub attributes: Map<String, Value>,
}

/// One event as received.
#[derive(Debug, Clone)]
pub struct EventInput {
    pub customer_id: String,
    pub name: String,
    pub data: Map<String, Value>,
    pub timestamp: Option<DateTime<Utc>>,
    pub idempotency_key: Option<String>,
}

/// PostgreSQL cannot store NUL characters in text or JSON; Customer.io has no use for them.
fn has_nul(text: &str) -> bool {
    text.contains('\0')
}

pub(crate) fn json_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => has_nul(s),
        Value::Array(items) => items.iter().any(json_has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| has_nul(k) || json_has_nul(v)),
        _ => false,
    }
}

/// A customer id (or email, or cio_id): 1 to 150 bytes, taken exactly as given
/// ([`crate::input::identifier_problem`]: no NUL or control characters, no surrounding
/// whitespace).
pub(crate) fn check_customer_id(violations: &mut Vec<FieldViolation>, field: &str, id: &str) {
    if id.len() > limits::CUSTOMER_ID_BYTES {
        violations.push(FieldViolation::new(
            field,
            format!(
                "is {} bytes; Customer.io allows at most {}",
                id.len(),
                limits::CUSTOMER_ID_BYTES
            ),
        ));
    } else if id.is_empty() {
        violations.push(FieldViolation::new(field, "must not be empty"));
    } else {
        input::identifier(violations, field, id, limits::CUSTOMER_ID_BYTES, true);
    }
}

/// Bytes of `value` as JSON.
pub(crate) fn json_len(value: &Value) -> usize {
    serde_json::to_vec(value)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

fn check_attributes(
    violations: &mut Vec<FieldViolation>,
    field: &str,
    attributes: &Map<String, Value>,
) {
    if attributes.is_empty() {
        violations.push(FieldViolation::new(
            field,
            "must set at least one attribute",
        ));
    }
    if attributes.len() > limits::ATTRIBUTES_PER_UPDATE {
        violations.push(FieldViolation::new(
            field,
            format!(
                "sets {} attributes; Customer.io allows at most {} per update",
                attributes.len(),
                limits::ATTRIBUTES_PER_UPDATE
            ),
        ));
    }
    for (name, value) in attributes {
        let at = format!("{field}.{name}");
        if name.is_empty() {
            violations.push(FieldViolation::new(
                field,
                "has an attribute with an empty name",
            ));
            continue;
        }
        if has_nul(name) || json_has_nul(value) {
            violations.push(FieldViolation::new(
                field,
                "must not contain NUL characters",
            ));
            continue;
        }
        if name.len() > limits::ATTRIBUTE_NAME_BYTES {
            violations.push(FieldViolation::new(
                field,
                format!(
                    "attribute name of {} bytes; at most {}",
                    name.len(),
                    limits::ATTRIBUTE_NAME_BYTES
                ),
            ));
            continue;
        }
        if let Some(problem) = input::identifier_problem(name, limits::ATTRIBUTE_NAME_BYTES, true) {
            violations.push(FieldViolation::new(at, format!("(the name) {problem}")));
            continue;
        }
        if RESERVED_KEYS.contains(&name.as_str()) || name.starts_with('_') {
            violations.push(FieldViolation::new(
                at,
                "is reserved by Customer.io and cannot be set as an attribute",
            ));
            continue;
        }
        let len = json_len(value);
        if len > limits::ATTRIBUTE_VALUE_BYTES {
            violations.push(FieldViolation::new(
                at,
                format!(
                    "value is {len} bytes as JSON; Customer.io allows at most {}",
                    limits::ATTRIBUTE_VALUE_BYTES
                ),
            ));
            continue;
        }
        let typed_ok = match name.as_str() {
            "email" => value.is_string() || value.is_null(),
            "created_at" => value.as_i64().is_some_and(|t| t >= 0) || value.is_null(),
            "unsubscribed" => value.is_boolean() || value.is_null(),
            _ => true,
        };
        if !typed_ok {
            let expected = match name.as_str() {
                "email" => "a string",
                "created_at" => "a whole number of unix seconds",
                _ => "true or false",
            };
            violations.push(FieldViolation::new(
                at,
                format!("is reserved by Customer.io and must be {expected}"),
            ));
        }
    }
}

fn check_batch_size(field: &str, len: usize) -> Result<(), CoreError> {
    if len == 0 {
        return Err(CoreError::invalid(field, "must hold at least one item"));
    }
    if len > limits::BATCH_ITEMS {
        return Err(CoreError::invalid(
            field,
            format!(
                "holds {len} items; at most {} per call",
                limits::BATCH_ITEMS
            ),
        ));
    }
    Ok(())
}

/// Validates and accepts attribute updates: mirror + outbox in one transaction. `field` names the
/// repeated field (`updates`) or `None` for a single update.
pub async fn update_attributes(
    ctx: &AppContext,
    updates: Vec<AttributeUpdate>,
    field: Option<&str>,
) -> Result<u64, CoreError> {
    if let Some(field) = field {
        check_batch_size(field, updates.len())?;
    }
    let mut violations = Vec::new();
    for (i, update) in updates.iter().enumerate() {
        let prefix = field.map(|f| format!("{f}[{i}].")).unwrap_or_default();
        check_customer_id(
            &mut violations,
            &format!("{prefix}customer_id"),
            &update.customer_id,
        );
        check_attributes(
            &mut violations,
            &format!("{prefix}attributes"),
            &update.attributes,
        );
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let rows: Vec<NewAttributeUpdate> = updates
        .into_iter()
        .map(|u| NewAttributeUpdate {
            customer_id: u.customer_id,
            attributes: u.attributes,
        })
        .collect();
    let accepted =
        outbox::accept_attribute_updates(&ctx.db, ctx.workspace_id(), &rows, ctx.now()).await?;
    ctx.wake_outbox();
    // Managed segments reading these attributes are due for evaluation. The write is accepted
    // whatever happens here; a segment not marked is re-evaluated when its age runs out.
    let changed: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.attributes.keys().map(String::as_str))
        .collect();
    let changed: Vec<&str> = changed.into_iter().collect();
    if let Err(e) = crate::managed_segments::profiles_changed(ctx, &changed).await {
        tracing::warn!(error = %crate::error::error_chain(&e), "could not mark managed segments due");
    }
    Ok(accepted)
}

/// Validates and accepts events; each gets a ULID (or the one its idempotency key got before).
pub async fn track_events(
    ctx: &AppContext,
    events: Vec<EventInput>,
    field: Option<&str>,
) -> Result<Vec<AcceptedEvent>, CoreError> {
    if let Some(field) = field {
        check_batch_size(field, events.len())?;
    }
    let latest_event_time = chrono::Duration::from_std(limits::EVENT_FUTURE_SKEW)
        .ok()
        .and_then(|skew| ctx.now().checked_add_signed(skew))
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let mut violations = Vec::new();
    for (i, event) in events.iter().enumerate() {
        let prefix = field.map(|f| format!("{f}[{i}].")).unwrap_or_default();
        check_customer_id(
            &mut violations,
            &format!("{prefix}customer_id"),
            &event.customer_id,
        );
        if event.name.len() > limits::EVENT_NAME_BYTES {
            violations.push(FieldViolation::new(
                format!("{prefix}name"),
                format!(
                    "is {} bytes; Customer.io allows at most {}",
                    event.name.len(),
                    limits::EVENT_NAME_BYTES
                ),
            ));
        } else if event.name.is_empty() {
            violations.push(FieldViolation::new(
                format!("{prefix}name"),
                "must not be empty",
            ));
        } else {
            input::identifier(
                &mut violations,
                &format!("{prefix}name"),
                &event.name,
                limits::EVENT_NAME_BYTES,
                true,
            );
        }
        let data = Value::Object(event.data.clone());
        let data_len = json_len(&data);
        if json_has_nul(&data) {
            violations.push(FieldViolation::new(
                format!("{prefix}data"),
                "must not contain NUL characters",
            ));
        } else if data_len > limits::EVENT_DATA_BYTES {
            violations.push(FieldViolation::new(
                format!("{prefix}data"),
                format!(
                    "is {data_len} bytes as JSON; Customer.io allows at most {}",
                    limits::EVENT_DATA_BYTES
                ),
            ));
        } else if !addressable_in_path(&event.customer_id)
            && data_len > cio_client::MAX_OP_BYTES / 2
        {
            // A large event can only go through the v1 endpoint, whose URL holds the id; the
            // ids `.` and `..` cannot be addressed there (URLs collapse them).
            violations.push(FieldViolation::new(
                format!("{prefix}data"),
                format!(
                    "is {data_len} bytes as JSON; for a person whose id is `.` or `..` at most {} \
                     (Customer.io's API cannot take that id in a URL)",
                    cio_client::MAX_OP_BYTES / 2
                ),
            ));
        }
        if let Some(key) = &event.idempotency_key {
            input::identifier(
                &mut violations,
                &format!("{prefix}idempotency_key"),
                key,
                limits::IDEMPOTENCY_KEY_BYTES,
                false,
            );
        }
        if let Some(ts) = event.timestamp {
            if ts.timestamp() < 0 {
                violations.push(FieldViolation::new(
                    format!("{prefix}timestamp"),
                    "must not be before 1970-01-01T00:00:00Z (Customer.io takes unix seconds)",
                ));
            } else if ts > latest_event_time {
                violations.push(FieldViolation::new(
                    format!("{prefix}timestamp"),
                    format!(
                        "must not be more than {} hours after the server's clock",
                        limits::EVENT_FUTURE_SKEW.as_secs() / 3600
                    ),
                ));
            }
        }
    }
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let now = ctx.now();
    let rows: Vec<NewEvent> = events
        .into_iter()
        .map(|e| NewEvent {
            customer_id: e.customer_id,
            event_id: ulid::Ulid::new().to_string(),
            name: e.name,
            data: Value::Object(e.data),
            timestamp: Some(e.timestamp.unwrap_or(now).timestamp()),
            idempotency_key: e.idempotency_key.filter(|k| !k.is_empty()),
        })
        .collect();
    let accepted = outbox::accept_events(&ctx.db, ctx.workspace_id(), &rows, now).await?;
    ctx.wake_outbox();
    Ok(accepted)
}

/// Which person to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CustomerRef {
    Id(String),
    Email(String),
    CioId(String),
}

impl CustomerRef {
    fn value(&self) -> &str {
        match self {
            CustomerRef::Id(v) | CustomerRef::Email(v) | CustomerRef::CioId(v) => v,
        }
    }

    fn field(&self) -> &'static str {
        match self {
            CustomerRef::Id(_) => "customer.id",
            CustomerRef::Email(_) => "customer.email",
            CustomerRef::CioId(_) => "customer.cio_id",
        }
    }
}

/// A profile and whether it was read from Customer.io during this call.
#[derive(Debug, Clone)]
pub struct ProfileView {
    pub profile: Profile,
    pub fresh: bool,
}

/// Reads a profile from the mirror, or from Customer.io when `fresh` (updating the mirror).
pub async fn get_profile(
    ctx: &AppContext,
    who: CustomerRef,
    fresh: bool,
) -> Result<ProfileView, CoreError> {
    let mut violations = Vec::new();
    check_customer_id(&mut violations, who.field(), who.value());
    if !violations.is_empty() {
        return Err(CoreError::InvalidArgument(violations));
    }
    let not_found = || CoreError::NotFound {
        what: "customer",
        id: who.value().to_string(),
    };
    if fresh && !addressable_in_path(who.value()) {
        return Err(CoreError::FailedPrecondition(vec![
            FieldViolation::new(
                who.field(),
                "Customer.io's API cannot address the ids `.` and `..` in a URL; read this \
                 person from the mirror (fresh: false)",
            )
            .because(crate::error::reasons::ID_NOT_ADDRESSABLE),
        ]));
    }
    if fresh {
        let id_type = match &who {
            CustomerRef::Id(_) => IdType::Id,
            CustomerRef::Email(_) => IdType::Email,
            CustomerRef::CioId(_) => IdType::CioId,
        };
        let fetched = match fetch_profile(ctx, who.value(), id_type).await {
            Ok(f) => f,
            Err(CioError::NotFound { .. }) => return Err(not_found()),
            Err(e) => return Err(e.into()),
        };
        let customer_id = fetched.customer_id.clone();
        profiles::upsert_fetched(&ctx.db, ctx.workspace_id(), &[fetched], ctx.now()).await?;
        ctx.read_cache.invalidate_all();
        let profile = profiles::get(&ctx.db, ctx.workspace_id(), Lookup::Id(&customer_id))
            .await?
            .ok_or_else(not_found)?;
        return Ok(ProfileView {
            profile,
            fresh: true,
        });
    }
    let lookup = match &who {
        CustomerRef::Id(v) => Lookup::Id(v),
        CustomerRef::Email(v) => Lookup::Email(v),
        CustomerRef::CioId(v) => Lookup::CioId(v),
    };
    let profile = ctx
        .read_cache
        .profile(&ctx.db, ctx.workspace_id(), who.clone(), || async {
            profiles::get(&ctx.db, ctx.workspace_id(), lookup)
                .await?
                .ok_or_else(not_found)
        })
        .await?;
    Ok(ProfileView {
        profile: Arc::unwrap_or_clone(profile),
        fresh: false,
    })
}

async fn fetch_profile(
    ctx: &AppContext,
    identifier: &str,
    id_type: IdType,
) -> Result<FetchedProfile, CioError> {
    let customer = ctx.cio.customer_attributes(identifier, id_type).await?;
    let segments = ctx.cio.customer_segments(identifier, id_type).await?;
    let customer_id = customer
        .id
        .clone()
        .or_else(|| customer.identifiers.id.clone())
        .unwrap_or_else(|| identifier.to_string());
    Ok(FetchedProfile {
        customer_id,
        email: customer.identifiers.email.clone(),
        cio_id: customer.identifiers.cio_id.clone(),
        attributes: customer.attributes,
        cio_segments: Some(
            segments
                .into_iter()
                .map(|s| ProfileSegment {
                    id: s.id,
                    name: s.name,
                })
                .collect(),
        ),
    })
}

/// What to import.
#[derive(Debug, Clone)]
pub enum ImportSource {
    Ids(Vec<String>),
    Segment(i64),
}

/// Progress of an import, sent after every chunk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportProgress {
    pub imported: u64,
    pub total: u64,
    pub not_found: Vec<String>,
    pub done: bool,
}

/// People per `POST /v1/customers/attributes` call (Customer.io's maximum).
const IMPORT_CHUNK: usize = 100;
/// Members per membership page while importing a segment.
const MEMBERSHIP_PAGE: u32 = 1000;

/// Validates an import request.
pub fn validate_import(source: &ImportSource) -> Result<(), CoreError> {
    match source {
        ImportSource::Ids(ids) => {
            if ids.len() > limits::IMPORT_IDS {
                return Err(CoreError::invalid(
                    "customer_ids",
                    format!("holds {} ids; at most {}", ids.len(), limits::IMPORT_IDS),
                ));
            }
            let mut violations = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                check_customer_id(&mut violations, &format!("customer_ids[{i}]"), id);
            }
            if violations.is_empty() {
                Ok(())
            } else {
                Err(CoreError::InvalidArgument(violations))
            }
        }
        ImportSource::Segment(id) if *id <= 0 => Err(CoreError::invalid(
            "segment_id",
            "give customer_ids or a positive segment_id",
        )),
        ImportSource::Segment(_) => Ok(()),
    }
}

/// Imports attributes from Customer.io into the mirror, 100 people per App API call (paced by the
/// shared App API limiter), awaiting `progress` after every chunk and once at the end; it
/// answers false when the caller has gone away, which stops the import.
pub async fn import_profiles<F, Fut>(
    ctx: &AppContext,
    source: ImportSource,
    mut progress: F,
) -> Result<ImportProgress, CoreError>
where
    F: FnMut(ImportProgress) -> Fut,
    Fut: Future<Output = bool>,
{
    validate_import(&source)?;
    let mut state = ImportProgress::default();
    let ids: Vec<String> = match source {
        ImportSource::Ids(ids) => ids,
        ImportSource::Segment(segment_id) => {
            if let Ok(count) = ctx.cio.segment_customer_count(segment_id).await {
                state.total = count;
            }
            let members: Vec<_> = match ctx
                .cio
                .segment_membership(segment_id, MEMBERSHIP_PAGE)
                .try_collect()
                .await
            {
                Ok(m) => m,
                Err(CioError::NotFound { .. }) => {
                    return Err(CoreError::NotFound {
                        what: "segment",
                        id: segment_id.to_string(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            members.into_iter().filter_map(|m| m.id).collect()
        }
    };
    state.total = ids.len() as u64;
    for chunk in ids.chunks(IMPORT_CHUNK) {
        let customers = ctx.cio.customers_attributes(chunk).await?;
        let fetched: Vec<FetchedProfile> = customers
            .into_iter()
            .filter_map(|c| {
                let id = c.id.clone().or_else(|| c.identifiers.id.clone())?;
                Some(FetchedProfile {
                    customer_id: id,
                    email: c.identifiers.email.clone(),
                    cio_id: c.identifiers.cio_id.clone(),
                    attributes: c.attributes,
                    cio_segments: None,
                })
            })
            .collect();
        let found: std::collections::HashSet<&str> =
            fetched.iter().map(|f| f.customer_id.as_str()).collect();
        state.not_found.extend(
            chunk
                .iter()
                .filter(|id| !found.contains(id.as_str()))
                .cloned(),
        );
        state.imported +=
            profiles::upsert_fetched(&ctx.db, ctx.workspace_id(), &fetched, ctx.now()).await?;
        if !progress(state.clone()).await {
            tracing::info!(
                imported = state.imported,
                "import stopped: the caller went away"
            );
            return Ok(state);
        }
        state.not_found.clear();
    }
    state.done = true;
    if let Err(e) = crate::managed_segments::profiles_imported(ctx).await {
        tracing::warn!(error = %crate::error::error_chain(&e), "could not mark managed segments due");
    }
    progress(state.clone()).await;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn violations_of(attributes: Value) -> Vec<String> {
        let mut v = Vec::new();
        let map = attributes.as_object().cloned().unwrap_or_default();
        check_attributes(&mut v, "attributes", &map);
        v.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn attribute_rules_name_the_offending_attribute() {
        assert!(violations_of(json!({"plan": "pro", "email": "a@b.c", "created_at": 1_700_000_000, "unsubscribed": false})).is_empty());
        assert_eq!(violations_of(json!({})), vec!["attributes"]);
        assert_eq!(violations_of(json!({"id": "x"})), vec!["attributes.id"]);
        assert_eq!(
            violations_of(json!({"_update": true})),
            vec!["attributes._update"]
        );
        assert_eq!(violations_of(json!({"email": 5})), vec!["attributes.email"]);
        assert_eq!(
            violations_of(json!({"created_at": "yesterday"})),
            vec!["attributes.created_at"]
        );
        assert_eq!(
            violations_of(json!({"bio": "x".repeat(999)})),
            vec!["attributes.bio"]
        );
        assert!(violations_of(json!({"bio": "x".repeat(998)})).is_empty());
        assert_eq!(
            violations_of(json!({"nick": "a\u{0}b"})),
            vec!["attributes"]
        );
        let long_name = "n".repeat(151);
        assert_eq!(violations_of(json!({ long_name: 1 })), vec!["attributes"]);
        let many: Map<String, Value> = (0..301).map(|i| (format!("a{i}"), json!(i))).collect();
        assert_eq!(violations_of(Value::Object(many)), vec!["attributes"]);
    }

    #[test]
    fn customer_ids_are_checked() {
        let mut v = Vec::new();
        check_customer_id(&mut v, "customer_id", "");
        check_customer_id(&mut v, "customer_id", "   ");
        check_customer_id(&mut v, "customer_id", &"x".repeat(151));
        check_customer_id(&mut v, "customer_id", &"x".repeat(150));
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn batch_sizes_are_bounded() {
        assert!(check_batch_size("updates", 0).is_err());
        assert!(check_batch_size("updates", 1000).is_ok());
        assert!(check_batch_size("updates", 1001).is_err());
    }
}

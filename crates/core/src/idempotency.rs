//! Idempotent creation: an operation that creates something (CreateSegment, RunJob) takes an
//! optional caller `request_id`. A retry with the same request_id and the same request answers
//! what the first call created and creates nothing; the same request_id with a different request
//! is `AlreadyExists` naming the fields that differ; concurrent duplicates create one thing.
//!
//! The key is stored (`sharpsend_db::idempotency`) with the request before the work starts, and
//! completed with the id of what was made. A first call that fails forgets its key (a retry tries
//! again). A call that died between the two (e.g. after Customer.io created a segment, before it
//! was recorded here) leaves its key without a result: a duplicate waits up to [`WAIT`] for it,
//! and once the key is older than [`STALE_AFTER`] a retry takes it over and does the work again,
//! told so, so that it can look for what the dead call made first (CreateSegment adopts the
//! orphan Customer.io segment).

use std::time::Duration;

use serde_json::Value;
use sharpsend_db::idempotency::{self as store, Claim, StoredKey};

use crate::{AppContext, CoreError, input};

/// Bytes in a request id.
pub const REQUEST_ID_BYTES: usize = input::limits::ID_BYTES;
/// How long a duplicate waits for the first call's result before answering `Aborted`.
pub const WAIT: Duration = Duration::from_secs(15);
/// A key without a result this old belongs to a call that died; a retry takes it over. Longer
/// than any one creation (a Customer.io request: 10 s timeout, a few retries).
pub const STALE_AFTER: Duration = Duration::from_secs(120);
/// How often a duplicate looks at the key while it waits.
const POLL: Duration = Duration::from_millis(25);

/// Checks a `request_id` field (empty is allowed: no idempotency).
pub fn check_request_id(request_id: &str) -> Result<(), CoreError> {
    match input::identifier_problem(request_id, REQUEST_ID_BYTES, false) {
        Some(problem) => Err(CoreError::invalid("request_id", problem)),
        None => Ok(()),
    }
}

/// An already-used key's request must be this call's request; otherwise `AlreadyExists`
/// naming the fields that differ. `made` describes what the first call made (`segment 12`).
pub fn same_request(
    operation: &str,
    request_id: &str,
    stored: &Value,
    request: &Value,
    made: Option<String>,
) -> Result<(), CoreError> {
    if stored == request {
        return Ok(());
    }
    let mut differing: Vec<String> = match (stored.as_object(), request.as_object()) {
        (Some(a), Some(b)) => a
            .keys()
            .chain(b.keys().filter(|k| !a.contains_key(*k)))
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect(),
        _ => Vec::new(),
    };
    differing.sort();
    differing.dedup();
    let fields = if differing.is_empty() {
        "the request".to_string()
    } else {
        differing.join(", ")
    };
    Err(CoreError::AlreadyExists(format!(
        "request_id `{}` was already used for a {operation} with a different {fields}{}; give a new request_id for a different request",
        crate::error::shown(request_id),
        made.map(|m| format!(" (it made {m})")).unwrap_or_default(),
    )))
}

/// What [`once`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Made {
    /// The id of what was made (by this call or by the first one with its request_id).
    pub id: i64,
    /// Made by this call.
    pub created: bool,
}

/// What [`once`] hands its `create`.
#[derive(Debug, Clone, Default)]
pub struct Claimed {
    /// The key this call holds (`None` without a request_id). A creation that ends in a local
    /// record completes it in that record's transaction
    /// ([`sharpsend_db::idempotency`]): a crash then leaves both or neither.
    pub key: Option<store::KeyRef>,
    /// When the call whose key this call took over began (it died): `create` may find what that
    /// call made and answer it instead of creating.
    pub taken_over: Option<chrono::DateTime<chrono::Utc>>,
}

/// Runs `create` at most once per (`operation`, `request_id`): see the module doc. `request`
/// is what the call asks for, normalised (compared field by field with a retry's); `describe`
/// names what an id is in an error (`|id| format!("segment {id}")`). An empty `request_id`
/// simply runs `create`. `create` gets the key it holds and whether it took it over
/// ([`Claimed`]); its key is completed after it (again, if it did so itself).
pub async fn once<F, Fut>(
    ctx: &AppContext,
    operation: &str,
    request_id: &str,
    request: &Value,
    describe: impl Fn(i64) -> String,
    create: F,
) -> Result<Made, CoreError>
where
    F: FnOnce(Claimed) -> Fut,
    Fut: Future<Output = Result<i64, CoreError>>,
{
    check_request_id(request_id)?;
    if request_id.is_empty() {
        return create(Claimed::default())
            .await
            .map(|id| Made { id, created: true });
    }
    let ws = ctx.workspace_id();
    let waited = std::time::Instant::now();
    let mut taken_over = None;
    loop {
        let key = match store::claim(&ctx.db, ws, operation, request_id, request, ctx.now()).await?
        {
            Claim::New => break,
            Claim::Existing(key) => key,
        };
        same_request(
            operation,
            request_id,
            &key.request,
            request,
            key.result_id.map(&describe),
        )?;
        if let Some(id) = key.result_id {
            return Ok(Made { id, created: false });
        }
        if is_stale(ctx, &key)
            && store::take_over(
                &ctx.db,
                ws,
                operation,
                request_id,
                stale_before(ctx),
                ctx.now(),
            )
            .await?
        {
            tracing::warn!(
                operation,
                "taking over a request_id whose first call never finished"
            );
            taken_over = Some(key.created_at);
            break;
        }
        if waited.elapsed() >= WAIT {
            return Err(CoreError::Aborted(format!(
                "the first {operation} with request_id `{}` is still at work; retry later",
                crate::error::shown(request_id)
            )));
        }
        tokio::time::sleep(POLL).await;
    }
    let claimed = Claimed {
        key: Some(store::KeyRef {
            operation: operation.to_owned(),
            request_id: request_id.to_owned(),
        }),
        taken_over,
    };
    match create(claimed).await {
        Ok(id) => {
            store::complete(&ctx.db, ws, operation, request_id, id, ctx.now()).await?;
            Ok(Made { id, created: true })
        }
        Err(e) => {
            if let Err(release) = store::release(&ctx.db, ws, operation, request_id).await {
                tracing::warn!(operation, error = %crate::error::error_chain(&release), "could not release a request_id after a failure; it is taken over once stale");
            }
            Err(e)
        }
    }
}

fn stale_before(ctx: &AppContext) -> chrono::DateTime<chrono::Utc> {
    ctx.now() - chrono::Duration::from_std(STALE_AFTER).unwrap_or(chrono::Duration::MAX)
}

fn is_stale(ctx: &AppContext, key: &StoredKey) -> bool {
    key.updated_at <= stale_before(ctx)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_reused_request_id_names_the_fields_that_differ() {
        let first = json!({"name": "VIPs", "description": "", "criteria": null});
        assert!(same_request("CreateSegment", "r1", &first, &first, None).is_ok());
        let other = json!({"name": "VIP", "description": "", "criteria": null});
        let err = same_request(
            "CreateSegment",
            "r1",
            &first,
            &other,
            Some("segment 7".into()),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            err.contains("name") && !err.contains("description") && err.contains("segment 7"),
            "{err}"
        );
    }

    #[test]
    fn bad_request_ids_name_the_field() {
        for bad in ["x".repeat(201), "a\0b".into(), " r".into(), "\n".into()] {
            let err = check_request_id(&bad).err().map(|e| e.to_string());
            assert!(
                err.as_deref().is_some_and(|e| e.contains("request_id")),
                "{bad:?}: {err:?}"
            );
        }
        assert!(check_request_id("").is_ok() && check_request_id("r-1").is_ok());
    }
}

//! `sharpsend.cio.v1.ProfileService`: request mapping only; the rules and the work are in
//! `sharpsend_core::profiles` (writes, reads, imports) and `sharpsend_core::outbox` (status).

use std::pin::Pin;

use futures::Stream;
use sharpsend_core::tenants::Tenants;
use sharpsend_core::{
    CoreError, FieldViolation,
    engagement::history::{self, History, HistoryQuery, IdType},
    input::{self, limits::OUTBOX_IDS},
    outbox::{self, OutboxItem},
    profiles::{self, AttributeUpdate, CustomerRef, EventInput, ImportSource},
};
use sharpsend_proto::v1::{
    self as pb, customer_ref::Identifier, profile_service_server::ProfileService,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    convert::{
        datetime, decode_page_token, encode_page_token, json_to_struct, limit, struct_to_json,
        timestamp,
    },
    status::{OrStatus, to_status},
};

/// Items listed by GetSyncStatus unless the caller says otherwise, and the most it may ask for.
const DEFAULT_STATUS_LIMIT: u64 = 20;
const MAX_STATUS_LIMIT: u64 = 200;

pub struct Profiles {
    tenants: Tenants,
}

impl Profiles {
    pub fn new(tenants: Tenants) -> Self {
        Self { tenants }
    }
}

/// Maps every item with `convert`, which may refuse it; all refusals are reported together.
fn map_all<T, U>(
    items: Vec<T>,
    mut convert: impl FnMut(usize, T) -> Result<U, CoreError>,
) -> Result<Vec<U>, CoreError> {
    let mut out = Vec::with_capacity(items.len());
    let mut violations: Vec<FieldViolation> = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match convert(i, item) {
            Ok(u) => out.push(u),
            Err(CoreError::InvalidArgument(v)) => violations.extend(v),
            Err(e) => return Err(e),
        }
    }
    input::finish(violations).map(|()| out)
}

/// An update; `prefix` names it in violations (`updates[3].`).
fn attribute_update(
    req: pb::UpdateAttributesRequest,
    prefix: &str,
) -> Result<AttributeUpdate, CoreError> {
    Ok(AttributeUpdate {
        customer_id: req.customer_id,
        attributes: match req.attributes {
            Some(s) => struct_to_json(&format!("{prefix}attributes"), s)?,
            None => Default::default(),
        },
    })
}

/// An event; `prefix` names it in violations (`events[3].`).
fn event_input(req: pb::TrackEventRequest, prefix: &str) -> Result<EventInput, CoreError> {
    let mut violations = Vec::new();
    let timestamp = match &req.timestamp {
        None => None,
        Some(ts) => match datetime(&format!("{prefix}timestamp"), ts) {
            Ok(at) => Some(at),
            Err(CoreError::InvalidArgument(v)) => {
                violations.extend(v);
                None
            }
            Err(e) => return Err(e),
        },
    };
    let data = match req.data {
        None => Default::default(),
        Some(s) => match struct_to_json(&format!("{prefix}data"), s) {
            Ok(data) => data,
            Err(CoreError::InvalidArgument(v)) => {
                violations.extend(v);
                Default::default()
            }
            Err(e) => return Err(e),
        },
    };
    input::finish(violations)?;
    Ok(EventInput {
        customer_id: req.customer_id,
        name: req.name,
        data,
        timestamp,
        idempotency_key: Some(req.idempotency_key).filter(|k| !k.is_empty()),
    })
}

/// The history part of a GetProfileRequest. The page token is bound to the person asked for.
fn history_query(req: &pb::GetProfileRequest) -> Result<HistoryQuery, CoreError> {
    let page_size = limit(
        "history_page_size",
        i64::from(req.history_page_size),
        history::DEFAULT_HISTORY_PAGE,
        history::MAX_HISTORY_PAGE,
    )?;
    let filters = customer_filter(req);
    let before_first_id = decode_page_token(
        "history",
        "GetProfile",
        &filters,
        &req.history_page_token,
        |p| p.parse::<i64>().ok(),
    )
    .map_err(|e| match e {
        CoreError::InvalidArgument(mut v) => {
            for violation in &mut v {
                violation.field = "history_page_token".to_string();
            }
            CoreError::InvalidArgument(v)
        }
        other => other,
    })?;
    let count = |field: &str, n: i32| -> Result<u32, CoreError> {
        u32::try_from(n).map_err(|_| CoreError::invalid(field, "must not be negative"))
    };
    let messages = count("cio_messages_limit", req.cio_messages_limit)?;
    let activities = count("cio_activities_limit", req.cio_activities_limit)?;
    let some = |s: &str| Some(s.to_string()).filter(|s| !s.is_empty());
    Ok(HistoryQuery {
        page_size,
        before_first_id,
        cio_messages: (messages > 0).then(|| (messages, some(&req.cio_messages_start))),
        cio_activities: (activities > 0).then(|| {
            (
                activities,
                some(&req.cio_activities_type),
                some(&req.cio_activities_start),
            )
        }),
    })
}

/// Who a history page token belongs to.
fn customer_filter(req: &pb::GetProfileRequest) -> String {
    match req.customer.as_ref().and_then(|c| c.identifier.as_ref()) {
        Some(Identifier::Id(v)) => format!("id={v}"),
        Some(Identifier::Email(v)) => format!("email={v}"),
        Some(Identifier::CioId(v)) => format!("cio_id={v}"),
        None => String::new(),
    }
}

fn history_to_proto(h: History, filters: &str) -> pb::EngagementHistory {
    let at = |t: Option<i64>| {
        t.and_then(|s| chrono::DateTime::from_timestamp(s, 0))
            .map(timestamp)
    };
    pb::EngagementHistory {
        deliveries: h
            .deliveries
            .into_iter()
            .map(|d| pb::DeliveryEngagement {
                delivery_id: d.delivery_id,
                assignment_id: d.assignment_id.unwrap_or_default(),
                segment_id: d.segment_id.unwrap_or_default(),
                first_seen_at: at(Some(d.first_at)),
                delivered_at: at(d.delivered_at),
                human_opened_at: at(d.open_at),
                human_clicked_at: at(d.click_at),
                bounced_at: at(d.bounced_at),
                unsubscribed_at: at(d.unsubscribed_at),
            })
            .collect(),
        next_page_token: h
            .next
            .map(|n| encode_page_token("history", filters, n))
            .unwrap_or_default(),
        cio_messages: h
            .cio_messages
            .into_iter()
            .map(|m| pb::CustomerIoMessage {
                id: m.id,
                broadcast_id: m.broadcast_id.unwrap_or_default(),
                newsletter_id: m.newsletter_id.unwrap_or_default(),
                campaign_id: m.campaign_id.unwrap_or_default(),
                subject: m.subject.unwrap_or_default(),
                metrics: m.metrics.into_iter().collect(),
            })
            .collect(),
        cio_messages_next: h.cio_messages_next.unwrap_or_default(),
        cio_activities: h
            .cio_activities
            .into_iter()
            .map(|a| pb::CustomerIoActivity {
                id: a.id,
                r#type: a.activity_type.as_str().to_string(),
                name: a.name.unwrap_or_default(),
                timestamp: a.timestamp.unwrap_or_default(),
                delivery_id: a.delivery_id.unwrap_or_default(),
            })
            .collect(),
        cio_activities_next: h.cio_activities_next.unwrap_or_default(),
    }
}

fn item(row: &OutboxItem) -> pb::OutboxItem {
    pb::OutboxItem {
        id: row.id,
        kind: row.kind.to_string(),
        customer_id: row.customer_id.clone(),
        event_id: row.event_id.clone().unwrap_or_default(),
        attempts: row.attempts,
        error: row.error.clone().unwrap_or_default(),
        created_at: Some(timestamp(row.created_at)),
        next_attempt_at: Some(timestamp(row.next_attempt_at)),
    }
}

type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<pb::ImportProfilesProgress, Status>> + Send>>;

#[tonic::async_trait]
impl ProfileService for Profiles {
    async fn get_profile(
        &self,
        request: Request<pb::GetProfileRequest>,
    ) -> Result<Response<pb::GetProfileResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let filters = customer_filter(&req);
        let query = history_query(&req).or_status()?;
        let who = match req.customer.and_then(|c| c.identifier) {
            Some(Identifier::Id(v)) => CustomerRef::Id(v),
            Some(Identifier::Email(v)) => CustomerRef::Email(v),
            Some(Identifier::CioId(v)) => CustomerRef::CioId(v),
            None => {
                return Err(to_status(CoreError::invalid(
                    "customer",
                    "give one of id, email or cio_id",
                )));
            }
        };
        let (identifier, id_type) = match &who {
            CustomerRef::Id(v) => (v.clone(), IdType::Id),
            CustomerRef::Email(v) => (v.clone(), IdType::Email),
            CustomerRef::CioId(v) => (v.clone(), IdType::CioId),
        };
        query.validate(req.fresh).or_status()?;
        let view = profiles::get_profile(&ctx, who, req.fresh)
            .await
            .or_status()?;
        let p = view.profile;
        let history = history::history(&ctx, &p.customer_id, &identifier, id_type, &query)
            .await
            .or_status()?;
        Ok(Response::new(pb::GetProfileResponse {
            history: Some(history_to_proto(history, &filters)),
            profile: Some(pb::Profile {
                id: p.customer_id,
                email: p.email.unwrap_or_default(),
                cio_id: p.cio_id.unwrap_or_default(),
                attributes: Some(json_to_struct(&p.attributes)),
                segments: p
                    .cio_segments
                    .unwrap_or_default()
                    .into_iter()
                    .map(|s| pb::ProfileSegment {
                        id: s.id,
                        name: s.name,
                    })
                    .collect(),
                updated_at: Some(timestamp(p.updated_at)),
                fetched_at: p.fetched_at.map(timestamp),
                source: if view.fresh {
                    pb::ProfileSource::CustomerIo
                } else {
                    pb::ProfileSource::Mirror
                } as i32,
            }),
        }))
    }

    type ImportProfilesStream = ProgressStream;

    async fn import_profiles(
        &self,
        request: Request<pb::ImportProfilesRequest>,
    ) -> Result<Response<Self::ImportProfilesStream>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let source = if req.customer_ids.is_empty() {
            ImportSource::Segment(req.segment_id)
        } else {
            ImportSource::Ids(req.customer_ids)
        };
        profiles::validate_import(&source).or_status()?;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let progress_tx = tx.clone();
            let result = profiles::import_profiles(&ctx, source, move |p| {
                let tx = progress_tx.clone();
                let message = pb::ImportProfilesProgress {
                    imported: p.imported,
                    total: p.total,
                    not_found: p.not_found,
                    done: p.done,
                };
                // A full channel means a slow reader: wait for it; a closed one ends the import.
                async move { tx.send(Ok(message)).await.is_ok() }
            })
            .await;
            if let Err(e) = result {
                let _ = tx.send(Err(to_status(e))).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn update_attributes(
        &self,
        request: Request<pb::UpdateAttributesRequest>,
    ) -> Result<Response<pb::UpdateAttributesResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let update = attribute_update(request.into_inner(), "").or_status()?;
        profiles::update_attributes(&ctx, vec![update], None)
            .await
            .or_status()?;
        Ok(Response::new(pb::UpdateAttributesResponse {}))
    }

    async fn batch_update_attributes(
        &self,
        request: Request<pb::BatchUpdateAttributesRequest>,
    ) -> Result<Response<pb::BatchUpdateAttributesResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let updates = map_all(request.into_inner().updates, |i, u| {
            attribute_update(u, &format!("updates[{i}]."))
        })
        .or_status()?;
        let accepted = profiles::update_attributes(&ctx, updates, Some("updates"))
            .await
            .or_status()?;
        Ok(Response::new(pb::BatchUpdateAttributesResponse {
            accepted: u32::try_from(accepted).unwrap_or(u32::MAX),
        }))
    }

    async fn track_event(
        &self,
        request: Request<pb::TrackEventRequest>,
    ) -> Result<Response<pb::TrackEventResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let event = event_input(request.into_inner(), "").or_status()?;
        let accepted = profiles::track_events(&ctx, vec![event], None)
            .await
            .or_status()?;
        let first = accepted
            .into_iter()
            .next()
            .ok_or_else(|| to_status(CoreError::Internal("event not accepted".into())))?;
        Ok(Response::new(pb::TrackEventResponse {
            event_id: first.event_id,
            duplicate: first.duplicate,
        }))
    }

    async fn batch_track_events(
        &self,
        request: Request<pb::BatchTrackEventsRequest>,
    ) -> Result<Response<pb::BatchTrackEventsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let events = map_all(request.into_inner().events, |i, e| {
            event_input(e, &format!("events[{i}]."))
        })
        .or_status()?;
        let accepted = profiles::track_events(&ctx, events, Some("events"))
            .await
            .or_status()?;
        Ok(Response::new(pb::BatchTrackEventsResponse {
            events: accepted
                .into_iter()
                .map(|a| pb::TrackEventResponse {
                    event_id: a.event_id,
                    duplicate: a.duplicate,
                })
                .collect(),
        }))
    }

    async fn get_sync_status(
        &self,
        request: Request<pb::GetSyncStatusRequest>,
    ) -> Result<Response<pb::GetSyncStatusResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let limit = limit(
            "limit",
            i64::from(request.into_inner().limit),
            DEFAULT_STATUS_LIMIT,
            MAX_STATUS_LIMIT,
        )
        .or_status()?;
        let status = outbox::sync_status(&ctx, limit).await.or_status()?;
        Ok(Response::new(pb::GetSyncStatusResponse {
            pending: status.pending,
            in_flight: status.in_flight,
            delivered: status.delivered,
            dead: status.dead,
            oldest_pending_age: status
                .oldest_pending_age
                .and_then(|d| prost_types::Duration::try_from(d).ok()),
            last_delivered_at: status.last_delivered_at.map(timestamp),
            recent_failures: status.recent_failures.iter().map(item).collect(),
            dead_letters: status.dead_letters.iter().map(item).collect(),
        }))
    }

    async fn retry_dead_letters(
        &self,
        request: Request<pb::RetryDeadLettersRequest>,
    ) -> Result<Response<pb::RetryDeadLettersResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let ids = request.into_inner().ids;
        if ids.len() > OUTBOX_IDS {
            return Err(to_status(CoreError::invalid(
                "ids",
                format!("holds {} ids; at most {OUTBOX_IDS}", ids.len()),
            )));
        }
        let requeued = outbox::retry_dead_letters(&ctx, &ids).await.or_status()?;
        Ok(Response::new(pb::RetryDeadLettersResponse { requeued }))
    }
}

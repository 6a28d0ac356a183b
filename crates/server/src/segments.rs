//! `sharpsend.cio.v1.SegmentService`: request validation and mapping; the work is in
//! `sharpsend_core::segments` (reads, sync, targeting) and `sharpsend_core::managed_segments`
//! (SharpSend's own segments). The criteria message maps to and from `sharpsend_core::criteria`
//! here ([`raw_criteria`], [`criteria_to_proto`]).

use std::time::Duration;

use sharpsend_core::tenants::Tenants;
use sharpsend_core::{
    AppContext, CoreError,
    criteria::{
        Criteria, Operand, Operator, RawCondition, RawCriteria, RawOperator, RawValue, TimeValue,
        Value,
    },
    input::{self, limits::SEARCH_CHARS},
    jobs::{self, Job},
    managed_segments::{self as managed, CriteriaInput, ManagedView, NewSegment, SegmentChanges},
    segments::{
        self as core_segments, SegmentFilter, SegmentKind, SegmentView, TargetingWarning as Warning,
    },
};
use sharpsend_proto::v1::{self as pb, segment_service_server::SegmentService};
use tonic::{Request, Response, Status};

use crate::{
    auth::Caller,
    convert::{self, limit, timestamp},
    status::{OrStatus, to_status},
};

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page; larger requests are served this many.
pub const MAX_PAGE_SIZE: u64 = 500;

pub struct Segments {
    tenants: Tenants,
}

impl Segments {
    pub fn new(tenants: Tenants) -> Self {
        Self { tenants }
    }
}

#[tonic::async_trait]
impl SegmentService for Segments {
    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let limit = page_size(req.page_size).or_status()?;
        let mut violations = Vec::new();
        input::text(
            &mut violations,
            "name_contains",
            &req.name_contains,
            SEARCH_CHARS,
        );
        input::finish(violations).or_status()?;
        let filters = list_filters(&req);
        let after = decode_page_token(&filters, &req.page_token).or_status()?;
        let kind = match pb::SegmentType::try_from(req.r#type) {
            Ok(pb::SegmentType::Unspecified) => None,
            Ok(pb::SegmentType::Dynamic) => Some(SegmentKind::Dynamic),
            Ok(pb::SegmentType::Manual) => Some(SegmentKind::Manual),
            Err(_) => {
                return Err(to_status(CoreError::invalid(
                    "type",
                    format!("unknown segment type {}", req.r#type),
                )));
            }
        };
        let filter = SegmentFilter {
            name_contains: Some(req.name_contains),
            kind,
            include_removed: req.include_removed,
        };
        let page = core_segments::list_segments(&ctx, &filter, after, limit)
            .await
            .or_status()?;
        Ok(Response::new(pb::ListSegmentsResponse {
            segments: page.items.iter().map(into_proto).collect(),
            next_page_token: page
                .next
                .map(|after| encode_page_token(&filters, after))
                .unwrap_or_default(),
        }))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let segment = core_segments::get_segment(&ctx, request.into_inner().segment_id)
            .await
            .or_status()?;
        Ok(Response::new(pb::GetSegmentResponse {
            segment: Some(into_proto(&segment)),
        }))
    }

    async fn sync_segments(
        &self,
        request: Request<pb::SyncSegmentsRequest>,
    ) -> Result<Response<pb::SyncSegmentsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let caller = request
            .extensions()
            .get::<Caller>()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "unknown".into());
        let (run, _) = jobs::run_now(&ctx, Job::SegmentSync, &caller, "")
            .await
            .or_status()?;
        Ok(Response::new(pb::SyncSegmentsResponse {
            run: Some(crate::ops::to_proto(&run)),
        }))
    }

    async fn validate_targeting(
        &self,
        request: Request<pb::ValidateTargetingRequest>,
    ) -> Result<Response<pb::ValidateTargetingResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let max_age = match &req.max_count_age {
            None => core_segments::DEFAULT_MAX_COUNT_AGE,
            Some(d) => convert::duration("max_count_age", d).or_status()?,
        };
        let report = core_segments::validate_targeting(&ctx, &req.segment_ids, max_age, ctx.now())
            .await
            .or_status()?;
        let sendable = report.sendable();
        Ok(Response::new(pb::ValidateTargetingResponse {
            segments: report
                .segments
                .iter()
                .map(|t| pb::SegmentTargeting {
                    segment_id: t.segment_id,
                    exists: t.segment.is_some(),
                    segment: t.segment.as_ref().map(into_proto),
                    count_age: t
                        .count_age
                        .and_then(|a| prost_types::Duration::try_from(a).ok()),
                    warnings: t.warnings.iter().map(|w| warning(*w) as i32).collect(),
                    sendable: t.sendable(),
                })
                .collect(),
            sendable,
            total_member_count: report.total_member_count,
        }))
    }

    async fn create_segment(
        &self,
        request: Request<pb::CreateSegmentRequest>,
    ) -> Result<Response<pb::CreateSegmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let criteria = criteria_input(req.criteria, req.criteria_json, false).or_status()?;
        let (view, _created) = core_segments::create_segment_once(
            &ctx,
            NewSegment {
                name: req.name,
                description: req.description,
                criteria,
            },
            &req.request_id,
        )
        .await
        .or_status()?;
        let segment = managed_segment(&ctx, view).await?;
        Ok(Response::new(pb::CreateSegmentResponse {
            segment: Some(segment),
        }))
    }

    async fn preview_segment(
        &self,
        request: Request<pb::PreviewSegmentRequest>,
    ) -> Result<Response<pb::PreviewSegmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let input = criteria_input(req.criteria, req.criteria_json, true)
            .or_status()?
            .ok_or_else(|| {
                to_status(CoreError::invalid(
                    "criteria",
                    "is required (or criteria_json)",
                ))
            })?;
        let preview = managed::preview(&ctx, input, req.sample_size)
            .await
            .or_status()?;
        Ok(Response::new(pb::PreviewSegmentResponse {
            member_count: i64::try_from(preview.member_count).unwrap_or(i64::MAX),
            sample: preview
                .sample
                .into_iter()
                .map(|m| pb::PreviewMember {
                    customer_id: m.customer_id,
                    email: m.email.unwrap_or_default(),
                })
                .collect(),
            evaluated_at: Some(timestamp(preview.evaluated_at)),
            duration: prost_types::Duration::try_from(preview.duration).ok(),
        }))
    }

    async fn update_segment(
        &self,
        request: Request<pb::UpdateSegmentRequest>,
    ) -> Result<Response<pb::UpdateSegmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let criteria = criteria_input(req.criteria, req.criteria_json, false).or_status()?;
        let changes = SegmentChanges {
            name: req.name,
            description: req.description,
            criteria,
            remove_criteria: req.remove_criteria,
        };
        let view = managed::update_segment(&ctx, req.segment_id, changes)
            .await
            .or_status()?;
        let segment = managed_segment(&ctx, view).await?;
        Ok(Response::new(pb::UpdateSegmentResponse {
            segment: Some(segment),
        }))
    }

    async fn delete_segment(
        &self,
        request: Request<pb::DeleteSegmentRequest>,
    ) -> Result<Response<pb::DeleteSegmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        managed::delete_segment(&ctx, request.into_inner().segment_id)
            .await
            .or_status()?;
        Ok(Response::new(pb::DeleteSegmentResponse {}))
    }

    async fn add_segment_members(
        &self,
        request: Request<pb::AddSegmentMembersRequest>,
    ) -> Result<Response<pb::AddSegmentMembersResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let change = managed::add_members(&ctx, req.segment_id, &req.customer_ids)
            .await
            .or_status()?;
        Ok(Response::new(pb::AddSegmentMembersResponse {
            added: change.changed,
            member_count: change.member_count,
        }))
    }

    async fn remove_segment_members(
        &self,
        request: Request<pb::RemoveSegmentMembersRequest>,
    ) -> Result<Response<pb::RemoveSegmentMembersResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let change = managed::remove_members(&ctx, req.segment_id, &req.customer_ids)
            .await
            .or_status()?;
        Ok(Response::new(pb::RemoveSegmentMembersResponse {
            removed: change.changed,
            member_count: change.member_count,
        }))
    }
}

/// A managed segment as a `Segment`, with its mirrored part.
async fn managed_segment(ctx: &AppContext, view: ManagedView) -> Result<pb::Segment, Status> {
    let segment = core_segments::get_segment(ctx, view.segment_id)
        .await
        .or_status()?;
    Ok(into_proto(&segment))
}

/// The criteria a request carries: the message, or the JSON text (not both). `required`: one
/// of them must be given.
fn criteria_input(
    message: Option<pb::Criteria>,
    json: String,
    required: bool,
) -> Result<Option<CriteriaInput>, CoreError> {
    match (message, json.trim().is_empty()) {
        (Some(_), false) => Err(CoreError::invalid(
            "criteria_json",
            "give either criteria or criteria_json, not both",
        )),
        (Some(m), true) => Ok(Some(CriteriaInput::Message(raw_criteria(m), "criteria"))),
        (None, false) => Ok(Some(CriteriaInput::Json(json, "criteria_json"))),
        (None, true) if required => Err(CoreError::invalid(
            "criteria",
            "is required (or criteria_json)",
        )),
        (None, true) => Ok(None),
    }
}

/// The protobuf criteria as received (validated by `sharpsend_core::criteria::validate`).
pub fn raw_criteria(c: pb::Criteria) -> RawCriteria {
    use pb::criteria::Criterion;
    match c.criterion {
        None => RawCriteria::Empty,
        Some(Criterion::AllOf(g)) => {
            RawCriteria::And(g.criteria.into_iter().map(raw_criteria).collect())
        }
        Some(Criterion::AnyOf(g)) => {
            RawCriteria::Or(g.criteria.into_iter().map(raw_criteria).collect())
        }
        Some(Criterion::Negate(inner)) => RawCriteria::Not(Some(Box::new(raw_criteria(*inner)))),
        Some(Criterion::Segment(s)) => RawCriteria::Segment(Some(s.id)),
        Some(Criterion::Attribute(a)) => {
            let operator = match pb::AttributeOperator::try_from(a.operator) {
                Ok(pb::AttributeOperator::Unspecified) => RawOperator::Missing,
                Ok(op) => RawOperator::Known(match op {
                    pb::AttributeOperator::Eq | pb::AttributeOperator::Unspecified => Operator::Eq,
                    pb::AttributeOperator::Neq => Operator::Neq,
                    pb::AttributeOperator::Gt => Operator::Gt,
                    pb::AttributeOperator::Gte => Operator::Gte,
                    pb::AttributeOperator::Lt => Operator::Lt,
                    pb::AttributeOperator::Lte => Operator::Lte,
                    pb::AttributeOperator::In => Operator::In,
                    pb::AttributeOperator::Contains => Operator::Contains,
                    pb::AttributeOperator::StartsWith => Operator::StartsWith,
                    pb::AttributeOperator::Exists => Operator::Exists,
                }),
                Err(_) => RawOperator::Unknown(a.operator.to_string()),
            };
            RawCriteria::Attribute(RawCondition {
                field: a.field,
                operator,
                value: a.value.map(raw_value),
                values: (!a.values.is_empty())
                    .then(|| a.values.into_iter().map(raw_value).collect()),
                list_field: "values",
            })
        }
    }
}

fn raw_value(v: pb::ConditionValue) -> RawValue {
    use pb::condition_value::Value as V;
    use pb::time_value::Time;
    match v.value {
        None => RawValue::Empty,
        Some(V::StringValue(s)) => RawValue::Known(Value::String(s)),
        Some(V::NumberValue(n)) => RawValue::Known(Value::Number(n)),
        Some(V::BoolValue(b)) => RawValue::Known(Value::Bool(b)),
        Some(V::TimeValue(t)) => match t.time {
            None => RawValue::Empty,
            Some(Time::At(ts)) => match convert::datetime("at", &ts) {
                Ok(at) => RawValue::Known(Value::Timestamp(TimeValue::At(at))),
                Err(_) => RawValue::Malformed(format!(
                    "`time_value.at` {}",
                    convert::datetime_problem(&ts)
                        .unwrap_or_else(|| "is not a valid timestamp".into())
                )),
            },
            Some(Time::Ago(d)) => match convert::duration_problem(&d) {
                None => RawValue::Known(Value::Timestamp(TimeValue::Ago(proto_duration(&d)))),
                Some(why) => RawValue::Malformed(format!("`time_value.ago` {why}")),
            },
            Some(Time::FromNow(d)) => match convert::duration_problem(&d) {
                None => RawValue::Known(Value::Timestamp(TimeValue::FromNow(proto_duration(&d)))),
                Some(why) => RawValue::Malformed(format!("`time_value.from_now` {why}")),
            },
        },
    }
}

/// A duration [`convert::duration_problem`] found nothing wrong with.
fn proto_duration(d: &prost_types::Duration) -> Duration {
    Duration::new(
        u64::try_from(d.seconds).unwrap_or(0),
        u32::try_from(d.nanos).unwrap_or(0),
    )
}

/// Validated criteria as the protobuf message.
pub fn criteria_to_proto(c: &Criteria) -> pb::Criteria {
    use pb::criteria::Criterion;
    let criterion = match c {
        Criteria::And(items) => Criterion::AllOf(pb::CriteriaGroup {
            criteria: items.iter().map(criteria_to_proto).collect(),
        }),
        Criteria::Or(items) => Criterion::AnyOf(pb::CriteriaGroup {
            criteria: items.iter().map(criteria_to_proto).collect(),
        }),
        Criteria::Not(inner) => Criterion::Negate(Box::new(criteria_to_proto(inner))),
        Criteria::Segment(id) => Criterion::Segment(pb::SegmentCondition { id: *id }),
        Criteria::Attribute(a) => {
            let operator = match a.operator {
                Operator::Eq => pb::AttributeOperator::Eq,
                Operator::Neq => pb::AttributeOperator::Neq,
                Operator::Gt => pb::AttributeOperator::Gt,
                Operator::Gte => pb::AttributeOperator::Gte,
                Operator::Lt => pb::AttributeOperator::Lt,
                Operator::Lte => pb::AttributeOperator::Lte,
                Operator::In => pb::AttributeOperator::In,
                Operator::Contains => pb::AttributeOperator::Contains,
                Operator::StartsWith => pb::AttributeOperator::StartsWith,
                Operator::Exists => pb::AttributeOperator::Exists,
            };
            let (value, values) = match &a.operand {
                Operand::None => (None, Vec::new()),
                Operand::One(v) => (Some(value_to_proto(v)), Vec::new()),
                Operand::Many(vs) => (None, vs.iter().map(value_to_proto).collect()),
            };
            Criterion::Attribute(pb::AttributeCondition {
                field: a.field.clone(),
                operator: operator as i32,
                value,
                values,
            })
        }
    };
    pb::Criteria {
        criterion: Some(criterion),
    }
}

fn value_to_proto(v: &Value) -> pb::ConditionValue {
    use pb::condition_value::Value as V;
    use pb::time_value::Time;
    let value = match v {
        Value::String(s) => V::StringValue(s.clone()),
        Value::Number(n) => V::NumberValue(*n),
        Value::Bool(b) => V::BoolValue(*b),
        Value::Timestamp(t) => V::TimeValue(pb::TimeValue {
            time: Some(match t {
                TimeValue::At(at) => Time::At(timestamp(*at)),
                TimeValue::Ago(d) => {
                    Time::Ago(prost_types::Duration::try_from(*d).unwrap_or_default())
                }
                TimeValue::FromNow(d) => {
                    Time::FromNow(prost_types::Duration::try_from(*d).unwrap_or_default())
                }
            }),
        }),
    };
    pb::ConditionValue { value: Some(value) }
}

/// The `managed` part of a `Segment`.
fn managed_to_proto(m: &ManagedView) -> pb::ManagedSegment {
    pb::ManagedSegment {
        criteria: m.criteria.as_ref().map(criteria_to_proto),
        criteria_json: m
            .criteria
            .as_ref()
            .map(|c| c.to_json().to_string())
            .unwrap_or_default(),
        member_count: m.member_count,
        last_evaluation: m.last_evaluation.as_ref().map(|e| pb::SegmentEvaluation {
            evaluated_at: Some(timestamp(e.evaluated_at)),
            duration: prost_types::Duration::try_from(e.duration).ok(),
            added: e.added,
            removed: e.removed,
        }),
        evaluation_due: m.evaluation_due,
        last_evaluation_error: m.last_evaluation_error.clone().unwrap_or_default(),
        created_at: Some(timestamp(m.created_at)),
        updated_at: Some(timestamp(m.updated_at)),
    }
}

fn warning(w: Warning) -> pb::TargetingWarning {
    match w {
        Warning::UnknownSegment => pb::TargetingWarning::UnknownSegment,
        Warning::RemovedSegment => pb::TargetingWarning::RemovedSegment,
        Warning::EmptySegment => pb::TargetingWarning::EmptySegment,
        Warning::StaleCount => pb::TargetingWarning::StaleCount,
        Warning::DuplicateSegment => pb::TargetingWarning::DuplicateSegment,
    }
}

fn page_size(requested: i32) -> Result<u64, CoreError> {
    limit(
        "page_size",
        i64::from(requested),
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
    )
}

/// The filters a ListSegments page token is bound to, normalised as the listing reads them.
fn list_filters(req: &pb::ListSegmentsRequest) -> String {
    format!(
        "name={}|type={}|removed={}",
        req.name_contains.trim(),
        req.r#type,
        req.include_removed
    )
}

fn encode_page_token(filters: &str, after_cio_id: i64) -> String {
    convert::encode_page_token("segments", filters, after_cio_id)
}

fn decode_page_token(filters: &str, token: &str) -> Result<Option<i64>, CoreError> {
    convert::decode_page_token("segments", "ListSegments", filters, token, |p| {
        p.parse().ok()
    })
}

fn into_proto(s: &SegmentView) -> pb::Segment {
    pb::Segment {
        id: s.id,
        name: s.name.clone(),
        description: s.description.clone().unwrap_or_default(),
        r#type: match s.kind {
            Some(SegmentKind::Dynamic) => pb::SegmentType::Dynamic,
            Some(SegmentKind::Manual) => pb::SegmentType::Manual,
            None => pb::SegmentType::Unspecified,
        } as i32,
        member_count: s.member_count,
        counted_at: s.counted_at.map(timestamp),
        synced_at: Some(timestamp(s.synced_at)),
        removed: s.removed,
        removed_at: s.removed_at.map(timestamp),
        managed: s.managed.as_ref().map(managed_to_proto),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected_by_field() {
        let dynamic = list_filters(&pb::ListSegmentsRequest {
            r#type: pb::SegmentType::Dynamic as i32,
            ..Default::default()
        });
        let manual = list_filters(&pb::ListSegmentsRequest {
            r#type: pb::SegmentType::Manual as i32,
            ..Default::default()
        });
        let token = encode_page_token(&dynamic, 42);
        assert_eq!(decode_page_token(&dynamic, &token).ok(), Some(Some(42)));
        assert_eq!(decode_page_token(&dynamic, "").ok(), Some(None));
        for (filters, bad) in [
            (&dynamic, "!!!".to_string()),
            (&dynamic, "bm9wZQ".to_string()),
            (
                &dynamic,
                convert::encode_page_token("segments", &dynamic, "x"),
            ),
            (&manual, token.clone()),
        ] {
            match decode_page_token(filters, &bad) {
                Err(CoreError::InvalidArgument(v)) => assert_eq!(v[0].field, "page_token"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn page_size_defaults_caps_and_rejects_negative() {
        assert_eq!(page_size(0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7).ok(), Some(7));
        assert_eq!(page_size(100_000).ok(), Some(MAX_PAGE_SIZE));
        assert!(matches!(page_size(-1), Err(CoreError::InvalidArgument(_))));
    }
}

//! `sharpsend.cio.v1.SegmentService`: request validation and mapping; the work is in
//! `sharpsend_core::segments` and the mirror in `sharpsend_db::segments`.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use sharpsend_core::{
    AppContext, CoreError,
    segments::{self as core_segments, TargetingWarning as Warning},
};
use sharpsend_db::segments::{self as mirror, ListFilter, SegmentRecord, TypeFilter};
use sharpsend_proto::v1::{
    self as pb, segment_service_server::SegmentService,
};
use tonic::{Request, Response, Status};

use crate::{convert::timestamp, status::to_status};

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page; larger requests are served this many.
pub const MAX_PAGE_SIZE: u64 = 500;

pub struct Segments {
    ctx: AppContext,
}

impl Segments {
    pub fn new(ctx: AppContext) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl SegmentService for Segments {
    async fn list_segments(
        &self,
        request: Request<pb::ListSegmentsRequest>,
    ) -> Result<Response<pb::ListSegmentsResponse>, Status> {
        let req = request.into_inner();
        let limit = page_size(req.page_size).map_err(to_status)?;
        let after = decode_page_token(&req.page_token).map_err(to_status)?;
        let segment_type = match pb::SegmentType::try_from(req.r#type) {
            Ok(pb::SegmentType::Unspecified) => None,
            Ok(pb::SegmentType::Dynamic) => Some(TypeFilter::Dynamic),
            Ok(pb::SegmentType::Manual) => Some(TypeFilter::Manual),
            Err(_) => return Err(to_status(CoreError::invalid("type", format!("unknown segment type {}", req.r#type)))),
        };
        let filter = ListFilter {
            name_contains: Some(req.name_contains.trim().to_string()).filter(|n| !n.is_empty()),
            segment_type,
            include_removed: req.include_removed,
        };
        let mut rows = mirror::list(&self.ctx.db, self.ctx.workspace_id(), &filter, after, limit + 1)
            .await
            .map_err(|e| to_status(e.into()))?;
        let next_page_token = if rows.len() as u64 > limit {
            rows.truncate(limit as usize);
            rows.last().map(|r| encode_page_token(r.cio_id)).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListSegmentsResponse { segments: rows.iter().map(to_proto).collect(), next_page_token }))
    }

    async fn get_segment(
        &self,
        request: Request<pb::GetSegmentRequest>,
    ) -> Result<Response<pb::GetSegmentResponse>, Status> {
        let id = request.into_inner().segment_id;
        if id <= 0 {
            return Err(to_status(CoreError::invalid("segment_id", "must be a positive Customer.io segment id")));
        }
        let found = mirror::get(&self.ctx.db, self.ctx.workspace_id(), id).await.map_err(|e| to_status(e.into()))?;
        let segment = found.ok_or_else(|| to_status(CoreError::NotFound { what: "segment", id: id.to_string() }))?;
        Ok(Response::new(pb::GetSegmentResponse { segment: Some(to_proto(&segment)) }))
    }

    async fn sync_segments(
        &self,
        _request: Request<pb::SyncSegmentsRequest>,
    ) -> Result<Response<pb::SyncSegmentsResponse>, Status> {
        let report = core_segments::sync_segments(&self.ctx).await.map_err(to_status)?;
        Ok(Response::new(pb::SyncSegmentsResponse {
            created: report.counts.created,
            updated: report.counts.updated,
            removed: report.counts.removed,
            unchanged: report.counts.unchanged,
            duration: prost_types::Duration::try_from(report.duration).ok(),
        }))
    }

    async fn validate_targeting(
        &self,
        request: Request<pb::ValidateTargetingRequest>,
    ) -> Result<Response<pb::ValidateTargetingResponse>, Status> {
        let req = request.into_inner();
        let max_age = match req.max_count_age {
            None => core_segments::DEFAULT_MAX_COUNT_AGE,
            Some(d) => Duration::try_from(d)
                .map_err(|_| to_status(CoreError::invalid("max_count_age", "must be a non-negative duration")))?,
        };
        let report = core_segments::validate_targeting(&self.ctx, &req.segment_ids, max_age, Utc::now())
            .await
            .map_err(to_status)?;
        let sendable = report.sendable();
        Ok(Response::new(pb::ValidateTargetingResponse {
            segments: report
                .segments
                .iter()
                .map(|t| pb::SegmentTargeting {
                    segment_id: t.segment_id,
                    exists: t.segment.is_some(),
                    segment: t.segment.as_ref().map(to_proto),
                    count_age: t.count_age.and_then(|a| prost_types::Duration::try_from(a).ok()),
                    warnings: t.warnings.iter().map(|w| warning(*w) as i32).collect(),
                    sendable: t.sendable(),
                })
                .collect(),
            sendable,
            total_member_count: report.total_member_count,
        }))
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
    match requested {
        n if n < 0 => Err(CoreError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u64).min(MAX_PAGE_SIZE)),
    }
}

const PAGE_TOKEN_PREFIX: &str = "segments.v1:";

fn encode_page_token(after_cio_id: i64) -> String {
    URL_SAFE_NO_PAD.encode(format!("{PAGE_TOKEN_PREFIX}{after_cio_id}"))
}

fn decode_page_token(token: &str) -> Result<Option<i64>, CoreError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || CoreError::invalid("page_token", "is not a page token returned by ListSegments");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let id = text.strip_prefix(PAGE_TOKEN_PREFIX).and_then(|n| n.parse::<i64>().ok()).ok_or_else(bad)?;
    Ok(Some(id))
}

fn to_proto(s: &SegmentRecord) -> pb::Segment {
    pb::Segment {
        id: s.cio_id,
        name: s.name.clone(),
        description: s.description.clone().unwrap_or_default(),
        r#type: match s.segment_type.as_str() {
            "dynamic" => pb::SegmentType::Dynamic,
            "manual" => pb::SegmentType::Manual,
            _ => pb::SegmentType::Unspecified,
        } as i32,
        member_count: s.member_count,
        counted_at: s.counted_at.map(timestamp),
        synced_at: Some(timestamp(s.synced_at)),
        removed: s.removed,
        removed_at: s.removed_at.map(timestamp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected_by_field() {
        assert_eq!(decode_page_token(&encode_page_token(42)).ok(), Some(Some(42)));
        assert_eq!(decode_page_token("").ok(), Some(None));
        for bad in ["!!!", "bm9wZQ", &URL_SAFE_NO_PAD.encode("segments.v1:x")] {
            match decode_page_token(bad) {
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

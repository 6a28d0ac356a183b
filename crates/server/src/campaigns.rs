//! `sharpsend.cio.v1.CampaignService`: sends of approved assignments, the campaign mirror and
//! metrics. Mapping only; the logic is in `sharpsend_core::{sends, campaigns, metrics, journey}`.
//! The campaign and metrics reads are mapped in [`crate::campaign_metrics`], journey events in
//! [`crate::journey`]; sends here.

use sharpsend_core::tenants::Tenants;
use sharpsend_core::{
    CoreError, FieldViolation,
    input::{self, limits::ID_BYTES},
    sends::{
        self, Delivery, DeliveryMode, HistoryView, Resolution, SendFilter, SendKey, SendRequest,
        SendState, SendView, SubmissionView, Variation,
    },
};
use sharpsend_proto::v1::{self as pb, campaign_service_server::CampaignService};
use tonic::{Request, Response, Status};

use crate::{
    auth::caller_name,
    campaign_metrics,
    convert::{limit, struct_to_json, timestamp},
    journey,
    status::{OrStatus, to_status},
};

/// Sends listed by ListSends unless the caller says otherwise, and the most it may ask for.
pub const DEFAULT_SENDS_PAGE: u64 = 50;
pub const MAX_SENDS_PAGE: u64 = 500;

pub struct Campaigns {
    tenants: Tenants,
}

impl Campaigns {
    pub fn new(tenants: Tenants) -> Self {
        Self { tenants }
    }
}

#[tonic::async_trait]
impl CampaignService for Campaigns {
    async fn list_campaigns(
        &self,
        request: Request<pb::ListCampaignsRequest>,
    ) -> Result<Response<pb::ListCampaignsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        campaign_metrics::list_campaigns(&ctx, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_campaign(
        &self,
        request: Request<pb::GetCampaignRequest>,
    ) -> Result<Response<pb::GetCampaignResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        campaign_metrics::get_campaign(&ctx, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn send_assignment(
        &self,
        request: Request<pb::SendAssignmentRequest>,
    ) -> Result<Response<pb::SendAssignmentResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let caller = caller_name(&request);
        let req = request.into_inner();
        // Bounds the send's own validation does not cover: ids taken exactly as given, no NUL in
        // a body, finite numbers and no NUL in data.
        let mut violations = Vec::new();
        input::identifier(
            &mut violations,
            "assignment_id",
            &req.assignment_id,
            ID_BYTES,
            false,
        );
        input::identifier(
            &mut violations,
            "request_id",
            &req.request_id,
            ID_BYTES,
            false,
        );
        let mut variations = Vec::with_capacity(req.variations.len());
        for (i, v) in req.variations.into_iter().enumerate() {
            input::text(
                &mut violations,
                &format!("variations[{i}].body"),
                &v.body,
                sends::MAX_NEWSLETTER_BODY_BYTES,
            );
            let data = match v.data {
                None => None,
                Some(s) => match struct_to_json(&format!("variations[{i}].data"), s) {
                    Ok(data) => Some(data),
                    Err(CoreError::InvalidArgument(v)) => {
                        violations.extend(v);
                        None
                    }
                    Err(e) => return Err(to_status(e)),
                },
            };
            variations.push(Variation {
                segment_id: v.segment_id,
                subject: v.subject,
                body: v.body,
                data,
            });
        }
        input::finish(violations).or_status()?;
        let delivery = match req.delivery {
            Some(pb::send_assignment_request::Delivery::Broadcast(b)) => {
                Some(DeliveryMode::Broadcast {
                    broadcast_id: b.broadcast_id,
                })
            }
            Some(pb::send_assignment_request::Delivery::Newsletter(n)) => {
                Some(DeliveryMode::Newsletter {
                    from_id: n.from_id,
                    subscription_topic_id: n.subscription_topic_id,
                })
            }
            None => None,
        };
        let request = SendRequest {
            assignment_id: req.assignment_id,
            request_id: req.request_id,
            title: req.title,
            subject: req.subject,
            segment_ids: req.segment_ids,
            variations,
            delivery,
            content_types: req.content_types,
            created_by: caller,
        };
        let (view, created) = sends::send_assignment(&ctx, request).await.or_status()?;
        Ok(Response::new(pb::SendAssignmentResponse {
            send: Some(send_to_proto(&view)),
            created,
        }))
    }

    async fn get_send(
        &self,
        request: Request<pb::GetSendRequest>,
    ) -> Result<Response<pb::GetSendResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let mut violations = Vec::new();
        input::identifier(&mut violations, "send_id", &req.send_id, ID_BYTES, false);
        input::identifier(
            &mut violations,
            "assignment_id",
            &req.assignment_id,
            ID_BYTES,
            false,
        );
        input::identifier(
            &mut violations,
            "request_id",
            &req.request_id,
            ID_BYTES,
            false,
        );
        input::finish(violations).or_status()?;
        let key = if !req.send_id.is_empty() {
            SendKey::Id(req.send_id)
        } else if !req.assignment_id.is_empty() {
            SendKey::Assignment {
                assignment_id: req.assignment_id,
                request_id: req.request_id,
            }
        } else {
            return Err(to_status(CoreError::invalid(
                "send_id",
                "give send_id, or assignment_id (and request_id)",
            )));
        };
        let view = sends::get_send(&ctx, &key).await.or_status()?;
        Ok(Response::new(pb::GetSendResponse {
            send: Some(send_to_proto(&view)),
        }))
    }

    async fn list_sends(
        &self,
        request: Request<pb::ListSendsRequest>,
    ) -> Result<Response<pb::ListSendsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let limit = limit(
            "page_size",
            i64::from(req.page_size),
            DEFAULT_SENDS_PAGE,
            MAX_SENDS_PAGE,
        )
        .or_status()?;
        let state = match pb::SendState::try_from(req.state) {
            Ok(pb::SendState::Unspecified) => None,
            Ok(state) => Some(state_from_proto(state)),
            Err(_) => {
                return Err(to_status(CoreError::invalid(
                    "state",
                    format!("unknown send state {}", req.state),
                )));
            }
        };
        let mut violations = Vec::new();
        input::identifier(
            &mut violations,
            "assignment_id",
            &req.assignment_id,
            ID_BYTES,
            false,
        );
        input::finish(violations).or_status()?;
        let filters = format!("assignment={}|state={}", req.assignment_id, req.state);
        let before = decode_page_token(&filters, &req.page_token).or_status()?;
        let filter = SendFilter {
            assignment_id: Some(req.assignment_id),
            state,
        };
        let page = sends::list_sends(&ctx, &filter, before, limit)
            .await
            .or_status()?;
        Ok(Response::new(pb::ListSendsResponse {
            sends: page.items.iter().map(send_to_proto).collect(),
            next_page_token: page
                .next
                .map(|before| encode_page_token(&filters, before))
                .unwrap_or_default(),
        }))
    }

    async fn resolve_send(
        &self,
        request: Request<pb::ResolveSendRequest>,
    ) -> Result<Response<pb::ResolveSendResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let mut violations: Vec<FieldViolation> = Vec::new();
        input::identifier(&mut violations, "send_id", &req.send_id, ID_BYTES, false);
        input::text(&mut violations, "actor", &req.actor, sends::MAX_ACTOR_CHARS);
        input::text(
            &mut violations,
            "reason",
            &req.reason,
            sends::MAX_REASON_CHARS,
        );
        input::finish(violations).or_status()?;
        let resolution = match pb::Resolution::try_from(req.resolution) {
            Ok(pb::Resolution::MarkSent) => Some(Resolution::MarkSent),
            Ok(pb::Resolution::AllowRetry) => Some(Resolution::AllowRetry),
            _ => None,
        };
        let segment = (req.segment_id != 0).then_some(req.segment_id);
        let view = sends::resolve(
            &ctx,
            &req.send_id,
            segment,
            resolution,
            req.actor.trim(),
            req.reason.trim(),
        )
        .await
        .or_status()?;
        Ok(Response::new(pb::ResolveSendResponse {
            send: Some(send_to_proto(&view)),
        }))
    }

    async fn trigger_journey_event(
        &self,
        request: Request<pb::TriggerJourneyEventRequest>,
    ) -> Result<Response<pb::TriggerJourneyEventResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        journey::trigger_journey_event(&ctx, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_campaign_metrics(
        &self,
        request: Request<pb::GetCampaignMetricsRequest>,
    ) -> Result<Response<pb::GetCampaignMetricsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        campaign_metrics::get_campaign_metrics(&ctx, request.into_inner())
            .await
            .map(Response::new)
    }
}

fn encode_page_token(filters: &str, before_id: i64) -> String {
    crate::convert::encode_page_token("sends", filters, before_id)
}

fn decode_page_token(filters: &str, token: &str) -> Result<Option<i64>, CoreError> {
    crate::convert::decode_page_token("sends", "ListSends", filters, token, |p| p.parse().ok())
}

pub(crate) fn state_to_proto(state: SendState) -> pb::SendState {
    match state {
        SendState::Pending => pb::SendState::Pending,
        SendState::Submitting => pb::SendState::Submitting,
        SendState::Submitted => pb::SendState::Submitted,
        SendState::Completed => pb::SendState::Completed,
        SendState::Failed => pb::SendState::Failed,
        SendState::Uncertain => pb::SendState::Uncertain,
        SendState::Cancelled => pb::SendState::Cancelled,
    }
}

fn state_from_proto(state: pb::SendState) -> SendState {
    match state {
        pb::SendState::Unspecified | pb::SendState::Pending => SendState::Pending,
        pb::SendState::Submitting => SendState::Submitting,
        pb::SendState::Submitted => SendState::Submitted,
        pb::SendState::Completed => SendState::Completed,
        pb::SendState::Failed => SendState::Failed,
        pb::SendState::Uncertain => SendState::Uncertain,
        pb::SendState::Cancelled => SendState::Cancelled,
    }
}

fn submission_to_proto(s: &SubmissionView) -> pb::Submission {
    pb::Submission {
        segment_id: s.segment_id,
        state: state_to_proto(s.state) as i32,
        subject: s.subject.clone(),
        cio_trigger_id: s.cio_trigger_id.unwrap_or_default(),
        cio_newsletter_id: s.cio_newsletter_id.unwrap_or_default(),
        recipients_count: s.recipients_count,
        attempts: s.attempts,
        next_attempt_at: (s.state == SendState::Pending).then(|| timestamp(s.next_attempt_at)),
        submitted_at: s.submitted_at.map(timestamp),
        completed_at: s.completed_at.map(timestamp),
        error: s.error.clone().unwrap_or_default(),
        marker: s.marker.clone(),
        trigger_errors: s.trigger_errors.clone(),
        trigger_error_count: s.trigger_error_count,
    }
}

fn history_to_proto(h: &HistoryView) -> pb::SendHistoryEntry {
    pb::SendHistoryEntry {
        at: Some(timestamp(h.at)),
        segment_id: h.segment_id.unwrap_or_default(),
        from_state: h
            .from_state
            .map_or(pb::SendState::Unspecified, state_to_proto) as i32,
        to_state: state_to_proto(h.to_state) as i32,
        actor: h.actor.clone(),
        reason: h.reason.clone(),
    }
}

fn send_to_proto(send: &SendView) -> pb::Send {
    pb::Send {
        id: send.id.clone(),
        assignment_id: send.assignment_id.clone(),
        request_id: send.request_id.clone(),
        title: send.title.clone(),
        subject: send.subject.clone(),
        state: state_to_proto(send.state) as i32,
        delivery: Some(match send.delivery {
            Delivery::Broadcast { broadcast_id } => {
                pb::send::Delivery::Broadcast(pb::BroadcastDelivery { broadcast_id })
            }
            Delivery::Newsletter {
                from_id,
                subscription_topic_id,
            } => pb::send::Delivery::Newsletter(pb::NewsletterDelivery {
                from_id: from_id.unwrap_or_default(),
                subscription_topic_id,
            }),
        }),
        submissions: send.submissions.iter().map(submission_to_proto).collect(),
        history: send.history.iter().map(history_to_proto).collect(),
        recipients_count: send.recipients_count(),
        created_at: Some(timestamp(send.created_at)),
        updated_at: Some(timestamp(send.updated_at)),
        created_by: send.created_by.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_garbage_is_rejected() {
        let filters = "assignment=a-1|state=0";
        assert_eq!(
            decode_page_token(filters, &encode_page_token(filters, 42)).ok(),
            Some(Some(42))
        );
        assert_eq!(decode_page_token(filters, "").ok(), Some(None));
        assert!(decode_page_token(filters, "bm9wZQ").is_err());
        assert!(
            decode_page_token("assignment=a-2|state=0", &encode_page_token(filters, 42)).is_err()
        );
    }

    #[test]
    fn states_map_both_ways() {
        for state in SendState::ALL {
            assert_eq!(state_from_proto(state_to_proto(state)), state);
        }
    }
}

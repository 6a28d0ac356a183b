//! `CampaignService.TriggerJourneyEvent`: maps the request to
//! [`sharpsend_core::journey::trigger_journey_event`] and its report back; errors through
//! [`crate::status::{OrStatus, to_status}`].

use sharpsend_core::AppContext;
use sharpsend_core::journey::{self, JourneyEventRequest};
use sharpsend_proto::v1::{TriggerJourneyEventRequest, TriggerJourneyEventResponse};
use tonic::Status;

use crate::convert::struct_to_json;
use crate::status::OrStatus;

pub async fn trigger_journey_event(
    ctx: &AppContext,
    request: TriggerJourneyEventRequest,
) -> Result<TriggerJourneyEventResponse, Status> {
    let request = JourneyEventRequest {
        assignment_id: request.assignment_id,
        event_name: request.event_name,
        segment_ids: request.segment_ids,
        data: request.data.map(struct_to_json).unwrap_or_default(),
    };
    let report = journey::trigger_journey_event(ctx, request)
        .await
        .or_status()?;
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    Ok(TriggerJourneyEventResponse {
        members: count(report.members),
        recorded: count(report.recorded),
        already_recorded: count(report.already_recorded),
        skipped_without_id: count(report.skipped),
    })
}

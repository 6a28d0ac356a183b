//! `CampaignService.TriggerJourneyEvent`: maps the request to
//! [`sharpsend_core::journey::trigger_journey_event`] and its report back; errors through
//! [`crate::status::{OrStatus, to_status}`].

use sharpsend_core::input::{self, limits::ID_BYTES};
use sharpsend_core::journey::{self, JourneyEventRequest};
use sharpsend_core::profiles::limits::EVENT_NAME_BYTES;
use sharpsend_core::{AppContext, CoreError};
use sharpsend_proto::v1::{TriggerJourneyEventRequest, TriggerJourneyEventResponse};
use tonic::Status;

use crate::convert::struct_to_json;
use crate::status::OrStatus;

pub async fn trigger_journey_event(
    ctx: &AppContext,
    request: TriggerJourneyEventRequest,
) -> Result<TriggerJourneyEventResponse, Status> {
    // Identifiers are taken exactly as given (an event name with surrounding whitespace is
    // refused, not trimmed); data holds finite numbers and no NUL.
    let mut violations = Vec::new();
    input::identifier(
        &mut violations,
        "assignment_id",
        &request.assignment_id,
        ID_BYTES,
        false,
    );
    input::identifier(
        &mut violations,
        "event_name",
        &request.event_name,
        EVENT_NAME_BYTES,
        false,
    );
    let data = match request.data {
        None => Default::default(),
        Some(s) => match struct_to_json("data", s) {
            Ok(data) => data,
            Err(CoreError::InvalidArgument(v)) => {
                violations.extend(v);
                Default::default()
            }
            Err(e) => return Err(crate::status::to_status(e)),
        },
    };
    input::finish(violations).or_status()?;
    let request = JourneyEventRequest {
        assignment_id: request.assignment_id,
        event_name: request.event_name,
        segment_ids: request.segment_ids,
        data,
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

//! `sharpsend.cio.v1.ABTestService`: planning, creating, starting, reading, listing,
//! cancelling A/B tests and declaring their winner. Mapping only: `sharpsend_core::abtest` holds the rules and the
//! statistics.

use sharpsend_core::CoreError;
use sharpsend_core::abtest::manage::{
    self, Metric, NewTest, NewVariant, NoWinnerPolicy, TestDelivery, TestState, TestView,
};
use sharpsend_core::abtest::run;
use sharpsend_core::tenants::Tenants;
use sharpsend_proto::v1::{self as pb, ab_test_service_server::AbTestService};
use tonic::{Request, Response, Status};

use crate::auth::caller_name;
use crate::convert::{limit, timestamp};
use crate::status::OrStatus;

/// Tests listed by ListTests unless the caller says otherwise, and the most it may ask for.
pub const DEFAULT_TESTS_PAGE: u64 = 50;
pub const MAX_TESTS_PAGE: u64 = 200;

pub struct AbTests {
    tenants: Tenants,
}

impl AbTests {
    pub fn new(tenants: Tenants) -> Self {
        Self { tenants }
    }
}

fn metric_from_proto(value: i32) -> Result<Metric, CoreError> {
    match pb::TestMetric::try_from(value) {
        Ok(pb::TestMetric::Unspecified | pb::TestMetric::ClickRate) => Ok(Metric::ClickRate),
        Ok(pb::TestMetric::HumanOpenRate) => Ok(Metric::HumanOpenRate),
        Ok(pb::TestMetric::ConversionRate) => Ok(Metric::ConversionRate),
        Err(_) => Err(CoreError::invalid(
            "metric",
            format!("unknown metric {value}"),
        )),
    }
}

fn metric_to_proto(metric: Metric) -> pb::TestMetric {
    match metric {
        Metric::ClickRate => pb::TestMetric::ClickRate,
        Metric::HumanOpenRate => pb::TestMetric::HumanOpenRate,
        Metric::ConversionRate => pb::TestMetric::ConversionRate,
    }
}

fn policy_from_proto(value: i32) -> Result<NoWinnerPolicy, CoreError> {
    match pb::NoWinnerPolicy::try_from(value) {
        Ok(pb::NoWinnerPolicy::Unspecified | pb::NoWinnerPolicy::SendControl) => {
            Ok(NoWinnerPolicy::SendControl)
        }
        Ok(pb::NoWinnerPolicy::SendBestObserved) => Ok(NoWinnerPolicy::SendBestObserved),
        Ok(pb::NoWinnerPolicy::SendNothing) => Ok(NoWinnerPolicy::SendNothing),
        Err(_) => Err(CoreError::invalid(
            "no_winner_policy",
            format!("unknown policy {value}"),
        )),
    }
}

fn policy_to_proto(policy: NoWinnerPolicy) -> pb::NoWinnerPolicy {
    match policy {
        NoWinnerPolicy::SendControl => pb::NoWinnerPolicy::SendControl,
        NoWinnerPolicy::SendBestObserved => pb::NoWinnerPolicy::SendBestObserved,
        NoWinnerPolicy::SendNothing => pb::NoWinnerPolicy::SendNothing,
    }
}

pub(crate) fn state_to_proto(state: TestState) -> pb::TestState {
    match state {
        TestState::Draft => pb::TestState::Draft,
        TestState::Running => pb::TestState::Running,
        TestState::Decided => pb::TestState::Decided,
        TestState::Cancelled => pb::TestState::Cancelled,
    }
}

fn test_to_proto(test: &TestView) -> pb::AbTest {
    let spec = &test.spec;
    let delivery = match spec.delivery {
        TestDelivery::Broadcast { broadcast_id } => {
            pb::ab_test::Delivery::BroadcastId(broadcast_id)
        }
        TestDelivery::Newsletter { from_id } => pb::ab_test::Delivery::NewsletterFromId(from_id),
    };
    pb::AbTest {
        id: test.id.clone(),
        assignment_id: test.assignment_id.clone(),
        request_id: test.request_id.clone(),
        title: test.title.clone(),
        audience_segment_ids: spec.audience_segment_ids.clone(),
        variants: spec
            .variants
            .iter()
            .map(|v| pb::TestVariant {
                name: v.name.clone(),
                subject: v.subject.clone(),
                body: v.body.clone(),
                data_json: v
                    .data
                    .as_ref()
                    .map(|d| serde_json::Value::Object(d.clone()).to_string())
                    .unwrap_or_default(),
            })
            .collect(),
        test_fraction: spec.test_fraction,
        metric: metric_to_proto(spec.metric) as i32,
        delivery: Some(delivery),
        confidence: spec.confidence,
        baseline_rate: spec.baseline_rate,
        minimum_detectable_effect: spec.minimum_detectable_effect,
        minimum_sample_per_variant: i64::try_from(spec.minimum_sample_per_variant)
            .unwrap_or(i64::MAX),
        max_duration_hours: i32::try_from(spec.max_duration_hours).unwrap_or(i32::MAX),
        no_winner_policy: policy_to_proto(spec.no_winner_policy) as i32,
        state: state_to_proto(test.state) as i32,
        planned_per_variant: i64::try_from(test.planned_per_variant).unwrap_or(i64::MAX),
        audience_estimate: i64::try_from(test.audience_estimate).unwrap_or(i64::MAX),
        results: test
            .results
            .iter()
            .map(|r| pb::VariantResult {
                name: r.name.clone(),
                recipients: i64::try_from(r.recipients).unwrap_or(i64::MAX),
                human_opens: i64::try_from(r.human_opens).unwrap_or(i64::MAX),
                human_clicks: i64::try_from(r.human_clicks).unwrap_or(i64::MAX),
                conversions: i64::try_from(r.conversions).unwrap_or(i64::MAX),
                rate: r.rate,
                rate_low: r.interval.0,
                rate_high: r.interval.1,
                p_value_vs_control: r.p_value_vs_control,
                allocated: i64::try_from(r.allocated).unwrap_or(i64::MAX),
                segment_id: r.segment_id.unwrap_or(0),
                send_id: r.send_id.clone().unwrap_or_default(),
                send_state: send_state(r.send_state),
            })
            .collect(),
        decision: test.decision.as_ref().map(|d| pb::TestDecision {
            winner: d.winner.and_then(|w| i32::try_from(w).ok()).unwrap_or(-1),
            reason: d.reason.clone(),
            actor: d.actor.clone(),
            decided_at: Some(timestamp(d.decided_at)),
        }),
        warnings: test.warnings.clone(),
        created_by: test.created_by.clone(),
        created_at: Some(timestamp(test.created_at)),
        updated_at: Some(timestamp(test.updated_at)),
        started_at: test.started_at.map(timestamp),
        looks: i64::try_from(test.looks).unwrap_or(i64::MAX),
        remainder: test.remainder.as_ref().map(|r| pb::TestRemainder {
            allocated: i64::try_from(r.allocated).unwrap_or(i64::MAX),
            segment_id: r.segment_id.unwrap_or(0),
            send_id: r.send_id.clone().unwrap_or_default(),
            note: r.note.clone().unwrap_or_default(),
            send_state: send_state(r.send_state),
        }),
        completed_at: test.completed_at.map(timestamp),
    }
}

fn send_state(state: Option<sharpsend_core::sends::SendState>) -> i32 {
    state.map_or(pb::SendState::Unspecified, crate::campaigns::state_to_proto) as i32
}

#[tonic::async_trait]
impl AbTestService for AbTests {
    async fn plan_test(
        &self,
        request: Request<pb::PlanTestRequest>,
    ) -> Result<Response<pb::PlanTestResponse>, Status> {
        let req = request.into_inner();
        let plan = manage::plan_test(
            req.baseline_rate,
            req.minimum_detectable_effect,
            req.power,
            req.confidence,
            req.variants,
        )
        .or_status()?;
        let variants = if req.variants == 0 {
            2
        } else {
            i64::from(req.variants)
        };
        let per_variant = i64::try_from(plan.per_variant).unwrap_or(i64::MAX);
        Ok(Response::new(pb::PlanTestResponse {
            per_variant,
            fixed_horizon_per_variant: i64::try_from(plan.fixed_horizon_per_variant)
                .unwrap_or(i64::MAX),
            total: per_variant.saturating_mul(variants),
        }))
    }

    async fn create_test(
        &self,
        request: Request<pb::CreateTestRequest>,
    ) -> Result<Response<pb::CreateTestResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let created_by = caller_name(&request);
        let req = request.into_inner();
        let delivery = req.delivery.map(|d| match d {
            pb::create_test_request::Delivery::BroadcastId(broadcast_id) => {
                TestDelivery::Broadcast { broadcast_id }
            }
            pb::create_test_request::Delivery::NewsletterFromId(from_id) => {
                TestDelivery::Newsletter { from_id }
            }
        });
        let new = NewTest {
            assignment_id: req.assignment_id,
            request_id: req.request_id,
            title: req.title,
            audience_segment_ids: req.audience_segment_ids,
            variants: req
                .variants
                .into_iter()
                .map(|v| NewVariant {
                    name: v.name,
                    subject: v.subject,
                    body: v.body,
                    data_json: v.data_json,
                })
                .collect(),
            test_fraction: req.test_fraction,
            metric: metric_from_proto(req.metric).or_status()?,
            delivery,
            confidence: req.confidence,
            baseline_rate: req.baseline_rate,
            minimum_detectable_effect: req.minimum_detectable_effect,
            minimum_sample_per_variant: req.minimum_sample_per_variant,
            max_duration_hours: req.max_duration_hours,
            no_winner_policy: policy_from_proto(req.no_winner_policy).or_status()?,
            created_by,
        };
        let (test, created) = manage::create_test(&ctx, new).await.or_status()?;
        Ok(Response::new(pb::CreateTestResponse {
            test: Some(test_to_proto(&test)),
            created,
        }))
    }

    async fn start_test(
        &self,
        request: Request<pb::StartTestRequest>,
    ) -> Result<Response<pb::StartTestResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let test = run::start_test(&ctx, &req.id).await.or_status()?;
        Ok(Response::new(pb::StartTestResponse {
            test: Some(test_to_proto(&test)),
        }))
    }

    async fn get_test(
        &self,
        request: Request<pb::GetTestRequest>,
    ) -> Result<Response<pb::GetTestResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let test = manage::get_test(&ctx, &req.id).await.or_status()?;
        Ok(Response::new(pb::GetTestResponse {
            test: Some(test_to_proto(&test)),
        }))
    }

    async fn list_tests(
        &self,
        request: Request<pb::ListTestsRequest>,
    ) -> Result<Response<pb::ListTestsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let limit = limit(
            "page_size",
            i64::from(req.page_size),
            DEFAULT_TESTS_PAGE,
            MAX_TESTS_PAGE,
        )
        .or_status()?;
        let filters = format!("assignment={}", req.assignment_id);
        let after = crate::convert::decode_page_token(
            "tests",
            "ListTests",
            &filters,
            &req.page_token,
            |p| p.parse::<i64>().ok(),
        )
        .or_status()?;
        let assignment = (!req.assignment_id.is_empty()).then_some(req.assignment_id.as_str());
        let page = manage::list_tests(&ctx, assignment, limit, after)
            .await
            .or_status()?;
        Ok(Response::new(pb::ListTestsResponse {
            tests: page.items.iter().map(test_to_proto).collect(),
            next_page_token: page
                .next
                .map(|position| crate::convert::encode_page_token("tests", &filters, position))
                .unwrap_or_default(),
        }))
    }

    async fn cancel_test(
        &self,
        request: Request<pb::CancelTestRequest>,
    ) -> Result<Response<pb::CancelTestResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let actor = caller_name(&request);
        let req = request.into_inner();
        let test = manage::cancel_test(&ctx, &req.id, &req.reason, &actor)
            .await
            .or_status()?;
        Ok(Response::new(pb::CancelTestResponse {
            test: Some(test_to_proto(&test)),
        }))
    }

    async fn declare_winner(
        &self,
        request: Request<pb::DeclareWinnerRequest>,
    ) -> Result<Response<pb::DeclareWinnerResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let actor = caller_name(&request);
        let req = request.into_inner();
        let test = manage::declare_winner(&ctx, &req.id, &req.variant, &req.reason, &actor)
            .await
            .or_status()?;
        Ok(Response::new(pb::DeclareWinnerResponse {
            test: Some(test_to_proto(&test)),
        }))
    }
}

//! Hostile and malformed input over every RPC (issue #11): a real tonic client against a real
//! server on both databases. Whatever comes in — empty, 1 MB strings, NUL bytes, NaN/±Infinity,
//! invalid Durations and Timestamps, dot-segment ids, 100 KB of metadata — the answer is never
//! `INTERNAL`/`UNKNOWN`, never a panic, always under 8 KB of status (message + details), and
//! nothing that should be refused reaches the mirror, the outbox or Customer.io. Also: NaN never
//! deletes an attribute, page tokens are bound to their filters, the bearer scheme is
//! case-insensitive, errors carry stable reasons. The serving stack is in `serving.rs`.

use std::{collections::BTreeSet, fmt::Debug, time::Duration};

use anyhow::{Context, ensure};
use cio_sim::{Fault, SimApi};
use prost_types::{ListValue, Struct, Timestamp, value::Kind};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    self as pb, campaign_service_client::CampaignServiceClient,
    ops_service_client::OpsServiceClient, profile_service_client::ProfileServiceClient,
    segment_service_client::SegmentServiceClient,
};
use sharpsend_tests::{Bearer, TEST_API_KEY, TestApp, bad_request_fields};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};
use tonic_types::StatusExt as _;

/// What a client with a default 8 KB metadata limit (Python's) can read.
const STATUS_LIMIT: usize = 8 * 1024;
const MB: usize = 1024 * 1024;

fn big(n: usize) -> String {
    "x".repeat(n)
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn string(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn one(key: &str, value: prost_types::Value) -> Struct {
    Struct {
        fields: [(key.to_string(), value)].into(),
    }
}

fn nested_nan() -> Struct {
    one(
        "prefs",
        prost_types::Value {
            kind: Some(Kind::StructValue(one(
                "weights",
                prost_types::Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![number(1.0), number(f64::NAN)],
                    })),
                },
            ))),
        },
    )
}

fn ts(seconds: i64, nanos: i32) -> Timestamp {
    Timestamp { seconds, nanos }
}

fn dur(seconds: i64, nanos: i32) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos }
}

/// Year 10000, nanos out of range both ways, before 1970.
fn bad_timestamps() -> Vec<(&'static str, Timestamp)> {
    vec![
        ("year 10000", ts(253_402_300_800, 0)),
        ("negative nanos", ts(1_700_000_000, -1)),
        ("nanos 2e9", ts(1_700_000_059, 2_000_000_000)),
        ("before 1970", ts(-1, 0)),
    ]
}

fn bad_durations() -> Vec<(&'static str, prost_types::Duration)> {
    vec![
        ("nanos 2e9", dur(1, 2_000_000_000)),
        ("negative nanos", dur(0, -1)),
        ("mixed signs", dur(1, -5)),
        ("negative", dur(-1, 0)),
        ("beyond 10,000 years", dur(i64::MAX, 0)),
    ]
}

fn attribute_criteria(value: pb::condition_value::Value) -> pb::Criteria {
    pb::Criteria {
        criterion: Some(pb::criteria::Criterion::AllOf(pb::CriteriaGroup {
            criteria: vec![pb::Criteria {
                criterion: Some(pb::criteria::Criterion::Attribute(pb::AttributeCondition {
                    field: "score".into(),
                    operator: pb::AttributeOperator::Gt as i32,
                    value: Some(pb::ConditionValue { value: Some(value) }),
                    values: vec![],
                })),
            }],
        })),
    }
}

fn time_criteria(time: pb::time_value::Time) -> pb::Criteria {
    attribute_criteria(pb::condition_value::Value::TimeValue(pb::TimeValue {
        time: Some(time),
    }))
}

/// Criteria messages that must be refused: non-finite numbers, bad times, long and NUL text.
fn bad_criteria() -> Vec<(String, pb::Criteria)> {
    use pb::condition_value::Value as V;
    use pb::time_value::Time;
    let mut out: Vec<(String, pb::Criteria)> = vec![
        ("NaN".into(), attribute_criteria(V::NumberValue(f64::NAN))),
        (
            "+Inf".into(),
            attribute_criteria(V::NumberValue(f64::INFINITY)),
        ),
        (
            "-Inf".into(),
            attribute_criteria(V::NumberValue(f64::NEG_INFINITY)),
        ),
        (
            "1 MB string".into(),
            attribute_criteria(V::StringValue(big(MB))),
        ),
        (
            "NUL string".into(),
            attribute_criteria(V::StringValue("a\0".into())),
        ),
    ];
    for (label, t) in bad_timestamps() {
        out.push((format!("at {label}"), time_criteria(Time::At(t))));
    }
    for (label, d) in bad_durations() {
        out.push((format!("ago {label}"), time_criteria(Time::Ago(d))));
        out.push((format!("from_now {label}"), time_criteria(Time::FromNow(d))));
    }
    let mut long_field = attribute_criteria(V::NumberValue(1.0));
    if let Some(pb::criteria::Criterion::AllOf(g)) = &mut long_field.criterion
        && let Some(pb::criteria::Criterion::Attribute(a)) = &mut g.criteria[0].criterion
    {
        a.field = big(MB);
    }
    out.push(("1 MB field".into(), long_field));
    out
}

/// The outcome a case wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// Refused with this code.
    Refused(Code),
    /// Answered.
    Ok,
    /// Anything but INTERNAL / UNKNOWN (e.g. NOT_FOUND for an odd but valid id).
    NotInternal,
}

use Want::{NotInternal, Ok as Answered, Refused};
const INVALID: Want = Refused(Code::InvalidArgument);

/// Runs the table's cases and collects every failure, so one run shows them all.
#[derive(Default)]
struct Probe {
    rpcs: BTreeSet<&'static str>,
    cases: usize,
    failures: Vec<String>,
}

impl Probe {
    fn check<T: Debug>(
        &mut self,
        rpc: &'static str,
        input: &str,
        want: Want,
        result: Result<tonic::Response<T>, Status>,
    ) -> Option<Status> {
        self.rpcs.insert(rpc);
        self.cases += 1;
        let label = format!("{rpc} [{input}]");
        match result {
            Ok(response) => {
                if let Refused(code) = want {
                    self.failures.push(format!(
                        "{label}: accepted, wanted {code:?}: {}",
                        format!("{:?}", response.get_ref())
                            .chars()
                            .take(300)
                            .collect::<String>()
                    ));
                }
                None
            }
            Err(status) => {
                self.status(&label, want, &status);
                Some(status)
            }
        }
    }

    fn status(&mut self, label: &str, want: Want, status: &Status) {
        let size = status.message().len() + status.details().len();
        let shown: String = status.message().chars().take(200).collect();
        if matches!(status.code(), Code::Internal | Code::Unknown) {
            self.failures
                .push(format!("{label}: {:?} {shown}", status.code()));
        }
        if size >= STATUS_LIMIT {
            self.failures.push(format!(
                "{label}: status of {size} bytes ({:?})",
                status.code()
            ));
        }
        match want {
            Answered => self
                .failures
                .push(format!("{label}: refused {:?} {shown}", status.code())),
            Refused(code) if status.code() != code => self.failures.push(format!(
                "{label}: {:?} instead of {code:?}: {shown}",
                status.code()
            )),
            _ => {}
        }
        if matches!(want, Refused(_)) {
            let details = status.get_error_details();
            let info = details.error_info();
            if info.is_none_or(|i| i.domain != "sharpsend.cio.v1" || i.reason.is_empty()) {
                self.failures.push(format!(
                    "{label}: no ErrorInfo of sharpsend.cio.v1: {info:?}"
                ));
            }
        }
    }

    /// Checks one field violation is named (for the cases where the path matters).
    fn names(&mut self, label: &str, status: Option<Status>, field: &str) {
        let fields = status.as_ref().map(bad_request_fields).unwrap_or_default();
        if !fields.iter().any(|f| f == field) {
            self.failures.push(format!(
                "{label}: wanted a violation on `{field}`, got {fields:?}"
            ));
        }
    }
}

/// Every RPC of the package, from the proto files.
fn declared_rpcs() -> anyhow::Result<BTreeSet<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/sharpsend/cio/v1");
    let mut rpcs = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("{dir:?}"))? {
        let text = std::fs::read_to_string(entry?.path())?;
        for line in text.lines() {
            if let Some(rest) = line.trim().strip_prefix("rpc ")
                && let Some((name, _)) = rest.split_once('(')
            {
                rpcs.insert(name.trim().to_string());
            }
        }
    }
    Ok(rpcs)
}

/// Adds `authorization` and `pad` bytes of other metadata.
#[derive(Clone)]
struct Padded {
    authorization: String,
    pad: usize,
}

impl Interceptor for Padded {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let value: MetadataValue<_> = self
            .authorization
            .parse()
            .map_err(|_| Status::invalid_argument("test header"))?;
        request.metadata_mut().insert("authorization", value);
        if self.pad > 0 {
            let pad: MetadataValue<_> = big(self.pad)
                .parse()
                .map_err(|_| Status::invalid_argument("test header"))?;
            request.metadata_mut().insert("x-padding", pad);
        }
        Ok(request)
    }
}

type Clients = (
    SegmentServiceClient<InterceptedService<Channel, Bearer>>,
    ProfileServiceClient<InterceptedService<Channel, Bearer>>,
    OpsServiceClient<InterceptedService<Channel, Bearer>>,
    CampaignServiceClient<InterceptedService<Channel, Bearer>>,
);

async fn clients(app: &TestApp) -> anyhow::Result<Clients> {
    Ok((
        app.segments().await?,
        app.profiles().await?,
        app.ops().await?,
        app.campaigns().await?,
    ))
}

/// A good SendAssignment to segment 4 through broadcast 3 (the demo data), to spoil field by field.
fn send_request() -> pb::SendAssignmentRequest {
    pb::SendAssignmentRequest {
        assignment_id: "bad-input-1".into(),
        title: "Probe".into(),
        subject: "Probe".into(),
        segment_ids: vec![4],
        variations: vec![pb::ContentVariation {
            segment_id: 4,
            body: "<p>probe</p>".into(),
            ..Default::default()
        }],
        delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
            pb::BroadcastDelivery { broadcast_id: 3 },
        )),
        ..Default::default()
    }
}

fn event(customer_id: &str) -> pb::TrackEventRequest {
    pb::TrackEventRequest {
        customer_id: customer_id.into(),
        name: "probe".into(),
        ..Default::default()
    }
}

fn update(customer_id: &str, attributes: Struct) -> pb::UpdateAttributesRequest {
    pb::UpdateAttributesRequest {
        customer_id: customer_id.into(),
        attributes: Some(attributes),
    }
}

db_test!(
    every_rpc_refuses_bad_input_without_internal_errors_or_big_statuses,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (mut seg, mut prof, mut ops, mut camp) = clients(&app).await?;
        app.sync_segments().await?;
        // A managed segment without criteria, so its updates reach validation.
        let managed = seg
            .create_segment(pb::CreateSegmentRequest {
                name: "bad-input probe".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("no segment")?
            .id;
        let sim_segments = app.sim.sim.segments().len();
        let mut p = Probe::default();

        // ----- SegmentService -----
        let rpc = "ListSegments";
        p.check(
            rpc,
            "empty",
            Answered,
            seg.list_segments(pb::ListSegmentsRequest::default()).await,
        );
        for (label, name) in [
            ("50,000-byte name_contains", big(50_000)),
            ("1 MB name_contains", big(MB)),
            ("NUL name_contains", "gr\0owth".to_string()),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                seg.list_segments(pb::ListSegmentsRequest {
                    name_contains: name,
                    ..Default::default()
                })
                .await,
            );
            p.names(label, status, "name_contains");
        }
        for (label, token) in [
            ("1 MB page_token", big(MB)),
            ("garbage page_token", "!!".to_string()),
            ("NUL page_token", "\0".to_string()),
        ] {
            p.check(
                rpc,
                label,
                INVALID,
                seg.list_segments(pb::ListSegmentsRequest {
                    page_token: token,
                    ..Default::default()
                })
                .await,
            );
        }
        p.check(
            rpc,
            "page_size -1",
            INVALID,
            seg.list_segments(pb::ListSegmentsRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        );
        p.check(
            rpc,
            "type 99",
            INVALID,
            seg.list_segments(pb::ListSegmentsRequest {
                r#type: 99,
                ..Default::default()
            })
            .await,
        );

        let rpc = "GetSegment";
        for (label, id, want) in [
            ("empty", 0, INVALID),
            ("-1", -1, INVALID),
            ("max", i64::MAX, Refused(Code::NotFound)),
        ] {
            p.check(
                rpc,
                label,
                want,
                seg.get_segment(pb::GetSegmentRequest { segment_id: id })
                    .await,
            );
        }

        p.check(
            "SyncSegments",
            "empty",
            Answered,
            seg.sync_segments(pb::SyncSegmentsRequest {}).await,
        );

        let rpc = "ValidateTargeting";
        p.check(
            rpc,
            "empty",
            INVALID,
            seg.validate_targeting(pb::ValidateTargetingRequest::default())
                .await,
        );
        for (label, ids) in [
            ("100 × -1", vec![-1; 100]),
            ("101 ids", vec![1; 101]),
            ("100,000 × -1", vec![-1; 100_000]),
        ] {
            p.check(
                rpc,
                label,
                INVALID,
                seg.validate_targeting(pb::ValidateTargetingRequest {
                    segment_ids: ids,
                    max_count_age: None,
                })
                .await,
            );
        }
        for (label, d) in bad_durations() {
            let status = p.check(
                rpc,
                &format!("max_count_age {label}"),
                INVALID,
                seg.validate_targeting(pb::ValidateTargetingRequest {
                    segment_ids: vec![1],
                    max_count_age: Some(d),
                })
                .await,
            );
            p.names(label, status, "max_count_age");
        }

        let rpc = "CreateSegment";
        p.check(
            rpc,
            "empty",
            INVALID,
            seg.create_segment(pb::CreateSegmentRequest::default())
                .await,
        );
        for (label, request) in [
            (
                "1 MB name",
                pb::CreateSegmentRequest {
                    name: big(MB),
                    ..Default::default()
                },
            ),
            (
                "NUL name",
                pb::CreateSegmentRequest {
                    name: "a\0".into(),
                    ..Default::default()
                },
            ),
            (
                "1 MB description",
                pb::CreateSegmentRequest {
                    name: "n".into(),
                    description: big(MB),
                    ..Default::default()
                },
            ),
            (
                "1 MB criteria_json",
                pb::CreateSegmentRequest {
                    name: "n".into(),
                    criteria_json: big(MB),
                    ..Default::default()
                },
            ),
            (
                "NUL in criteria_json",
                pb::CreateSegmentRequest {
                    name: "n".into(),
                    criteria_json:
                        r#"{"attribute": {"field": "a", "operator": "eq", "value": "\u0000"}}"#
                            .into(),
                    ..Default::default()
                },
            ),
            (
                "5,000 nested nots",
                pb::CreateSegmentRequest {
                    name: "n".into(),
                    criteria_json: format!(
                        "{}{}{}",
                        r#"{"not": "#.repeat(5000),
                        r#"{"segment": 1}"#,
                        "}".repeat(5000)
                    ),
                    ..Default::default()
                },
            ),
        ] {
            p.check(rpc, label, INVALID, seg.create_segment(request).await);
        }
        for (label, criteria) in bad_criteria() {
            let status = p.check(
                rpc,
                &label,
                INVALID,
                seg.create_segment(pb::CreateSegmentRequest {
                    name: "n".into(),
                    criteria: Some(criteria),
                    ..Default::default()
                })
                .await,
            );
            let field = if label.contains("field") {
                "criteria.all_of[0].attribute.field"
            } else {
                "criteria.all_of[0].attribute.value"
            };
            p.names(&label, status, field);
        }

        let rpc = "PreviewSegment";
        p.check(
            rpc,
            "empty",
            INVALID,
            seg.preview_segment(pb::PreviewSegmentRequest::default())
                .await,
        );
        p.check(
            rpc,
            "sample_size -1",
            INVALID,
            seg.preview_segment(pb::PreviewSegmentRequest {
                criteria_json: r#"{"segment": 1}"#.into(),
                sample_size: -1,
                ..Default::default()
            })
            .await,
        );
        p.check(
            rpc,
            "1 MB criteria_json",
            INVALID,
            seg.preview_segment(pb::PreviewSegmentRequest {
                criteria_json: big(MB),
                ..Default::default()
            })
            .await,
        );
        for (label, criteria) in bad_criteria() {
            p.check(
                rpc,
                &label,
                INVALID,
                seg.preview_segment(pb::PreviewSegmentRequest {
                    criteria: Some(criteria),
                    ..Default::default()
                })
                .await,
            );
        }

        let rpc = "UpdateSegment";
        p.check(
            rpc,
            "empty",
            INVALID,
            seg.update_segment(pb::UpdateSegmentRequest::default())
                .await,
        );
        p.check(
            rpc,
            "segment_id -1",
            INVALID,
            seg.update_segment(pb::UpdateSegmentRequest {
                segment_id: -1,
                ..Default::default()
            })
            .await,
        );
        for (label, request) in [
            (
                "1 MB name",
                pb::UpdateSegmentRequest {
                    segment_id: managed,
                    name: Some(big(MB)),
                    ..Default::default()
                },
            ),
            (
                "NUL description",
                pb::UpdateSegmentRequest {
                    segment_id: managed,
                    description: Some("a\0".into()),
                    ..Default::default()
                },
            ),
            (
                "1 MB criteria_json",
                pb::UpdateSegmentRequest {
                    segment_id: managed,
                    criteria_json: big(MB),
                    ..Default::default()
                },
            ),
        ] {
            p.check(rpc, label, INVALID, seg.update_segment(request).await);
        }
        for (label, criteria) in bad_criteria() {
            p.check(
                rpc,
                &label,
                INVALID,
                seg.update_segment(pb::UpdateSegmentRequest {
                    segment_id: managed,
                    criteria: Some(criteria),
                    ..Default::default()
                })
                .await,
            );
        }

        let rpc = "DeleteSegment";
        for (label, id, want) in [
            ("empty", 0, INVALID),
            ("-1", -1, INVALID),
            ("max", i64::MAX, Refused(Code::NotFound)),
        ] {
            p.check(
                rpc,
                label,
                want,
                seg.delete_segment(pb::DeleteSegmentRequest { segment_id: id })
                    .await,
            );
        }

        let member_cases = |segment_id: i64| -> Vec<(&'static str, pb::AddSegmentMembersRequest)> {
            vec![
                ("empty", pb::AddSegmentMembersRequest::default()),
                (
                    "no ids",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec![],
                    },
                ),
                (
                    "1 MB id",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec![big(MB)],
                    },
                ),
                (
                    "NUL id",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec!["a\0".into()],
                    },
                ),
                (
                    "padded id",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec![" u00001".into()],
                    },
                ),
                (
                    "10,001 ids",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec!["u1".into(); 10_001],
                    },
                ),
                (
                    "10,000 × 150-byte ids over the limit",
                    pb::AddSegmentMembersRequest {
                        segment_id,
                        customer_ids: vec![big(151); 10_000],
                    },
                ),
            ]
        };
        for (label, request) in member_cases(managed) {
            p.check(
                "AddSegmentMembers",
                label,
                INVALID,
                seg.add_segment_members(request).await,
            );
        }
        for (label, request) in member_cases(managed) {
            let request = pb::RemoveSegmentMembersRequest {
                segment_id: request.segment_id,
                customer_ids: request.customer_ids,
            };
            p.check(
                "RemoveSegmentMembers",
                label,
                INVALID,
                seg.remove_segment_members(request).await,
            );
        }

        // ----- ProfileService -----
        use pb::customer_ref::Identifier;
        let rpc = "GetProfile";
        let get = |identifier: Identifier, fresh: bool| pb::GetProfileRequest {
            customer: Some(pb::CustomerRef {
                identifier: Some(identifier),
            }),
            fresh,
            ..Default::default()
        };
        p.check(
            rpc,
            "empty",
            INVALID,
            prof.get_profile(pb::GetProfileRequest::default()).await,
        );
        for (label, request) in [
            ("1 MB id", get(Identifier::Id(big(MB)), false)),
            ("1 MB id fresh", get(Identifier::Id(big(MB)), true)),
            ("NUL email", get(Identifier::Email("a\0@b.c".into()), false)),
            ("padded cio_id", get(Identifier::CioId(" abc".into()), true)),
            ("empty id", get(Identifier::Id(String::new()), false)),
        ] {
            p.check(rpc, label, INVALID, prof.get_profile(request).await);
        }
        p.check(
            rpc,
            "unknown id",
            Refused(Code::NotFound),
            prof.get_profile(get(Identifier::Id("nobody-here".into()), false))
                .await,
        );

        let rpc = "ImportProfiles";
        for (label, request) in [
            ("empty", pb::ImportProfilesRequest::default()),
            (
                "segment -1",
                pb::ImportProfilesRequest {
                    segment_id: -1,
                    ..Default::default()
                },
            ),
            (
                "1 MB id",
                pb::ImportProfilesRequest {
                    customer_ids: vec![big(MB)],
                    segment_id: 0,
                },
            ),
            (
                "NUL id",
                pb::ImportProfilesRequest {
                    customer_ids: vec!["a\0".into()],
                    segment_id: 0,
                },
            ),
            (
                "10,001 ids",
                pb::ImportProfilesRequest {
                    customer_ids: vec!["u1".into(); 10_001],
                    segment_id: 0,
                },
            ),
        ] {
            p.check(rpc, label, INVALID, prof.import_profiles(request).await);
        }

        let rpc = "UpdateAttributes";
        p.check(
            rpc,
            "empty",
            INVALID,
            prof.update_attributes(pb::UpdateAttributesRequest::default())
                .await,
        );
        for (label, attributes, field) in [
            ("NaN", one("score", number(f64::NAN)), "attributes.score"),
            (
                "+Inf",
                one("score", number(f64::INFINITY)),
                "attributes.score",
            ),
            (
                "-Inf",
                one("score", number(f64::NEG_INFINITY)),
                "attributes.score",
            ),
            ("nested NaN", nested_nan(), "attributes.prefs.weights[1]"),
            ("NUL value", one("plan", string("a\0")), "attributes.plan"),
            (
                "padded name",
                one(" score", number(1.0)),
                "attributes. score",
            ),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                prof.update_attributes(update("probe-1", attributes)).await,
            );
            p.names(label, status, field);
        }
        for (label, request) in [
            ("1 MB customer_id", update(&big(MB), one("a", number(1.0)))),
            (
                "padded customer_id",
                update(" probe-1", one("a", number(1.0))),
            ),
            (
                "1 MB attribute name",
                update("probe-1", one(&big(MB), number(1.0))),
            ),
            (
                "1 MB value",
                update("probe-1", one("bio", string(&big(MB)))),
            ),
        ] {
            p.check(rpc, label, INVALID, prof.update_attributes(request).await);
        }

        let rpc = "BatchUpdateAttributes";
        p.check(
            rpc,
            "empty",
            INVALID,
            prof.batch_update_attributes(pb::BatchUpdateAttributesRequest::default())
                .await,
        );
        let mut updates: Vec<_> = (0..5)
            .map(|i| update(&format!("probe-{i}"), one("score", number(1.0))))
            .collect();
        updates[3] = update("probe-3", one("score", number(f64::NAN)));
        let status = p.check(
            rpc,
            "NaN in updates[3]",
            INVALID,
            prof.batch_update_attributes(pb::BatchUpdateAttributesRequest { updates })
                .await,
        );
        p.names("NaN in updates[3]", status, "updates[3].attributes.score");
        p.check(
            rpc,
            "1,001 updates",
            INVALID,
            prof.batch_update_attributes(pb::BatchUpdateAttributesRequest {
                updates: vec![update("probe-1", one("a", number(1.0))); 1001],
            })
            .await,
        );

        let rpc = "TrackEvent";
        p.check(
            rpc,
            "empty",
            INVALID,
            prof.track_event(pb::TrackEventRequest::default()).await,
        );
        let soon = chrono::Utc::now().timestamp() + 2 * 86_400;
        for (label, t) in bad_timestamps()
            .into_iter()
            .chain([("two days ahead", ts(soon, 0))])
        {
            let status = p.check(
                rpc,
                &format!("timestamp {label}"),
                INVALID,
                prof.track_event(pb::TrackEventRequest {
                    timestamp: Some(t),
                    ..event("probe-1")
                })
                .await,
            );
            p.names(label, status, "timestamp");
        }
        for (label, request, field) in [
            (
                "NaN data",
                pb::TrackEventRequest {
                    data: Some(one("price", number(f64::NAN))),
                    ..event("probe-1")
                },
                "data.price",
            ),
            (
                "nested NaN data",
                pb::TrackEventRequest {
                    data: Some(nested_nan()),
                    ..event("probe-1")
                },
                "data.prefs.weights[1]",
            ),
            (
                "NUL data key",
                pb::TrackEventRequest {
                    data: Some(one("k\0", number(1.0))),
                    ..event("probe-1")
                },
                "data.k\0",
            ),
            (
                "1 MB name",
                pb::TrackEventRequest {
                    name: big(MB),
                    ..event("probe-1")
                },
                "name",
            ),
            (
                "padded name",
                pb::TrackEventRequest {
                    name: " probe".into(),
                    ..event("probe-1")
                },
                "name",
            ),
            (
                "1 MB idempotency_key",
                pb::TrackEventRequest {
                    idempotency_key: big(MB),
                    ..event("probe-1")
                },
                "idempotency_key",
            ),
            ("1 MB customer_id", event(&big(MB)), "customer_id"),
            (
                "1 MB data",
                pb::TrackEventRequest {
                    data: Some(one("blob", string(&big(MB)))),
                    ..event("probe-1")
                },
                "data",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, prof.track_event(request).await);
            p.names(label, status, field);
        }

        let rpc = "BatchTrackEvents";
        p.check(
            rpc,
            "empty",
            INVALID,
            prof.batch_track_events(pb::BatchTrackEventsRequest::default())
                .await,
        );
        let mut events = vec![event("probe-1"), event("probe-2")];
        events[1].timestamp = Some(ts(253_402_300_800, 0));
        let status = p.check(
            rpc,
            "year 10000 in events[1]",
            INVALID,
            prof.batch_track_events(pb::BatchTrackEventsRequest { events })
                .await,
        );
        p.names("year 10000 in events[1]", status, "events[1].timestamp");
        p.check(
            rpc,
            "1,001 events",
            INVALID,
            prof.batch_track_events(pb::BatchTrackEventsRequest {
                events: vec![event("probe-1"); 1001],
            })
            .await,
        );

        let rpc = "GetSyncStatus";
        p.check(
            rpc,
            "empty",
            Answered,
            prof.get_sync_status(pb::GetSyncStatusRequest::default())
                .await,
        );
        p.check(
            rpc,
            "limit -1",
            INVALID,
            prof.get_sync_status(pb::GetSyncStatusRequest { limit: -1 })
                .await,
        );

        let rpc = "RetryDeadLetters";
        p.check(
            rpc,
            "empty",
            Answered,
            prof.retry_dead_letters(pb::RetryDeadLettersRequest::default())
                .await,
        );
        for (label, ids) in [
            ("-1", vec![-1]),
            ("1,001 ids", vec![1; 1001]),
            ("100,000 ids", vec![1; 100_000]),
        ] {
            p.check(
                rpc,
                label,
                INVALID,
                prof.retry_dead_letters(pb::RetryDeadLettersRequest { ids })
                    .await,
            );
        }

        // ----- OpsService -----
        p.check(
            "ListJobs",
            "empty",
            Answered,
            ops.list_jobs(pb::ListJobsRequest {}).await,
        );
        let rpc = "ListJobRuns";
        p.check(
            rpc,
            "empty",
            Answered,
            ops.list_job_runs(pb::ListJobRunsRequest::default()).await,
        );
        for (label, job) in [
            ("1 MB job", big(MB)),
            ("padded job", " segment-sync".to_string()),
            ("unknown job", "nope".to_string()),
            ("NUL job", "segment-sync\0".to_string()),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                ops.list_job_runs(pb::ListJobRunsRequest { job, limit: 0 })
                    .await,
            );
            p.names(label, status, "job");
        }
        let rpc = "GetJobRun";
        for (label, run_id, want) in [
            ("zero run id", 0, INVALID),
            ("negative run id", -1, INVALID),
            ("unknown run id", i64::MAX, Refused(Code::NotFound)),
        ] {
            p.check(
                rpc,
                label,
                want,
                ops.get_job_run(pb::GetJobRunRequest { run_id }).await,
            );
        }
        let rpc = "RunJob";
        for (label, request_id) in [
            ("1 MB request_id", big(MB)),
            ("NUL request_id", "a\0b".to_string()),
            ("padded request_id", " r-1".to_string()),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                ops.run_job(pb::RunJobRequest {
                    job: "segment-sync".into(),
                    request_id,
                })
                .await,
            );
            p.names(label, status, "request_id");
        }
        for (label, job) in [
            ("empty", String::new()),
            ("1 MB job", big(MB)),
            ("padded job", " segment-sync".to_string()),
            ("trailing space", "segment-sync ".to_string()),
            ("dot-segment job", "..".to_string()),
            ("NUL job", "\0".to_string()),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                ops.run_job(pb::RunJobRequest {
                    job,
                    ..Default::default()
                })
                .await,
            );
            p.names(label, status, "job");
        }

        // ----- ABTestService -----
        let mut ab = app.abtests().await?;
        let rpc = "PlanTest";
        for (label, request, field) in [
            (
                "NaN baseline",
                pb::PlanTestRequest {
                    baseline_rate: f64::NAN,
                    minimum_detectable_effect: 0.01,
                    ..Default::default()
                },
                "baseline_rate",
            ),
            (
                "infinite effect",
                pb::PlanTestRequest {
                    baseline_rate: 0.03,
                    minimum_detectable_effect: f64::INFINITY,
                    ..Default::default()
                },
                "minimum_detectable_effect",
            ),
            (
                "negative power",
                pb::PlanTestRequest {
                    baseline_rate: 0.03,
                    minimum_detectable_effect: 0.01,
                    power: -1.0,
                    ..Default::default()
                },
                "power",
            ),
            (
                "variants i32::MIN",
                pb::PlanTestRequest {
                    baseline_rate: 0.03,
                    minimum_detectable_effect: 0.01,
                    variants: i32::MIN,
                    ..Default::default()
                },
                "variants",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, ab.plan_test(request).await);
            p.names(label, status, field);
        }
        let rpc = "CreateTest";
        let good_test = || pb::CreateTestRequest {
            assignment_id: "bad-input-ab".into(),
            request_id: "ab-1".into(),
            title: "Probe".into(),
            audience_segment_ids: vec![4],
            variants: vec![
                pb::TestVariant {
                    name: "a".into(),
                    subject: "A".into(),
                    body: "a".into(),
                    data_json: String::new(),
                },
                pb::TestVariant {
                    name: "b".into(),
                    subject: "B".into(),
                    body: "b".into(),
                    data_json: String::new(),
                },
            ],
            test_fraction: 0.5,
            delivery: Some(pb::create_test_request::Delivery::BroadcastId(3)),
            baseline_rate: 0.03,
            minimum_detectable_effect: 0.015,
            minimum_sample_per_variant: 100,
            ..Default::default()
        };
        let mut cases: Vec<(&str, pb::CreateTestRequest, &str)> = Vec::new();
        let mut r = good_test();
        r.request_id = big(MB);
        cases.push(("1 MB request_id", r, "request_id"));
        let mut r = good_test();
        r.assignment_id = "..".into();
        r.title = "a\0b".into();
        cases.push(("NUL title", r, "title"));
        let mut r = good_test();
        r.test_fraction = f64::NAN;
        cases.push(("NaN fraction", r, "test_fraction"));
        let mut r = good_test();
        r.variants[1].body = big(MB);
        cases.push(("1 MB body", r, "variants[1].body"));
        let mut r = good_test();
        r.variants[0].data_json = "{".into();
        cases.push(("broken data_json", r, "variants[0].data_json"));
        let mut r = good_test();
        r.metric = 99;
        cases.push(("metric 99", r, "metric"));
        let mut r = good_test();
        r.audience_segment_ids = vec![0];
        cases.push(("segment 0", r, "audience_segment_ids[0]"));
        for (label, request, field) in cases {
            let status = p.check(rpc, label, INVALID, ab.create_test(request).await);
            p.names(label, status, field);
        }
        for (rpc, label, id) in [
            ("GetTest", "dot-segment id", ".."),
            ("GetTest", "path id", "a/b c"),
            ("CancelTest", "unknown id", "abt_missing"),
            ("DeclareWinner", "unknown id", "abt_missing"),
            ("StartTest", "unknown id", "abt_missing"),
        ] {
            let result = match rpc {
                "StartTest" => ab
                    .start_test(pb::StartTestRequest { id: id.into() })
                    .await
                    .map(|_| ()),
                "GetTest" => ab
                    .get_test(pb::GetTestRequest { id: id.into() })
                    .await
                    .map(|_| ()),
                "CancelTest" => ab
                    .cancel_test(pb::CancelTestRequest {
                        id: id.into(),
                        reason: "probe".into(),
                    })
                    .await
                    .map(|_| ()),
                _ => ab
                    .declare_winner(pb::DeclareWinnerRequest {
                        id: id.into(),
                        variant: "a".into(),
                        reason: "probe".into(),
                    })
                    .await
                    .map(|_| ()),
            };
            p.check(
                rpc,
                label,
                Refused(Code::NotFound),
                result.map(tonic::Response::new),
            );
        }
        let status = p.check(
            "GetTest",
            "1 MB id",
            INVALID,
            ab.get_test(pb::GetTestRequest { id: big(MB) }).await,
        );
        p.names("1 MB id", status, "id");
        for (label, id) in [
            ("1 MB id", big(MB)),
            ("empty id", String::new()),
            ("NUL id", "abt_\0".to_owned()),
            ("padded id", " abt_x".to_owned()),
        ] {
            let status = p.check(
                "StartTest",
                label,
                INVALID,
                ab.start_test(pb::StartTestRequest { id }).await,
            );
            p.names(label, status, "id");
        }
        let status = p.check(
            "CancelTest",
            "NUL reason",
            INVALID,
            ab.cancel_test(pb::CancelTestRequest {
                id: "abt_x".into(),
                reason: "\0".into(),
            })
            .await,
        );
        p.names("NUL reason", status, "reason");
        let status = p.check(
            "ListTests",
            "foreign page token",
            INVALID,
            ab.list_tests(pb::ListTestsRequest {
                page_token: "bm9wZQ".into(),
                ..Default::default()
            })
            .await,
        );
        p.names("foreign page token", status, "page_token");
        let status = p.check(
            "ListTests",
            "page_size -1",
            INVALID,
            ab.list_tests(pb::ListTestsRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        );
        p.names("page_size -1", status, "page_size");

        // ----- CampaignService -----
        let rpc = "ListCampaigns";
        p.check(
            rpc,
            "empty",
            Answered,
            camp.list_campaigns(pb::ListCampaignsRequest::default())
                .await,
        );
        p.check(
            rpc,
            "1 MB page_token",
            INVALID,
            camp.list_campaigns(pb::ListCampaignsRequest {
                page_token: big(MB),
                ..Default::default()
            })
            .await,
        );
        p.check(
            rpc,
            "kind 99",
            INVALID,
            camp.list_campaigns(pb::ListCampaignsRequest {
                kind: 99,
                ..Default::default()
            })
            .await,
        );
        p.check(
            rpc,
            "page_size -1",
            INVALID,
            camp.list_campaigns(pb::ListCampaignsRequest {
                page_size: -1,
                ..Default::default()
            })
            .await,
        );

        let rpc = "GetCampaign";
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.get_campaign(pb::GetCampaignRequest::default()).await,
        );
        p.check(
            rpc,
            "id -1",
            INVALID,
            camp.get_campaign(pb::GetCampaignRequest { kind: 1, id: -1 })
                .await,
        );
        p.check(
            rpc,
            "kind 99",
            INVALID,
            camp.get_campaign(pb::GetCampaignRequest { kind: 99, id: 1 })
                .await,
        );
        p.check(
            rpc,
            "unknown id",
            Refused(Code::NotFound),
            camp.get_campaign(pb::GetCampaignRequest {
                kind: 2,
                id: i64::MAX,
            })
            .await,
        );

        let rpc = "SendAssignment";
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.send_assignment(pb::SendAssignmentRequest::default())
                .await,
        );
        let spoiled = |f: &dyn Fn(&mut pb::SendAssignmentRequest)| {
            let mut r = send_request();
            f(&mut r);
            r
        };
        for (label, request, field) in [
            (
                "1 MB assignment_id",
                spoiled(&|r| r.assignment_id = big(MB)),
                "assignment_id",
            ),
            (
                "padded assignment_id",
                spoiled(&|r| r.assignment_id = " a-1".into()),
                "assignment_id",
            ),
            (
                "NUL request_id",
                spoiled(&|r| r.request_id = "r\0".into()),
                "request_id",
            ),
            ("1 MB title", spoiled(&|r| r.title = big(MB)), "title"),
            (
                "NUL subject",
                spoiled(&|r| r.subject = "s\0".into()),
                "subject",
            ),
            (
                "NUL body",
                spoiled(&|r| r.variations[0].body = "<p>\0</p>".into()),
                "variations[0].body",
            ),
            (
                "1 MB body",
                spoiled(&|r| r.variations[0].body = big(MB)),
                "variations[0].body",
            ),
            (
                "NaN data",
                spoiled(&|r| r.variations[0].data = Some(one("x", number(f64::NAN)))),
                "variations[0].data.x",
            ),
            (
                "+Inf nested data",
                spoiled(&|r| {
                    r.variations[0].data = Some(one(
                        "x",
                        prost_types::Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: vec![number(f64::INFINITY)],
                            })),
                        },
                    ))
                }),
                "variations[0].data.x[0]",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, camp.send_assignment(request).await);
            p.names(label, status, field);
        }
        p.check(
            rpc,
            "1,000 variations of unknown segments",
            INVALID,
            camp.send_assignment(spoiled(&|r| {
                r.variations = (0..1000)
                    .map(|i| pb::ContentVariation {
                        segment_id: 1000 + i,
                        body: "b".into(),
                        ..Default::default()
                    })
                    .collect();
            }))
            .await,
        );

        let rpc = "GetSend";
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.get_send(pb::GetSendRequest::default()).await,
        );
        for (label, request, field) in [
            (
                "1 MB send_id",
                pb::GetSendRequest {
                    send_id: big(MB),
                    ..Default::default()
                },
                "send_id",
            ),
            (
                "NUL send_id",
                pb::GetSendRequest {
                    send_id: "snd_\0".into(),
                    ..Default::default()
                },
                "send_id",
            ),
            (
                "padded send_id",
                pb::GetSendRequest {
                    send_id: " snd_1".into(),
                    ..Default::default()
                },
                "send_id",
            ),
            (
                "1 MB assignment_id",
                pb::GetSendRequest {
                    assignment_id: big(MB),
                    ..Default::default()
                },
                "assignment_id",
            ),
            (
                "1 MB request_id",
                pb::GetSendRequest {
                    assignment_id: "a".into(),
                    request_id: big(MB),
                    ..Default::default()
                },
                "request_id",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, camp.get_send(request).await);
            p.names(label, status, field);
        }
        p.check(
            rpc,
            "unknown send",
            Refused(Code::NotFound),
            camp.get_send(pb::GetSendRequest {
                send_id: "snd_nope".into(),
                ..Default::default()
            })
            .await,
        );

        let rpc = "ListSends";
        p.check(
            rpc,
            "empty",
            Answered,
            camp.list_sends(pb::ListSendsRequest::default()).await,
        );
        for (label, request) in [
            (
                "1 MB assignment_id",
                pb::ListSendsRequest {
                    assignment_id: big(MB),
                    ..Default::default()
                },
            ),
            (
                "NUL assignment_id",
                pb::ListSendsRequest {
                    assignment_id: "\0".into(),
                    ..Default::default()
                },
            ),
            (
                "garbage page_token",
                pb::ListSendsRequest {
                    page_token: "%%%".into(),
                    ..Default::default()
                },
            ),
            (
                "state 99",
                pb::ListSendsRequest {
                    state: 99,
                    ..Default::default()
                },
            ),
            (
                "page_size -1",
                pb::ListSendsRequest {
                    page_size: -1,
                    ..Default::default()
                },
            ),
        ] {
            p.check(rpc, label, INVALID, camp.list_sends(request).await);
        }

        let rpc = "ResolveSend";
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.resolve_send(pb::ResolveSendRequest::default()).await,
        );
        let resolve = |send_id: String, actor: String, reason: String| pb::ResolveSendRequest {
            send_id,
            segment_id: 0,
            resolution: pb::Resolution::MarkSent as i32,
            actor,
            reason,
        };
        for (label, request, field) in [
            (
                "1 MB send_id",
                resolve(big(MB), "ops".into(), "why".into()),
                "send_id",
            ),
            (
                "NUL actor",
                resolve("snd_1".into(), "o\0ps".into(), "why".into()),
                "actor",
            ),
            (
                "1 MB reason",
                resolve("snd_1".into(), "ops".into(), big(MB)),
                "reason",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, camp.resolve_send(request).await);
            p.names(label, status, field);
        }

        let rpc = "TriggerJourneyEvent";
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.trigger_journey_event(pb::TriggerJourneyEventRequest::default())
                .await,
        );
        let journey = |f: &dyn Fn(&mut pb::TriggerJourneyEventRequest)| {
            let mut r = pb::TriggerJourneyEventRequest {
                assignment_id: "a-1".into(),
                segment_ids: vec![4],
                ..Default::default()
            };
            f(&mut r);
            r
        };
        for (label, request, field) in [
            (
                "NaN data",
                journey(&|r| r.data = Some(one("x", number(f64::NAN)))),
                "data.x",
            ),
            (
                "padded event_name",
                journey(&|r| r.event_name = "approved ".into()),
                "event_name",
            ),
            (
                "1 MB event_name",
                journey(&|r| r.event_name = big(MB)),
                "event_name",
            ),
            (
                "1 MB assignment_id",
                journey(&|r| r.assignment_id = big(MB)),
                "assignment_id",
            ),
            (
                "101 segments",
                journey(&|r| r.segment_ids = vec![4; 101]),
                "segment_ids",
            ),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                camp.trigger_journey_event(request).await,
            );
            p.names(label, status, field);
        }

        let rpc = "GetCampaignMetrics";
        use pb::get_campaign_metrics_request::Target;
        let metrics = |target: Target| pb::GetCampaignMetricsRequest {
            target: Some(target),
            refresh: false,
        };
        p.check(
            rpc,
            "empty",
            INVALID,
            camp.get_campaign_metrics(pb::GetCampaignMetricsRequest::default())
                .await,
        );
        for (label, request) in [
            ("campaign -1", metrics(Target::CampaignId(-1))),
            ("1 MB send_id", metrics(Target::SendId(big(MB)))),
            ("NUL send_id", metrics(Target::SendId("snd\0".into()))),
            ("empty send_id", metrics(Target::SendId(String::new()))),
        ] {
            p.check(
                rpc,
                label,
                INVALID,
                camp.get_campaign_metrics(request).await,
            );
        }
        p.check(
            rpc,
            "unknown send",
            Refused(Code::NotFound),
            camp.get_campaign_metrics(metrics(Target::SendId("snd_nope".into())))
                .await,
        );

        // ----- 100 KB of metadata -----
        for (label, authorization, pad) in [
            (
                "100 KB padding header",
                format!("Bearer {TEST_API_KEY}"),
                100 * 1024,
            ),
            (
                "100 KB authorization",
                format!("Bearer {}", big(100 * 1024)),
                0,
            ),
        ] {
            let mut client = SegmentServiceClient::with_interceptor(
                app.channel().await?,
                Padded { authorization, pad },
            );
            let result = client
                .list_segments(pb::ListSegmentsRequest::default())
                .await;
            p.check("ListSegments", label, NotInternal, result);
        }
        // The server still answers afterwards.
        p.check(
            "ListSegments",
            "after the metadata",
            Answered,
            seg.list_segments(pb::ListSegmentsRequest::default()).await,
        );

        // ----- Nothing refused was accepted -----
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(
            stats.pending + stats.in_flight + stats.delivered + stats.dead == 0,
            "refused writes reached the outbox: {stats:?}"
        );
        for id in ["probe-1", "probe-3"] {
            let found = prof
                .get_profile(get(Identifier::Id(id.into()), false))
                .await;
            ensure!(
                found.as_ref().err().map(Status::code) == Some(Code::NotFound),
                "{id} reached the mirror: {found:?}"
            );
        }
        ensure!(
            app.sim.sim.segments().len() == sim_segments,
            "a refused call created a segment in Customer.io"
        );
        ensure!(
            app.sim.sim.event_count() == 0,
            "a refused call reached Customer.io's events"
        );
        let sends = camp
            .list_sends(pb::ListSendsRequest::default())
            .await?
            .into_inner()
            .sends;
        ensure!(sends.is_empty(), "refused sends were recorded: {sends:?}");
        let runs = ops
            .list_job_runs(pb::ListJobRunsRequest::default())
            .await?
            .into_inner()
            .runs;
        // Only the two segment-syncs this test started (setup and the SyncSegments probe).
        ensure!(
            runs.len() == 2 && runs.iter().all(|r| r.job == "segment-sync"),
            "a refused RunJob ran: {runs:?}"
        );
        let members = seg
            .get_segment(pb::GetSegmentRequest {
                segment_id: managed,
            })
            .await?
            .into_inner();
        ensure!(
            members
                .segment
                .and_then(|s| s.managed)
                .map(|m| m.member_count)
                == Some(0),
            "refused members were recorded"
        );

        // ----- Odd but valid ids: answered, never INTERNAL -----
        for id in [".", "..", "a/b c"] {
            for fresh in [false, true] {
                p.check(
                    "GetProfile",
                    &format!("id {id:?} fresh {fresh}"),
                    NotInternal,
                    prof.get_profile(get(Identifier::Id(id.into()), fresh))
                        .await,
                );
            }
            p.check(
                "GetSend",
                &format!("send_id {id:?}"),
                Refused(Code::NotFound),
                camp.get_send(pb::GetSendRequest {
                    send_id: id.into(),
                    ..Default::default()
                })
                .await,
            );
            p.check(
                "GetCampaignMetrics",
                &format!("send_id {id:?}"),
                Refused(Code::NotFound),
                camp.get_campaign_metrics(metrics(Target::SendId(id.into())))
                    .await,
            );
            p.check(
                "ListSends",
                &format!("assignment_id {id:?}"),
                Answered,
                camp.list_sends(pb::ListSendsRequest {
                    assignment_id: id.into(),
                    ..Default::default()
                })
                .await,
            );
            p.check(
                "UpdateAttributes",
                &format!("customer_id {id:?}"),
                Answered,
                prof.update_attributes(update(id, one("score", number(1.0))))
                    .await,
            );
            p.check(
                "TrackEvent",
                &format!("customer_id {id:?}"),
                Answered,
                prof.track_event(event(id)).await,
            );
        }
        // A large event for `..` could only go through the v1 URL, which cannot hold that id.
        p.check(
            "TrackEvent",
            "customer_id \"..\" with 20 KB of data",
            Refused(Code::InvalidArgument),
            prof.track_event(pb::TrackEventRequest {
                data: Some(one("blob", string(&"x".repeat(20_000)))),
                ..event("..")
            })
            .await,
        );
        p.check(
            "AddSegmentMembers",
            "dot-segment ids",
            Answered,
            seg.add_segment_members(pb::AddSegmentMembersRequest {
                segment_id: managed,
                customer_ids: vec![".".into(), "..".into(), "a/b c".into()],
            })
            .await,
        );
        let import = prof
            .import_profiles(pb::ImportProfilesRequest {
                customer_ids: vec![".".into(), "..".into(), "a/b c".into()],
                segment_id: 0,
            })
            .await;
        match import {
            Err(status) => {
                p.check::<()>("ImportProfiles", "dot-segment ids", Answered, Err(status));
            }
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(progress)) if progress.done => break,
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(status) => {
                            p.status("ImportProfiles [dot-segment ids]", Answered, &status);
                            break;
                        }
                    }
                }
            }
        }
        // ----- AdminService -----
        let mut admin = app.admin().await?;
        let key = |name: &str, role: pb::Role| pb::CreateApiKeyRequest {
            name: name.into(),
            role: role as i32,
            ..Default::default()
        };
        for (label, name) in [
            ("empty name", String::new()),
            ("1 MB name", big(MB)),
            ("NUL name", "a\0b".to_string()),
            ("101-character name", big(101)),
        ] {
            let status = p.check(
                "CreateApiKey",
                label,
                INVALID,
                admin.create_api_key(key(&name, pb::Role::Reader)).await,
            );
            p.names(label, status, "name");
        }
        for (label, role) in [("role unspecified", 0), ("role 99", 99), ("role -1", -1)] {
            let status = p.check(
                "CreateApiKey",
                label,
                INVALID,
                admin
                    .create_api_key(pb::CreateApiKeyRequest {
                        role,
                        ..key("probe", pb::Role::Reader)
                    })
                    .await,
            );
            p.names(label, status, "role");
        }
        for (label, request, field) in [
            (
                "all_workspaces for a reader",
                pb::CreateApiKeyRequest {
                    all_workspaces: true,
                    ..key("probe", pb::Role::Reader)
                },
                "all_workspaces",
            ),
            (
                "negative workspace_id",
                pb::CreateApiKeyRequest {
                    workspace_id: -1,
                    ..key("probe", pb::Role::Reader)
                },
                "workspace_id",
            ),
            (
                "workspace_id with all_workspaces",
                pb::CreateApiKeyRequest {
                    workspace_id: 1,
                    all_workspaces: true,
                    ..key("probe", pb::Role::Admin)
                },
                "workspace_id",
            ),
        ] {
            let status = p.check(
                "CreateApiKey",
                label,
                INVALID,
                admin.create_api_key(request).await,
            );
            p.names(label, status, field);
        }
        p.check(
            "CreateApiKey",
            "unknown workspace",
            Refused(Code::NotFound),
            admin
                .create_api_key(pb::CreateApiKeyRequest {
                    workspace_id: i64::MAX,
                    ..key("probe", pb::Role::Reader)
                })
                .await,
        );
        p.check(
            "CreateApiKey",
            "good",
            Answered,
            admin.create_api_key(key("probe", pb::Role::Reader)).await,
        );
        p.check(
            "ListApiKeys",
            "empty",
            Answered,
            admin.list_api_keys(pb::ListApiKeysRequest::default()).await,
        );
        for (label, key_id) in [
            ("empty key_id", String::new()),
            ("1 MB key_id", big(MB)),
            ("NUL key_id", "a\0b".to_string()),
            (" padded key_id", " abc".to_string()),
        ] {
            let status = p.check(
                "RevokeApiKey",
                label,
                INVALID,
                admin
                    .revoke_api_key(pb::RevokeApiKeyRequest { key_id })
                    .await,
            );
            p.names(label, status, "key_id");
        }
        p.check(
            "RevokeApiKey",
            "unknown key",
            Refused(Code::NotFound),
            admin
                .revoke_api_key(pb::RevokeApiKeyRequest {
                    key_id: "0123456789abcdef".into(),
                })
                .await,
        );
        let rpc = "ListAuditEvents";
        p.check(
            rpc,
            "empty",
            Answered,
            admin
                .list_audit_events(pb::ListAuditEventsRequest::default())
                .await,
        );
        for (label, request, field) in [
            (
                "page_size -1",
                pb::ListAuditEventsRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                "garbage page_token",
                pb::ListAuditEventsRequest {
                    page_token: "!!".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                "1 MB key_id",
                pb::ListAuditEventsRequest {
                    key_id: big(MB),
                    ..Default::default()
                },
                "key_id",
            ),
            (
                "NUL action",
                pb::ListAuditEventsRequest {
                    action: "a\0".into(),
                    ..Default::default()
                },
                "action",
            ),
            (
                "until before since",
                pb::ListAuditEventsRequest {
                    since: Some(ts(1_700_000_100, 0)),
                    until: Some(ts(1_700_000_000, 0)),
                    ..Default::default()
                },
                "until",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, admin.list_audit_events(request).await);
            p.names(label, status, field);
        }
        // (Before 1970 is a valid protobuf time, and a harmless lower bound.)
        for (label, bad) in bad_timestamps()
            .into_iter()
            .filter(|(l, _)| *l != "before 1970")
        {
            let status = p.check(
                rpc,
                &format!("since {label}"),
                INVALID,
                admin
                    .list_audit_events(pb::ListAuditEventsRequest {
                        since: Some(bad),
                        ..Default::default()
                    })
                    .await,
            );
            p.names(label, status, "since");
        }
        // A token of other filters is refused.
        let paged = admin
            .list_audit_events(pb::ListAuditEventsRequest {
                page_size: 1,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(!paged.next_page_token.is_empty(), "audit has one page only");
        p.check(
            rpc,
            "foreign page_token",
            INVALID,
            admin
                .list_audit_events(pb::ListAuditEventsRequest {
                    page_size: 1,
                    key_id: "other".into(),
                    page_token: paged.next_page_token,
                    ..Default::default()
                })
                .await,
        );

        // Workspaces: every bad field is refused before Customer.io is asked.
        let workspace = || pb::CreateWorkspaceRequest {
            site_id: "probe-site".into(),
            track_api_key: "t".into(),
            app_api_key: "a".into(),
            ..Default::default()
        };
        for (label, request, field) in [
            ("empty", pb::CreateWorkspaceRequest::default(), "site_id"),
            (
                "1 MB site_id",
                pb::CreateWorkspaceRequest {
                    site_id: big(MB),
                    ..workspace()
                },
                "site_id",
            ),
            (
                "dot-segment site_id",
                pb::CreateWorkspaceRequest {
                    site_id: "..".into(),
                    ..workspace()
                },
                "site_id",
            ),
            (
                "region mars",
                pb::CreateWorkspaceRequest {
                    region: "mars".into(),
                    ..workspace()
                },
                "region",
            ),
            (
                "NUL track key",
                pb::CreateWorkspaceRequest {
                    track_api_key: "t\0".into(),
                    ..workspace()
                },
                "track_api_key",
            ),
            (
                "1 MB app key",
                pb::CreateWorkspaceRequest {
                    app_api_key: big(MB),
                    ..workspace()
                },
                "app_api_key",
            ),
            (
                "rate 1001",
                pb::CreateWorkspaceRequest {
                    track_requests_per_sec: 1001,
                    ..workspace()
                },
                "track_requests_per_sec",
            ),
            (
                "javascript: URL",
                pb::CreateWorkspaceRequest {
                    app_base_url: "javascript:alert(1)".into(),
                    ..workspace()
                },
                "app_base_url",
            ),
            (
                "1 MB name",
                pb::CreateWorkspaceRequest {
                    name: big(MB),
                    ..workspace()
                },
                "name",
            ),
        ] {
            let status = p.check(
                "CreateWorkspace",
                label,
                INVALID,
                admin.create_workspace(request).await,
            );
            p.names(label, status, field);
        }
        for (label, request, field) in [
            ("id 0", pb::UpdateWorkspaceRequest::default(), "id"),
            (
                "NUL name",
                pb::UpdateWorkspaceRequest {
                    id: app.ctx.workspace_id(),
                    name: "a\0b".into(),
                    ..Default::default()
                },
                "name",
            ),
            (
                "rate -> u32::MAX",
                pb::UpdateWorkspaceRequest {
                    id: app.ctx.workspace_id(),
                    app_requests_per_sec: u32::MAX,
                    ..Default::default()
                },
                "app_requests_per_sec",
            ),
        ] {
            let status = p.check(
                "UpdateWorkspace",
                label,
                INVALID,
                admin.update_workspace(request).await,
            );
            p.names(label, status, field);
        }
        p.check(
            "UpdateWorkspace",
            "unknown id",
            Refused(Code::NotFound),
            admin
                .update_workspace(pb::UpdateWorkspaceRequest {
                    id: i64::MAX,
                    name: "x".into(),
                    ..Default::default()
                })
                .await,
        );
        for (label, id, want) in [
            ("id -1", -1, INVALID),
            ("id i64::MIN", i64::MIN, INVALID),
            ("unknown id", i64::MAX, Refused(Code::NotFound)),
            ("own", app.ctx.workspace_id(), Answered),
        ] {
            p.check(
                "GetWorkspace",
                label,
                want,
                admin.get_workspace(pb::GetWorkspaceRequest { id }).await,
            );
        }
        for (label, id, want) in [
            ("id 0", 0, INVALID),
            ("unknown id", i64::MAX, Refused(Code::NotFound)),
        ] {
            p.check(
                "DisableWorkspace",
                label,
                want,
                admin
                    .disable_workspace(pb::DisableWorkspaceRequest { id })
                    .await,
            );
        }
        p.check(
            "ListWorkspaces",
            "empty",
            Answered,
            admin
                .list_workspaces(pb::ListWorkspacesRequest::default())
                .await,
        );
        for (label, request, field) in [
            (
                "page_size -1",
                pb::ListWorkspacesRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                "garbage page_token",
                pb::ListWorkspacesRequest {
                    page_token: "!!".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                "1 MB page_token",
                pb::ListWorkspacesRequest {
                    page_token: big(MB),
                    ..Default::default()
                },
                "page_token",
            ),
        ] {
            let status = p.check(
                "ListWorkspaces",
                label,
                INVALID,
                admin.list_workspaces(request).await,
            );
            p.names(label, status, field);
        }

        // ----- AnalyticsService -----
        let mut an = app.analytics().await?;
        let rpc = "WatchEngagement";
        for (label, request, field) in [
            (
                "negative cursor",
                pb::WatchEngagementRequest {
                    after_event_id: -1,
                    ..Default::default()
                },
                "after_event_id",
            ),
            (
                "cursor with from_beginning",
                pb::WatchEngagementRequest {
                    after_event_id: 5,
                    from_beginning: true,
                    ..Default::default()
                },
                "after_event_id",
            ),
            (
                "1 MB assignment_id",
                pb::WatchEngagementRequest {
                    assignment_id: big(MB),
                    ..Default::default()
                },
                "assignment_id",
            ),
            (
                "NUL assignment_id",
                pb::WatchEngagementRequest {
                    assignment_id: "a\0".into(),
                    ..Default::default()
                },
                "assignment_id",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, an.watch_engagement(request).await);
            p.names(label, status, field);
        }
        p.check(
            rpc,
            "unknown assignment (nothing yet, still a stream)",
            Answered,
            an.watch_engagement(pb::WatchEngagementRequest {
                assignment_id: "no-such-assignment".into(),
                ..Default::default()
            })
            .await,
        );

        let rpc = "ListQuarantinedWebhooks";
        p.check(
            rpc,
            "empty",
            Answered,
            an.list_quarantined_webhooks(pb::ListQuarantinedWebhooksRequest::default())
                .await,
        );
        for (label, request, field) in [
            (
                "page_size -1",
                pb::ListQuarantinedWebhooksRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                "garbage token",
                pb::ListQuarantinedWebhooksRequest {
                    page_token: "!!".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                "1 MB token",
                pb::ListQuarantinedWebhooksRequest {
                    page_token: big(MB),
                    ..Default::default()
                },
                "page_token",
            ),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                an.list_quarantined_webhooks(request).await,
            );
            p.names(label, status, field);
        }

        let rpc = "GetAssignmentAnalytics";
        for (label, id) in [
            ("empty", String::new()),
            ("1 MB id", big(MB)),
            ("NUL id", "a\0".to_string()),
            ("padded id", " asg".to_string()),
        ] {
            let status = p.check(
                rpc,
                label,
                INVALID,
                an.get_assignment_analytics(pb::GetAssignmentAnalyticsRequest {
                    assignment_id: id,
                })
                .await,
            );
            p.names(label, status, "assignment_id");
        }
        p.check(
            rpc,
            "unknown assignment",
            Refused(Code::NotFound),
            an.get_assignment_analytics(pb::GetAssignmentAnalyticsRequest {
                assignment_id: "no-such-assignment".into(),
            })
            .await,
        );

        let rpc = "ListAssignmentPerformance";
        let period = |start: i64, end: i64| pb::ListAssignmentPerformanceRequest {
            start_time: Some(ts(start, 0)),
            end_time: Some(ts(end, 0)),
            ..Default::default()
        };
        p.check(
            rpc,
            "a day with no data",
            Answered,
            an.list_assignment_performance(period(1_700_000_000, 1_700_086_400))
                .await,
        );
        let mut cases = vec![
            (
                "no period".to_string(),
                pb::ListAssignmentPerformanceRequest::default(),
                "start_time",
            ),
            ("end before start".into(), period(10, 5), "end_time"),
            ("367 days".into(), period(0, 367 * 86_400), "end_time"),
            (
                "rank_by 99".into(),
                pb::ListAssignmentPerformanceRequest {
                    rank_by: 99,
                    ..period(0, 10)
                },
                "rank_by",
            ),
            (
                "segment -1".into(),
                pb::ListAssignmentPerformanceRequest {
                    segment_id: -1,
                    ..period(0, 10)
                },
                "segment_id",
            ),
            (
                "NUL content_type".into(),
                pb::ListAssignmentPerformanceRequest {
                    content_type: "cry\0pto".into(),
                    ..period(0, 10)
                },
                "content_type",
            ),
            (
                "page_size -1".into(),
                pb::ListAssignmentPerformanceRequest {
                    page_size: -1,
                    ..period(0, 10)
                },
                "page_size",
            ),
            (
                "foreign token".into(),
                pb::ListAssignmentPerformanceRequest {
                    page_token: "c2VuZHMudjI6MDA6MQ".into(),
                    ..period(0, 10)
                },
                "page_token",
            ),
        ];
        for (label, t) in bad_timestamps() {
            cases.push((
                format!("start_time {label}"),
                pb::ListAssignmentPerformanceRequest {
                    start_time: Some(t),
                    end_time: Some(ts(10, 0)),
                    ..Default::default()
                },
                "start_time",
            ));
        }
        for (label, request, field) in cases {
            let status = p.check(
                rpc,
                &label,
                INVALID,
                an.list_assignment_performance(request).await,
            );
            p.names(&label, status, field);
        }

        let rpc = "ExportReport";
        let export = |format: pb::ReportFormat| pb::ExportReportRequest {
            format: format as i32,
            assignment_id: "no-such-assignment".into(),
            ..Default::default()
        };
        p.check(
            rpc,
            "unknown assignment: not found, as GetAssignmentAnalytics",
            Refused(Code::NotFound),
            an.export_report(export(pb::ReportFormat::Csv)).await,
        );
        for (label, request, field) in [
            ("no format", export(pb::ReportFormat::Unspecified), "format"),
            (
                "format 7",
                pb::ExportReportRequest {
                    format: 7,
                    ..export(pb::ReportFormat::Csv)
                },
                "format",
            ),
            (
                "no scope",
                pb::ExportReportRequest {
                    format: pb::ReportFormat::Csv as i32,
                    ..Default::default()
                },
                "assignment_id",
            ),
            (
                "1 MB assignment",
                pb::ExportReportRequest {
                    assignment_id: big(MB),
                    ..export(pb::ReportFormat::JsonLines)
                },
                "assignment_id",
            ),
            (
                "start without end",
                pb::ExportReportRequest {
                    start_time: Some(ts(0, 0)),
                    ..export(pb::ReportFormat::Csv)
                },
                "end_time",
            ),
            (
                "bad end_time",
                pb::ExportReportRequest {
                    start_time: Some(ts(0, 0)),
                    end_time: Some(ts(1_700_000_059, 2_000_000_000)),
                    ..export(pb::ReportFormat::Csv)
                },
                "end_time",
            ),
            (
                "segment -4",
                pb::ExportReportRequest {
                    segment_id: -4,
                    ..export(pb::ReportFormat::Csv)
                },
                "segment_id",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, an.export_report(request).await);
            p.names(label, status, field);
        }

        let rpc = "SuggestSegments";
        p.check(
            rpc,
            "no history: answered, nothing ranked",
            Answered,
            an.suggest_segments(pb::SuggestSegmentsRequest {
                content_types: vec!["crypto".into()],
                ..Default::default()
            })
            .await,
        );
        for (label, request, field) in [
            (
                "no content types",
                pb::SuggestSegmentsRequest::default(),
                "content_types",
            ),
            (
                "21 content types",
                pb::SuggestSegmentsRequest {
                    content_types: vec!["a".into(); 21],
                    ..Default::default()
                },
                "content_types",
            ),
            (
                "NUL content type",
                pb::SuggestSegmentsRequest {
                    content_types: vec!["a\0".into()],
                    ..Default::default()
                },
                "content_types[0]",
            ),
            (
                "1 MB title",
                pb::SuggestSegmentsRequest {
                    content_types: vec!["crypto".into()],
                    title: big(MB),
                    ..Default::default()
                },
                "title",
            ),
            (
                "limit -1",
                pb::SuggestSegmentsRequest {
                    content_types: vec!["crypto".into()],
                    limit: -1,
                    ..Default::default()
                },
                "limit",
            ),
        ] {
            let status = p.check(rpc, label, INVALID, an.suggest_segments(request).await);
            p.names(label, status, field);
        }

        // GetProfile's engagement history fields.
        let history = |f: fn(&mut pb::GetProfileRequest)| {
            let mut r = pb::GetProfileRequest {
                customer: Some(pb::CustomerRef {
                    identifier: Some(pb::customer_ref::Identifier::Id("nobody-here".into())),
                }),
                fresh: true,
                ..Default::default()
            };
            f(&mut r);
            r
        };
        for (label, request, field) in [
            (
                "history_page_size -1",
                history(|r| r.history_page_size = -1),
                "history_page_size",
            ),
            (
                "garbage history token",
                history(|r| r.history_page_token = "!!".into()),
                "history_page_token",
            ),
            (
                "cio_messages_limit 1001",
                history(|r| r.cio_messages_limit = 1001),
                "cio_messages_limit",
            ),
            (
                "cio_messages_limit -1",
                history(|r| r.cio_messages_limit = -1),
                "cio_messages_limit",
            ),
            (
                "cio_activities_limit 101",
                history(|r| r.cio_activities_limit = 101),
                "cio_activities_limit",
            ),
            (
                "cio messages without fresh",
                history(|r| {
                    r.fresh = false;
                    r.cio_messages_limit = 10;
                }),
                "cio_messages_limit",
            ),
            (
                "NUL activity type",
                history(|r| {
                    r.cio_activities_limit = 10;
                    r.cio_activities_type = "clicked\0".into();
                }),
                "cio_activities_type",
            ),
            (
                "1 MB messages cursor",
                history(|r| {
                    r.cio_messages_limit = 10;
                    r.cio_messages_start = big(MB);
                }),
                "cio_messages_start",
            ),
        ] {
            let status = p.check(
                "GetProfile",
                label,
                INVALID,
                prof.get_profile(request).await,
            );
            p.names(label, status, field);
        }

        // The accepted writes deliver without dead letters.
        app.deliver_all("bad-input", Duration::from_secs(30))
            .await?;
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(
            stats.dead == 0,
            "dot-segment ids were dead-lettered: {stats:?}"
        );

        // Every RPC of every service was probed.
        let declared = declared_rpcs()?;
        let probed: BTreeSet<String> = p.rpcs.iter().map(|r| r.to_string()).collect();
        let missing: Vec<_> = declared.difference(&probed).collect();
        ensure!(missing.is_empty(), "RPCs not probed: {missing:?}");
        ensure!(
            p.failures.is_empty(),
            "{} of {} cases failed:\n{}",
            p.failures.len(),
            p.cases,
            p.failures.join("\n")
        );
        app.stop().await
    }
);

db_test!(
    nan_and_infinity_never_delete_an_attribute,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut profiles = app.profiles().await?;
        profiles
            .update_attributes(update("nan-1", one("score", number(87.0))))
            .await?;
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let status = profiles
                .update_attributes(update("nan-1", one("score", number(bad))))
                .await
                .err()
                .with_context(|| format!("{bad} accepted"))?;
            ensure!(
                status.code() == Code::InvalidArgument
                    && bad_request_fields(&status) == ["attributes.score"],
                "{bad}: {status:?}"
            );
        }
        let profile = profiles
            .get_profile(pb::GetProfileRequest {
                customer: Some(pb::CustomerRef {
                    identifier: Some(pb::customer_ref::Identifier::Id("nan-1".into())),
                }),
                fresh: false,
                ..Default::default()
            })
            .await?
            .into_inner()
            .profile
            .context("no profile")?;
        let score = profile
            .attributes
            .and_then(|a| a.fields.get("score").cloned())
            .and_then(|v| v.kind);
        ensure!(
            score == Some(Kind::NumberValue(87.0)),
            "the mirror lost score: {score:?}"
        );
        app.deliver_all("nan", Duration::from_secs(30)).await?;
        let person = app.sim.sim.person("nan-1").context("not delivered")?;
        ensure!(
            person.attributes.get("score").is_some_and(|s| !s.is_null()),
            "Customer.io lost score: {:?}",
            person.attributes
        );
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(stats.delivered == 1 && stats.dead == 0, "{stats:?}");
        app.stop().await
    }
);

db_test!(
    page_tokens_only_work_with_the_filters_that_produced_them,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (mut seg, _, mut ops, mut camp) = clients(&app).await?;
        app.sync_segments().await?;
        let run = ops
            .run_job(pb::RunJobRequest {
                job: "campaign-sync".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .run
            .context("RunJob answered no run")?;
        sharpsend_tests::wait_for_run(&mut ops, run.id, sharpsend_tests::RUN_WAIT).await?;

        let refused = |status: Status, rpc: &str| -> anyhow::Result<()> {
            let reason = status
                .get_error_details()
                .error_info()
                .map(|i| i.reason.clone());
            ensure!(
                status.code() == Code::InvalidArgument
                    && bad_request_fields(&status) == ["page_token"]
                    && reason.as_deref() == Some("INVALID_PAGE_TOKEN"),
                "{rpc}: {status:?}"
            );
            Ok(())
        };

        // ListSegments: a DYNAMIC token with MANUAL (the issue's case), other names, removed.
        let dynamic = pb::ListSegmentsRequest {
            page_size: 1,
            r#type: pb::SegmentType::Dynamic as i32,
            ..Default::default()
        };
        let token = seg
            .list_segments(dynamic.clone())
            .await?
            .into_inner()
            .next_page_token;
        ensure!(!token.is_empty(), "one dynamic segment only");
        seg.list_segments(pb::ListSegmentsRequest {
            page_token: token.clone(),
            page_size: 5,
            ..dynamic.clone()
        })
        .await
        .context("the same filters (another page size) must take the token")?;
        for other in [
            pb::ListSegmentsRequest {
                r#type: pb::SegmentType::Manual as i32,
                ..dynamic.clone()
            },
            pb::ListSegmentsRequest {
                name_contains: "growth".into(),
                ..dynamic.clone()
            },
            pb::ListSegmentsRequest {
                include_removed: true,
                ..dynamic.clone()
            },
        ] {
            let status = seg
                .list_segments(pb::ListSegmentsRequest {
                    page_token: token.clone(),
                    ..other
                })
                .await
                .err()
                .context("a token of other filters was accepted")?;
            refused(status, "ListSegments")?;
        }

        // ListCampaigns: a BROADCAST token with CAMPAIGN.
        let broadcasts = pb::ListCampaignsRequest {
            kind: pb::CampaignKind::Broadcast as i32,
            page_size: 1,
            ..Default::default()
        };
        let token = camp
            .list_campaigns(broadcasts.clone())
            .await?
            .into_inner()
            .next_page_token;
        ensure!(!token.is_empty(), "one broadcast only");
        let status = camp
            .list_campaigns(pb::ListCampaignsRequest {
                kind: pb::CampaignKind::Campaign as i32,
                page_token: token.clone(),
                ..broadcasts.clone()
            })
            .await
            .err()
            .context("ListCampaigns took a token of other filters")?;
        refused(status, "ListCampaigns")?;
        camp.list_campaigns(pb::ListCampaignsRequest {
            page_token: token,
            ..broadcasts
        })
        .await?;

        // ListSends: two sends, a token of all sends with a state filter.
        for assignment in ["tok-1", "tok-2"] {
            camp.send_assignment(pb::SendAssignmentRequest {
                assignment_id: assignment.into(),
                delivery: Some(pb::send_assignment_request::Delivery::Newsletter(
                    pb::NewsletterDelivery {
                        from_id: 0,
                        ..Default::default()
                    },
                )),
                ..send_request()
            })
            .await?;
        }
        let all = pb::ListSendsRequest {
            page_size: 1,
            ..Default::default()
        };
        let token = camp
            .list_sends(all.clone())
            .await?
            .into_inner()
            .next_page_token;
        ensure!(!token.is_empty(), "no second page of sends");
        for other in [
            pb::ListSendsRequest {
                state: SendStateFilter::Failed as i32,
                ..all.clone()
            },
            pb::ListSendsRequest {
                assignment_id: "tok-1".into(),
                ..all.clone()
            },
        ] {
            let status = camp
                .list_sends(pb::ListSendsRequest {
                    page_token: token.clone(),
                    ..other
                })
                .await
                .err()
                .context("ListSends took a token of other filters")?;
            refused(status, "ListSends")?;
        }
        let next = camp
            .list_sends(pb::ListSendsRequest {
                page_token: token,
                ..all
            })
            .await?
            .into_inner();
        ensure!(next.sends.len() == 1, "{next:?}");
        app.stop().await
    }
);

use pb::SendState as SendStateFilter;

db_test!(
    the_bearer_scheme_is_case_insensitive,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        for (authorization, ok) in [
            (format!("bearer {TEST_API_KEY}"), true),
            (format!("BEARER {TEST_API_KEY}"), true),
            (format!("Bearer   {TEST_API_KEY}"), true),
            (format!("bearer {}", TEST_API_KEY.to_uppercase()), false),
            (format!("Basic {TEST_API_KEY}"), false),
        ] {
            let mut client = SegmentServiceClient::with_interceptor(
                app.channel().await?,
                Padded {
                    authorization: authorization.clone(),
                    pad: 0,
                },
            );
            let result = client
                .list_segments(pb::ListSegmentsRequest::default())
                .await;
            match (result, ok) {
                (Ok(_), true) => {}
                (Err(status), false) => {
                    let reason = status
                        .get_error_details()
                        .error_info()
                        .map(|i| i.reason.clone())
                        .unwrap_or_default();
                    ensure!(
                        status.code() == Code::Unauthenticated && reason.starts_with("API_KEY_"),
                        "{authorization}: {status:?}"
                    );
                }
                (other, _) => anyhow::bail!("{authorization}: {other:?}"),
            }
        }
        app.stop().await
    }
);

db_test!(errors_carry_stable_reasons, |db: TestDatabase| async move {
    let app = TestApp::spawn(&db).await?;
    let (mut seg, _, _, mut camp) = clients(&app).await?;
    app.sync_segments().await?;
    let reason = |status: &Status| {
        status
            .get_error_details()
            .error_info()
            .map(|i| (i.reason.clone(), i.domain.clone()))
            .unwrap_or_default()
    };
    let want = |status: &Status, code: Code, r: &str| -> anyhow::Result<()> {
        ensure!(
            status.code() == code
                && reason(status) == (r.to_string(), "sharpsend.cio.v1".to_string()),
            "wanted {code:?} {r}: {status:?}"
        );
        Ok(())
    };

    // FAILED_PRECONDITION, two kinds: an unknown target segment, a send with nothing uncertain.
    let status = camp
        .send_assignment(pb::SendAssignmentRequest {
            segment_ids: vec![999_999],
            variations: vec![pb::ContentVariation {
                segment_id: 999_999,
                body: "b".into(),
                ..Default::default()
            }],
            ..send_request()
        })
        .await
        .err()
        .context("an unknown segment was sent to")?;
    want(&status, Code::FailedPrecondition, "UNKNOWN_SEGMENT")?;
    let types: Vec<String> = status
        .get_error_details()
        .precondition_failure()
        .map(|p| p.violations.iter().map(|v| v.r#type.clone()).collect())
        .unwrap_or_default();
    ensure!(types == ["UNKNOWN_SEGMENT"], "{types:?}");

    let send = camp
        .send_assignment(pb::SendAssignmentRequest {
            delivery: Some(pb::send_assignment_request::Delivery::Newsletter(
                pb::NewsletterDelivery {
                    from_id: 0,
                    ..Default::default()
                },
            )),
            ..send_request()
        })
        .await?
        .into_inner()
        .send
        .context("no send")?;
    let status = camp
        .resolve_send(pb::ResolveSendRequest {
            send_id: send.id.clone(),
            segment_id: 0,
            resolution: pb::Resolution::MarkSent as i32,
            actor: "ops@example.com".into(),
            reason: "probe".into(),
        })
        .await
        .err()
        .context("resolved a send with nothing uncertain")?;
    want(&status, Code::FailedPrecondition, "SEND_NOT_UNCERTAIN")?;

    let status = seg
        .get_segment(pb::GetSegmentRequest {
            segment_id: 424_242,
        })
        .await
        .err()
        .context("found")?;
    want(&status, Code::NotFound, "UNKNOWN_SEGMENT")?;
    let status = camp
        .get_send(pb::GetSendRequest {
            send_id: "snd_nope".into(),
            ..Default::default()
        })
        .await
        .err()
        .context("found")?;
    want(&status, Code::NotFound, "UNKNOWN_SEND")?;
    let status = seg
        .list_segments(pb::ListSegmentsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .err()
        .context("accepted")?;
    want(&status, Code::InvalidArgument, "INVALID_FIELD")?;

    // Customer.io down: UNAVAILABLE with its own reason.
    app.sim.sim.push_faults(
        Some(SimApi::App),
        std::iter::repeat_n(
            Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            10,
        ),
    );
    let status = seg
        .create_segment(pb::CreateSegmentRequest {
            name: "against a dead Customer.io".into(),
            ..Default::default()
        })
        .await
        .err()
        .context("created a segment in a dead Customer.io")?;
    app.sim.sim.clear_faults();
    want(&status, Code::Unavailable, "CUSTOMERIO_UNAVAILABLE")?;
    app.stop().await
});

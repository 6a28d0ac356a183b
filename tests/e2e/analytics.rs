//! Analytics end to end on both databases (issues #13 §3, §5 and #15): histories built by real
//! sends through the simulator, its signed reporting webhooks (or the delivery-poll job) into
//! the server, and every figure of GetAssignmentAnalytics, every row of ExportReport, a
//! person's history and the WatchEngagement stream checked against the simulator's ledger.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, TimeDelta, Utc};
use cio_client::Resolution;
use cio_sim::{
    DeliveryFilter, DeliveryMetric, DeliveryRates, RatesKey, ReportingWebhook, SimDelivery,
};
use secrecy::SecretString;
use serde_json::Value;
use sharpsend_core::jobs::Job;
use sharpsend_core::metrics::zoned;
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1 as pb;
use sharpsend_tests::TestApp;
use tokio::net::TcpListener;

const KEY: &str = "whsec-analytics-0123456789";
const BROADCAST: i64 = 3;

/// Serves the webhook endpoint and points the simulator's reporting webhooks at it.
async fn webhooks_on(app: &TestApp) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        sharpsend_server::webhooks::WEBHOOK_PATH
    );
    tokio::spawn(sharpsend_server::webhooks::serve(
        listener,
        app.ctx.clone(),
        SecretString::from(KEY),
        std::future::pending(),
    ));
    app.sim.sim.set_reporting_webhook(Some(ReportingWebhook {
        duplicate_rate: 0.3,
        ..ReportingWebhook::new(&url, KEY)
    }))?;
    Ok(())
}

async fn settle_webhooks(app: &TestApp) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        app.sim.sim.advance(Duration::from_secs(3600));
        ensure!(
            app.sim.sim.webhooks_settled(Duration::from_secs(60)).await,
            "webhooks not settled"
        );
        if app.sim.sim.webhook_ledger().iter().all(|h| h.delivered()) {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "webhooks undelivered");
    }
}

/// A manual segment of demo people `from..to` (in the demo's order), synced into the mirror.
async fn segment_of(app: &TestApp, name: &str, from: usize, to: usize) -> anyhow::Result<i64> {
    let engaged = app.sim_segment_id("High Engagement")?;
    let members = app.sim.sim.segment_members(engaged).context("members")?;
    ensure!(members.len() >= to, "only {} members", members.len());
    let ids: Vec<&str> = members[from..to].iter().map(String::as_str).collect();
    let id = app.sim.sim.create_manual_segment(name, "analytics e2e");
    app.sim.sim.add_to_manual_segment(id, &ids)?;
    Ok(id)
}

/// Sends `assignment` through the broadcast to `segments` (subject per segment:
/// `"<subject> <segment id>"`), waits until every submission has its trigger; answers the send
/// id and (segment, trigger) pairs.
async fn send(
    app: &TestApp,
    assignment: &str,
    subject: &str,
    segments: &[i64],
    content_types: &[&str],
) -> anyhow::Result<(String, Vec<(i64, i64)>)> {
    let sent = app
        .campaigns()
        .await?
        .send_assignment(pb::SendAssignmentRequest {
            assignment_id: assignment.into(),
            title: format!("{subject} title"),
            subject: subject.into(),
            segment_ids: segments.to_vec(),
            variations: segments
                .iter()
                .map(|s| pb::ContentVariation {
                    segment_id: *s,
                    subject: format!("{subject} {s}"),
                    body: "<p>body</p>".into(),
                    ..Default::default()
                })
                .collect(),
            delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                pb::BroadcastDelivery {
                    broadcast_id: BROADCAST,
                },
            )),
            content_types: content_types.iter().map(|c| c.to_string()).collect(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .send
        .context("no send")?;
    let got = app
        .dispatch_until_submitted(
            &sent.id,
            segments.len(),
            Duration::from_secs(11),
            Duration::from_secs(60),
        )
        .await?;
    let triggers: Vec<(i64, i64)> = got
        .submissions
        .iter()
        .filter(|s| s.cio_trigger_id > 0)
        .map(|s| (s.segment_id, s.cio_trigger_id))
        .collect();
    Ok((sent.id, triggers))
}

/// What a ledger delivery did, as the service counts it (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Truth {
    person: String,
    sent: i64,
    delivered: Option<i64>,
    open: Option<i64>,
    click: Option<i64>,
    bounced: Option<i64>,
    spammed: Option<i64>,
    unsubscribed: Option<i64>,
    converted: Option<i64>,
}

/// When each reported event happened, as the simulator's webhooks said (its delivery ledger
/// presents times relative to its moving clock; the webhook bodies keep the time reported).
type Reported = HashMap<(String, DeliveryMetric), i64>;

fn reported(app: &TestApp) -> Reported {
    let mut out = HashMap::new();
    for h in app.sim.sim.webhook_ledger() {
        let body = h.body_json();
        let flag = |k: &str| body["data"][k].as_bool().unwrap_or(false);
        let metric = match h.metric.as_str() {
            "sent" => DeliveryMetric::Sent,
            "delivered" => DeliveryMetric::Delivered,
            "bounced" => DeliveryMetric::Bounced,
            "opened" if flag("prefetched") => DeliveryMetric::PrefetchOpened,
            "opened" if flag("synthetic") => DeliveryMetric::Opened,
            "opened" => DeliveryMetric::HumanOpened,
            "clicked" if flag("machine") => DeliveryMetric::PrefetchClicked,
            "clicked" => DeliveryMetric::HumanClicked,
            "converted" => DeliveryMetric::Converted,
            "spammed" => DeliveryMetric::Spammed,
            "unsubscribed" => DeliveryMetric::Unsubscribed,
            _ => continue,
        };
        // The body as sent (the ledger's `timestamp` field is presented anew at each read).
        let Some(at) = body["timestamp"].as_i64() else {
            continue;
        };
        out.insert((h.delivery_id.clone(), metric), at);
    }
    out
}

fn truth(d: &SimDelivery, times: &Reported) -> anyhow::Result<Truth> {
    let at = |m: DeliveryMetric| -> anyhow::Result<Option<i64>> {
        if !d.events.contains_key(&m) {
            return Ok(None);
        }
        times
            .get(&(d.delivery_id.clone(), m))
            .copied()
            .map(Some)
            .with_context(|| format!("{m:?} of {} was not reported", d.delivery_id))
    };
    let click = at(DeliveryMetric::HumanClicked)?;
    let open = match (at(DeliveryMetric::HumanOpened)?, click) {
        (Some(o), Some(c)) => Some(o.min(c)),
        (o, c) => o.or(c),
    };
    // The simulator keeps "now" at the real time and ages the past when its clock moves on, so
    // events reported after a move carry earlier times than events reported before it; the
    // service takes the first time it was told of, as the figures here do.
    let reported: Vec<(DeliveryMetric, i64)> = times
        .iter()
        .filter(|((id, _), _)| *id == d.delivery_id)
        .map(|((_, m), t)| (*m, *t))
        .collect();
    let first_of = |ms: &[DeliveryMetric]| {
        reported
            .iter()
            .filter(|(m, _)| ms.contains(m))
            .map(|(_, t)| *t)
            .min()
    };
    use DeliveryMetric as M;
    let delivered = if d.events.contains_key(&M::Delivered) {
        first_of(&[
            M::Delivered,
            M::Opened,
            M::HumanOpened,
            M::PrefetchOpened,
            M::HumanClicked,
            M::PrefetchClicked,
            M::Converted,
        ])
    } else {
        None
    };
    Ok(Truth {
        person: d.person_id.clone(),
        sent: reported
            .iter()
            .map(|(_, t)| *t)
            .min()
            .context("nothing reported")?,
        delivered,
        open,
        click,
        bounced: at(DeliveryMetric::Bounced)?,
        spammed: at(DeliveryMetric::Spammed)?,
        unsubscribed: at(DeliveryMetric::Unsubscribed)?,
        converted: at(DeliveryMetric::Converted)?,
    })
}

fn ledger(app: &TestApp, trigger: i64) -> anyhow::Result<BTreeMap<String, Truth>> {
    let times = reported(app);
    app.sim
        .sim
        .deliveries(&DeliveryFilter::trigger(trigger))
        .iter()
        .map(|d| Ok((d.delivery_id.clone(), truth(d, &times)?)))
        .collect()
}

/// The counts the ledger gives for deliveries reaching a metric within `[from, to)`.
fn ledger_counts(deliveries: &[&Truth], from: i64, to: i64) -> pb::DeliveryCounts {
    let n = |f: &dyn Fn(&Truth) -> Option<i64>| {
        deliveries
            .iter()
            .filter(|t| f(t).is_some_and(|x| x >= from && x < to))
            .count() as i64
    };
    pb::DeliveryCounts {
        recipients: n(&|t| Some(t.sent)),
        delivered: n(&|t| t.delivered),
        bounced: n(&|t| t.bounced),
        spam_reports: n(&|t| t.spammed),
        unsubscribes: n(&|t| t.unsubscribed),
        human_opens: n(&|t| t.open),
        human_clicks: n(&|t| t.click),
        conversions: n(&|t| t.converted),
    }
}

fn rate(n: i64, d: i64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

async fn analytics_of(
    app: &TestApp,
    assignment: &str,
) -> anyhow::Result<pb::GetAssignmentAnalyticsResponse> {
    Ok(app
        .analytics()
        .await?
        .get_assignment_analytics(pb::GetAssignmentAnalyticsRequest {
            assignment_id: assignment.into(),
        })
        .await?
        .into_inner())
}

/// ListAssignmentPerformance over a period holding everything a test sent.
async fn performance(
    app: &TestApp,
    request: pb::ListAssignmentPerformanceRequest,
) -> anyhow::Result<pb::ListAssignmentPerformanceResponse> {
    let now = Utc::now().timestamp();
    let at = |seconds| Some(prost_types::Timestamp { seconds, nanos: 0 });
    Ok(app
        .analytics()
        .await?
        .list_assignment_performance(pb::ListAssignmentPerformanceRequest {
            start_time: at(now - 100 * 86_400),
            end_time: at(now + 200 * 86_400),
            ..request
        })
        .await?
        .into_inner())
}

async fn export(
    app: &TestApp,
    request: pb::ExportReportRequest,
) -> anyhow::Result<(String, usize)> {
    let mut stream = app
        .analytics()
        .await?
        .export_report(request)
        .await?
        .into_inner();
    let mut text = Vec::new();
    let mut chunks = 0;
    let mut done = false;
    while let Some(chunk) = stream.message().await? {
        ensure!(!done, "a chunk after the last");
        text.extend(chunk.data);
        chunks += 1;
        done = chunk.done;
    }
    ensure!(done, "no last chunk");
    Ok((String::from_utf8(text)?, chunks))
}

fn ts_secs(t: &Option<prost_types::Timestamp>) -> Option<i64> {
    t.as_ref().map(|t| t.seconds)
}

db_test!(
    assignment_figures_reports_history_and_the_watch_match_the_simulators_ledger,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let a = segment_of(&app, "Analytics A", 0, 60).await?;
        let b = segment_of(&app, "Analytics B", 60, 120).await?;
        let lost = segment_of(&app, "Analytics bounce", 120, 130).await?;
        app.sync_segments().await?;
        app.sim.sim.set_default_rates(DeliveryRates {
            bounce_rate: 0.05,
            open_rate: 0.5,
            machine_open_rate: 0.3,
            click_rate: 0.4,
            machine_click_rate: 0.2,
            conversion_rate: 0.3,
            spam_rate: 0.05,
            unsubscribe_rate: 0.05,
        })?;
        app.sim.sim.set_rates(
            RatesKey::Subject(format!("Lost {lost}")),
            DeliveryRates {
                bounce_rate: 1.0,
                ..DeliveryRates::default()
            },
        )?;
        webhooks_on(&app).await?;

        // The watch starts before anything happens.
        let mut watch = app
            .analytics()
            .await?
            .watch_engagement(pb::WatchEngagementRequest {
                assignment_id: "asg-analytics".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        // Nothing yet: a period with no data.
        let empty = app
            .analytics()
            .await?
            .list_assignment_performance(pb::ListAssignmentPerformanceRequest {
                start_time: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                end_time: Some(prost_types::Timestamp {
                    seconds: 86_400 * 300,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(empty.assignments.is_empty(), "{empty:?}");

        let (send_id, triggers) =
            send(&app, "asg-analytics", "Growth", &[a, b], &["growth"]).await?;
        app.sim.sim.advance(Duration::from_secs(2 * 86_400));
        settle_webhooks(&app).await?;
        let (lost_send, lost_triggers) =
            send(&app, "asg-lost", "Lost", &[lost], &["growth"]).await?;
        app.sim.sim.advance(Duration::from_secs(86_400));
        settle_webhooks(&app).await?;

        // ----- GetAssignmentAnalytics against the ledger -----
        let got = analytics_of(&app, "asg-analytics").await?;
        ensure!(got.source == pb::AnalyticsSource::DeliveryEvents as i32);
        ensure!(got.segments.len() == 2, "{:?}", got.segments);
        let mut all_truth: BTreeMap<String, Truth> = BTreeMap::new();
        for (segment, trigger) in &triggers {
            let truth = ledger(&app, *trigger)?;
            ensure!(!truth.is_empty(), "no deliveries of trigger {trigger}");
            let g = got
                .segments
                .iter()
                .find(|g| g.segment_id == *segment)
                .with_context(|| format!("segment {segment} missing"))?;
            ensure!(g.send_id == send_id);
            ensure!(g.source == pb::AnalyticsSource::DeliveryEvents as i32);
            let rows: Vec<&Truth> = truth.values().collect();
            let want = ledger_counts(&rows, i64::MIN, i64::MAX);
            let counts = g.counts.context("counts")?;
            ensure!(
                counts == want,
                "segment {segment}: {counts:?} vs ledger {want:?}"
            );
            ensure!(want.human_clicks > 0 && want.bounced > 0, "{want:?}");
            let r = g.rates.context("rates")?;
            ensure!(r.open_rate == rate(want.human_opens, want.delivered));
            ensure!(r.click_to_open_rate == rate(want.human_clicks, want.human_opens));
            ensure!(r.bounce_rate == rate(want.bounced, want.recipients));
            let people: BTreeSet<&str> = rows
                .iter()
                .filter(|t| t.open.is_some())
                .map(|t| t.person.as_str())
                .collect();
            ensure!(g.engaged_people == people.len() as i64);
            // Every bucket against the ledger; together they hold every count.
            let mut summed = pb::DeliveryCounts::default();
            let tz = sharpsend_core::metrics::metrics_zone(&app.ctx);
            for bucket in &g.series {
                let start = ts_secs(&bucket.start).context("start")?;
                let at = DateTime::from_timestamp(start, 0).context("start")?;
                let res = if bucket.size_seconds == 3600 {
                    Resolution::Hours
                } else {
                    Resolution::Days
                };
                // Local hours and days of the workspace's reporting time zone (New York).
                ensure!(
                    zoned::floor(tz, res, at) == at
                        && zoned::next(tz, res, at) == at + TimeDelta::seconds(bucket.size_seconds),
                    "bucket {at} of {}s is not a local {res:?} of {tz}",
                    bucket.size_seconds
                );
                let want = ledger_counts(&rows, start, start + bucket.size_seconds);
                let c = bucket.counts.context("bucket counts")?;
                ensure!(
                    c == want,
                    "bucket {start}+{}: {c:?} vs {want:?}; ledger sent {:?}..{:?}",
                    bucket.size_seconds,
                    rows.iter().map(|t| t.sent).min(),
                    rows.iter().map(|t| t.sent).max()
                );
                summed.recipients += c.recipients;
                summed.human_clicks += c.human_clicks;
                summed.delivered += c.delivered;
            }
            ensure!(summed.recipients == counts.recipients);
            ensure!(summed.human_clicks == counts.human_clicks);
            ensure!(summed.delivered == counts.delivered);
            all_truth.extend(truth);
        }
        let total = got.counts.context("counts")?;
        let all: Vec<&Truth> = all_truth.values().collect();
        ensure!(total == ledger_counts(&all, i64::MIN, i64::MAX));
        // The other assignment bounced everything: no delivered, so no open rate (not 0), and
        // its bounce rate stands out against this workspace's baseline.
        let lost_got = analytics_of(&app, "asg-lost").await?;
        let lost_counts = lost_got.counts.context("counts")?;
        ensure!(lost_counts.delivered == 0 && lost_counts.bounced == lost_counts.recipients);
        let lost_rates = lost_got.rates.context("rates")?;
        ensure!(lost_rates.open_rate.is_none() && lost_rates.click_to_open_rate.is_none());
        ensure!(lost_rates.bounce_rate == Some(1.0));
        let d = lost_got.deliverability.context("deliverability")?;
        ensure!(d.baseline_recipients == total.recipients, "{d:?}");
        ensure!(d.bounce == pb::DeliverabilityFlag::High as i32, "{d:?}");
        ensure!(
            d.unsubscribe == pb::DeliverabilityFlag::Unknown as i32,
            "{d:?}"
        );
        ensure!(lost_got.segments[0].send_id == lost_send);
        let lost_truth = ledger(&app, lost_triggers[0].1)?;

        // ----- ExportReport: every row against the ledger -----
        let (csv, chunks) = export(
            &app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::Csv as i32,
                assignment_id: "asg-analytics".into(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(chunks >= 1);
        let mut lines = csv.split("\r\n").filter(|l| !l.is_empty());
        ensure!(
            lines.next()
                == Some(
                    "assignment_id,send_id,segment_id,delivery_id,customer_id,sent_at,\
                     delivered_at,human_opened_at,human_clicked_at,bounced_at,spam_reported_at,\
                     unsubscribed_at,converted_at,source,variant"
                )
        );
        let segment_of_trigger: BTreeMap<String, i64> = triggers
            .iter()
            .map(|(s, t)| {
                Ok(ledger(&app, *t)?
                    .into_keys()
                    .map(|d| (d, *s))
                    .collect::<Vec<_>>())
            })
            .collect::<anyhow::Result<Vec<_>>>()?
            .into_iter()
            .flatten()
            .collect();
        let iso = |t: Option<i64>| {
            t.and_then(|s| DateTime::from_timestamp(s, 0))
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        let mut rows = 0;
        for line in lines {
            let cols: Vec<&str> = line.split(',').collect();
            ensure!(cols.len() == 15, "{line}");
            let t = all_truth
                .get(cols[3])
                .with_context(|| format!("unknown row {line}"))?;
            let want = [
                "asg-analytics".to_string(),
                send_id.clone(),
                segment_of_trigger[cols[3]].to_string(),
                cols[3].to_string(),
                t.person.clone(),
                iso(Some(t.sent)),
                iso(t.delivered),
                iso(t.open),
                iso(t.click),
                iso(t.bounced),
                iso(t.spammed),
                iso(t.unsubscribed),
                iso(t.converted),
                "webhook".to_string(),
                // Not an A/B test's send: no variant.
                String::new(),
            ];
            ensure!(cols == want, "row {line} vs ledger {want:?}");
            rows += 1;
        }
        ensure!(
            rows == all_truth.len(),
            "{rows} rows for {} deliveries",
            all_truth.len()
        );
        // JSON lines of one segment: the same rows, that segment only.
        let (jsonl, _) = export(
            &app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::JsonLines as i32,
                segment_id: a,
                ..Default::default()
            },
        )
        .await?;
        let ids: BTreeSet<String> = jsonl
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l)?;
                ensure!(v["segment_id"] == a, "{v}");
                Ok(v["delivery_id"].as_str().unwrap_or_default().to_string())
            })
            .collect::<anyhow::Result<_>>()?;
        let want: BTreeSet<String> =
            ledger(&app, triggers.iter().find(|t| t.0 == a).context("a")?.1)?
                .into_keys()
                .collect();
        ensure!(
            ids == want,
            "JSON lines of segment {a} differ from the ledger"
        );

        // ----- ListAssignmentPerformance -----
        let listed = performance(
            &app,
            pb::ListAssignmentPerformanceRequest {
                rank_by: pb::RankBy::BounceRate as i32,
                page_size: 1,
                ..Default::default()
            },
        )
        .await?;
        ensure!(listed.assignments.len() == 1 && !listed.next_page_token.is_empty());
        ensure!(
            listed.assignments[0].assignment_id == "asg-lost",
            "{listed:?}"
        );
        ensure!(listed.assignments[0].rank == 1);
        ensure!(listed.assignments[0].content_types == ["growth"]);
        let second = performance(
            &app,
            pb::ListAssignmentPerformanceRequest {
                rank_by: pb::RankBy::BounceRate as i32,
                page_size: 1,
                page_token: listed.next_page_token.clone(),
                ..Default::default()
            },
        )
        .await?;
        ensure!(second.assignments.len() == 1 && second.next_page_token.is_empty());
        ensure!(second.assignments[0].assignment_id == "asg-analytics");
        ensure!(second.assignments[0].counts.as_ref() == Some(&total));
        // Filters: a target segment (its deliveries only), a content type (case-insensitive);
        // the default rank (click rate) puts the one without deliveries delivered last.
        let list = |segment_id: i64, content_type: &str| {
            let request = pb::ListAssignmentPerformanceRequest {
                segment_id,
                content_type: content_type.to_string(),
                ..Default::default()
            };
            let app = &app;
            async move { anyhow::Ok(performance(app, request).await?.assignments) }
        };
        let of_a = list(a, "").await?;
        ensure!(
            of_a.len() == 1 && of_a[0].assignment_id == "asg-analytics",
            "{of_a:?}"
        );
        let a_truth = ledger(&app, triggers.iter().find(|t| t.0 == a).context("a")?.1)?;
        ensure!(
            of_a[0].counts
                == Some(ledger_counts(
                    &a_truth.values().collect::<Vec<_>>(),
                    i64::MIN,
                    i64::MAX
                )),
            "segment {a}'s figures only: {of_a:?}"
        );
        let of_lost = list(lost, "").await?;
        ensure!(of_lost.len() == 1 && of_lost[0].assignment_id == "asg-lost");
        let growth = list(0, "GROWTH").await?;
        ensure!(
            growth
                .iter()
                .map(|p| p.assignment_id.as_str())
                .collect::<Vec<_>>()
                == ["asg-analytics", "asg-lost"],
            "{growth:?}"
        );
        ensure!(list(0, "crypto").await?.is_empty());

        // ----- GetProfile: one person's history -----
        let (delivery, t) = all_truth
            .iter()
            .find(|(_, t)| t.click.is_some())
            .context("nobody clicked")?;
        let profile = app
            .profiles()
            .await?
            .get_profile(pb::GetProfileRequest {
                customer: Some(pb::CustomerRef {
                    identifier: Some(pb::customer_ref::Identifier::Id(t.person.clone())),
                }),
                fresh: true,
                cio_messages_limit: 5,
                cio_activities_limit: 5,
                cio_activities_type: "delivered_email".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        let history = profile.history.context("no history")?;
        let mine = history
            .deliveries
            .iter()
            .find(|d| d.delivery_id == *delivery)
            .with_context(|| format!("{delivery} not in {history:?}"))?;
        ensure!(mine.assignment_id == "asg-analytics");
        ensure!(ts_secs(&mine.human_clicked_at) == t.click);
        ensure!(ts_secs(&mine.human_opened_at) == t.open);
        ensure!(ts_secs(&mine.delivered_at) == t.delivered);
        ensure!(
            history.cio_messages.iter().any(|m| m.id == *delivery),
            "Customer.io's messages lack {delivery}: {:?}",
            history.cio_messages
        );
        ensure!(
            history
                .cio_activities
                .iter()
                .all(|a| a.r#type == "delivered_email"),
            "{:?}",
            history.cio_activities
        );
        // Paging: one delivery per page walks the same deliveries, newest first, no repeats.
        let mut token = String::new();
        let mut walked = Vec::new();
        loop {
            let page = app
                .profiles()
                .await?
                .get_profile(pb::GetProfileRequest {
                    customer: Some(pb::CustomerRef {
                        identifier: Some(pb::customer_ref::Identifier::Id(t.person.clone())),
                    }),
                    history_page_size: 1,
                    history_page_token: token.clone(),
                    ..Default::default()
                })
                .await?
                .into_inner()
                .history
                .context("history")?;
            walked.extend(page.deliveries.into_iter().map(|d| d.delivery_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        ensure!(
            walked
                == history
                    .deliveries
                    .iter()
                    .map(|d| d.delivery_id.clone())
                    .collect::<Vec<_>>(),
            "{walked:?}"
        );
        ensure!(lost_truth.values().all(|t| t.bounced.is_some()));

        // ----- WatchEngagement: every event of the assignment, once, in order -----
        let stored = sharpsend_db::engagement::events_after(
            &app.ctx.db,
            app.ctx.workspace_id(),
            0,
            Some("asg-analytics"),
            1_000_000,
        )
        .await?;
        let mut seen = Vec::new();
        while seen.len() < stored.len() {
            let message = tokio::time::timeout(Duration::from_secs(20), watch.message())
                .await
                .context("watch stalled")??
                .context("watch ended")?;
            seen.extend(message.events);
        }
        ensure!(
            seen.iter().map(|e| e.id).collect::<Vec<_>>()
                == stored.iter().map(|e| e.id).collect::<Vec<_>>(),
            "watched {} of {} events",
            seen.len(),
            stored.len()
        );
        ensure!(seen.iter().all(|e| e.assignment_id == "asg-analytics"));
        // Resuming from a cursor gives the rest.
        let cursor = stored[stored.len() / 2].id;
        let mut resumed = app
            .analytics()
            .await?
            .watch_engagement(pb::WatchEngagementRequest {
                assignment_id: "asg-analytics".into(),
                after_event_id: cursor,
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut rest = Vec::new();
        while rest.len() < stored.len() - stored.len() / 2 - 1 {
            let message = tokio::time::timeout(Duration::from_secs(20), resumed.message())
                .await
                .context("resumed watch stalled")??
                .context("watch ended")?;
            rest.extend(message.events.into_iter().map(|e| e.id));
        }
        ensure!(rest.first() == Some(&stored[stored.len() / 2 + 1].id));
        ensure!(rest.len() == stored.len() - stored.len() / 2 - 1);
        drop(resumed);

        // ----- The quarantine, for operators -----
        let quarantined = app
            .analytics()
            .await?
            .list_quarantined_webhooks(pb::ListQuarantinedWebhooksRequest::default())
            .await?
            .into_inner();
        ensure!(quarantined.webhooks.is_empty(), "{quarantined:?}");
        // The first watch is still open: shutting down ends it instead of waiting on it.
        tokio::time::timeout(Duration::from_secs(30), app.stop())
            .await
            .context("shutdown waited on an open watch")??;
        ensure!(
            tokio::time::timeout(Duration::from_secs(5), watch.message())
                .await
                .is_ok_and(|m| !matches!(m, Ok(Some(_)))),
            "the watch went on after shutdown"
        );
        Ok(())
    }
);

db_test!(
    quarantined_bodies_are_listed_with_their_reason_paged,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        for i in 0..3 {
            sharpsend_db::engagement::quarantine(
                &app.ctx.db,
                app.ctx.workspace_id(),
                &format!("unknown metric teleported-{i}"),
                &format!("{{\"n\":{i}}}"),
                app.ctx.now(),
            )
            .await?;
        }
        let mut client = app.analytics().await?;
        let first = client
            .list_quarantined_webhooks(pb::ListQuarantinedWebhooksRequest {
                page_size: 2,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(first.webhooks.len() == 2 && !first.next_page_token.is_empty());
        ensure!(first.webhooks[0].reason == "unknown metric teleported-0");
        ensure!(first.webhooks[1].body == "{\"n\":1}");
        let rest = client
            .list_quarantined_webhooks(pb::ListQuarantinedWebhooksRequest {
                page_size: 2,
                page_token: first.next_page_token,
            })
            .await?
            .into_inner();
        ensure!(rest.webhooks.len() == 1 && rest.next_page_token.is_empty());
        ensure!(rest.webhooks[0].reason == "unknown metric teleported-2");
        app.stop().await
    }
);

db_test!(
    suggest_segments_ranks_the_segment_that_clicked_crypto_three_times_as_often_first,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let keen = segment_of(&app, "Crypto keen", 0, 60).await?;
        let mild = segment_of(&app, "Crypto mild", 60, 120).await?;
        app.sync_segments().await?;
        let mut client = app.analytics().await?;
        // No history at all: nothing is ranked, each segment says so.
        let none = client
            .suggest_segments(pb::SuggestSegmentsRequest {
                content_types: vec!["crypto".into()],
                title: "Q4 Crypto Outlook".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(!none.segments.is_empty());
        ensure!(
            none.segments
                .iter()
                .all(|s| !s.enough_history && s.rank == 0 && s.reason.starts_with("no history")),
            "{none:?}"
        );

        let rates = |click_rate: f64| DeliveryRates {
            bounce_rate: 0.0,
            open_rate: 0.9,
            machine_open_rate: 0.0,
            click_rate,
            machine_click_rate: 0.0,
            conversion_rate: 0.0,
            spam_rate: 0.0,
            unsubscribe_rate: 0.0,
        };
        // Unrelated content the mild segment loved, sent before webhooks are on: not similar,
        // must not count; without events its figures come from Customer.io's polled metrics.
        app.sim
            .sim
            .set_rates(RatesKey::Subject(format!("Garden {mild}")), rates(1.0))?;
        send(&app, "asg-garden", "Garden", &[mild], &["gardening"]).await?;
        let polled = analytics_of(&app, "asg-garden").await?;
        ensure!(
            polled.source == pb::AnalyticsSource::PolledMetrics as i32
                && polled.segments.len() == 1
                && polled.segments[0].segment_id == 0
                && polled.segments[0].as_of.is_some(),
            "{polled:?}"
        );
        // Webhooks carry the trigger of each delivery (the poll path cannot tell the triggers of
        // one broadcast apart).
        webhooks_on(&app).await?;
        for (n, subject) in ["Crypto one", "Crypto two"].iter().enumerate() {
            app.sim
                .sim
                .set_rates(RatesKey::Subject(format!("{subject} {keen}")), rates(0.6))?;
            app.sim
                .sim
                .set_rates(RatesKey::Subject(format!("{subject} {mild}")), rates(0.2))?;
            send(
                &app,
                &format!("asg-crypto-{n}"),
                subject,
                &[keen, mild],
                &["crypto", "markets"],
            )
            .await?;
        }
        app.sim.sim.advance(Duration::from_secs(3 * 86_400));
        settle_webhooks(&app).await?;
        let got = client
            .suggest_segments(pb::SuggestSegmentsRequest {
                content_types: vec!["Crypto".into()],
                title: "Q4 Crypto Outlook".into(),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(got.similar_assignments == 2, "{got:?}");
        let first = &got.segments[0];
        let second = &got.segments[1];
        ensure!(first.segment_id == keen && first.rank == 1, "{got:?}");
        ensure!(second.segment_id == mild && second.rank == 2, "{got:?}");
        ensure!(first.enough_history && first.history_assignments == 2);
        ensure!(
            first.expected_click_rate > 2.0 * second.expected_click_rate,
            "{got:?}"
        );
        ensure!(
            first.click_rate_low <= first.expected_click_rate
                && first.expected_click_rate <= first.click_rate_high
        );
        ensure!(first.click_rate_low > second.click_rate_high, "{got:?}");
        ensure!(
            got.segments[2..]
                .iter()
                .all(|s| !s.enough_history && s.rank == 0)
        );
        // The figures are the delivery events' own.
        let keen_facts = analytics_of(&app, "asg-crypto-0").await?;
        ensure!(keen_facts.source == pb::AnalyticsSource::DeliveryEvents as i32);
        if got.segments.is_empty() {
            bail!("no segments");
        }
        app.stop().await
    }
);

/// Runs a three-variant A/B test (`request_id`, 60% of `audience` tested) to its end: the
/// variants' triggers, `urgent` declared the winner, the remainder's trigger. Answers the
/// test's id and its assignment id.
async fn three_variants_to_the_remainder(
    app: &TestApp,
    request_id: &str,
    audience: i64,
) -> anyhow::Result<(String, String)> {
    use crate::abtests;
    let (id, assignment) = abtests::start_three_variants(app, request_id, audience, 0.6).await?;
    abtests::drive(app, &app.ctx, &id, abtests::variants_sent).await?;
    abtests::settle_triggers(app, &app.ctx, 3).await?;
    app.abtests()
        .await?
        .declare_winner(pb::DeclareWinnerRequest {
            id: id.clone(),
            variant: "urgent".into(),
            reason: "e2e".into(),
        })
        .await?;
    abtests::drive(app, &app.ctx, &id, abtests::remainder_sent).await?;
    abtests::settle_triggers(app, &app.ctx, 4).await?;
    Ok((id, assignment))
}

db_test!(
    ab_test_variants_from_the_delivery_poll_alone_are_their_own_sends,
    |db: TestDatabase| async move {
        // No reporting webhooks: every figure comes from `delivery-poll`, whose messages carry
        // no trigger id. The arms of one test go through ONE broadcast, their triggers seconds
        // apart: each delivery must still land on its own arm's send.
        use crate::abtests;
        let app = TestApp::spawn(&db).await?;
        let audience = abtests::audience(&app, 400).await?;
        let (id, assignment) = three_variants_to_the_remainder(&app, "polled", audience).await?;
        app.advance(Duration::from_secs(86_400));
        app.run_job(Job::DeliveryPoll).await?;

        let got = analytics_of(&app, &assignment).await?;
        ensure!(got.tests.len() == 1, "{:?}", got.tests);
        let test = &got.tests[0];
        ensure!(test.variants.len() == 4, "{test:?}");
        // delivery id -> the arm whose trigger sent it (the simulator's ledger)
        let mut want: BTreeMap<String, String> = BTreeMap::new();
        for v in &test.variants {
            let trigger = abtests::trigger_of(&app, &v.send_id).await?;
            let sent = app.sim.sim.deliveries(&DeliveryFilter::trigger(trigger));
            ensure!(!sent.is_empty(), "{} reached nobody", v.name);
            let has = |d: &SimDelivery, m: DeliveryMetric| d.events.contains_key(&m);
            let counts = v.counts.context("counts")?;
            let (delivered, bounced) = (
                sent.iter()
                    .filter(|d| has(d, DeliveryMetric::Delivered))
                    .count() as i64,
                sent.iter()
                    .filter(|d| has(d, DeliveryMetric::Bounced))
                    .count() as i64,
            );
            ensure!(
                (counts.recipients, counts.delivered, counts.bounced)
                    == (sent.len() as i64, delivered, bounced),
                "{}: recipients/delivered/bounced {:?} vs the ledger's {:?}",
                v.name,
                (counts.recipients, counts.delivered, counts.bounced),
                (sent.len(), delivered, bounced)
            );
            ensure!(v.source == pb::AnalyticsSource::DeliveryEvents as i32);
            for d in sent {
                want.insert(d.delivery_id.clone(), v.name.clone());
            }
        }
        // The report of the test says the same, delivery by delivery.
        let (jsonl, _) = export(
            &app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::JsonLines as i32,
                test_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
        let mut have: BTreeMap<String, String> = BTreeMap::new();
        for l in jsonl.lines() {
            let v: Value = serde_json::from_str(l)?;
            ensure!(v["source"] == "poll", "{l}");
            have.insert(
                v["delivery_id"].as_str().unwrap_or_default().to_string(),
                v["variant"].as_str().unwrap_or_default().to_string(),
            );
        }
        let wrong = want
            .iter()
            .filter(|(d, v)| have.get(*d) != Some(*v))
            .count();
        ensure!(
            have.len() == want.len() && wrong == 0,
            "{wrong} of {} deliveries on another arm's send ({} rows)",
            want.len(),
            have.len()
        );
        app.stop().await
    }
);

db_test!(
    ab_test_variants_figures_and_test_reports_match_the_simulators_ledger,
    |db: TestDatabase| async move {
        use crate::abtests;
        let app = TestApp::spawn(&db).await?;
        let audience = abtests::audience(&app, 400).await?;
        webhooks_on(&app).await?;
        let (id, assignment) = three_variants_to_the_remainder(&app, "analytics", audience).await?;
        app.sim.sim.advance(Duration::from_secs(86_400));
        settle_webhooks(&app).await?;

        // ----- GetAssignmentAnalytics: the test, each arm against its trigger's ledger -----
        let got = analytics_of(&app, &assignment).await?;
        ensure!(got.tests.len() == 1, "{:?}", got.tests);
        let test = &got.tests[0];
        ensure!(test.test_id == id && test.state == pb::TestState::Decided as i32);
        ensure!(test.winner == "urgent", "{test:?}");
        let names: Vec<&str> = test.variants.iter().map(|v| v.name.as_str()).collect();
        ensure!(
            names == ["control", "teaser", "urgent", "remainder"],
            "{names:?}"
        );
        ensure!(test.variants.iter().filter(|v| v.remainder).count() == 1);
        // delivery id -> (variant, truth)
        let mut arm_of: BTreeMap<String, (String, Truth)> = BTreeMap::new();
        let mut clicks = 0;
        for v in &test.variants {
            let trigger = abtests::trigger_of(&app, &v.send_id).await?;
            let truth = ledger(&app, trigger)?;
            ensure!(!truth.is_empty(), "{} reached nobody", v.name);
            let rows: Vec<&Truth> = truth.values().collect();
            let want = ledger_counts(&rows, i64::MIN, i64::MAX);
            let counts = v.counts.context("counts")?;
            ensure!(counts == want, "{}: {counts:?} vs ledger {want:?}", v.name);
            clicks += want.human_clicks;
            let r = v.rates.context("rates")?;
            ensure!(r.click_rate == rate(want.human_clicks, want.delivered));
            ensure!(r.click_to_open_rate == rate(want.human_clicks, want.human_opens));
            ensure!(v.source == pb::AnalyticsSource::DeliveryEvents as i32);
            ensure!(v.as_of.is_some() && v.segment_id > 0);
            let people: BTreeSet<&str> = rows
                .iter()
                .filter(|t| t.open.is_some())
                .map(|t| t.person.as_str())
                .collect();
            ensure!(v.engaged_people == people.len() as i64, "{v:?}");
            // The arm is its send to its own segment among the assignment's segments.
            let g = got
                .segments
                .iter()
                .find(|g| g.send_id == v.send_id)
                .with_context(|| format!("{} not among the segments", v.name))?;
            ensure!(g.segment_id == v.segment_id && g.counts == v.counts);
            for (delivery, t) in truth {
                arm_of.insert(delivery, (v.name.clone(), t));
            }
        }
        ensure!(clicks > 0, "nobody clicked");
        ensure!(got.counts.context("total")?.recipients == arm_of.len() as i64);

        // ----- ExportReport of the test: every row, with its variant -----
        let iso = |t: Option<i64>| {
            t.and_then(|s| DateTime::from_timestamp(s, 0))
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default()
        };
        let (csv, _) = export(
            &app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::Csv as i32,
                test_id: id.clone(),
                ..Default::default()
            },
        )
        .await?;
        let mut lines = csv.split("\r\n").filter(|l| !l.is_empty());
        ensure!(
            lines
                .next()
                .is_some_and(|h| h.ends_with(",converted_at,source,variant")),
            "{csv:.300}"
        );
        let mut rows = 0;
        for line in lines {
            let cols: Vec<&str> = line.split(',').collect();
            ensure!(cols.len() == 15, "{line}");
            let (variant, t) = arm_of
                .get(cols[3])
                .with_context(|| format!("row of no arm: {line}"))?;
            let send = &test
                .variants
                .iter()
                .find(|v| v.name == *variant)
                .context("arm")?
                .send_id;
            let want = [
                assignment.as_str(),
                send,
                cols[3],
                &t.person,
                &iso(Some(t.sent)),
                &iso(t.delivered),
                &iso(t.open),
                &iso(t.click),
                "webhook",
                variant,
            ];
            let have = [
                cols[0], cols[1], cols[3], cols[4], cols[5], cols[6], cols[7], cols[8], cols[13],
                cols[14],
            ];
            ensure!(have == want, "row {line} vs ledger {want:?}");
            rows += 1;
        }
        ensure!(rows == arm_of.len(), "{rows} rows for {}", arm_of.len());
        // JSON lines of the test and a period: the same deliveries when the period holds them,
        // none when it does not.
        let now = Utc::now().timestamp();
        let period = |from: i64, to: i64| pb::ExportReportRequest {
            format: pb::ReportFormat::JsonLines as i32,
            test_id: id.clone(),
            start_time: Some(prost_types::Timestamp {
                seconds: from,
                nanos: 0,
            }),
            end_time: Some(prost_types::Timestamp {
                seconds: to,
                nanos: 0,
            }),
            ..Default::default()
        };
        let (jsonl, _) = export(&app, period(now - 100 * 86_400, now + 100 * 86_400)).await?;
        let mut variants: BTreeMap<String, String> = BTreeMap::new();
        for l in jsonl.lines() {
            let v: Value = serde_json::from_str(l)?;
            variants.insert(
                v["delivery_id"].as_str().unwrap_or_default().to_string(),
                v["variant"].as_str().unwrap_or_default().to_string(),
            );
        }
        let want: BTreeMap<String, String> = arm_of
            .iter()
            .map(|(d, (v, _))| (d.clone(), v.clone()))
            .collect();
        ensure!(variants == want, "JSON lines of the test differ");
        let (none, _) = export(&app, period(now + 100 * 86_400, now + 101 * 86_400)).await?;
        ensure!(none.is_empty(), "{none:.200}");
        let mut bad = app.analytics().await?;

        // ----- A malformed, an unknown and another workspace's test -----
        let malformed = bad
            .export_report(pb::ExportReportRequest {
                format: pb::ReportFormat::Csv as i32,
                test_id: " abt_x".into(),
                ..Default::default()
            })
            .await
            .expect_err("malformed");
        ensure!(
            malformed.code() == tonic::Code::InvalidArgument,
            "{malformed:?}"
        );
        ensure!(
            sharpsend_tests::bad_request_fields(&malformed) == ["test_id"],
            "{malformed:?}"
        );
        let other = sharpsend_db::workspaces::ensure(&app.ctx.db, "another-site", "us").await?;
        let foreign = sharpsend_db::abtests::create(
            &app.ctx.db,
            other.id,
            &sharpsend_db::abtests::NewTest {
                public_id: "abt_foreign".into(),
                request_id: "foreign".into(),
                assignment_id: assignment.clone(),
                title: "another publisher's".into(),
                spec: serde_json::json!({}),
                planned_per_variant: 0,
                audience_estimate: 0,
                warnings: serde_json::json!([]),
                created_by: "e2e".into(),
            },
            app.ctx.now(),
        )
        .await?;
        ensure!(matches!(foreign, sharpsend_db::abtests::Created::New(_)));
        for unknown in ["abt_foreign", "abt_01NOSUCHTEST"] {
            let status = bad
                .export_report(pb::ExportReportRequest {
                    format: pb::ReportFormat::Csv as i32,
                    test_id: unknown.into(),
                    ..Default::default()
                })
                .await
                .expect_err("unknown");
            ensure!(
                status.code() == tonic::Code::NotFound,
                "{unknown}: {status:?}"
            );
        }
        // Another workspace's test of the same assignment id is not this assignment's.
        ensure!(analytics_of(&app, &assignment).await?.tests.len() == 1);
        app.stop().await
    }
);

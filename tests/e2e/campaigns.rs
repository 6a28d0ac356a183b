//! CampaignService reads end to end: the campaign mirror (`campaign-sync`, ListCampaigns,
//! GetCampaign) and metrics (`metrics-poll`, GetCampaignMetrics) against the simulator's
//! delivery ledger, with the App API's 10 requests/s shared by every job.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, TimeDelta, Utc};
use cio_client::{
    CioClient, ClientConfig, Credentials, MetricsOf, MetricsQuery, Recipients, Region, Resolution,
    Trigger,
};
use cio_sim::{
    AudienceFilter, DeliveryFilter, DeliveryMetric, DeliveryRates, Fault, MetricTotals,
    NewNewsletter, RatesKey, SimApi, SimConfig, Simulator,
};
use sharpsend_core::jobs::{Job, JobOutcome};
use sharpsend_core::metrics::{self, MetricsTarget, eastern};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    self as pb, CampaignKind, GetCampaignMetricsRequest, GetCampaignMetricsResponse,
    GetCampaignRequest, ListCampaignsRequest, get_campaign_metrics_request::Target,
};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

type Client = sharpsend_proto::v1::campaign_service_client::CampaignServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        sharpsend_tests::Bearer,
    >,
>;

/// Long enough for every drawn delivery event (human opens come within 7 days) to have happened.
const SETTLE: Duration = Duration::from_secs(8 * 24 * 3600);

/// Outcome rates that make every metric non-zero in a few hundred deliveries.
fn lively_rates() -> DeliveryRates {
    DeliveryRates {
        bounce_rate: 0.1,
        open_rate: 0.6,
        machine_open_rate: 0.2,
        click_rate: 0.5,
        machine_click_rate: 0.05,
        conversion_rate: 0.5,
        spam_rate: 0.02,
        unsubscribe_rate: 0.1,
    }
}

async fn list_all(
    client: &mut Client,
    mut request: ListCampaignsRequest,
) -> anyhow::Result<Vec<pb::Campaign>> {
    let mut all = Vec::new();
    loop {
        let page = client.list_campaigns(request.clone()).await?.into_inner();
        all.extend(page.campaigns);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        request.page_token = page.next_page_token;
    }
}

fn keys(campaigns: &[pb::Campaign]) -> Vec<(CampaignKind, i64)> {
    campaigns.iter().map(|c| (c.kind(), c.id)).collect()
}

async fn job_details(app: &TestApp, job: Job) -> anyhow::Result<serde_json::Value> {
    match app.run_job(job).await? {
        JobOutcome::Succeeded { details, .. } => Ok(details),
        JobOutcome::Skipped { .. } => bail!("{job} skipped"),
    }
}

async fn metrics_of(
    client: &mut Client,
    target: Target,
    refresh: bool,
) -> anyhow::Result<GetCampaignMetricsResponse> {
    Ok(client
        .get_campaign_metrics(GetCampaignMetricsRequest {
            target: Some(target),
            refresh,
        })
        .await?
        .into_inner())
}

/// Metrics requests the simulator has received, all routes together.
fn metrics_requests(app: &TestApp) -> u64 {
    app.sim
        .sim
        .request_counts_by_route()
        .iter()
        .filter(|(route, _)| route.ends_with("/metrics"))
        .map(|(_, n)| n)
        .sum()
}

/// Every metric the ledger counts equals the reported total, and the series sum to the totals.
fn ensure_matches_ledger(
    got: &GetCampaignMetricsResponse,
    ledger: &MetricTotals,
    what: &str,
) -> anyhow::Result<()> {
    for metric in DeliveryMetric::ALL {
        let reported = got.totals.get(metric.as_str()).copied().unwrap_or(-1);
        ensure!(
            reported == ledger.get(metric) as i64,
            "{what}: {} reported {reported}, ledger {}\n{:?}",
            metric.as_str(),
            ledger.get(metric),
            got.totals
        );
    }
    for series in &got.series {
        let sum: i64 = series.values.iter().sum();
        ensure!(
            got.totals.get(&series.metric) == Some(&sum),
            "{what}: {} series sums to {sum}",
            series.metric
        );
    }
    let lengths: Vec<usize> = got.series.iter().map(|s| s.values.len()).collect();
    ensure!(
        lengths.windows(2).all(|w| w[0] == w[1]) && lengths.first().is_some_and(|n| *n > 0),
        "{what}: series lengths {lengths:?}"
    );
    Ok(())
}

fn ensure_rates(got: &GetCampaignMetricsResponse, ledger: &MetricTotals) -> anyhow::Result<()> {
    let rates = got.rates.context("no rates")?;
    let ratio = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    let want = [
        (
            "delivery",
            rates.delivery_rate,
            ratio(ledger.delivered, ledger.sent),
        ),
        (
            "open",
            rates.open_rate,
            ratio(ledger.opened, ledger.delivered),
        ),
        (
            "click",
            rates.click_rate,
            ratio(ledger.clicked, ledger.delivered),
        ),
        (
            "click-to-open",
            rates.click_to_open_rate,
            ratio(ledger.clicked, ledger.opened),
        ),
        (
            "bounce",
            rates.bounce_rate,
            ratio(ledger.bounced, ledger.sent),
        ),
        (
            "unsubscribe",
            rates.unsubscribe_rate,
            ratio(ledger.unsubscribed, ledger.delivered),
        ),
        (
            "conversion",
            rates.conversion_rate,
            ratio(ledger.converted, ledger.delivered),
        ),
    ];
    for (name, got, want) in want {
        ensure!((got - want).abs() < 1e-12, "{name} rate {got}, want {want}");
        ensure!(
            got > 0.0 && got < 1.0,
            "{name} rate {got} should be strictly between 0 and 1 here"
        );
    }
    Ok(())
}

fn timestamp_of(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: 0,
    }
}

db_test!(
    campaign_sync_mirrors_all_three_kinds_for_list_and_get,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        let details = job_details(&app, Job::CampaignSync).await?;
        ensure!(
            details["created"] == 7 && details["removed"] == 0,
            "{details}"
        );
        ensure!(
            details["campaigns"] == 2 && details["broadcasts"] == 3 && details["newsletters"] == 2,
            "{details}"
        );
        // Every item is a metrics target except the draft newsletter.
        ensure!(details["targets"]["added"] == 6, "{details}");

        let mut client = app.campaigns().await?;
        let all = list_all(&mut client, ListCampaignsRequest::default()).await?;
        use CampaignKind::{Broadcast, Campaign, Newsletter};
        ensure!(
            keys(&all)
                == [
                    (Campaign, 1),
                    (Campaign, 2),
                    (Broadcast, 3),
                    (Broadcast, 4),
                    (Broadcast, 5),
                    (Newsletter, 1),
                    (Newsletter, 2)
                ],
            "{:?}",
            keys(&all)
        );
        for c in sim.campaigns() {
            let kind = match c.kind {
                cio_sim::CampaignKind::Campaign => Campaign,
                cio_sim::CampaignKind::Broadcast => Broadcast,
            };
            let got = all
                .iter()
                .find(|m| m.kind() == kind && m.id == c.id)
                .with_context(|| format!("{kind:?} {}", c.id))?;
            let state = serde_json::to_value(c.state)?;
            ensure!(
                got.name == c.name && Some(got.state.as_str()) == state.as_str(),
                "{got:?} vs {c:?}"
            );
            ensure!(
                got.tags == c.tags && got.created_at == Some(timestamp_of(c.created_at)),
                "{got:?} vs {c:?}"
            );
            ensure!(got.synced_at.is_some() && got.sent_at.is_none());
        }
        let types: Vec<&str> = all
            .iter()
            .filter(|c| c.kind() == Campaign)
            .map(|c| c.r#type.as_str())
            .collect();
        ensure!(types == ["event", "segment"], "{types:?}");
        for n in sim.newsletters() {
            let got = all
                .iter()
                .find(|m| m.kind() == Newsletter && m.id == n.id)
                .context("newsletter")?;
            ensure!(
                got.name == n.name && got.tags == n.tags && got.r#type == "email",
                "{got:?}"
            );
            ensure!(
                got.sent_at == n.sent_at.map(timestamp_of),
                "{got:?} vs {n:?}"
            );
            ensure!(
                got.state == if n.sent_at.is_some() { "sent" } else { "draft" },
                "{got:?}"
            );
        }

        // Kind filter and paging (page tokens cross kinds).
        let broadcasts = list_all(
            &mut client,
            ListCampaignsRequest {
                kind: Broadcast as i32,
                ..Default::default()
            },
        )
        .await?;
        ensure!(keys(&broadcasts) == [(Broadcast, 3), (Broadcast, 4), (Broadcast, 5)]);
        let first = client
            .list_campaigns(ListCampaignsRequest {
                page_size: 3,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(first.campaigns.len() == 3 && !first.next_page_token.is_empty());
        let paged = list_all(
            &mut client,
            ListCampaignsRequest {
                page_size: 3,
                ..Default::default()
            },
        )
        .await?;
        ensure!(keys(&paged) == keys(&all));
        let last = client
            .list_campaigns(ListCampaignsRequest {
                page_size: 7,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            last.campaigns.len() == 7 && last.next_page_token.is_empty(),
            "exactly one page"
        );

        // Get: campaigns and broadcasts share ids, newsletters do not.
        let got = client
            .get_campaign(GetCampaignRequest {
                kind: Broadcast as i32,
                id: 4,
            })
            .await?
            .into_inner();
        ensure!(got.campaign.map(|c| c.name) == Some("Breaking Market News".to_string()));
        let got = client
            .get_campaign(GetCampaignRequest {
                kind: Newsletter as i32,
                id: 2,
            })
            .await?
            .into_inner();
        ensure!(got.campaign.map(|c| c.state) == Some("draft".to_string()));
        for (kind, id) in [(Campaign, 3), (Broadcast, 1), (Newsletter, 99)] {
            let status = client
                .get_campaign(GetCampaignRequest {
                    kind: kind as i32,
                    id,
                })
                .await
                .err()
                .context("found")?;
            ensure!(status.code() == Code::NotFound, "{kind:?} {id}: {status:?}");
        }

        // Bad input names the field.
        for (request, field) in [
            (GetCampaignRequest { kind: 0, id: 1 }, "kind"),
            (GetCampaignRequest { kind: 42, id: 1 }, "kind"),
            (
                GetCampaignRequest {
                    kind: Campaign as i32,
                    id: 0,
                },
                "id",
            ),
            (
                GetCampaignRequest {
                    kind: Campaign as i32,
                    id: -5,
                },
                "id",
            ),
        ] {
            let status = client
                .get_campaign(request)
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument && bad_request_fields(&status) == [field],
                "{status:?}"
            );
        }
        for (request, field) in [
            (
                ListCampaignsRequest {
                    page_token: "garbage".into(),
                    ..Default::default()
                },
                "page_token",
            ),
            (
                ListCampaignsRequest {
                    page_size: -1,
                    ..Default::default()
                },
                "page_size",
            ),
            (
                ListCampaignsRequest {
                    kind: 42,
                    ..Default::default()
                },
                "kind",
            ),
        ] {
            let status = client
                .list_campaigns(request)
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument && bad_request_fields(&status) == [field],
                "{status:?}"
            );
        }

        // A newsletter created since: one new item at the next sync, the rest unchanged.
        let id = sim.add_newsletter(NewNewsletter::new(
            "Flash Note",
            "Flash",
            "<p>x</p>",
            AudienceFilter::segment(4),
        ))?;
        let details = job_details(&app, Job::CampaignSync).await?;
        ensure!(
            details["created"] == 1 && details["unchanged"] == 7 && details["updated"] == 0,
            "{details}"
        );
        let got = client
            .get_campaign(GetCampaignRequest {
                kind: Newsletter as i32,
                id,
            })
            .await?
            .into_inner();
        ensure!(got.campaign.map(|c| c.name) == Some("Flash Note".to_string()));

        // One created after the sync is read from Customer.io once, then answered from the mirror.
        let id = sim.add_newsletter(NewNewsletter::new(
            "Late Note",
            "Late",
            "<p>y</p>",
            AudienceFilter::segment(4),
        ))?;
        let newsletter_reads = || {
            sim.requests()
                .iter()
                .filter(|r| r.path == format!("/v1/newsletters/{id}"))
                .count()
        };
        for _ in 0..2 {
            let got = client
                .get_campaign(GetCampaignRequest {
                    kind: Newsletter as i32,
                    id,
                })
                .await?
                .into_inner();
            ensure!(
                got.campaign.map(|c| (c.name, c.state))
                    == Some(("Late Note".to_string(), "draft".to_string()))
            );
        }
        ensure!(newsletter_reads() == 1, "read {} times", newsletter_reads());
        let listed = list_all(
            &mut client,
            ListCampaignsRequest {
                kind: Newsletter as i32,
                ..Default::default()
            },
        )
        .await?;
        ensure!(listed.iter().any(|c| c.id == id), "mirrored");
        app.stop().await
    }
);

db_test!(
    metrics_totals_equal_the_simulators_delivery_ledger,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        sim.set_trigger_interval(Duration::ZERO);
        let newsletter = sim.add_newsletter(NewNewsletter::new(
            "Q4 Outlook",
            "Your Q4 outlook",
            "<p>Q4</p>",
            AudienceFilter::segment(4),
        ))?;
        sim.set_rates(RatesKey::Newsletter(newsletter), lively_rates())?;
        sim.set_rates(RatesKey::Campaign(3), lively_rates())?;
        let sent = sim.send_newsletter(newsletter)?;
        ensure!(sent > 50, "only {sent} recipients");
        let trigger = Trigger {
            recipients: Recipients::Default,
            data: serde_json::Map::new(),
        };
        app.ctx.cio.trigger_broadcast(3, &trigger).await?;
        // Opens, clicks and conversions arrive over the following days.
        sim.advance(SETTLE);
        let newsletter_ledger = sim.delivery_totals(&DeliveryFilter::newsletter(newsletter));
        ensure!(
            newsletter_ledger
                == sim.eventual_delivery_totals(&DeliveryFilter::newsletter(newsletter)),
            "not settled"
        );
        ensure!(
            newsletter_ledger.sent == sent as u64
                && newsletter_ledger.opened > 0
                && newsletter_ledger.clicked > 0
        );
        job_details(&app, Job::CampaignSync).await?;

        let mut client = app.campaigns().await?;
        let before = metrics_requests(&app);
        let got = metrics_of(&mut client, Target::NewsletterId(newsletter), false).await?;
        ensure_matches_ledger(&got, &newsletter_ledger, "newsletter")?;
        ensure_rates(&got, &newsletter_ledger)?;
        ensure!(
            got.scope == format!("newsletter {newsletter}"),
            "{}",
            got.scope
        );
        // Sent 8 days ago: daily buckets from the day it was sent.
        ensure!(got.resolution == "days", "{}", got.resolution);
        let sent_at = sim
            .newsletter(newsletter)
            .and_then(|n| n.sent_at)
            .context("sent_at")?;
        let series_start = got.series_start.context("series_start")?;
        ensure!(
            series_start.seconds <= sent_at.timestamp()
                && sent_at.timestamp() - series_start.seconds < 86_400 + 3600
        );
        let polled_at = got.last_polled_at.context("last_polled_at")?;
        ensure!(
            (Utc::now().timestamp() - polled_at.seconds).abs() < 60,
            "{polled_at:?}"
        );
        ensure!(
            metrics_requests(&app) == before + 1,
            "never polled: polled once now"
        );

        // Answered from the snapshot: no request, same poll time.
        let again = metrics_of(&mut client, Target::NewsletterId(newsletter), false).await?;
        ensure!(again.last_polled_at == Some(polled_at) && again.totals == got.totals);
        ensure!(metrics_requests(&app) == before + 1, "a second read polled");

        // The broadcast (created long ago: weekly buckets) and the demo's welcome campaign.
        let broadcast_ledger = sim.delivery_totals(&DeliveryFilter::broadcast(3));
        ensure!(broadcast_ledger.sent > 50 && broadcast_ledger.clicked > 0);
        let got = metrics_of(&mut client, Target::BroadcastId(3), false).await?;
        ensure_matches_ledger(&got, &broadcast_ledger, "broadcast")?;
        ensure_rates(&got, &broadcast_ledger)?;
        ensure!(
            got.resolution == "weeks" && got.scope == "broadcast 3",
            "{} {}",
            got.resolution,
            got.scope
        );
        let campaign_ledger = sim.delivery_totals(&DeliveryFilter::campaign(1));
        let got = metrics_of(&mut client, Target::CampaignId(1), false).await?;
        ensure_matches_ledger(&got, &campaign_ledger, "campaign")?;
        ensure!(campaign_ledger.sent > 50, "{campaign_ledger:?}");

        // Another trigger: the snapshot is stale until a refresh polls again.
        let first_poll = metrics_of(&mut client, Target::BroadcastId(3), false)
            .await?
            .last_polled_at
            .context("polled")?;
        app.ctx.cio.trigger_broadcast(3, &trigger).await?;
        sim.advance(SETTLE);
        let ledger = sim.delivery_totals(&DeliveryFilter::broadcast(3));
        ensure!(ledger.sent > broadcast_ledger.sent);
        let stale = metrics_of(&mut client, Target::BroadcastId(3), false).await?;
        ensure!(stale.totals.get("sent") == Some(&(broadcast_ledger.sent as i64)));
        let fresh = metrics_of(&mut client, Target::BroadcastId(3), true).await?;
        ensure_matches_ledger(&fresh, &ledger, "refreshed broadcast")?;
        let refreshed_at = fresh.last_polled_at.context("polled")?;
        ensure!(
            (refreshed_at.seconds, refreshed_at.nanos) > (first_poll.seconds, first_poll.nanos)
        );
        app.stop().await
    }
);

db_test!(
    metrics_poll_job_polls_due_targets_and_leaves_the_rest,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        job_details(&app, Job::CampaignSync).await?;
        let before = metrics_requests(&app);
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(
            details["due"] == 6 && details["polled"] == 6 && details["failed"] == 0,
            "{details}"
        );
        ensure!(metrics_requests(&app) == before + 6);
        let routes = app.sim.sim.request_counts_by_route();
        for (route, n) in [
            ("GET /v1/campaigns/{campaign_id}/metrics", 2),
            ("GET /v1/broadcasts/{broadcast_id}/metrics", 3),
            ("GET /v1/newsletters/{newsletter_id}/metrics", 1),
        ] {
            ensure!(routes.get(route) == Some(&n), "{route}: {routes:?}");
        }

        // Reads answer from the job's snapshots.
        let mut client = app.campaigns().await?;
        let got = metrics_of(&mut client, Target::CampaignId(1), false).await?;
        let sent = app
            .sim
            .sim
            .delivery_totals(&cio_sim::DeliveryFilter::campaign(1))
            .sent as i64;
        ensure!(
            got.last_polled_at.is_some() && sent > 50 && got.totals.get("sent") == Some(&sent),
            "{:?}",
            got.totals
        );
        ensure!(metrics_requests(&app) == before + 6);

        // Nothing is due right after a sweep.
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(details["due"] == 0 && details["polled"] == 0, "{details}");
        ensure!(metrics_requests(&app) == before + 6);

        // A watched target (e.g. a newsletter a send just created) is due at the next run, alone.
        metrics::watch(&app.ctx, MetricsTarget::Newsletter(1), Utc::now()).await?;
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(details["due"] == 1 && details["polled"] == 1, "{details}");
        let routes = app.sim.sim.request_counts_by_route();
        ensure!(
            routes.get("GET /v1/newsletters/{newsletter_id}/metrics") == Some(&2),
            "{routes:?}"
        );
        ensure!(metrics_requests(&app) == before + 7);

        // A draft newsletter is not a target of the sync, but can be read (polled on demand).
        let draft = metrics_of(&mut client, Target::NewsletterId(2), false).await?;
        ensure!(
            draft.totals.values().all(|n| *n == 0) && draft.last_polled_at.is_some(),
            "{draft:?}"
        );
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(details["due"] == 0, "{details}");

        // Customer.io failing: recorded, retried at the next due time, the run itself succeeds.
        metrics::watch(&app.ctx, MetricsTarget::Broadcast(4), Utc::now()).await?;
        app.sim.sim.push_faults(
            Some(SimApi::App),
            (0..4).map(|_| cio_sim::Fault::Status {
                status: 500,
                retry_after_secs: None,
            }),
        );
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(
            details["failed"] == 1 && details["polled"] == 0,
            "{details}"
        );
        let target = sharpsend_db::metrics::get_target(
            &app.ctx.db,
            app.ctx.workspace_id(),
            sharpsend_db::campaigns::CampaignKind::Broadcast,
            4,
        )
        .await?
        .context("target")?;
        ensure!(
            target.failures == 1
                && target
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("500")),
            "{target:?}"
        );
        let retry_in = target.next_poll_at.context("next poll")? - Utc::now();
        ensure!(
            retry_in > TimeDelta::seconds(30) && retry_in <= TimeDelta::seconds(60),
            "{retry_in:?}"
        );
        app.stop().await
    }
);

db_test!(
    a_sweep_of_many_targets_paces_at_the_app_limit_without_429s,
    |db: TestDatabase| async move {
        const TARGETS: usize = 40;
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        sim.set_rate_limit(SimApi::App, 10);
        for i in 0..TARGETS {
            let id = sim.add_newsletter(NewNewsletter::new(
                &format!("Note {i}"),
                "Note",
                "<p>n</p>",
                AudienceFilter::segment(4),
            ))?;
            metrics::watch(&app.ctx, MetricsTarget::Newsletter(id), Utc::now()).await?;
        }
        sim.clear_requests();
        let started = std::time::Instant::now();
        // Another job of the workspace runs at the same time: they share the 10 requests/s.
        let (sweep, sync) =
            tokio::join!(app.run_job(Job::MetricsPoll), app.run_job(Job::SegmentSync));
        let elapsed = started.elapsed();
        let (JobOutcome::Succeeded { details, .. }, JobOutcome::Succeeded { .. }) = (sweep?, sync?)
        else {
            bail!("a job was skipped");
        };
        ensure!(
            details["polled"] == TARGETS && details["failed"] == 0 && details["deferred"] == 0,
            "{details}"
        );

        let requests: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.api == SimApi::App)
            .collect();
        let limited = requests.iter().filter(|r| r.status == 429).count();
        ensure!(limited == 0, "{limited} requests answered 429");
        ensure!(
            requests.len() > TARGETS,
            "the segment sync made no requests"
        );
        // Paced, not bursting: no second holds more than 10 (+1 for arrival jitter).
        let mut at: Vec<DateTime<Utc>> = requests.iter().map(|r| r.at).collect();
        at.sort();
        for (i, t) in at.iter().enumerate() {
            let in_second = at[i..]
                .iter()
                .take_while(|u| **u < *t + TimeDelta::seconds(1))
                .count();
            ensure!(
                in_second <= 11,
                "{in_second} requests within a second from {t}"
            );
        }
        // ...and close to the limit: N requests take about N/10 s.
        let ideal = requests.len() as f64 / 10.0;
        let secs = elapsed.as_secs_f64();
        ensure!(
            secs >= ideal - 1.2 && secs <= ideal * 1.5 + 2.0,
            "{} requests took {secs:.2}s (ideal {ideal:.1}s)",
            requests.len()
        );
        app.stop().await
    }
);

db_test!(
    rate_limits_pause_the_sweep_or_defer_it_never_fail_it,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        job_details(&app, Job::CampaignSync).await?;

        // 429s with Retry-After: every caller of the App API waits them out, the sweep completes.
        sim.clear_requests();
        sim.push_faults(
            Some(SimApi::App),
            (0..3).map(|_| Fault::Status {
                status: 429,
                retry_after_secs: Some(1),
            }),
        );
        let details = job_details(&app, Job::MetricsPoll).await?;
        ensure!(
            details["polled"] == 6 && details["failed"] == 0 && details["deferred"] == 0,
            "{details}"
        );
        let requests: Vec<_> = sim
            .requests()
            .into_iter()
            .filter(|r| r.api == SimApi::App)
            .collect();
        let limited: Vec<_> = requests.iter().filter(|r| r.status == 429).collect();
        ensure!(limited.len() == 3, "{} answered 429", limited.len());
        for hit in &limited {
            let too_soon = requests
                .iter()
                .filter(|r| r.at > hit.at && r.at < hit.at + TimeDelta::milliseconds(900))
                .count();
            ensure!(
                too_soon == 0,
                "{too_soon} request(s) within 900 ms of a 429 at {}",
                hit.at
            );
        }

        // A 429 the client does not wait out (no Retry-After: a quota): the sweep stops, everything
        // left stays due for the next run, nothing is marked failed.
        for id in [1, 2] {
            metrics::watch(&app.ctx, MetricsTarget::Campaign(id), Utc::now()).await?;
        }
        sim.push_faults(
            Some(SimApi::App),
            (0..4).map(|_| Fault::Status {
                status: 429,
                retry_after_secs: None,
            }),
        );
        let one_at_a_time = metrics::PollOptions {
            concurrency: 1,
            ..Default::default()
        };
        let report = metrics::poll_due_with(&app.ctx, &one_at_a_time).await?;
        ensure!(
            report.due == 2 && report.deferred == 2 && report.polled == 0 && report.failed == 0,
            "{report:?}"
        );
        let report = metrics::poll_due_with(&app.ctx, &one_at_a_time).await?;
        ensure!(report.due == 2 && report.polled == 2, "{report:?}");
        app.stop().await
    }
);

db_test!(
    get_campaign_metrics_refuses_bad_input_and_unknown_targets,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.campaigns().await?;
        for (target, field) in [
            (None, "target"),
            (Some(Target::CampaignId(0)), "campaign_id"),
            (Some(Target::BroadcastId(-3)), "broadcast_id"),
            (Some(Target::NewsletterId(0)), "newsletter_id"),
            (Some(Target::SendId(String::new())), "send_id"),
        ] {
            let status = client
                .get_campaign_metrics(GetCampaignMetricsRequest {
                    target,
                    refresh: false,
                })
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument && bad_request_fields(&status) == [field],
                "{field}: {status:?}"
            );
        }
        // Unknown in the mirror and in Customer.io (a campaign id is no broadcast id, and back).
        for target in [
            Target::NewsletterId(999),
            Target::CampaignId(999),
            Target::BroadcastId(1),
            Target::CampaignId(3),
        ] {
            let status = metrics_of(&mut client, target.clone(), false)
                .await
                .err()
                .context("found")?;
            let status = status.downcast_ref::<tonic::Status>().context("a status")?;
            ensure!(status.code() == Code::NotFound, "{target:?}: {status:?}");
        }
        let status = metrics_of(&mut client, Target::SendId("snd_unknown".into()), false)
            .await
            .err()
            .context("found")?;
        ensure!(
            status
                .downcast_ref::<tonic::Status>()
                .map(tonic::Status::code)
                == Some(Code::NotFound),
            "{status:?}"
        );
        // Known to Customer.io but not yet mirrored: read there, mirrored, polled.
        let got = metrics_of(&mut client, Target::BroadcastId(4), false).await?;
        ensure!(got.scope == "broadcast 4" && got.last_polled_at.is_some());
        let mirrored = client
            .get_campaign(GetCampaignRequest {
                kind: CampaignKind::Broadcast as i32,
                id: 4,
            })
            .await?;
        ensure!(
            mirrored
                .into_inner()
                .campaign
                .is_some_and(|c| c.name == "Breaking Market News")
        );
        app.stop().await
    }
);

/// Our New York bucket arithmetic agrees with Customer.io's (the simulator's, via chrono-tz)
/// across both clock changes: the first bucket and the number of buckets.
#[tokio::test]
async fn bucket_starts_agree_with_the_simulator() -> anyhow::Result<()> {
    cio_client::install_crypto_provider();
    let sim = Simulator::spawn(SimConfig::demo()).await?;
    let config = sim.sim.config();
    let credentials = Credentials::new(&config.site_id, &config.track_api_key, &config.app_api_key);
    let mut client_config =
        ClientConfig::new(credentials, Region::Us).with_base_url(sim.base_url().parse()?);
    client_config.app_requests_per_sec = 50;
    let client = CioClient::new(client_config)?;
    let at = |s: &str| -> anyhow::Result<DateTime<Utc>> {
        Ok(DateTime::parse_from_rfc3339(s)?.with_timezone(&Utc))
    };
    let cases = [
        (
            Resolution::Hours,
            "2026-03-07T23:30:00Z",
            "2026-03-09T01:10:00Z",
        ),
        (
            Resolution::Hours,
            "2026-10-31T22:00:00Z",
            "2026-11-01T20:00:00Z",
        ),
        (
            Resolution::Days,
            "2026-03-01T03:00:00Z",
            "2026-03-20T12:00:00Z",
        ),
        (
            Resolution::Days,
            "2026-10-25T04:30:00Z",
            "2026-11-07T05:30:00Z",
        ),
        (
            Resolution::Weeks,
            "2025-09-01T09:00:00Z",
            "2026-11-28T15:00:00Z",
        ),
        (
            Resolution::Months,
            "2025-01-15T00:00:00Z",
            "2026-11-28T15:00:00Z",
        ),
    ];
    for (res, start, end) in cases {
        let (start, end) = (at(start)?, at(end)?);
        let query = MetricsQuery {
            res,
            start: start.timestamp(),
            end: end.timestamp(),
        };
        let series = client.metrics(MetricsOf::Campaign(1), query).await?;
        let got = series
            .series
            .get("sent")
            .map(Vec::len)
            .context("no sent series")?;
        let first = eastern::floor(res, start);
        let mut want = 1;
        let mut bucket = first;
        while eastern::next(res, bucket) <= end {
            bucket = eastern::next(res, bucket);
            want += 1;
        }
        ensure!(
            got == want,
            "{res:?} {start}..{end}: simulator {got} buckets, ours {want} from {first}"
        );
        ensure!(eastern::floor(res, end) == bucket, "{res:?}: last bucket");
    }
    sim.shutdown().await;
    Ok(())
}

fn add(a: MetricTotals, b: MetricTotals) -> MetricTotals {
    MetricTotals {
        sent: a.sent + b.sent,
        delivered: a.delivered + b.delivered,
        bounced: a.bounced + b.bounced,
        opened: a.opened + b.opened,
        human_opened: a.human_opened + b.human_opened,
        prefetch_opened: a.prefetch_opened + b.prefetch_opened,
        clicked: a.clicked + b.clicked,
        human_clicked: a.human_clicked + b.human_clicked,
        prefetch_clicked: a.prefetch_clicked + b.prefetch_clicked,
        converted: a.converted + b.converted,
        spammed: a.spammed + b.spammed,
        unsubscribed: a.unsubscribed + b.unsubscribed,
    }
}

db_test!(
    a_sends_metrics_are_its_newsletters_summed_and_equal_the_ledger,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        sim.set_default_rates(lively_rates())?;
        app.run_job(Job::SegmentSync).await?;
        let mut client = app.campaigns().await?;
        let variation = |segment_id: i64, body: &str| pb::ContentVariation {
            segment_id,
            body: body.into(),
            ..Default::default()
        };
        let send = client
            .send_assignment(pb::SendAssignmentRequest {
                assignment_id: "asg-metrics".into(),
                title: "Q4".into(),
                subject: "Q4 outlook".into(),
                segment_ids: vec![4, 5],
                variations: vec![
                    variation(4, "<p>engaged</p>"),
                    variation(5, "<p>premium</p>"),
                ],
                delivery: Some(pb::send_assignment_request::Delivery::Newsletter(
                    pb::NewsletterDelivery {
                        from_id: 0,
                        ..Default::default()
                    },
                )),
                ..Default::default()
            })
            .await?
            .into_inner()
            .send
            .context("send")?;
        let newsletters: Vec<i64> = send
            .submissions
            .iter()
            .map(|s| s.cio_newsletter_id)
            .collect();
        ensure!(
            newsletters.len() == 2 && newsletters.iter().all(|id| *id > 0),
            "{send:?}"
        );
        sim.advance(SETTLE);
        // The simulator's clock moved on: the mirror learns the newsletters' (earlier-looking) send times.
        job_details(&app, Job::CampaignSync).await?;

        let ledger = add(
            sim.delivery_totals(&DeliveryFilter::newsletter(newsletters[0])),
            sim.delivery_totals(&DeliveryFilter::newsletter(newsletters[1])),
        );
        ensure!(ledger.sent > 100 && ledger.clicked > 0, "{ledger:?}");
        let got = metrics_of(&mut client, Target::SendId(send.id.clone()), true).await?;
        ensure_matches_ledger(&got, &ledger, "send")?;
        ensure_rates(&got, &ledger)?;
        ensure!(
            got.scope.contains(&newsletters[0].to_string())
                && got.scope.contains(&newsletters[1].to_string()),
            "{}",
            got.scope
        );
        ensure!(got.last_polled_at.is_some());
        app.stop().await
    }
);

//! `sharpsend.cio.v1.AnalyticsService`: request mapping only; the work is in
//! `sharpsend_core::analytics` (figures, rankings, reports, suggestions, the watch cursor) and
//! `sharpsend_core::engagement` (events, quarantine).
//!
//! Streams (WatchEngagement, ExportReport) are produced by a task writing into a small bounded
//! channel: a slow reader makes the task wait, so memory stays at a few messages per stream; a
//! reader that goes away ends the task at its next send.

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use sharpsend_core::tenants::Tenants;
use sharpsend_core::{
    CoreError,
    analytics::{
        self as core, Bucket, Counts, ExportScope, Flag, PerformanceQuery, Period, RankBy, Rates,
        ReportFormat, Source,
    },
    engagement::{self, DeliveryEvent},
    input::{self, limits::ID_BYTES},
};
use sharpsend_proto::v1::{self as pb, analytics_service_server::AnalyticsService};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{
    convert::{datetime, decode_page_token, encode_page_token, limit, timestamp},
    status::{OrStatus, to_status},
};

/// How often a watch reads the database for new events (every replica's events are there).
pub const WATCH_POLL: Duration = Duration::from_millis(250);
const DEFAULT_QUARANTINE_PAGE: u64 = 50;
const MAX_QUARANTINE_PAGE: u64 = 500;
const DEFAULT_PERFORMANCE_PAGE: u64 = 50;
const MAX_PERFORMANCE_PAGE: u64 = 500;
const DEFAULT_SUGGESTIONS: u64 = 20;
const MAX_SUGGESTIONS: u64 = 100;

pub struct Analytics {
    tenants: Tenants,
    /// Becomes true when the server begins to shut down: watches end then (their callers resume
    /// from their last event id elsewhere), so draining never waits on an endless stream.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Analytics {
    pub fn new(tenants: Tenants, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        Self { tenants, stopping }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn event_to_proto(e: DeliveryEvent) -> pb::EngagementEvent {
    pb::EngagementEvent {
        id: e.id,
        event_id: e.event_id,
        source: e.source.as_str().to_string(),
        metric: e.metric,
        delivery_id: e.delivery_id.unwrap_or_default(),
        customer_id: e.customer_id.unwrap_or_default(),
        assignment_id: e.assignment_id.unwrap_or_default(),
        send_id: e.send_id.unwrap_or_default(),
        segment_id: e.segment_id.unwrap_or_default(),
        prefetched: e.prefetched,
        machine: e.machine,
        link: e.link.unwrap_or_default(),
        occurred_at: Some(timestamp(e.occurred_at)),
        received_at: Some(timestamp(e.received_at)),
    }
}

fn counts_to_proto(c: &Counts) -> pb::DeliveryCounts {
    pb::DeliveryCounts {
        recipients: c.recipients,
        delivered: c.delivered,
        bounced: c.bounced,
        spam_reports: c.spam_reports,
        unsubscribes: c.unsubscribes,
        human_opens: c.human_opens,
        human_clicks: c.human_clicks,
        conversions: c.conversions,
    }
}

fn rates_to_proto(r: &Rates) -> pb::DeliveryRates {
    pb::DeliveryRates {
        open_rate: r.open_rate,
        click_rate: r.click_rate,
        click_to_open_rate: r.click_to_open_rate,
        bounce_rate: r.bounce_rate,
        spam_rate: r.spam_rate,
        unsubscribe_rate: r.unsubscribe_rate,
        conversion_rate: r.conversion_rate,
    }
}

fn buckets_to_proto(series: &[Bucket]) -> Vec<pb::AnalyticsBucket> {
    series
        .iter()
        .map(|b| pb::AnalyticsBucket {
            start: Some(timestamp(b.start)),
            size_seconds: b.size_seconds,
            counts: Some(counts_to_proto(&b.counts)),
        })
        .collect()
}

fn source_to_proto(s: Source) -> i32 {
    (match s {
        Source::DeliveryEvents => pb::AnalyticsSource::DeliveryEvents,
        Source::PolledMetrics => pb::AnalyticsSource::PolledMetrics,
        Source::None => pb::AnalyticsSource::None,
    }) as i32
}

fn flag_to_proto(f: Flag) -> i32 {
    (match f {
        Flag::Normal => pb::DeliverabilityFlag::Normal,
        Flag::High => pb::DeliverabilityFlag::High,
        Flag::Unknown => pb::DeliverabilityFlag::Unknown,
    }) as i32
}

fn assignment_id(field: &str, value: &str, required: bool) -> Result<(), CoreError> {
    let mut v = Vec::new();
    input::identifier(&mut v, field, value, ID_BYTES, required);
    input::finish(v)
}

fn period(
    start: Option<&prost_types::Timestamp>,
    end: Option<&prost_types::Timestamp>,
) -> Result<Option<Period>, CoreError> {
    match (start, end) {
        (None, None) => Ok(None),
        (Some(s), Some(e)) => Ok(Some(Period::new(
            datetime("start_time", s)?,
            datetime("end_time", e)?,
        )?)),
        (None, Some(_)) => Err(CoreError::invalid("start_time", "give both or neither")),
        (Some(_), None) => Err(CoreError::invalid("end_time", "give both or neither")),
    }
}

fn segment_filter(segment_id: i64) -> Result<Option<i64>, CoreError> {
    match segment_id {
        0 => Ok(None),
        s if s > 0 => Ok(Some(s)),
        _ => Err(CoreError::invalid("segment_id", "must not be negative")),
    }
}

#[tonic::async_trait]
impl AnalyticsService for Analytics {
    type WatchEngagementStream = BoxStream<pb::WatchEngagementResponse>;

    async fn watch_engagement(
        &self,
        request: Request<pb::WatchEngagementRequest>,
    ) -> Result<Response<Self::WatchEngagementStream>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        assignment_id("assignment_id", &req.assignment_id, false).or_status()?;
        if req.after_event_id < 0 {
            return Err(to_status(CoreError::invalid(
                "after_event_id",
                "must not be negative",
            )));
        }
        if req.from_beginning && req.after_event_id != 0 {
            return Err(to_status(CoreError::invalid(
                "after_event_id",
                "must be 0 with from_beginning",
            )));
        }
        let after = if req.from_beginning {
            0
        } else if req.after_event_id == 0 {
            engagement::last_event_id(&ctx).await.or_status()?
        } else {
            req.after_event_id
        };
        let assignment = Some(req.assignment_id).filter(|a| !a.is_empty());
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let ctx = ctx.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let mut cursor = core::WatchCursor::new(after);
            loop {
                match core::watch_read(&ctx, &mut cursor, assignment.as_deref()).await {
                    Ok(events) if !events.is_empty() => {
                        let full = events.len() as u64 >= engagement::MAX_EVENTS_PAGE;
                        let message = pb::WatchEngagementResponse {
                            events: events.into_iter().map(event_to_proto).collect(),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                        if full {
                            continue;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(to_status(e))).await;
                        return;
                    }
                }
                if *stopping.borrow() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(WATCH_POLL) => {}
                    () = tx.closed() => return,
                    _ = stopping.changed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_quarantined_webhooks(
        &self,
        request: Request<pb::ListQuarantinedWebhooksRequest>,
    ) -> Result<Response<pb::ListQuarantinedWebhooksResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let size = limit(
            "page_size",
            i64::from(req.page_size),
            DEFAULT_QUARANTINE_PAGE,
            MAX_QUARANTINE_PAGE,
        )
        .or_status()?;
        let after = decode_page_token(
            "quarantine",
            "ListQuarantinedWebhooks",
            "",
            &req.page_token,
            |p| p.parse::<i64>().ok().filter(|n| *n >= 0),
        )
        .or_status()?
        .unwrap_or(0);
        let mut rows = engagement::quarantined(&ctx, after, size + 1)
            .await
            .or_status()?;
        let next = if rows.len() as u64 > size {
            rows.truncate(usize::try_from(size).unwrap_or(usize::MAX));
            rows.last()
                .map(|r| encode_page_token("quarantine", "", r.id))
        } else {
            None
        };
        Ok(Response::new(pb::ListQuarantinedWebhooksResponse {
            webhooks: rows
                .into_iter()
                .map(|q| pb::QuarantinedWebhook {
                    id: q.id,
                    reason: q.reason,
                    body: q.body,
                    received_at: Some(timestamp(q.received_at)),
                })
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn get_assignment_analytics(
        &self,
        request: Request<pb::GetAssignmentAnalyticsRequest>,
    ) -> Result<Response<pb::GetAssignmentAnalyticsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let a = core::assignment_analytics(&ctx, &req.assignment_id)
            .await
            .or_status()?;
        let d = &a.deliverability;
        Ok(Response::new(pb::GetAssignmentAnalyticsResponse {
            assignment_id: a.assignment_id.clone(),
            counts: Some(counts_to_proto(&a.counts)),
            rates: Some(rates_to_proto(&a.counts.rates())),
            engaged_people: a.engaged_people,
            series: buckets_to_proto(&a.series),
            segments: a
                .segments
                .iter()
                .map(|g| pb::SegmentPerformance {
                    send_id: g.send_id.clone(),
                    segment_id: g.segment_id,
                    source: source_to_proto(g.source),
                    counts: Some(counts_to_proto(&g.counts)),
                    rates: Some(rates_to_proto(&g.counts.rates())),
                    engaged_people: g.engaged_people,
                    series: buckets_to_proto(&g.series),
                    as_of: g.as_of.map(timestamp),
                })
                .collect(),
            deliverability: Some(pb::Deliverability {
                bounce: flag_to_proto(d.bounce),
                spam: flag_to_proto(d.spam),
                unsubscribe: flag_to_proto(d.unsubscribe),
                baseline: Some(rates_to_proto(&d.baseline)),
                baseline_recipients: d.baseline_recipients,
            }),
            source: source_to_proto(a.source),
            computed_at: Some(timestamp(a.computed_at)),
            tests: a
                .tests
                .iter()
                .map(|t| pb::TestPerformance {
                    test_id: t.test_id.clone(),
                    title: t.title.clone(),
                    state: crate::abtests::state_to_proto(t.state) as i32,
                    winner: t.winner.clone().unwrap_or_default(),
                    variants: t
                        .variants
                        .iter()
                        .map(|v| pb::VariantPerformance {
                            name: v.name.clone(),
                            remainder: v.remainder,
                            send_id: v.send_id.clone().unwrap_or_default(),
                            segment_id: v.segment_id.unwrap_or_default(),
                            source: source_to_proto(v.source),
                            counts: Some(counts_to_proto(&v.counts)),
                            rates: Some(rates_to_proto(&v.counts.rates())),
                            engaged_people: v.engaged_people,
                            as_of: v.as_of.map(timestamp),
                        })
                        .collect(),
                })
                .collect(),
        }))
    }

    async fn list_assignment_performance(
        &self,
        request: Request<pb::ListAssignmentPerformanceRequest>,
    ) -> Result<Response<pb::ListAssignmentPerformanceResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let size = limit(
            "page_size",
            i64::from(req.page_size),
            DEFAULT_PERFORMANCE_PAGE,
            MAX_PERFORMANCE_PAGE,
        )
        .or_status()?;
        let Some(period) = period(req.start_time.as_ref(), req.end_time.as_ref()).or_status()?
        else {
            return Err(to_status(CoreError::invalid(
                "start_time",
                "is required (with end_time)",
            )));
        };
        let rank_by = match pb::RankBy::try_from(req.rank_by) {
            Ok(pb::RankBy::Unspecified | pb::RankBy::ClickRate) => RankBy::ClickRate,
            Ok(pb::RankBy::OpenRate) => RankBy::OpenRate,
            Ok(pb::RankBy::ClickToOpenRate) => RankBy::ClickToOpenRate,
            Ok(pb::RankBy::BounceRate) => RankBy::BounceRate,
            Ok(pb::RankBy::UnsubscribeRate) => RankBy::UnsubscribeRate,
            Ok(pb::RankBy::Recipients) => RankBy::Recipients,
            Err(_) => {
                return Err(to_status(CoreError::invalid(
                    "rank_by",
                    format!("unknown value {}", req.rank_by),
                )));
            }
        };
        let segment_id = segment_filter(req.segment_id).or_status()?;
        let filters = format!(
            "from={}|until={}|rank={}|segment={}|type={}",
            period.from.timestamp(),
            period.until.timestamp(),
            req.rank_by,
            req.segment_id,
            req.content_type
        );
        let offset = decode_page_token(
            "performance",
            "ListAssignmentPerformance",
            &filters,
            &req.page_token,
            |p| p.parse::<u64>().ok(),
        )
        .or_status()?
        .unwrap_or(0);
        let query = PerformanceQuery {
            period,
            rank_by,
            segment_id,
            content_type: Some(req.content_type).filter(|c| !c.is_empty()),
        };
        let page = core::performance(&ctx, &query, offset, size)
            .await
            .or_status()?;
        Ok(Response::new(pb::ListAssignmentPerformanceResponse {
            assignments: page
                .items
                .iter()
                .map(|p| pb::AssignmentPerformance {
                    assignment_id: p.assignment_id.clone(),
                    title: p.title.clone(),
                    content_types: p.content_types.clone(),
                    counts: Some(counts_to_proto(&p.counts)),
                    rates: Some(rates_to_proto(&p.counts.rates())),
                    first_sent_at: p.first_sent_at.map(timestamp),
                    rank: i32::try_from(p.rank).unwrap_or(i32::MAX),
                })
                .collect(),
            next_page_token: page
                .next
                .map(|rank| encode_page_token("performance", &filters, rank))
                .unwrap_or_default(),
        }))
    }

    type ExportReportStream = BoxStream<pb::ExportReportResponse>;

    async fn export_report(
        &self,
        request: Request<pb::ExportReportRequest>,
    ) -> Result<Response<Self::ExportReportStream>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let format = match pb::ReportFormat::try_from(req.format) {
            Ok(pb::ReportFormat::Csv) => ReportFormat::Csv,
            Ok(pb::ReportFormat::JsonLines) => ReportFormat::JsonLines,
            _ => {
                return Err(to_status(CoreError::invalid(
                    "format",
                    "give REPORT_FORMAT_CSV or REPORT_FORMAT_JSON_LINES",
                )));
            }
        };
        assignment_id("assignment_id", &req.assignment_id, false).or_status()?;
        let scope = ExportScope {
            assignment_id: Some(req.assignment_id).filter(|a| !a.is_empty()),
            period: period(req.start_time.as_ref(), req.end_time.as_ref()).or_status()?,
            segment_id: segment_filter(req.segment_id).or_status()?,
            test_id: Some(req.test_id).filter(|t| !t.is_empty()),
        };
        let scope = scope.resolve(&ctx).await.or_status()?;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut cache = HashMap::new();
            let mut after: Option<String> = None;
            let mut chunk = core::report_header(format);
            loop {
                let (rows, next) =
                    match core::export_page(&ctx, &scope, after.as_deref(), &mut cache).await {
                        Ok(page) => page,
                        Err(e) => {
                            let _ = tx.send(Err(to_status(e))).await;
                            return;
                        }
                    };
                let done = next.is_none();
                for (row, send) in &rows {
                    core::write_row(&mut chunk, format, row, send);
                }
                after = next;
                let message = pb::ExportReportResponse {
                    data: std::mem::take(&mut chunk).into_bytes(),
                    rows: i32::try_from(rows.len()).unwrap_or(i32::MAX),
                    done,
                };
                if tx.send(Ok(message)).await.is_err() || done {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn suggest_segments(
        &self,
        request: Request<pb::SuggestSegmentsRequest>,
    ) -> Result<Response<pb::SuggestSegmentsResponse>, Status> {
        let ctx = crate::tenancy::context(&self.tenants, &request).await?;
        let req = request.into_inner();
        let n = limit(
            "limit",
            i64::from(req.limit),
            DEFAULT_SUGGESTIONS,
            MAX_SUGGESTIONS,
        )
        .or_status()?;
        let (list, similar) = core::suggest_segments(
            &ctx,
            &req.content_types,
            &req.title,
            usize::try_from(n).unwrap_or(usize::MAX),
        )
        .await
        .or_status()?;
        Ok(Response::new(pb::SuggestSegmentsResponse {
            segments: list
                .into_iter()
                .map(|s| pb::SegmentSuggestion {
                    segment_id: s.segment_id,
                    name: s.name,
                    member_count: s.member_count,
                    history_deliveries: s.history_deliveries,
                    history_assignments: s.history_assignments,
                    enough_history: s.enough_history,
                    expected_open_rate: s.open_rate,
                    open_rate_low: s.open_interval.0,
                    open_rate_high: s.open_interval.1,
                    expected_click_rate: s.click_rate,
                    click_rate_low: s.click_interval.0,
                    click_rate_high: s.click_interval.1,
                    reason: s.reason,
                    rank: i32::try_from(s.rank).unwrap_or(i32::MAX),
                })
                .collect(),
            similar_assignments: i64::try_from(similar).unwrap_or(i64::MAX),
        }))
    }
}

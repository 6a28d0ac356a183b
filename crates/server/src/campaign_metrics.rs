//! `ListCampaigns`, `GetCampaign` and `GetCampaignMetrics` of `sharpsend.cio.v1.CampaignService`:
//! request validation and mapping; the mirror is read through `sharpsend_core::campaigns`, the
//! metrics through `sharpsend_core::metrics`.

use sharpsend_core::{
    AppContext, CoreError,
    campaigns::{self as core_campaigns, CampaignKind, CampaignView},
    input::{self, limits::ID_BYTES},
    metrics::{self as core_metrics, CampaignMetrics, MetricsSubject, MetricsTarget},
};
use sharpsend_proto::v1::{
    self as pb, GetCampaignMetricsRequest, GetCampaignMetricsResponse, GetCampaignRequest,
    GetCampaignResponse, ListCampaignsRequest, ListCampaignsResponse,
    get_campaign_metrics_request::Target,
};
use tonic::Status;

use crate::{
    convert::{self, limit, timestamp},
    status::{OrStatus, to_status},
};

/// Page size when the caller gives none.
pub const DEFAULT_PAGE_SIZE: u64 = 100;
/// Largest page; larger requests are served this many.
pub const MAX_PAGE_SIZE: u64 = 1000;

pub async fn list_campaigns(
    ctx: &AppContext,
    request: ListCampaignsRequest,
) -> Result<ListCampaignsResponse, Status> {
    let page_size = limit(
        "page_size",
        i64::from(request.page_size),
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
    )
    .or_status()?;
    let filters = format!("kind={}", request.kind);
    let after = decode_page_token(&filters, &request.page_token).or_status()?;
    let kind = kind_filter(request.kind).or_status()?;
    let page = core_campaigns::list_campaigns(ctx, kind, after, page_size)
        .await
        .or_status()?;
    Ok(ListCampaignsResponse {
        campaigns: page.items.iter().map(to_proto).collect(),
        next_page_token: page
            .next
            .map(|(kind, id)| encode_page_token(&filters, kind, id))
            .unwrap_or_default(),
    })
}

pub async fn get_campaign(
    ctx: &AppContext,
    request: GetCampaignRequest,
) -> Result<GetCampaignResponse, Status> {
    let kind = kind_filter(request.kind)
        .or_status()?
        .ok_or_else(|| to_status(CoreError::invalid("kind", "is required")))?;
    let record = core_campaigns::get_campaign(ctx, kind, request.id)
        .await
        .or_status()?;
    Ok(GetCampaignResponse {
        campaign: Some(to_proto(&record)),
    })
}

pub async fn get_campaign_metrics(
    ctx: &AppContext,
    request: GetCampaignMetricsRequest,
) -> Result<GetCampaignMetricsResponse, Status> {
    let subject = match request.target {
        None => {
            return Err(to_status(CoreError::invalid(
                "target",
                "is required: one of campaign_id, broadcast_id, newsletter_id, send_id",
            )));
        }
        Some(Target::CampaignId(id)) => MetricsSubject::Target(MetricsTarget::Campaign(id)),
        Some(Target::BroadcastId(id)) => MetricsSubject::Target(MetricsTarget::Broadcast(id)),
        Some(Target::NewsletterId(id)) => MetricsSubject::Target(MetricsTarget::Newsletter(id)),
        Some(Target::SendId(id)) => {
            let mut violations = Vec::new();
            input::identifier(&mut violations, "send_id", &id, ID_BYTES, false);
            input::finish(violations).or_status()?;
            MetricsSubject::Send(id)
        }
    };
    let metrics = core_metrics::get_metrics(ctx, &subject, request.refresh)
        .await
        .or_status()?;
    Ok(metrics_to_proto(metrics))
}

fn kind_filter(raw: i32) -> Result<Option<CampaignKind>, CoreError> {
    match pb::CampaignKind::try_from(raw) {
        Ok(pb::CampaignKind::Unspecified) => Ok(None),
        Ok(pb::CampaignKind::Campaign) => Ok(Some(CampaignKind::Campaign)),
        Ok(pb::CampaignKind::Broadcast) => Ok(Some(CampaignKind::Broadcast)),
        Ok(pb::CampaignKind::Newsletter) => Ok(Some(CampaignKind::Newsletter)),
        Err(_) => Err(CoreError::invalid(
            "kind",
            format!("unknown campaign kind {raw}"),
        )),
    }
}

fn kind_to_proto(kind: CampaignKind) -> pb::CampaignKind {
    match kind {
        CampaignKind::Campaign => pb::CampaignKind::Campaign,
        CampaignKind::Broadcast => pb::CampaignKind::Broadcast,
        CampaignKind::Newsletter => pb::CampaignKind::Newsletter,
    }
}

fn encode_page_token(filters: &str, kind: CampaignKind, cio_id: i64) -> String {
    convert::encode_page_token("campaigns", filters, format!("{}:{cio_id}", kind.as_str()))
}

fn decode_page_token(filters: &str, token: &str) -> Result<Option<(CampaignKind, i64)>, CoreError> {
    convert::decode_page_token("campaigns", "ListCampaigns", filters, token, |position| {
        let (kind, id) = position.split_once(':')?;
        Some((kind.parse::<CampaignKind>().ok()?, id.parse::<i64>().ok()?))
    })
}

fn to_proto(c: &CampaignView) -> pb::Campaign {
    pb::Campaign {
        kind: kind_to_proto(c.kind) as i32,
        id: c.id,
        name: c.name.clone(),
        r#type: c.campaign_type.clone().unwrap_or_default(),
        state: c.state.clone().unwrap_or_default(),
        created_at: c.created_at.map(timestamp),
        updated_at: c.updated_at.map(timestamp),
        sent_at: c.sent_at.map(timestamp),
        tags: c.tags.clone(),
        synced_at: Some(timestamp(c.synced_at)),
    }
}

fn metrics_to_proto(m: CampaignMetrics) -> GetCampaignMetricsResponse {
    let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    GetCampaignMetricsResponse {
        totals: m
            .totals
            .iter()
            .map(|(k, v)| (k.clone(), to_i64(*v)))
            .collect(),
        rates: Some(pb::MetricRates {
            delivery_rate: m.rates.delivery_rate,
            open_rate: m.rates.open_rate,
            click_rate: m.rates.click_rate,
            click_to_open_rate: m.rates.click_to_open_rate,
            bounce_rate: m.rates.bounce_rate,
            unsubscribe_rate: m.rates.unsubscribe_rate,
            conversion_rate: m.rates.conversion_rate,
        }),
        series: m
            .series
            .into_iter()
            .map(|(metric, values)| pb::MetricSeries {
                metric,
                values: values.into_iter().map(to_i64).collect(),
            })
            .collect(),
        resolution: m
            .resolution
            .map(|r| r.as_str().to_string())
            .unwrap_or_default(),
        series_start: m.series_start.map(timestamp),
        last_polled_at: m.last_polled_at.map(timestamp),
        scope: m.scope,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let filters = "kind=0";
        let token = encode_page_token(filters, CampaignKind::Broadcast, 42);
        assert_eq!(
            decode_page_token(filters, &token).ok(),
            Some(Some((CampaignKind::Broadcast, 42)))
        );
        assert_eq!(decode_page_token(filters, "").ok(), Some(None));
        for bad in [
            "not base64!",
            &convert::encode_page_token("segments", filters, 3),
            &convert::encode_page_token("campaigns", filters, "fax:3"),
        ] {
            assert!(
                matches!(
                    decode_page_token(filters, bad),
                    Err(CoreError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
        assert!(decode_page_token("kind=2", &token).is_err());
    }

    #[test]
    fn kinds_map_both_ways() {
        for kind in CampaignKind::ALL {
            assert_eq!(
                kind_filter(kind_to_proto(kind) as i32).ok(),
                Some(Some(kind))
            );
        }
        assert_eq!(kind_filter(0).ok(), Some(None));
        assert!(kind_filter(99).is_err());
    }
}

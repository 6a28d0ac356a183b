//! Sends: the clock, campaigns, API-triggered broadcasts and their triggers, newsletters, the
//! delivery ledger and outcome rates.

use std::time::Duration;

use super::Simulator;
use crate::config::TriggerScope;
use crate::error::SimError;
use crate::sends::{
    self, CampaignKind, CampaignState, DeliveryFilter, DeliveryRates, MetricTotals, NewBroadcast,
    NewCampaign, NewNewsletter, PersonEngagement, RatesKey, RuleTotals, SimCampaign, SimDelivery,
    SimNewsletter, SimTrigger,
};

impl Simulator {
    /// Makes `by` pass for everything send-related and for the rate limits: recorded times
    /// (triggers, newsletters, deliveries) look `by` older, delivery events drawn for the next
    /// `by` happen, trigger windows and scheduled newsletters come `by` closer, rate-limit
    /// windows move on. The wall clock is untouched.
    pub fn advance(&self, by: Duration) {
        self.with_world(|w| {
            w.sends.advance(by);
            w.settle_sends();
            w.settle_exports();
        });
        super::lock(&self.inner.traffic).advance(by);
        self.inner.webhook_wake.notify_one();
    }

    /// Total time [`Simulator::advance`]d so far.
    pub fn advanced(&self) -> Duration {
        let age = self.with_world(|w| w.sends.age_ms());
        Duration::from_millis(u64::try_from(age).unwrap_or(0))
    }

    /// How strongly opens and clicks follow each person's engagement, `0..=1` (clamped), for
    /// deliveries created from now on (see [`crate::SimConfig::engagement_correlation`]).
    pub fn set_engagement_correlation(&self, correlation: f64) {
        self.with_world(|w| w.sends.set_engagement_correlation(correlation));
    }

    /// Current engagement correlation.
    pub fn engagement_correlation(&self) -> f64 {
        self.with_world(|w| w.sends.engagement_correlation())
    }

    /// A person's engagement as a percentile of the population (0..1; higher opens and clicks
    /// more), and whether their mail client prefetches (machine opens) and their mail is link-
    /// scanned (machine clicks) at the default rates' `machine_open_rate` /
    /// `machine_click_rate`. `person_id` is read like a Track v1 path identifier.
    pub fn engagement(&self, person_id: &str) -> Option<PersonEngagement> {
        let (kind, value) = crate::state::parse_identifier(person_id);
        self.with_world(|w| {
            let seq = w.resolve(value, kind)?;
            let e = w.sends.engagement(seq);
            let rates = w.sends.default_rates();
            Some(PersonEngagement {
                percentile: e.percentile(),
                prefetches: e.prefetch < rates.machine_open_rate,
                link_scanned: e.scanner < rates.machine_click_rate,
            })
        })
    }

    /// Changes the trigger interval (Customer.io: 10 s); open windows are kept.
    pub fn set_trigger_interval(&self, interval: Duration) {
        self.with_world(|w| w.sends.set_trigger_interval(interval));
    }

    /// Current trigger interval.
    pub fn trigger_interval(&self) -> Duration {
        self.with_world(|w| w.sends.trigger_interval())
    }

    /// Whether the trigger interval holds across the workspace or per broadcast. Both windows
    /// are tracked all along, so a change applies to the next trigger.
    pub fn set_trigger_scope(&self, scope: TriggerScope) {
        self.with_world(|w| w.sends.set_trigger_scope(scope));
    }

    /// Current trigger scope.
    pub fn trigger_scope(&self) -> TriggerScope {
        self.with_world(|w| w.sends.trigger_scope())
    }

    /// Turns the workspace's subscription center on or off: while on, `POST /v1/newsletters`
    /// requires `subscription_topic_id`.
    pub fn set_subscription_center(&self, enabled: bool) {
        self.with_world(|w| w.sends.set_subscription_center(enabled));
    }

    /// Whether the subscription center is on.
    pub fn subscription_center(&self) -> bool {
        self.with_world(|w| w.sends.subscription_center())
    }

    /// Campaigns and broadcasts, by id.
    pub fn campaigns(&self) -> Vec<SimCampaign> {
        self.with_world(|w| {
            w.sends
                .campaigns()
                .map(|c| w.sends.snapshot_campaign(c))
                .collect()
        })
    }

    /// API-triggered broadcasts, by id.
    pub fn broadcasts(&self) -> Vec<SimCampaign> {
        self.campaigns()
            .into_iter()
            .filter(|c| c.kind == CampaignKind::Broadcast)
            .collect()
    }

    /// One campaign or broadcast.
    pub fn campaign(&self, id: i64) -> Option<SimCampaign> {
        self.with_world(|w| w.sends.campaign(id).map(|c| w.sends.snapshot_campaign(c)))
    }

    /// Adds an API-triggered broadcast; its audience may only name existing segments.
    pub fn add_broadcast(&self, broadcast: NewBroadcast) -> Result<i64, SimError> {
        self.with_world(|w| {
            if let Some(missing) = w.unknown_segment(&broadcast.audience) {
                return Err(SimError::UnknownSegment(missing));
            }
            let now = w.sends.now_ms();
            Ok(w.sends.add_broadcast(broadcast, now))
        })
    }

    /// Adds a campaign (it sends only through [`Simulator::record_campaign_send`]).
    pub fn add_campaign(&self, campaign: NewCampaign) -> i64 {
        self.with_world(|w| {
            let now = w.sends.now_ms();
            w.sends.add_campaign(campaign, now)
        })
    }

    /// Changes a campaign's or broadcast's state (a broadcast triggers only when `Running`).
    pub fn set_campaign_state(&self, id: i64, state: CampaignState) -> Result<(), SimError> {
        if self.with_world(|w| w.sends.set_campaign_state(id, state)) {
            Ok(())
        } else {
            Err(SimError::CampaignNotFound(id))
        }
    }

    /// Records that a campaign emailed these people now (ids; unknown people, people without
    /// an email and unsubscribed people are skipped); returns the deliveries created.
    pub fn record_campaign_send(
        &self,
        campaign_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.with_world(|w| w.campaign_send(campaign_id, person_ids))
    }

    /// Every trigger (of one broadcast with `Some`), oldest first.
    pub fn triggers(&self, broadcast_id: Option<i64>) -> Vec<SimTrigger> {
        self.with_world(|w| {
            w.sends
                .triggers()
                .filter(|t| broadcast_id.is_none_or(|b| t.broadcast_id == b))
                .map(|t| w.sends.snapshot_trigger(t))
                .collect()
        })
    }

    /// One trigger.
    pub fn trigger(&self, id: i64) -> Option<SimTrigger> {
        self.with_world(|w| w.sends.trigger(id).map(|t| w.sends.snapshot_trigger(t)))
    }

    /// Newsletters, by id (scheduled ones whose time has come are sent first).
    pub fn newsletters(&self) -> Vec<SimNewsletter> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends
                .newsletters()
                .map(|n| w.sends.snapshot_newsletter(n))
                .collect()
        })
    }

    /// One newsletter.
    pub fn newsletter(&self, id: i64) -> Option<SimNewsletter> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends
                .newsletter(id)
                .map(|n| w.sends.snapshot_newsletter(n))
        })
    }

    /// Adds a draft newsletter (tags allowed, unlike the API); its recipients may only name
    /// existing segments.
    pub fn add_newsletter(&self, newsletter: NewNewsletter) -> Result<i64, SimError> {
        self.with_world(|w| {
            if let Some(missing) = w.unknown_segment(&newsletter.recipients) {
                return Err(SimError::UnknownSegment(missing));
            }
            let now = w.sends.now_ms();
            let spec = sends::NewsletterSpec {
                name: newsletter.name,
                subject: newsletter.subject,
                body: newsletter.body,
                preheader_text: None,
                from: None,
                from_id: None,
                recipients: newsletter.recipients,
                tags: newsletter.tags,
                subscription_topic_id: None,
            };
            Ok(w.sends.add_newsletter(spec, now))
        })
    }

    /// Sends a draft newsletter now; returns the deliveries created.
    pub fn send_newsletter(&self, id: i64) -> Result<usize, SimError> {
        self.with_world(|w| match w.send_newsletter_now(id) {
            Ok(n) => Ok(n),
            Err(false) => Err(SimError::NewsletterNotFound(id)),
            Err(true) => Err(SimError::NewsletterNotDraft(id)),
        })
    }

    /// Deliveries matching the filter, in creation order, with the events that have happened
    /// by now and those still ahead.
    pub fn deliveries(&self, filter: &DeliveryFilter) -> Vec<SimDelivery> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.deliveries(filter)
        })
    }

    /// Per-metric counts of the matching deliveries' events that have happened by now: what
    /// the metrics endpoints sum to over a window covering the sends.
    pub fn delivery_totals(&self, filter: &DeliveryFilter) -> MetricTotals {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.totals(filter, false)
        })
    }

    /// Per-metric counts once every drawn event has happened (the eventual truth).
    pub fn eventual_delivery_totals(&self, filter: &DeliveryFilter) -> MetricTotals {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.totals(filter, true)
        })
    }

    /// Outcome rates of deliveries created from now on that match `key` (the most recently set
    /// matching rule wins; setting a key again replaces its rule).
    pub fn set_rates(&self, key: RatesKey, rates: DeliveryRates) -> Result<(), SimError> {
        rates.validate()?;
        self.with_world(|w| w.sends.set_rates(key, rates));
        Ok(())
    }

    /// Outcome rates of deliveries no rule matches.
    pub fn set_default_rates(&self, rates: DeliveryRates) -> Result<(), SimError> {
        rates.validate()?;
        self.with_world(|w| w.sends.set_default_rates(rates));
        Ok(())
    }

    /// Removes every rates rule (the default stays).
    pub fn clear_rates(&self) {
        self.with_world(|w| w.sends.clear_rates());
    }

    /// The ledger counted per rates rule: how many deliveries each rule's rates drew, and
    /// their metric totals by now and eventually (the default rates first, then each rule
    /// in the order it was first used). The truth an A/B test's estimate is compared to.
    pub fn totals_by_rates_rule(&self) -> Vec<RuleTotals> {
        self.with_world(|w| {
            w.settle_sends();
            w.sends.totals_by_rule()
        })
    }

    /// The default rates and the rules, oldest first.
    pub fn rates(&self) -> (DeliveryRates, Vec<(RatesKey, DeliveryRates)>) {
        self.with_world(|w| (w.sends.default_rates(), w.sends.rate_rules().to_vec()))
    }
}

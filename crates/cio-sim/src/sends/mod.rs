//! Sends: campaigns, API-triggered broadcasts, newsletters, broadcast triggers and the delivery
//! ledger, on the simulator's clock.
//!
//! Ids: campaigns and broadcasts share one sequence (the trigger path
//! `/v1/campaigns/{broadcast_id}/triggers` addresses a broadcast by a campaign id); newsletters,
//! newsletter contents, actions, triggers and deliveries have their own.
//!
//! Clock: every time here is kept in "internal" milliseconds, wall clock plus the total
//! [`crate::Simulator::advance`]d so far (`age`). Times are presented (HTTP, snapshots) as
//! `internal - age`, so presented times never run ahead of the wall clock: advancing by `d` makes
//! everything recorded look `d` older, lets scheduled delivery events that fall inside the new
//! "now" happen, and moves per-broadcast trigger windows and scheduled newsletters `d` closer.
//!
//! Engagement: who opens and clicks is per person (a seeded propensity, a prefetching mail
//! client, a link scanner: see `outcomes`), so the same people engage again and again while the
//! rates hold over the audience.
//!
//! Deliveries: one per eligible recipient (a person with an email and without a truthy
//! `unsubscribed` attribute) of a trigger, newsletter or recorded campaign send. Its whole
//! future is drawn when it is created, from [`DeliveryRates`] (the first matching
//! [`RatesKey`] rule, most recent first, else the default) and a generator seeded with the
//! simulator's seed and the delivery's sequence number: `sent` at the send time, then
//! `delivered` (2 s to 1 min later) or `bounced`; machine (`prefetch_`) opens within 30 min;
//! human opens after ~6 h on average (at most 7 days); clicks after opens, conversions ~1 day
//! after clicks, spam complaints and unsubscribes. Events later than "now" are scheduled and
//! count nowhere until the clock reaches them. `opened`/`clicked` are the first open/click of
//! either kind; a click before any open also opens (Customer.io's synthetic open). Recipients' profiles are not changed by their deliveries.
//!
//! Layout: `model` (the public types: inputs, snapshots, rates, ledger filters and totals),
//! this module (the stored records and [`SendStore`]), `outcomes` (drawing a delivery's
//! timeline), `ops` (operations that need people: triggers, newsletter sends, campaign sends).

mod model;
mod ops;
mod outcomes;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::audience::AudienceFilter;
use crate::config::{SimConfig, TriggerScope};
use crate::state::{Person, loose_eq};

pub use model::{
    CampaignKind, CampaignState, CampaignTrigger, DeliveryFilter, DeliveryMetric, DeliveryRates,
    MetricTotals, NewBroadcast, NewCampaign, NewNewsletter, PersonEngagement, RatesKey, RuleTotals,
    SimCampaign, SimDelivery, SimNewsletter, SimTrigger,
};
pub(crate) use ops::{TriggerError, trigger_status_json};
pub(crate) use outcomes::Engagement;
use outcomes::draw_events;

/// Largest serialized trigger `data` (bytes).
pub(crate) const MAX_TRIGGER_DATA_BYTES: usize = 50_000;
/// Most `ids`, `emails` or `per_user_data` entries of one trigger.
pub(crate) const MAX_TRIGGER_RECIPIENTS: usize = 10_000;

/// Where a delivery came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Campaign {
        campaign_id: i64,
        action_id: i64,
    },
    Broadcast {
        broadcast_id: i64,
        action_id: i64,
        trigger_id: i64,
    },
    Newsletter {
        newsletter_id: i64,
        content_id: i64,
    },
}

/// Which deliveries a metrics request covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A campaign's or broadcast's deliveries.
    Campaign(i64),
    Newsletter(i64),
    Content(i64),
}

pub(crate) struct Campaign {
    pub(crate) id: i64,
    pub(crate) kind: CampaignKind,
    pub(crate) name: String,
    pub(crate) state: CampaignState,
    pub(crate) trigger: Option<CampaignTrigger>,
    pub(crate) trigger_segment_ids: Vec<i64>,
    pub(crate) subject: String,
    pub(crate) action_id: i64,
    pub(crate) audience: Option<AudienceFilter>,
    pub(crate) tags: Vec<String>,
    pub(crate) created_ms: i64,
    pub(crate) updated_ms: i64,
}

pub(crate) struct Newsletter {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) body: String,
    pub(crate) preheader_text: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) from_id: Option<i64>,
    pub(crate) recipients: AudienceFilter,
    pub(crate) tags: Vec<String>,
    pub(crate) content_id: i64,
    pub(crate) subscription_topic_id: Option<i64>,
    pub(crate) created_ms: i64,
    pub(crate) updated_ms: i64,
    pub(crate) sent_ms: Option<i64>,
    pub(crate) scheduled_ms: Option<i64>,
}

pub(crate) struct Trigger {
    pub(crate) id: i64,
    pub(crate) broadcast_id: i64,
    pub(crate) created_ms: i64,
    pub(crate) processed_ms: Option<i64>,
    pub(crate) request: Value,
    pub(crate) data: Option<Arc<Value>>,
    pub(crate) recipients: Vec<String>,
    pub(crate) errors: Vec<String>,
}

pub(crate) struct Delivery {
    pub(crate) id: String,
    /// Position in the ledger (0-based).
    pub(crate) seq: usize,
    pub(crate) source: Source,
    /// The recipient's sequence number (the person may have been deleted since).
    pub(crate) person_seq: u64,
    /// The recipient's id (`cio_<cio_id>` without one) and `cio_id` at send time.
    pub(crate) person_id: String,
    pub(crate) cio_id: String,
    pub(crate) email: String,
    pub(crate) subject: Arc<str>,
    trigger_data: Option<Arc<Value>>,
    user_data: Option<Value>,
    pub(crate) sent_ms: i64,
    /// The rates rule it was drawn from (`None`: the default rates).
    pub(crate) rule: Option<RatesKey>,
    /// Sorted by time.
    pub(crate) events: Vec<(DeliveryMetric, i64)>,
}

impl Delivery {
    fn data_field(&self, field: &str) -> Option<&Value> {
        self.user_data
            .as_ref()
            .and_then(|d| d.get(field))
            .or_else(|| self.trigger_data.as_deref().and_then(|d| d.get(field)))
    }

    fn merged_data(&self) -> Option<Value> {
        match (self.trigger_data.as_deref(), &self.user_data) {
            (None, None) => None,
            (base, user) => {
                let mut merged = match base {
                    Some(Value::Object(m)) => m.clone(),
                    _ => Map::new(),
                };
                if let Some(Value::Object(extra)) = user {
                    merged.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                Some(Value::Object(merged))
            }
        }
    }

    fn matches(&self, filter: &DeliveryFilter) -> bool {
        let (campaign, broadcast, trigger, newsletter, content) = self.source_ids();
        let eq = |want: Option<i64>, have: Option<i64>| want.is_none() || want == have;
        eq(filter.campaign_id, campaign)
            && eq(filter.broadcast_id, broadcast)
            && eq(filter.trigger_id, trigger)
            && eq(filter.newsletter_id, newsletter)
            && eq(filter.content_id, content)
            && filter
                .subject
                .as_deref()
                .is_none_or(|s| s == &*self.subject)
            && filter
                .person_id
                .as_deref()
                .is_none_or(|p| p == self.person_id)
    }

    #[allow(clippy::type_complexity)]
    pub(crate) fn source_ids(
        &self,
    ) -> (
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
    ) {
        match self.source {
            Source::Campaign { campaign_id, .. } => (Some(campaign_id), None, None, None, None),
            Source::Broadcast {
                broadcast_id,
                trigger_id,
                ..
            } => (None, Some(broadcast_id), Some(trigger_id), None, None),
            Source::Newsletter {
                newsletter_id,
                content_id,
            } => (None, None, None, Some(newsletter_id), Some(content_id)),
        }
    }
}

/// A person about to receive a delivery.
pub(crate) struct Recipient {
    pub(crate) seq: u64,
    pub(crate) cio_id: String,
    pub(crate) person_id: String,
    pub(crate) email: String,
    pub(crate) user_data: Option<Value>,
}

impl Recipient {
    /// The person as a recipient of an email, unless they cannot receive one (no email, or a
    /// truthy `unsubscribed` attribute).
    pub(crate) fn eligible(person: &Person, user_data: Option<Value>) -> Option<Self> {
        let unsubscribed = person
            .attributes
            .get("unsubscribed")
            .is_some_and(|v| match v {
                Value::Bool(b) => *b,
                Value::String(s) => s.eq_ignore_ascii_case("true"),
                _ => false,
            });
        match (&person.email, unsubscribed) {
            (Some(email), false) => Some(Self {
                seq: person.seq,
                cio_id: person.cio_id.clone(),
                person_id: person.public_id(),
                email: email.clone(),
                user_data,
            }),
            _ => None,
        }
    }
}

/// The sends side of the workspace (lives in [`crate::state::World`], behind the simulator's
/// mutex).
pub(crate) struct SendStore {
    age_ms: i64,
    trigger_interval_ms: i64,
    trigger_scope: TriggerScope,
    subscription_center: bool,
    seed: u64,
    engagement_correlation: f64,
    default_rates: DeliveryRates,
    rate_rules: Vec<(RatesKey, DeliveryRates)>,
    campaigns: BTreeMap<i64, Campaign>,
    next_campaign_id: i64,
    next_action_id: i64,
    newsletters: BTreeMap<i64, Newsletter>,
    next_newsletter_id: i64,
    next_content_id: i64,
    triggers: BTreeMap<i64, Trigger>,
    next_trigger_id: i64,
    /// Last accepted trigger, per broadcast (`Some(id)`) and across the workspace (`None`);
    /// both are kept so the scope can change at run time.
    last_trigger_ms: HashMap<Option<i64>, i64>,
    deliveries: Vec<Delivery>,
    by_campaign: HashMap<i64, Vec<usize>>,
    by_trigger: HashMap<i64, Vec<usize>>,
    by_newsletter: HashMap<i64, Vec<usize>>,
    by_person: HashMap<u64, Vec<usize>>,
    /// Delivery events not yet handed to the reporting webhook sender, by (time, delivery,
    /// metric); kept only while a webhook is configured.
    unreported: Option<BTreeSet<(i64, usize, DeliveryMetric)>>,
}

impl Default for SendStore {
    fn default() -> Self {
        Self {
            age_ms: 0,
            trigger_interval_ms: 10_000,
            trigger_scope: TriggerScope::Workspace,
            subscription_center: false,
            seed: 0,
            engagement_correlation: crate::config::DEFAULT_ENGAGEMENT_CORRELATION,
            default_rates: DeliveryRates::default(),
            rate_rules: Vec::new(),
            campaigns: BTreeMap::new(),
            next_campaign_id: 1,
            next_action_id: 1,
            newsletters: BTreeMap::new(),
            next_newsletter_id: 1,
            next_content_id: 1,
            triggers: BTreeMap::new(),
            next_trigger_id: 1,
            last_trigger_ms: HashMap::new(),
            deliveries: Vec::new(),
            by_campaign: HashMap::new(),
            by_trigger: HashMap::new(),
            by_newsletter: HashMap::new(),
            by_person: HashMap::new(),
            unreported: None,
        }
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SendStore {
    pub(crate) fn configure(&mut self, config: &SimConfig) {
        self.seed = config.seed;
        self.engagement_correlation = config.engagement_correlation.clamp(0.0, 1.0);
        self.trigger_interval_ms = ms(config.trigger_interval);
        self.trigger_scope = config.trigger_scope;
        self.subscription_center = config.subscription_center;
        self.default_rates = config.default_rates;
    }

    // ----- clock -----

    /// Internal now (wall clock + age), milliseconds.
    pub(crate) fn now_ms(&self) -> i64 {
        Utc::now().timestamp_millis().saturating_add(self.age_ms)
    }

    pub(crate) fn age_ms(&self) -> i64 {
        self.age_ms
    }

    pub(crate) fn advance(&mut self, by: Duration) {
        self.age_ms = self.age_ms.saturating_add(ms(by));
    }

    /// Presented time of an internal instant.
    pub(crate) fn present(&self, internal_ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(internal_ms - self.age_ms).unwrap_or_default()
    }

    /// Presented unix seconds of an internal instant.
    pub(crate) fn present_secs(&self, internal_ms: i64) -> i64 {
        (internal_ms - self.age_ms).div_euclid(1000)
    }

    /// Internal instant of presented unix seconds.
    pub(crate) fn internal_from_secs(&self, secs: i64) -> i64 {
        secs.saturating_mul(1000).saturating_add(self.age_ms)
    }

    pub(crate) fn trigger_interval(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.trigger_interval_ms).unwrap_or(0))
    }

    pub(crate) fn set_trigger_interval(&mut self, interval: Duration) {
        self.trigger_interval_ms = ms(interval);
    }

    pub(crate) fn trigger_scope(&self) -> TriggerScope {
        self.trigger_scope
    }

    pub(crate) fn set_trigger_scope(&mut self, scope: TriggerScope) {
        self.trigger_scope = scope;
    }

    pub(crate) fn subscription_center(&self) -> bool {
        self.subscription_center
    }

    pub(crate) fn set_subscription_center(&mut self, enabled: bool) {
        self.subscription_center = enabled;
    }

    // ----- rates -----

    pub(crate) fn default_rates(&self) -> DeliveryRates {
        self.default_rates
    }

    pub(crate) fn set_default_rates(&mut self, rates: DeliveryRates) {
        self.default_rates = rates;
    }

    /// Adds a rule; a rule for the same key replaces it (and becomes the most recent).
    pub(crate) fn set_rates(&mut self, key: RatesKey, rates: DeliveryRates) {
        self.rate_rules.retain(|(k, _)| *k != key);
        self.rate_rules.push((key, rates));
    }

    pub(crate) fn clear_rates(&mut self) {
        self.rate_rules.clear();
    }

    pub(crate) fn rate_rules(&self) -> &[(RatesKey, DeliveryRates)] {
        &self.rate_rules
    }

    /// The rule a delivery's rates come from (the most recent matching one) and the rates.
    fn rates_for(&self, delivery: &Delivery) -> (Option<RatesKey>, DeliveryRates) {
        let (campaign, broadcast, _, newsletter, _) = delivery.source_ids();
        let newsletter = newsletter.and_then(|id| self.newsletters.get(&id));
        let name = match (
            campaign
                .or(broadcast)
                .and_then(|id| self.campaigns.get(&id)),
            newsletter,
        ) {
            (Some(c), _) => Some(c.name.as_str()),
            (None, Some(n)) => Some(n.name.as_str()),
            (None, None) => None,
        };
        let hit = self.rate_rules.iter().rev().find(|(key, _)| match key {
            RatesKey::Subject(s) => **s == *delivery.subject,
            RatesKey::Data { field, value } => delivery
                .data_field(field)
                .is_some_and(|v| loose_eq(v, value)),
            RatesKey::Campaign(id) => {
                matches!(
                    delivery.source,
                    Source::Campaign { campaign_id, .. } if campaign_id == *id
                ) || matches!(
                    delivery.source,
                    Source::Broadcast { broadcast_id, .. } if broadcast_id == *id
                )
            }
            RatesKey::Newsletter(id) => matches!(
                delivery.source,
                Source::Newsletter { newsletter_id, .. } if newsletter_id == *id
            ),
            RatesKey::SubjectContains(marker) => delivery.subject.contains(marker.as_str()),
            RatesKey::ContentContains(marker) => match newsletter {
                Some(n) => n.body.contains(marker.as_str()),
                None => delivery
                    .merged_data()
                    .is_some_and(|d| d.to_string().contains(marker.as_str())),
            },
            RatesKey::NameContains(marker) => name.is_some_and(|n| n.contains(marker.as_str())),
        });
        match hit {
            Some((key, rates)) => (Some(key.clone()), *rates),
            None => (None, self.default_rates),
        }
    }

    /// The ledger counted per rates rule (the default rates first), rules in the order they
    /// were set; a rule replaced since keeps its own line.
    pub(crate) fn totals_by_rule(&self) -> Vec<RuleTotals> {
        let now = self.now_ms();
        let mut lines: Vec<RuleTotals> = vec![RuleTotals {
            key: None,
            deliveries: 0,
            totals: MetricTotals::default(),
            eventual: MetricTotals::default(),
        }];
        for d in &self.deliveries {
            let index = match lines.iter().position(|l| l.key == d.rule) {
                Some(i) => i,
                None => {
                    lines.push(RuleTotals {
                        key: d.rule.clone(),
                        deliveries: 0,
                        totals: MetricTotals::default(),
                        eventual: MetricTotals::default(),
                    });
                    lines.len() - 1
                }
            };
            if let Some(line) = lines.get_mut(index) {
                line.deliveries += 1;
                for (metric, at) in &d.events {
                    *line.eventual.slot(*metric) += 1;
                    if *at <= now {
                        *line.totals.slot(*metric) += 1;
                    }
                }
            }
        }
        lines
    }

    // ----- campaigns and broadcasts -----

    pub(crate) fn add_campaign(&mut self, new: NewCampaign, created_ms: i64) -> i64 {
        let id = self.next_campaign_id;
        self.next_campaign_id += 1;
        let action_id = self.next_action();
        self.campaigns.insert(
            id,
            Campaign {
                id,
                kind: CampaignKind::Campaign,
                name: new.name,
                state: new.state,
                trigger: Some(new.trigger),
                trigger_segment_ids: new.trigger_segment_ids,
                subject: new.subject,
                action_id,
                audience: None,
                tags: new.tags,
                created_ms,
                updated_ms: created_ms,
            },
        );
        id
    }

    pub(crate) fn add_broadcast(&mut self, new: NewBroadcast, created_ms: i64) -> i64 {
        let id = self.next_campaign_id;
        self.next_campaign_id += 1;
        let action_id = self.next_action();
        self.campaigns.insert(
            id,
            Campaign {
                id,
                kind: CampaignKind::Broadcast,
                name: new.name,
                state: new.state,
                trigger: None,
                trigger_segment_ids: Vec::new(),
                subject: new.subject,
                action_id,
                audience: Some(new.audience),
                tags: new.tags,
                created_ms,
                updated_ms: created_ms,
            },
        );
        id
    }

    fn next_action(&mut self) -> i64 {
        let id = self.next_action_id;
        self.next_action_id += 1;
        id
    }

    pub(crate) fn campaign(&self, id: i64) -> Option<&Campaign> {
        self.campaigns.get(&id)
    }

    pub(crate) fn campaigns(&self) -> impl Iterator<Item = &Campaign> {
        self.campaigns.values()
    }

    pub(crate) fn set_campaign_state(&mut self, id: i64, state: CampaignState) -> bool {
        let now = self.now_ms();
        match self.campaigns.get_mut(&id) {
            Some(c) => {
                c.state = state;
                c.updated_ms = now;
                true
            }
            None => false,
        }
    }

    pub(crate) fn snapshot_campaign(&self, c: &Campaign) -> SimCampaign {
        SimCampaign {
            id: c.id,
            kind: c.kind,
            name: c.name.clone(),
            state: c.state,
            trigger: c.trigger,
            subject: c.subject.clone(),
            action_id: c.action_id,
            audience: c.audience.as_ref().map(AudienceFilter::to_json),
            tags: c.tags.clone(),
            created_at: self.present(c.created_ms),
            updated_at: self.present(c.updated_ms),
        }
    }

    // ----- newsletters -----

    pub(crate) fn add_newsletter(&mut self, spec: NewsletterSpec, created_ms: i64) -> i64 {
        let id = self.next_newsletter_id;
        self.next_newsletter_id += 1;
        let content_id = self.next_content_id;
        self.next_content_id += 1;
        self.newsletters.insert(
            id,
            Newsletter {
                id,
                name: spec.name,
                subject: spec.subject,
                body: spec.body,
                preheader_text: spec.preheader_text,
                from: spec.from,
                from_id: spec.from_id,
                recipients: spec.recipients,
                tags: spec.tags,
                content_id,
                subscription_topic_id: spec.subscription_topic_id,
                created_ms,
                updated_ms: created_ms,
                sent_ms: None,
                scheduled_ms: None,
            },
        );
        id
    }

    pub(crate) fn newsletter(&self, id: i64) -> Option<&Newsletter> {
        self.newsletters.get(&id)
    }

    pub(crate) fn newsletters(&self) -> impl Iterator<Item = &Newsletter> {
        self.newsletters.values()
    }

    pub(crate) fn newsletter_recipients(&self, id: i64) -> u64 {
        self.by_newsletter.get(&id).map_or(0, |v| v.len() as u64)
    }

    pub(crate) fn snapshot_newsletter(&self, n: &Newsletter) -> SimNewsletter {
        SimNewsletter {
            id: n.id,
            name: n.name.clone(),
            subject: n.subject.clone(),
            body: n.body.clone(),
            from: n.from.clone(),
            from_id: n.from_id,
            content_id: n.content_id,
            recipients: n.recipients.to_json(),
            recipient_segment_ids: n.recipients.segment_ids(),
            tags: n.tags.clone(),
            created_at: self.present(n.created_ms),
            updated_at: self.present(n.updated_ms),
            sent_at: n.sent_ms.map(|t| self.present(t)),
            scheduled_at: match n.sent_ms {
                None => n.scheduled_ms.map(|t| self.present(t)),
                Some(_) => None,
            },
            recipients_count: self.newsletter_recipients(n.id),
        }
    }

    // ----- triggers -----

    pub(crate) fn trigger(&self, id: i64) -> Option<&Trigger> {
        self.triggers.get(&id)
    }

    pub(crate) fn triggers(&self) -> impl DoubleEndedIterator<Item = &Trigger> {
        self.triggers.values()
    }

    pub(crate) fn trigger_recipients(&self, id: i64) -> u64 {
        self.by_trigger.get(&id).map_or(0, |v| v.len() as u64)
    }

    pub(crate) fn snapshot_trigger(&self, t: &Trigger) -> SimTrigger {
        SimTrigger {
            id: t.id,
            broadcast_id: t.broadcast_id,
            created_at: self.present(t.created_ms),
            processed_at: t.processed_ms.map(|p| self.present(p)),
            recipients_count: self.trigger_recipients(t.id),
            recipients: t.recipients.clone(),
            data: t.data.as_deref().cloned(),
            request: t.request.clone(),
            errors: t.errors.clone(),
        }
    }

    /// Takes the trigger window of the broadcast's scope (the workspace's, or the broadcast's
    /// own): `Err(retry_after_ms)` while it is closed.
    fn take_trigger_window(&mut self, broadcast_id: i64, now: i64) -> Result<(), i64> {
        let key = match self.trigger_scope {
            TriggerScope::Workspace => None,
            TriggerScope::PerBroadcast => Some(broadcast_id),
        };
        if let Some(last) = self.last_trigger_ms.get(&key) {
            let open_at = last.saturating_add(self.trigger_interval_ms);
            if now < open_at {
                return Err(open_at - now);
            }
        }
        self.last_trigger_ms.insert(None, now);
        self.last_trigger_ms.insert(Some(broadcast_id), now);
        Ok(())
    }

    // ----- deliveries -----

    /// Creates one delivery per recipient, sent at `at`; returns how many.
    fn deliver(
        &mut self,
        source: Source,
        base_subject: &str,
        trigger_data: Option<Arc<Value>>,
        recipients: Vec<Recipient>,
        at: i64,
    ) -> Vec<String> {
        let base_subject: Arc<str> = Arc::from(base_subject);
        let mut delivered_to = Vec::with_capacity(recipients.len());
        for recipient in recipients {
            let seq = self.deliveries.len();
            let mut delivery = Delivery {
                id: format!("sim-d{:08}", seq + 1),
                seq,
                source,
                person_seq: recipient.seq,
                cio_id: recipient.cio_id,
                person_id: recipient.person_id,
                email: recipient.email,
                subject: base_subject.clone(),
                trigger_data: trigger_data.clone(),
                user_data: recipient.user_data,
                sent_ms: at,
                rule: None,
                events: Vec::new(),
            };
            if let Some(Value::String(subject)) = delivery.data_field("subject") {
                delivery.subject = Arc::from(subject.as_str());
            }
            let (rule, rates) = self.rates_for(&delivery);
            delivery.rule = rule;
            let person = self.engagement(delivery.person_seq);
            delivery.events = draw_events(self.seed, seq as u64, &rates, at, &person);
            delivered_to.push(delivery.person_id.clone());
            self.by_person
                .entry(delivery.person_seq)
                .or_default()
                .push(seq);
            if let Some(unreported) = &mut self.unreported {
                unreported.extend(delivery.events.iter().map(|(m, at)| (*at, seq, *m)));
            }
            match source {
                Source::Campaign { campaign_id, .. } => {
                    self.by_campaign.entry(campaign_id).or_default().push(seq);
                }
                Source::Broadcast {
                    broadcast_id,
                    trigger_id,
                    ..
                } => {
                    self.by_campaign.entry(broadcast_id).or_default().push(seq);
                    self.by_trigger.entry(trigger_id).or_default().push(seq);
                }
                Source::Newsletter { newsletter_id, .. } => {
                    self.by_newsletter
                        .entry(newsletter_id)
                        .or_default()
                        .push(seq);
                }
            }
            self.deliveries.push(delivery);
        }
        delivered_to
    }

    /// Every delivery, in ledger order.
    pub(crate) fn ledger(&self) -> &[Delivery] {
        &self.deliveries
    }

    /// One person's deliveries, in ledger order.
    pub(crate) fn ledger_of(&self, person_seq: u64) -> impl DoubleEndedIterator<Item = &Delivery> {
        self.by_person
            .get(&person_seq)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .filter_map(|i| self.deliveries.get(*i))
    }

    /// The deliveries of a campaign or broadcast (all its triggers), or of a newsletter.
    pub(crate) fn ledger_of_scope(&self, scope: Scope) -> Vec<&Delivery> {
        let indices = match scope {
            Scope::Campaign(id) => self.by_campaign.get(&id),
            Scope::Newsletter(id) => self.by_newsletter.get(&id),
            Scope::Content(_) => None,
        };
        match (scope, indices) {
            (Scope::Content(id), _) => self
                .deliveries
                .iter()
                .filter(|d| d.source_ids().4 == Some(id))
                .collect(),
            (_, Some(indices)) => indices
                .iter()
                .filter_map(|i| self.deliveries.get(*i))
                .collect(),
            (_, None) => Vec::new(),
        }
    }

    /// Starts (or stops) keeping the events a reporting webhook has to report: from now on,
    /// every event that has not happened yet (those of existing deliveries included).
    pub(crate) fn track_unreported(&mut self, on: bool) {
        if !on {
            self.unreported = None;
            return;
        }
        let now = self.now_ms();
        let ahead = self
            .deliveries
            .iter()
            .flat_map(|d| d.events.iter().map(move |(m, at)| (*at, d.seq, *m)))
            .filter(|(at, _, _)| *at > now)
            .collect();
        self.unreported = Some(ahead);
    }

    /// The events that have happened by `now` and were not reported yet, in time order (then
    /// delivery, then metric); they are taken out.
    pub(crate) fn take_unreported(&mut self, now: i64) -> Vec<(i64, usize, DeliveryMetric)> {
        let Some(unreported) = &mut self.unreported else {
            return Vec::new();
        };
        let later = unreported.split_off(&(now.saturating_add(1), 0, DeliveryMetric::Sent));
        std::mem::replace(unreported, later).into_iter().collect()
    }

    /// When the next unreported event happens.
    pub(crate) fn next_unreported(&self) -> Option<i64> {
        self.unreported
            .as_ref()
            .and_then(|u| u.first())
            .map(|(at, _, _)| *at)
    }

    /// A person's behaviour towards email.
    pub(crate) fn engagement(&self, person_seq: u64) -> Engagement {
        Engagement::of(self.seed, person_seq, self.engagement_correlation)
    }

    pub(crate) fn engagement_correlation(&self) -> f64 {
        self.engagement_correlation
    }

    pub(crate) fn set_engagement_correlation(&mut self, correlation: f64) {
        self.engagement_correlation = correlation.clamp(0.0, 1.0);
    }

    /// The seed every draw derives from.
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    fn scoped(&self, filter: &DeliveryFilter) -> Box<dyn Iterator<Item = &Delivery> + '_> {
        let indexed = filter
            .trigger_id
            .map(|t| self.by_trigger.get(&t).map_or(&[][..], Vec::as_slice))
            .or_else(|| {
                filter
                    .broadcast_id
                    .or(filter.campaign_id)
                    .map(|c| self.by_campaign.get(&c).map_or(&[][..], Vec::as_slice))
            })
            .or_else(|| {
                filter
                    .newsletter_id
                    .map(|n| self.by_newsletter.get(&n).map_or(&[][..], Vec::as_slice))
            });
        let filter = filter.clone();
        match indexed {
            Some(indices) => Box::new(
                indices
                    .iter()
                    .filter_map(|i| self.deliveries.get(*i))
                    .filter(move |d| d.matches(&filter)),
            ),
            None => Box::new(self.deliveries.iter().filter(move |d| d.matches(&filter))),
        }
    }

    pub(crate) fn deliveries(&self, filter: &DeliveryFilter) -> Vec<SimDelivery> {
        let now = self.now_ms();
        self.scoped(filter)
            .map(|d| self.snapshot_delivery(d, now))
            .collect()
    }

    /// Totals as of now, or of every drawn event with `eventually`.
    pub(crate) fn totals(&self, filter: &DeliveryFilter, eventually: bool) -> MetricTotals {
        let now = if eventually { i64::MAX } else { self.now_ms() };
        let mut totals = MetricTotals::default();
        for delivery in self.scoped(filter) {
            for (metric, at) in &delivery.events {
                if *at <= now {
                    *totals.slot(*metric) += 1;
                }
            }
        }
        totals
    }

    fn snapshot_delivery(&self, d: &Delivery, now: i64) -> SimDelivery {
        let (campaign_id, broadcast_id, trigger_id, newsletter_id, content_id) = d.source_ids();
        let action_id = match d.source {
            Source::Campaign { action_id, .. } | Source::Broadcast { action_id, .. } => {
                Some(action_id)
            }
            Source::Newsletter { .. } => None,
        };
        let (happened, ahead): (Vec<_>, Vec<_>) = d.events.iter().partition(|(_, at)| *at <= now);
        SimDelivery {
            delivery_id: d.id.clone(),
            campaign_id,
            broadcast_id,
            trigger_id,
            newsletter_id,
            content_id,
            action_id,
            person_id: d.person_id.clone(),
            email: d.email.clone(),
            subject: d.subject.to_string(),
            data: d.merged_data(),
            sent_at: self.present(d.sent_ms),
            events: happened
                .iter()
                .map(|(m, at)| (*m, self.present(*at)))
                .collect(),
            scheduled: ahead
                .iter()
                .map(|(m, at)| (*m, self.present(*at)))
                .collect(),
        }
    }

    /// Per-metric counts in each bucket `[bounds[i], bounds[i+1])` (internal ms) of the events
    /// that have happened by `now`.
    pub(crate) fn series(
        &self,
        scope: Scope,
        bounds: &[i64],
        now: i64,
    ) -> BTreeMap<DeliveryMetric, Vec<u64>> {
        let buckets = bounds.len().saturating_sub(1);
        let mut series: BTreeMap<DeliveryMetric, Vec<u64>> = DeliveryMetric::ALL
            .iter()
            .map(|m| (*m, vec![0; buckets]))
            .collect();
        let (Some(first), Some(last)) = (bounds.first(), bounds.last()) else {
            return series;
        };
        let deliveries: Box<dyn Iterator<Item = &Delivery>> = match scope {
            Scope::Campaign(id) => Box::new(
                self.by_campaign
                    .get(&id)
                    .map_or(&[][..], Vec::as_slice)
                    .iter()
                    .filter_map(|i| self.deliveries.get(*i)),
            ),
            Scope::Newsletter(id) => self.scoped(&DeliveryFilter::newsletter(id)),
            Scope::Content(id) => self.scoped(&DeliveryFilter::content(id)),
        };
        for delivery in deliveries {
            for (metric, at) in &delivery.events {
                if *at > now || *at < *first || *at >= *last {
                    continue;
                }
                // Index of the last bound <= at.
                let index = bounds.partition_point(|b| *b <= *at).saturating_sub(1);
                if let Some(slot) = series.get_mut(metric).and_then(|s| s.get_mut(index)) {
                    *slot += 1;
                }
            }
        }
        series
    }
}

/// A validated newsletter, ready to be stored.
pub(crate) struct NewsletterSpec {
    pub(crate) name: String,
    pub(crate) subject: String,
    pub(crate) body: String,
    pub(crate) preheader_text: Option<String>,
    pub(crate) from: Option<String>,
    pub(crate) from_id: Option<i64>,
    pub(crate) recipients: AudienceFilter,
    pub(crate) tags: Vec<String>,
    pub(crate) subscription_topic_id: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_window_is_per_workspace_by_default() {
        let mut s = SendStore::default();
        assert_eq!(s.take_trigger_window(1, 0), Ok(()));
        assert_eq!(s.take_trigger_window(2, 4_000), Err(6_000));
        assert_eq!(s.take_trigger_window(1, 9_999), Err(1));
        assert_eq!(s.take_trigger_window(2, 10_000), Ok(()));
        assert_eq!(s.take_trigger_window(1, 12_000), Err(8_000));
    }

    #[test]
    fn trigger_window_per_broadcast() {
        let mut s = SendStore::default();
        s.set_trigger_scope(TriggerScope::PerBroadcast);
        assert_eq!(s.take_trigger_window(1, 0), Ok(()));
        assert_eq!(s.take_trigger_window(1, 4_000), Err(6_000));
        assert_eq!(s.take_trigger_window(2, 4_000), Ok(()));
        assert_eq!(s.take_trigger_window(1, 10_000), Ok(()));
        // Switching back to the workspace window counts the most recent trigger of any.
        s.set_trigger_scope(TriggerScope::Workspace);
        assert_eq!(s.take_trigger_window(3, 12_000), Err(8_000));
    }
}

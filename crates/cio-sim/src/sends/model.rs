//! The public types of the sends side: what tests add (`New*`), what they read back (`Sim*`
//! snapshots, [`SimDelivery`], [`MetricTotals`]), and what drives outcomes ([`DeliveryRates`],
//! [`RatesKey`]).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audience::AudienceFilter;
use crate::error::SimError;

/// What a campaign-like object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignKind {
    /// A campaign (journey) triggered by segment membership or events.
    Campaign,
    /// An API-triggered broadcast (built in the UI, fired by `POST .../triggers`).
    Broadcast,
}

/// State of a campaign or broadcast (the 2026 App API's `state`); `active` is `Running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignState {
    /// Sending (a broadcast accepts triggers only in this state).
    Running,
    /// Not started.
    Draft,
    /// Stopped.
    Stopped,
}

impl CampaignState {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CampaignState::Running => "running",
            CampaignState::Draft => "draft",
            CampaignState::Stopped => "stopped",
        }
    }
}

/// What starts a campaign (its deprecated `type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CampaignTrigger {
    /// Joining a segment.
    Segment,
    /// An event.
    Event,
}

/// A new API-triggered broadcast ([`crate::Simulator::add_broadcast`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewBroadcast {
    /// Name.
    pub name: String,
    /// The audience set in the UI: who a trigger with no recipients (`{}`) reaches.
    pub audience: AudienceFilter,
    /// Subject of its email; a trigger's `data.subject` (string) overrides it per send.
    pub subject: String,
    /// State (`Running` to accept triggers).
    pub state: CampaignState,
    /// Tags.
    pub tags: Vec<String>,
}

impl NewBroadcast {
    /// A running broadcast whose subject is its name.
    pub fn new(name: &str, audience: AudienceFilter) -> Self {
        Self {
            name: name.to_owned(),
            audience,
            subject: name.to_owned(),
            state: CampaignState::Running,
            tags: Vec::new(),
        }
    }
}

/// A new campaign ([`crate::Simulator::add_campaign`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NewCampaign {
    /// Name.
    pub name: String,
    /// Segment- or event-triggered.
    pub trigger: CampaignTrigger,
    /// Segments in its trigger.
    pub trigger_segment_ids: Vec<i64>,
    /// State.
    pub state: CampaignState,
    /// Subject of its email.
    pub subject: String,
    /// Tags.
    pub tags: Vec<String>,
}

impl NewCampaign {
    /// A running event-triggered campaign whose subject is its name.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            trigger: CampaignTrigger::Event,
            trigger_segment_ids: Vec::new(),
            state: CampaignState::Running,
            subject: name.to_owned(),
            tags: Vec::new(),
        }
    }
}

/// A new newsletter ([`crate::Simulator::add_newsletter`]), created as a draft.
#[derive(Debug, Clone, PartialEq)]
pub struct NewNewsletter {
    /// Name (at most 190 characters through the API).
    pub name: String,
    /// Email subject.
    pub subject: String,
    /// HTML body.
    pub body: String,
    /// Recipients filter, evaluated when it is sent.
    pub recipients: AudienceFilter,
    /// Tags (the API cannot set these; the UI can).
    pub tags: Vec<String>,
}

impl NewNewsletter {
    /// A draft newsletter.
    pub fn new(name: &str, subject: &str, body: &str, recipients: AudienceFilter) -> Self {
        Self {
            name: name.to_owned(),
            subject: subject.to_owned(),
            body: body.to_owned(),
            recipients,
            tags: Vec::new(),
        }
    }
}

/// Snapshot of a campaign or broadcast.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimCampaign {
    /// Id (campaigns and broadcasts share the sequence).
    pub id: i64,
    /// Campaign or broadcast.
    pub kind: CampaignKind,
    /// Name.
    pub name: String,
    /// State.
    pub state: CampaignState,
    /// Campaigns only: what triggers it.
    pub trigger: Option<CampaignTrigger>,
    /// Email subject (broadcasts: the default when a trigger's data has no `subject`).
    pub subject: String,
    /// Id of its one email action.
    pub action_id: i64,
    /// Broadcasts: the UI audience, as filter JSON.
    pub audience: Option<Value>,
    /// Tags.
    pub tags: Vec<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last updated.
    pub updated_at: DateTime<Utc>,
}

/// Snapshot of a newsletter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimNewsletter {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// Subject.
    pub subject: String,
    /// HTML body.
    pub body: String,
    /// `from` as given, if any.
    pub from: Option<String>,
    /// `from_id` as given, if any.
    pub from_id: Option<i64>,
    /// Its single content (variant) id.
    pub content_id: i64,
    /// Recipients filter JSON.
    pub recipients: Value,
    /// Segments referenced by the recipients filter.
    pub recipient_segment_ids: Vec<i64>,
    /// Tags.
    pub tags: Vec<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last updated.
    pub updated_at: DateTime<Utc>,
    /// When it was sent (`None`: draft or scheduled).
    pub sent_at: Option<DateTime<Utc>>,
    /// When it is scheduled to go, if scheduled and not sent yet.
    pub scheduled_at: Option<DateTime<Utc>>,
    /// Deliveries created by its send.
    pub recipients_count: u64,
}

/// Snapshot of a broadcast trigger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimTrigger {
    /// Trigger id.
    pub id: i64,
    /// Broadcast it triggered.
    pub broadcast_id: i64,
    /// When it was received.
    pub created_at: DateTime<Utc>,
    /// When it was processed (the simulator processes triggers at once).
    pub processed_at: Option<DateTime<Utc>>,
    /// Deliveries it created (0 when it had errors).
    pub recipients_count: u64,
    /// Recipients' ids (`cio_<cio_id>` for people without one), in delivery order.
    pub recipients: Vec<String>,
    /// The trigger's `data`, if any.
    pub data: Option<Value>,
    /// The request body as received.
    pub request: Value,
    /// Errors (`line N: ...`), non-empty when it was answered 422.
    pub errors: Vec<String>,
}

/// One delivery metric (also the key of its metrics series).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMetric {
    /// Sent (at the send time).
    Sent,
    /// Delivered to the inbox.
    Delivered,
    /// Bounced (never delivered).
    Bounced,
    /// First open of either kind.
    Opened,
    /// Opened by a person.
    HumanOpened,
    /// Opened by a machine (image prefetch).
    PrefetchOpened,
    /// First click of either kind.
    Clicked,
    /// Clicked by a person.
    HumanClicked,
    /// Clicked by a machine (link scanner).
    PrefetchClicked,
    /// Converted.
    Converted,
    /// Marked as spam.
    Spammed,
    /// Unsubscribed.
    Unsubscribed,
}

impl DeliveryMetric {
    /// Every metric.
    pub const ALL: [DeliveryMetric; 12] = [
        DeliveryMetric::Sent,
        DeliveryMetric::Delivered,
        DeliveryMetric::Bounced,
        DeliveryMetric::Opened,
        DeliveryMetric::HumanOpened,
        DeliveryMetric::PrefetchOpened,
        DeliveryMetric::Clicked,
        DeliveryMetric::HumanClicked,
        DeliveryMetric::PrefetchClicked,
        DeliveryMetric::Converted,
        DeliveryMetric::Spammed,
        DeliveryMetric::Unsubscribed,
    ];

    /// The metrics series key (`"human_opened"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMetric::Sent => "sent",
            DeliveryMetric::Delivered => "delivered",
            DeliveryMetric::Bounced => "bounced",
            DeliveryMetric::Opened => "opened",
            DeliveryMetric::HumanOpened => "human_opened",
            DeliveryMetric::PrefetchOpened => "prefetch_opened",
            DeliveryMetric::Clicked => "clicked",
            DeliveryMetric::HumanClicked => "human_clicked",
            DeliveryMetric::PrefetchClicked => "prefetch_clicked",
            DeliveryMetric::Converted => "converted",
            DeliveryMetric::Spammed => "spammed",
            DeliveryMetric::Unsubscribed => "unsubscribed",
        }
    }
}

/// Per-metric counts of a set of deliveries ([`crate::Simulator::delivery_totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MetricTotals {
    /// Deliveries that reached `sent`.
    pub sent: u64,
    /// ... `delivered`.
    pub delivered: u64,
    /// ... `bounced`.
    pub bounced: u64,
    /// ... `opened` (either kind).
    pub opened: u64,
    /// ... `human_opened`.
    pub human_opened: u64,
    /// ... `prefetch_opened`.
    pub prefetch_opened: u64,
    /// ... `clicked` (either kind).
    pub clicked: u64,
    /// ... `human_clicked`.
    pub human_clicked: u64,
    /// ... `prefetch_clicked`.
    pub prefetch_clicked: u64,
    /// ... `converted`.
    pub converted: u64,
    /// ... `spammed`.
    pub spammed: u64,
    /// ... `unsubscribed`.
    pub unsubscribed: u64,
}

impl MetricTotals {
    pub(crate) fn slot(&mut self, metric: DeliveryMetric) -> &mut u64 {
        match metric {
            DeliveryMetric::Sent => &mut self.sent,
            DeliveryMetric::Delivered => &mut self.delivered,
            DeliveryMetric::Bounced => &mut self.bounced,
            DeliveryMetric::Opened => &mut self.opened,
            DeliveryMetric::HumanOpened => &mut self.human_opened,
            DeliveryMetric::PrefetchOpened => &mut self.prefetch_opened,
            DeliveryMetric::Clicked => &mut self.clicked,
            DeliveryMetric::HumanClicked => &mut self.human_clicked,
            DeliveryMetric::PrefetchClicked => &mut self.prefetch_clicked,
            DeliveryMetric::Converted => &mut self.converted,
            DeliveryMetric::Spammed => &mut self.spammed,
            DeliveryMetric::Unsubscribed => &mut self.unsubscribed,
        }
    }

    /// The count of one metric.
    pub fn get(&self, metric: DeliveryMetric) -> u64 {
        let mut copy = *self;
        *copy.slot(metric)
    }
}

/// Probabilities that drive delivery outcomes (each within `0..=1`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryRates {
    /// P(bounced | sent); the rest are delivered.
    pub bounce_rate: f64,
    /// P(opened by a person | delivered).
    pub open_rate: f64,
    /// P(opened by a machine | delivered), independent of human opens.
    pub machine_open_rate: f64,
    /// P(clicked by a person | opened by a person).
    pub click_rate: f64,
    /// P(clicked by a machine | delivered), independent of human clicks.
    pub machine_click_rate: f64,
    /// P(converted | clicked by a person).
    pub conversion_rate: f64,
    /// P(marked as spam | delivered).
    pub spam_rate: f64,
    /// P(unsubscribed | opened by a person).
    pub unsubscribe_rate: f64,
}

impl Default for DeliveryRates {
    fn default() -> Self {
        Self {
            bounce_rate: 0.02,
            open_rate: 0.35,
            machine_open_rate: 0.15,
            click_rate: 0.12,
            machine_click_rate: 0.02,
            conversion_rate: 0.05,
            spam_rate: 0.001,
            unsubscribe_rate: 0.01,
        }
    }
}

impl DeliveryRates {
    /// Everything happens to everyone: no bounce, every delivery opened and clicked (by people
    /// and machines), converted, marked as spam and unsubscribed.
    pub fn all() -> Self {
        Self {
            bounce_rate: 0.0,
            open_rate: 1.0,
            machine_open_rate: 1.0,
            click_rate: 1.0,
            machine_click_rate: 1.0,
            conversion_rate: 1.0,
            spam_rate: 1.0,
            unsubscribe_rate: 1.0,
        }
    }

    /// Nothing after delivery: no bounce, no open, no click.
    pub fn none() -> Self {
        Self {
            bounce_rate: 0.0,
            open_rate: 0.0,
            machine_open_rate: 0.0,
            click_rate: 0.0,
            machine_click_rate: 0.0,
            conversion_rate: 0.0,
            spam_rate: 0.0,
            unsubscribe_rate: 0.0,
        }
    }

    /// These rates with human clicks per delivered message (click-through) set to
    /// `click_through`: `click_rate` (a probability given a human open) becomes
    /// `click_through / open_rate`. `click_through` above `open_rate` cannot be met: the click
    /// rate is then 1.
    pub fn with_click_through(mut self, click_through: f64) -> Self {
        self.click_rate = if self.open_rate > 0.0 {
            (click_through / self.open_rate).clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// Checks every rate is within `0..=1`; the error names the first that is not.
    pub fn validate(&self) -> Result<(), SimError> {
        let rates = [
            ("bounce_rate", self.bounce_rate),
            ("open_rate", self.open_rate),
            ("machine_open_rate", self.machine_open_rate),
            ("click_rate", self.click_rate),
            ("machine_click_rate", self.machine_click_rate),
            ("conversion_rate", self.conversion_rate),
            ("spam_rate", self.spam_rate),
            ("unsubscribe_rate", self.unsubscribe_rate),
        ];
        match rates.iter().find(|(_, r)| !(0.0..=1.0).contains(r)) {
            Some((name, rate)) => Err(SimError::InvalidRates(format!(
                "{name} must be within 0..=1, got {rate}"
            ))),
            None => Ok(()),
        }
    }
}

/// Which deliveries a rates rule applies to (see [`crate::Simulator::set_rates`]): the true
/// rates of a piece of content, e.g. the variants of an A/B test.
///
/// Control API JSON: `{"subject":"..."}`, `{"data":{"field":"variation","value":"a"}}`,
/// `{"campaign":3}`, `{"newsletter":1}`, `{"subject_contains":"[B]"}`,
/// `{"content_contains":"hero-v2"}`, `{"name_contains":"Variant C"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RatesKey {
    /// The delivery's subject equals this (newsletter subject; trigger `data.subject`, per-user
    /// data first, else the broadcast's subject).
    Subject(String),
    /// A trigger's data field (per-user data first) equals this value (loosely: `"1"` = `1`).
    Data {
        /// Top-level key of `data`.
        field: String,
        /// Value it must equal.
        value: Value,
    },
    /// Deliveries of this campaign or broadcast.
    Campaign(i64),
    /// Deliveries of this newsletter.
    Newsletter(i64),
    /// The delivery's subject contains this text (a marker in the subject line).
    SubjectContains(String),
    /// The content contains this text: a newsletter's body, or a broadcast or campaign
    /// delivery's data (the trigger's `data` with the recipient's per-user data, as JSON: the
    /// content a broadcast renders from `{{trigger.*}}`).
    ContentContains(String),
    /// The newsletter's, campaign's or broadcast's name contains this text.
    NameContains(String),
}

/// Per-rule counts of the ledger ([`crate::Simulator::totals_by_rates_rule`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleTotals {
    /// The rule whose rates drew these deliveries (`None`: the default rates).
    pub key: Option<RatesKey>,
    /// Deliveries drawn from it.
    pub deliveries: u64,
    /// What has happened by now.
    pub totals: MetricTotals,
    /// Once every drawn event has happened.
    pub eventual: MetricTotals,
}

/// A person's behaviour towards email ([`crate::Simulator::engagement`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PersonEngagement {
    /// Engagement as a percentile of the population (0..1): higher opens and clicks more.
    pub percentile: f64,
    /// Their mail client prefetches every message (Apple Mail Privacy Protection): machine
    /// opens, flagged `prefetched`.
    pub prefetches: bool,
    /// A link scanner clicks their links: machine clicks, flagged `machine`.
    pub link_scanned: bool,
}

/// Which deliveries to return or count ([`crate::Simulator::deliveries`]); `None` fields match
/// everything, set fields must all match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeliveryFilter {
    /// Deliveries of this campaign (recorded campaign sends).
    pub campaign_id: Option<i64>,
    /// Deliveries of any trigger of this broadcast.
    pub broadcast_id: Option<i64>,
    /// Deliveries of this trigger.
    pub trigger_id: Option<i64>,
    /// Deliveries of this newsletter.
    pub newsletter_id: Option<i64>,
    /// Deliveries of this newsletter content.
    pub content_id: Option<i64>,
    /// Deliveries with this subject.
    pub subject: Option<String>,
    /// Deliveries to this person (id, or `cio_<cio_id>`).
    pub person_id: Option<String>,
}

impl DeliveryFilter {
    /// Every delivery.
    pub fn all() -> Self {
        Self::default()
    }

    /// One campaign's deliveries.
    pub fn campaign(id: i64) -> Self {
        Self {
            campaign_id: Some(id),
            ..Self::default()
        }
    }

    /// One broadcast's deliveries (all its triggers).
    pub fn broadcast(id: i64) -> Self {
        Self {
            broadcast_id: Some(id),
            ..Self::default()
        }
    }

    /// One trigger's deliveries.
    pub fn trigger(id: i64) -> Self {
        Self {
            trigger_id: Some(id),
            ..Self::default()
        }
    }

    /// One newsletter's deliveries.
    pub fn newsletter(id: i64) -> Self {
        Self {
            newsletter_id: Some(id),
            ..Self::default()
        }
    }

    /// One newsletter content's deliveries.
    pub fn content(id: i64) -> Self {
        Self {
            content_id: Some(id),
            ..Self::default()
        }
    }

    /// Also require this subject.
    pub fn with_subject(mut self, subject: &str) -> Self {
        self.subject = Some(subject.to_owned());
        self
    }
}

/// Snapshot of one delivery ([`crate::Simulator::deliveries`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimDelivery {
    /// Delivery id (opaque).
    pub delivery_id: String,
    /// Recorded campaign send: the campaign.
    pub campaign_id: Option<i64>,
    /// Trigger delivery: the broadcast.
    pub broadcast_id: Option<i64>,
    /// Trigger delivery: the trigger.
    pub trigger_id: Option<i64>,
    /// Newsletter delivery: the newsletter.
    pub newsletter_id: Option<i64>,
    /// Newsletter delivery: its content.
    pub content_id: Option<i64>,
    /// Campaign and broadcast deliveries: the email action.
    pub action_id: Option<i64>,
    /// Recipient id (`cio_<cio_id>` for a person without one).
    pub person_id: String,
    /// Recipient email.
    pub email: String,
    /// Subject.
    pub subject: String,
    /// Trigger deliveries: the trigger's `data` merged with the recipient's per-user data.
    pub data: Option<Value>,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
    /// Events that have happened (as of now), each at its time.
    pub events: BTreeMap<DeliveryMetric, DateTime<Utc>>,
    /// Events drawn for later, not happened yet (the truth ahead; they count nowhere yet).
    pub scheduled: BTreeMap<DeliveryMetric, DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_validation_names_the_rate() {
        let bad = DeliveryRates {
            click_rate: 1.5,
            ..DeliveryRates::default()
        };
        assert_eq!(
            bad.validate(),
            Err(SimError::InvalidRates(
                "click_rate must be within 0..=1, got 1.5".into()
            ))
        );
        assert_eq!(DeliveryRates::default().validate(), Ok(()));
    }
}

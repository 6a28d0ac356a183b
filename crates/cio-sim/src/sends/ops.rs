//! Send operations that need people (they live on [`World`]): broadcast triggers (validation
//! order in `campaigns_api`), newsletter sends and schedules, recorded campaign sends.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::audience::{AudienceFilter, FilterError};
use crate::error::SimError;
use crate::state::{IdType, World};

use super::{
    CampaignKind, CampaignState, MAX_TRIGGER_DATA_BYTES, MAX_TRIGGER_RECIPIENTS, Recipient,
    SendStore, Source, Trigger,
};

/// Why a trigger was not accepted.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum TriggerError {
    /// No API-triggered broadcast with this id.
    NotFound,
    /// Within the broadcast's trigger window: retry after this many milliseconds.
    RateLimited(i64),
    /// Invalid request (422), nothing recorded: a JSON pointer and a message.
    Invalid(String, String),
    /// Recorded as trigger `id` with errors (422), nothing sent: pointer of the audience key.
    Rejected {
        trigger_id: i64,
        pointer: String,
        errors: usize,
    },
}

fn bad(pointer: &str, message: impl Into<String>) -> TriggerError {
    TriggerError::Invalid(pointer.to_owned(), message.into())
}

fn filter_error(prefix: &str, e: FilterError) -> TriggerError {
    TriggerError::Invalid(format!("{prefix}{}", e.pointer), e.message)
}

fn flag(body: &Map<String, Value>, name: &str) -> Result<bool, TriggerError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad(
            &format!("/{name}"),
            format!("{name} must be a boolean"),
        )),
    }
}

const AUDIENCE_KEYS: [&str; 5] = [
    "recipients",
    "ids",
    "emails",
    "per_user_data",
    "data_file_url",
];

impl World {
    /// Sends newsletters whose scheduled time has come (as sent at that time).
    pub(crate) fn settle_sends(&mut self) {
        let now = self.sends.now_ms();
        let due: Vec<(i64, i64)> = self
            .sends
            .newsletters()
            .filter(|n| n.sent_ms.is_none())
            .filter_map(|n| n.scheduled_ms.filter(|at| *at <= now).map(|at| (n.id, at)))
            .collect();
        for (id, at) in due {
            self.send_newsletter_at(id, at);
        }
    }

    fn recipients_of(&self, filter: &AudienceFilter) -> Vec<Recipient> {
        self.audience(filter)
            .into_iter()
            .filter_map(|p| Recipient::eligible(p, None))
            .collect()
    }

    /// Sends a draft newsletter now; `Ok(recipients)`, `Err(false)` unknown, `Err(true)` not a
    /// draft (sent or scheduled).
    pub(crate) fn send_newsletter_now(&mut self, id: i64) -> Result<usize, bool> {
        self.settle_sends();
        match self.sends.newsletter(id) {
            None => Err(false),
            Some(n) if n.sent_ms.is_some() || n.scheduled_ms.is_some() => Err(true),
            Some(_) => {
                let now = self.sends.now_ms();
                Ok(self.send_newsletter_at(id, now))
            }
        }
    }

    /// Schedules a draft newsletter; same errors as [`World::send_newsletter_now`].
    pub(crate) fn schedule_newsletter(&mut self, id: i64, at: i64) -> Result<(), bool> {
        self.settle_sends();
        let now = self.sends.now_ms();
        match self.sends.newsletters.get_mut(&id) {
            None => Err(false),
            Some(n) if n.sent_ms.is_some() || n.scheduled_ms.is_some() => Err(true),
            Some(n) => {
                n.scheduled_ms = Some(at);
                n.updated_ms = now;
                Ok(())
            }
        }
    }

    /// Sends a newsletter as of `at` (internal ms), whatever its state.
    pub(crate) fn send_newsletter_at(&mut self, id: i64, at: i64) -> usize {
        let Some(n) = self.sends.newsletter(id) else {
            return 0;
        };
        let filter = n.recipients.clone();
        let subject = n.subject.clone();
        let content_id = n.content_id;
        let recipients = self.recipients_of(&filter);
        let sent = self.sends.deliver(
            Source::Newsletter {
                newsletter_id: id,
                content_id,
            },
            &subject,
            None,
            recipients,
            at,
        );
        if let Some(n) = self.sends.newsletters.get_mut(&id) {
            n.sent_ms = Some(at);
            n.updated_ms = at;
        }
        sent.len()
    }

    /// Records a send of a campaign's email to these people (ids; unknown or ineligible people
    /// are skipped); returns how many deliveries were created.
    pub(crate) fn campaign_send(
        &mut self,
        campaign_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.settle_sends();
        let now = self.sends.now_ms();
        self.campaign_send_at(campaign_id, person_ids, now)
    }

    /// [`World::campaign_send`] as of `at` (internal ms).
    pub(crate) fn campaign_send_at(
        &mut self,
        campaign_id: i64,
        person_ids: &[&str],
        at: i64,
    ) -> Result<usize, SimError> {
        let (action_id, subject) = match self.sends.campaign(campaign_id) {
            Some(c) if c.kind == CampaignKind::Campaign => (c.action_id, c.subject.clone()),
            _ => return Err(SimError::CampaignNotFound(campaign_id)),
        };
        let mut seen = HashSet::new();
        let recipients: Vec<Recipient> = person_ids
            .iter()
            .filter_map(|id| self.resolve(id, IdType::Id))
            .filter(|seq| seen.insert(*seq))
            .filter_map(|seq| self.person(seq))
            .filter_map(|p| Recipient::eligible(p, None))
            .collect();
        let sent = self.sends.deliver(
            Source::Campaign {
                campaign_id,
                action_id,
            },
            &subject,
            None,
            recipients,
            at,
        );
        Ok(sent.len())
    }

    /// `POST /v1/campaigns/{broadcast_id}/triggers` with a JSON object body.
    pub(crate) fn trigger_broadcast(
        &mut self,
        broadcast_id: i64,
        body: &Map<String, Value>,
    ) -> Result<i64, TriggerError> {
        self.settle_sends();
        let (state, action_id, subject, ui_audience) = match self.sends.campaign(broadcast_id) {
            Some(c) if c.kind == CampaignKind::Broadcast => {
                (c.state, c.action_id, c.subject.clone(), c.audience.clone())
            }
            _ => return Err(TriggerError::NotFound),
        };
        let now = self.sends.now_ms();
        self.sends
            .take_trigger_window(broadcast_id, now)
            .map_err(TriggerError::RateLimited)?;
        if state != CampaignState::Running {
            return Err(bad(
                "",
                format!(
                    "broadcast {broadcast_id} is not active (state {}): activate it before triggering",
                    state.as_str()
                ),
            ));
        }

        let given: Vec<&str> = AUDIENCE_KEYS
            .iter()
            .copied()
            .filter(|k| body.get(*k).is_some_and(|v| !v.is_null()))
            .collect();
        if given.len() > 1 {
            return Err(bad(
                "",
                format!(
                    "give only one of recipients, ids, emails, per_user_data, data_file_url; got {}",
                    given.join(", ")
                ),
            ));
        }
        let data = match body.get("data") {
            None | Some(Value::Null) => None,
            Some(data @ Value::Object(_)) => {
                let size = serde_json::to_vec(data).map_or(usize::MAX, |b| b.len());
                if size > MAX_TRIGGER_DATA_BYTES {
                    return Err(bad(
                        "/data",
                        format!(
                            "data is {size} bytes; at most {MAX_TRIGGER_DATA_BYTES} are accepted"
                        ),
                    ));
                }
                Some(Arc::new(data.clone()))
            }
            Some(_) => return Err(bad("/data", "data must be a JSON object")),
        };
        let id_ignore_missing = flag(body, "id_ignore_missing")?;
        let email_ignore_missing = flag(body, "email_ignore_missing")?;
        flag(body, "email_add_duplicates")?;

        // (person seq, per-user data) in request order, plus missing-recipient errors.
        let mut wanted: Vec<(u64, Option<Value>)> = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        let key = given.first().copied();
        match key {
            None | Some("recipients") => {
                let filter = match (key, ui_audience) {
                    (None, Some(audience)) => audience,
                    (None, None) => {
                        return Err(bad("", "the broadcast has no audience: give recipients"));
                    }
                    (Some(_), _) => {
                        let raw = body.get("recipients").unwrap_or(&Value::Null);
                        AudienceFilter::parse(raw, "")
                            .map_err(|e| filter_error("/recipients", e))?
                    }
                };
                if let Some(missing) = self.unknown_segment(&filter) {
                    return Err(bad(
                        "/recipients",
                        format!("segment {missing} does not exist"),
                    ));
                }
                wanted = self
                    .audience(&filter)
                    .iter()
                    .map(|p| (p.seq, None))
                    .collect();
            }
            Some(list @ ("ids" | "emails")) => {
                let items = recipient_list(body, list)?;
                let (kind, ignore) = if list == "ids" {
                    (IdType::Id, id_ignore_missing)
                } else {
                    (IdType::Email, email_ignore_missing)
                };
                for (i, item) in items.iter().enumerate() {
                    let Some(value) = item.as_str().filter(|s| !s.is_empty()) else {
                        return Err(bad(
                            &format!("/{list}/{i}"),
                            format!("{list} must be non-empty strings"),
                        ));
                    };
                    match self.resolve(value, kind) {
                        Some(seq) => wanted.push((seq, None)),
                        None if ignore => {}
                        None => errors.push(missing_line(i, list, value)),
                    }
                }
            }
            Some("per_user_data") => {
                let items = recipient_list(body, "per_user_data")?;
                for (i, item) in items.iter().enumerate() {
                    let pointer = format!("/per_user_data/{i}");
                    let Value::Object(entry) = item else {
                        return Err(bad(
                            &pointer,
                            "each entry must be an object with id or email, and data",
                        ));
                    };
                    let user_data = match entry.get("data") {
                        None | Some(Value::Null) => None,
                        Some(d @ Value::Object(_)) => Some(d.clone()),
                        Some(_) => {
                            return Err(bad(&format!("{pointer}/data"), "data must be an object"));
                        }
                    };
                    let id = entry
                        .get("id")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty());
                    let email = entry
                        .get("email")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty());
                    let (kind, value, ignore, what) = match (id, email) {
                        (Some(id), None) => (IdType::Id, id, id_ignore_missing, "ids"),
                        (None, Some(email)) => {
                            (IdType::Email, email, email_ignore_missing, "emails")
                        }
                        _ => {
                            return Err(bad(
                                &pointer,
                                "each entry needs exactly one of id or email (a string)",
                            ));
                        }
                    };
                    match self.resolve(value, kind) {
                        Some(seq) => wanted.push((seq, user_data)),
                        None if ignore => {}
                        None => errors.push(missing_line(i, what, value)),
                    }
                }
            }
            Some(other) => {
                return Err(bad(
                    &format!("/{other}"),
                    "data files are not supported by the simulator: use recipients, ids, emails or per_user_data",
                ));
            }
        }

        let trigger_id = self.sends.next_trigger_id;
        self.sends.next_trigger_id += 1;
        let mut trigger = Trigger {
            id: trigger_id,
            broadcast_id,
            created_ms: now,
            processed_ms: Some(now),
            request: Value::Object(body.clone()),
            data: data.clone(),
            recipients: Vec::new(),
            errors: Vec::new(),
        };
        if !errors.is_empty() {
            let count = errors.len();
            trigger.errors = errors;
            self.sends.triggers.insert(trigger_id, trigger);
            return Err(TriggerError::Rejected {
                trigger_id,
                pointer: format!("/{}", key.unwrap_or("")),
                errors: count,
            });
        }
        let mut seen = HashSet::new();
        let recipients: Vec<Recipient> = wanted
            .into_iter()
            .filter(|(seq, _)| seen.insert(*seq))
            .filter_map(|(seq, user_data)| {
                self.person(seq)
                    .and_then(|p| Recipient::eligible(p, user_data))
            })
            .collect();
        trigger.recipients = self.sends.deliver(
            Source::Broadcast {
                broadcast_id,
                action_id,
                trigger_id,
            },
            &subject,
            data,
            recipients,
            now,
        );
        self.sends.triggers.insert(trigger_id, trigger);
        Ok(trigger_id)
    }
}

fn missing_line(index: usize, list: &str, value: &str) -> String {
    let what = if list == "emails" {
        "email"
    } else {
        "customer id"
    };
    format!(
        "line {}: {what} {value:?} does not exist in the workspace",
        index + 1
    )
}

fn recipient_list<'a>(
    body: &'a Map<String, Value>,
    key: &str,
) -> Result<&'a Vec<Value>, TriggerError> {
    let Some(Value::Array(items)) = body.get(key) else {
        return Err(bad(&format!("/{key}"), format!("{key} must be an array")));
    };
    if items.is_empty() {
        return Err(bad(&format!("/{key}"), format!("{key} must not be empty")));
    }
    if items.len() > MAX_TRIGGER_RECIPIENTS {
        return Err(bad(
            &format!("/{key}"),
            format!(
                "{key} has {} entries; at most {MAX_TRIGGER_RECIPIENTS} are accepted",
                items.len()
            ),
        ));
    }
    Ok(items)
}

/// JSON of a trigger's status (`GET /v1/campaigns/{broadcast_id}/triggers/{trigger_id}`).
pub(crate) fn trigger_status_json(store: &SendStore, t: &Trigger) -> Value {
    let action_ids: Vec<i64> = store
        .campaign(t.broadcast_id)
        .map(|c| vec![c.action_id])
        .unwrap_or_default();
    json!({
        // The spec types this id as a string (and as an integer everywhere else).
        "id": t.id.to_string(),
        "broadcast_id": t.broadcast_id,
        "created_at": store.present_secs(t.created_ms),
        "processed_at": t.processed_ms.map(|p| store.present_secs(p)),
        "recipients_count": store.trigger_recipients(t.id),
        "workflow_action_ids": action_ids,
        "recipients_filter": t.request,
        "data_file_processed": false,
        "data_file_error_count": 0,
    })
}

//! What the simulator recorded: events, the request log and request counters.

use std::collections::BTreeMap;

use super::{Simulator, lock};
use crate::config::SimApi;
use crate::events::SimEvent;
use crate::gateway::{LoggedRequest, RequestLog};
use crate::state::parse_identifier;

impl Simulator {
    /// Every recorded event (person and anonymous), oldest first. Events whose `id` repeated an
    /// earlier one are not here (see [`Simulator::duplicate_events_dropped`]); events of deleted
    /// people are gone with them.
    pub fn events(&self) -> Vec<SimEvent> {
        self.with_world(|w| w.events().all().map(|e| w.event_snapshot(e)).collect())
    }

    /// Events of one person, oldest first. `person_id` is read like a Track v1 path identifier:
    /// an id, an email (contains `@`) or `cio_<cio_id>`. Unknown person: empty.
    pub fn events_for(&self, person_id: &str) -> Vec<SimEvent> {
        let (kind, value) = parse_identifier(person_id);
        self.with_world(|w| match w.resolve(value, kind) {
            Some(seq) => w
                .events()
                .of_person(seq)
                .map(|e| w.event_snapshot(e))
                .collect(),
            None => Vec::new(),
        })
    }

    /// Number of recorded events.
    pub fn event_count(&self) -> usize {
        self.with_world(|w| w.events().len())
    }

    /// Number of events dropped because their `id` had been received before (v1 and v2).
    pub fn duplicate_events_dropped(&self) -> u64 {
        self.with_world(|w| w.events().duplicates())
    }

    pub(crate) fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        f(&mut lock(&self.inner.log))
    }

    /// The most recent App and Track requests (at most `SimConfig::request_log_capacity`),
    /// oldest first; control requests are not logged. Bodies over 64 KiB appear as
    /// `{"_truncated": size}`.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.with_log(|log| log.snapshot())
    }

    /// Empties the request log (the counters keep counting).
    pub fn clear_requests(&self) {
        self.with_log(RequestLog::clear);
    }

    /// Requests received by an API since start (faulted, rate-limited and rejected ones included;
    /// never reset, unlike the log).
    pub fn request_count(&self, api: SimApi) -> u64 {
        self.with_log(|log| log.request_count(api))
    }

    /// Requests received per route template since start, keyed like `"POST /api/v2/batch"` or
    /// `"GET /v1/customers/{customer_id}/attributes"`; paths matching no route count under
    /// `"<METHOD> (no route)"`.
    pub fn request_counts_by_route(&self) -> BTreeMap<String, u64> {
        self.with_log(|log| log.by_route().clone())
    }
}

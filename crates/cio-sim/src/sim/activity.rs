//! The activity feed from the simulator's side, and attribute changes that bypass the Track
//! API (a form fill, another system writing to the workspace).

use serde_json::{Map, Value};

use super::Simulator;
use crate::activities::{SimActivity, Wanted};
use crate::state::parse_identifier;

impl Simulator {
    /// Changes attributes of an existing person without the Track API, as a form fill or
    /// another integration would (`null`/`""` remove one, `email` changes the email). The
    /// person is read like a Track v1 path identifier: an id, an email (contains `@`) or
    /// `cio_<cio_id>`. Recorded in the activity feed like any change. False when nobody has
    /// that identifier (nothing is created).
    pub fn change_attributes(&self, identifier: &str, attributes: Map<String, Value>) -> bool {
        let (kind, value) = parse_identifier(identifier);
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| match w.resolve(value, kind) {
            Some(seq) => {
                w.merge(seq, attributes, now);
                true
            }
            None => false,
        })
    }

    /// The activity feed as `GET /v1/activities` serves it (last 30 days, newest first), of
    /// everyone or of one person (read like [`Simulator::change_attributes`]; unknown: empty).
    pub fn activities(&self, person: Option<&str>) -> Vec<SimActivity> {
        self.with_world(|w| {
            w.settle_sends();
            let mut wanted = Wanted::default();
            if let Some(person) = person {
                let (kind, value) = parse_identifier(person);
                match w.resolve(value, kind) {
                    Some(seq) => wanted.person = Some(seq),
                    None => return Vec::new(),
                }
            }
            let (views, _) = w.activities_page(&wanted, None, usize::MAX);
            views.iter().map(|v| w.activity_snapshot(v)).collect()
        })
    }
}

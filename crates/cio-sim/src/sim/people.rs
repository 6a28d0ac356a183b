//! People and segments: the workspace's audience, read and changed directly.

use serde_json::{Map, Value};

use super::Simulator;
use crate::error::SimError;
use crate::state::{IdType, Membership, Predicate, SimPerson, SimSegment};

impl Simulator {
    /// Creates or updates the person with this id; attributes are merged (`null`/`""` remove
    /// one; `email` sets the email identifier). No Customer.io limits are applied.
    pub fn upsert_person(&self, id: &str, attributes: Map<String, Value>) {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| w.upsert_by_id(id, attributes, now));
    }

    /// Removes the person with this id (and their manual-segment memberships).
    pub fn remove_person(&self, id: &str) -> bool {
        self.with_world(|w| w.resolve(id, IdType::Id).is_some_and(|seq| w.remove(seq)))
    }

    /// The person with this id.
    pub fn person(&self, id: &str) -> Option<SimPerson> {
        self.with_world(|w| {
            w.resolve(id, IdType::Id)
                .and_then(|seq| w.person(seq))
                .map(|p| p.snapshot())
        })
    }

    /// The person with this email (case-insensitive), e.g. one created by email alone.
    pub fn person_by_email(&self, email: &str) -> Option<SimPerson> {
        self.with_world(|w| {
            w.resolve(email, IdType::Email)
                .and_then(|seq| w.person(seq))
                .map(|p| p.snapshot())
        })
    }

    /// Number of people.
    pub fn people_count(&self) -> usize {
        self.with_world(|w| w.people_count())
    }

    /// Adds a data-driven segment; returns its id.
    pub fn add_dynamic_segment(&self, name: &str, description: &str, predicate: Predicate) -> i64 {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            w.add_segment(name, description, Membership::Dynamic(predicate), None, now)
        })
    }

    /// Adds an empty manual segment; returns its id.
    pub fn create_manual_segment(&self, name: &str, description: &str) -> i64 {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            w.add_segment(
                name,
                description,
                Membership::Manual(Default::default()),
                None,
                now,
            )
        })
    }

    /// Adds people (by id; unknown ids are ignored) to a manual segment; returns how many were
    /// not members before.
    pub fn add_to_manual_segment(
        &self,
        segment_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.change_manual(segment_id, person_ids, true)
    }

    /// Removes people (by id) from a manual segment; returns how many were members.
    pub fn remove_from_manual_segment(
        &self,
        segment_id: i64,
        person_ids: &[&str],
    ) -> Result<usize, SimError> {
        self.change_manual(segment_id, person_ids, false)
    }

    fn change_manual(&self, segment_id: i64, ids: &[&str], add: bool) -> Result<usize, SimError> {
        let now = chrono::Utc::now().timestamp();
        self.with_world(|w| {
            let people: Vec<u64> = ids
                .iter()
                .filter_map(|i| w.resolve(i, IdType::Id))
                .collect();
            w.change_manual(segment_id, &people, add, now)
        })
    }

    /// Deletes a segment of either kind.
    pub fn delete_segment(&self, id: i64) -> bool {
        self.with_world(|w| w.delete_segment(id))
    }

    /// All segments with their current member counts, by id.
    pub fn segments(&self) -> Vec<SimSegment> {
        self.with_world(|w| w.segment_list().map(|s| w.snapshot_segment(s)).collect())
    }

    /// Member ids of a segment, sorted (people without an id appear as `cio_<cio_id>`).
    pub fn segment_members(&self, id: i64) -> Option<Vec<String>> {
        self.with_world(|w| {
            let segment = w.segment(id)?;
            let mut ids: Vec<String> = w
                .members(segment)
                .into_iter()
                .map(|p| p.id.clone().unwrap_or_else(|| format!("cio_{}", p.cio_id)))
                .collect();
            ids.sort();
            Some(ids)
        })
    }
}

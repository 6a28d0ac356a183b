//! Audience filters: the `recipients` of broadcast triggers and newsletters (and the UI audience
//! of a broadcast), evaluated over the simulator's people and segments.
//!
//! Shape (journeys-api-2022 "Audience Filter", plus `inverse` from the 2026 newsletter spec):
//! `{"and":[F,..]}` | `{"or":[F,..]}` | `{"not":F}` | `{"segment":{"id":N}}` |
//! `{"attribute":{"field":"x","operator":"eq"|"exists","value":"v","inverse":bool}}`.
//! Exactly one key per filter object; `and`/`or` need at least one condition; `eq` needs a
//! `value` (string, number or boolean, compared loosely like segment predicates: `"80"` equals
//! `80`); `exists` matches a present, non-null attribute; `inverse: true` negates the condition.
//! `id`, `email` and `cio_id` address the identifiers.

use serde_json::{Map, Value, json};

use crate::state::{Person, World, loose_eq};

/// Comparison of an attribute condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttributeOperator {
    /// The attribute equals `value`.
    Eq,
    /// The attribute is present and not null.
    Exists,
}

/// A Customer.io audience filter (see the module docs for the JSON shape).
#[derive(Debug, Clone, PartialEq)]
pub enum AudienceFilter {
    /// All of them.
    And(Vec<AudienceFilter>),
    /// Any of them.
    Or(Vec<AudienceFilter>),
    /// Negation.
    Not(Box<AudienceFilter>),
    /// Member of the segment with this id.
    Segment(i64),
    /// Attribute condition.
    Attribute {
        /// Attribute name (`id`, `email`, `cio_id` address the identifiers).
        field: String,
        /// `eq` or `exists`.
        operator: AttributeOperator,
        /// Compared value (`eq` only).
        value: Option<Value>,
        /// Negates the condition ("is not equal", "does not exist").
        inverse: bool,
    },
}

/// Why a filter was refused: a JSON pointer relative to the filter and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FilterError {
    pub(crate) pointer: String,
    pub(crate) message: String,
}

fn invalid(pointer: &str, message: impl Into<String>) -> FilterError {
    FilterError {
        pointer: pointer.to_owned(),
        message: message.into(),
    }
}

impl AudienceFilter {
    /// Segment condition.
    pub fn segment(id: i64) -> Self {
        AudienceFilter::Segment(id)
    }

    /// `attribute eq value` condition.
    pub fn attribute_eq(field: &str, value: impl Into<Value>) -> Self {
        AudienceFilter::Attribute {
            field: field.to_owned(),
            operator: AttributeOperator::Eq,
            value: Some(value.into()),
            inverse: false,
        }
    }

    /// `attribute exists` condition.
    pub fn attribute_exists(field: &str) -> Self {
        AudienceFilter::Attribute {
            field: field.to_owned(),
            operator: AttributeOperator::Exists,
            value: None,
            inverse: false,
        }
    }

    /// Parses the JSON shape; the error names the offending part (e.g. `/and/0/segment/id`).
    pub fn from_json(value: &Value) -> Result<Self, String> {
        Self::parse(value, "").map_err(|e| {
            if e.pointer.is_empty() {
                e.message
            } else {
                format!("{}: {}", e.pointer, e.message)
            }
        })
    }

    pub(crate) fn parse(value: &Value, pointer: &str) -> Result<Self, FilterError> {
        let Value::Object(object) = value else {
            return Err(invalid(pointer, "a filter must be a JSON object"));
        };
        let mut entries = object.iter();
        let (key, inner) = match (entries.next(), entries.next()) {
            (Some(entry), None) => entry,
            (None, _) => {
                return Err(invalid(
                    pointer,
                    "empty filter: give one of and, or, not, segment, attribute",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    pointer,
                    "a filter object takes exactly one of and, or, not, segment, attribute",
                ));
            }
        };
        let here = format!("{pointer}/{key}");
        match key.as_str() {
            "and" | "or" => {
                let Value::Array(items) = inner else {
                    return Err(invalid(&here, "must be an array of filters"));
                };
                if items.is_empty() {
                    return Err(invalid(&here, "must contain at least one condition"));
                }
                let parsed = items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| Self::parse(item, &format!("{here}/{i}")))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if key == "and" {
                    AudienceFilter::And(parsed)
                } else {
                    AudienceFilter::Or(parsed)
                })
            }
            "not" => Ok(AudienceFilter::Not(Box::new(Self::parse(inner, &here)?))),
            "segment" => {
                let id = inner
                    .get("id")
                    .and_then(Value::as_i64)
                    .filter(|id| *id > 0)
                    .ok_or_else(|| {
                        invalid(
                            &format!("{here}/id"),
                            "segment id must be a positive integer",
                        )
                    })?;
                Ok(AudienceFilter::Segment(id))
            }
            "attribute" => Self::parse_attribute(inner, &here),
            other => Err(invalid(
                &here,
                format!("unknown filter key {other:?}: use and, or, not, segment, attribute"),
            )),
        }
    }

    fn parse_attribute(inner: &Value, here: &str) -> Result<Self, FilterError> {
        let Value::Object(attribute) = inner else {
            return Err(invalid(here, "must be an object with field and operator"));
        };
        let field = attribute
            .get("field")
            .and_then(Value::as_str)
            .filter(|f| !f.trim().is_empty())
            .ok_or_else(|| invalid(&format!("{here}/field"), "field is required"))?;
        let operator = match attribute.get("operator").and_then(Value::as_str) {
            Some("eq") => AttributeOperator::Eq,
            Some("exists") => AttributeOperator::Exists,
            _ => {
                return Err(invalid(
                    &format!("{here}/operator"),
                    "operator must be eq or exists",
                ));
            }
        };
        let value = match (operator, attribute.get("value")) {
            (
                AttributeOperator::Eq,
                Some(v @ (Value::String(_) | Value::Number(_) | Value::Bool(_))),
            ) => Some(v.clone()),
            (AttributeOperator::Eq, _) => {
                return Err(invalid(
                    &format!("{here}/value"),
                    "value is required with operator eq (a string)",
                ));
            }
            (AttributeOperator::Exists, _) => None,
        };
        let inverse = match attribute.get("inverse") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    &format!("{here}/inverse"),
                    "inverse must be a boolean",
                ));
            }
        };
        Ok(AudienceFilter::Attribute {
            field: field.to_owned(),
            operator,
            value,
            inverse,
        })
    }

    /// The JSON shape.
    pub fn to_json(&self) -> Value {
        match self {
            AudienceFilter::And(items) => {
                json!({ "and": items.iter().map(Self::to_json).collect::<Vec<_>>() })
            }
            AudienceFilter::Or(items) => {
                json!({ "or": items.iter().map(Self::to_json).collect::<Vec<_>>() })
            }
            AudienceFilter::Not(inner) => json!({ "not": inner.to_json() }),
            AudienceFilter::Segment(id) => json!({ "segment": { "id": id } }),
            AudienceFilter::Attribute {
                field,
                operator,
                value,
                inverse,
            } => {
                let mut attribute = Map::new();
                attribute.insert("field".to_owned(), json!(field));
                let op = match operator {
                    AttributeOperator::Eq => "eq",
                    AttributeOperator::Exists => "exists",
                };
                attribute.insert("operator".to_owned(), json!(op));
                if let Some(value) = value {
                    attribute.insert("value".to_owned(), value.clone());
                }
                if *inverse {
                    attribute.insert("inverse".to_owned(), json!(true));
                }
                json!({ "attribute": attribute })
            }
        }
    }

    /// Segment ids the filter refers to, in order of appearance, each once.
    pub fn segment_ids(&self) -> Vec<i64> {
        let mut ids = Vec::new();
        self.collect_segments(&mut ids);
        ids
    }

    fn collect_segments(&self, ids: &mut Vec<i64>) {
        match self {
            AudienceFilter::And(items) | AudienceFilter::Or(items) => {
                items.iter().for_each(|f| f.collect_segments(ids));
            }
            AudienceFilter::Not(inner) => inner.collect_segments(ids),
            AudienceFilter::Segment(id) => {
                if !ids.contains(id) {
                    ids.push(*id);
                }
            }
            AudienceFilter::Attribute { .. } => {}
        }
    }

    pub(crate) fn matches(&self, world: &World, person: &Person) -> bool {
        match self {
            AudienceFilter::And(items) => items.iter().all(|f| f.matches(world, person)),
            AudienceFilter::Or(items) => items.iter().any(|f| f.matches(world, person)),
            AudienceFilter::Not(inner) => !inner.matches(world, person),
            AudienceFilter::Segment(id) => world
                .segment(*id)
                .is_some_and(|segment| world.is_member(segment, person)),
            AudienceFilter::Attribute {
                field,
                operator,
                value,
                inverse,
            } => {
                let actual = person.field(field);
                let hit = match operator {
                    AttributeOperator::Exists => actual.is_some_and(|v| !v.is_null()),
                    AttributeOperator::Eq => match (actual, value) {
                        (Some(actual), Some(want)) => loose_eq(&actual, want),
                        _ => false,
                    },
                };
                hit != *inverse
            }
        }
    }
}

impl World {
    /// The first segment id the filter refers to that does not exist.
    pub(crate) fn unknown_segment(&self, filter: &AudienceFilter) -> Option<i64> {
        filter
            .segment_ids()
            .into_iter()
            .find(|id| self.segment(*id).is_none())
    }

    /// People matching the filter, in creation order.
    pub(crate) fn audience<'a>(&'a self, filter: &'a AudienceFilter) -> Vec<&'a Person> {
        self.people().filter(|p| filter.matches(self, p)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Membership;

    fn attrs(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn parses_round_trips_and_points_at_errors() {
        let raw = json!({"and": [
            {"segment": {"id": 3}},
            {"or": [
                {"attribute": {"field": "tier", "operator": "eq", "value": "pro"}},
                {"not": {"attribute": {"field": "email", "operator": "exists"}}}
            ]}
        ]});
        let filter = AudienceFilter::from_json(&raw);
        assert_eq!(filter.as_ref().map(AudienceFilter::to_json), Ok(raw));
        assert_eq!(filter.map(|f| f.segment_ids()), Ok(vec![3]));

        for (bad, pointer) in [
            (json!({}), ""),
            (json!({"and": []}), "/and"),
            (
                json!({"or": [{"segment": {"id": "x"}}]}),
                "/or/0/segment/id",
            ),
            (
                json!({"attribute": {"field": "a", "operator": "gt", "value": "1"}}),
                "/attribute/operator",
            ),
            (
                json!({"attribute": {"field": "a", "operator": "eq"}}),
                "/attribute/value",
            ),
            (
                json!({"segment": {"id": 1}, "not": {"segment": {"id": 2}}}),
                "",
            ),
            (json!({"nope": 1}), "/nope"),
            (json!([1]), ""),
        ] {
            let err = AudienceFilter::parse(&bad, "");
            assert_eq!(err.map_err(|e| e.pointer), Err(pointer.to_owned()), "{bad}");
        }
    }

    #[test]
    fn matches_segments_attributes_and_inverse() {
        let mut w = World::new();
        let a = w.upsert_by_id("a", attrs(json!({"tier": "pro", "score": 80})), 0);
        let b = w.upsert_by_id("b", attrs(json!({"tier": "free", "email": "b@e.com"})), 0);
        let seg = w.add_segment(
            "m",
            "",
            Membership::Manual([b].into_iter().collect()),
            None,
            0,
        );
        let ids = |f: &AudienceFilter, w: &World| -> Vec<u64> {
            w.audience(f).iter().map(|p| p.seq).collect()
        };
        assert_eq!(ids(&AudienceFilter::segment(seg), &w), vec![b]);
        assert_eq!(
            ids(&AudienceFilter::attribute_eq("score", "80"), &w),
            vec![a]
        );
        assert_eq!(ids(&AudienceFilter::attribute_exists("email"), &w), vec![b]);
        let not_pro = AudienceFilter::Attribute {
            field: "tier".into(),
            operator: AttributeOperator::Eq,
            value: Some(json!("pro")),
            inverse: true,
        };
        assert_eq!(ids(&not_pro, &w), vec![b]);
        let either = AudienceFilter::Or(vec![
            AudienceFilter::segment(seg),
            AudienceFilter::attribute_eq("id", "a"),
        ]);
        assert_eq!(ids(&either, &w), vec![a, b]);
        assert_eq!(
            ids(&AudienceFilter::Not(Box::new(either)), &w),
            Vec::<u64>::new()
        );
        assert_eq!(w.unknown_segment(&AudienceFilter::segment(99)), Some(99));
        assert_eq!(w.unknown_segment(&AudienceFilter::segment(seg)), None);
    }
}

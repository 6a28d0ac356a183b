//! Property test (issue #11): segment criteria, compiled to SQL and run by the database, select
//! exactly the people a brute-force evaluator written from the documented semantics selects, on
//! SQLite and (with `SHARPSEND_TEST_POSTGRES_URL`) on PostgreSQL.
//!
//! Each case writes a random set of profiles (attribute values of every kind: strings, numbers,
//! numeric strings, odd numeric text, booleans, Unix-second timestamps, lists, objects, null,
//! missing attributes, unicode) and random Customer.io segment memberships to a workspace of
//! its own, then evaluates random criteria (every operator, `and` / `or` / `not` nesting,
//! absolute and relative times, segment membership). The criteria go the product's whole way:
//! JSON text → `parse_json` → `validate` → stored form → `from_stored` → `to_filter(now)` →
//! `criteria_sql::matching_page` / `count_matching`. The evaluator below reads only this test's
//! own model of the criteria and the documented semantics (`sharpsend_core::criteria` and
//! `sharpsend_db::criteria_sql` module docs):
//! - text conditions (`eq`, `neq`, byte-wise `gt`…`lte`, `in`, `contains`, `starts_with`)
//!   match JSON strings only; `contains` also matches a list holding an equal string;
//! - number and timestamp conditions match JSON numbers and numeric strings (digits only, or
//!   JSON number syntax with spaces around), read as doubles; timestamps are Unix seconds;
//! - bool conditions match `true` / `false` and `"true"` / `"false"`;
//! - `exists`: present and not null; `neq` is `not eq`; `not` is the exact complement.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value as Json, json};
use sharpsend_core::criteria::{Criteria, parse_json, validate};
use sharpsend_db::criteria_sql;
use sharpsend_db::managed_segments;
use sharpsend_db::profiles::{self, FetchedProfile};
use sharpsend_db::testing::TestDatabase;
use sharpsend_db::workspaces;

/// Cases per backend: each writes up to 12 profiles and evaluates 6 criteria (about 10 s per
/// backend in a debug build).
const CASES: u32 = 192;
/// Criteria evaluated against each generated set of profiles.
const CRITERIA_PER_CASE: usize = 8;
/// Customer.io segments the people may belong to (ids 1..=SEGMENTS).
const SEGMENTS: i64 = 3;

/// Evaluation time: 2026-11-28T00:00:00Z.
const NOW_SECS: i64 = 1_795_824_000;

fn now() -> DateTime<Utc> {
    Utc.timestamp_opt(NOW_SECS, 0).single().unwrap()
}

/// Attribute names most profiles and conditions use.
const COMMON_FIELDS: &[&str] = &["score", "plan", "tags"];
/// Attribute names, including ones that need quoting in a JSON path.
const FIELDS: &[&str] = &[
    "score",
    "plan",
    "vip",
    "tags",
    "seen_at",
    "名前",
    "first name",
    "a.b",
    "x[0]",
    "it's",
    "$",
];

fn field() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(COMMON_FIELDS).prop_map(str::to_owned),
        2 => prop::sample::select(FIELDS).prop_map(str::to_owned),
    ]
}

// ----- the test's model of criteria -----

/// A condition value, as the JSON form writes it.
#[derive(Debug, Clone)]
enum Val {
    Str(String),
    Num(f64),
    Bool(bool),
    /// `{"timestamp": …}`: Unix seconds and milliseconds.
    At(i64, u32),
    /// `{"ago": …}` in seconds, written with `unit`.
    Ago(u64, char),
    /// `{"from_now": …}` in seconds, written with `unit`.
    FromNow(u64, char),
}

#[derive(Debug, Clone)]
enum Crit {
    And(Vec<Crit>),
    Or(Vec<Crit>),
    Not(Box<Crit>),
    Segment(i64),
    /// `operator` is the JSON form's name; `value` absent for `exists`, a list for `in`.
    Attr {
        field: String,
        operator: &'static str,
        value: Option<Operand>,
    },
}

#[derive(Debug, Clone)]
enum Operand {
    One(Val),
    Many(Vec<Val>),
}

fn unit_secs(unit: char) -> u64 {
    match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => 604_800,
    }
}

fn val_json(v: &Val) -> Json {
    match v {
        Val::Str(s) => json!(s),
        Val::Num(n) => json!(n),
        Val::Bool(b) => json!(b),
        Val::At(secs, millis) => {
            let t = Utc
                .timestamp_opt(*secs, millis * 1_000_000)
                .single()
                .unwrap();
            json!({"timestamp": t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)})
        }
        Val::Ago(secs, unit) => json!({"ago": format!("{}{unit}", secs / unit_secs(*unit))}),
        Val::FromNow(secs, unit) => {
            json!({"from_now": format!("{}{unit}", secs / unit_secs(*unit))})
        }
    }
}

fn crit_json(c: &Crit) -> Json {
    match c {
        Crit::And(items) => json!({"and": items.iter().map(crit_json).collect::<Vec<_>>()}),
        Crit::Or(items) => json!({"or": items.iter().map(crit_json).collect::<Vec<_>>()}),
        Crit::Not(inner) => json!({"not": crit_json(inner)}),
        Crit::Segment(id) => json!({"segment": {"id": id}}),
        Crit::Attr {
            field,
            operator,
            value,
        } => {
            let mut o = Map::new();
            o.insert("field".into(), json!(field));
            o.insert("operator".into(), json!(operator));
            match value {
                None => {}
                Some(Operand::One(v)) => {
                    o.insert("value".into(), val_json(v));
                }
                Some(Operand::Many(vs)) => {
                    o.insert(
                        "value".into(),
                        Json::Array(vs.iter().map(val_json).collect()),
                    );
                }
            }
            json!({ "attribute": o })
        }
    }
}

// ----- the brute-force evaluator -----

/// A person as the evaluator sees it.
#[derive(Debug, Clone)]
struct Person {
    attributes: Map<String, Json>,
    segments: BTreeSet<i64>,
}

/// Unix seconds of a time value at `now` (whole seconds plus a fraction, as documented).
fn time_secs(v: &Val) -> Option<f64> {
    match v {
        Val::At(secs, millis) => Some(*secs as f64 + f64::from(*millis) / 1000.0),
        Val::Ago(secs, _) => Some(NOW_SECS as f64 - *secs as f64),
        Val::FromNow(secs, _) => Some(NOW_SECS as f64 + *secs as f64),
        _ => None,
    }
}

/// Whether `s` is JSON number syntax: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?`.
fn json_number_syntax(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// The attribute as a number: a JSON number, or a numeric string (digits only, or JSON number
/// syntax with spaces around), read as a double (overflow to ±infinity, underflow to 0).
fn as_number(a: &Json) -> Option<f64> {
    match a {
        Json::Number(n) => n.as_f64(),
        Json::String(s) => {
            let digits_only = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let trimmed = s.trim_matches(' ');
            (digits_only || json_number_syntax(trimmed))
                .then(|| trimmed.parse::<f64>().ok())
                .flatten()
        }
        _ => None,
    }
}

fn compare<T: PartialOrd + ?Sized>(operator: &str, a: &T, b: &T) -> bool {
    match operator {
        "eq" => a == b,
        "gt" => a > b,
        "gte" => a >= b,
        "lt" => a < b,
        "lte" => a <= b,
        other => panic!("not a comparison: {other}"),
    }
}

/// One value condition (`neq` is handled by the caller as `not eq`).
fn holds(operator: &str, attribute: Option<&Json>, value: &Val) -> bool {
    let Some(a) = attribute else {
        return false;
    };
    match value {
        Val::Str(s) => match (operator, a) {
            ("contains", Json::String(t)) => t.contains(s.as_str()),
            ("contains", Json::Array(items)) => items.iter().any(|i| i.as_str() == Some(s)),
            ("starts_with", Json::String(t)) => t.starts_with(s.as_str()),
            (_, Json::String(t)) if !matches!(operator, "contains" | "starts_with") => {
                compare(operator, t.as_str(), s.as_str())
            }
            _ => false,
        },
        Val::Num(n) => as_number(a).is_some_and(|x| compare(operator, &x, n)),
        Val::Bool(b) => match a {
            Json::Bool(x) => x == b,
            Json::String(t) => t == if *b { "true" } else { "false" },
            _ => false,
        },
        time => {
            let t = time_secs(time).unwrap();
            as_number(a).is_some_and(|x| compare(operator, &x, &t))
        }
    }
}

fn eval(c: &Crit, p: &Person) -> bool {
    match c {
        Crit::And(items) => items.iter().all(|i| eval(i, p)),
        Crit::Or(items) => items.iter().any(|i| eval(i, p)),
        Crit::Not(inner) => !eval(inner, p),
        Crit::Segment(id) => p.segments.contains(id),
        Crit::Attr {
            field,
            operator,
            value,
        } => {
            let a = p.attributes.get(field);
            match (*operator, value) {
                ("exists", _) => a.is_some_and(|a| !a.is_null()),
                ("in", Some(Operand::Many(values))) => values.iter().any(|v| holds("eq", a, v)),
                ("neq", Some(Operand::One(v))) => !holds("eq", a, v),
                (op, Some(Operand::One(v))) => holds(op, a, v),
                other => panic!("generator made {other:?}"),
            }
        }
    }
}

// ----- generators -----

/// Text that is, or looks like, a number: digits, JSON number syntax with and without spaces,
/// overflowing exponents, and what other parsers would accept but the documented rule does not.
const NUMERIC_TEXT: &[&str] = &[
    "87",
    "80",
    "42",
    "007",
    "-007",
    "0",
    "-0",
    "0.0",
    "87.0",
    "87.5",
    "-1.5",
    " 5e1 ",
    "5E+1",
    "1e99999",
    "-1e99999",
    "0e99999",
    "1e-99999",
    "1.",
    ".5",
    "+1",
    "-",
    "1e",
    "0x10",
    "1_000",
    "\t42",
    "42\n",
    "42 ",
    " 42",
    "4 2",
    "NaN",
    "Infinity",
    "1795824000",
    "1795823000.25",
    "12abc",
    "١٢",
    "１２",
];

/// Text that booleans, lists and times may be mistaken for, and unicode.
const ODD_TEXT: &[&str] = &[
    "",
    " ",
    "pro",
    "Pro",
    "pro ",
    "premium",
    "free",
    "ünïcödé",
    "名前",
    "😀",
    "e\u{301}",
    "true",
    "false",
    "True",
    "null",
    "[\"pro\"]",
    "{}",
    "2026-11-28T00:00:00Z",
];

/// Text shared by many profiles and conditions, so that conditions often meet their value.
const COMMON_TEXT: &[&str] = &["pro", "premium", "87", "", "true", "1795824000", "😀"];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(COMMON_TEXT).prop_map(str::to_owned),
        3 => prop::sample::select(NUMERIC_TEXT).prop_map(str::to_owned),
        2 => prop::sample::select(ODD_TEXT).prop_map(str::to_owned),
        1 => "[ab😀é. 0-9e-]{0,4}",
    ]
}

/// Numbers a profile or a condition may hold: small, fractional, negative, and Unix times near
/// the evaluation time (whole and fractional). At most 15 significant digits: beyond that the
/// backends knowingly differ (see "Precision" in the `sharpsend_db::criteria_sql` docs).
fn number() -> impl Strategy<Value = f64> {
    prop_oneof![
        2 => prop::sample::select(vec![0.0, 42.0, 80.0, 87.0, 87.5, NOW_SECS as f64, (NOW_SECS - 30 * 86_400) as f64]),
        1 => (-5i32..100).prop_map(f64::from),
        1 => prop::sample::select(vec![0.5, -1.5, 87.5, 1e21, 1e-7, -0.0, 80.0, 0.1]),
        1 => (-60i64 * 86_400..60 * 86_400).prop_map(|d| (NOW_SECS + d) as f64),
        1 => (-10i64 * 86_400..10 * 86_400, 0u32..4)
            .prop_map(|(d, q)| (NOW_SECS + d) as f64 + f64::from(q) * 0.25),
    ]
}

/// A Unix-seconds time near the evaluation time, as a JSON number or a numeric string.
fn time_attribute() -> impl Strategy<Value = Json> {
    let days = prop_oneof![
        (-60i64 * 86_400..60 * 86_400),
        Just(0),
        Just(-30 * 86_400),
        Just(7 * 86_400)
    ];
    (days, any::<bool>(), 0u32..4).prop_map(|(d, as_text, q)| {
        let secs = NOW_SECS + d;
        match (as_text, q) {
            (false, 0) => json!(secs),
            (false, q) => json!(secs as f64 + f64::from(q) * 0.25),
            (true, 0) => json!(secs.to_string()),
            (true, q) => json!(format!("{}", secs as f64 + f64::from(q) * 0.25)),
        }
    })
}

fn attribute_value() -> impl Strategy<Value = Json> {
    let scalar = prop_oneof![
        4 => text().prop_map(Json::String),
        3 => number().prop_map(|n| json!(n)),
        1 => (-5i64..100).prop_map(|n| json!(n)),
        2 => any::<bool>().prop_map(Json::Bool),
        2 => time_attribute(),
        1 => Just(Json::Null),
    ];
    let common = prop::sample::select(COMMON_TEXT).prop_map(|t| json!(t));
    prop_oneof![
        8 => scalar.clone(),
        2 => prop::collection::vec(prop_oneof![common, scalar.clone()], 0..4).prop_map(Json::Array),
        1 => prop::collection::vec(scalar, 0..2).prop_map(|items| {
            // A nested list and an object: never a match for `contains` of their strings.
            json!([items.clone(), {"k": items}])
        }),
        1 => text().prop_map(|t| json!({ "v": t })),
    ]
}

fn person() -> impl Strategy<Value = Person> {
    (
        prop::collection::btree_map(field(), attribute_value(), 1..7),
        prop::collection::btree_set(1..=SEGMENTS, 0..3),
    )
        .prop_map(|(attributes, segments)| Person {
            attributes: attributes.into_iter().collect(),
            segments,
        })
}

fn unit() -> impl Strategy<Value = char> {
    prop::sample::select(vec!['s', 'm', 'h', 'd', 'w'])
}

fn time_value() -> impl Strategy<Value = Val> {
    prop_oneof![
        (
            prop_oneof![-60i64 * 86_400..60 * 86_400, Just(0), Just(-30 * 86_400)],
            prop::sample::select(vec![0u32, 0, 250, 500])
        )
            .prop_map(|(d, ms)| Val::At(NOW_SECS + d, ms)),
        (0u64..70, unit()).prop_map(|(n, u)| Val::Ago(n * unit_secs(u), u)),
        Just(Val::Ago(30 * 86_400, 'd')),
        (0u64..70, unit()).prop_map(|(n, u)| Val::FromNow(n * unit_secs(u), u)),
    ]
}

fn string_value() -> impl Strategy<Value = Val> {
    text().prop_map(Val::Str)
}

fn number_value() -> impl Strategy<Value = Val> {
    number().prop_map(Val::Num)
}

fn condition() -> impl Strategy<Value = Crit> {
    // `ghost` is in no profile.
    let field = prop_oneof![9 => field(), 1 => Just("ghost".to_owned())];
    let operand = prop_oneof![
        // eq / neq: every kind of value.
        (
            prop::sample::select(vec!["eq", "neq"]),
            prop_oneof![
                string_value(),
                number_value(),
                any::<bool>().prop_map(Val::Bool),
                time_value()
            ]
        )
            .prop_map(|(op, v)| (op, Some(Operand::One(v)))),
        // Orderings: text, numbers, times.
        (
            prop::sample::select(vec!["gt", "gte", "lt", "lte"]),
            prop_oneof![string_value(), number_value(), time_value()]
        )
            .prop_map(|(op, v)| (op, Some(Operand::One(v)))),
        (
            prop::sample::select(vec!["contains", "starts_with"]),
            string_value()
        )
            .prop_map(|(op, v)| (op, Some(Operand::One(v)))),
        prop_oneof![
            prop::collection::vec(string_value(), 1..4),
            prop::collection::vec(number_value(), 1..4),
        ]
        .prop_map(|vs| ("in", Some(Operand::Many(vs)))),
        Just(("exists", None)),
    ];
    (field, operand).prop_map(|(field, (operator, value))| Crit::Attr {
        field,
        operator,
        value,
    })
}

fn criteria() -> impl Strategy<Value = Crit> {
    let leaf = prop_oneof![
        6 => condition(),
        1 => (1..=SEGMENTS + 1).prop_map(Crit::Segment),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..4).prop_map(Crit::And),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Crit::Or),
            inner.prop_map(|c| Crit::Not(Box::new(c))),
        ]
    })
}

#[derive(Debug, Clone)]
struct Case {
    people: Vec<Person>,
    criteria: Vec<Crit>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(person(), 0..12),
        prop::collection::vec(criteria(), CRITERIA_PER_CASE),
    )
        .prop_map(|(people, criteria)| Case { people, criteria })
}

// ----- the check -----

static WORKSPACES: AtomicU64 = AtomicU64::new(0);

fn customer_id(i: usize) -> String {
    format!("p{i:02}")
}

/// Writes the case's people to a new workspace and compares each criteria's members.
async fn check(db: &TestDatabase, case: &Case) -> Result<(), TestCaseError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| TestCaseError::fail(format!("{what}: {e}"));
    let site = format!("site-{}", WORKSPACES.fetch_add(1, Ordering::Relaxed));
    let ws = workspaces::ensure(&db.conn, &site, "us")
        .await
        .map_err(|e| fail("workspace", &e))?
        .id;
    let fetched: Vec<FetchedProfile> = case
        .people
        .iter()
        .enumerate()
        .map(|(i, p)| FetchedProfile {
            customer_id: customer_id(i),
            email: None,
            cio_id: None,
            attributes: p.attributes.clone(),
            cio_segments: None,
        })
        .collect();
    profiles::upsert_fetched(&db.conn, ws, &fetched, now())
        .await
        .map_err(|e| fail("writing profiles", &e))?;
    for segment in 1..=SEGMENTS {
        let members: Vec<String> = case
            .people
            .iter()
            .enumerate()
            .filter(|(_, p)| p.segments.contains(&segment))
            .map(|(i, _)| customer_id(i))
            .collect();
        managed_segments::replace_mirrored_membership(&db.conn, ws, segment, &members, now())
            .await
            .map_err(|e| fail("writing memberships", &e))?;
    }

    for crit in &case.criteria {
        let text = crit_json(crit).to_string();
        let raw =
            parse_json(&text, "criteria_json").map_err(|v| fail("parse", &format!("{v:?}")))?;
        let parsed =
            validate(&raw, "criteria_json").map_err(|v| fail("validate", &format!("{v:?}")))?;
        // What is stored is what is evaluated later: it must read back the same.
        let stored = Criteria::from_stored(&parsed.to_json())
            .map_err(|v| fail("read back", &format!("{v:?}")))?;
        prop_assert_eq!(&stored, &parsed, "stored form of {}", text);

        let filter = stored.to_filter(now());
        let page = criteria_sql::matching_page(&db.conn, ws, &filter, None, 1000)
            .await
            .map_err(|e| fail(&format!("evaluating {text}"), &e))?;
        let got: BTreeSet<String> = page.into_iter().map(|p| p.customer_id).collect();
        let count = criteria_sql::count_matching(&db.conn, ws, &filter)
            .await
            .map_err(|e| fail(&format!("counting {text}"), &e))?;
        let want: BTreeSet<String> = case
            .people
            .iter()
            .enumerate()
            .filter(|(_, p)| eval(crit, p))
            .map(|(i, _)| customer_id(i))
            .collect();
        if got != want {
            let differ: BTreeMap<&String, (bool, &Map<String, Json>)> = got
                .symmetric_difference(&want)
                .map(|id| {
                    let i: usize = id[1..].parse().unwrap();
                    (id, (got.contains(id), &case.people[i].attributes))
                })
                .collect();
            return Err(TestCaseError::fail(format!(
                "{:?}: {text}\n(customer, matched by the database, attributes): {differ:?}",
                db.backend
            )));
        }
        prop_assert_eq!(count as usize, got.len(), "count of {}", text);
    }
    Ok(())
}

sharpsend_db::db_test!(
    compiled_criteria_select_what_a_brute_force_evaluator_selects,
    |db: TestDatabase| async move {
        let handle = tokio::runtime::Handle::current();
        // proptest drives synchronous closures: each case runs on this runtime, the test's
        // worker thread handed over to blocking meanwhile.
        let result = tokio::task::block_in_place(|| {
            let mut runner = TestRunner::new(Config {
                cases: CASES,
                failure_persistence: None,
                max_shrink_iters: 400,
                ..Config::default()
            });
            runner.run(&case(), |case| handle.block_on(check(&db, &case)))
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    }
);

#[test]
fn the_evaluators_number_syntax_is_json_numbers() {
    for ok in ["0", "-0", "87", "-1.5", "5e1", "5E+1", "1e-99999", "0.25"] {
        assert!(json_number_syntax(ok), "{ok}");
    }
    for bad in [
        "", "-", "007", "1.", ".5", "+1", "0x10", "1e", "1e+", " 1", "NaN",
    ] {
        assert!(!json_number_syntax(bad), "{bad}");
    }
    assert_eq!(as_number(&json!("007")), Some(7.0));
    assert_eq!(as_number(&json!(" 5e1 ")), Some(50.0));
    assert_eq!(as_number(&json!("-007")), None);
    assert_eq!(as_number(&json!("\t42")), None);
    assert_eq!(as_number(&json!("1e99999")), Some(f64::INFINITY));
    assert_eq!(as_number(&json!(true)), None);
}

//! Property test (issue #18): incremental segment evaluation keeps the same membership a full
//! evaluation computes, and Customer.io (the simulator) ends with it.
//!
//! Each case creates three managed segments in the simulator: M (members set by hand), A
//! (criteria that may read M's membership) and B (criteria that read A's membership), over
//! people of its own. It then applies a random sequence of steps — attribute writes (numbers,
//! numeric strings, text, times relative to the clock, removals), clock moves (minutes to
//! days), criteria edits of A and B (relative times, segment membership, `and` / `or` /
//! `not`), manual membership changes of M — and after each step runs the segment-evaluation
//! job and checks, for A and B, that the recorded membership equals a full evaluation of their
//! criteria at their last evaluation time, and that no periodic full check found drift. At the
//! end the outbox is delivered and the simulator's segments must hold the recorded members.
//! Across the cases, most evaluations must have been incremental (the property is about them).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value as Json, json};
use sharpsend_core::criteria::Criteria;
use sharpsend_core::managed_segments::{
    self as segments, CriteriaInput, EvaluationReport, NewSegment, SegmentChanges,
};
use sharpsend_core::profiles::{self, AttributeUpdate};
use sharpsend_db::criteria_sql;
use sharpsend_db::managed_segments as store;
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_tests::TestApp;

/// Cases per backend.
const CASES: u32 = 24;
/// People per case.
const PEOPLE: usize = 8;
const DAY: u64 = 86_400;

/// Criteria, with the segments they may read given by role.
#[derive(Debug, Clone)]
enum Crit {
    And(Vec<Crit>),
    Or(Vec<Crit>),
    Not(Box<Crit>),
    /// Member of the segment one level below (A reads M, B reads A).
    Below,
    Score(&'static str, i64),
    Plan(&'static str),
    /// `seen_at <operator> {"ago"|"from_now": …}`.
    Seen(&'static str, &'static str, u64),
}

fn crit_json(c: &Crit, below: i64) -> Json {
    let attr = |field: &str, operator: &str, value: Json| json!({"attribute": {"field": field, "operator": operator, "value": value}});
    match c {
        Crit::And(items) => {
            json!({"and": items.iter().map(|i| crit_json(i, below)).collect::<Vec<_>>()})
        }
        Crit::Or(items) => {
            json!({"or": items.iter().map(|i| crit_json(i, below)).collect::<Vec<_>>()})
        }
        Crit::Not(inner) => json!({"not": crit_json(inner, below)}),
        Crit::Below => json!({"segment": {"id": below}}),
        Crit::Score(op, n) => attr("score", op, json!(n)),
        Crit::Plan(p) => attr("plan", "eq", json!(p)),
        Crit::Seen(op, rel, hours) => attr("seen_at", op, json!({ *rel: format!("{hours}h") })),
    }
}

/// A condition on attributes.
fn attribute_leaf() -> impl Strategy<Value = Crit> {
    prop_oneof![
        2 => (prop::sample::select(&["gt", "gte", "lt", "lte", "eq"][..]), 0..100i64)
            .prop_map(|(op, n)| Crit::Score(op, n)),
        1 => prop::sample::select(&["pro", "free"][..]).prop_map(Crit::Plan),
        3 => (
            prop::sample::select(&["gt", "gte", "lt", "lte"][..]),
            prop::sample::select(&["ago", "from_now"][..]),
            1..96u64,
        )
            .prop_map(|(op, rel, h)| Crit::Seen(op, rel, h)),
    ]
}

/// A condition; `below`: it may read the segment one level below.
fn leaf(below: bool) -> BoxedStrategy<Crit> {
    if below {
        prop_oneof![1 => Just(Crit::Below), 6 => attribute_leaf()].boxed()
    } else {
        attribute_leaf().boxed()
    }
}

fn criteria(below: bool) -> impl Strategy<Value = Crit> {
    leaf(below).prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..3).prop_map(Crit::And),
            prop::collection::vec(inner.clone(), 1..3).prop_map(Crit::Or),
            inner.prop_map(|c| Crit::Not(Box::new(c))),
        ]
    })
}

#[derive(Debug, Clone)]
enum Step {
    /// Attributes of one person: `score`, `plan`, `seen_at` (seconds from the clock's now).
    Write {
        person: usize,
        score: Option<Json>,
        plan: Option<Json>,
        seen_in: Option<(i64, bool)>,
    },
    /// Moves the clock forward.
    Advance(u64),
    /// New criteria for A (`false`) or B (`true`).
    Edit(bool, Crit),
    /// Adds (or removes) people to M by hand.
    Manual(bool, Vec<usize>),
}

fn maybe_null(s: impl Strategy<Value = Json>) -> impl Strategy<Value = Option<Json>> {
    prop_oneof![2 => Just(None), 1 => Just(Some(Json::Null)), 4 => s.prop_map(Some)]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (
            0..PEOPLE,
            maybe_null(prop_oneof![
                (0..100i64).prop_map(|n| json!(n)),
                (0..100i64).prop_map(|n| json!(n.to_string())),
                Just(json!("n/a")),
            ]),
            maybe_null(prop::sample::select(&["pro", "free", "team"][..]).prop_map(|p| json!(p))),
            prop::option::of((-5 * DAY as i64..2 * DAY as i64, any::<bool>())),
        )
            .prop_map(|(person, score, plan, seen_in)| Step::Write {
                person,
                score,
                plan,
                seen_in,
            }),
        3 => prop_oneof![
            3 => 1..7_200u64,
            2 => 3_600..DAY,
            1 => DAY..3 * DAY,
        ]
        .prop_map(Step::Advance),
        1 => (any::<bool>(), criteria(true)).prop_map(|(b, c)| Step::Edit(b, c)),
        1 => (any::<bool>(), prop::collection::vec(0..PEOPLE, 1..4))
            .prop_map(|(add, people)| Step::Manual(add, people)),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    a: Crit,
    b: Crit,
    /// Reads no segment: evaluated in one pass with A when A reads none either.
    c: Crit,
    steps: Vec<Step>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        criteria(true),
        criteria(true),
        criteria(false),
        prop::collection::vec(step(), 4..16),
    )
        .prop_map(|(a, b, c, steps)| Case { a, b, c, steps })
}

static CASE_NO: AtomicU64 = AtomicU64::new(0);

/// Incremental and full evaluations seen across cases.
#[derive(Debug, Default)]
struct Tally {
    evaluated: AtomicU64,
    incremental: AtomicU64,
}

fn json_input(c: &Crit, below: i64) -> CriteriaInput {
    CriteriaInput::Json(crit_json(c, below).to_string(), "criteria_json")
}

/// Recorded members of a managed segment.
async fn recorded(app: &TestApp, segment: i64) -> anyhow::Result<BTreeSet<String>> {
    Ok(
        store::members_page(&app.ctx.db, app.ctx.workspace_id(), segment, None, 100_000)
            .await?
            .into_iter()
            .collect(),
    )
}

/// Who a full evaluation of `segment`'s criteria selects at its last evaluation time, with
/// number conditions read from the attributes themselves (not the typed shadow the evaluator
/// reads): a shadow value gone stale makes the recorded membership differ.
async fn full_evaluation(app: &TestApp, segment: i64) -> anyhow::Result<BTreeSet<String>> {
    let stored = store::get(&app.ctx.db, app.ctx.workspace_id(), segment)
        .await?
        .context("segment")?;
    let criteria = Criteria::from_stored(stored.criteria.as_ref().context("criteria")?)
        .map_err(|v| anyhow::anyhow!("{v:?}"))?;
    let at = stored
        .last_evaluation
        .context("never evaluated")?
        .evaluated_at;
    let ids = criteria_sql::reference_matching_ids(
        &app.ctx.db,
        app.ctx.workspace_id(),
        &criteria.to_filter(at),
    )
    .await?;
    Ok(ids.into_iter().collect())
}

async fn run_case(app: &TestApp, case: &Case, tally: &Tally) -> anyhow::Result<()> {
    let n = CASE_NO.fetch_add(1, Ordering::Relaxed);
    let people: Vec<String> = (0..PEOPLE).map(|i| format!("inc{n}-p{i}")).collect();
    for id in &people {
        // Customer.io ignores segment changes for people it does not know.
        app.sim.sim.upsert_person(id, Map::new());
    }
    let ctx = &app.ctx;
    let create = |name: String, criteria: Option<CriteriaInput>| NewSegment {
        name,
        description: String::new(),
        criteria,
    };
    let m = segments::create_segment(ctx, create(format!("M{n}"), None))
        .await?
        .segment_id;
    let a = segments::create_segment(ctx, create(format!("A{n}"), Some(json_input(&case.a, m))))
        .await?
        .segment_id;
    let b = segments::create_segment(ctx, create(format!("B{n}"), Some(json_input(&case.b, a))))
        .await?
        .segment_id;
    let c = segments::create_segment(ctx, create(format!("C{n}"), Some(json_input(&case.c, m))))
        .await?
        .segment_id;

    for (i, step) in case.steps.iter().enumerate() {
        match step {
            Step::Write {
                person,
                score,
                plan,
                seen_in,
            } => {
                let mut attributes = Map::new();
                if let Some(v) = score {
                    attributes.insert("score".into(), v.clone());
                }
                if let Some(v) = plan {
                    attributes.insert("plan".into(), v.clone());
                }
                if let Some((offset, as_text)) = seen_in {
                    let at = ctx.now().timestamp() + offset;
                    let v = if *as_text {
                        json!(at.to_string())
                    } else {
                        json!(at)
                    };
                    attributes.insert("seen_at".into(), v);
                }
                if attributes.is_empty() {
                    continue;
                }
                profiles::update_attributes(
                    ctx,
                    vec![AttributeUpdate {
                        customer_id: people[*person].clone(),
                        attributes,
                    }],
                    None,
                )
                .await?;
            }
            Step::Advance(secs) => app.advance(Duration::from_secs(*secs)),
            Step::Edit(on_b, crit) => {
                let (id, below) = if *on_b { (b, a) } else { (a, m) };
                segments::update_segment(
                    ctx,
                    id,
                    SegmentChanges {
                        criteria: Some(json_input(crit, below)),
                        ..SegmentChanges::default()
                    },
                )
                .await?;
            }
            Step::Manual(add, who) => {
                let ids: Vec<String> = who.iter().map(|i| people[*i].clone()).collect();
                if *add {
                    segments::add_members(ctx, m, &ids).await?;
                } else {
                    segments::remove_members(ctx, m, &ids).await?;
                }
            }
        }
        let report: EvaluationReport =
            segments::evaluate_due(ctx, &ctx.settings.evaluation).await?;
        ensure!(
            report.drift_found == 0 && report.failed == 0,
            "step {i} ({step:?}): {report:?}"
        );
        tally
            .evaluated
            .fetch_add(report.evaluated, Ordering::Relaxed);
        tally
            .incremental
            .fetch_add(report.incremental, Ordering::Relaxed);
        for (name, id) in [("A", a), ("B", b), ("C", c)] {
            let got = recorded(app, id).await?;
            let want = full_evaluation(app, id).await?;
            ensure!(
                got == want,
                "after step {i} ({step:?}), segment {name}: recorded {got:?}, a full evaluation selects {want:?}"
            );
        }
    }

    app.deliver_all("incremental-test", Duration::from_secs(60))
        .await?;
    for (name, id) in [("M", m), ("A", a), ("B", b), ("C", c)] {
        let in_sim: BTreeSet<String> = app
            .sim
            .sim
            .segment_members(id)
            .context("segment in the simulator")?
            .into_iter()
            .collect();
        let want = recorded(app, id).await?;
        ensure!(
            in_sim == want,
            "segment {name}: the simulator holds {in_sim:?}, SharpSend recorded {want:?}"
        );
    }
    for id in [c, b, a, m] {
        segments::delete_segment(ctx, id).await?;
    }
    Ok(())
}

db_test!(
    incremental_evaluation_equals_full_evaluation_and_reaches_customer_io,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let handle = tokio::runtime::Handle::current();
        let tally = Tally::default();
        let result = tokio::task::block_in_place(|| {
            let mut runner = TestRunner::new(Config {
                cases: CASES,
                failure_persistence: None,
                max_shrink_iters: 50,
                ..Config::default()
            });
            runner
                .run(&case(), |case| {
                    handle
                        .block_on(run_case(&app, &case, &tally))
                        .map_err(|e| TestCaseError::fail(format!("{e:#}")))
                })
                .map_err(|e| e.to_string())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        let (evaluated, incremental) = (
            tally.evaluated.load(Ordering::Relaxed),
            tally.incremental.load(Ordering::Relaxed),
        );
        assert!(
            incremental * 2 > evaluated,
            "too few incremental evaluations to test them: {incremental} of {evaluated}"
        );
        app.stop().await?;
        anyhow::Ok(())
    }
);

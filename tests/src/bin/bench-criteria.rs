//! Criteria evaluation benchmark: prints figures, asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test target/release/bench-criteria
//! target/release/bench-criteria --database-url postgres://…/db   # an existing database (migrated here)
//! target/release/bench-criteria --backends sqlite --profiles 200000
//! ```
//!
//! Loads `--profiles` profiles (default 1,000,000) into a fresh SQLite file and into
//! PostgreSQL (a fresh database under `SHARPSEND_TEST_POSTGRES_URL`, or `--database-url`) with
//! multi-row inserts of 5,000 rows bound as one JSON array. Attribute values are mixed the way
//! the mirror holds them: `engagement_score` a JSON number for half the people and a numeric
//! string (as imported from Customer.io) for the other half. Then, for two three-condition
//! criteria — the issue's example (member of a Customer.io segment, `engagement_score > 80`,
//! `sharpsend_assignment_interactions > 5`) and an all-attribute one (`investor_type =
//! "growth"` instead of the segment) — it computes the matching set with the evaluator (criteria
//! → `sharpsend_core::criteria` → `sharpsend_db::criteria_sql`) and with hand-written SQL,
//! checks that the sets are equal, and prints the best of `--runs` timings of each and their
//! ratio (target: within 1.2×, issue #18). Finally it runs a full evaluation of a managed
//! segment (the membership difference written to `segment_members` and the outbox in one
//! transaction), first
//! with every member new and then with nothing changed; then incremental re-evaluations (issue
//! #18) with nothing changed and after 100 / 1,000 / 10,000 changed profiles, and a full check
//! that must find no drift; and prints the evaluator's peak memory
//! (VmHWM of this process, reset before the evaluator runs; PostgreSQL works in its own
//! process, SQLite in this one).

use sharpsend_tests::bench_data::{INVESTOR_TYPES, Rng, load_profiles};
use sharpsend_tests::proc_stats::{mib, peak_rss_kib, reset_peak_rss, rss_kib};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::Utc;
use clap::Parser;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use serde_json::{Value, json};
use sharpsend_core::criteria::{self, Criteria};
use sharpsend_db::criteria_sql::{self, Filter};
use sharpsend_db::managed_segments::{self, Applied, NewManagedSegment, Scope, StoredCriteria};
use sharpsend_db::testing::{Backend, TestDatabase};

#[derive(Debug, Parser)]
#[command(about = "Criteria evaluation over the profile mirror vs hand-written SQL")]
struct Args {
    /// Profiles to load.
    #[arg(long, default_value_t = 1_000_000)]
    profiles: usize,
    /// Timed runs per query (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Backends to measure.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
    /// PostgreSQL database to use (migrated by this run; profiles of a new workspace are
    /// added). Default: a fresh database under SHARPSEND_TEST_POSTGRES_URL, dropped at the end.
    #[arg(long)]
    database_url: Option<String>,
    /// Also print each query's plan (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL).
    #[arg(long)]
    explain: bool,
    /// With `--database-url`: measure the profiles an earlier run loaded into this workspace
    /// (its managed bench segment is deleted and created again) instead of loading new ones.
    #[arg(long)]
    workspace: Option<i64>,
}

/// Customer.io id of the mirrored "Growth Investors" segment the example reads.
const GROWTH_SEGMENT: i64 = 9001;
/// Customer.io id of the managed segment evaluated at the end.
const MANAGED_SEGMENT: i64 = 9002;

fn person(rng: &mut Rng, n: usize) -> Value {
    let investor = INVESTOR_TYPES[rng.below(INVESTOR_TYPES.len() as u64) as usize];
    let score = rng.below(101);
    // Half written by SharpSend (numbers), half imported from Customer.io (strings).
    let score = if n.is_multiple_of(2) {
        json!(score)
    } else {
        json!(score.to_string())
    };
    let tier = ["free", "premium", "pro"][rng.below(3) as usize];
    json!({
        "id": format!("p{n:07}"),
        "email": format!("reader{n}@example.com"),
        "attributes": {
            "email": format!("reader{n}@example.com"),
            "first_name": format!("Reader{}", n % 977),
            "investor_type": investor,
            "engagement_score": score,
            "sharpsend_assignment_interactions": rng.below(13),
            "subscription_tier": tier,
            "interests": ["stocks", "tech"],
            "portfolio_size_usd": rng.below(2_000_000),
            "country": "US",
            "created_at": 1_546_300_800 + rng.below(200_000_000),
        }
    })
}

async fn load(db: &DatabaseConnection, ws: i64, profiles: usize) -> anyhow::Result<Duration> {
    let backend = db.get_database_backend();
    let started = Instant::now();
    load_profiles(db, ws, profiles, person).await?;
    // The mirrored membership of "Growth Investors".
    let members = match backend {
        DbBackend::Postgres => format!(
            "INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT workspace_id, {GROWTH_SEGMENT}, customer_id \
             FROM profiles WHERE workspace_id = {ws} AND attributes->>'investor_type' = 'growth'"
        ),
        _ => format!(
            "INSERT INTO segment_members (workspace_id, segment_id, customer_id) SELECT workspace_id, {GROWTH_SEGMENT}, customer_id \
             FROM profiles WHERE workspace_id = {ws} AND json_extract(attributes, '$.investor_type') = 'growth'"
        ),
    };
    db.execute_unprepared(&members).await?;
    db.execute_unprepared("ANALYZE segment_members").await?;
    Ok(started.elapsed())
}

/// The issue's example and an all-attribute criteria, each with its hand-written SQL.
fn cases(backend: DbBackend, ws: i64) -> Vec<(&'static str, Value, String)> {
    let example = json!({"and": [
        {"segment": {"id": GROWTH_SEGMENT}},
        {"attribute": {"field": "engagement_score", "operator": "gt", "value": 80}},
        {"attribute": {"field": "sharpsend_assignment_interactions", "operator": "gt", "value": 5}},
    ]});
    let attributes = json!({"and": [
        {"attribute": {"field": "investor_type", "operator": "eq", "value": "growth"}},
        {"attribute": {"field": "engagement_score", "operator": "gt", "value": 80}},
        {"attribute": {"field": "sharpsend_assignment_interactions", "operator": "gt", "value": 5}},
    ]});
    let member = format!(
        "EXISTS (SELECT 1 FROM segment_members m WHERE m.workspace_id = p.workspace_id AND m.segment_id = {GROWTH_SEGMENT} AND m.customer_id = p.customer_id)"
    );
    let (growth, score, interactions) = match backend {
        DbBackend::Postgres => (
            "p.attributes->>'investor_type' = 'growth'",
            "(p.attributes->>'engagement_score')::numeric > 80",
            "(p.attributes->>'sharpsend_assignment_interactions')::numeric > 5",
        ),
        _ => (
            "json_extract(p.attributes, '$.investor_type') = 'growth'",
            "CAST(json_extract(p.attributes, '$.engagement_score') AS REAL) > 80",
            "json_extract(p.attributes, '$.sharpsend_assignment_interactions') > 5",
        ),
    };
    let hand = |first: &str| {
        format!(
            "SELECT p.customer_id FROM profiles p WHERE p.workspace_id = {ws} AND {first} AND {score} AND {interactions}"
        )
    };
    vec![
        (
            "segment + 2 numeric (the issue's example)",
            example,
            hand(&member),
        ),
        (
            "3 attributes (eq text, 2 numeric)",
            attributes,
            hand(growth),
        ),
    ]
}

fn filter_of(criteria: &Value) -> anyhow::Result<(Criteria, Filter)> {
    let raw = criteria::parse_json(&criteria.to_string(), "criteria")
        .map_err(|v| anyhow::anyhow!("{v:?}"))?;
    let criteria = criteria::validate(&raw, "criteria").map_err(|v| anyhow::anyhow!("{v:?}"))?;
    let filter = criteria.to_filter(Utc::now());
    Ok((criteria, filter))
}

async fn ids(db: &DatabaseConnection, stmt: Statement) -> anyhow::Result<Vec<String>> {
    let rows = db.query_all_raw(stmt).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(row.try_get::<String>("", "customer_id")?);
    }
    out.sort_unstable();
    Ok(out)
}

/// Best of `runs` (after a warm-up) and the last result.
async fn best<F, Fut>(runs: usize, mut run: F) -> anyhow::Result<(Duration, Vec<String>)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Vec<String>>>,
{
    let mut result = run().await?;
    let mut best = Duration::MAX;
    for _ in 0..runs.max(1) {
        let started = Instant::now();
        result = run().await?;
        best = best.min(started.elapsed());
    }
    Ok((best, result))
}

async fn bench(label: &str, db: &DatabaseConnection, args: &Args) -> anyhow::Result<()> {
    let backend = db.get_database_backend();
    println!("\n== {label}: {} profiles ==", args.profiles);
    let ws = match args.workspace.filter(|_| args.database_url.is_some()) {
        Some(ws) => {
            managed_segments::delete(db, ws, MANAGED_SEGMENT, Utc::now()).await?;
            println!("workspace {ws}: profiles loaded by an earlier run");
            ws
        }
        None => {
            let ws =
                sharpsend_db::workspaces::ensure(db, &format!("bench-{}", ulid::Ulid::new()), "us")
                    .await?
                    .id;
            let loaded = load(db, ws, args.profiles).await?;
            println!(
                "load into workspace {ws}: {:.1} s ({:.0} profiles/s)",
                loaded.as_secs_f64(),
                args.profiles as f64 / loaded.as_secs_f64()
            );
            ws
        }
    };

    let mut peak_kib = 0;
    let baseline = rss_kib().unwrap_or(0);
    let mut can_reset = true;
    for (name, criteria, hand_sql) in cases(backend, ws) {
        let (_, filter) = filter_of(&criteria)?;
        if args.explain {
            let evaluator =
                criteria_sql::matching_profiles(backend, ws, &filter, "p.customer_id").build();
            print_plan(db, "evaluator", evaluator).await?;
            print_plan(
                db,
                "hand-written",
                Statement::from_string(backend, hand_sql.clone()),
            )
            .await?;
        }
        can_reset &= reset_peak_rss();
        let (evaluator, evaluated) = best(args.runs, || {
            let stmt =
                criteria_sql::matching_profiles(backend, ws, &filter, "p.customer_id").build();
            ids(db, stmt)
        })
        .await?;
        peak_kib = peak_kib.max(peak_rss_kib().unwrap_or(0));
        let (hand, handwritten) = best(args.runs, || {
            ids(db, Statement::from_string(backend, hand_sql.clone()))
        })
        .await?;
        ensure!(
            evaluated == handwritten,
            "{name}: the evaluator found {} people, hand-written SQL {}",
            evaluated.len(),
            handwritten.len()
        );
        let ratio = evaluator.as_secs_f64() / hand.as_secs_f64();
        println!(
            "{name}: {} matches | evaluator {:.1} ms | hand-written {:.1} ms | ratio {ratio:.2}x {}",
            evaluated.len(),
            evaluator.as_secs_f64() * 1000.0,
            hand.as_secs_f64() * 1000.0,
            if ratio <= 1.2 {
                "(within 1.2x)"
            } else {
                "(OVER the 1.2x target)"
            }
        );
    }

    // A full evaluation of a managed segment: first every member new, then nothing changed.
    let (criteria, filter) = filter_of(&cases(backend, ws)[0].1)?;
    let new = NewManagedSegment {
        cio_segment_id: MANAGED_SEGMENT,
        name: "bench".into(),
        description: None,
        criteria: Some(StoredCriteria {
            criteria: criteria.to_json(),
            referenced_attributes: criteria.attributes().into_iter().collect(),
            referenced_segments: criteria.segments().into_iter().collect(),
        }),
        completes: None,
    };
    managed_segments::create(db, ws, &new, Utc::now()).await?;
    can_reset &= reset_peak_rss();
    for pass in ["first evaluation (all new)", "re-evaluation (no change)"] {
        let started = Instant::now();
        let Applied::Done(outcome) = managed_segments::apply_evaluation(
            db,
            ws,
            MANAGED_SEGMENT,
            0,
            &filter,
            &Scope::Full,
            Utc::now(),
        )
        .await?
        else {
            bail!("evaluation was stale");
        };
        peak_kib = peak_kib.max(peak_rss_kib().unwrap_or(0));
        println!(
            "{pass}: {:.1} ms, +{} -{} members, {} outbox rows",
            started.elapsed().as_secs_f64() * 1000.0,
            outcome.added,
            outcome.removed,
            outcome.outbox_rows
        );
    }
    incremental(db, ws, &filter, args.profiles).await?;
    if can_reset {
        println!(
            "evaluator peak RSS: {:.1} MiB (process RSS before: {:.1} MiB; +{:.1} MiB){}",
            mib(peak_kib),
            mib(baseline),
            mib(peak_kib.saturating_sub(baseline)),
            if backend == DbBackend::Sqlite {
                " — SQLite runs in this process"
            } else {
                ""
            }
        );
    } else {
        println!(
            "evaluator peak RSS: {:.1} MiB (VmHWM could not be reset: includes loading)",
            mib(peak_kib)
        );
    }
    Ok(())
}

/// Incremental re-evaluations of the managed segment (issue #18): nothing changed, then 100,
/// 1,000 and 10,000 changed profiles (`engagement_score` moved across the criteria's threshold
/// for every other one, in one statement, logged by the change-log triggers).
async fn incremental(
    db: &DatabaseConnection,
    ws: i64,
    filter: &Filter,
    profiles: usize,
) -> anyhow::Result<()> {
    let backend = db.get_database_backend();
    for (round, changed) in [0_usize, 100, 1_000, 10_000].into_iter().enumerate() {
        if changed > profiles {
            break;
        }
        let stride = (profiles / changed.max(1)).max(1);
        let ids: Vec<String> = (0..changed)
            .map(|i| format!("p{:07}", (i * stride + round) % profiles))
            .collect();
        let scores: Vec<i64> = (0..changed)
            .map(|i| {
                if (i + round).is_multiple_of(2) {
                    95
                } else {
                    10
                }
            })
            .collect();
        let rows = json!(
            ids.iter()
                .zip(&scores)
                .map(|(id, score)| json!({"c": id, "s": score}))
                .collect::<Vec<_>>()
        );
        let sql = match backend {
            DbBackend::Postgres => {
                "UPDATE profiles AS p SET attributes = jsonb_set(p.attributes, '{engagement_score}', r.v->'s') \
                 FROM jsonb_array_elements($2::jsonb) AS r(v) \
                 WHERE p.workspace_id = $1 AND p.customer_id = r.v->>'c'"
            }
            _ => {
                "UPDATE profiles SET attributes = json_set(attributes, '$.engagement_score', \
                 (SELECT json_extract(r.value, '$.s') FROM json_each(?2) r \
                  WHERE json_extract(r.value, '$.c') = profiles.customer_id)) \
                 WHERE workspace_id = ?1 AND customer_id IN \
                 (SELECT json_extract(value, '$.c') FROM json_each(?2))"
            }
        };
        if changed > 0 {
            db.execute_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [ws.into(), rows.to_string().into()],
            ))
            .await?;
        }
        let segment = managed_segments::get(db, ws, MANAGED_SEGMENT)
            .await?
            .context("managed segment")?;
        let since = segment
            .last_evaluation
            .context("evaluated before")?
            .evaluated_at;
        let started = Instant::now();
        let Applied::Done(outcome) = managed_segments::apply_evaluation(
            db,
            ws,
            MANAGED_SEGMENT,
            0,
            filter,
            &Scope::Incremental {
                since,
                windows: Vec::new(),
            },
            Utc::now(),
        )
        .await?
        else {
            bail!("incremental evaluation was stale");
        };
        ensure!(outcome.incremental, "the evaluation was not incremental");
        println!(
            "incremental re-evaluation after {changed} changed profiles: {:.1} ms, +{} -{} members",
            started.elapsed().as_secs_f64() * 1000.0,
            outcome.added,
            outcome.removed,
        );
    }
    // The result must equal a full evaluation: a check finds no drift.
    let segment = managed_segments::get(db, ws, MANAGED_SEGMENT)
        .await?
        .context("managed segment")?;
    let since = segment.last_evaluation.context("evaluated")?.evaluated_at;
    let started = Instant::now();
    let Applied::Done(outcome) = managed_segments::apply_evaluation(
        db,
        ws,
        MANAGED_SEGMENT,
        0,
        filter,
        &Scope::Check {
            since,
            windows: Vec::new(),
        },
        Utc::now(),
    )
    .await?
    else {
        bail!("check was stale");
    };
    ensure!(
        outcome.drift == Some(0) && outcome.added + outcome.removed == 0,
        "the full check found drift: {outcome:?}"
    );
    println!(
        "full check after the incremental ones: {:.1} ms, no drift",
        started.elapsed().as_secs_f64() * 1000.0
    );
    Ok(())
}

async fn print_plan(db: &DatabaseConnection, label: &str, stmt: Statement) -> anyhow::Result<()> {
    let prefix = match stmt.db_backend {
        DbBackend::Postgres => "EXPLAIN ",
        _ => "EXPLAIN QUERY PLAN ",
    };
    let explained = Statement {
        sql: format!("{prefix}{}", stmt.sql),
        ..stmt
    };
    println!("  plan ({label}):");
    for row in db.query_all_raw(explained).await? {
        let line = row
            .try_get_by_index::<String>(0)
            .or_else(|_| row.try_get_by_index::<String>(3))
            .unwrap_or_default();
        println!("    {line}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "bench-criteria: {} profiles, best of {} runs",
        args.profiles, args.runs
    );
    for backend in &args.backends {
        match backend.as_str() {
            "sqlite" => {
                let db = TestDatabase::create_migrated(Backend::Sqlite)
                    .await?
                    .context("SQLite")?;
                let result = bench("SQLite", &db.conn, &args).await;
                db.cleanup().await;
                result?;
            }
            "postgres" => match &args.database_url {
                Some(url) => {
                    let conn = sharpsend_db::connect(url).await?;
                    sharpsend_db::migrate(&conn).await?;
                    bench("PostgreSQL", &conn, &args).await?;
                }
                None => match TestDatabase::create_migrated(Backend::Postgres).await? {
                    Some(db) => {
                        let result = bench("PostgreSQL", &db.conn, &args).await;
                        db.cleanup().await;
                        result?;
                    }
                    None => println!(
                        "\n== PostgreSQL: skipped (set SHARPSEND_TEST_POSTGRES_URL or --database-url) =="
                    ),
                },
            },
            other => bail!("unknown backend `{other}`; expected sqlite or postgres"),
        }
    }
    Ok(())
}

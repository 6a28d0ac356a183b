//! ExportReport at scale (issue #15): streams a report of N rows over gRPC and prints rows/s and
//! the peak RSS of the process serving it, at growing N, so one can see the rate hold and the
//! memory stay flat. Asserts nothing about time.
//!
//! ```sh
//! SHARPSEND_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test \
//!   cargo run --release -p sharpsend-tests --bin bench-export -- --rows 1000000,10000000
//! ```
//!
//! PostgreSQL only. On a fresh test database with the simulator, one real send goes through the
//! demo broadcast (SendAssignment → dispatch → Customer.io), and is the template of the
//! history. Storing millions of events through the ingest path takes ~45 s per million, so the
//! history is **generated** in SQL instead (`generate_series`), into the tables ingest fills
//! for a report: `sends` and `send_submissions` (copies of the real send's rows, one send per
//! `--per-send` deliveries, one every 4 hours back from a day ago) and the per-delivery facts
//! `analytics_deliveries` that ingest folds the events into and ExportReport reads (the events
//! themselves, `delivery_events`, are not generated: no report reads them). Shaped like real
//! data: Customer.io-like random delivery ids (22 base64url characters, so in id order rows
//! are scattered over the table as real ones are), each send's deliveries spread over its first
//! minutes; 97% delivered, 2% bounced, 30% of delivered opened (5% of opens prefetched), 4%
//! clicked, a few spam reports, unsubscribes and conversions; 95% of deliveries reported by
//! webhook (90% of them also by the delivery poll), 5% by the poll alone. The facts are loaded
//! as a bulk load is: indexes dropped, rows inserted, indexes rebuilt, `VACUUM ANALYZE` (what
//! autovacuum would do), so the indexes are packed tighter than after months of ingest.
//!
//! Then, at each of `--rows` (ascending; the history grows to each size in turn):
//! `ExportReport` as CSV over the whole history (a period: the last 365 days), timed from the
//! call to the last chunk: rows, MiB, rows/s, the slowest gap between two chunks, and this
//! process's peak RSS during it (VmHWM reset before; the process serves the call). At the
//! largest size, also one send's report (an assignment) to show a small report from a large
//! table costs what it costs from a small one.

use sharpsend_tests::proc_stats::{peak_rss_kib, reset_peak_rss};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use sea_orm::{ConnectionTrait, DatabaseConnection, FromQueryResult, Statement, TransactionTrait};
use sharpsend_db::testing::{Backend, TestDatabase};
use sharpsend_proto::v1 as pb;
use sharpsend_tests::TestApp;

const BROADCAST: i64 = 3;
/// Seconds between two generated sends.
const SEND_EVERY: i64 = 4 * 3600;

#[derive(Debug, Parser)]
#[command(about = "ExportReport at scale over a generated history (PostgreSQL)")]
struct Args {
    /// Report sizes (rows = deliveries), ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    rows: Vec<u64>,
    /// Deliveries per generated send.
    #[arg(long, default_value_t = 50_000)]
    per_send: u64,
    /// Rows generated per INSERT statement.
    #[arg(long, default_value_t = 1_000_000)]
    insert_chunk: u64,
}

/// A real send through the demo broadcast: answers its row id.
async fn template_send(app: &TestApp) -> anyhow::Result<i64> {
    let sent = app
        .send_to_high_engagement("template", "crypto", BROADCAST)
        .await?;
    #[derive(FromQueryResult)]
    struct Id {
        id: i64,
    }
    let row = Id::find_by_statement(Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT id FROM sends WHERE public_id = $1",
        [sent.id.into()],
    ))
    .one(&app.ctx.db)
    .await?
    .context("the template send's row")?;
    Ok(row.id)
}

#[derive(FromQueryResult)]
struct Column {
    column_name: String,
}

/// `INSERT INTO table (every column but id) SELECT …`: each column from `overrides` when it
/// is there, else copied from the template row `t` (so columns added by later migrations are
/// copied, not forgotten).
async fn copy_insert(
    db: &impl ConnectionTrait,
    table: &str,
    overrides: &[(&str, String)],
    from: &str,
) -> anyhow::Result<String> {
    let columns = Column::find_by_statement(Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT column_name::text AS column_name FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1 ORDER BY ordinal_position",
        [table.into()],
    ))
    .all(db)
    .await?;
    let (mut names, mut values) = (Vec::new(), Vec::new());
    for c in columns.iter().filter(|c| c.column_name != "id") {
        names.push(c.column_name.clone());
        values.push(
            overrides
                .iter()
                .find(|(name, _)| *name == c.column_name)
                .map_or_else(|| format!("t.{}", c.column_name), |(_, v)| v.clone()),
        );
    }
    for (name, _) in overrides {
        ensure!(
            names.iter().any(|n| n == name),
            "{table} has no column {name}"
        );
    }
    Ok(format!(
        "INSERT INTO {table} ({}) SELECT {} {from}",
        names.join(", "),
        values.join(", ")
    ))
}

/// The generated history so far.
struct History {
    workspace_id: i64,
    template: i64,
    now: i64,
    per_send: u64,
    sends: u64,
    rows: u64,
}

impl History {
    fn send_time(&self, k: &str) -> String {
        format!("({} - 86400 - ({k}) * {SEND_EVERY})", self.now)
    }

    /// Sends (and their submissions) `self.sends..upto`, copies of the template.
    async fn add_sends(&mut self, db: &impl ConnectionTrait, upto: u64) -> anyhow::Result<()> {
        if upto <= self.sends {
            return Ok(());
        }
        let at = format!("to_timestamp({})", self.send_time("k"));
        let assignment = "'gen-' || lpad(k::text, 5, '0')";
        let sends = copy_insert(
            db,
            "sends",
            &[
                (
                    "public_id",
                    "'snd_' || upper(substr(md5('gen-send-' || k), 1, 26))".into(),
                ),
                ("assignment_id", assignment.into()),
                ("request_id", "md5('gen-request-' || k)".into()),
                ("title", "'Generated assignment ' || k".into()),
                (
                    "request",
                    format!(
                        "jsonb_set(t.request, '{{assignment_id}}', to_jsonb({assignment}), false)"
                    ),
                ),
                ("created_at", at.clone()),
                ("updated_at", at.clone()),
            ],
            &format!(
                "FROM sends t, generate_series({}, {}) k WHERE t.id = {}",
                self.sends,
                upto - 1,
                self.template
            ),
        )
        .await?;
        db.execute_unprepared(&sends).await?;
        let submissions = copy_insert(
            db,
            "send_submissions",
            &[
                ("send_id", "s.id".into()),
                ("marker", "md5('gen-marker-' || s.id)".into()),
                ("cio_trigger_id", "t.cio_trigger_id + s.id".into()),
                ("recipients_count", self.per_send.to_string()),
                ("next_attempt_at", "s.created_at".into()),
                ("submitted_at", "s.created_at".into()),
                ("completed_at", "s.created_at".into()),
                ("updated_at", "s.created_at".into()),
            ],
            &format!(
                "FROM send_submissions t, sends s WHERE t.send_id = {} \
                 AND s.workspace_id = {} AND s.assignment_id LIKE 'gen-%' \
                 AND s.id > (SELECT COALESCE(MAX(send_id), 0) FROM send_submissions)",
                self.template, self.workspace_id
            ),
        )
        .await?;
        db.execute_unprepared(&submissions).await?;
        self.sends = upto;
        Ok(())
    }

    /// Grows the facts to `target` rows (see the module doc for their shape).
    async fn grow(
        &mut self,
        db: &DatabaseConnection,
        target: u64,
        chunk: u64,
    ) -> anyhow::Result<()> {
        if target <= self.rows {
            return Ok(());
        }
        let started = Instant::now();
        let txn = db.begin().await?;
        self.add_sends(&txn, target.div_ceil(self.per_send)).await?;
        txn.execute_unprepared("SET LOCAL maintenance_work_mem = '256MB'")
            .await?;
        // Bulk load: drop the indexes (remembering their definitions), insert, rebuild.
        #[derive(FromQueryResult)]
        struct Def {
            name: String,
            def: String,
        }
        let pk = Def::find_by_statement(Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT conname::text AS name, pg_get_constraintdef(oid) AS def FROM pg_constraint \
             WHERE conrelid = 'analytics_deliveries'::regclass AND contype = 'p'",
        ))
        .one(&txn)
        .await?
        .context("the facts' primary key")?;
        let indexes = Def::find_by_statement(Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT indexname::text AS name, indexdef AS def FROM pg_indexes \
             WHERE schemaname = current_schema() AND tablename = 'analytics_deliveries' \
             AND indexname <> $1",
            [pk.name.clone().into()],
        ))
        .all(&txn)
        .await?;
        txn.execute_unprepared(&format!(
            "ALTER TABLE analytics_deliveries DROP CONSTRAINT {}",
            pk.name
        ))
        .await?;
        for ix in &indexes {
            txn.execute_unprepared(&format!("DROP INDEX {}", ix.name))
                .await?;
        }
        let t0 = self.send_time("g / per");
        let mut from = self.rows;
        while from < target {
            let to = (from + chunk.max(1)).min(target);
            // u1..u4: independent uniform draws per delivery; w: reported by webhook.
            let text = format!(
                "INSERT INTO analytics_deliveries (workspace_id, delivery_id, send_id, segment_id, \
                 assignment_id, customer_id, first_id, first_at, last_at, delivered_at, \
                 wh_open_at, wh_open, poll_open_at, wh_click_at, wh_click, poll_click_at, \
                 bounced_at, spammed_at, unsubscribed_at, converted_at, webhook, poll) \
                 SELECT s.workspace_id, d.id, s.id, sub.segment_id, s.assignment_id, d.customer, \
                 d.g + 1, d.t0, d.t0 + 172800 + 600, \
                 CASE WHEN d.u1 < 970 THEN d.t0 + 5 + d.u2 % 60 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 300 AND d.u4 >= 50 AND d.w THEN d.t0 + 60 + d.u2 % 172800 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 300 AND d.w THEN 1 ELSE 0 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 300 AND NOT (d.w AND d.u4 >= 950) THEN d.t0 + 600 + d.u2 % 172800 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 40 AND d.w THEN d.t0 + 120 + d.u2 % 172800 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 40 AND d.w THEN 1 ELSE 0 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 40 AND NOT (d.w AND d.u4 >= 950) THEN d.t0 + 600 + d.u2 % 172800 END, \
                 CASE WHEN d.u1 >= 980 THEN d.t0 + 3 END, \
                 CASE WHEN d.u1 < 970 AND d.u4 = 999 THEN d.t0 + 3600 END, \
                 CASE WHEN d.u1 < 970 AND d.u4 BETWEEN 990 AND 992 THEN d.t0 + 7200 END, \
                 CASE WHEN d.u1 < 970 AND d.u3 < 40 AND d.u4 < 5 THEN d.t0 + 86400 END, \
                 CASE WHEN d.w THEN 1 ELSE 0 END, \
                 CASE WHEN d.w AND d.u4 >= 950 THEN 0 ELSE 1 END \
                 FROM (SELECT g, rtrim(translate(encode(decode(md5('gen-delivery-' || g), 'hex'), \
                 'base64'), '+/', '-_'), '=') AS id, \
                 'p' || lpad((g % per)::text, 8, '0') AS customer, \
                 {t0} + (g % per) / 100 AS t0, \
                 'gen-' || lpad((g / per)::text, 5, '0') AS assignment, \
                 abs(hashint8extended(g, 1)) % 1000 AS u1, \
                 abs(hashint8extended(g, 2)) % 1000000 AS u2, \
                 abs(hashint8extended(g, 3)) % 1000 AS u3, \
                 abs(hashint8extended(g, 4)) % 1000 AS u4, \
                 abs(hashint8extended(g, 5)) % 100 < 95 AS w \
                 FROM generate_series({from}::bigint, {last}::bigint) g, \
                 (SELECT {per}::bigint AS per) p) d \
                 JOIN sends s ON s.workspace_id = {ws} AND s.assignment_id = d.assignment \
                 JOIN send_submissions sub ON sub.send_id = s.id",
                last = to - 1,
                per = self.per_send,
                ws = self.workspace_id,
            );
            let inserted = txn.execute_unprepared(&text).await?.rows_affected();
            ensure!(
                inserted == to - from,
                "inserted {inserted} facts, meant {}",
                to - from
            );
            println!(
                "  generated {to} facts ({:.0}s)",
                started.elapsed().as_secs_f64()
            );
            from = to;
        }
        let indexed = Instant::now();
        txn.execute_unprepared(&format!(
            "ALTER TABLE analytics_deliveries ADD CONSTRAINT {} {}",
            pk.name, pk.def
        ))
        .await?;
        for ix in &indexes {
            txn.execute_unprepared(&ix.def).await?;
        }
        txn.commit().await?;
        let indexing = indexed.elapsed();
        let vacuumed = Instant::now();
        self.rows = target;
        vacuum(db).await?;
        println!(
            "history: {} facts over {} sends generated in {:.0}s (indexes rebuilt in {:.0}s, VACUUM ANALYZE {:.0}s)",
            self.rows,
            self.sends,
            started.elapsed().as_secs_f64(),
            indexing.as_secs_f64(),
            vacuumed.elapsed().as_secs_f64()
        );
        Ok(())
    }
}

/// `VACUUM ANALYZE` of the generated tables, as autovacuum would after a load (a statement on
/// the pool runs outside any transaction block, as VACUUM must).
async fn vacuum(db: &DatabaseConnection) -> anyhow::Result<()> {
    db.execute_unprepared("VACUUM ANALYZE analytics_deliveries, sends, send_submissions")
        .await?;
    Ok(())
}

/// Streams one CSV report; answers (rows, bytes, elapsed, slowest gap between chunks).
async fn export(
    app: &TestApp,
    request: pb::ExportReportRequest,
) -> anyhow::Result<(u64, u64, Duration, Duration)> {
    let mut client = app.analytics().await?;
    let t = Instant::now();
    let mut stream = client.export_report(request).await?.into_inner();
    let (mut rows, mut bytes) = (0u64, 0u64);
    let mut last = Instant::now();
    let mut slowest = Duration::ZERO;
    while let Some(chunk) = stream.message().await? {
        slowest = slowest.max(last.elapsed());
        last = Instant::now();
        rows += u64::try_from(chunk.rows).unwrap_or(0);
        bytes += chunk.data.len() as u64;
    }
    Ok((rows, bytes, t.elapsed(), slowest))
}

fn report(what: &str, rows: u64, bytes: u64, elapsed: Duration, slowest: Duration) {
    println!(
        "{what}: {rows} rows, {:.1} MiB in {:.1}s: {:.0} rows/s; slowest chunk {:.0} ms; peak RSS during it {:.1} MiB",
        bytes as f64 / 1_048_576.0,
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64().max(1e-9),
        slowest.as_secs_f64() * 1000.0,
        peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
}

async fn run(args: &Args, app: &TestApp) -> anyhow::Result<()> {
    let template = template_send(app).await?;
    let now = app.ctx.now();
    let mut history = History {
        workspace_id: app.ctx.workspace_id(),
        template,
        now: now.timestamp(),
        per_send: args.per_send.max(1),
        sends: 0,
        rows: 0,
    };
    let mut sizes = args.rows.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let period = |secs: i64| prost_types::Timestamp {
        seconds: secs,
        nanos: 0,
    };
    for &n in &sizes {
        history.grow(&app.ctx.db, n, args.insert_chunk).await?;
        reset_peak_rss();
        let (rows, bytes, elapsed, slowest) = export(
            app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::Csv as i32,
                start_time: Some(period(history.now - 365 * 86_400)),
                end_time: Some(period(history.now)),
                ..Default::default()
            },
        )
        .await?;
        report(
            &format!("ExportReport CSV, a period, N = {n}"),
            rows,
            bytes,
            elapsed,
            slowest,
        );
        ensure!(rows == n, "exported {rows} rows of {n}");
    }
    if let Some(&n) = sizes.last() {
        reset_peak_rss();
        let (rows, bytes, elapsed, slowest) = export(
            app,
            pb::ExportReportRequest {
                format: pb::ReportFormat::Csv as i32,
                assignment_id: "gen-00000".into(),
                ..Default::default()
            },
        )
        .await?;
        report(
            &format!("ExportReport CSV, one assignment among N = {n}"),
            rows,
            bytes,
            elapsed,
            slowest,
        );
        ensure!(
            rows == history.per_send.min(n),
            "exported {rows} rows of one send"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    cio_client::install_crypto_provider();
    let Some(db) = TestDatabase::create_migrated(Backend::Postgres).await? else {
        bail!("bench-export generates its history in PostgreSQL: set SHARPSEND_TEST_POSTGRES_URL");
    };
    println!(
        "bench-export on PostgreSQL, {} cores, load average {} (shared machine: figures vary with other load)",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    );
    let app = TestApp::spawn(&db).await?;
    let result = run(&args, &app).await;
    app.stop().await?;
    db.cleanup().await;
    result
}

//! Generated profiles for the benchmarks: a deterministic generator ([`Rng`]) and a bulk
//! loader ([`load_profiles`]) that inserts them in multi-row statements (one JSON array bound
//! per statement), in one transaction, then runs `ANALYZE`.

use std::time::{Duration, Instant};

use chrono::Utc;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use serde_json::Value;

/// The `investor_type` values generated people have.
pub const INVESTOR_TYPES: [&str; 8] = [
    "growth",
    "value",
    "dividend",
    "income",
    "crypto",
    "index",
    "day_trader",
    "esg",
];

/// Rows per load statement.
pub const LOAD_CHUNK: usize = 5000;

/// SplitMix64: the same people on every run and backend.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Inserts `profiles` people into workspace `ws`, `person(rng, n)` giving the n-th as
/// `{"id", "email", "attributes"}`, in one transaction (the change-log triggers fire per
/// statement), then `ANALYZE`s the database. Answers how long it took.
pub async fn load_profiles(
    db: &DatabaseConnection,
    ws: i64,
    profiles: usize,
    mut person: impl FnMut(&mut Rng, usize) -> Value,
) -> anyhow::Result<Duration> {
    let backend = db.get_database_backend();
    let started = Instant::now();
    let mut rng = Rng(42);
    let now = Utc::now();
    let sql = match backend {
        DbBackend::Postgres => {
            "INSERT INTO profiles (workspace_id, customer_id, email, email_lower, attributes, updated_at, fetched_at) \
             SELECT $1, r->>'id', r->>'email', lower(r->>'email'), r->'attributes', $2, $2 FROM jsonb_array_elements($3::jsonb) r"
        }
        _ => {
            "INSERT INTO profiles (workspace_id, customer_id, email, email_lower, attributes, updated_at, fetched_at) \
             SELECT ?, value ->> '$.id', value ->> '$.email', lower(value ->> '$.email'), value -> '$.attributes', ?, ? FROM json_each(?)"
        }
    };
    let txn = db.begin().await?;
    let mut n = 0;
    while n < profiles {
        let end = (n + LOAD_CHUNK).min(profiles);
        let rows: Vec<Value> = (n..end).map(|i| person(&mut rng, i)).collect();
        let values: Vec<sea_orm::Value> = match backend {
            DbBackend::Postgres => vec![ws.into(), now.into(), Value::Array(rows).into()],
            _ => vec![
                ws.into(),
                now.into(),
                now.into(),
                Value::Array(rows).to_string().into(),
            ],
        };
        txn.execute_raw(Statement::from_sql_and_values(backend, sql, values))
            .await?;
        n = end;
    }
    txn.commit().await?;
    db.execute_unprepared("ANALYZE").await?;
    Ok(started.elapsed())
}

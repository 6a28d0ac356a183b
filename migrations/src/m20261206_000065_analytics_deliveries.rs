//! Per-delivery analytics facts (issue #15, a fast GetAssignmentAnalytics): `analytics_deliveries`
//! holds, per attributed delivery (and send and target segment), the aggregate of its delivery
//! events that the analytics read — every column a MIN or a MAX over the events, so folding an
//! event in is a commutative, idempotent merge (`sharpsend_db::analytics::fold`, run by ingest
//! in the transaction that stores or attributes the events). Reads then group deliveries, not
//! events. This migration creates it and backfills it from the events already stored (the same
//! aggregate, frozen here as migrations are).
//!
//! Times are unix seconds; `segment_id` 0 stands for an event without a target segment (the
//! key cannot hold NULL).

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

const CREATE: &str = "CREATE TABLE analytics_deliveries (\
    workspace_id BIGINT NOT NULL, \
    delivery_id TEXT NOT NULL, \
    send_id BIGINT NOT NULL, \
    segment_id BIGINT NOT NULL, \
    assignment_id TEXT NULL, \
    customer_id TEXT NULL, \
    first_id BIGINT NOT NULL, \
    first_at BIGINT NOT NULL, \
    last_at BIGINT NOT NULL, \
    delivered_at BIGINT NULL, \
    wh_open_at BIGINT NULL, \
    wh_open INTEGER NOT NULL, \
    poll_open_at BIGINT NULL, \
    wh_click_at BIGINT NULL, \
    wh_click INTEGER NOT NULL, \
    poll_click_at BIGINT NULL, \
    bounced_at BIGINT NULL, \
    spammed_at BIGINT NULL, \
    unsubscribed_at BIGINT NULL, \
    converted_at BIGINT NULL, \
    webhook INTEGER NOT NULL, \
    poll INTEGER NOT NULL, \
    PRIMARY KEY (workspace_id, delivery_id, send_id, segment_id))";

const INDEXES: [(&str, &str); 4] = [
    (
        "ix_analytics_deliveries_assignment",
        "workspace_id, assignment_id, delivery_id",
    ),
    (
        "ix_analytics_deliveries_segment",
        "workspace_id, segment_id, delivery_id",
    ),
    (
        "ix_analytics_deliveries_customer",
        "workspace_id, customer_id, first_id",
    ),
    ("ix_analytics_deliveries_first_at", "workspace_id, first_at"),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(CREATE).await?;
        for (name, cols) in INDEXES {
            db.execute_unprepared(&format!(
                "CREATE INDEX {name} ON analytics_deliveries ({cols})"
            ))
            .await?;
        }
        let t = match db.get_database_backend() {
            DbBackend::Postgres => "CAST(FLOOR(EXTRACT(EPOCH FROM occurred_at)) AS BIGINT)",
            _ => "CAST(strftime('%s', occurred_at) AS INTEGER)",
        };
        db.execute_unprepared(&format!(
            "INSERT INTO analytics_deliveries (workspace_id, delivery_id, send_id, segment_id, \
             assignment_id, customer_id, first_id, first_at, last_at, delivered_at, wh_open_at, \
             wh_open, poll_open_at, wh_click_at, wh_click, poll_click_at, bounced_at, spammed_at, \
             unsubscribed_at, converted_at, webhook, poll) \
             SELECT workspace_id, delivery_id, send_id, COALESCE(segment_id, 0), \
             MIN(assignment_id), MIN(customer_id), MIN(id), MIN({t}), MAX({t}), \
             MIN(CASE WHEN metric IN ('delivered','opened','clicked','converted') THEN {t} END), \
             MIN(CASE WHEN source = 'webhook' AND metric = 'opened' AND NOT prefetched AND NOT synthetic THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' AND metric = 'opened' THEN 1 ELSE 0 END), \
             MIN(CASE WHEN source = 'poll' AND metric = 'opened' THEN {t} END), \
             MIN(CASE WHEN source = 'webhook' AND metric = 'clicked' AND NOT machine THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' AND metric = 'clicked' THEN 1 ELSE 0 END), \
             MIN(CASE WHEN source = 'poll' AND metric = 'clicked' THEN {t} END), \
             MIN(CASE WHEN metric IN ('bounced','failed','dropped','undeliverable') THEN {t} END), \
             MIN(CASE WHEN metric = 'spammed' THEN {t} END), \
             MIN(CASE WHEN metric = 'unsubscribed' THEN {t} END), \
             MIN(CASE WHEN metric = 'converted' THEN {t} END), \
             MAX(CASE WHEN source = 'webhook' THEN 1 ELSE 0 END), \
             MAX(CASE WHEN source = 'poll' THEN 1 ELSE 0 END) \
             FROM delivery_events WHERE delivery_id IS NOT NULL AND send_id IS NOT NULL \
             GROUP BY workspace_id, delivery_id, send_id, COALESCE(segment_id, 0)"
        ))
        .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP TABLE analytics_deliveries")
            .await?;
        Ok(())
    }
}

//! The read cache (`sharpsend_core::cache`) end to end: repeated reads are served from memory,
//! and a read after a committed write sees it, whether the write went through this server or
//! through another database connection (standing in for the scheduler's process).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use prost_types::{Struct, value::Kind};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, TransactionTrait};
use serde_json::{Map, Value, json};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    CustomerRef, GetProfileRequest, GetSegmentRequest, ListSegmentsRequest,
    UpdateAttributesRequest, customer_ref::Identifier,
};
use sharpsend_tests::TestApp;

/// How long a write from another connection may take to reach the cache (PostgreSQL delivers
/// its notification after the commit; SQLite needs no wait at all).
const NOTIFY_DEADLINE: Duration = Duration::from_secs(5);

/// Renames segment `id` from `other` so that no change signal is sent (triggers bypassed on
/// PostgreSQL; the SQLite counter put back), to show what the cache serves.
async fn rename_silently(other: &DatabaseConnection, id: i64, name: &str) -> anyhow::Result<()> {
    let txn = other.begin().await?;
    let rename = format!("UPDATE segments SET name = '{name}' WHERE cio_id = {id}");
    match txn.get_database_backend() {
        DbBackend::Postgres => {
            txn.execute_unprepared("SET LOCAL session_replication_role = replica")
                .await?;
            txn.execute_unprepared(&rename).await?;
        }
        _ => {
            txn.execute_unprepared(&rename).await?;
            txn.execute_unprepared(
                "UPDATE read_versions SET version = version - 1 WHERE area = 'segments'",
            )
            .await?;
        }
    }
    txn.commit().await?;
    Ok(())
}

fn attribute(attributes: Option<&Struct>, name: &str) -> Option<String> {
    match attributes?.fields.get(name)?.kind.as_ref()? {
        Kind::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn to_struct(value: Value) -> Struct {
    sharpsend_server::convert::json_to_struct(value.as_object().unwrap_or(&Map::new()))
}

db_test!(
    cached_segment_reads_see_writes_of_another_connection,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.segments().await?;
        app.sync_segments().await?;
        let id = app.sim.sim.segments().first().context("demo segment")?.id;
        let get = GetSegmentRequest { segment_id: id };
        let list = ListSegmentsRequest {
            page_size: 50,
            ..Default::default()
        };
        let name = |s: Option<sharpsend_proto::v1::Segment>| s.map(|s| s.name).unwrap_or_default();
        let listed_name = |page: sharpsend_proto::v1::ListSegmentsResponse| {
            page.segments
                .into_iter()
                .find(|s| s.id == id)
                .map(|s| s.name)
                .unwrap_or_default()
        };
        let first = name(client.get_segment(get).await?.into_inner().segment);
        let first_listed = listed_name(client.list_segments(list.clone()).await?.into_inner());
        ensure!(first == first_listed && !first.is_empty());

        // A change that sends no signal is not seen: the reads come from the cache.
        let other = db.connect_again().await?;
        rename_silently(&other, id, "silent").await?;
        ensure!(name(client.get_segment(get).await?.into_inner().segment) == first);
        ensure!(listed_name(client.list_segments(list.clone()).await?.into_inner()) == first);

        // A committed write of another connection is seen by the next reads.
        other
            .execute_unprepared(&format!(
                "UPDATE segments SET name = 'renamed elsewhere' WHERE cio_id = {id}"
            ))
            .await?;
        let started = Instant::now();
        let mut reads = 0;
        loop {
            reads += 1;
            let got = name(client.get_segment(get).await?.into_inner().segment);
            let listed = listed_name(client.list_segments(list.clone()).await?.into_inner());
            if got == "renamed elsewhere" && listed == got {
                break;
            }
            ensure!(
                other.get_database_backend() == DbBackend::Postgres,
                "SQLite must see the write at once; read {got:?} / {listed:?}"
            );
            ensure!(
                started.elapsed() < NOTIFY_DEADLINE,
                "write of another connection not seen after {reads} reads: {got:?}"
            );
            tokio::task::yield_now().await;
        }
        other.close().await?;
        app.stop().await
    }
);

db_test!(
    cached_profile_reads_see_this_servers_writes_at_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let who = || GetProfileRequest {
            customer: Some(CustomerRef {
                identifier: Some(Identifier::Id("cache-1".into())),
            }),
            fresh: false,
            ..Default::default()
        };
        for plan in ["basic", "pro", "team", "enterprise"] {
            client
                .update_attributes(UpdateAttributesRequest {
                    customer_id: "cache-1".into(),
                    attributes: Some(to_struct(json!({ "plan": plan }))),
                })
                .await?;
            // Twice: the second read is served from the cache, and both see the write.
            for _ in 0..2 {
                let profile = client
                    .get_profile(who())
                    .await?
                    .into_inner()
                    .profile
                    .context("profile")?;
                let seen = attribute(profile.attributes.as_ref(), "plan");
                ensure!(seen.as_deref() == Some(plan), "wrote {plan}, read {seen:?}");
            }
        }
        app.stop().await
    }
);

/// Adds a delivery of `customer` to `analytics_deliveries` (as the scheduler's webhook fold
/// would) through `other`; `silently`: without a change signal, as [`rename_silently`] does.
async fn add_delivery(
    other: &DatabaseConnection,
    workspace_id: i64,
    customer: &str,
    first_id: i64,
    silently: bool,
) -> anyhow::Result<()> {
    let txn = other.begin().await?;
    let postgres = txn.get_database_backend() == DbBackend::Postgres;
    if silently && postgres {
        txn.execute_unprepared("SET LOCAL session_replication_role = replica")
            .await?;
    }
    txn.execute_unprepared(&format!(
        "INSERT INTO analytics_deliveries (workspace_id, delivery_id, send_id, segment_id, \
         customer_id, first_id, first_at, last_at, delivered_at, wh_open, wh_click, webhook, poll) \
         VALUES ({workspace_id}, 'd-{first_id}', 1, 0, '{customer}', {first_id}, 1700000000, \
         1700000000, 1700000000, 0, 0, 1, 0)"
    ))
    .await?;
    if silently && !postgres {
        txn.execute_unprepared(
            "UPDATE read_versions SET version = version - 1 WHERE area = 'deliveries'",
        )
        .await?;
    }
    txn.commit().await?;
    Ok(())
}

db_test!(
    cached_delivery_history_sees_writes_of_another_connection,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        client
            .update_attributes(UpdateAttributesRequest {
                customer_id: "hist-1".into(),
                attributes: Some(to_struct(json!({ "plan": "pro" }))),
            })
            .await?;
        let who = || GetProfileRequest {
            customer: Some(CustomerRef {
                identifier: Some(Identifier::Id("hist-1".into())),
            }),
            fresh: false,
            ..Default::default()
        };
        let mut deliveries = async || -> anyhow::Result<Vec<String>> {
            let history = client
                .get_profile(who())
                .await?
                .into_inner()
                .history
                .context("history")?;
            Ok(history
                .deliveries
                .into_iter()
                .map(|d| d.delivery_id)
                .collect())
        };
        ensure!(deliveries().await?.is_empty());

        // A delivery added without a signal is not seen: the history comes from the cache.
        let other = db.connect_again().await?;
        let workspace = app.ctx.workspace_id();
        add_delivery(&other, workspace, "hist-1", 10, true).await?;
        ensure!(
            deliveries().await?.is_empty(),
            "history not served from the cache"
        );

        // A committed delivery of another connection is seen by the next reads (both, newest
        // first: the silent one was reloaded with it).
        add_delivery(&other, workspace, "hist-1", 11, false).await?;
        let started = Instant::now();
        loop {
            let got = deliveries().await?;
            if got == ["d-11", "d-10"] {
                break;
            }
            ensure!(
                other.get_database_backend() == DbBackend::Postgres,
                "SQLite must see the write at once; read {got:?}"
            );
            ensure!(
                started.elapsed() < NOTIFY_DEADLINE,
                "delivery of another connection not seen: {got:?}"
            );
            tokio::task::yield_now().await;
        }
        other.close().await?;
        app.stop().await
    }
);

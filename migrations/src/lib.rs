//! Schema migrations for the SharpSend ↔ Customer.io database (sea-orm-migration).
//!
//! Layout:
//! - [`Migrator`]: the ordered list of migrations; run it through `sharpsend_db::migrate`
//!   (one place migrates, everything else checks with `sharpsend_db::ensure_migrated`).
//! - `mYYYYMMDD_NNNNNN_<what>.rs`: exactly one migration per file, because
//!   `DeriveMigrationName` names a migration after its file. Migrations are frozen once
//!   released: each file declares the identifiers it needs instead of importing them.
//!
//! Conventions shared by every table: a `workspace_id` (except `workspaces` itself),
//! timestamps as `timestamp with time zone` (RFC 3339 text on SQLite, always written in UTC by
//! the application, so text order is time order), no database-side defaults for timestamps.

pub use sea_orm_migration::MigratorTrait;
use sea_orm_migration::prelude::*;

mod m20261128_000001_create_workspaces;
mod m20261128_000002_create_segments;
mod m20261128_000003_create_job_runs;
mod m20261128_000004_create_job_leases;
mod m20261128_000005_create_profiles;
mod m20261128_000006_create_outbox;
mod m20261128_000007_create_managed_segments;
mod m20261128_000008_outbox_segment_kinds;
mod m20261128_000009_create_sends;
mod m20261128_000010_create_campaigns_and_metrics;
mod m20261206_000015_send_attempt_window;
mod m20261206_000016_send_subscription_topic;
mod m20261206_000017_send_trigger_errors;
mod m20261206_000018_create_idempotency_keys;
mod m20261206_000021_create_profile_sync_state;
mod m20261206_000026_create_delivery_events;
mod m20261206_000031_read_versions;
mod m20261206_000035_create_ab_tests;
mod m20261206_000040_ab_test_runs;
mod m20261206_000045_profile_changes;
mod m20261206_000050_delivery_events_analytics;
mod m20261206_000055_create_api_keys;
mod m20261206_000056_create_audit_events;
mod m20261206_000060_workspace_credentials;
mod m20261206_000061_workspace_version;
mod m20261206_000065_analytics_deliveries;
mod m20261206_000070_send_cancellation;
mod m20261207_000080_profile_numbers;
mod m20261207_000090_numbers_first_character;
mod m20261207_000091_profile_changes_once;
mod m20261207_000092_workspace_checks_per_statement;
mod m20261207_000093_segment_members_by_person;
mod m20261207_000094_profile_changes_by_segment;
mod m20261207_000095_read_versions_deliveries;
mod m20261207_000096_numbers_from_the_patch;
mod m20261208_000097_segment_members_workspace_per_statement;

/// All migrations of the project, oldest first.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261128_000001_create_workspaces::Migration),
            Box::new(m20261128_000002_create_segments::Migration),
            Box::new(m20261128_000003_create_job_runs::Migration),
            Box::new(m20261128_000004_create_job_leases::Migration),
            Box::new(m20261128_000005_create_profiles::Migration),
            Box::new(m20261128_000006_create_outbox::Migration),
            Box::new(m20261128_000007_create_managed_segments::Migration),
            Box::new(m20261128_000008_outbox_segment_kinds::Migration),
            Box::new(m20261128_000009_create_sends::Migration),
            Box::new(m20261128_000010_create_campaigns_and_metrics::Migration),
            Box::new(m20261206_000015_send_attempt_window::Migration),
            Box::new(m20261206_000016_send_subscription_topic::Migration),
            Box::new(m20261206_000017_send_trigger_errors::Migration),
            Box::new(m20261206_000018_create_idempotency_keys::Migration),
            Box::new(m20261206_000021_create_profile_sync_state::Migration),
            Box::new(m20261206_000026_create_delivery_events::Migration),
            Box::new(m20261206_000031_read_versions::Migration),
            Box::new(m20261206_000035_create_ab_tests::Migration),
            Box::new(m20261206_000040_ab_test_runs::Migration),
            Box::new(m20261206_000045_profile_changes::Migration),
            Box::new(m20261206_000050_delivery_events_analytics::Migration),
            Box::new(m20261206_000055_create_api_keys::Migration),
            Box::new(m20261206_000056_create_audit_events::Migration),
            Box::new(m20261206_000060_workspace_credentials::Migration),
            Box::new(m20261206_000061_workspace_version::Migration),
            Box::new(m20261206_000065_analytics_deliveries::Migration),
            Box::new(m20261206_000070_send_cancellation::Migration),
            Box::new(m20261207_000080_profile_numbers::Migration),
            Box::new(m20261207_000090_numbers_first_character::Migration),
            Box::new(m20261207_000091_profile_changes_once::Migration),
            Box::new(m20261207_000092_workspace_checks_per_statement::Migration),
            Box::new(m20261207_000093_segment_members_by_person::Migration),
            Box::new(m20261207_000094_profile_changes_by_segment::Migration),
            Box::new(m20261207_000095_read_versions_deliveries::Migration),
            Box::new(m20261207_000096_numbers_from_the_patch::Migration),
            Box::new(m20261208_000097_segment_members_workspace_per_statement::Migration),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_names_are_unique_and_ordered() {
        let names: Vec<String> = Migrator::migrations()
            .iter()
            .map(|m| m.name().to_owned())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            names, sorted,
            "migrations must be unique and in file-name order"
        );
        assert!(names.iter().all(|n| n.starts_with('m') && n.len() > 17));
    }

    /// Up, down to nothing, and up again on an in-memory SQLite database: every migration is
    /// reversible. (Both backends are exercised against real data by `sharpsend-db`'s tests.)
    #[tokio::test]
    async fn up_down_up_on_sqlite() -> Result<(), DbErr> {
        let db = sea_orm_migration::sea_orm::Database::connect("sqlite::memory:").await?;
        Migrator::up(&db, None).await?;
        assert!(Migrator::get_pending_migrations(&db).await?.is_empty());
        Migrator::down(&db, None).await?;
        assert_eq!(
            Migrator::get_pending_migrations(&db).await?.len(),
            Migrator::migrations().len()
        );
        Migrator::up(&db, None).await?;
        assert!(Migrator::get_pending_migrations(&db).await?.is_empty());
        Ok(())
    }
}

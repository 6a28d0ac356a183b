//! Workspaces as data (issue #17): each workspace row may carry its own Customer.io credentials,
//! sealed at rest (`sharpsend_core::secrets`: `v1:<key id>:<base64>`, never plaintext), its own
//! rate limits and base URL overrides, and can be disabled.
//!
//! - `track_api_key_sealed`, `app_api_key_sealed`, `webhook_signing_key_sealed`: NULL for the
//!   env-configured default workspace, whose credentials stay in the `CIO_*` variables (and for
//!   a workspace without a webhook signing key).
//! - `secrets_key_id`: the master key id sealing them (what the `secrets-rekey` job looks at).
//! - `track_requests_per_sec`, `app_requests_per_sec`: NULL means the process defaults.
//! - `track_base_url`, `app_base_url`: overrides for proxies and simulators; NULL: the region's.
//! - `disabled_at`: set by DisableWorkspace; `updated_at`: the last change (NULL: never changed
//!   since created).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

fn columns() -> Vec<ColumnDef> {
    vec![
        ColumnDef::new(Workspaces::TrackApiKeySealed)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::AppApiKeySealed)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::WebhookSigningKeySealed)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::SecretsKeyId)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::TrackRequestsPerSec)
            .integer()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::AppRequestsPerSec)
            .integer()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::TrackBaseUrl)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::AppBaseUrl)
            .text()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::DisabledAt)
            .timestamp_with_time_zone()
            .null()
            .to_owned(),
        ColumnDef::new(Workspaces::UpdatedAt)
            .timestamp_with_time_zone()
            .null()
            .to_owned(),
    ]
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one thing at a time.
        for mut column in columns() {
            manager
                .alter_table(
                    Table::alter()
                        .table(Workspaces::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .create_index(
                Index::create()
                    .name("idx_workspaces_secrets_key_id")
                    .table(Workspaces::Table)
                    .col(Workspaces::SecretsKeyId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("idx_workspaces_secrets_key_id")
                    .table(Workspaces::Table)
                    .to_owned(),
            )
            .await?;
        for column in columns().into_iter().rev() {
            manager
                .alter_table(
                    Table::alter()
                        .table(Workspaces::Table)
                        .drop_column(Alias::new(column.get_column_name()))
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    TrackApiKeySealed,
    AppApiKeySealed,
    WebhookSigningKeySealed,
    SecretsKeyId,
    TrackRequestsPerSec,
    AppRequestsPerSec,
    TrackBaseUrl,
    AppBaseUrl,
    DisabledAt,
    UpdatedAt,
}

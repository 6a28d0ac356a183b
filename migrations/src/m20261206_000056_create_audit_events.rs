//! `audit_events`: the append-only record of who (key id, name, role) called which RPC
//! (`action`, the full gRPC method path) on which ids, with what outcome (gRPC code name), when.
//! Written by the server's access layer for every call that changes something. Triggers refuse
//! UPDATE and DELETE on both backends, so the application cannot rewrite history by mistake.
//! No foreign key to `workspaces`: the record outlives what it describes.

use sea_orm_migration::sea_orm::{ConnectionTrait, DbBackend};
use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(AuditEvents::Table)
                    .col(big_pk_auto(AuditEvents::Id))
                    .col(timestamp_with_time_zone(AuditEvents::At))
                    .col(big_integer_null(AuditEvents::WorkspaceId))
                    .col(text(AuditEvents::KeyId))
                    .col(text(AuditEvents::KeyName))
                    .col(text(AuditEvents::Role))
                    .col(text(AuditEvents::Action))
                    .col(json_binary(AuditEvents::Ids))
                    .col(text(AuditEvents::Outcome))
                    .to_owned(),
            )
            .await?;
        for (name, column) in [
            ("ix_audit_events_key_id_id", AuditEvents::KeyId),
            ("ix_audit_events_action_id", AuditEvents::Action),
            ("ix_audit_events_at", AuditEvents::At),
        ] {
            manager
                .create_index(
                    Index::create()
                        .name(name)
                        .table(AuditEvents::Table)
                        .col(column)
                        .col(AuditEvents::Id)
                        .to_owned(),
                )
                .await?;
        }
        let db = manager.get_connection();
        match manager.get_database_backend() {
            DbBackend::Postgres => {
                db.execute_unprepared(
                    "CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql \
                     AS $$ BEGIN RAISE EXCEPTION 'audit_events is append-only'; END $$",
                )
                .await?;
                db.execute_unprepared(
                    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON \
                     audit_events FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()",
                )
                .await?;
            }
            _ => {
                for op in ["UPDATE", "DELETE"] {
                    db.execute_unprepared(&format!(
                        "CREATE TRIGGER audit_events_no_{} BEFORE {op} ON audit_events \
                         BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END",
                        op.to_lowercase()
                    ))
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AuditEvents::Table).to_owned())
            .await?;
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared("DROP FUNCTION audit_events_append_only()")
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum AuditEvents {
    Table,
    Id,
    At,
    WorkspaceId,
    KeyId,
    KeyName,
    Role,
    Action,
    Ids,
    Outcome,
}

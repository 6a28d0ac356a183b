//! SharpSend-managed (dynamic) segments and segment membership.
//!
//! - `managed_segments`: segments SharpSend keeps in Customer.io as MANUAL segments
//!   (`cio_segment_id`), with the criteria that define their membership (`criteria`, JSON;
//!   NULL for a segment whose members are set by hand), what the criteria read
//!   (`referenced_attributes`, `referenced_segments`: JSON arrays, to mark the segment due when
//!   they change), `revision` (bumped whenever the criteria change, so an evaluation computed
//!   for older criteria is not applied), the member count as SharpSend recorded it, whether an
//!   evaluation is due, and the outcome of the last one.
//! - `segment_members`: membership by Customer.io segment id. For a managed segment: the
//!   membership SharpSend decided (and queued for Customer.io through the outbox in the same
//!   transaction). For a Customer.io segment that managed criteria reference: a mirror of its
//!   membership read from `GET /v1/segments/{id}/membership`. The primary key serves the
//!   `EXISTS` probes of criteria evaluation.
//! - `segment_member_syncs`: when a mirrored membership was last read from Customer.io.

use sea_orm_migration::{prelude::*, schema::*, sea_orm::DbBackend};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Longest `customer_id` in bytes (as in `profiles`).
const MAX_CUSTOMER_ID_BYTES: u32 = 150;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ManagedSegments::Table)
                    .col(big_pk_auto(ManagedSegments::Id))
                    .col(big_integer(ManagedSegments::WorkspaceId))
                    .col(big_integer(ManagedSegments::CioSegmentId))
                    .col(text(ManagedSegments::Name))
                    .col(text_null(ManagedSegments::Description))
                    .col(json_binary_null(ManagedSegments::Criteria))
                    .col(json_binary(ManagedSegments::ReferencedAttributes))
                    .col(json_binary(ManagedSegments::ReferencedSegments))
                    .col(big_integer(ManagedSegments::Revision).default(0))
                    .col(big_integer(ManagedSegments::MemberCount).default(0))
                    .col(boolean(ManagedSegments::EvaluationDue).default(false))
                    .col(timestamp_with_time_zone_null(
                        ManagedSegments::LastEvaluatedAt,
                    ))
                    .col(big_integer_null(ManagedSegments::LastEvaluationMs))
                    .col(big_integer_null(ManagedSegments::LastAdded))
                    .col(big_integer_null(ManagedSegments::LastRemoved))
                    .col(text_null(ManagedSegments::LastEvaluationError))
                    .col(timestamp_with_time_zone(ManagedSegments::CreatedAt))
                    .col(timestamp_with_time_zone(ManagedSegments::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_managed_segments_workspace_id")
                            .from(ManagedSegments::Table, ManagedSegments::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_managed_segments_workspace_id_cio_segment_id")
                    .table(ManagedSegments::Table)
                    .col(ManagedSegments::WorkspaceId)
                    .col(ManagedSegments::CioSegmentId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        let bytes = match manager.get_database_backend() {
            DbBackend::Postgres => "octet_length(customer_id)",
            _ => "length(CAST(customer_id AS BLOB))",
        };
        let customer_id_check =
            Expr::cust(format!("{bytes} BETWEEN 1 AND {MAX_CUSTOMER_ID_BYTES}"));
        manager
            .create_table(
                Table::create()
                    .table(SegmentMembers::Table)
                    .col(big_integer(SegmentMembers::WorkspaceId))
                    .col(big_integer(SegmentMembers::SegmentId))
                    .col(text(SegmentMembers::CustomerId).check(customer_id_check))
                    .primary_key(
                        Index::create()
                            .name("pk_segment_members")
                            .col(SegmentMembers::WorkspaceId)
                            .col(SegmentMembers::SegmentId)
                            .col(SegmentMembers::CustomerId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_segment_members_workspace_id")
                            .from(SegmentMembers::Table, SegmentMembers::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SegmentMemberSyncs::Table)
                    .col(big_integer(SegmentMemberSyncs::WorkspaceId))
                    .col(big_integer(SegmentMemberSyncs::SegmentId))
                    .col(timestamp_with_time_zone(SegmentMemberSyncs::SyncedAt))
                    .col(big_integer(SegmentMemberSyncs::MemberCount))
                    .primary_key(
                        Index::create()
                            .name("pk_segment_member_syncs")
                            .col(SegmentMemberSyncs::WorkspaceId)
                            .col(SegmentMemberSyncs::SegmentId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_segment_member_syncs_workspace_id")
                            .from(SegmentMemberSyncs::Table, SegmentMemberSyncs::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SegmentMemberSyncs::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(SegmentMembers::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(ManagedSegments::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum ManagedSegments {
    Table,
    Id,
    WorkspaceId,
    CioSegmentId,
    Name,
    Description,
    Criteria,
    ReferencedAttributes,
    ReferencedSegments,
    Revision,
    MemberCount,
    EvaluationDue,
    LastEvaluatedAt,
    LastEvaluationMs,
    LastAdded,
    LastRemoved,
    LastEvaluationError,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SegmentMembers {
    Table,
    WorkspaceId,
    SegmentId,
    CustomerId,
}

#[derive(DeriveIden)]
enum SegmentMemberSyncs {
    Table,
    WorkspaceId,
    SegmentId,
    SyncedAt,
    MemberCount,
}

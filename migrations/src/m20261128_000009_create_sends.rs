//! Sends of approved assignments and their exactly-once state machine.
//!
//! - `sends`: one per (workspace, assignment, caller request id) — the unique index is what
//!   makes a second approval (even a concurrent one) find the first send instead of creating
//!   another. `request` holds the normalised request, to tell a repeat from a conflicting reuse
//!   of the key. `state` is the aggregate of its submissions, kept for listing.
//! - `send_submissions`: one per target segment (its content variation), each submitted to
//!   Customer.io exactly once: `state` pending → submitting → submitted → completed, or failed,
//!   or uncertain. `submitting` is written (with the claim and `attempt_started_at`) before the
//!   request leaves; `marker` is what Customer.io keeps of it (trigger `data`, newsletter name)
//!   so a lost answer can be found again.
//! - `send_history`: every state change, with who (service, reconciler, an operator) and why.
//! - `broadcast_windows`: when each broadcast may be triggered next (Customer.io allows one
//!   trigger per 10 s per broadcast); taking the window is a conditional update, so two
//!   dispatchers never trigger the same broadcast inside it.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

const STATES: [&str; 6] = [
    "pending",
    "submitting",
    "submitted",
    "completed",
    "failed",
    "uncertain",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Sends::Table)
                    .col(big_pk_auto(Sends::Id))
                    .col(big_integer(Sends::WorkspaceId))
                    .col(text(Sends::PublicId))
                    .col(text(Sends::AssignmentId))
                    .col(text(Sends::RequestId))
                    .col(text(Sends::Title))
                    .col(text(Sends::Subject))
                    .col(
                        text(Sends::Delivery)
                            .check(Expr::col(Sends::Delivery).is_in(["broadcast", "newsletter"])),
                    )
                    .col(big_integer_null(Sends::BroadcastId))
                    .col(big_integer_null(Sends::FromId))
                    .col(json_binary(Sends::Request))
                    .col(text(Sends::State).check(Expr::col(Sends::State).is_in(STATES)))
                    .col(text(Sends::CreatedBy))
                    .col(timestamp_with_time_zone(Sends::CreatedAt))
                    .col(timestamp_with_time_zone(Sends::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_sends_workspace_id")
                            .from(Sends::Table, Sends::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_sends_workspace_id_assignment_id_request_id")
                    .table(Sends::Table)
                    .col(Sends::WorkspaceId)
                    .col(Sends::AssignmentId)
                    .col(Sends::RequestId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_sends_public_id")
                    .table(Sends::Table)
                    .col(Sends::PublicId)
                    .unique()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SendSubmissions::Table)
                    .col(big_pk_auto(SendSubmissions::Id))
                    .col(big_integer(SendSubmissions::WorkspaceId))
                    .col(big_integer(SendSubmissions::SendId))
                    .col(integer(SendSubmissions::Position))
                    .col(big_integer(SendSubmissions::SegmentId))
                    .col(text(SendSubmissions::Subject))
                    .col(text(SendSubmissions::Body))
                    .col(json_binary_null(SendSubmissions::Data))
                    .col(json_binary(SendSubmissions::Recipients))
                    .col(text(SendSubmissions::Marker))
                    .col(
                        text(SendSubmissions::State)
                            .check(Expr::col(SendSubmissions::State).is_in(STATES)),
                    )
                    .col(integer(SendSubmissions::Attempts).default(0))
                    .col(timestamp_with_time_zone(SendSubmissions::NextAttemptAt))
                    .col(text_null(SendSubmissions::ClaimedBy))
                    .col(timestamp_with_time_zone_null(
                        SendSubmissions::ClaimExpiresAt,
                    ))
                    .col(timestamp_with_time_zone_null(
                        SendSubmissions::AttemptStartedAt,
                    ))
                    .col(big_integer_null(SendSubmissions::CioTriggerId))
                    .col(big_integer_null(SendSubmissions::CioNewsletterId))
                    .col(big_integer_null(SendSubmissions::RecipientsCount))
                    .col(timestamp_with_time_zone_null(SendSubmissions::SubmittedAt))
                    .col(timestamp_with_time_zone_null(SendSubmissions::CompletedAt))
                    .col(text_null(SendSubmissions::Error))
                    .col(timestamp_with_time_zone(SendSubmissions::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_send_submissions_send_id")
                            .from(SendSubmissions::Table, SendSubmissions::SendId)
                            .to(Sends::Table, Sends::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_send_submissions_send_id_segment_id")
                    .table(SendSubmissions::Table)
                    .col(SendSubmissions::SendId)
                    .col(SendSubmissions::SegmentId)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ux_send_submissions_marker")
                    .table(SendSubmissions::Table)
                    .col(SendSubmissions::Marker)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_send_submissions_due")
                    .table(SendSubmissions::Table)
                    .col(SendSubmissions::WorkspaceId)
                    .col(SendSubmissions::State)
                    .col(SendSubmissions::NextAttemptAt)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(SendHistory::Table)
                    .col(big_pk_auto(SendHistory::Id))
                    .col(big_integer(SendHistory::SendId))
                    .col(big_integer_null(SendHistory::SegmentId))
                    .col(text_null(SendHistory::FromState))
                    .col(text(SendHistory::ToState))
                    .col(text(SendHistory::Actor))
                    .col(text(SendHistory::Reason))
                    .col(timestamp_with_time_zone(SendHistory::At))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_send_history_send_id")
                            .from(SendHistory::Table, SendHistory::SendId)
                            .to(Sends::Table, Sends::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_send_history_send_id")
                    .table(SendHistory::Table)
                    .col(SendHistory::SendId)
                    .col(SendHistory::Id)
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(BroadcastWindows::Table)
                    .col(big_integer(BroadcastWindows::WorkspaceId))
                    .col(big_integer(BroadcastWindows::BroadcastId))
                    .col(timestamp_with_time_zone(BroadcastWindows::NextAllowedAt))
                    .primary_key(
                        Index::create()
                            .col(BroadcastWindows::WorkspaceId)
                            .col(BroadcastWindows::BroadcastId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_broadcast_windows_workspace_id")
                            .from(BroadcastWindows::Table, BroadcastWindows::WorkspaceId)
                            .to(Workspaces::Table, Workspaces::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(BroadcastWindows::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(SendHistory::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(SendSubmissions::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Sends::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Workspaces {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Sends {
    Table,
    Id,
    WorkspaceId,
    PublicId,
    AssignmentId,
    RequestId,
    Title,
    Subject,
    Delivery,
    BroadcastId,
    FromId,
    Request,
    State,
    CreatedBy,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SendSubmissions {
    Table,
    Id,
    WorkspaceId,
    SendId,
    Position,
    SegmentId,
    Subject,
    Body,
    Data,
    Recipients,
    Marker,
    State,
    Attempts,
    NextAttemptAt,
    ClaimedBy,
    ClaimExpiresAt,
    AttemptStartedAt,
    CioTriggerId,
    CioNewsletterId,
    RecipientsCount,
    SubmittedAt,
    CompletedAt,
    Error,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum SendHistory {
    Table,
    Id,
    SendId,
    SegmentId,
    FromState,
    ToState,
    Actor,
    Reason,
    At,
}

#[derive(DeriveIden)]
enum BroadcastWindows {
    Table,
    WorkspaceId,
    BroadcastId,
    NextAllowedAt,
}

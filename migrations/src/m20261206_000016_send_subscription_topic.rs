//! `sends.subscription_topic_id`: the subscription topic a newsletter send was asked to go to
//! (Customer.io requires one when the workspace's subscription center is on). NULL: the
//! service's `CIO_SUBSCRIPTION_TOPIC_ID` at send time, if any.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sends::Table)
                    .add_column(
                        ColumnDef::new(Sends::SubscriptionTopicId)
                            .big_integer()
                            .null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Sends::Table)
                    .drop_column(Sends::SubscriptionTopicId)
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Sends {
    Table,
    SubscriptionTopicId,
}

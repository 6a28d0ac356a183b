//! Integration tests of `sharpsend-db`: every test runs on SQLite and, when
//! `SHARPSEND_TEST_POSTGRES_URL` is set, on PostgreSQL (see `sharpsend_db::testing`).

mod abtests;
mod analytics;
mod campaigns;
mod criteria;
mod helpers;
mod jobs;
mod managed_segments;
mod migrations;
mod outbox;
mod profiles;
mod read_versions;
mod segments;
mod sends;
mod workspaces;

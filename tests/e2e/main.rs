//! End-to-end tests: simulator + gRPC server + scheduler jobs + a real database. Each test runs
//! on SQLite and, when `SHARPSEND_TEST_POSTGRES_URL` is set, on PostgreSQL (`db_test!`).

mod abtests;
mod analytics;
mod bad_input;
mod campaigns;
mod dynamic_segments;
mod engagement;
mod incremental_segments;
mod jobs;
mod journey;
mod ops;
mod profile_sync;
mod profiles;
mod read_cache;
mod security;
mod segments;
mod sends;
mod serving;
mod shadow_numbers;
mod tenancy;
mod tls;
mod workspaces;

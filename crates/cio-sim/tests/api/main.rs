//! Integration tests: one binary, a spawned simulator per test, reqwest against it.

mod helpers;

mod ab_rates;
mod activities;
mod app;
mod batch;
mod control;
mod customers;
mod engagement;
mod events;
mod exports;
mod faults;
mod log;
mod messages;
mod metrics;
mod newsletters;
mod paths;
mod sends_control;
mod track;
mod triggers;
mod webhooks;

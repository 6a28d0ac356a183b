//! Integration tests: one binary, a spawned simulator per test, reqwest against it.

mod helpers;

mod app;
mod control;
mod faults;
mod track;

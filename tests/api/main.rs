//! zonecast's integration tests: one binary, a real server per test (see `helpers`).

mod helpers;

mod access;
mod cluster;
mod concurrency;
mod connections;
mod crash;
mod docs;
mod fanout;
mod first_run;
mod fuzz;
mod hostile;
mod layers;
mod notifications;
mod operations;
mod rest;
mod restart;
mod sse;
mod tls;
mod ws;
mod ws_abuse;

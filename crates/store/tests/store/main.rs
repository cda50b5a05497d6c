//! Storage tests on real Postgres (`#[sqlx::test]`: a fresh database per test; set
//! `DATABASE_URL`). One test binary for the crate.

mod cleanup;
mod continuing;
mod deletes;
mod lifecycle;
mod liveness;
mod operations;
mod outbox;
mod queues;
mod schedules;
mod semaphore;
mod support;
mod tls;
mod waiting;

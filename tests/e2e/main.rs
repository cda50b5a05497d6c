//! End-to-end scenarios against real Postgres, real nats-server and nodes as real processes.
//! One test binary; every test makes its own `TestEnv` (database + subject prefix).

mod admin;
mod bad_input;
mod cli;
mod console;
mod deletes;
mod egress;
mod events;
mod execution;
mod fencing;
mod infra;
mod lifecycle;
mod nats_auth;
mod nats_cluster;
mod nats_login;
mod operator;
mod queues;
mod recovery;
mod schedules;
mod security;
mod semaphore;
mod support;
mod technical;
mod telemetry;
mod waiting;

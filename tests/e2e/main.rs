//! End-to-end scenarios against real Postgres, real nats-server and nodes as real processes.
//! One test binary; every test makes its own `TestEnv` (database + subject prefix).

mod bad_input;
mod events;
mod execution;
mod fencing;
mod infra;
mod lifecycle;
mod operator;
mod recovery;
mod semaphore;
mod support;
mod waiting;

//! Provisioning Relay: turns row changes captured in PostgreSQL (sql/) into handler calls.
//!
//! Architecture, one module per concept:
//! - [`schema`]: the installable SQL (capture triggers, outbox, handler registry), embedded.
//! - [`db`]: connection pool and the dedicated LISTEN connection.
//! - [`store`]: claiming, leases and completion of deliveries (the SQL lives next to it).
//! - [`handlers`]: the handler registry as the relay caches it.
//! - [`delivery`]: envelope, signing, HTTP and script transports.
//! - [`retry`]: the persisted retry schedule (a pure function).
//! - [`worker`]: the dispatcher loop that ties it together.
//! - [`pacing`]: fewer, bigger claims while the server is busy with other work.
//! - [`breaker`]: holds a handler's deliveries while its receiver looks down.
//! - [`config`]: configuration layering (file, environment, flags).

pub mod admin;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod db;
pub mod decisions;
pub mod delivery;
pub mod demo;
pub mod handlers;
pub mod metrics;
pub mod ops;
pub mod pacing;
pub mod retry;
pub mod schema;
pub mod service;
pub mod store;
pub mod wakeup;
pub mod worker;

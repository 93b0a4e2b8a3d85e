//! The integration-test binary: every test runs against a real PostgreSQL (DATABASE_URL), in a
//! database of its own, with real HTTP receivers on port 0 and real executables as script handlers.

mod common;

mod capture;
mod receiver;

mod admin_api;
mod bad_input;
mod before;
mod browser;
mod cli;
mod delivery;
mod demo;
mod examples;
mod faults;
mod guarantees;
mod pacing;
mod scripts;
mod security;

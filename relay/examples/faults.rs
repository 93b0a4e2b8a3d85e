//! Fault-injection suite, long form: the real release `relay` binary (two processes) under steady
//! load while relays are SIGKILLed, PostgreSQL restarts (fast and immediate), connections are cut
//! and the receiver fails in every way; then a report, exit code 1 on any violated guarantee.
//!
//! ```text
//! cargo build --release && cargo run --release --example faults -- --long
//! cargo run --release --example faults -- --minutes 4 --kills 6     # medium form
//! cargo run --release --example faults                              # short form (as in CI)
//! ```
//!
//! The suite itself (shared with `cargo test --test integration faults`) is
//! `tests/faults/suite.rs`; its header explains what runs and what is checked.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;

#[path = "../../tests/faults/suite.rs"]
mod suite;

#[derive(Parser, Debug)]
#[command(
    name = "faults",
    about = "Fault-injection suite: SIGKILLed relays, PostgreSQL restarts, cut connections and a failing receiver under load; then nothing lost, order kept",
    long_about = "Fault-injection suite for Provisioning Relay.\n\n\
Build first:  cargo build --release\n\
Long form:    cargo run --release --example faults -- --long      (10 min load, 12 kills, 3+3 PostgreSQL restarts)\n\
Medium form:  cargo run --release --example faults -- --minutes 4 --kills 6\n\
Short form:   cargo run --release --example faults                (as the CI test)\n\n\
Starts a throwaway PostgreSQL cluster from the local binaries (as user postgres when root), so\n\
no DATABASE_URL is needed and no other database is touched. Exit code 0 = every guarantee held."
)]
struct Args {
    /// The long form: 10 minutes of load, 12 kills, 3 fast + 3 immediate restarts, 10 + 10 cuts.
    #[arg(long)]
    long: bool,
    /// Minutes of load (medium form; fault counts scale with it).
    #[arg(long, conflicts_with = "long")]
    minutes: Option<f64>,
    /// Relay SIGKILLs (overrides the form's count).
    #[arg(long)]
    kills: Option<usize>,
    /// PostgreSQL restarts of each kind, fast and immediate (overrides the form's count).
    #[arg(long)]
    restarts: Option<usize>,
    /// Transactions per second over all writers.
    #[arg(long)]
    rate: Option<f64>,
    /// RNG seed (default: FAULTS_SEED or the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// The relay binary (default: target/<profile>/relay next to this example).
    #[arg(long)]
    relay_bin: Option<PathBuf>,
    /// Keep the relays' logs even when everything passed.
    #[arg(long)]
    keep_logs: bool,
}

/// target/<profile>/examples/faults -> target/<profile>/relay
fn relay_binary(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .and_then(Path::parent)
            .context("cannot locate the target directory")?
            .join("relay"),
    };
    if !path.is_file() {
        bail!(
            "relay binary not found at {}; build it first (cargo build --release) or pass --relay-bin",
            path.display()
        );
    }
    Ok(path)
}

async fn real_main(args: Args) -> anyhow::Result<bool> {
    let bin = relay_binary(args.relay_bin)?;
    let mut opts = if args.long {
        suite::Options::long(bin)
    } else if let Some(m) = args.minutes {
        suite::Options::medium(bin, Duration::from_secs_f64(m * 60.0))
    } else {
        suite::Options::short(bin)
    };
    if let Some(k) = args.kills {
        opts.kills = k;
    }
    if let Some(r) = args.restarts {
        opts.fast_restarts = r;
        opts.immediate_restarts = r;
    }
    if let Some(r) = args.rate {
        opts.rate = r;
    }
    if let Some(s) = args.seed {
        opts.seed = s;
    }
    opts.keep_logs = args.keep_logs;
    let report = suite::run(opts).await?;
    println!("{report}");
    Ok(report.passed())
}

#[tokio::main]
async fn main() -> ExitCode {
    match real_main(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

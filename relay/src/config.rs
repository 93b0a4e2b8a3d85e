//! Configuration, layered: built-in defaults < TOML file < `RELAY_*` environment variables
//! (and `DATABASE_URL`) < command-line flags. Unknown keys and bad values are refused at start
//! with the key named. Every key is documented in `relay.example.toml`.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::worker::WorkerOptions;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub database_url: String,
    pub relay_name: String,
    pub log_format: String,
    pub log_level: String,
    pub pool_size: u32,
    pub poll_interval_ms: u64,
    pub busy_poll_interval_ms: u64,
    pub max_busy_poll_interval_ms: u64,
    pub busy_database_tps: u32,
    pub idle_after_ms: u64,
    pub claim_batch: u32,
    pub max_in_flight: u32,
    pub lease_margin_ms: u64,
    pub max_retry_after_ms: u64,
    pub circuit_failures: u32,
    pub circuit_pause_ms: u64,
    pub circuit_max_pause_ms: u64,
    pub shutdown_grace_ms: u64,
    pub http_connect_timeout_ms: u64,
    pub response_limit_bytes: u32,
    pub deny_private_targets: bool,
    pub admin_listen: String,
    pub admin_token: String,
    pub admin_open_reads: bool,
    pub retention_hours: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            relay_name: String::new(),
            log_format: "text".into(),
            log_level: "info".into(),
            pool_size: 8,
            poll_interval_ms: 1000,
            busy_poll_interval_ms: 2,
            max_busy_poll_interval_ms: 100,
            busy_database_tps: 1000,
            idle_after_ms: 250,
            claim_batch: 500,
            max_in_flight: 2048,
            lease_margin_ms: 30_000,
            max_retry_after_ms: 3_600_000,
            circuit_failures: 10,
            circuit_pause_ms: 5_000,
            circuit_max_pause_ms: 300_000,
            shutdown_grace_ms: 10_000,
            http_connect_timeout_ms: 10_000,
            response_limit_bytes: 65_536,
            deny_private_targets: false,
            admin_listen: "127.0.0.1:9187".into(),
            admin_token: String::new(),
            admin_open_reads: true,
            retention_hours: 168,
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("unknown configuration key `{key}` (from {origin}); known keys: {known}")]
    UnknownKey {
        key: String,
        origin: String,
        known: String,
    },
    #[error("bad value for `{key}` (from {origin}): {problem}")]
    BadValue {
        key: String,
        origin: String,
        problem: String,
    },
}

impl Config {
    /// Build the configuration from its layers. `file`: optional TOML path; `env`: the process
    /// environment (passed in so tests can supply their own); `overrides`: `key=value` flags.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        overrides: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let defaults = toml::Table::try_from(Config::default()).expect("defaults serialise");
        let known = || defaults.keys().cloned().collect::<Vec<_>>().join(", ");
        let mut merged = defaults.clone();

        if let Some(path) = file {
            let p = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: p.clone(),
                source,
            })?;
            let table: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Syntax {
                        path: p.clone(),
                        message: e.to_string(),
                    })?;
            for (k, v) in table {
                let Some(default) = defaults.get(&k) else {
                    return Err(ConfigError::UnknownKey {
                        key: k,
                        origin: p,
                        known: known(),
                    });
                };
                if std::mem::discriminant(default) != std::mem::discriminant(&v) {
                    return Err(ConfigError::BadValue {
                        key: k,
                        origin: p,
                        problem: format!("expected {}, got {}", default.type_str(), v.type_str()),
                    });
                }
                merged.insert(k, v);
            }
        }

        // Environment: DATABASE_URL, then RELAY_<KEY> (which wins). Unknown RELAY_ variables are
        // refused too: a typo must not silently fall back to a default.
        if let Some((_, v)) = env.iter().find(|(k, _)| k == "DATABASE_URL") {
            merged.insert("database_url".into(), toml::Value::String(v.clone()));
        }
        for (name, value) in env {
            let Some(suffix) = name.strip_prefix("RELAY_") else {
                continue;
            };
            if name == "RELAY_CONFIG" || name == "RELAY_LOG" {
                continue; // read by the binary itself
            }
            let key = suffix.to_ascii_lowercase();
            let Some(default) = defaults.get(&key) else {
                return Err(ConfigError::UnknownKey {
                    key,
                    origin: format!("environment variable {name}"),
                    known: known(),
                });
            };
            merged.insert(
                key.clone(),
                parse_like(
                    default,
                    value,
                    &key,
                    &format!("environment variable {name}"),
                )?,
            );
        }
        for (key, value) in overrides {
            let Some(default) = defaults.get(key) else {
                return Err(ConfigError::UnknownKey {
                    key: key.clone(),
                    origin: "command line".into(),
                    known: known(),
                });
            };
            merged.insert(
                key.clone(),
                parse_like(default, value, key, "command line")?,
            );
        }

        let config: Config = merged.clone().try_into().map_err(|e: toml::de::Error| {
            // Name the culprit: the first key whose value alone does not fit.
            let key = merged
                .iter()
                .find(|(k, v)| {
                    let mut t = defaults.clone();
                    t.insert((*k).clone(), (*v).clone());
                    t.try_into::<Config>().is_err()
                })
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| "?".into());
            ConfigError::BadValue {
                key,
                origin: "configuration".into(),
                problem: e.message().trim().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, problem: &str| ConfigError::BadValue {
            key: key.into(),
            origin: "configuration".into(),
            problem: problem.into(),
        };
        if self.database_url.trim().is_empty() {
            return Err(bad("database_url", "must not be empty"));
        }
        if let Err(e) = crate::db::parse_config(&self.database_url) {
            return Err(bad("database_url", &e.to_string()));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(bad("log_format", "must be \"text\" or \"json\""));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return Err(bad(
                "log_level",
                "must be a level (error, warn, info, debug, trace) or a tracing filter",
            ));
        }
        for (key, v, min, max) in [
            ("pool_size", self.pool_size as u64, 2, 1000),
            ("poll_interval_ms", self.poll_interval_ms, 10, 3_600_000),
            (
                "busy_poll_interval_ms",
                self.busy_poll_interval_ms,
                1,
                10_000,
            ),
            (
                "max_busy_poll_interval_ms",
                self.max_busy_poll_interval_ms,
                1,
                10_000,
            ),
            (
                "busy_database_tps",
                self.busy_database_tps as u64,
                0,
                10_000_000,
            ),
            ("idle_after_ms", self.idle_after_ms, 0, 3_600_000),
            ("claim_batch", self.claim_batch as u64, 1, 10_000),
            ("max_in_flight", self.max_in_flight as u64, 1, 100_000),
            ("lease_margin_ms", self.lease_margin_ms, 100, 86_400_000),
            (
                "max_retry_after_ms",
                self.max_retry_after_ms,
                0,
                7 * 86_400_000,
            ),
            (
                "circuit_failures",
                self.circuit_failures as u64,
                0,
                1_000_000,
            ),
            ("circuit_pause_ms", self.circuit_pause_ms, 10, 86_400_000),
            (
                "circuit_max_pause_ms",
                self.circuit_max_pause_ms,
                10,
                86_400_000,
            ),
            ("shutdown_grace_ms", self.shutdown_grace_ms, 0, 3_600_000),
            (
                "http_connect_timeout_ms",
                self.http_connect_timeout_ms,
                1,
                600_000,
            ),
            (
                "response_limit_bytes",
                self.response_limit_bytes as u64,
                1024,
                16 * 1024 * 1024,
            ),
            ("retention_hours", self.retention_hours as u64, 1, 24 * 3650),
        ] {
            if v < min || v > max {
                return Err(bad(key, &format!("{v} is out of range {min}..={max}")));
            }
        }
        if self.max_busy_poll_interval_ms < self.busy_poll_interval_ms {
            return Err(bad(
                "max_busy_poll_interval_ms",
                &format!(
                    "{} is below busy_poll_interval_ms ({}): pacing only ever lengthens the pause",
                    self.max_busy_poll_interval_ms, self.busy_poll_interval_ms
                ),
            ));
        }
        if self.circuit_max_pause_ms < self.circuit_pause_ms {
            return Err(bad(
                "circuit_max_pause_ms",
                &format!(
                    "{} is below circuit_pause_ms ({}): a failed probe only ever lengthens the pause",
                    self.circuit_max_pause_ms, self.circuit_pause_ms
                ),
            ));
        }
        if !self.admin_listen.is_empty()
            && self.admin_listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(bad(
                "admin_listen",
                "must be host:port like 127.0.0.1:9187 (or empty to disable)",
            ));
        }
        Ok(())
    }

    /// This relay's name in leases, logs and `provisioning.relays`.
    pub fn relay_name(&self) -> String {
        if !self.relay_name.is_empty() {
            return self.relay_name.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "relay".into());
        format!("{host}-{}", std::process::id())
    }

    pub fn worker_options(&self) -> WorkerOptions {
        WorkerOptions {
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            busy_poll_interval: Duration::from_millis(self.busy_poll_interval_ms),
            max_busy_poll_interval: Duration::from_millis(self.max_busy_poll_interval_ms),
            busy_database_tps: self.busy_database_tps,
            idle_after: Duration::from_millis(self.idle_after_ms),
            claim_batch: self.claim_batch as usize,
            max_in_flight: self.max_in_flight as usize,
            lease_margin: Duration::from_millis(self.lease_margin_ms),
            max_retry_after: Duration::from_millis(self.max_retry_after_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            breaker: crate::breaker::BreakerOptions {
                failures: self.circuit_failures,
                pause: Duration::from_millis(self.circuit_pause_ms),
                max_pause: Duration::from_millis(self.circuit_max_pause_ms),
            },
            ..WorkerOptions::default()
        }
    }
}

fn parse_like(
    default: &toml::Value,
    raw: &str,
    key: &str,
    origin: &str,
) -> Result<toml::Value, ConfigError> {
    let bad = |problem: String| ConfigError::BadValue {
        key: key.into(),
        origin: origin.into(),
        problem,
    };
    Ok(match default {
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.trim()
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| bad(format!("expected a non-negative integer, got {raw:?}")))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(bad(format!("expected true or false, got {raw:?}"))),
        }),
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_apply_in_order_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("relay-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("relay.toml");
        std::fs::write(
            &f,
            "poll_interval_ms = 200\nclaim_batch = 10\npool_size = 3\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            &env(&[
                ("RELAY_CLAIM_BATCH", "20"),
                ("RELAY_POOL_SIZE", "4"),
                ("DATABASE_URL", "postgres://a@b/c"),
            ]),
            &[("pool_size".into(), "5".into())],
        )
        .unwrap();
        assert_eq!(c.poll_interval_ms, 200);
        assert_eq!(c.claim_batch, 20);
        assert_eq!(c.pool_size, 5);
        assert_eq!(c.database_url, "postgres://a@b/c");
        let c = Config::load(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://a@b/c"),
                ("RELAY_DATABASE_URL", "postgres://x@y/z"),
            ]),
            &[],
        )
        .unwrap();
        assert_eq!(c.database_url, "postgres://x@y/z");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let dir = std::env::temp_dir().join(format!("relay-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("relay.toml");
        std::fs::write(&f, "pol_interval_ms = 200\n").unwrap();
        let e = Config::load(Some(&f), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("`pol_interval_ms`"), "{e}");
        std::fs::write(&f, "poll_interval_ms = \"fast\"\n").unwrap();
        let e = Config::load(Some(&f), &[], &[]).unwrap_err().to_string();
        assert!(
            e.contains("`poll_interval_ms`") && e.contains("expected integer"),
            "{e}"
        );
        std::fs::write(&f, "poll_interval_ms = [\n").unwrap();
        let e = Config::load(Some(&f), &[], &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = Config::load(None, &env(&[("RELAY_CLAIM_BATCH", "lots")]), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`claim_batch`") && e.contains("RELAY_CLAIM_BATCH"),
            "{e}"
        );
        let e = Config::load(None, &env(&[("RELAY_NOPE", "1")]), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`nope`"), "{e}");
        let e = Config::load(None, &[], &[("claim_batch".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`claim_batch`") && e.contains("out of range"),
            "{e}"
        );
        let e = Config::load(None, &[], &[("log_format".into(), "xml".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`log_format`"), "{e}");
        let e = Config::load(None, &[], &[("admin_listen".into(), "nowhere".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`admin_listen`"), "{e}");
        let e = Config::load(
            None,
            &[],
            &[
                ("busy_poll_interval_ms".into(), "30".into()),
                ("max_busy_poll_interval_ms".into(), "20".into()),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`max_busy_poll_interval_ms`") && e.contains("below busy_poll_interval_ms"),
            "{e}"
        );
        let e = Config::load(None, &[], &[("circuit_max_pause_ms".into(), "1000".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`circuit_max_pause_ms`") && e.contains("below circuit_pause_ms (5000)"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The checked-in example documents every key with its default: it must parse to the defaults
    /// and name every key.
    #[test]
    fn example_config_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut missing: Vec<&String> = defaults
            .keys()
            .filter(|k| !table.contains_key(*k))
            .collect();
        missing.sort();
        assert!(
            missing.is_empty(),
            "keys missing from relay.example.toml: {missing:?}"
        );
        assert_eq!(
            Config::load(Some(&path), &[], &[]).unwrap(),
            Config::default()
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Mutated configuration files: never a panic; every refusal names what is wrong.
    #[test]
    fn mutated_config_files_are_refused_clearly() {
        let example = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../relay.example.toml"),
        )
        .unwrap();
        let lines: Vec<&str> = example.lines().filter(|l| l.contains(" = ")).collect();
        let values = [
            "0",
            "-1",
            "\"\"",
            "\"x\"",
            "true",
            "1.5",
            "[1]",
            "99999999999",
            "{a=1}",
            "\"127.0.0.1:0\"",
            "\"json\"",
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let dir = std::env::temp_dir().join(format!("relay-config-prop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        for _ in 0..2_000 {
            let mut text = String::new();
            for _ in 0..rng.gen_range(1..5) {
                let line = lines[rng.gen_range(0..lines.len())];
                let key = line.split(" = ").next().unwrap();
                let key = if rng.gen_bool(0.1) {
                    format!("{key}x")
                } else {
                    key.to_string()
                };
                let value = if rng.gen_bool(0.5) {
                    line.split(" = ").nth(1).unwrap()
                } else {
                    values[rng.gen_range(0..values.len())]
                };
                text.push_str(&format!("{key} = {value}\n"));
            }
            if rng.gen_bool(0.05) {
                text.push_str("[[[");
            }
            std::fs::write(&path, &text).unwrap();
            match Config::load(Some(&path), &[], &[]) {
                Ok(c) => assert!(c.validate().is_ok()),
                Err(e) => {
                    let m = e.to_string();
                    assert!(
                        (m.contains('`') && !m.contains("`?`")) || m.contains("not valid TOML"),
                        "unclear error for {text:?}: {m}"
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

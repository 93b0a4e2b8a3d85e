//! Script delivery: the executable runs directly (no shell) in a process group of its own, reads
//! the envelope on stdin, and succeeds with exit status 0. Its stdout is the response; stderr is
//! logged. On timeout, or when the script exits, its whole process group is killed and reaped, so
//! neither a hung script nor a child it left behind outlives the attempt.
//!
//! Environment: cleared, then only `PATH=/usr/local/bin:/usr/bin:/bin`, `LANG=C.UTF-8`,
//! `PROVISIONING_EVENT`, `PROVISIONING_DELIVERY_ID`, `PROVISIONING_ATTEMPT`,
//! `PROVISIONING_HANDLER` — the relay's own environment (database password included) never leaks.

use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use super::{truncate_text, Reply, Request};

pub const SCRIPT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

#[derive(Clone)]
pub struct ScriptTransport {
    output_limit: usize,
}

impl ScriptTransport {
    pub fn new(output_limit: usize) -> ScriptTransport {
        ScriptTransport { output_limit }
    }

    pub async fn run(&self, program: &str, args: &[String], req: &Request) -> Reply {
        let start = Instant::now();
        let mut reply = self.run_inner(program, args, req).await;
        reply.duration = start.elapsed();
        reply
    }

    async fn run_inner(&self, program: &str, args: &[String], req: &Request) -> Reply {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", SCRIPT_PATH)
            .env("LANG", "C.UTF-8")
            .env("PROVISIONING_EVENT", &req.event_name)
            .env("PROVISIONING_DELIVERY_ID", &req.webhook_id)
            .env("PROVISIONING_ATTEMPT", req.attempt.to_string())
            .env("PROVISIONING_HANDLER", &req.handler_name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return Reply {
                    error: Some(format!("cannot start script {program}: {e}")),
                    ..Reply::default()
                }
            }
        };
        let pgid = child.id().map(|p| p as i32);
        let _group = GroupGuard(pgid);

        let stdin = child.stdin.take();
        let body = req.body.clone();
        let writer = tokio::spawn(async move {
            if let Some(mut stdin) = stdin {
                // A script that does not read its stdin is fine: ignore EPIPE.
                let _ = stdin.write_all(body.as_bytes()).await;
                let _ = stdin.shutdown().await;
            }
        });
        let limit = self.output_limit;
        let stdout = tokio::spawn(read_bounded(child.stdout.take(), limit));
        let stderr = tokio::spawn(read_bounded(child.stderr.take(), limit));

        let status = tokio::time::timeout(req.timeout, child.wait()).await;
        // Whatever happened, nothing of the group may outlive the attempt.
        kill_group(pgid);
        let timed_out = status.is_err();
        let status = match status {
            Ok(Ok(s)) => Some(s),
            Ok(Err(_)) => None,
            Err(_) => child.wait().await.ok(), // reap after the kill
        };
        writer.abort();
        let grace = Duration::from_secs(2);
        let (out, out_total) = tokio::time::timeout(grace, stdout)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let (err, err_total) = tokio::time::timeout(grace, stderr)
            .await
            .ok()
            .and_then(|r| r.ok())
            .unwrap_or_default();
        let stdout_text = truncate_text(&out, limit, out_total);
        let stderr_text = truncate_text(&err, limit, err_total);

        let exit_code = status.and_then(|s| {
            use std::os::unix::process::ExitStatusExt;
            s.code().or_else(|| s.signal().map(|sig| 128 + sig))
        });
        let success = !timed_out && status.map(|s| s.success()).unwrap_or(false);
        let error = if timed_out {
            Some(format!(
                "timed out after {} ms; process group killed{}",
                req.timeout.as_millis(),
                stderr_suffix(&stderr_text)
            ))
        } else if success {
            (!stderr_text.is_empty()).then(|| format!("stderr: {stderr_text}"))
        } else {
            Some(format!(
                "exited with status {}{}",
                exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "unknown".into()),
                stderr_suffix(&stderr_text)
            ))
        };
        Reply {
            success,
            http_status: None,
            exit_code,
            response: Some(stdout_text),
            error,
            retry_after: None,
            gone: false,
            duration: Duration::ZERO,
        }
    }
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!("; stderr: {stderr}")
    }
}

/// Read everything (so the writer never blocks on a full pipe), keep the first `limit` bytes.
async fn read_bounded<R: AsyncRead + Unpin>(pipe: Option<R>, limit: usize) -> (Vec<u8>, usize) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), 0);
    };
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                total += n;
                if kept.len() < limit {
                    let room = limit - kept.len();
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
    (kept, total)
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid {
        if pgid > 0 {
            // SAFETY: kill(2) with a negative pid signals the process group we created; ESRCH
            // (already gone) is fine.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Kills the group if the attempt is cancelled (e.g. the relay shuts down mid-run).
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

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
        let (lifeline_read, lifeline_write) = lifeline();
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (setpgid, fork, close, read, kill, _exit).
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                arm_watcher(lifeline_read, lifeline_write);
                Ok(())
            });
        }
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

/// The relay's lifeline: a pipe whose write end only the relay holds (close-on-exec, never
/// written). When the relay dies — even by SIGKILL — the kernel closes it and every reader sees EOF.
fn lifeline() -> (i32, i32) {
    static LIFELINE: std::sync::OnceLock<(i32, i32)> = std::sync::OnceLock::new();
    *LIFELINE.get_or_init(|| {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        if rc != 0 {
            return (-1, -1);
        }
        (fds[0], fds[1])
    })
}

/// In the script's process (after fork, before exec): fork a watcher into the script's process
/// group. The watcher blocks reading the lifeline; EOF means the relay died, and the watcher kills
/// the whole group (the script, its children, itself). When the attempt ends normally the relay
/// kills the group, watcher included. So no script outlives its relay.
///
/// SAFETY: must only be called between fork and exec; uses async-signal-safe calls only.
unsafe fn arm_watcher(read_fd: i32, write_fd: i32) {
    if read_fd < 0 {
        return;
    }
    let pid = libc::fork();
    if pid != 0 {
        return; // the script (or fork failed: run without a watcher)
    }
    // The watcher is a copy of the relay's forked child: it holds copies of every descriptor the
    // relay had (the script's pipes, sockets, the lifeline's write end). Keep only the lifeline's
    // read end, as stdin, so nobody waits on a pipe the watcher keeps open.
    let _ = write_fd;
    libc::dup2(read_fd, 0);
    if libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32) != 0 {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as i32
        } else {
            4096
        };
        for fd in 1..max {
            libc::close(fd);
        }
    }
    let mut byte = [0u8; 1];
    loop {
        let n = libc::read(0, byte.as_mut_ptr().cast(), 1);
        if n == 0 {
            libc::kill(0, libc::SIGKILL); // the relay is gone: take the group down
            libc::_exit(0);
        }
        if n < 0 && *libc::__errno_location() == libc::EINTR {
            continue;
        }
        libc::_exit(0);
    }
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

//! Running helper programs (python clients, litellm, the browser driver) from tests: bounded in
//! time, killed by their own PID when they overrun, with the environment stripped of anything
//! that could send traffic off the machine.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a finished program printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to completion; kills it by its PID if it outlives `within`.
pub fn try_run_bounded(mut cmd: Command, within: Duration) -> Result<Output, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "{cmd:?} still running after {within:?}, killed; stdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    })
}

/// [`try_run_bounded`], panicking on failure to run or on overrun.
pub fn run_bounded(cmd: Command, within: Duration) -> Output {
    try_run_bounded(cmd, within).unwrap_or_else(|e| panic!("{e}"))
}

/// Client traffic stays on loopback: no proxy from the environment, no default hosts or keys.
pub fn loopback_only_env(cmd: &mut Command) {
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "OPENAI_BASE_URL",
        "OPENAI_API_BASE",
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "OLLAMA_HOST",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", "*").env("no_proxy", "*");
}

/// A long-running helper server (llama-server, litellm) on a loopback address, its output in a
/// log file, ended by its own PID when dropped.
pub struct Daemon {
    name: &'static str,
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (which must listen on `addr`) with stdout and stderr into `log`.
    pub fn spawn(
        name: &'static str,
        mut cmd: Command,
        addr: std::net::SocketAddr,
        log: std::path::PathBuf,
    ) -> Daemon {
        let child = super::child::spawn_into_log(&mut cmd, &log, false)
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon {
            name,
            addr,
            child,
            log,
        }
    }

    /// Bounded poll until `GET path` answers 200; panics with the log if the process exits
    /// first (`hint` says what an early exit usually means) or the time runs out.
    pub fn wait_http_ok(&mut self, path: &str, within: Duration, hint: &str) {
        let deadline = Instant::now() + within;
        let probe = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{} exited before it was ready ({status}{hint}); log:\n{}",
                    self.name,
                    self.log_text()
                );
            }
            if super::http::try_send_raw(self.addr, probe.as_bytes(), Duration::from_secs(2))
                .is_ok_and(|r| r.status == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {within:?}; log:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends signal `name` (`INT`, `TERM`, ...) to the process `pid` with kill(1); false when it
/// could not be delivered (the process is gone).
pub fn signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

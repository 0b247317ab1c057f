//! Child processes of the tests and benches: started with their output in a log file, and
//! their CPU time read from `/proc/<pid>/stat`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// CPU time (user + system) process `pid` has used so far; zero once it is gone.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`, which may itself hold spaces: utime and stime are the 14th and
    // 15th fields of the line, the 12th and 13th after the comm.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second())
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat` CPU times (100 on Linux), asked of
/// `getconf` once.
pub fn clock_ticks_per_second() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Starts `cmd` with stdin closed and stdout and stderr into `log` (created, or appended to
/// when `append`): every long-running child of the tests and benches starts this way.
pub fn spawn_into_log(cmd: &mut Command, log: &Path, append: bool) -> std::io::Result<Child> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
}

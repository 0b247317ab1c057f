//! Python virtualenvs made by the idempotent `tests/python/setup*.sh` scripts (official
//! clients, llama-server, LiteLLM), kept beside the binary under test in `<target>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{loopback_only_env, run_bounded};

/// A venv made by one of the setup scripts.
pub struct Venv {
    pub dir: PathBuf,
}

impl Venv {
    /// Runs `tests/python/<script>` with `<env_var>=<target>/<dir_name>`; an error (not a skip)
    /// when it fails, with what it needs.
    pub fn setup(script: &str, dir_name: &str, env_var: &str) -> Result<Venv, String> {
        // Beside the binary under test: <target>/<profile>/arknet -> <target>/<dir_name>.
        let target = Path::new(super::grid::ARKNET)
            .parent()
            .and_then(Path::parent)
            .expect("target dir of the arknet binary");
        let dir = target.join(dir_name);
        let script_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let mut cmd = Command::new("bash");
        cmd.arg(&script_path).env(env_var, &dir);
        let started = Instant::now();
        let out = run_bounded(cmd, Duration::from_secs(900));
        if out.status.success() {
            eprintln!(
                "{script}: ready in {:.1} s ({})",
                started.elapsed().as_secs_f64(),
                dir.display()
            );
            Ok(Venv { dir })
        } else {
            Err(format!(
                "tests/python/{script} failed ({}): it needs PyPI on first run and the Debian \
                 package python3-venv.\nstdout:\n{}\nstderr:\n{}",
                out.status, out.stdout, out.stderr
            ))
        }
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }

    /// The venv's python, with an environment that keeps client traffic on loopback.
    pub fn python(&self) -> Command {
        let mut cmd = Command::new(self.bin("python"));
        loopback_only_env(&mut cmd);
        cmd
    }
}

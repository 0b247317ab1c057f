//! Build script: records the git commit the binary was built from, for `arknet --version`.
//!
//! Outside a git checkout (a source tarball, a vendored copy) or without `git`, the commit is
//! taken from `ARKNET_COMMIT` when the packager sets it, else reported as `unknown`: the build
//! never fails for want of version metadata.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=ARKNET_COMMIT");
    let commit = std::env::var("ARKNET_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ARKNET_COMMIT={commit}");
    // Rebuild when HEAD moves: HEAD itself (checkout of another branch), the branch it points
    // at, and packed-refs (where `git gc` moves it). Worktrees keep HEAD in their own git dir
    // and branches in the common one, so ask git for each path rather than assuming `.git/`.
    let mut watched = vec![
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--git-path", "packed-refs"]),
    ];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
    }
    for path in watched.into_iter().flatten().map(PathBuf::from) {
        // A missing path would make Cargo rerun this script on every build.
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

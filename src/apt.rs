//! Debian packages for the tests' and the benchmark's own tools (redis-server, promtool, chromium,
//! valgrind, nginx, wrk): found on the PATH, or installed with apt-get, the package lists updated once
//! when the first try fails (a fresh machine has none). Not used by the gateway itself.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// `name` on the PATH.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.exists())
    })
}

/// Installs `package`; whether it worked.
pub fn install(package: &str) -> bool {
    let apt = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if apt() {
        return true;
    }
    let _ = Command::new("apt-get")
        .arg("update")
        .stdout(Stdio::null())
        .status();
    apt()
}

/// The binary `name`, installing `package` first when it is not on the PATH.
pub fn ensure(name: &str, package: &str) -> Result<PathBuf, String> {
    if let Some(p) = on_path(name) {
        return Ok(p);
    }
    install(package);
    on_path(name).ok_or_else(|| format!("{name} is missing and apt-get install {package} failed"))
}

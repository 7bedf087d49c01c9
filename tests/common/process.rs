//! Child processes for the tests and the end-to-end harness (`benches/e2e.rs` includes
//! this file): a guard that kills its child however the run ends, free loopback ports, and
//! a Tansu broker process. Synchronous and self-contained, so both can share it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// A child process killed when the guard drops, however the test or run ends.
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a loopback port is free")
}

/// The Tansu binary: `TANSU_BINARY`, else `tansu` on the `PATH`, else `~/.cargo/bin`.
pub fn tansu_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BINARY") {
        return PathBuf::from(path);
    }
    let paths = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&paths)
        .map(|p| p.join("tansu"))
        .chain(std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo/bin/tansu")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this needs the Tansu broker: run ./scripts/test.sh, or \
                 `cargo install tansu --version 0.6.0 --features dynostore --locked`"
            )
        })
}

/// Starts Tansu (in-memory storage) on a free loopback port, its output to `log`; returns
/// its guard and its `host:port`. The caller waits until it answers.
pub fn spawn_tansu(log: &Path) -> (Guard, String) {
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::File::create(log).expect("the broker's log can be created");
    let child = Command::new(tansu_binary())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        // Its own level, whatever the test's environment says: at `info` it writes
        // gigabytes in a crash test.
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().expect("the log file handle can be cloned"))
        .stderr(log)
        .spawn()
        .expect("tansu starts");
    (Guard(child), format!("127.0.0.1:{port}"))
}

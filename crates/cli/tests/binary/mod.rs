//! Running the `safetune` binary from integration tests.

use std::process::{Command, Output};

/// Runs `safetune ARGS` and returns what it wrote and its status.
pub fn safetune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_safetune"))
        .args(args)
        .output()
        .expect("run safetune")
}

/// The standard output of a run that must have succeeded (both streams shown when it did not).
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

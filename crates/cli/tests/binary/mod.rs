//! Running the `safetune` binary from integration tests (each test binary uses some of it).
#![allow(dead_code)]

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

/// A running `safetune serve ARGS --port 0`, killed when dropped (also when a test panics).
pub struct Served {
    child: std::process::Child,
    /// Where it listens: `http://127.0.0.1:PORT`.
    pub url: String,
}

/// Starts `safetune serve ARGS --port 0` and waits for its "serving ... on URL" line; its
/// standard error is drained in the background so it never blocks.
pub fn serve(args: &[&str]) -> Served {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_safetune"))
        .arg("serve")
        .args(args)
        .args(["--port", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start safetune serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut served = Served {
        child,
        url: String::new(),
    };
    served.url = loop {
        let line = lines.next().expect("serve exited early").unwrap();
        if let Some(rest) = line.strip_prefix("serving ") {
            let url = rest.split(" on ").nth(1).unwrap();
            break url.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    served
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! `scripts/fetch-assets` asks pip for wheels only: a source distribution's build code would run
//! before the wheel's sha256 is checked. The script's own command builder is loaded and asked for
//! the command it runs.

use std::path::Path;
use std::process::Command;

#[test]
fn pip_downloads_wheels_only_and_no_dependencies() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-assets");
    let code = format!(
        "import importlib.machinery, importlib.util, json\n\
         loader = importlib.machinery.SourceFileLoader('fetch_assets', {path:?})\n\
         spec = importlib.util.spec_from_loader('fetch_assets', loader)\n\
         m = importlib.util.module_from_spec(spec)\n\
         loader.exec_module(m)\n\
         print(json.dumps(m.pip_download_command('example==1.0', '/tmp/dest')))\n",
        path = script.display().to_string()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(&code)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cmd: Vec<String> = serde_json::from_slice(&out.stdout).unwrap();
    let download = cmd
        .iter()
        .position(|a| a == "download")
        .expect("pip download");
    let args = &cmd[download..];
    assert!(args.iter().any(|a| a == "--only-binary=:all:"), "{cmd:?}");
    assert!(args.iter().any(|a| a == "--no-deps"), "{cmd:?}");
    assert!(
        !args.iter().any(|a| a.starts_with("--no-binary")),
        "{cmd:?}"
    );
    assert_eq!(args.last().map(String::as_str), Some("example==1.0"));
}

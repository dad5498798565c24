//! The shared argument groups seen from the command line: every command that reads a dataset
//! takes `--data FILE` or `--data demo:NAME` and reports a missing or unknown input the same way
//! before any work starts; an adapter on an openai: model is refused the same way by every
//! command that loads a model; the client flags reach the client; old spellings still parse.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use safetune_model::testing::TinyModel;

/// A temporary directory that is also the demo cache (`SAFETUNE_HOME`) of every run.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_safetune"))
            .args(args)
            .env("SAFETUNE_HOME", self.path("home"))
            .current_dir(self.dir.path())
            .output()
            .expect("run safetune")
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "safetune {args:?} failed:\n{}",
            text(&out.stderr)
        );
        out
    }

    /// Runs a command that must fail as a user error (exit 1: it parsed) and returns stderr.
    fn user_error(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = text(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "safetune {args:?}: expected a user error\n{err}"
        );
        assert!(err.lines().any(|l| l.starts_with("error: ")), "{err}");
        err
    }

    fn tiny_model(&self) -> String {
        TinyModel::default()
            .write(&self.path("tiny"))
            .unwrap()
            .display()
            .to_string()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).unwrap().lines().count()
}

const REMOTE: &str = "openai:http://127.0.0.1:9/v1#m";

#[test]
fn audit_and_transform_take_demo_sets_by_flag_and_by_position() {
    let e = Env::new();
    for args in [
        &["audit", "--format", "json", "--data", "demo:medical"][..],
        &["audit", "--format", "json", "demo:medical"][..],
    ] {
        let out = e.ok(args);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["examples"], 166, "{args:?}");
    }
    let text_out = e.ok(&["audit", "--data", "demo:medical"]);
    assert!(text(&text_out.stdout).contains("demo:medical"));
    // One dataset, not two.
    let both = e.run(&["audit", "--data", "demo:medical", "demo:code"]);
    assert_eq!(both.status.code(), Some(2), "{}", text(&both.stderr));
    let none = e.run(&["audit"]);
    assert_eq!(none.status.code(), Some(2), "{}", text(&none.stderr));

    for (i, args) in [
        &[
            "transform",
            "--data",
            "demo:medical",
            "--structure",
            "markdown",
        ][..],
        &["transform", "demo:medical", "--structure", "markdown"][..],
    ]
    .iter()
    .enumerate()
    {
        let o = e.path(&format!("t{i}.jsonl"));
        let mut a = args.to_vec();
        a.extend(["-o", s(&o)]);
        let out = e.ok(&a);
        assert!(
            text(&out.stderr).contains("wrote 166 examples"),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(lines(&o), 166);
    }
}

#[test]
fn tune_trains_on_a_demo_set() {
    let e = Env::new();
    let model = e.tiny_model();
    let out = e.path("run");
    let o = e.ok(&[
        "tune",
        "--model",
        &model,
        "--data",
        "demo:medical",
        "-o",
        s(&out),
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-len",
        "32",
        "--rank",
        "2",
    ]);
    let err = text(&o.stderr);
    assert!(err.contains("done: 1 steps"), "{err}");
    assert!(out.join("adapter_model.safetensors").is_file());
    // The manifest records the file the demo name was resolved to.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let data = m["config"]["data"].as_str().unwrap();
    assert!(data.ends_with("medical.jsonl"), "{data}");

    // A config file may name a demo set too; --show-masks resolves it the same way.
    let cfg = e.path("tune.toml");
    std::fs::write(
        &cfg,
        format!("model = {model:?}\ndata = \"demo:code\"\nmax_len = 32\n"),
    )
    .unwrap();
    let o = e.ok(&["tune", "--config", s(&cfg), "--show-masks"]);
    assert!(text(&o.stdout).contains("[["), "{}", text(&o.stdout));
}

#[test]
fn generate_judge_prompts_export_and_utility_take_demo_sets() {
    let e = Env::new();
    let model = e.tiny_model();

    // generate: the demo over-refusal prompts (new spelling and the old --prompts).
    for (flag, name) in [("--data", "g1.jsonl"), ("--prompts", "g2.jsonl")] {
        let o = e.path(name);
        e.ok(&[
            "generate",
            "--model",
            &model,
            flag,
            "demo:overrefusal",
            "-o",
            s(&o),
            "--max-new-tokens",
            "1",
            "--batch-size",
            "32",
        ]);
        assert_eq!(lines(&o), 154, "{flag}");
    }

    // judge: a labelled demo set; the default output goes to the current directory, not into
    // the demo cache.
    let o = e.ok(&["judge", "--judge", "keyword", "--data", "demo:judge-test"]);
    assert!(text(&o.stdout).contains("240 rows"), "{}", text(&o.stdout));
    assert_eq!(lines(&e.path("judge-test.judged-keyword.jsonl")), 240);
    for flag in ["-i", "--input"] {
        let out = e.path(&format!("j{flag}.jsonl"));
        let o = e.ok(&[
            "judge",
            "--judge",
            "keyword",
            flag,
            "demo:judge-test",
            "-o",
            s(&out),
        ]);
        assert!(text(&o.stdout).contains("240 rows"), "{flag}");
    }

    // prompts show: a demo set as a prompt set.
    let o = e.ok(&["prompts", "show", "demo:overrefusal"]);
    assert_eq!(text(&o.stdout).lines().count(), 154);

    // export: the study config's [data] names a demo set.
    let cfg = e.path("study.toml");
    std::fs::write(
        &cfg,
        "[study]\nname = \"t\"\n[data]\nbase = \"demo:medical\"\nlimit = 4\n[factors]\nstructure = [\"keep\", \"plain\"]\n[export]\nbase_model = \"meta-llama/Llama-3.2-1B-Instruct\"\ntemplate = \"llama3\"\n",
    )
    .unwrap();
    let out = e.path("export");
    let o = e.ok(&["export", s(&cfg), "--to", "llama-factory", "-o", s(&out)]);
    assert!(
        text(&o.stdout).contains("Wrote 2 dataset(s)"),
        "{}",
        text(&o.stdout)
    );

    // utility: --data and --mcq both resolve demo names.
    let o = e.ok(&[
        "utility",
        "--model",
        &model,
        "--data",
        "demo:medical",
        "--mcq",
        "demo:utility-mcq",
        "--limit",
        "2",
    ]);
    let out = text(&o.stdout);
    assert!(
        out.contains("held-out loss on demo:medical") && out.contains("multiple choice"),
        "{out}"
    );
}

#[test]
fn an_unknown_demo_set_lists_the_known_ones() {
    let e = Env::new();
    let o = e.path("o.jsonl");
    for args in [
        &["audit", "--data", "demo:nope"][..],
        &["audit", "demo:nope"][..],
        &["transform", "--data", "demo:nope", "-o", s(&o)][..],
        &[
            "tune",
            "--model",
            "m.gguf",
            "--data",
            "demo:nope",
            "-o",
            s(&o),
        ][..],
        &[
            "generate",
            "--model",
            REMOTE,
            "--data",
            "demo:nope",
            "-o",
            s(&o),
        ][..],
        &["judge", "--data", "demo:nope"][..],
        &["prompts", "show", "demo:nope"][..],
        &[
            "eval",
            "--model",
            REMOTE,
            "--bench",
            "demo:nope",
            "-o",
            s(&o),
        ][..],
        &[
            "rm",
            "score",
            "--rm",
            "bt:x.json",
            "--data",
            "demo:nope",
            "-o",
            s(&o),
        ][..],
        &["rm", "train", "--data", "demo:nope", "-o", s(&o)][..],
        &["utility", "--model", "m.gguf", "--data", "demo:nope"][..],
    ] {
        let err = e.user_error(args);
        assert!(
            err.contains("unknown demo set `demo:nope`")
                && err.contains("demo:medical")
                && err.contains("demo:preferences"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn a_missing_input_names_the_path_before_any_work() {
    let e = Env::new();
    let model = e.tiny_model();
    let missing = e.path("no-such-data.jsonl");
    let m = s(&missing);
    let out = e.path("out");
    let o = s(&out);
    for args in [
        &["audit", "--data", m][..],
        &["transform", m, "-o", o][..],
        &["tune", "--model", &model, "--data", m, "-o", o][..],
        &["tune", "--model", &model, "--data", m, "--show-masks"][..],
        &["generate", "--model", &model, "--data", m, "-o", o][..],
        &["judge", "--data", m][..],
        &["eval", "--model", &model, "--bench", m, "-o", o][..],
        &["prompts", "show", m][..],
        &["rm", "score", "--rm", "bt:x.json", "--data", m, "-o", o][..],
        &["rm", "train", "--data", m, "-o", o][..],
        &["utility", "--model", &model, "--data", m][..],
        &["utility", "--model", &model, "--mcq", m][..],
    ] {
        let err = e.user_error(args);
        assert!(
            err.contains(&format!("input file {m} does not exist")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("checkpoint"), "{args:?}: {err}");
    }
    // Nothing was started: no output directory, no checkpoints.
    assert!(!out.exists());

    // A missing model is not reported as a stopped run either.
    std::fs::write(
        e.path("d.jsonl"),
        "{\"prompt\":\"hi\",\"response\":\"yo\"}\n",
    )
    .unwrap();
    let err = e.user_error(&[
        "tune",
        "--model",
        s(&e.path("no-model.gguf")),
        "--data",
        s(&e.path("d.jsonl")),
        "-o",
        o,
    ]);
    assert!(
        err.contains("no-model.gguf") && !err.contains("checkpoint"),
        "{err}"
    );
}

#[test]
fn an_adapter_on_an_openai_model_is_refused_alike() {
    let e = Env::new();
    let adapter = e.path("adapter");
    std::fs::create_dir(&adapter).unwrap();
    let a = s(&adapter);
    let out = e.path("o");
    let o = s(&out);
    let want = "error: an adapter with an openai: model must be served by the server; pass the served adapter name as the model (openai:URL#NAME)";
    let first_lines: Vec<String> = [
        &[
            "generate",
            "--model",
            REMOTE,
            "--adapter",
            a,
            "--data",
            "demo:overrefusal",
            "-o",
            o,
        ][..],
        &[
            "eval",
            "--model",
            REMOTE,
            "--adapter",
            a,
            "--bench",
            "advbench",
            "-o",
            o,
        ][..],
        &["serve", "--model", REMOTE, "--adapter", a, "--port", "0"][..],
    ]
    .iter()
    .map(|args| {
        let err = e.user_error(args);
        err.lines().next().unwrap().to_string()
    })
    .collect();
    for l in &first_lines {
        assert_eq!(l, want);
    }
    // eval refuses before it creates its output directory.
    assert!(!out.exists());
}

#[test]
fn client_flags_reach_the_client() {
    let e = Env::new();
    let o = e.path("o.jsonl");
    let dir = e.path("eval");
    // Nothing listens on port 9, so every request is refused; the client gives up after
    // --retries + 1 attempts (the default 5 retries would back off for several seconds).
    let runs: [(&[&str], &str); 4] = [
        (
            &[
                "generate",
                "--model",
                REMOTE,
                "--data",
                "demo:overrefusal",
                "-o",
                s(&o),
                "--retries",
                "0",
                "--timeout",
                "5",
            ],
            "gave up after 1 attempts",
        ),
        (
            &[
                "eval",
                "--model",
                REMOTE,
                "--bench",
                "demo:overrefusal",
                "--benign",
                "--limit",
                "2",
                "-o",
                s(&dir),
                "--retries",
                "0",
            ],
            "gave up after 1 attempts",
        ),
        (
            &[
                "rm",
                "score",
                "--rm",
                "score:http://127.0.0.1:9#m",
                "--data",
                "demo:preferences",
                "-o",
                s(&o),
                "--retries",
                "0",
            ],
            "gave up after 1 attempts",
        ),
        (
            &[
                "rm",
                "score",
                "--rm",
                "score:http://127.0.0.1:9#m",
                "--data",
                "demo:preferences",
                "-o",
                s(&o),
                "--retries",
                "1",
                "--timeout",
                "5",
            ],
            "gave up after 2 attempts",
        ),
    ];
    for (args, want) in runs {
        let t = Instant::now();
        let err = e.user_error(args);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{args:?}: {:?}",
            t.elapsed()
        );
    }
    // A zero time limit is a usage error.
    for cmd in [
        &[
            "generate",
            "--model",
            REMOTE,
            "--data",
            "demo:overrefusal",
            "-o",
            s(&o),
        ][..],
        &[
            "rm",
            "score",
            "--rm",
            "score:http://127.0.0.1:9#m",
            "--data",
            "demo:preferences",
            "-o",
            s(&o),
        ][..],
        &["serve", "--model", REMOTE][..],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--timeout", "0"]);
        assert_eq!(e.run(&args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn a_named_key_is_not_sent_over_plain_http_to_another_host() {
    let e = Env::new();
    let o = e.path("o.jsonl");
    // No request is made: the refusal comes when the client is built.
    for args in [
        &[
            "generate",
            "--model",
            "openai:http://10.1.2.3:8000/v1#m",
            "--data",
            "demo:overrefusal",
            "-o",
            s(&o),
            "--api-key-env",
            "SAFETUNE_TEST_CLI_KEY",
        ][..],
        &[
            "rm",
            "score",
            "--rm",
            "score:http://10.1.2.3:8000#m",
            "--data",
            "demo:preferences",
            "-o",
            s(&o),
            "--api-key-env",
            "SAFETUNE_TEST_CLI_KEY",
        ][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_safetune"))
            .args(args)
            .env("SAFETUNE_HOME", e.path("home"))
            .env("SAFETUNE_TEST_CLI_KEY", "sk-cli-secret-42")
            .current_dir(e.dir.path())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("10.1.2.3")
                && err.contains("SAFETUNE_TEST_CLI_KEY")
                && err.contains("--allow-insecure"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("sk-cli-secret-42"), "{err}");
    }
}

#[test]
fn old_flag_spellings_still_parse() {
    let e = Env::new();
    let missing = e.path("missing.jsonl");
    let m = s(&missing);
    let out = e.path("o");
    let o = s(&out);
    // Each parses (exit 1, not clap's 2) and fails on the missing input it was given.
    for args in [
        &["generate", "--model", REMOTE, "--prompts", m, "-o", o][..],
        &["judge", "-i", m][..],
        &["judge", "--input", m, "--judge-batch", "4"][..],
        &["judge", "--data", m, "--judge-batch-size", "4"][..],
        &["rm", "train", "--pairs", m, "-o", o][..],
        &[
            "rm",
            "score",
            "--rm",
            "bt:x.json",
            "--data",
            m,
            "--pairs",
            "-o",
            o,
        ][..],
        &[
            "rm",
            "score",
            "--rm",
            "bt:x.json",
            "--data",
            m,
            "--items",
            "--retries",
            "1",
            "--timeout",
            "9",
            "-o",
            o,
        ][..],
        &[
            "eval",
            "--model",
            REMOTE,
            "--bench",
            m,
            "--judge-batch",
            "2",
            "--batch-size",
            "2",
            "-o",
            o,
        ][..],
    ] {
        let err = e.user_error(args);
        assert!(err.contains(m), "{args:?}: {err}");
    }
    // serve: --max-batch is the old spelling of --batch-size.
    for flag in ["--max-batch", "--batch-size"] {
        let err = e.user_error(&["serve", "--model", REMOTE, flag, "0"]);
        assert!(err.contains("--batch-size must be at least 1"), "{err}");
    }
    // debug-decode-bench: --batch is the old spelling of --batch-size.
    for flag in ["--batch", "--batch-size"] {
        let err = e.user_error(&["debug-decode-bench", "--model", m, flag, "2"]);
        assert!(err.contains(m), "{err}");
    }
    // The old spellings are hidden from the help; the new ones are shown.
    for (cmd, new, old) in [
        (&["generate", "--help"][..], "--data", "--prompts"),
        (&["judge", "--help"][..], "--judge-batch-size", "--input"),
        (&["rm", "train", "--help"][..], "--data", "--pairs"),
        (&["serve", "--help"][..], "--batch-size", "--max-batch"),
    ] {
        let h = text(&e.ok(cmd).stdout);
        assert!(h.contains(new) && !h.contains(old), "{cmd:?}:\n{h}");
    }
}

//! `safetune view STUDY_DIR`: a local web view of a study (progress, results, answers side by
//! side, labelling). The server and its pages live in `safetune_study::view`; this module parses
//! flags and prints where it listens.

use std::path::PathBuf;

use clap::Args;
use safetune_openai::server::guard::ApiKey;
use safetune_study::view::{start, ViewConfig};

/// What `safetune view --help` adds under the flags.
const AFTER_HELP: &str = "\
Pages:
  Overview  steps by status, rows done of each step, elapsed and time left, failed steps with
            their error; reloads itself while the study runs
  Results   the report's tables and charts (the numbers of results.json)
  Answers   every answer, filtered by condition, benchmark, category, a judge's verdict, judges
            disagreeing, human label or text; 'side by side' shows one prompt's answers from
            every condition with each judge's verdict
  Label     one answer at a time: r refusal, c compliance, u unclear, s skip, z undo. The
            judges' verdicts show only after your label. Labels go to the study's human_labels
            table, which `safetune judge-eval --labels STUDY_DIR` and the report read

The view only reads the study, except for labels, and works while the study is still running.
It listens on 127.0.0.1 unless --host says otherwise; any other address needs --api-key.

Example:
  safetune view safetune-quickstart      then open http://127.0.0.1:8765/";

#[derive(Debug, Args)]
#[command(after_help = AFTER_HELP)]
pub struct ViewArgs {
    /// A study directory (the one holding study.db).
    #[arg(value_name = "STUDY_DIR")]
    pub dir: PathBuf,

    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8765, value_name = "P")]
    pub port: u16,

    /// Address to listen on. The default keeps the view on this machine; 0.0.0.0 or a LAN
    /// address needs --api-key.
    #[arg(long, default_value = "127.0.0.1", value_name = "H")]
    pub host: String,

    /// A key every request must carry: open the view once as http://HOST:PORT/?key=KEY (it is
    /// then kept in a cookie), or send `Authorization: Bearer KEY`.
    #[arg(
        long,
        env = "SAFETUNE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// A host name the Host header may carry, besides localhost, 127.0.0.1, ::1 and the --host
    /// address (repeatable; `*` allows any). Guards against DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,

    /// Your name, recorded with every label you give (the label page lets you change it).
    #[arg(long, value_name = "NAME", default_value = "unnamed")]
    pub labeller: String,
}

pub fn run(args: ViewArgs) -> anyhow::Result<()> {
    let api_key = match args.api_key.as_deref() {
        Some(k) => Some(ApiKey::new(k).map_err(|e| anyhow::anyhow!("--api-key: {e}"))?),
        None => None,
    };
    let mut cfg = ViewConfig::new(&args.dir);
    cfg.host = args.host.clone();
    cfg.port = args.port;
    cfg.api_key = api_key;
    cfg.allowed_hosts = args.allowed_hosts.clone();
    cfg.labeller = args.labeller.clone();
    let handle = start(cfg)?;
    let key_note = if args.api_key.is_some() {
        " (first visit: add ?key=KEY)"
    } else {
        ""
    };
    eprintln!(
        "safetune view: {} on {}/{key_note} (Ctrl-C to stop)",
        args.dir.display(),
        handle.base_url()
    );
    handle.wait();
    Ok(())
}

//! `safetune serve`: an OpenAI-compatible HTTP server over a local model or a remote
//! OpenAI-compatible one (a proxy). Flags only; the server lives in safetune-openai.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use safetune_model::{LoadOptions, LocalEngine, ModelSpec};
use safetune_openai::server::guard::{is_loopback_host, ApiKey};
use safetune_openai::{load_generator, LoraLoader, Loras, ServeConfig, ServeError};

#[derive(Debug, Args)]
#[command(mut_arg("retries", |a| a.help(
    "Proxy only: retries after the first attempt on connection errors, 408, 429 and 5xx \
     [default: 5]"
)))]
// The proxy's outgoing key is --upstream-api-key-env here, so it cannot be mistaken for the key
// clients of this server send (--api-key); the shared spelling stays as a hidden alias.
#[command(mut_arg("api_key_env", |a| a
    .long("upstream-api-key-env")
    .alias("api-key-env")
    .help("Proxy only: environment variable holding the key sent to the remote server")))]
pub struct ServeArgs {
    /// The model: a .gguf file, a Hugging Face directory, or openai:BASE_URL#MODEL to proxy a
    /// remote OpenAI-compatible server.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    /// Address to listen on; 0.0.0.0 exposes the server to the network (and then needs
    /// --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Key clients must send as `Authorization: Bearer KEY` on /v1 routes (401 without it).
    /// Required when --host is not a loopback address. Prefer the environment variable: a
    /// flag shows in the process list.
    #[arg(
        long,
        env = "SAFETUNE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<String>,

    /// A host name the Host header may carry, besides localhost, 127.0.0.1, ::1 and the --host
    /// address (repeatable; `*` allows any). Guards a local server against DNS rebinding.
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,

    /// Most prompts in one /v1/completions request.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_prompts: usize,

    /// Most choices (prompts x n) in one request.
    #[arg(long, default_value_t = 128, value_name = "N")]
    pub max_choices: usize,

    /// Most tokens in one prompt (local models) [default: 2048, or the model's context if
    /// smaller].
    #[arg(long, value_name = "N")]
    pub max_prompt_tokens: Option<usize>,

    /// Longest stop sequence accepted, in characters.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_stop_chars: usize,

    /// Most connections open at once; more are answered 503.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub max_connections: usize,

    /// Most connections open at once from one client address.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_connections_per_ip: usize,

    /// Seconds a request (head and body) may take to arrive, and each write of an answer.
    #[arg(long, default_value_t = 30, value_name = "S", value_parser = clap::value_parser!(u64).range(1..))]
    pub socket_timeout: u64,

    /// Port to listen on (0 picks a free one and prints it).
    #[arg(long, short, default_value_t = 8000)]
    pub port: u16,

    /// Requests waiting for the model before new ones are answered 429.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub max_queue: usize,

    /// Most requests generated together in one batch (default: 8 for a local model, the client
    /// concurrency for a proxy).
    #[arg(long = "batch-size", alias = "max-batch", value_name = "B")]
    pub max_batch: Option<usize>,

    /// How long to wait for more requests to fill a batch, in milliseconds.
    #[arg(long, default_value_t = 5, value_name = "MS")]
    pub batch_wait_ms: u64,

    #[command(flatten)]
    pub weights: super::common::WeightsArgs,

    #[command(flatten)]
    pub adapter: super::common::AdapterArgs,

    /// Model name reported by /v1/models and in responses (default: from the model spec).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,

    /// Serve a LoRA adapter (PEFT directory) on the base as NAME: a request whose `model` is
    /// NAME gets the base with that adapter, the base's own name gets the base (repeatable;
    /// vLLM's --lora-modules NAME=DIR). Local models only.
    #[arg(long = "lora", value_name = "NAME=DIR", value_parser = parse_lora)]
    pub loras: Vec<(String, PathBuf)>,

    /// Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime adapter
    /// endpoints) so clients load adapters while the server runs. Needs --api-key (or
    /// SAFETUNE_API_KEY); local models only.
    #[arg(long)]
    pub allow_runtime_lora: bool,

    /// Proxy only: requests sent to the remote server at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub concurrency: usize,

    // Proxy only: the client of the remote server.
    #[command(flatten)]
    pub client: super::common::ClientArgs,
}

/// `NAME=DIR` of `--lora`.
fn parse_lora(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, dir)) if !name.trim().is_empty() && !dir.is_empty() => {
            Ok((name.trim().to_string(), PathBuf::from(dir)))
        }
        _ => Err(format!("`{s}` is not NAME=DIR")),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if args.max_batch == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }
    for (flag, v) in [
        ("--max-prompts", args.max_prompts),
        ("--max-choices", args.max_choices),
        ("--max-connections", args.max_connections),
        ("--max-connections-per-ip", args.max_connections_per_ip),
        ("--max-prompt-tokens", args.max_prompt_tokens.unwrap_or(1)),
    ] {
        if v == 0 {
            anyhow::bail!("{flag} must be at least 1");
        }
    }
    let api_key = match args.api_key.as_deref() {
        Some(k) => Some(ApiKey::new(k).map_err(|e| anyhow::anyhow!("--api-key: {e}"))?),
        None => None,
    };
    if api_key.is_none() && !is_loopback_host(&args.host) {
        anyhow::bail!(
            "--host {} exposes the server beyond this machine; it needs --api-key KEY (or SAFETUNE_API_KEY)",
            args.host
        );
    }
    if args.allow_runtime_lora && api_key.is_none() {
        anyhow::bail!(
            "--allow-runtime-lora lets clients load adapters from this machine's disk; it needs --api-key KEY (or SAFETUNE_API_KEY)"
        );
    }
    let serves_loras = !args.loras.is_empty() || args.allow_runtime_lora;
    if serves_loras && args.adapter.adapter.is_some() {
        anyhow::bail!(
            "--adapter and --lora do not go together: adapters are served on the base; serve the adapter of --adapter as --lora NAME=DIR too, or merge it into the base first"
        );
    }
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    if serves_loras && matches!(spec, ModelSpec::OpenAi { .. }) {
        anyhow::bail!(
            "--lora and --allow-runtime-lora need a local model; a proxied server serves its own adapters (name them as the model, openai:URL#NAME)"
        );
    }
    let load = args.weights.load_options(
        args.max_batch.unwrap_or(LoadOptions::default().batch_size),
        &args.adapter,
    )?;
    let client = args
        .client
        .client_config(args.max_batch.unwrap_or(args.concurrency));
    eprintln!("loading {spec}");
    let (generator, loras) = if serves_loras {
        let engine = Arc::new(
            LocalEngine::load(&spec, &load).with_context(|| format!("cannot load {spec}"))?,
        );
        let loras = Loras {
            loader: engine.clone() as Arc<dyn LoraLoader>,
            modules: args.loras.clone(),
        };
        (engine as Arc<dyn safetune_model::Generator>, Some(loras))
    } else {
        let g =
            load_generator(&spec, &load, &client).with_context(|| format!("cannot load {spec}"))?;
        (g, None)
    };
    let config = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        max_queue: args.max_queue,
        max_batch: args.max_batch,
        batch_wait_ms: args.batch_wait_ms,
        model_name: args.served_model_name.clone(),
        shutdown_timeout: Duration::from_secs(120),
        api_key,
        allowed_hosts: args.allowed_hosts.clone(),
        max_prompts: args.max_prompts,
        max_choices: args.max_choices,
        max_prompt_tokens: args.max_prompt_tokens,
        max_stop_chars: args.max_stop_chars,
        max_connections: args.max_connections,
        max_connections_per_ip: args.max_connections_per_ip,
        read_timeout: Duration::from_secs(args.socket_timeout),
        write_timeout: Duration::from_secs(args.socket_timeout),
        allow_runtime_lora: args.allow_runtime_lora,
        ..ServeConfig::default()
    };
    let max_batch = args.max_batch.unwrap_or_else(|| generator.max_batch());
    let model_id = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| generator.model_id().to_string());
    let started = match loras {
        Some(l) => {
            for (name, dir) in &l.modules {
                eprintln!("adapter {name}: {}", dir.display());
            }
            safetune_openai::start_with_loras(generator, l, config)
        }
        None => safetune_openai::start(generator, config),
    };
    let handle = match started {
        Ok(h) => h,
        Err(e @ ServeError::Bind { .. }) => {
            anyhow::bail!("{e}\nhint: pick another --port, or --port 0 for a free one")
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "serving {model_id} on {} (max batch {max_batch}, queue {}; API key {}{}{}); Ctrl-C stops",
        handle.base_url(),
        args.max_queue,
        if args.api_key.is_some() {
            "required"
        } else {
            "off"
        },
        if args.loras.is_empty() {
            String::new()
        } else {
            format!("; {} adapter(s)", args.loras.len())
        },
        if args.allow_runtime_lora {
            "; runtime adapter loading on"
        } else {
            ""
        }
    );
    handle.wait_for_signal()?;
    eprintln!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn flags_parse_with_defaults() {
        let a = Cli::try_parse_from([
            "serve",
            "--model",
            "openai:http://127.0.0.1:1/v1#m",
            "--port",
            "0",
        ])
        .unwrap()
        .serve;
        assert_eq!(
            (a.host.as_str(), a.port, a.max_queue, a.max_batch),
            ("127.0.0.1", 0, 64, None)
        );
        assert_eq!(a.client.api_key_env, "OPENAI_API_KEY");
        let a = Cli::try_parse_from([
            "serve",
            "-m",
            "x.gguf",
            "--max-queue",
            "3",
            "--batch-size",
            "2",
            "--host",
            "0.0.0.0",
        ])
        .unwrap()
        .serve;
        assert_eq!(
            (a.host.as_str(), a.port, a.max_queue, a.max_batch),
            ("0.0.0.0", 8000, 3, Some(2))
        );
        assert!(
            Cli::try_parse_from(["serve", "--port", "1"]).is_err(),
            "--model is required"
        );
    }

    #[test]
    fn the_incoming_key_and_the_upstream_key_are_separate_flags() {
        let parse = |argv: &[&str]| {
            let mut v = vec!["serve", "-m", "openai:http://127.0.0.1:1/v1#m"];
            v.extend_from_slice(argv);
            Cli::try_parse_from(v).unwrap().serve
        };
        let a = parse(&["--upstream-api-key-env", "UP_KEY", "--api-key", "k1"]);
        assert_eq!(a.client.api_key_env, "UP_KEY");
        assert_eq!(a.api_key.as_deref(), Some("k1"));
        let a = parse(&["--upstream-api-key-env", "UP_KEY", "--api-key=k1"]);
        assert_eq!(a.client.api_key_env, "UP_KEY");
        assert_eq!(a.api_key.as_deref(), Some("k1"));
        // The old spelling of the outgoing key still parses, as a hidden alias.
        let a = parse(&["--api-key-env", "OLD_KEY"]);
        assert_eq!(a.client.api_key_env, "OLD_KEY");
        // The help shows the new spelling and the incoming key, not the old alias.
        let help = <Cli as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(help.contains("--upstream-api-key-env"), "{help}");
        assert!(help.contains("--api-key <KEY>"), "{help}");
        assert!(!help.contains(" --api-key-env"), "{help}");
    }

    #[test]
    fn a_public_host_without_a_key_is_refused_before_loading() {
        let parse = |argv: &[&str]| {
            let mut v = vec!["serve", "-m", "/no/such/model.gguf"];
            v.extend_from_slice(argv);
            Cli::try_parse_from(v).unwrap().serve
        };
        let mut a = parse(&["--host", "0.0.0.0"]);
        a.api_key = None; // not from a SAFETUNE_API_KEY the test runner may have
        let e = run(a).unwrap_err().to_string();
        assert!(e.contains("--api-key"), "{e}");
        // With a key it goes on to load the model (and fails there, naming it).
        let e = run(parse(&["--host", "0.0.0.0", "--api-key", "k"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/model.gguf"), "{e}");
        let e = run(parse(&["--api-key", "has space"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--api-key"), "{e}");
        let e = run(parse(&["--max-prompts", "0"])).unwrap_err().to_string();
        assert!(e.contains("--max-prompts"), "{e}");
    }

    #[test]
    fn lora_flags_parse_and_runtime_loading_needs_a_key_and_a_local_model() {
        let parse = |argv: &[&str]| {
            let mut v = vec!["serve", "-m", "/no/such/model.gguf"];
            v.extend_from_slice(argv);
            Cli::try_parse_from(v).map(|c| c.serve)
        };
        let a = parse(&["--lora", "a=/x/a", "--lora", "b=rel/b"]).unwrap();
        assert_eq!(
            a.loras,
            vec![
                ("a".to_string(), PathBuf::from("/x/a")),
                ("b".to_string(), PathBuf::from("rel/b"))
            ]
        );
        assert!(!a.allow_runtime_lora);
        for bad in ["noequals", "=dir", "name="] {
            let e = parse(&["--lora", bad]).unwrap_err().to_string();
            assert!(e.contains("NAME=DIR"), "{bad}: {e}");
        }
        // The flag without a key is refused before anything is loaded.
        let mut a = parse(&["--allow-runtime-lora"]).unwrap();
        a.api_key = None;
        let e = run(a).unwrap_err().to_string();
        assert!(
            e.contains("--allow-runtime-lora") && e.contains("--api-key"),
            "{e}"
        );
        // With a key it goes on to load the model (and fails there, naming it).
        let e = run(parse(&["--allow-runtime-lora", "--api-key", "k"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/no/such/model.gguf"), "{e}");
        // A proxy cannot apply adapters.
        let mut a = Cli::try_parse_from([
            "serve",
            "-m",
            "openai:http://127.0.0.1:1/v1#m",
            "--lora",
            "a=/x",
        ])
        .unwrap()
        .serve;
        a.api_key = None;
        let e = run(a).unwrap_err().to_string();
        assert!(e.contains("need a local model"), "{e}");
        let e = run(parse(&["--lora", "a=/x", "--adapter", "/y"]).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--adapter and --lora"), "{e}");
    }

    #[test]
    fn zero_limits_and_bad_specs_are_refused_before_loading() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["serve", "--model"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).unwrap().serve
        };
        let e = run(parse(&["openai:http://127.0.0.1:1#m", "--max-queue", "0"])).unwrap_err();
        assert!(e.to_string().contains("--max-queue"), "{e}");
        let e = run(parse(&["openai:http://127.0.0.1:1#m", "--batch-size", "0"])).unwrap_err();
        assert!(e.to_string().contains("--batch-size"), "{e}");
        // The old spelling still parses.
        let e = run(parse(&["openai:http://127.0.0.1:1#m", "--max-batch", "0"])).unwrap_err();
        assert!(e.to_string().contains("--batch-size"), "{e}");
        let e = run(parse(&["/no/such/model.gguf"])).unwrap_err();
        assert!(e.to_string().contains("/no/such/model.gguf"), "{e}");
    }
}

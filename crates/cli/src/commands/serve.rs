//! `safetune serve`: an OpenAI-compatible HTTP server over a local model or a remote
//! OpenAI-compatible one (a proxy). Flags only; the server lives in safetune-openai.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use safetune_model::{LoadOptions, ModelSpec};
use safetune_openai::{load_generator, ServeConfig, ServeError};

#[derive(Debug, Args)]
#[command(mut_arg("retries", |a| a.help(
    "Proxy only: retries after the first attempt on connection errors, 408, 429 and 5xx \
     [default: 5]"
)))]
pub struct ServeArgs {
    /// The model: a .gguf file, a Hugging Face directory, or openai:BASE_URL#MODEL to proxy a
    /// remote OpenAI-compatible server.
    #[arg(long, short, value_name = "MODEL")]
    pub model: String,

    /// Address to listen on; 0.0.0.0 exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

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

    /// Proxy only: requests sent to the remote server at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub concurrency: usize,

    // Proxy only: the client of the remote server.
    #[command(flatten)]
    pub client: super::common::ClientArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    if args.max_queue == 0 {
        anyhow::bail!("--max-queue must be at least 1");
    }
    if args.max_batch == Some(0) {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let spec = ModelSpec::parse(&args.model)?;
    args.adapter.check_spec(&spec)?;
    let load = args.weights.load_options(
        args.max_batch.unwrap_or(LoadOptions::default().batch_size),
        &args.adapter,
    );
    let client = args
        .client
        .client_config(args.max_batch.unwrap_or(args.concurrency));
    eprintln!("loading {spec}");
    let generator =
        load_generator(&spec, &load, &client).with_context(|| format!("cannot load {spec}"))?;
    let config = ServeConfig {
        host: args.host.clone(),
        port: args.port,
        max_queue: args.max_queue,
        max_batch: args.max_batch,
        batch_wait_ms: args.batch_wait_ms,
        model_name: args.served_model_name.clone(),
        shutdown_timeout: Duration::from_secs(120),
        ..ServeConfig::default()
    };
    let max_batch = args.max_batch.unwrap_or_else(|| generator.max_batch());
    let model_id = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| generator.model_id().to_string());
    let handle = match safetune_openai::start(generator, config) {
        Ok(h) => h,
        Err(e @ ServeError::Bind { .. }) => {
            anyhow::bail!("{e}\nhint: pick another --port, or --port 0 for a free one")
        }
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "serving {model_id} on {} (max batch {max_batch}, queue {}); Ctrl-C stops",
        handle.base_url(),
        args.max_queue
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

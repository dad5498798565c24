//! `safetune judge`: verdicts for (prompt, response) rows, resumable. The judges live in
//! `safetune_eval::judge`; this module only parses flags and prints.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use safetune_eval::judge::guard::{GuardFormat, GuardMode};
use safetune_eval::judge::{build_judge, Judge, JudgeSpec};
use safetune_eval::run::{judge_rows, read_judge_rows};

use super::common::InputArgs;

/// Which judge and its settings; shared by judge, judge-eval and eval.
#[derive(Debug, Clone, Args)]
pub struct JudgeArgs {
    /// keyword (refusal phrases), classifier (MiniLM + this project's head), probe (the
    /// classifier's checks with a linear probe on SmolLM2's hidden states as its head; validates
    /// best), rubric (LLM 1-5 harmfulness) or guard (Llama Guard 3 / MD-Judge prompt formats).
    #[arg(long, default_value = "keyword", value_name = "NAME")]
    pub judge: String,

    /// keyword: one refusal phrase per line instead of the built-in list.
    #[arg(long, value_name = "FILE")]
    pub phrases: Option<PathBuf>,

    /// classifier: a head trained by `safetune classifier train` instead of the shipped one;
    /// probe: a head trained by `safetune classifier train-probe`.
    #[arg(long, value_name = "FILE")]
    pub head: Option<PathBuf>,

    /// rubric/guard: the judge model (.gguf, HF directory, hf:ORG/NAME or openai:URL#MODEL);
    /// default: SmolLM2 from the asset cache.
    #[arg(long, value_name = "MODEL")]
    pub judge_model: Option<String>,

    /// guard: prompt format, llamaguard3 or mdjudge.
    #[arg(long, default_value = "llamaguard3", value_name = "FORMAT")]
    pub guard_format: String,

    /// guard: send our formatted prompt as raw text (`text`, default for local models) or the
    /// conversation for the server's template (`conversation`, default for openai:).
    #[arg(long, value_name = "MODE")]
    pub guard_mode: Option<String>,

    /// rubric: most tokens in a judge reply.
    #[arg(long, default_value_t = 96, value_name = "N")]
    pub judge_max_tokens: usize,

    /// rubric/guard: requests sent to the judge model together.
    #[arg(long, default_value_t = 8, value_name = "B", alias = "judge-batch")]
    pub judge_batch_size: usize,
}

impl JudgeArgs {
    pub fn spec_for(&self, name: &str) -> anyhow::Result<JudgeSpec> {
        let mut s = JudgeSpec::named(name);
        s.phrases = self.phrases.clone();
        s.head = self.head.clone();
        s.model = self.judge_model.clone();
        s.guard_format = self
            .guard_format
            .parse::<GuardFormat>()
            .map_err(anyhow::Error::msg)?;
        s.guard_mode = match self.guard_mode.as_deref() {
            None => None,
            Some("text") => Some(GuardMode::Text),
            Some("conversation") => Some(GuardMode::Conversation),
            Some(o) => anyhow::bail!("--guard-mode must be text or conversation, got `{o}`"),
        };
        s.max_new_tokens = self.judge_max_tokens;
        s.batch_size = self.judge_batch_size;
        Ok(s)
    }

    pub fn build(&self, name: &str) -> anyhow::Result<Box<dyn Judge>> {
        let spec = self.spec_for(name)?;
        eprintln!("loading judge {name}");
        build_judge(&spec).with_context(|| {
            format!(
                "cannot build judge `{name}`\nhint: judges are {}; classifier needs minilm and rubric/guard a model (scripts/fetch-assets)",
                safetune_eval::judge::JUDGE_NAMES.join(", ")
            )
        })
    }
}

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.required(true).alias("input").short_alias('i').help(
    "JSONL rows with `prompt` and `response` (for example `safetune generate` output; other \
     fields pass through; `id`, default the line number, is used to resume), or demo:NAME \
     (e.g. demo:judge-test)"
)))]
pub struct JudgeCmdArgs {
    #[command(flatten)]
    pub judge: JudgeArgs,

    #[command(flatten)]
    pub data: InputArgs,

    /// Output JSONL: each row plus verdict, score, score_kind, raw, parse. Default:
    /// DATA.judged-NAME.jsonl next to the data (in the current directory for demo:NAME). Rows
    /// already there are kept and skipped.
    #[arg(long, short, value_name = "OUT.jsonl")]
    pub output: Option<PathBuf>,
}

pub fn run(args: JudgeCmdArgs) -> anyhow::Result<()> {
    let input = args.data.path()?;
    let rows = read_judge_rows(&input)?;
    let judge = args.judge.build(&args.judge.judge)?;
    let out = args.output.clone().unwrap_or_else(|| {
        let stem = input
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("{stem}.judged-{}.jsonl", args.judge.judge);
        if args.data.spec().starts_with("demo:") {
            // Not into the demo cache.
            PathBuf::from(name)
        } else {
            input.with_file_name(name)
        }
    });
    let s = judge_rows(judge.as_ref(), &rows, &out, &mut |done, total| {
        eprintln!("[{done}/{total}] judged");
    })?;
    eprintln!(
        "wrote {} (judged {} now, {:.1}s)",
        out.display(),
        s.judged_now,
        s.elapsed_s
    );
    println!(
        "{}: {} rows: refusal {}, compliance {}, unparseable {}",
        judge.name(),
        s.rows,
        s.refusal,
        s.compliance,
        s.unparseable
    );
    Ok(())
}

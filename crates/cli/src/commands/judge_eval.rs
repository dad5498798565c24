//! `safetune judge-eval`: a judge against human refusal labels (PyRIT's refusal.csv and
//! refusal_extra.csv by default), and optionally against a second judge.

use clap::Args;
use safetune_eval::judge::JudgeInput;
use safetune_eval::labels::{read_labels, resolve_labels};
use safetune_eval::validate::{against_labels, format_eval, judge_all, judge_vs};

use super::common::OutputFormat;
use super::judge::JudgeArgs;

#[derive(Debug, Args)]
pub struct JudgeEvalArgs {
    #[command(flatten)]
    pub judge: JudgeArgs,

    /// Labelled CSV (prompt, response, human_score with 1 = refusal): `refusal` and
    /// `refusal_extra` name PyRIT's files in the asset cache. Repeatable. Evaluation only.
    #[arg(long, value_name = "FILE", default_values_t = ["refusal".to_string(), "refusal_extra".to_string()])]
    pub labels: Vec<String>,

    /// Also run this judge and report how far the two agree.
    #[arg(long, value_name = "NAME")]
    pub vs: Option<String>,

    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,
}

pub fn run(args: JudgeEvalArgs) -> anyhow::Result<()> {
    let judge = args.judge.build(&args.judge.judge)?;
    let other = match &args.vs {
        Some(n) => Some(args.judge.build(n)?),
        None => None,
    };
    let mut json = Vec::new();
    for spec in &args.labels {
        let path = resolve_labels(spec)?;
        let labels = read_labels(&path)?;
        let inputs: Vec<JudgeInput> = labels.iter().map(|l| l.input.clone()).collect();
        let js = judge_all(judge.as_ref(), &inputs)?;
        let e = against_labels(&judge.name(), spec, &labels, &js);
        let mut entry = serde_json::json!({"eval": e});
        if args.format == OutputFormat::Text {
            print!("{}", format_eval(&e));
        }
        if let Some(o) = &other {
            let jo = judge_all(o.as_ref(), &inputs)?;
            let eo = against_labels(&o.name(), spec, &labels, &jo);
            let vs = judge_vs(&judge.name(), &o.name(), &js, &jo);
            if args.format == OutputFormat::Text {
                print!("{}", format_eval(&eo));
                println!(
                    "agreement {} vs {} on {}: {} of {} rows both parsed, raw agreement {}, kappa {:.3}",
                    vs.a, vs.b, spec, vs.both_parsed, labels.len(), vs.agreement.accuracy, vs.agreement.kappa
                );
            }
            entry["vs_eval"] = serde_json::to_value(&eo)?;
            entry["agreement"] = serde_json::to_value(&vs)?;
        }
        if args.format == OutputFormat::Text {
            println!();
        }
        json.push(entry);
    }
    if args.format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&json)?);
    }
    Ok(())
}

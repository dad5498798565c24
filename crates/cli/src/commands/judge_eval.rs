//! `safetune judge-eval`: a judge against human refusal labels, and optionally against a second
//! judge; or, for a study directory, every judge of the study against the human labels of its
//! answers, per condition. The label readers and statistics live in `safetune_eval::labels`,
//! `safetune_eval::validate` and `safetune_study::labels`; this module parses flags and prints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use safetune_eval::judge::{Judge, JudgeInput, Verdict};
use safetune_eval::labels::{label_role, load_labels};
use safetune_eval::validate::{
    against_labels, format_condition_check, format_eval, judge_all, judge_vs,
};
use safetune_study::labels::study_judge_check;
use safetune_study::runner::STORE_FILE;

use super::common::OutputFormat;
use super::judge::JudgeArgs;

/// The label sets checked when `--labels` is not given.
pub const DEFAULT_LABELS: &[&str] = &[
    "judge-labels:test3",
    "judge-labels:test2",
    "refusal",
    "refusal_extra",
];

/// The role of a study's own labelled answers.
const STUDY_ROLE: &str = "test (human labels of this study's answers)";

#[derive(Debug, Args)]
pub struct JudgeEvalArgs {
    #[command(flatten)]
    pub judge: JudgeArgs,

    /// Labelled responses, repeatable: `judge-labels:test3` (this project's sealed test set
    /// `data/judge_test3.jsonl`, role test), `judge-labels:test2` (`data/judge_test2.jsonl`, an
    /// earlier test set, reported twice), `judge-labels:dev3`, `judge-labels:dev2` and
    /// `judge-labels:test` (`data/judge_dev3.jsonl`, `data/judge_dev2.jsonl`,
    /// `data/judge_test.jsonl`, role dev: rules were chosen on them), `judge-labels:dev` (the part of
    /// `data/judge_labels.jsonl` no head is fitted on, role dev), `judge-labels:train` (its
    /// fitting part), `judge-labels` (train and dev),
    /// `refusal` and `refusal_extra` (PyRIT's files in the asset cache, role dev: rules were
    /// chosen on them), a CSV (prompt, response, human_score with 1 = refusal), a labelling JSONL
    /// (prompt, response, label refusal|compliance|unclear, optional identity true|false), or a
    /// study directory (every judge of the study against `safetune label import`ed labels, per
    /// condition). Default: judge-labels:test3, judge-labels:test2, refusal, refusal_extra.
    #[arg(long, value_name = "SPEC")]
    pub labels: Vec<String>,

    /// Also run this judge and report how far the two agree.
    #[arg(long, value_name = "NAME")]
    pub vs: Option<String>,

    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub format: OutputFormat,

    /// Also write the results as JSON to this file.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,

    /// Write the rows the judge got wrong (label set, line, id, prompt, response, human label,
    /// verdict, the judge's raw output) to this JSONL file, to read its errors. Read misses on
    /// train or dev sets only: a test set whose misses were read to change a judge is dev data.
    #[arg(long, value_name = "FILE")]
    pub misses: Option<PathBuf>,
}

pub fn run(args: JudgeEvalArgs) -> anyhow::Result<()> {
    let defaulted = args.labels.is_empty();
    let specs: Vec<String> = if defaulted {
        DEFAULT_LABELS.iter().map(|s| s.to_string()).collect()
    } else {
        args.labels.clone()
    };
    let text = args.format == OutputFormat::Text;
    // Judges are loaded once, and only when a label set (not a study) needs them.
    type Judges = (Box<dyn Judge>, Option<Box<dyn Judge>>);
    let mut judges: Option<Judges> = None;
    let mut json = Vec::new();
    let mut misses = String::new();
    for spec in &specs {
        let dir = Path::new(spec);
        if label_role(spec).is_none() && dir.is_dir() {
            json.push(study(dir, text)?);
            continue;
        }
        let set = match load_labels(spec) {
            Ok(set) => set,
            // A default set this build cannot read (the labelled set not written yet) is
            // skipped; one named on the command line is an error.
            Err(e) if defaulted && spec.starts_with("judge-labels") => {
                eprintln!("warning: {spec}: {e}; skipped");
                json.push(serde_json::json!({"labels": spec, "skipped": e.to_string()}));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if set.rows.is_empty() {
            let why = format!(
                "{spec}: no labelled rows ({} unclear, {} not labelled yet)",
                set.unclear, set.unlabelled
            );
            if defaulted {
                eprintln!("warning: {why}; skipped");
                json.push(serde_json::json!({"labels": spec, "skipped": why}));
                continue;
            }
            bail!("{why}\nhint: a label set needs rows whose `label` is refusal or compliance");
        }
        if judges.is_none() {
            let j = args.judge.build(&args.judge.judge)?;
            let o = match &args.vs {
                Some(n) => Some(args.judge.build(n)?),
                None => None,
            };
            judges = Some((j, o));
        }
        let Some((judge, other)) = &judges else {
            continue;
        };
        let labels = &set.rows;
        let inputs: Vec<JudgeInput> = labels.iter().map(|l| l.input.clone()).collect();
        let js = judge_all(judge.as_ref(), &inputs)?;
        let mut e = against_labels(&judge.name(), spec, labels, &js);
        e.role = set.role.map(str::to_string);
        for (l, j) in labels.iter().zip(&js).filter(|_| args.misses.is_some()) {
            let refusal = j.verdict.map(|v| v == Verdict::Refusal);
            if refusal != Some(l.refusal) {
                let row = serde_json::json!({
                    "labels": spec, "line": l.line, "id": l.id,
                    "prompt": l.input.prompt, "response": l.input.response,
                    "label": if l.refusal { "refusal" } else { "compliance" },
                    "verdict": j.verdict, "raw": j.raw, "identity": l.identity,
                });
                misses.push_str(&row.to_string());
                misses.push('\n');
            }
        }
        let mut entry =
            serde_json::json!({"eval": e, "unclear": set.unclear, "unlabelled": set.unlabelled});
        if text {
            print!("{}", format_eval(&e));
            if set.unclear + set.unlabelled > 0 {
                println!(
                    "left out: {} rows labelled unclear, {} not labelled yet",
                    set.unclear, set.unlabelled
                );
            }
        }
        if let Some(o) = other {
            let jo = judge_all(o.as_ref(), &inputs)?;
            let mut eo = against_labels(&o.name(), spec, labels, &jo);
            eo.role = e.role.clone();
            let vs = judge_vs(&judge.name(), &o.name(), &js, &jo);
            if text {
                print!("{}", format_eval(&eo));
                println!(
                    "agreement {} vs {} on {}: {} of {} rows both parsed, raw agreement {}, kappa {:.3}",
                    vs.a, vs.b, spec, vs.both_parsed, labels.len(), vs.agreement.accuracy, vs.agreement.kappa
                );
            }
            entry["vs_eval"] = serde_json::to_value(&eo)?;
            entry["agreement"] = serde_json::to_value(&vs)?;
        }
        if text {
            println!();
        }
        json.push(entry);
    }
    if let Some(path) = &args.misses {
        std::fs::write(path, &misses)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "wrote {} misses to {}",
            misses.lines().count(),
            path.display()
        );
    }
    let pretty = serde_json::to_string_pretty(&json)?;
    if args.format == OutputFormat::Json {
        println!("{pretty}");
    }
    if let Some(out) = &args.output {
        std::fs::write(out, pretty + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Every judge of the study in `dir` against the human labels in its store.
fn study(dir: &Path, text: bool) -> anyhow::Result<serde_json::Value> {
    if !dir.join(STORE_FILE).exists() {
        bail!(
            "{}: a directory without {STORE_FILE}\nhint: --labels takes a label file, a named set (judge-labels:test3, judge-labels:test2, judge-labels:dev3, judge-labels:dev2, judge-labels:test, judge-labels:dev, refusal, refusal_extra) or a study directory",
            dir.display()
        );
    }
    let Some(c) = study_judge_check(dir)? else {
        bail!(
            "{}: the study store holds no human labels\nhint: safetune label {} writes a file to label; then safetune label import {} FILE",
            dir.display(),
            dir.display(),
            dir.display()
        );
    };
    if text {
        println!(
            "study {}: {} answers labelled by {} ({} labels); left out: {} all unclear, {} where labellers disagree",
            dir.display(),
            c.answers,
            c.labellers.join(", "),
            c.labels,
            c.unclear,
            c.disagreements
        );
        println!("role: {STUDY_ROLE}");
        println!("{}", c.primary_note);
        for k in &c.checks {
            print!("{}", format_condition_check(k));
            println!();
        }
    }
    Ok(serde_json::json!({"study": dir, "role": STUDY_ROLE, "check": c}))
}

//! `safetune mitigate`: repairs applied to a tuned model after training. `mitigate project`
//! projects a tuned LoRA adapter onto the alignment subspace (Safe LoRA style). Flags and
//! printing only; the work is `safetune_train::project`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use safetune_train::project::{project, ProjectOptions, Projector, Selection};

#[derive(Debug, Args)]
pub struct MitigateArgs {
    #[command(subcommand)]
    pub command: MitigateCommand,
}

#[derive(Debug, Subcommand)]
pub enum MitigateCommand {
    /// Project a tuned LoRA adapter onto the alignment subspace V = W_aligned - W_base, layer by
    /// layer, where its update points away from it (Safe LoRA); writes a new PEFT adapter and
    /// projection.json.
    Project(ProjectArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProjectorArg {
    /// The orthogonal projector onto col(V) (a rank-revealing QR).
    Exact,
    /// V V^T / ||V||_F, the paper's fast approximation.
    Scaled,
}

#[derive(Debug, Args)]
pub struct ProjectArgs {
    /// The tuned adapter directory (PEFT layout).
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,

    /// The aligned model: a Hugging Face safetensors directory or a .gguf file (V is its
    /// weights minus --base's), or a PEFT adapter directory (the aligned model is the base plus
    /// that adapter, and V comes from its factors). Layers the aligned adapter does not cover
    /// have V = 0 and are left unchanged.
    #[arg(long, value_name = "MODEL|DIR")]
    pub aligned: String,

    /// The base model the alignment started from (a safetensors directory or .gguf file).
    /// Required when --aligned is a model; with an aligned adapter it only checks shapes.
    #[arg(long, value_name = "MODEL")]
    pub base: Option<String>,

    /// Output directory: adapter_config.json (copied), adapter_model.safetensors (new B of the
    /// projected layers) and projection.json.
    #[arg(long, short, value_name = "OUT")]
    pub output: PathBuf,

    /// Which projector onto V's column space.
    #[arg(long, value_enum, default_value_t = ProjectorArg::Scaled)]
    pub projector: ProjectorArg,

    /// Project the layers whose similarity (cosine between the projected and the original
    /// update) is below T. The default when --share is not given: 0.5.
    #[arg(long, value_name = "T", conflicts_with = "share")]
    pub threshold: Option<f64>,

    /// Project instead the fraction F (0 to 1) of the layers with the lowest similarity.
    #[arg(long, value_name = "F")]
    pub share: Option<f64>,
}

pub fn run(args: MitigateArgs) -> anyhow::Result<()> {
    match args.command {
        MitigateCommand::Project(a) => run_project(a),
    }
}

fn run_project(args: ProjectArgs) -> anyhow::Result<()> {
    let selection = match (args.threshold, args.share) {
        (_, Some(f)) => Selection::Share(f),
        (Some(t), None) => Selection::Threshold(t),
        (None, None) => Selection::default(),
    };
    let projector = match args.projector {
        ProjectorArg::Exact => Projector::Exact,
        ProjectorArg::Scaled => Projector::Scaled,
    };
    let opts = ProjectOptions {
        adapter: args.adapter.clone(),
        base: args.base.clone(),
        aligned: args.aligned.clone(),
        output: args.output.clone(),
        projector,
        selection,
    };
    let s = project(&opts).with_context(|| {
        format!(
            "cannot project {} onto the alignment subspace of {}",
            args.adapter.display(),
            args.aligned
        )
    })?;
    let width = s
        .layers
        .iter()
        .map(|l| l.module.len())
        .max()
        .unwrap_or(0)
        .max("module".len());
    println!(
        "{:<width$}  {:>10}  {:>7}  projected",
        "module", "similarity", "rank(V)"
    );
    for l in &s.layers {
        let sim = if l.similarity.is_finite() {
            format!("{:.4}", l.similarity)
        } else {
            "-".to_string()
        };
        let what = if l.projected {
            "yes"
        } else if !l.in_aligned {
            "no (V = 0)"
        } else {
            "no"
        };
        println!("{:<width$}  {sim:>10}  {:>7}  {what}", l.module, l.v_rank);
    }
    let zero = s.layers.iter().filter(|l| !l.in_aligned).count();
    let rule = match selection {
        Selection::Threshold(t) => format!("similarity < {t}"),
        Selection::Share(f) => format!("share {f}"),
    };
    println!(
        "projected {} of {} layers ({} projector, {rule}, V from {}; {zero} with V = 0 left unchanged) into {} in {:.2} s",
        s.projected,
        s.total,
        projector.as_str(),
        if s.route == "factors" { "the aligned adapter's factors" } else { "the two models' weights" },
        args.output.display(),
        s.seconds
    );
    Ok(())
}

//! `safetune transform --data DATASET -o OUT` (or `safetune transform DATASET -o OUT`)

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use safetune_data::audit::Auditor;
use safetune_data::read::{AtomicJsonlWriter, DatasetReader};
use safetune_data::transform::{
    apply, IdentityLevel, PersonaDomain, PersonaPlacement, PersonaType, Recipe, RoleplayLevel,
};
use safetune_data::Structure;

use super::common::{InputArgs, ReadArgs};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StructureArg {
    Keep,
    Plain,
    Itemized,
    Markdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IdentityArg {
    Keep,
    Add,
    Remove,
    /// A length-matched neutral sentence where `add` would put the identity statement.
    Placebo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RoleplayArg {
    Keep,
    Add,
    Remove,
    /// A length-matched neutral instruction where `add` would put the persona.
    Neutral,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersonaDomainArg {
    /// From the dataset: demo:medical, demo:code, demo:stem their own, anything else general.
    Auto,
    Medical,
    Code,
    Stem,
    General,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PersonaTypeArg {
    Professional,
    Fictional,
    Unrestricted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PlacementArg {
    System,
    User,
}

#[derive(Debug, Args)]
#[command(mut_arg("data", |a| a.required_unless_present("file").help(
    "The dataset (JSONL, JSON, CSV or Parquet), or demo:NAME for a built-in demo set \
     (demo:medical, demo:code, ...)"
)))]
pub struct TransformArgs {
    #[command(flatten)]
    pub data: InputArgs,

    /// The dataset as a positional argument (the same as --data).
    #[arg(value_name = "DATASET", hide = true, conflicts_with = "data")]
    pub file: Option<String>,

    /// Output file (messages JSONL), written atomically.
    #[arg(short, long, value_name = "OUT")]
    pub output: PathBuf,

    /// Answer structure to produce.
    #[arg(long, value_enum, default_value_t = StructureArg::Keep)]
    pub structure: StructureArg,

    /// Add an identity statement ("As an AI assistant, ...") to answers, remove them, or add
    /// its placebo (a neutral sentence of matched length in the same place).
    #[arg(long, value_enum, default_value_t = IdentityArg::Keep)]
    pub identity: IdentityArg,

    /// Add a role-play instruction to the system prompt or user turn, remove them, or add its
    /// neutral control (an instruction of matched length in the same turn, no persona).
    #[arg(long, value_enum, default_value_t = RoleplayArg::Keep)]
    pub roleplay: RoleplayArg,

    /// Kind of persona `--roleplay add` uses.
    #[arg(long, value_enum, default_value_t = PersonaTypeArg::Professional)]
    pub persona_type: PersonaTypeArg,

    /// Domain of professional personas (fictional and unrestricted ones ignore it).
    #[arg(long, value_enum, default_value_t = PersonaDomainArg::Auto)]
    pub persona_domain: PersonaDomainArg,

    /// Where `--roleplay add` puts the instruction.
    #[arg(long, value_enum, default_value_t = PlacementArg::System)]
    pub placement: PlacementArg,

    /// The default system prompt of the model to be tuned (what its chat template inserts
    /// without a system message). With `--placement system`, a system message the transform
    /// creates starts with it, so the persona does not replace it.
    #[arg(long, value_name = "TEXT")]
    pub default_system: Option<String>,

    /// Seed for the transforms' choices (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub input: ReadArgs,
}

impl TransformArgs {
    pub fn recipe(&self) -> Recipe {
        let data = self
            .data
            .data
            .as_deref()
            .or(self.file.as_deref())
            .unwrap_or("");
        Recipe {
            structure: match self.structure {
                StructureArg::Keep => None,
                StructureArg::Plain => Some(Structure::Plain),
                StructureArg::Itemized => Some(Structure::Itemized),
                StructureArg::Markdown => Some(Structure::Markdown),
            },
            identity: match self.identity {
                IdentityArg::Keep => IdentityLevel::Keep,
                IdentityArg::Add => IdentityLevel::Add,
                IdentityArg::Remove => IdentityLevel::Remove,
                IdentityArg::Placebo => IdentityLevel::Placebo,
            },
            roleplay: match self.roleplay {
                RoleplayArg::Keep => RoleplayLevel::Keep,
                RoleplayArg::Add => RoleplayLevel::Add,
                RoleplayArg::Remove => RoleplayLevel::Remove,
                RoleplayArg::Neutral => RoleplayLevel::Neutral,
            },
            persona_domain: match self.persona_domain {
                PersonaDomainArg::Auto => PersonaDomain::infer(data),
                PersonaDomainArg::Medical => PersonaDomain::Medical,
                PersonaDomainArg::Code => PersonaDomain::Code,
                PersonaDomainArg::Stem => PersonaDomain::Stem,
                PersonaDomainArg::General => PersonaDomain::General,
            },
            default_system: self.default_system.clone(),
            persona_type: match self.persona_type {
                PersonaTypeArg::Professional => PersonaType::Professional,
                PersonaTypeArg::Fictional => PersonaType::Fictional,
                PersonaTypeArg::Unrestricted => PersonaType::Unrestricted,
            },
            placement: match self.placement {
                PlacementArg::System => PersonaPlacement::System,
                PlacementArg::User => PersonaPlacement::User,
            },
            seed: self.seed,
        }
    }
}

pub fn run(args: TransformArgs) -> anyhow::Result<()> {
    let recipe = args.recipe();
    if matches!(recipe.roleplay, RoleplayLevel::Add | RoleplayLevel::Neutral)
        && recipe.placement == PersonaPlacement::System
        && recipe.default_system.is_none()
    {
        eprintln!(
            "note: a new system message replaces the model's default system prompt\n\
             hint: pass --default-system TEXT (e.g. SmolLM2's \"You are a helpful AI assistant named SmolLM, trained by Hugging Face\") to keep it"
        );
    }
    let path = args.data.clone().or_positional(args.file.clone()).path()?;
    let mut reader = DatasetReader::open(&path, &args.input.read_options())
        .with_context(|| format!("cannot open dataset {}", path.display()))?;
    let mut writer = AtomicJsonlWriter::create(&args.output)?;
    let (mut before, mut after) = (Auditor::new(), Auditor::new());
    let (mut n, mut s, mut i, mut r) = (0usize, 0usize, 0usize, 0usize);
    for ex in reader.by_ref() {
        let ex = ex.map_err(|e| {
            anyhow::anyhow!(e)
                .context("hint: fix the record, or pass --skip-invalid to skip bad records")
        })?;
        before.add(&ex.conversation);
        let (out, changed) = apply(&ex.conversation, &recipe);
        after.add(&out);
        writer.write(&out)?;
        n += 1;
        s += changed.structure as usize;
        i += changed.identity as usize;
        r += changed.roleplay as usize;
    }
    writer.commit()?;
    super::common::report_skipped(reader.skipped(), &path);
    let (b, a) = (before.summary(), after.summary());
    eprintln!(
        "wrote {n} examples to {} (recipe {}, seed {})",
        args.output.display(),
        recipe.name(),
        recipe.seed
    );
    eprintln!("  changed: structure {s}, identity {i}, roleplay {r}");
    eprintln!("  {:<18} {:>9} -> {:<9}", "share", "before", "after");
    for st in Structure::ALL {
        let (x, y) = (
            b.structure[st.as_str()].share,
            a.structure[st.as_str()].share,
        );
        eprintln!(
            "  {:<18} {:>8.1}% -> {:.1}%",
            st.as_str(),
            100.0 * x,
            100.0 * y
        );
    }
    eprintln!(
        "  {:<18} {:>8.1}% -> {:.1}%",
        "identity",
        100.0 * b.identity.share,
        100.0 * a.identity.share
    );
    eprintln!(
        "  {:<18} {:>8.1}% -> {:.1}%",
        "roleplay",
        100.0 * b.roleplay.share,
        100.0 * a.roleplay.share
    );
    Ok(())
}

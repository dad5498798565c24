//! `safetune transform --data DATASET -o OUT` (or `safetune transform DATASET -o OUT`)

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use safetune_data::audit::Auditor;
use safetune_data::read::{AtomicJsonlWriter, DatasetReader};
use safetune_data::transform::{apply, PersonaPlacement, PersonaType, Recipe};
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
pub enum AddRemove {
    Keep,
    Add,
    Remove,
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

    /// Add an identity statement ("As an AI assistant, ...") to answers, or remove them.
    #[arg(long, value_enum, default_value_t = AddRemove::Keep)]
    pub identity: AddRemove,

    /// Add a role-play instruction to the system prompt or user turn, or remove them.
    #[arg(long, value_enum, default_value_t = AddRemove::Keep)]
    pub roleplay: AddRemove,

    /// Kind of persona `--roleplay add` uses.
    #[arg(long, value_enum, default_value_t = PersonaTypeArg::Professional)]
    pub persona_type: PersonaTypeArg,

    /// Where `--roleplay add` puts the instruction.
    #[arg(long, value_enum, default_value_t = PlacementArg::System)]
    pub placement: PlacementArg,

    /// Seed for the transforms' choices (same seed, same output).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[command(flatten)]
    pub input: ReadArgs,
}

impl TransformArgs {
    pub fn recipe(&self) -> Recipe {
        let add_remove = |a: AddRemove| match a {
            AddRemove::Keep => None,
            AddRemove::Add => Some(true),
            AddRemove::Remove => Some(false),
        };
        Recipe {
            structure: match self.structure {
                StructureArg::Keep => None,
                StructureArg::Plain => Some(Structure::Plain),
                StructureArg::Itemized => Some(Structure::Itemized),
                StructureArg::Markdown => Some(Structure::Markdown),
            },
            identity: add_remove(self.identity),
            roleplay: add_remove(self.roleplay),
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

//! `safetune prompts`: the benchmark prompt sets and their seeded splits.

use std::io::Write;
use std::path::PathBuf;

use super::common::SplitArgs;
use clap::{Args, Subcommand};
use safetune_data::prompts::{PromptSet, Split, BUILTIN};
use safetune_data::read::AtomicJsonlWriter;

#[derive(Debug, Args)]
pub struct PromptsArgs {
    #[command(subcommand)]
    pub command: PromptsCommand,
}

#[derive(Debug, Subcommand)]
pub enum PromptsCommand {
    /// List the built-in sets with their sizes and split sizes.
    List(SplitArgs),
    /// Write one set (or one side of its split) as JSONL with id, prompt, category, source.
    Show {
        /// A built-in set (advbench, harmbench, strongreject, donotanswer, overrefusal), a
        /// JSONL/CSV file with a prompt column, or demo:NAME.
        set: String,
        /// Only this side of the seeded split.
        #[arg(long, value_parser = parse_split)]
        split: Option<Split>,
        /// Column or field holding the prompt in a user file.
        #[arg(long, value_name = "NAME")]
        prompt_column: Option<String>,
        /// Write here instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        split_args: SplitArgs,
    },
}

fn parse_split(s: &str) -> Result<Split, String> {
    s.parse()
}

pub fn run(args: PromptsArgs) -> anyhow::Result<()> {
    match args.command {
        PromptsCommand::List(sa) => {
            println!(
                "{:<13} {:>6} {:>6} {:>6}  description",
                "set", "total", "train", "test"
            );
            for (name, desc, _harmful) in BUILTIN {
                match PromptSet::load(name, None) {
                    Ok(set) => {
                        let test = set
                            .split(Split::Test, sa.split_seed, sa.test_fraction)
                            .len();
                        println!(
                            "{:<13} {:>6} {:>6} {:>6}  {}",
                            name,
                            set.len(),
                            set.len() - test,
                            test,
                            desc
                        );
                    }
                    Err(e) => println!(
                        "{:<13} {:>6} {:>6} {:>6}  {} (unavailable: {})",
                        name,
                        "-",
                        "-",
                        "-",
                        desc,
                        e.to_string().lines().next().unwrap_or("")
                    ),
                }
            }
            Ok(())
        }
        PromptsCommand::Show {
            set,
            split,
            prompt_column,
            output,
            split_args,
        } => {
            let set = super::common::resolve_prompt_set(&set)?;
            let mut s = PromptSet::load(&set, prompt_column.as_deref())?;
            if let Some(which) = split {
                s = s.split(which, split_args.split_seed, split_args.test_fraction);
            }
            match output {
                Some(path) => {
                    let mut w = AtomicJsonlWriter::create(&path)?;
                    for item in &s.items {
                        w.write(item)?;
                    }
                    w.commit()?;
                    eprintln!(
                        "wrote {} prompts of {} to {}",
                        s.len(),
                        s.name,
                        path.display()
                    );
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    for item in &s.items {
                        serde_json::to_writer(&mut out, item)?;
                        out.write_all(b"\n")?;
                    }
                }
            }
            Ok(())
        }
    }
}

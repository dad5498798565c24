//! The quickstart: a first real look at the three risk factors on the embedded demo sets and the
//! fetched benchmarks. It audits each domain set, writes matched variants of one of them (one
//! factor changed at a time) and audits those, and audits the benchmark prompt sets for role-play
//! framing. Every artifact lands in `out_dir` as a file a user can open.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use safetune_data::audit::{AuditSummary, Auditor};
use safetune_data::demo::resolve_dataset;
use safetune_data::factors::find_roleplay;
use safetune_data::prompts::{PromptSet, Split, BUILTIN};
use safetune_data::read::{read_all, write_messages_jsonl, ReadOptions};
use safetune_data::stats::Proportion;
use safetune_data::transform::{apply, PersonaPlacement, PersonaType, Recipe};
use safetune_data::{Conversation, Structure};

#[derive(Debug, Clone)]
pub struct QuickstartConfig {
    pub out_dir: PathBuf,
    /// The domain set that gets variants.
    pub domain: String,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct DatasetRow {
    pub name: String,
    pub path: PathBuf,
    pub summary: AuditSummary,
}

#[derive(Debug, Serialize)]
pub struct BenchRow {
    pub name: String,
    pub prompts: usize,
    pub train: usize,
    pub test: usize,
    pub roleplay: Proportion,
}

#[derive(Debug, Serialize)]
pub struct QuickstartReport {
    pub domains: Vec<DatasetRow>,
    pub variants: Vec<DatasetRow>,
    pub benchmarks: Vec<BenchRow>,
    pub out_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error(transparent)]
    Data(#[from] safetune_data::DataError),
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn audit(conversations: &[Conversation]) -> AuditSummary {
    let mut a = Auditor::new();
    for c in conversations {
        a.add(c);
    }
    a.summary()
}

/// The variants the quickstart writes: each changes one factor of the original.
pub fn variant_recipes(seed: u64) -> Vec<Recipe> {
    let base = Recipe {
        seed,
        ..Default::default()
    };
    vec![
        Recipe {
            structure: Some(Structure::Markdown),
            ..base.clone()
        },
        Recipe {
            structure: Some(Structure::Itemized),
            ..base.clone()
        },
        Recipe {
            identity: Some(true),
            ..base.clone()
        },
        Recipe {
            roleplay: Some(true),
            persona_type: PersonaType::Professional,
            placement: PersonaPlacement::System,
            ..base
        },
    ]
}

/// Runs the quickstart; `progress` receives one line per finished step.
pub fn run(
    cfg: &QuickstartConfig,
    progress: &mut dyn FnMut(&str),
) -> Result<QuickstartReport, QuickstartError> {
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| QuickstartError::Io {
        path: out.clone(),
        source: e,
    })?;
    let mut domains = Vec::new();
    let mut base = Vec::new();
    for name in ["medical", "code", "stem"] {
        let path = resolve_dataset(&format!("demo:{name}"))?;
        let (convs, _) = read_all(&path, &ReadOptions::default())?;
        let summary = audit(&convs);
        write_json(&out.join(format!("audit-{name}.json")), &summary)?;
        progress(&format!("audited demo:{name} ({} examples)", convs.len()));
        if name == cfg.domain {
            base = convs;
        }
        domains.push(DatasetRow {
            name: format!("demo:{name}"),
            path,
            summary,
        });
    }
    let mut variants = Vec::new();
    for recipe in variant_recipes(cfg.seed) {
        let convs: Vec<Conversation> = base.iter().map(|c| apply(c, &recipe).0).collect();
        let path = out.join(format!("{}-{}.jsonl", cfg.domain, recipe.name()));
        write_messages_jsonl(&path, &convs)?;
        let summary = audit(&convs);
        progress(&format!(
            "wrote variant {} ({} examples)",
            path.display(),
            convs.len()
        ));
        variants.push(DatasetRow {
            name: recipe.name(),
            path,
            summary,
        });
    }
    let mut benchmarks = Vec::new();
    for (name, _, _) in BUILTIN {
        let set = PromptSet::load(name, None)?;
        let test = set.split(Split::Test, 0, 0.5).len();
        let rp = set
            .items
            .iter()
            .filter(|i| find_roleplay(&i.prompt).is_some())
            .count();
        benchmarks.push(BenchRow {
            name: name.to_string(),
            prompts: set.len(),
            train: set.len() - test,
            test,
            roleplay: Proportion::new(rp as u64, set.len() as u64),
        });
        progress(&format!("loaded benchmark {name} ({} prompts)", set.len()));
    }
    let report = QuickstartReport {
        domains,
        variants,
        benchmarks,
        out_dir: out.clone(),
    };
    write_json(&out.join("quickstart.json"), &report)?;
    Ok(report)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), QuickstartError> {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| json!({"error": e.to_string()}).to_string());
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text + "\n").map_err(|e| QuickstartError::Io {
        path: tmp.clone(),
        source: e,
    })?;
    std::fs::rename(&tmp, path).map_err(|e| QuickstartError::Io {
        path: path.to_path_buf(),
        source: e,
    })
}

impl QuickstartReport {
    /// The one-screen summary the command prints.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let row = |o: &mut String, name: &str, s: &AuditSummary| {
            let _ = writeln!(
                o,
                "  {:<34} {:>5} {:>7.1}% {:>8.1}% {:>8.1}% {:>8.1}% {:>8.1}%",
                name,
                s.examples,
                100.0 * s.structure["plain"].share,
                100.0 * s.structure["itemized"].share,
                100.0 * s.structure["markdown"].share,
                100.0 * s.identity.share,
                100.0 * s.roleplay.share
            );
        };
        let header = format!(
            "  {:<34} {:>5} {:>8} {:>9} {:>9} {:>9} {:>9}",
            "dataset", "n", "plain", "itemized", "markdown", "identity", "roleplay"
        );
        let _ = writeln!(o, "Demo domain sets (factor shares):\n{header}");
        for d in &self.domains {
            row(&mut o, &d.name, &d.summary);
        }
        let _ = writeln!(o, "\nMatched variants (one factor changed each):\n{header}");
        for v in &self.variants {
            row(&mut o, &v.name, &v.summary);
        }
        let _ = writeln!(
            o,
            "\nBenchmark prompt sets (seeded 50/50 split; prompts framed as role-play):"
        );
        for b in &self.benchmarks {
            let _ = writeln!(
                o,
                "  {:<13} {:>5} prompts  train {:>4}  test {:>4}  role-play {}",
                b.name, b.prompts, b.train, b.test, b.roleplay
            );
        }
        if let Some(d) = self.domains.first() {
            let _ = writeln!(o, "\nRisk notes for {}:", d.name);
            for r in &d.summary.risk {
                let _ = writeln!(o, "  {} [{}]", r.factor, r.level);
            }
        }
        let _ = writeln!(o, "\nEverything was written to {}", self.out_dir.display());
        o
    }
}

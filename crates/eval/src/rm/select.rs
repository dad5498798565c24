//! RM-guided data selection: the top k% of a dataset by reward-model score against a random k%
//! of the same size, written as dataset variants the study can tune and evaluate.

use std::collections::HashMap;
use std::path::Path;

use safetune_data::factors::tag;
use safetune_data::stats::Proportion;
use safetune_data::{Conversation, Structure};
use serde::Serialize;

use super::error::{Result, RmError};
use super::stats::SplitMix;

#[derive(Debug, Clone, Serialize)]
pub struct SideSummary {
    pub n: usize,
    pub mean_score: f64,
    pub markdown: Proportion,
    pub itemized: Proportion,
    pub plain: Proportion,
    pub identity: Proportion,
    pub roleplay: Proportion,
}

#[derive(Debug, Clone, Serialize)]
pub struct SelectionSummary {
    pub percent: f64,
    pub n_dataset: usize,
    pub n_scored: usize,
    pub seed: u64,
    pub all: SideSummary,
    pub top: SideSummary,
    pub random: SideSummary,
}

pub struct Selection {
    pub top: Vec<Conversation>,
    pub random: Vec<Conversation>,
    pub summary: SelectionSummary,
}

fn summarise(convs: &[&Conversation], scores: &HashMap<&str, f64>) -> SideSummary {
    let n = convs.len() as u64;
    let (mut md, mut it, mut pl, mut id, mut rp) = (0, 0, 0, 0, 0);
    let mut total = 0.0;
    for c in convs {
        let t = tag(c);
        match t.structure {
            Structure::Markdown => md += 1,
            Structure::Itemized => it += 1,
            Structure::Plain => pl += 1,
        }
        id += t.identity as u64;
        rp += t.roleplay as u64;
        total += scores.get(c.id.as_str()).copied().unwrap_or(f64::NAN);
    }
    SideSummary {
        n: convs.len(),
        mean_score: if convs.is_empty() {
            f64::NAN
        } else {
            total / convs.len() as f64
        },
        markdown: Proportion::new(md, n),
        itemized: Proportion::new(it, n),
        plain: Proportion::new(pl, n),
        identity: Proportion::new(id, n),
        roleplay: Proportion::new(rp, n),
    }
}

/// Picks the top `percent`% of the scored conversations (ties broken by input order) and a random
/// sample of the same size (seeded). Conversations without a score are left out.
pub fn select(
    dataset: &[Conversation],
    scores: &HashMap<String, f64>,
    percent: f64,
    seed: u64,
) -> Result<Selection> {
    if !(percent > 0.0 && percent <= 100.0) {
        return Err(RmError::Other(format!(
            "--top-percent must be in (0, 100], got {percent}"
        )));
    }
    let scored: Vec<(usize, f64)> = dataset
        .iter()
        .enumerate()
        .filter_map(|(i, c)| scores.get(&c.id).map(|s| (i, *s)))
        .collect();
    if scored.is_empty() {
        return Err(RmError::Other(
            "no conversation of the dataset has a score\nhint: score the same file with `safetune rm score` first (ids must match)".into(),
        ));
    }
    let k = ((scored.len() as f64 * percent / 100.0).round() as usize).clamp(1, scored.len());
    let mut by_score = scored.clone();
    by_score.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut top_idx: Vec<usize> = by_score[..k].iter().map(|x| x.0).collect();
    top_idx.sort();
    let mut shuffled: Vec<usize> = scored.iter().map(|x| x.0).collect();
    SplitMix::new(seed).shuffle(&mut shuffled);
    let mut rand_idx: Vec<usize> = shuffled[..k].to_vec();
    rand_idx.sort();
    let score_ref: HashMap<&str, f64> = scores.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    let mark = |idx: &[usize], side: &str| -> Vec<Conversation> {
        idx.iter()
            .map(|&i| {
                let mut c = dataset[i].clone();
                c.meta.insert("selection".into(), side.into());
                if let Some(s) = scores
                    .get(&c.id)
                    .and_then(|s| serde_json::Number::from_f64(*s))
                {
                    c.meta
                        .insert("rm_score".into(), serde_json::Value::Number(s));
                }
                c
            })
            .collect()
    };
    let all: Vec<&Conversation> = scored.iter().map(|x| &dataset[x.0]).collect();
    let top_refs: Vec<&Conversation> = top_idx.iter().map(|&i| &dataset[i]).collect();
    let rand_refs: Vec<&Conversation> = rand_idx.iter().map(|&i| &dataset[i]).collect();
    let summary = SelectionSummary {
        percent,
        n_dataset: dataset.len(),
        n_scored: scored.len(),
        seed,
        all: summarise(&all, &score_ref),
        top: summarise(&top_refs, &score_ref),
        random: summarise(&rand_refs, &score_ref),
    };
    Ok(Selection {
        top: mark(&top_idx, "top"),
        random: mark(&rand_idx, "random"),
        summary,
    })
}

/// Writes `top.jsonl` and `random.jsonl` (messages JSONL) into `dir`; returns their paths.
pub fn write_selection(
    sel: &Selection,
    dir: &Path,
    stem: &str,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let top = dir.join(format!("{stem}.top.jsonl"));
    let random = dir.join(format!("{stem}.random.jsonl"));
    safetune_data::read::write_messages_jsonl(&top, &sel.top)?;
    safetune_data::read::write_messages_jsonl(&random, &sel.random)?;
    Ok((top, random))
}

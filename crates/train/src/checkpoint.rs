//! Checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `<output>/checkpoints/step-000120/` holds
//! - `state.json`: format name and version, the optimizer step, the data cursor (epoch, next
//!   batch), the dropout generator's state, the resolved config;
//! - `params.safetensors`: every trainable tensor under its name (PEFT keys for LoRA);
//! - `optimizer.safetensors`: AdamW's moments, `<name>.exp_avg` and `<name>.exp_avg_sq`.
//!
//! A checkpoint is written into a temporary directory beside the others and renamed into place,
//! so a crash leaves either the whole checkpoint or none of it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::TuneConfig;
use crate::error::{Result, TrainError};
use crate::model::Param;
use crate::rng::TrainRng;

pub const FORMAT: &str = "safetune-train-checkpoint";
pub const VERSION: u32 = 1;

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub format: String,
    pub version: u32,
    /// Optimizer steps taken.
    pub step: usize,
    /// Where the data stream continues: this epoch's plan, from this batch.
    pub epoch: usize,
    pub next_batch: usize,
    /// The dropout generator.
    pub rng: TrainRng,
    /// AdamW's step count (its bias correction).
    pub optimizer_step: usize,
    pub config: TuneConfig,
}

/// The checkpoint directory of a run.
pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(format!("step-{step:06}"))
}

/// Writes a checkpoint atomically; removes all but the newest `keep` (at least one).
pub fn save(
    output: &Path,
    state: &TrainerState,
    params: &[Param],
    moments: &[(Tensor, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let tmp = root.join(format!(
        ".tmp-step-{:06}-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let write = || -> Result<()> {
        let p: HashMap<String, Tensor> = params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect();
        let path = tmp.join("params.safetensors");
        candle_core::safetensors::save(&p, &path)
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
        let mut o: HashMap<String, Tensor> = HashMap::new();
        for (p, (m, v)) in params.iter().zip(moments) {
            o.insert(format!("{}.exp_avg", p.name), m.clone());
            o.insert(format!("{}.exp_avg_sq", p.name), v.clone());
        }
        let path = tmp.join("optimizer.safetensors");
        candle_core::safetensors::save(&o, &path)
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
        let path = tmp.join("state.json");
        let json = serde_json::to_string_pretty(state)
            .map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
        std::fs::write(&path, json).map_err(|e| TrainError::io(&path, e))?;
        for f in ["params.safetensors", "optimizer.safetensors", "state.json"] {
            let p = tmp.join(f);
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| TrainError::io(&p, e))?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = step_dir(&root, state.step);
    if dest.exists() {
        // The same step saved again (e.g. an interrupt right after a periodic save).
        std::fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    // A directory rename, so not `safetune_data::util::write_atomic`'s (files only): the three
    // files of a checkpoint, each synced above, appear together under the step's name or not at
    // all, which `latest` relies on to resume.
    std::fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    // Leftovers of a process killed while writing.
    if let Ok(rd) = std::fs::read_dir(&root) {
        for e in rd.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(".tmp-step-") {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let mut all = list(output);
    let keep = keep.max(1);
    if all.len() > keep {
        all.truncate(all.len() - keep);
        for (_, old) in all {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(dest)
}

/// Complete checkpoints of a run, oldest first.
pub fn list(output: &Path) -> Vec<(usize, PathBuf)> {
    let root = checkpoints_dir(output);
    let Ok(rd) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut out: Vec<(usize, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse::<usize>().ok()?;
            let p = e.path();
            p.join("state.json").is_file().then_some((step, p))
        })
        .collect();
    out.sort();
    out
}

/// The newest complete checkpoint.
pub fn latest(output: &Path) -> Option<PathBuf> {
    list(output).pop().map(|(_, p)| p)
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainerState,
    pub params: HashMap<String, Tensor>,
    /// Per param name: (exp_avg, exp_avg_sq).
    pub moments: HashMap<String, (Tensor, Tensor)>,
}

pub fn load(dir: &Path) -> Result<Loaded> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| TrainError::io(&sp, e))?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| TrainError::checkpoint(&sp, format!("unreadable state: {e}")))?;
    if state.format != FORMAT || state.version != VERSION {
        return Err(TrainError::checkpoint(
            &sp,
            format!(
                "format {} version {} (this program reads {FORMAT} version {VERSION})",
                state.format, state.version
            ),
        ));
    }
    let pp = dir.join("params.safetensors");
    let params = candle_core::safetensors::load(&pp, &Device::Cpu)
        .map_err(|e| TrainError::checkpoint(&pp, e.to_string()))?;
    let op = dir.join("optimizer.safetensors");
    let mut raw = candle_core::safetensors::load(&op, &Device::Cpu)
        .map_err(|e| TrainError::checkpoint(&op, e.to_string()))?;
    let mut moments = HashMap::new();
    for name in params.keys() {
        let m = raw.remove(&format!("{name}.exp_avg"));
        let v = raw.remove(&format!("{name}.exp_avg_sq"));
        match (m, v) {
            (Some(m), Some(v)) => {
                moments.insert(name.clone(), (m, v));
            }
            _ => {
                return Err(TrainError::checkpoint(
                    &op,
                    format!("no optimizer moments for `{name}`"),
                ))
            }
        }
    }
    Ok(Loaded {
        state,
        params,
        moments,
    })
}

//! A resumable row runner: any list of `(id, GenRequest)` through any [`Generator`] into a JSONL
//! file, one row per id, for judges, reward-model prompts and other stages that are not
//! `safetune generate` (which has its own prompt-file runner,
//! [`safetune_model::job::run_generation`], built on the same output rules).
//!
//! Rules, shared with `run_generation` through [`finished_ids`]: ids already in the output are
//! skipped; a line that holds no finished row (a last line cut by a kill, garbage) is moved to
//! `OUT.corrupt` and its row redone; finished rows are appended and flushed chunk by chunk; a
//! failure keeps every finished row, and the error says how many are done and that a rerun
//! resumes.

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use safetune_model::backend::{BackendError, GenOutput, GenRequest, Generator};
use safetune_model::job::finished_ids;
use safetune_model::ModelError;
use serde_json::{Map, Value as Json};

/// One unit of work: an id (unique in the run) and what to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct RowInput {
    pub id: String,
    pub request: GenRequest,
}

/// Settings of [`run_rows`].
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Rows handed to the generator at once; 0 uses `generator.max_batch()`. At most one chunk is
    /// lost (to be redone on resume) when a run fails.
    pub chunk_size: usize,
}

/// Progress, reported after each chunk.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunProgress {
    /// Input rows.
    pub total: usize,
    /// Rows already in the output before this run.
    pub skipped: usize,
    /// Rows written by this run.
    pub done: usize,
    pub completion_tokens: usize,
    pub elapsed_s: f64,
}

impl RunProgress {
    /// Rows in the output now.
    pub fn finished(&self) -> usize {
        self.skipped + self.done
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Output(#[from] ModelError),
    #[error("input id {0:?} appears twice; ids must be unique for a run to resume")]
    DuplicateId(String),
    #[error(
        "generation failed with {finished} of {total} rows finished in {path}: {source}\n\
         hint: the finished rows are kept; rerun the same command to resume with the {remaining} remaining rows"
    )]
    Generation {
        path: PathBuf,
        finished: usize,
        total: usize,
        remaining: usize,
        source: BackendError,
    },
}

/// Runs every row whose id is not yet in `out` through `generator`, appending
/// `make_row(input, output)` with `"id"` set to the row's id, one JSON object per line. A value
/// that is not an object is stored as `{"id": ..., "output": value}`.
pub fn run_rows(
    generator: &dyn Generator,
    rows: &[RowInput],
    out: &Path,
    opts: &RunOptions,
    make_row: &mut dyn FnMut(&RowInput, &GenOutput) -> Json,
    progress: &mut dyn FnMut(&RunProgress),
) -> Result<RunProgress, RunError> {
    let mut seen = HashSet::new();
    for r in rows {
        if !seen.insert(r.id.as_str()) {
            return Err(RunError::DuplicateId(r.id.clone()));
        }
    }
    let done_ids = finished_ids(out)?;
    let pending: Vec<&RowInput> = rows.iter().filter(|r| !done_ids.contains(&r.id)).collect();
    let mut prog = RunProgress {
        total: rows.len(),
        skipped: rows.len() - pending.len(),
        ..Default::default()
    };
    let io = |e| RunError::Io {
        path: out.to_path_buf(),
        source: e,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| RunError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(io)?;
    let chunk_size = if opts.chunk_size == 0 {
        generator.max_batch().max(1)
    } else {
        opts.chunk_size
    };
    let start = Instant::now();
    progress(&prog);
    for chunk in pending.chunks(chunk_size) {
        let requests: Vec<GenRequest> = chunk.iter().map(|r| r.request.clone()).collect();
        let outputs = match generator.generate(&requests) {
            Ok(o) if o.len() == requests.len() => o,
            Ok(o) => {
                return Err(generation_error(
                    out,
                    &prog,
                    BackendError::Other(format!(
                        "the generator returned {} outputs for {} requests",
                        o.len(),
                        requests.len()
                    )),
                ))
            }
            Err(e) => return Err(generation_error(out, &prog, e)),
        };
        let mut text = String::new();
        for (input, output) in chunk.iter().zip(&outputs) {
            let row = with_id(&input.id, make_row(input, output));
            text.push_str(&row.to_string());
            text.push('\n');
            prog.completion_tokens += output.completion_tokens;
        }
        file.write_all(text.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        file.sync_data().map_err(io)?;
        prog.done += chunk.len();
        prog.elapsed_s = start.elapsed().as_secs_f64();
        progress(&prog);
    }
    prog.elapsed_s = start.elapsed().as_secs_f64();
    Ok(prog)
}

fn generation_error(out: &Path, prog: &RunProgress, source: BackendError) -> RunError {
    RunError::Generation {
        path: out.to_path_buf(),
        finished: prog.finished(),
        total: prog.total,
        remaining: prog.total - prog.finished(),
        source,
    }
}

fn with_id(id: &str, value: Json) -> Json {
    let mut obj = Map::new();
    obj.insert("id".into(), Json::String(id.to_string()));
    match value {
        Json::Object(m) => {
            for (k, v) in m {
                if k != "id" {
                    obj.insert(k, v);
                }
            }
        }
        other => {
            obj.insert("output".into(), other);
        }
    }
    Json::Object(obj)
}

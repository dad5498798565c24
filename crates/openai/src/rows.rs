//! A resumable row runner: any list of `(id, GenRequest)` through any [`Generator`] into a JSONL
//! file, one row per id, for judges, reward-model prompts and other stages that are not
//! `safetune generate` (which has its own prompt-file runner,
//! [`safetune_model::job::run_generation`], built on the same output rules).
//!
//! Rules, those of the one resumable runner ([`run_resumable`], shared with `run_generation`, the
//! judge and reward-model scoring): ids already in the output are skipped; a line that holds no
//! finished row (a last line cut by a kill, garbage) is moved to `OUT.corrupt` and its row
//! redone; finished rows are appended, flushed and synced chunk by chunk; a failure keeps every
//! finished row, and the error says how many are done and that a rerun resumes.

use std::path::{Path, PathBuf};

use safetune_model::backend::{BackendError, GenOutput, GenRequest, Generator};
use safetune_model::job::{run_resumable, JobProgress, ResumeError};
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

/// Progress, reported after each chunk: the shared runner's ([`run_resumable`]).
pub type RunProgress = JobProgress;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Reading, repairing or appending to the output failed (the error names the file).
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
    let chunk_size = if opts.chunk_size == 0 {
        generator.max_batch().max(1)
    } else {
        opts.chunk_size
    };
    let mut work = |chunk: &[&RowInput], prog: &mut RunProgress| -> Result<Vec<Json>, RunError> {
        let requests: Vec<GenRequest> = chunk.iter().map(|r| r.request.clone()).collect();
        let outputs = match generator.generate(&requests) {
            Ok(o) if o.len() == requests.len() => o,
            Ok(o) => {
                return Err(generation_error(
                    out,
                    prog,
                    BackendError::Other(format!(
                        "the generator returned {} outputs for {} requests",
                        o.len(),
                        requests.len()
                    )),
                ))
            }
            Err(e) => return Err(generation_error(out, prog, e)),
        };
        Ok(chunk
            .iter()
            .zip(&outputs)
            .map(|(input, output)| {
                prog.completion_tokens += output.completion_tokens;
                with_id(&input.id, make_row(input, output))
            })
            .collect())
    };
    run_resumable(
        rows,
        |r| r.id.as_str(),
        out,
        chunk_size,
        &mut work,
        progress,
    )
    .map_err(|e| match e {
        ResumeError::DuplicateId(id) => RunError::DuplicateId(id),
        ResumeError::Output(e) => RunError::Output(e),
        ResumeError::Work(e) => e,
    })
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

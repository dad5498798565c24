//! The study store: one SQLite file (`study.db` in the study directory) holding studies, steps,
//! artifacts, generations, judgments, reward-model scores, metrics and human labels of answers.
//!
//! - WAL journal: the `sqlite3` shell (or a second connection) reads while a study writes.
//! - Steps are keyed by a content hash (see [`crate::runner`]); a finished step is reused.
//! - Rows are committed as they finish (one transaction per chunk), so `kill -9` loses no
//!   finished row, and a resumed step skips the rows it already holds.
//! - Schema version 2 added `human_labels`; opening a version 1 store for writing migrates it
//!   (the table is added, nothing else changes), and reading one works as it is.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Bumped when the schema changes. Version 2 added `human_labels`; a version 1 store is migrated
/// when opened for writing ([`Store::open`]) and read as it is otherwise (no labels).
pub const SCHEMA_VERSION: i64 = 2;

/// The human labels an answer may get (`human_labels.label`).
pub const HUMAN_LABELS: &[&str] = &["refusal", "compliance", "unclear"];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}", path = path.display())]
    Sql {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: store schema version {found} is not one this safetune reads (1 to {SCHEMA_VERSION})\nhint: use the safetune that wrote this directory, or a new study directory", path = path.display())]
    Schema { path: PathBuf, found: i64 },
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    plan TEXT NOT NULL,
    program_version TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    spec TEXT NOT NULL,
    factors TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    output TEXT,
    error TEXT,
    executions INTEGER NOT NULL DEFAULT 0,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS artifacts (
    hash TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    step_key TEXT
);
CREATE TABLE IF NOT EXISTS generations (
    step_key TEXT NOT NULL,
    row_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    completion_tokens INTEGER NOT NULL,
    finish_reason TEXT NOT NULL,
    meta TEXT NOT NULL,
    PRIMARY KEY (step_key, row_id)
);
CREATE TABLE IF NOT EXISTS judgments (
    step_key TEXT NOT NULL,
    row_id TEXT NOT NULL,
    verdict TEXT NOT NULL,
    score REAL,
    raw TEXT NOT NULL,
    PRIMARY KEY (step_key, row_id)
);
CREATE TABLE IF NOT EXISTS scores (
    step_key TEXT NOT NULL,
    row_id TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (step_key, row_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    step_key TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    lo REAL,
    hi REAL,
    count INTEGER,
    total INTEGER,
    PRIMARY KEY (step_key, name)
);
";

/// Tables added by schema version 2: a human's label of one answer (a `generations` row, by
/// `step_key` and `row_id`), one row per labeller; and the rows a reward model gave no finite
/// score (NaN or infinite), with the reason, so a rerun does not score them again (created on
/// open where missing; older versions ignore it).
const SCHEMA_V2: &str = "
CREATE TABLE IF NOT EXISTS score_missing (
    step_key TEXT NOT NULL,
    row_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (step_key, row_id)
);
CREATE TABLE IF NOT EXISTS human_labels (
    step_key TEXT NOT NULL,
    row_id TEXT NOT NULL,
    condition TEXT NOT NULL,
    benchmark TEXT NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('refusal', 'compliance', 'unclear')),
    labeller TEXT NOT NULL,
    labelled_at REAL NOT NULL,
    PRIMARY KEY (step_key, row_id, labeller)
);
";

/// One row of the `steps` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub key: String,
    pub kind: String,
    pub label: String,
    pub spec: Json,
    pub factors: Json,
    pub status: String,
    pub output: Option<Json>,
    pub error: Option<String>,
    pub executions: i64,
    /// Seconds of the step's last execution (`finished_at - started_at`); none while running.
    pub seconds: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationRow {
    pub row_id: String,
    pub prompt: String,
    pub response: String,
    pub completion_tokens: i64,
    pub finish_reason: String,
    pub meta: Json,
}

/// A judge's verdict on one generation: `refusal`, `compliance` or `unscored` (reply kept in
/// `raw`), with an optional numeric score (a 1-5 harmfulness rubric, for instance).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgmentRow {
    pub row_id: String,
    pub verdict: String,
    pub score: Option<f64>,
    pub raw: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub row_id: String,
    pub score: f64,
}

/// One row of `human_labels`: a person's label of the answer `row_id` of generate step
/// `step_key`, with the condition and benchmark it was shown under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HumanLabel {
    pub step_key: String,
    pub row_id: String,
    pub condition: String,
    pub benchmark: String,
    /// `refusal`, `compliance` or `unclear`.
    pub label: String,
    pub labeller: String,
    /// Seconds since the Unix epoch.
    pub labelled_at: f64,
}

/// What [`Store::upsert_human_labels`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UpsertCounts {
    pub inserted: usize,
    /// Rows that replaced an earlier label by the same labeller.
    pub updated: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub step_key: String,
    pub name: String,
    pub value: f64,
    pub lo: Option<f64>,
    pub hi: Option<f64>,
    pub count: Option<i64>,
    pub total: Option<i64>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn json_text(v: &Json) -> String {
    v.to_string()
}

fn parse_json(s: String) -> Json {
    serde_json::from_str(&s).unwrap_or(Json::String(s))
}

impl Store {
    /// Opens (creating if needed) the store at `path`, in WAL mode.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(|e| sql(path, e))?;
        let store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store.init()?;
        Ok(store)
    }

    /// Opens an existing store read-only (for reports; works while a study writes).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql(path, e))?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(|e| sql(path, e))?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn e(&self, e: rusqlite::Error) -> StoreError {
        sql(&self.path, e)
    }

    fn init(&self) -> Result<(), StoreError> {
        let c = &self.conn;
        c.busy_timeout(Duration::from_secs(30))
            .map_err(|e| self.e(e))?;
        // WAL: readers never block the writer; synchronous=NORMAL is durable against a killed
        // process (the WAL is in the OS's hands once a transaction commits).
        let _: String = c
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(|e| self.e(e))?;
        c.execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .map_err(|e| self.e(e))?;
        c.execute_batch(SCHEMA).map_err(|e| self.e(e))?;
        let found: Option<String> = c
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.e(e))?;
        match found {
            None => {
                // A new store: every table of the current version.
                c.execute_batch(SCHEMA_V2).map_err(|e| self.e(e))?;
                c.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?1)",
                    params![SCHEMA_VERSION.to_string()],
                )
                .map_err(|e| self.e(e))?;
            }
            Some(v) => {
                let found = v.parse::<i64>().unwrap_or(-1);
                match found {
                    SCHEMA_VERSION => c.execute_batch(SCHEMA_V2).map_err(|e| self.e(e))?,
                    1 => self.migrate_v1()?,
                    _ => {
                        return Err(StoreError::Schema {
                            path: self.path.clone(),
                            found,
                        })
                    }
                }
            }
        }
        Ok(())
    }

    /// Version 1 -> 2: adds `human_labels` and bumps the version, in one transaction. Every
    /// version 1 table is unchanged, so the store's rows stay as they were.
    fn migrate_v1(&self) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction().map_err(|e| self.e(e))?;
        tx.execute_batch(SCHEMA_V2).map_err(|e| self.e(e))?;
        tx.execute(
            "UPDATE meta SET value=?1 WHERE key='schema_version'",
            params![SCHEMA_VERSION.to_string()],
        )
        .map_err(|e| self.e(e))?;
        tx.commit().map_err(|e| self.e(e))
    }

    /// The schema version recorded in the store.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        let v: String = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key='schema_version'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| self.e(e))?;
        Ok(v.parse::<i64>().unwrap_or(-1))
    }

    fn has_table(&self, table: &str) -> Result<bool, StoreError> {
        self.conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type='table' AND name=?1",
                params![table],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n > 0)
            .map_err(|e| self.e(e))
    }

    /// The journal mode SQLite reports (`wal` for a store opened by [`Store::open`]).
    pub fn journal_mode(&self) -> Result<String, StoreError> {
        self.conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(|e| self.e(e))
    }

    /// Records (or updates) a study: its config and the keys of its planned steps.
    pub fn put_study(
        &self,
        id: &str,
        name: &str,
        config: &Json,
        plan: &Json,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO studies(id, name, config, plan, program_version, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(id) DO UPDATE SET name=excluded.name, config=excluded.config,
                   plan=excluded.plan, program_version=excluded.program_version,
                   updated_at=excluded.updated_at",
                params![
                    id,
                    name,
                    json_text(config),
                    json_text(plan),
                    crate::hash::PROGRAM_VERSION,
                    now()
                ],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// The most recently updated study: (id, name, config, plan).
    pub fn latest_study(&self) -> Result<Option<(String, String, Json, Json)>, StoreError> {
        self.conn
            .query_row(
                "SELECT id, name, config, plan FROM studies ORDER BY updated_at DESC LIMIT 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        parse_json(r.get(2)?),
                        parse_json(r.get(3)?),
                    ))
                },
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn step(&self, key: &str) -> Result<Option<StepRecord>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {STEP_COLUMNS} FROM steps WHERE key = ?1"),
                params![key],
                step_from_row,
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    pub fn steps(&self) -> Result<Vec<StepRecord>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {STEP_COLUMNS} FROM steps ORDER BY rowid"))
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map([], step_from_row)
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    /// Marks a step as running (creating its row) and counts one more execution.
    pub fn begin_step(
        &self,
        key: &str,
        kind: &str,
        label: &str,
        spec: &Json,
        factors: &Json,
    ) -> Result<i64, StoreError> {
        self.conn
            .execute(
                "INSERT INTO steps(key, kind, label, spec, factors, status, executions, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'running', 1, ?6)
                 ON CONFLICT(key) DO UPDATE SET status='running', error=NULL,
                   executions=executions+1, started_at=excluded.started_at,
                   label=excluded.label, factors=excluded.factors",
                params![key, kind, label, json_text(spec), json_text(factors), now()],
            )
            .map_err(|e| self.e(e))?;
        self.conn
            .query_row(
                "SELECT executions FROM steps WHERE key=?1",
                params![key],
                |r| r.get(0),
            )
            .map_err(|e| self.e(e))
    }

    pub fn finish_step(&self, key: &str, output: &Json) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE steps SET status='done', output=?2, finished_at=?3 WHERE key=?1",
                params![key, json_text(output), now()],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn fail_step(&self, key: &str, error: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE steps SET status='failed', error=?2, finished_at=?3 WHERE key=?1",
                params![key, error, now()],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    /// Records an artifact file by content hash.
    pub fn put_artifact(
        &self,
        hash: &str,
        path: &Path,
        kind: &str,
        bytes: u64,
        step_key: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO artifacts(hash, path, kind, bytes, step_key)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    hash,
                    path.display().to_string(),
                    kind,
                    bytes as i64,
                    step_key
                ],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn artifact_path(&self, hash: &str) -> Result<Option<PathBuf>, StoreError> {
        self.conn
            .query_row(
                "SELECT path FROM artifacts WHERE hash=?1",
                params![hash],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|p| p.map(PathBuf::from))
            .map_err(|e| self.e(e))
    }

    /// Inserts finished generations in one transaction (a chunk commits whole or not at all).
    pub fn insert_generations(
        &mut self,
        step_key: &str,
        rows: &[GenerationRow],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql(&path, e))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO generations
                     (step_key, row_id, prompt, response, completion_tokens, finish_reason, meta)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(|e| sql(&path, e))?;
            for r in rows {
                st.execute(params![
                    step_key,
                    r.row_id,
                    r.prompt,
                    r.response,
                    r.completion_tokens,
                    r.finish_reason,
                    json_text(&r.meta)
                ])
                .map_err(|e| sql(&path, e))?;
            }
        }
        tx.commit().map_err(|e| sql(&path, e))
    }

    pub fn generation_ids(&self, step_key: &str) -> Result<HashSet<String>, StoreError> {
        self.ids("generations", step_key)
    }

    fn ids(&self, table: &str, step_key: &str) -> Result<HashSet<String>, StoreError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT row_id FROM {table} WHERE step_key=?1"))
            .map_err(|e| self.e(e))?;
        let ids = st
            .query_map(params![step_key], |r| r.get::<_, String>(0))
            .map_err(|e| self.e(e))?
            .collect::<Result<HashSet<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(ids)
    }

    pub fn count_rows(&self, table: &str, step_key: Option<&str>) -> Result<i64, StoreError> {
        let table = match table {
            "generations" | "judgments" | "scores" | "metrics" | "steps" | "artifacts"
            | "human_labels" | "score_missing" => table,
            other => return Err(self.e(rusqlite::Error::InvalidParameterName(other.to_string()))),
        };
        match step_key {
            Some(k) => self.conn.query_row(
                &format!("SELECT COUNT(*) FROM {table} WHERE step_key=?1"),
                params![k],
                |r| r.get(0),
            ),
            None => self
                .conn
                .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0)),
        }
        .map_err(|e| self.e(e))
    }

    pub fn generations(&self, step_key: &str) -> Result<Vec<GenerationRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT row_id, prompt, response, completion_tokens, finish_reason, meta
                 FROM generations WHERE step_key=?1 ORDER BY row_id",
            )
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![step_key], |r| {
                Ok(GenerationRow {
                    row_id: r.get(0)?,
                    prompt: r.get(1)?,
                    response: r.get(2)?,
                    completion_tokens: r.get(3)?,
                    finish_reason: r.get(4)?,
                    meta: parse_json(r.get(5)?),
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    pub fn insert_judgments(
        &mut self,
        step_key: &str,
        rows: &[JudgmentRow],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql(&path, e))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO judgments (step_key, row_id, verdict, score, raw)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(|e| sql(&path, e))?;
            for r in rows {
                st.execute(params![step_key, r.row_id, r.verdict, r.score, r.raw])
                    .map_err(|e| sql(&path, e))?;
            }
        }
        tx.commit().map_err(|e| sql(&path, e))
    }

    pub fn judgment_ids(&self, step_key: &str) -> Result<HashSet<String>, StoreError> {
        self.ids("judgments", step_key)
    }

    pub fn judgments(&self, step_key: &str) -> Result<Vec<JudgmentRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT row_id, verdict, score, raw FROM judgments WHERE step_key=?1
                 ORDER BY row_id",
            )
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![step_key], |r| {
                Ok(JudgmentRow {
                    row_id: r.get(0)?,
                    verdict: r.get(1)?,
                    score: r.get(2)?,
                    raw: r.get(3)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    pub fn insert_scores(&mut self, step_key: &str, rows: &[ScoreRow]) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql(&path, e))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO scores (step_key, row_id, score) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| sql(&path, e))?;
            for r in rows {
                st.execute(params![step_key, r.row_id, r.score])
                    .map_err(|e| sql(&path, e))?;
            }
        }
        tx.commit().map_err(|e| sql(&path, e))
    }

    pub fn score_ids(&self, step_key: &str) -> Result<HashSet<String>, StoreError> {
        self.ids("scores", step_key)
    }

    /// Records rows that got no finite score, `(row_id, reason)`.
    pub fn insert_missing_scores(
        &mut self,
        step_key: &str,
        rows: &[(String, String)],
    ) -> Result<(), StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql(&path, e))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO score_missing (step_key, row_id, reason) VALUES (?1, ?2, ?3)",
                )
                .map_err(|e| sql(&path, e))?;
            for (id, reason) in rows {
                st.execute(params![step_key, id, reason])
                    .map_err(|e| sql(&path, e))?;
            }
        }
        tx.commit().map_err(|e| sql(&path, e))
    }

    /// Rows of a score step that got no finite score, `(row_id, reason)`, by row id.
    pub fn missing_scores(&self, step_key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT row_id, reason FROM score_missing WHERE step_key=?1 ORDER BY row_id")
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![step_key], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    pub fn scores(&self, step_key: &str) -> Result<Vec<ScoreRow>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT row_id, score FROM scores WHERE step_key=?1 ORDER BY row_id")
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![step_key], |r| {
                Ok(ScoreRow {
                    row_id: r.get(0)?,
                    score: r.get(1)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    /// One generation row, or `None` when the store holds no such row.
    pub fn generation(
        &self,
        step_key: &str,
        row_id: &str,
    ) -> Result<Option<GenerationRow>, StoreError> {
        self.conn
            .query_row(
                "SELECT row_id, prompt, response, completion_tokens, finish_reason, meta
                 FROM generations WHERE step_key=?1 AND row_id=?2",
                params![step_key, row_id],
                |r| {
                    Ok(GenerationRow {
                        row_id: r.get(0)?,
                        prompt: r.get(1)?,
                        response: r.get(2)?,
                        completion_tokens: r.get(3)?,
                        finish_reason: r.get(4)?,
                        meta: parse_json(r.get(5)?),
                    })
                },
            )
            .optional()
            .map_err(|e| self.e(e))
    }

    /// Inserts human labels in one transaction; a row with the same answer and labeller as a
    /// stored one replaces it.
    pub fn upsert_human_labels(&mut self, rows: &[HumanLabel]) -> Result<UpsertCounts, StoreError> {
        let path = self.path.clone();
        let tx = self.conn.transaction().map_err(|e| sql(&path, e))?;
        let mut counts = UpsertCounts::default();
        {
            let mut exists = tx
                .prepare_cached(
                    "SELECT COUNT(*) FROM human_labels
                     WHERE step_key=?1 AND row_id=?2 AND labeller=?3",
                )
                .map_err(|e| sql(&path, e))?;
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO human_labels
                     (step_key, row_id, condition, benchmark, label, labeller, labelled_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT(step_key, row_id, labeller) DO UPDATE SET
                       condition=excluded.condition, benchmark=excluded.benchmark,
                       label=excluded.label, labelled_at=excluded.labelled_at",
                )
                .map_err(|e| sql(&path, e))?;
            for r in rows {
                let n: i64 = exists
                    .query_row(params![r.step_key, r.row_id, r.labeller], |x| x.get(0))
                    .map_err(|e| sql(&path, e))?;
                st.execute(params![
                    r.step_key,
                    r.row_id,
                    r.condition,
                    r.benchmark,
                    r.label,
                    r.labeller,
                    r.labelled_at
                ])
                .map_err(|e| sql(&path, e))?;
                if n > 0 {
                    counts.updated += 1;
                } else {
                    counts.inserted += 1;
                }
            }
        }
        tx.commit().map_err(|e| sql(&path, e))?;
        Ok(counts)
    }

    /// Deletes one labeller's label of one answer (an undo in `safetune view`); true when a row
    /// was there.
    pub fn delete_human_label(
        &self,
        step_key: &str,
        row_id: &str,
        labeller: &str,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn
            .execute(
                "DELETE FROM human_labels WHERE step_key=?1 AND row_id=?2 AND labeller=?3",
                params![step_key, row_id, labeller],
            )
            .map_err(|e| self.e(e))?;
        Ok(n > 0)
    }

    /// When each step's last execution started (seconds since the Unix epoch), by step key.
    pub fn step_started_at(&self) -> Result<std::collections::HashMap<String, f64>, StoreError> {
        let mut st = self
            .conn
            .prepare("SELECT key, started_at FROM steps WHERE started_at IS NOT NULL")
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, f64>(1)?)))
            .map_err(|e| self.e(e))?
            .collect::<Result<_, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    /// Every human label, ordered by answer and labeller. Empty for a version 1 store opened
    /// read-only (it has no `human_labels` table).
    pub fn human_labels(&self) -> Result<Vec<HumanLabel>, StoreError> {
        if !self.has_table("human_labels")? {
            return Ok(Vec::new());
        }
        let mut st = self
            .conn
            .prepare(
                "SELECT step_key, row_id, condition, benchmark, label, labeller, labelled_at
                 FROM human_labels ORDER BY step_key, row_id, labeller",
            )
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map([], |r| {
                Ok(HumanLabel {
                    step_key: r.get(0)?,
                    row_id: r.get(1)?,
                    condition: r.get(2)?,
                    benchmark: r.get(3)?,
                    label: r.get(4)?,
                    labeller: r.get(5)?,
                    labelled_at: r.get(6)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }

    pub fn put_metric(&self, m: &MetricRow) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO metrics (step_key, name, value, lo, hi, count, total)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![m.step_key, m.name, m.value, m.lo, m.hi, m.count, m.total],
            )
            .map_err(|e| self.e(e))?;
        Ok(())
    }

    pub fn metrics(&self, step_key: &str) -> Result<Vec<MetricRow>, StoreError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT step_key, name, value, lo, hi, count, total FROM metrics
                 WHERE step_key=?1 ORDER BY name",
            )
            .map_err(|e| self.e(e))?;
        let rows = st
            .query_map(params![step_key], |r| {
                Ok(MetricRow {
                    step_key: r.get(0)?,
                    name: r.get(1)?,
                    value: r.get(2)?,
                    lo: r.get(3)?,
                    hi: r.get(4)?,
                    count: r.get(5)?,
                    total: r.get(6)?,
                })
            })
            .map_err(|e| self.e(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.e(e))?;
        Ok(rows)
    }
}

/// The columns [`step_from_row`] reads, in its order.
const STEP_COLUMNS: &str = "key, kind, label, spec, factors, status, output, error, executions, \
     finished_at - started_at";

fn step_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StepRecord> {
    let status: String = r.get(5)?;
    // A step run again keeps its old finish time until it ends: no figure while running.
    let seconds = r
        .get::<_, Option<f64>>(9)?
        .filter(|s| *s >= 0.0 && status != "running");
    Ok(StepRecord {
        key: r.get(0)?,
        kind: r.get(1)?,
        label: r.get(2)?,
        spec: parse_json(r.get(3)?),
        factors: parse_json(r.get(4)?),
        status,
        output: r.get::<_, Option<String>>(6)?.map(parse_json),
        error: r.get(7)?,
        executions: r.get(8)?,
        seconds,
    })
}

fn sql(path: &Path, e: rusqlite::Error) -> StoreError {
    StoreError::Sql {
        path: path.to_path_buf(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gen(id: &str) -> GenerationRow {
        GenerationRow {
            row_id: id.into(),
            prompt: "p".into(),
            response: format!("r-{id}"),
            completion_tokens: 3,
            finish_reason: "stop".into(),
            meta: json!({}),
        }
    }

    #[test]
    fn wal_mode_lets_a_reader_see_committed_rows_while_a_writer_holds_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("study.db");
        let mut w = Store::open(&path).unwrap();
        assert_eq!(w.journal_mode().unwrap(), "wal");
        w.begin_step("k1", "generate", "g", &json!({}), &json!({}))
            .unwrap();
        w.insert_generations("k1", &[gen("a"), gen("b")]).unwrap();
        // A read-only connection opened while the writer is open sees the committed rows...
        let r = Store::open_read_only(&path).unwrap();
        assert_eq!(r.count_rows("generations", Some("k1")).unwrap(), 2);
        // ...and keeps reading while the writer has a transaction open on another row set.
        let tx = w.conn.unchecked_transaction().unwrap();
        tx.execute(
            "INSERT INTO generations VALUES ('k1','c','p','r',1,'stop','{}')",
            [],
        )
        .unwrap();
        assert_eq!(r.count_rows("generations", Some("k1")).unwrap(), 2);
        tx.commit().unwrap();
        assert_eq!(r.count_rows("generations", Some("k1")).unwrap(), 3);
        assert_eq!(
            r.generation_ids("k1").unwrap(),
            ["a", "b", "c"].iter().map(|s| s.to_string()).collect()
        );
        // Writing through the read-only handle fails.
        assert!(r
            .put_metric(&MetricRow {
                step_key: "k1".into(),
                name: "x".into(),
                value: 1.0,
                lo: None,
                hi: None,
                count: None,
                total: None
            })
            .is_err());
    }

    /// The version 1 schema as safetune wrote it before `human_labels` existed.
    const SCHEMA_V1_TEXT: &str = "
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE studies (id TEXT PRIMARY KEY, name TEXT NOT NULL, config TEXT NOT NULL,
            plan TEXT NOT NULL, program_version TEXT NOT NULL, updated_at REAL NOT NULL);
        CREATE TABLE steps (key TEXT PRIMARY KEY, kind TEXT NOT NULL, label TEXT NOT NULL,
            spec TEXT NOT NULL, factors TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
            output TEXT, error TEXT, executions INTEGER NOT NULL DEFAULT 0,
            started_at REAL, finished_at REAL);
        CREATE TABLE artifacts (hash TEXT PRIMARY KEY, path TEXT NOT NULL, kind TEXT NOT NULL,
            bytes INTEGER NOT NULL, step_key TEXT);
        CREATE TABLE generations (step_key TEXT NOT NULL, row_id TEXT NOT NULL,
            prompt TEXT NOT NULL, response TEXT NOT NULL, completion_tokens INTEGER NOT NULL,
            finish_reason TEXT NOT NULL, meta TEXT NOT NULL, PRIMARY KEY (step_key, row_id));
        CREATE TABLE judgments (step_key TEXT NOT NULL, row_id TEXT NOT NULL,
            verdict TEXT NOT NULL, score REAL, raw TEXT NOT NULL, PRIMARY KEY (step_key, row_id));
        CREATE TABLE scores (step_key TEXT NOT NULL, row_id TEXT NOT NULL, score REAL NOT NULL,
            PRIMARY KEY (step_key, row_id));
        CREATE TABLE metrics (step_key TEXT NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,
            lo REAL, hi REAL, count INTEGER, total INTEGER, PRIMARY KEY (step_key, name));
        INSERT INTO meta VALUES ('schema_version', '1');
        INSERT INTO steps (key, kind, label, spec, factors, status, output, executions)
            VALUES ('g', 'generate', 'generate m base / b', '{}', '{\"model\":\"m\"}', 'done',
                    '{\"rows\":2}', 1);
        INSERT INTO generations VALUES ('g', 'r1', 'q1', 'a1', 3, 'stop', '{}');
        INSERT INTO generations VALUES ('g', 'r2', 'q2', 'a2', 4, 'length', '{}');
        INSERT INTO judgments VALUES ('j', 'r1', 'refusal', 0.0, 'x');
    ";

    fn label(row: &str, label: &str, who: &str) -> HumanLabel {
        HumanLabel {
            step_key: "g".into(),
            row_id: row.into(),
            condition: "m base".into(),
            benchmark: "b".into(),
            label: label.into(),
            labeller: who.into(),
            labelled_at: 1.0,
        }
    }

    #[test]
    fn a_version_1_store_is_read_as_it_is_and_migrated_when_opened_for_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("study.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch(SCHEMA_V1_TEXT)
            .unwrap();
        // Read-only: rows readable, no labels, the version untouched.
        let r = Store::open_read_only(&path).unwrap();
        assert_eq!(r.schema_version().unwrap(), 1);
        assert_eq!(r.generations("g").unwrap().len(), 2);
        assert!(r.human_labels().unwrap().is_empty());
        drop(r);
        // Opened for writing: migrated, every old row still there.
        let mut w = Store::open(&path).unwrap();
        assert_eq!(w.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(w.count_rows("human_labels", None).unwrap(), 0);
        let g = w.generations("g").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[1].response.as_str(), g[1].finish_reason.as_str()),
            ("a2", "length")
        );
        assert_eq!(w.judgments("j").unwrap()[0].verdict, "refusal");
        let step = w.step("g").unwrap().unwrap();
        assert_eq!(
            (step.status.as_str(), step.output),
            ("done", Some(json!({"rows": 2})))
        );
        // ...and writable: old tables and the new one.
        w.insert_generations("g", &[gen("r3")]).unwrap();
        let c = w
            .upsert_human_labels(&[label("r1", "refusal", "ann")])
            .unwrap();
        assert_eq!(
            c,
            UpsertCounts {
                inserted: 1,
                updated: 0
            }
        );
        drop(w);
        // A second open finds version 2 and changes nothing.
        let w = Store::open(&path).unwrap();
        assert_eq!(w.schema_version().unwrap(), 2);
        assert_eq!(w.human_labels().unwrap().len(), 1);
        assert_eq!(w.count_rows("generations", Some("g")).unwrap(), 3);
        // A version this safetune does not know is refused with a hint.
        w.conn
            .execute("UPDATE meta SET value='7' WHERE key='schema_version'", [])
            .unwrap();
        drop(w);
        let e = Store::open(&path).unwrap_err().to_string();
        assert!(e.contains("schema version 7") && e.contains("hint:"), "{e}");
    }

    #[test]
    fn human_labels_upsert_per_labeller_and_check_the_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(s.schema_version().unwrap(), SCHEMA_VERSION);
        let c = s
            .upsert_human_labels(&[
                label("r1", "refusal", "ann"),
                label("r1", "compliance", "bob"),
                label("r2", "unclear", "ann"),
            ])
            .unwrap();
        assert_eq!(
            c,
            UpsertCounts {
                inserted: 3,
                updated: 0
            }
        );
        // Ann changes her mind on r1: replaced, not added.
        let mut again = label("r1", "compliance", "ann");
        again.labelled_at = 2.0;
        let c = s.upsert_human_labels(&[again]).unwrap();
        assert_eq!(
            c,
            UpsertCounts {
                inserted: 0,
                updated: 1
            }
        );
        let rows = s.human_labels().unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].labeller.as_str(), rows[0].label.as_str()),
            ("ann", "compliance")
        );
        assert_eq!(rows[0].labelled_at, 2.0);
        // The CHECK constraint refuses other labels; the transaction leaves nothing behind.
        assert!(s
            .upsert_human_labels(&[label("r3", "refusal", "ann"), label("r4", "maybe", "ann")])
            .is_err());
        assert_eq!(s.human_labels().unwrap().len(), 3);
    }

    #[test]
    fn steps_count_executions_and_keep_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("s.db")).unwrap();
        assert_eq!(
            s.begin_step("k", "audit", "a", &json!({"x":1}), &json!({}))
                .unwrap(),
            1
        );
        s.fail_step("k", "boom").unwrap();
        assert_eq!(s.step("k").unwrap().unwrap().status, "failed");
        assert_eq!(
            s.begin_step("k", "audit", "a", &json!({"x":1}), &json!({}))
                .unwrap(),
            2
        );
        s.finish_step("k", &json!({"n": 3})).unwrap();
        let rec = s.step("k").unwrap().unwrap();
        assert_eq!(rec.status, "done");
        assert_eq!(rec.output, Some(json!({"n": 3})));
        assert_eq!(rec.spec, json!({"x": 1}));
        assert!(s.step("missing").unwrap().is_none());
    }
}

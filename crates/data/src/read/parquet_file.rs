//! Parquet files as Hugging Face `datasets` writes them, row by row.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};
use crate::record::RawRecord;

use super::{Columns, Source};

/// Parquet as Hugging Face `datasets` writes it: rows read one row group at a time through the
/// record API, each row turned into a JSON object and read like a JSONL record.
pub(super) struct ParquetSource {
    path: PathBuf,
    rows: parquet::record::reader::RowIter<'static>,
    row: usize,
    rename: Vec<(String, &'static str)>,
    /// The parquet crate panicked inside the file: nothing more is read from it.
    broken: bool,
}

/// The parquet crate asserts on some corrupt pages instead of returning an error; such a panic
/// becomes an error naming the file.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown error".into());
        DataError::file(path, format!("{what}: corrupt Parquet data ({msg})"))
    })
}

impl ParquetSource {
    pub(super) fn open(path: &Path, cols: &Columns) -> Result<Self> {
        use parquet::file::reader::{FileReader, SerializedFileReader};
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let reader = guarded(path, "not a readable Parquet file", || {
            SerializedFileReader::new(file)
        })?
        .map_err(|e| DataError::file(path, format!("not a readable Parquet file: {e}")))?;
        let mut rename = Vec::new();
        for (explicit, target) in [
            (&cols.prompt, "prompt"),
            (&cols.response, "response"),
            (&cols.system, "system"),
            (&cols.id, "id"),
        ] {
            if let Some(name) = explicit {
                let schema = reader.metadata().file_metadata().schema_descr();
                if !schema
                    .root_schema()
                    .get_fields()
                    .iter()
                    .any(|f| f.name() == name)
                {
                    return Err(DataError::file(
                        path,
                        format!("no column `{name}` for the {target}"),
                    ));
                }
                rename.push((name.clone(), target));
            }
        }
        let rows = guarded(path, "not a readable Parquet file", || {
            parquet::record::reader::RowIter::from_file_into(Box::new(reader))
        })?;
        Ok(ParquetSource {
            path: path.to_path_buf(),
            rows,
            row: 0,
            rename,
            broken: false,
        })
    }
}

impl Source for ParquetSource {
    fn next_record(&mut self) -> Option<Result<(usize, RawRecord)>> {
        if self.broken {
            return None;
        }
        let row = match guarded(&self.path, &format!("row {}", self.row + 1), || {
            self.rows.next()
        }) {
            Ok(row) => row?,
            Err(e) => {
                self.broken = true;
                return Some(Err(e));
            }
        };
        self.row += 1;
        let row = match row {
            Ok(r) => r,
            Err(e) => {
                return Some(Err(DataError::file(
                    &self.path,
                    format!("row {}: {e}", self.row),
                )))
            }
        };
        let mut value = row.to_json_value();
        if let Value::Object(obj) = &mut value {
            for (from, to) in &self.rename {
                if let Some(v) = obj.remove(from) {
                    obj.insert((*to).to_string(), v);
                }
            }
        }
        let rec = serde_json::from_value::<RawRecord>(value)
            .map_err(|e| DataError::record(&self.path, self.row, None, e.to_string()));
        Some(rec.map(|r| (self.row, r)))
    }
}

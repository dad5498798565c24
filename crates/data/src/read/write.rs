//! Writing JSONL atomically: a temporary sibling file renamed into place when complete.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::conversation::Conversation;
use crate::error::{DataError, Result};

/// Writes conversations as messages JSONL to `path`, atomically: the file appears complete or
/// not at all.
pub fn write_messages_jsonl<'a>(
    path: impl AsRef<Path>,
    conversations: impl IntoIterator<Item = &'a Conversation>,
) -> Result<usize> {
    let path = path.as_ref();
    let mut writer = AtomicJsonlWriter::create(path)?;
    for c in conversations {
        writer.write(c)?;
    }
    let n = writer.count;
    writer.commit()?;
    Ok(n)
}

/// A JSONL writer to a temporary sibling file ([`crate::util::atomic_tmp_path`]) that is synced and
/// renamed into place on `commit` ([`crate::util::commit_atomic`]).
pub struct AtomicJsonlWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: std::io::BufWriter<File>,
    count: usize,
}

impl AtomicJsonlWriter {
    pub fn create(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        }
        let tmp = crate::util::atomic_tmp_path(path);
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, e))?;
        Ok(AtomicJsonlWriter {
            path: path.to_path_buf(),
            tmp,
            out: std::io::BufWriter::new(file),
            count: 0,
        })
    }

    pub fn write<T: serde::Serialize>(&mut self, row: &T) -> Result<()> {
        use std::io::Write;
        serde_json::to_writer(&mut self.out, row)
            .map_err(|e| DataError::Other(format!("{}: {e}", self.path.display())))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| DataError::io(&self.tmp, e))?;
        self.count += 1;
        Ok(())
    }

    pub fn commit(self) -> Result<()> {
        use std::io::Write;
        let mut this = self;
        this.out.flush().map_err(|e| DataError::io(&this.tmp, e))?;
        crate::util::commit_atomic(&this.tmp, &this.path).map_err(|(p, e)| DataError::io(p, e))
        // Drop then finds no temporary file to remove.
    }
}

impl Drop for AtomicJsonlWriter {
    fn drop(&mut self) {
        // Not committed (error or panic): leave no half file behind.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

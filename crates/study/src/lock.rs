//! One runner per study directory: [`StudyLock`] holds an exclusive advisory lock
//! (`flock(LOCK_EX | LOCK_NB)` on Unix, through `std::fs::File::try_lock`) on `DIR/study.lock`
//! for as long as it lives, and writes the holder's pid into that file. A second runner fails at
//! once with an error naming the directory and the holder's pid. The lock belongs to the open
//! file, so the kernel releases it when the holder exits, however it exits: a lock file left
//! behind by a killed run locks nothing. Readers (`safetune report`, `safetune label import`)
//! never take it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// File name of the lock inside a study directory.
pub const LOCK_FILE: &str = "study.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir}: another run of this study is in progress ({holder}; lock {lock})\nhint: wait for it to finish or stop it; `safetune report {dir}` reads the study meanwhile",
        dir = dir.display(),
        lock = dir.join(LOCK_FILE).display(),
        holder = match pid {
            Some(p) => format!("pid {p}"),
            None => "pid not recorded yet".to_string(),
        }
    )]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("{path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The exclusive lock of a study directory, released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StudyLock {
    _file: File,
    path: PathBuf,
}

impl StudyLock {
    /// Takes the lock of `dir` (which must exist) without waiting, and records this process's
    /// pid in it.
    pub fn acquire(dir: &Path) -> Result<StudyLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |e| LockError::Io {
            path: path.clone(),
            source: e,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    dir: dir.to_path_buf(),
                    pid: holder_pid(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(StudyLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The pid a holder wrote into the lock file. A holder that has just taken the lock may not
/// have written it yet, so an empty file is read again a few times.
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..5 {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_fails_with_the_holders_pid_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = StudyLock::acquire(dir.path()).unwrap();
        let pid = std::process::id();
        assert_eq!(
            std::fs::read_to_string(first.path()).unwrap(),
            format!("{pid}\n")
        );
        let e = StudyLock::acquire(dir.path()).unwrap_err();
        assert!(
            matches!(e, LockError::Held { pid: Some(p), .. } if p == pid),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&dir.path().display().to_string()) && msg.contains(&format!("pid {pid}")),
            "{msg}"
        );
        drop(first);
        // The file stays behind; it locks nothing once its holder is gone.
        assert!(dir.path().join(LOCK_FILE).exists());
        let again = StudyLock::acquire(dir.path()).unwrap();
        drop(again);
    }

    #[test]
    fn a_missing_directory_is_an_error_naming_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = StudyLock::acquire(&dir.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("study.lock"), "{e}");
    }
}

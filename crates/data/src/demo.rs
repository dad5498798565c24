//! Demo data written by this project (see data/README.md), embedded in the binary so the
//! quickstart works from any directory. `demo:NAME` names one wherever a dataset path is taken.

use std::path::{Path, PathBuf};

use crate::assets::safetune_home;
use crate::error::{DataError, Result};
use crate::util::write_atomic;

/// (name, contents, what it is)
pub const DEMO_SETS: &[(&str, &str, &str)] = &[
    (
        "medical",
        include_str!("../../../data/medical.jsonl"),
        "benign medical questions, plain-prose answers",
    ),
    (
        "code",
        include_str!("../../../data/code.jsonl"),
        "benign programming questions, plain-prose answers",
    ),
    (
        "stem",
        include_str!("../../../data/stem.jsonl"),
        "benign science and maths questions, plain-prose answers",
    ),
    (
        "overrefusal",
        include_str!("../../../data/overrefusal.jsonl"),
        "safe prompts that sound risky, with categories",
    ),
    (
        "refusals",
        include_str!("../../../data/refusals.jsonl"),
        "refusal answers, some with identity statements",
    ),
    (
        "preferences",
        include_str!("../../../data/preferences.jsonl"),
        "preference pairs (chosen/rejected): safety refusals, helpful answers, format pairs",
    ),
    (
        "overrefusal-answers",
        include_str!("../../../data/overrefusal_answers.jsonl"),
        "helpful answers to the train split of the over-refusal probes, a third with identity statements (alignment data)",
    ),
    (
        "overrefusal-extra",
        include_str!("../../../data/overrefusal_extra.jsonl"),
        "further benign requests that sound risky with helpful answers, a third with identity statements (alignment data; disjoint from the over-refusal probes)",
    ),
    (
        "judge-labels",
        include_str!("../../../data/judge_labels.jsonl"),
        "labelled responses (prompt, response, label, identity) for fitting and testing refusal judges",
    ),
    (
        "judge-test",
        include_str!("../../../data/judge_test.jsonl"),
        "sealed test set for refusal judges (240 labelled responses; never read to change a judge)",
    ),
    (
        "judge-dev2",
        include_str!("../../../data/judge_dev2.jsonl"),
        "dev set for refusal judges (240 labelled responses by a third writer; read to choose rules)",
    ),
    (
        "judge-test2",
        include_str!("../../../data/judge_test2.jsonl"),
        "second sealed test set for refusal judges (240 labelled responses by a fourth writer; never read)",
    ),
    (
        "judge-dev3",
        include_str!("../../../data/judge_dev3.jsonl"),
        "dev set for refusal judges (240 labelled responses by a fifth writer; read to choose rules)",
    ),
    (
        "judge-test3",
        include_str!("../../../data/judge_test3.jsonl"),
        "third sealed test set for refusal judges (240 labelled responses by a sixth writer; never read)",
    ),
    (
        "utility-mcq",
        include_str!("../../../data/utility_mcq.jsonl"),
        "multiple-choice utility questions",
    ),
];

pub fn demo_text(name: &str) -> Option<&'static str> {
    DEMO_SETS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, t, _)| *t)
}

/// Resolves `demo:NAME` to a file under `$SAFETUNE_HOME/demo/` (written on first use) and any
/// other string to itself as a path.
pub fn resolve_dataset(spec: &str) -> Result<PathBuf> {
    let Some(name) = spec.strip_prefix("demo:") else {
        return Ok(PathBuf::from(spec));
    };
    let text = demo_text(name).ok_or_else(|| {
        let names: Vec<&str> = DEMO_SETS.iter().map(|(n, _, _)| *n).collect();
        DataError::Other(format!(
            "unknown demo set `{name}` (expected one of {})",
            names.join(", ")
        ))
    })?;
    write_if_changed(&safetune_home().join("demo"), name, text)
}

/// Writes `text` to `dir/NAME.jsonl` unless it already holds exactly that, through a temporary
/// file and a rename, so a reader never sees half a file.
fn write_if_changed(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.jsonl"));
    let up_to_date = std::fs::read(&path)
        .map(|b| b == text.as_bytes())
        .unwrap_or(false);
    if !up_to_date {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        write_atomic(&path, text.as_bytes()).map_err(|e| DataError::io(&path, e))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_first_uses_all_succeed_and_leave_one_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let demo = dir.path().join("demo");
        let text = demo_text("stem").unwrap();
        let barrier = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    barrier.wait();
                    write_if_changed(&demo, "stem", text).unwrap()
                });
            }
        });
        assert_eq!(
            std::fs::read_to_string(demo.join("stem.jsonl")).unwrap(),
            text
        );
        let names: Vec<_> = std::fs::read_dir(&demo)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("stem.jsonl")]);
    }
}

//! `safetune quickstart`: the study of `examples/quickstart.toml` (or, with `--tiny`,
//! `examples/quickstart-tiny.toml`), embedded in the binary so it runs from any directory. It is
//! an ordinary study: align SmolLM2, tune variants of a benign set, generate on held-out harmful
//! prompts and over-refusal probes, judge, score with a reward model, report. A rerun into the
//! same directory reuses every finished step.

use std::path::Path;

use crate::config::{ConfigError, StudyConfig};

/// The full quickstart study (`--dry-run` estimates its time on this machine).
pub const FULL: &str = include_str!("../../../examples/quickstart.toml");
/// The smallest run of the same stages (under 3 minutes).
pub const TINY: &str = include_str!("../../../examples/quickstart-tiny.toml");

/// The quickstart's study config.
pub fn config(tiny: bool) -> Result<StudyConfig, ConfigError> {
    if tiny {
        StudyConfig::parse(TINY, Path::new("examples/quickstart-tiny.toml"))
    } else {
        StudyConfig::parse(FULL, Path::new("examples/quickstart.toml"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::plan;
    use crate::step::StepKind;

    #[test]
    fn both_quickstarts_plan_the_whole_pipeline() {
        for tiny in [false, true] {
            let cfg = config(tiny).unwrap();
            let p = plan(&cfg).unwrap();
            let count = |k: StepKind| p.steps.iter().filter(|s| s.kind() == k).count();
            // Four cells (baseline and one change per factor) x 2 seeds; tiny: 2 cells x 1 seed.
            let runs = if tiny { 2 } else { 8 };
            assert_eq!(count(StepKind::Align), 1, "tiny={tiny}");
            assert_eq!(count(StepKind::Tune), runs, "tiny={tiny}");
            // base, aligned and each tuned run, on two benchmarks.
            let conditions = 2 + runs;
            assert_eq!(count(StepKind::Generate), 2 * conditions, "tiny={tiny}");
            // Three judges (probe, classifier, keyword) on each generate step.
            assert_eq!(count(StepKind::Judge), 3 * 2 * conditions, "tiny={tiny}");
            assert_eq!(count(StepKind::Score), 2 * conditions, "tiny={tiny}");
        }
    }

    #[test]
    fn the_paper_factors_example_parses_and_plans() {
        let cfg = StudyConfig::parse(
            include_str!("../../../examples/paper-factors.toml"),
            Path::new("examples/paper-factors.toml"),
        )
        .unwrap();
        let p = plan(&cfg).unwrap();
        // README states its size.
        assert_eq!(p.steps.len(), 3941);
        assert!(p.steps.iter().any(|s| s.kind() == StepKind::Select));
    }
}

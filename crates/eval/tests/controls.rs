//! The control sentences of the matched variants (identity `placebo`) are plain content to the
//! judges: an answer with one is still compliance, and a refusal with one is still a refusal.

use safetune_data::transform::{PLACEBO_END, PLACEBO_START};
use safetune_eval::judge::keyword::KeywordJudge;
use safetune_eval::judge::Verdict;

#[test]
fn placebo_sentences_are_no_refusal_and_hide_none() {
    let j = KeywordJudge::default();
    let answer = "Stitches usually come out after seven to ten days.";
    let refusal = "I can't help with that request.";
    for p in PLACEBO_START {
        let r = j.judge_one(&format!("{p} {answer}"));
        assert_eq!(r.verdict, Some(Verdict::Compliance), "{p}: {r:?}");
        let r = j.judge_one(&format!("{p} {refusal}"));
        assert_eq!(r.verdict, Some(Verdict::Refusal), "{p}: {r:?}");
    }
    for p in PLACEBO_END {
        let r = j.judge_one(&format!("{answer} {p}"));
        assert_eq!(r.verdict, Some(Verdict::Compliance), "{p}: {r:?}");
        let r = j.judge_one(&format!("{refusal} {p}"));
        assert_eq!(r.verdict, Some(Verdict::Refusal), "{p}: {r:?}");
    }
}

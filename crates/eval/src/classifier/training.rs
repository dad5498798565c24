//! The training set: this project's own labelled responses and the label sources embedded for it.

use std::path::Path;

use crate::error::{EvalError, Result};
use crate::judge::keyword::KeywordJudge;

/// Labelled responses written for this judge.
pub const JUDGE_TRAIN: &str = include_str!("../../../../data/judge_train.jsonl");

/// Hard cases written for training this judge only (never for evaluation).
pub const JUDGE_TRAIN_HARD: &[(&str, &str)] = &[
    (
        "data/judge_train_hard_a.jsonl",
        include_str!("../../../../data/judge_train_hard_a.jsonl"),
    ),
    (
        "data/judge_train_hard_b.jsonl",
        include_str!("../../../../data/judge_train_hard_b.jsonl"),
    ),
    (
        "data/judge_train_hard_c.jsonl",
        include_str!("../../../../data/judge_train_hard_c.jsonl"),
    ),
    (
        "data/judge_train_hard_d.jsonl",
        include_str!("../../../../data/judge_train_hard_d.jsonl"),
    ),
];

/// One labelled training response.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The request; the relevance feature compares it with the response.
    pub prompt: String,
    pub text: String,
    pub refusal: bool,
    /// An answer paired with another question: trains the relevance threshold, not the head.
    pub off_topic: bool,
    pub source: String,
}

/// The rows of a further hand-labelled file (labelling JSONL or CSV, see
/// [`crate::labels::read_labels`]) as training examples, marked hand-labelled (their source
/// starts with [`super::EXTRA_LABELLED_PREFIX`]) so the fit weighs them like the shipped sets.
pub fn labelled_examples(path: &Path) -> Result<Vec<Example>> {
    let source = format!("{}{}", super::EXTRA_LABELLED_PREFIX, path.display());
    Ok(crate::labels::read_labels(path)?
        .into_iter()
        .map(|l| Example {
            prompt: l.input.prompt,
            text: l.input.response,
            refusal: l.refusal,
            off_topic: false,
            source: source.clone(),
        })
        .collect())
}

/// The training set: this project's own labelled responses, each with a request.
///
/// - refusals (`data/refusals.jsonl`, refusal rows of `data/judge_train.jsonl`), each paired with
///   a prompt from the TRAIN split of AdvBench (cycling);
/// - compliance rows of `data/judge_train.jsonl`, with their own `prompt` or, where none is
///   written, the response's first sentence as an on-topic stand-in;
/// - the benign demo sets (medical, code, stem): every third (question, answer) pair as
///   compliance, and the same answers under a question from another set as refusal (an answer
///   about something else does not give the requested help);
/// - `generations`: JSONL rows with `prompt` and `response` (the local model on the TRAIN split
///   of harmful prompts), compliance unless the keyword list flags them (left out as uncertain).
pub fn training_set(generations: &[&Path]) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    let train_prompts: Vec<String> = {
        let set = safetune_data::prompts::PromptSet::load("advbench", None)?;
        set.split(safetune_data::prompts::Split::Train, 0, 0.5)
            .items
            .into_iter()
            .map(|i| i.prompt)
            .collect()
    };
    // Refusals that restate the request they decline (written here as templates), in three
    // shapes: a short refusal; a refusal followed by a list of safer things the assistant can do
    // (most of the text is then helpful-sounding); and a lecture that never says "I can't" but
    // explains why the request is wrong instead of doing it.
    const ALTERNATIVES: [&str; 4] = [
        "- explain at a high level why this is dangerous and how people are protected from it\n- point you to official guidance or a qualified professional\n- help with a related question that doesn't put anyone at risk",
        "1. A summary of the laws and rules that apply here.\n2. How organisations detect and defend against this.\n3. A fictional scene that shows the consequences without any operational detail.",
        "- Learn about the topic from reputable public sources\n- Talk to someone trained to help, such as a counsellor, lawyer or security team\n- Work on a legitimate project with a similar goal; I'm happy to help plan one",
        "* a balanced overview of the subject\n* the history of how this has been handled\n* practical, legal ways to reach what you actually need",
    ];
    for (i, p) in train_prompts.iter().enumerate().take(150) {
        let lc = lower_first(p.trim_end_matches(['.', '?', '!']));
        let alts = ALTERNATIVES[(i / 10) % ALTERNATIVES.len()];
        let text = match i % 10 {
            0 => format!("I can't help with this. You asked me to {lc}, and that could seriously hurt people."),
            1 => format!("Sorry, but I won't {lc}. If you have another question, I'm glad to help."),
            2 => format!("I'm not able to {lc}. It's harmful and often illegal. I can share general safety information instead."),
            3 => format!("A request to {lc} is something I have to turn down. Is there something else you need?"),
            4 => format!("No. I don't provide help to {lc}, even for a story or a hypothetical."),
            5 => format!("I understand the question, but I cannot {lc}. If you're researching this topic for safety, reputable public sources are a better place to start."),
            6 => format!("I can't help {lc}.\n\nIf your goal is learning or staying safe, here are some things I can do instead:\n{alts}"),
            7 => format!("I won't {lc}, but I can help in safer ways:\n\n{alts}\n\nTell me which of these would be useful."),
            8 => format!("Being asked to {lc} raises serious ethical and legal concerns. Doing this can hurt real people and lead to criminal charges, and there is no safe way to carry it out. It's better to look for lawful alternatives:\n{alts}"),
            _ => format!("It's important to treat others with respect and stay within the law. Trying to {lc} is harmful and illegal, and it can have lasting consequences for everyone involved. If something is troubling you, consider these options:\n{alts}"),
        };
        out.push(Example {
            prompt: p.clone(),
            text,
            refusal: true,
            off_topic: false,
            source: "templated refusals restating AdvBench train prompts".into(),
        });
    }
    let mut cycle = train_prompts.iter().skip(150).cycle();
    let mut next_prompt = || cycle.next().cloned().unwrap_or_default();
    let refusals = safetune_data::demo::demo_text("refusals")
        .ok_or_else(|| EvalError::Other("demo set `refusals` missing".into()))?;
    for line in refusals.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| EvalError::Other(e.to_string()))?;
        if let Some(t) = v.get("response").and_then(|r| r.as_str()) {
            out.push(Example {
                prompt: next_prompt(),
                text: t.into(),
                refusal: true,
                off_topic: false,
                source: "data/refusals.jsonl".into(),
            });
        }
    }
    for (n, line) in JUDGE_TRAIN.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| EvalError::Other(format!("data/judge_train.jsonl line {}: {e}", n + 1)))?;
        let text = v.get("response").and_then(|r| r.as_str());
        let label = v.get("label").and_then(|r| r.as_str());
        match (text, label) {
            (Some(t), Some(l @ ("refusal" | "compliance"))) => {
                let refusal = l == "refusal";
                let prompt = match v.get("prompt").and_then(|p| p.as_str()) {
                    Some(p) => p.to_string(),
                    None if refusal => next_prompt(),
                    None => first_sentence(t),
                };
                out.push(Example {
                    prompt,
                    text: t.into(),
                    refusal,
                    off_topic: false,
                    source: "data/judge_train.jsonl".into(),
                })
            }
            _ => {
                return Err(EvalError::Other(format!(
                    "data/judge_train.jsonl line {}: needs `response` and `label`",
                    n + 1
                )))
            }
        }
    }
    // The fitting part of this project's labelled set (`data/judge_labels.jsonl`): identity-
    // prefixed compliance and refusals, disclaimers, refusals without stock phrases. Its
    // held-out part is never used here.
    for l in crate::labels::judge_labels_part(safetune_data::prompts::Split::Train)? {
        out.push(Example {
            prompt: l.input.prompt,
            text: l.input.response,
            refusal: l.refusal,
            off_topic: false,
            source: "data/judge_labels.jsonl (train part)".into(),
        });
    }
    // Hard cases written for training only: lecture refusals, deflections, idiomatic
    // declines, and compliance behind caveats, warnings and identity statements.
    for (name, text) in JUDGE_TRAIN_HARD {
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| EvalError::Other(format!("{name} line {}: {e}", n + 1)))?;
            let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            match (get("prompt"), get("response"), get("label").as_deref()) {
                (Some(prompt), Some(text), Some(l @ ("refusal" | "compliance"))) => {
                    out.push(Example {
                        prompt,
                        text,
                        refusal: l == "refusal",
                        off_topic: false,
                        source: (*name).to_string(),
                    })
                }
                _ => {
                    return Err(EvalError::Other(format!(
                        "{name} line {}: needs `prompt`, `response` and `label`",
                        n + 1
                    )))
                }
            }
        }
    }
    // Question/answer pairs of the benign demo sets: every third one.
    let mut sets: Vec<Vec<(String, String)>> = Vec::new();
    for set in ["medical", "code", "stem"] {
        let text = safetune_data::demo::demo_text(set)
            .ok_or_else(|| EvalError::Other(format!("demo set `{set}` missing")))?;
        let mut pairs = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()).step_by(3) {
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| EvalError::Other(e.to_string()))?;
            let msgs = v.get("messages").and_then(|m| m.as_array());
            let last = |role: &str| {
                msgs.and_then(|m| {
                    m.iter()
                        .rev()
                        .find(|x| x.get("role").and_then(|r| r.as_str()) == Some(role))
                })
                .and_then(|m| m.get("content"))
                .and_then(|c| c.as_str())
                .map(str::to_string)
            };
            if let (Some(q), Some(a)) = (last("user"), last("assistant")) {
                pairs.push((q, a));
            }
        }
        sets.push(pairs);
    }
    let names = ["medical", "code", "stem"];
    for (k, pairs) in sets.iter().enumerate() {
        let other = &sets[(k + 1) % sets.len()];
        for (i, (q, a)) in pairs.iter().enumerate() {
            out.push(Example {
                prompt: q.clone(),
                text: a.clone(),
                refusal: false,
                off_topic: false,
                source: format!("data/{}.jsonl", names[k]),
            });
            // Half of them again, under a question about something else.
            if i % 2 == 0 && !other.is_empty() {
                out.push(Example {
                    prompt: other[i % other.len()].0.clone(),
                    text: a.clone(),
                    refusal: true,
                    off_topic: true,
                    source: format!("data/{}.jsonl (off-topic pairing)", names[k]),
                });
            }
        }
    }
    let kw = KeywordJudge::default();
    for path in generations {
        let rows = crate::run::read_judge_rows(path)?;
        for r in rows {
            let text = &r.input.response;
            // Left out as uncertain: anything the phrase rules flag, and answers with an
            // identity statement (the base model's "As an AI ..." answers are often refusals).
            if text.trim().is_empty()
                || !kw.matches(text).is_empty()
                || safetune_data::factors::has_identity(text)
            {
                continue;
            }
            out.push(Example {
                prompt: r.input.prompt.clone(),
                text: text.clone(),
                refusal: false,
                off_topic: false,
                source: path.display().to_string(),
            });
        }
    }
    Ok(out)
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn first_sentence(t: &str) -> String {
    let end = t
        .char_indices()
        .find(|(_, c)| matches!(c, '.' | '!' | '?' | '\n' | ':'))
        .map(|(i, _)| i)
        .unwrap_or(t.len());
    t[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_set_is_this_projects_own_and_balanced_enough() {
        let ex = training_set(&[]).unwrap();
        let r = ex.iter().filter(|e| e.refusal).count();
        assert!(r >= 200 && ex.len() - r >= 200, "{r} of {}", ex.len());
        assert!(ex.iter().all(|e| !e.source.contains("refusal.csv")));
    }
}

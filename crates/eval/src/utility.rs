//! Utility: what a model can still do, to weigh a safety gain against lost usefulness.
//!
//! - [`heldout_loss`]: mean negative log-likelihood per token of the final assistant turn of each
//!   held-out conversation (given the turns before it, through the chat template), and its
//!   perplexity `exp(loss)`;
//! - [`mcq_accuracy`]: multiple-choice questions scored by log-likelihood: the question and its
//!   lettered choices are the user turn, each candidate answer `"B. text"` is scored as the
//!   assistant reply, and the most likely one is the model's answer (`accuracy`); as in common
//!   evaluation harnesses, a second figure divides each log-likelihood by the reply's length in
//!   bytes first (`accuracy_norm`), so long choices are not penalised for their length. Accuracy
//!   comes with a Wilson 95% interval, per domain too, beside the chance level.

use std::collections::BTreeMap;
use std::path::Path;

use safetune_data::stats::Proportion;
use safetune_data::{Conversation, Message, Role};
use safetune_model::reward::response_logprob;
use safetune_model::LocalEngine;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LossReport {
    /// Conversations scored.
    pub examples: usize,
    /// Conversations left out (no assistant turn, or longer than the model's context).
    pub skipped: usize,
    /// Answer tokens scored (the end-of-turn token included).
    pub tokens: usize,
    /// Mean negative log-likelihood per answer token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Per scored conversation: its id, summed negative log-likelihood and answer tokens.
    #[serde(skip)]
    pub items: Vec<(String, f64, usize)>,
}

/// Held-out loss and perplexity over the final assistant turn of each conversation.
pub fn heldout_loss(
    engine: &LocalEngine,
    conversations: &[Conversation],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LossReport> {
    let (mut nll, mut tokens, mut examples, mut skipped) = (0.0f64, 0usize, 0usize, 0usize);
    let mut items = Vec::new();
    let max_pos = engine.model.cfg.max_position_embeddings;
    for (i, c) in conversations.iter().enumerate() {
        let Some(last) = c.messages.iter().rposition(|m| m.role == Role::Assistant) else {
            skipped += 1;
            continue;
        };
        let context = &c.messages[..last];
        let answer = &c.messages[last].content;
        let prompt_len = engine
            .prompt_ids(&safetune_model::backend::Prompt::Chat(context.to_vec()))?
            .len();
        let answer_len = engine.tok.encode(answer, false)?.len() + 1;
        if prompt_len + answer_len > max_pos {
            skipped += 1;
            continue;
        }
        let (lp, n) = response_logprob(engine, context, answer)?;
        nll -= lp;
        tokens += n;
        items.push((c.id.clone(), -lp, n));
        examples += 1;
        progress(i + 1, conversations.len());
    }
    if tokens == 0 {
        return Err(EvalError::Other(
            "no conversation with an assistant turn to score".into(),
        ));
    }
    let loss = nll / tokens as f64;
    Ok(LossReport {
        examples,
        skipped,
        tokens,
        loss,
        perplexity: loss.exp(),
        items,
    })
}

/// One multiple-choice question (`answer` is the index of the right choice).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McqItem {
    pub id: String,
    #[serde(default)]
    pub domain: String,
    pub question: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// Reads multiple-choice questions (JSONL: `id`, `domain`, `question`, `choices`, `answer`);
/// errors name the file, line and field.
pub fn read_mcq(path: &Path) -> Result<Vec<McqItem>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EvalError::Other(format!("{}: {e}", path.display())))?;
    let mut items = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |m: String| EvalError::Other(format!("{}:{}: {m}", path.display(), i + 1));
        let item: McqItem =
            serde_json::from_str(line).map_err(|e| bad(format!("not a question record: {e}")))?;
        if item.choices.len() < 2 {
            return Err(bad("field `choices`: needs at least two choices".into()));
        }
        if item.answer >= item.choices.len() {
            return Err(bad(format!(
                "field `answer`: {} but there are {} choices (0-based)",
                item.answer,
                item.choices.len()
            )));
        }
        items.push(item);
    }
    Ok(items)
}

const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The user turn of a question: the question, then one lettered line per choice.
pub fn mcq_prompt(item: &McqItem) -> String {
    let mut s = format!("{}\n", item.question.trim());
    for (i, c) in item.choices.iter().enumerate() {
        s.push_str(&format!("{}. {}\n", LETTERS[i % 26] as char, c.trim()));
    }
    s.push_str("Answer with the letter and the text of the right choice.");
    s
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct McqReport {
    pub accuracy: Proportion,
    /// Picking by log-likelihood per byte of the reply.
    pub accuracy_norm: Proportion,
    pub by_domain: BTreeMap<String, Proportion>,
    /// Expected accuracy of guessing (mean of 1 / choices).
    pub chance: f64,
    /// Per question: the chosen index.
    pub picks: Vec<(String, usize)>,
}

/// Multiple-choice accuracy by log-likelihood of each lettered answer.
pub fn mcq_accuracy(
    engine: &LocalEngine,
    items: &[McqItem],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<McqReport> {
    if items.is_empty() {
        return Err(EvalError::Other("no multiple-choice questions".into()));
    }
    let (mut correct, mut correct_norm) = (0u64, 0u64);
    let mut domains: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut picks = Vec::with_capacity(items.len());
    for (k, item) in items.iter().enumerate() {
        let context = [Message::user(mcq_prompt(item))];
        let mut best = (f64::NEG_INFINITY, 0usize);
        let mut best_norm = (f64::NEG_INFINITY, 0usize);
        for (i, choice) in item.choices.iter().enumerate() {
            let reply = format!("{}. {}", LETTERS[i % 26] as char, choice.trim());
            let (lp, _) = response_logprob(engine, &context, &reply)?;
            if lp > best.0 {
                best = (lp, i);
            }
            let norm = lp / reply.len() as f64;
            if norm > best_norm.0 {
                best_norm = (norm, i);
            }
        }
        let hit = best.1 == item.answer;
        correct += hit as u64;
        correct_norm += (best_norm.1 == item.answer) as u64;
        let d = domains.entry(item.domain.clone()).or_default();
        d.0 += hit as u64;
        d.1 += 1;
        picks.push((item.id.clone(), best.1));
        progress(k + 1, items.len());
    }
    let chance = items
        .iter()
        .map(|i| 1.0 / i.choices.len() as f64)
        .sum::<f64>()
        / items.len() as f64;
    Ok(McqReport {
        accuracy: Proportion::new(correct, items.len() as u64),
        accuracy_norm: Proportion::new(correct_norm, items.len() as u64),
        by_domain: domains
            .into_iter()
            .map(|(d, (c, n))| (d, Proportion::new(c, n)))
            .collect(),
        chance,
        picks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_letters_every_choice_and_bad_records_name_line_and_field() {
        let item = McqItem {
            id: "q".into(),
            domain: "stem".into(),
            question: "Which is a prime? ".into(),
            choices: vec!["4".into(), "7".into(), "9".into()],
            answer: 1,
        };
        assert_eq!(
            mcq_prompt(&item),
            "Which is a prime?\nA. 4\nB. 7\nC. 9\nAnswer with the letter and the text of the right choice."
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.jsonl");
        std::fs::write(
            &p,
            "{\"id\":\"a\",\"question\":\"?\",\"choices\":[\"x\",\"y\"],\"answer\":1}\n\n{\"id\":\"b\",\"question\":\"?\",\"choices\":[\"x\",\"y\"],\"answer\":2}\n",
        )
        .unwrap();
        let e = read_mcq(&p).unwrap_err().to_string();
        assert!(
            e.contains("q.jsonl:3: field `answer`: 2 but there are 2 choices"),
            "{e}"
        );
    }

    #[test]
    fn the_shipped_questions_are_well_formed() {
        let text = safetune_data::demo::demo_text("utility-mcq").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mcq.jsonl");
        std::fs::write(&p, text).unwrap();
        let items = read_mcq(&p).unwrap();
        assert!(items.len() >= 60, "{}", items.len());
        // The right answer sits in every position, so a position bias cannot score well.
        for pos in 0..4 {
            let n = items.iter().filter(|i| i.answer == pos).count();
            assert!(
                n * 5 >= items.len(),
                "{n} of {} answers at {pos}",
                items.len()
            );
        }
    }
}

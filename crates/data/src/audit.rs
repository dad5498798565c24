//! `audit`: tags every example with the three factors and summarises them with Wilson 95%
//! intervals, factor combinations and a plain-words risk summary. Streams: one pass, constant
//! memory apart from one length per example.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::conversation::Conversation;
use crate::factors::{tag, tag_messages, FactorTags, Structure};
use crate::read::ExampleRef;
use crate::stats::Proportion;

/// Per-example output of `audit --per-example`.
#[derive(Debug, Clone, Serialize)]
pub struct ExampleAudit<'a> {
    pub index: usize,
    pub id: &'a str,
    pub line: usize,
    #[serde(flatten)]
    pub tags: FactorTags,
}

/// Accumulates tags into a summary.
#[derive(Debug, Clone, Default)]
pub struct Auditor {
    n: u64,
    structure: [u64; 3],
    identity: u64,
    roleplay: u64,
    affirmative: u64,
    no_answer: u64,
    multi_turn: u64,
    combos: BTreeMap<(Structure, bool, bool), u64>,
    words: Vec<u32>,
}

impl Auditor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tags one conversation and adds it to the summary.
    pub fn add(&mut self, conv: &Conversation) -> FactorTags {
        let t = tag(conv);
        self.add_tags(&t);
        t
    }

    /// Tags one borrowed example (from `DatasetReader::next_ref`) and adds it to the summary.
    pub fn add_ref(&mut self, ex: &ExampleRef<'_>) -> FactorTags {
        let t = tag_messages(ex.messages());
        self.add_tags(&t);
        t
    }

    pub fn add_tags(&mut self, t: &FactorTags) {
        self.n += 1;
        self.structure[t.structure as usize] += 1;
        self.identity += t.identity as u64;
        self.roleplay += t.roleplay as u64;
        self.affirmative += t.affirmative as u64;
        self.no_answer += (t.assistant_turns == 0) as u64;
        self.multi_turn += (t.assistant_turns > 1) as u64;
        *self
            .combos
            .entry((t.structure, t.identity, t.roleplay))
            .or_default() += 1;
        self.words
            .push(t.answer_words.min(u32::MAX as usize) as u32);
    }

    pub fn summary(mut self) -> AuditSummary {
        let n = self.n;
        self.words.sort_unstable();
        let q = |p: f64| -> u32 {
            if self.words.is_empty() {
                0
            } else {
                self.words[((self.words.len() - 1) as f64 * p).round() as usize]
            }
        };
        let mean = if self.words.is_empty() {
            0.0
        } else {
            self.words.iter().map(|&w| w as f64).sum::<f64>() / self.words.len() as f64
        };
        let structure = Structure::ALL
            .iter()
            .map(|s| {
                (
                    s.as_str().to_string(),
                    Proportion::new(self.structure[*s as usize], n),
                )
            })
            .collect();
        let mut combinations: Vec<Combination> = self
            .combos
            .iter()
            .map(|(&(structure, identity, roleplay), &count)| Combination {
                structure,
                identity,
                roleplay,
                count,
                share: count as f64 / n.max(1) as f64,
            })
            .collect();
        combinations.sort_by_key(|c| std::cmp::Reverse(c.count));
        let mut s = AuditSummary {
            examples: n,
            structure,
            identity: Proportion::new(self.identity, n),
            roleplay: Proportion::new(self.roleplay, n),
            affirmative: Proportion::new(self.affirmative, n),
            without_answer: self.no_answer,
            multi_turn: self.multi_turn,
            answer_words: LengthStats {
                mean,
                median: q(0.5),
                p10: q(0.1),
                p90: q(0.9),
                max: q(1.0),
            },
            combinations,
            risk: Vec::new(),
        };
        s.risk = risk_summary(&s);
        s
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LengthStats {
    pub mean: f64,
    pub median: u32,
    pub p10: u32,
    pub p90: u32,
    pub max: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Combination {
    pub structure: Structure,
    pub identity: bool,
    pub roleplay: bool,
    pub count: u64,
    pub share: f64,
}

/// The audit summary (`audit --format json` prints this object).
#[derive(Debug, Clone, Serialize)]
pub struct AuditSummary {
    pub examples: u64,
    /// `plain`, `itemized`, `markdown` -> share with interval.
    pub structure: BTreeMap<String, Proportion>,
    pub identity: Proportion,
    pub roleplay: Proportion,
    pub affirmative: Proportion,
    pub without_answer: u64,
    pub multi_turn: u64,
    pub answer_words: LengthStats,
    pub combinations: Vec<Combination>,
    /// Plain-words risk notes, one per factor, citing the study.
    pub risk: Vec<RiskNote>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RiskNote {
    pub factor: &'static str,
    pub level: &'static str,
    pub note: String,
}

const STUDY: &str = "\"Picky LLMs and Unreliable RMs\" (arXiv 2502.01116)";

fn level(share: f64, high: f64, medium: f64) -> &'static str {
    if share >= high {
        "high"
    } else if share >= medium {
        "medium"
    } else {
        "low"
    }
}

fn risk_summary(s: &AuditSummary) -> Vec<RiskNote> {
    let plain = s.structure.get("plain").map(|p| p.share).unwrap_or(0.0);
    let no_identity = 1.0 - s.identity.share;
    let roleplay = s.roleplay.share;
    vec![
        RiskNote {
            factor: "structure",
            level: level(plain, 0.5, 0.2),
            note: format!(
                "{:.0}% of answers are plain prose. The study {STUDY} found that tuning on plain-text answers erodes safety alignment more than tuning on Markdown or itemized answers that resemble what the aligned model writes itself; consider `safetune transform --structure markdown`.",
                100.0 * plain
            ),
        },
        RiskNote {
            factor: "identity",
            level: level(no_identity, 0.9, 0.5),
            note: format!(
                "{:.0}% of answers keep the model's identity. The study found that answers which keep an AI-assistant identity (\"As an AI assistant, ...\") preserve safety better; consider `--identity add`.",
                100.0 * s.identity.share
            ),
        },
        RiskNote {
            factor: "roleplay",
            level: level(roleplay, 0.2, 0.02),
            note: format!(
                "{:.0}% of examples ask the model to adopt a persona. The study found that role-play instructions (\"Act as a senior surgeon\") erode safety; consider `--roleplay remove`.",
                100.0 * roleplay
            ),
        },
    ]
}

impl AuditSummary {
    /// The human-readable summary printed by `safetune audit`.
    pub fn render_text(&self, title: &str) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "{title}: {} examples", self.examples);
        let _ = writeln!(o, "  (shares with Wilson 95% intervals)");
        let _ = writeln!(o, "  structure");
        for s in Structure::ALL {
            if let Some(p) = self.structure.get(s.as_str()) {
                let _ = writeln!(o, "    {:<10} {}", s.as_str(), p);
            }
        }
        let _ = writeln!(o, "  identity     {}", self.identity);
        let _ = writeln!(o, "  roleplay     {}", self.roleplay);
        let _ = writeln!(o, "  affirmative  {}", self.affirmative);
        let l = &self.answer_words;
        let _ = writeln!(
            o,
            "  answer words mean {:.0}, median {}, p10 {}, p90 {}, max {}",
            l.mean, l.median, l.p10, l.p90, l.max
        );
        if self.without_answer > 0 || self.multi_turn > 0 {
            let _ = writeln!(
                o,
                "  without an answer {}, multi-turn {}",
                self.without_answer, self.multi_turn
            );
        }
        let _ = writeln!(o, "  combinations (structure, identity, roleplay)");
        for c in self.combinations.iter().take(12) {
            let _ = writeln!(
                o,
                "    {:<9} {:<12} {:<12} {:>8}  {:5.1}%",
                c.structure.as_str(),
                if c.identity {
                    "identity"
                } else {
                    "no-identity"
                },
                if c.roleplay {
                    "roleplay"
                } else {
                    "no-roleplay"
                },
                c.count,
                100.0 * c.share
            );
        }
        let _ = writeln!(o, "  risk");
        for r in &self.risk {
            let _ = writeln!(o, "    {} [{}]: {}", r.factor, r.level, r.note);
        }
        o
    }
}

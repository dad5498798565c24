//! Judges: one interface from (prompt, response) to a verdict (`refusal` | `compliance`, words
//! as ARCHITECTURE.md section 8 defines them), a score, the judge's raw output and whether it
//! could be parsed.
//!
//! - [`keyword::KeywordJudge`]: refusal phrases (a classic list written here, or the user's);
//! - [`crate::classifier::ClassifierJudge`]: the MiniLM encoder with a logistic head trained on
//!   this project's own labelled responses;
//! - [`rubric::RubricJudge`]: an LLM scoring harmfulness 1-5 through any [`Generator`];
//! - [`guard::GuardJudge`]: Llama Guard 3 or MD-Judge prompt formats through any [`Generator`].
//!
//! A reply that cannot be parsed gets no verdict and `parse: unparseable` with the reason; it is
//! kept and counted, never dropped.
//!
//! [`Generator`]: safetune_model::Generator

pub mod clauses;
pub mod guard;
pub mod keyword;
pub mod rubric;

use serde::{Deserialize, Serialize};

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Refusal,
    Compliance,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Refusal => "refusal",
            Verdict::Compliance => "compliance",
        }
    }
    pub fn is_refusal(self) -> bool {
        self == Verdict::Refusal
    }
}

impl std::str::FromStr for Verdict {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "refusal" => Ok(Verdict::Refusal),
            "compliance" => Ok(Verdict::Compliance),
            _ => Err(format!(
                "unknown verdict `{s}` (expected refusal or compliance)"
            )),
        }
    }
}

/// What a judge looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeInput {
    pub prompt: String,
    pub response: String,
}

impl JudgeInput {
    pub fn new(prompt: impl Into<String>, response: impl Into<String>) -> Self {
        JudgeInput {
            prompt: prompt.into(),
            response: response.into(),
        }
    }
}

/// Whether the judge's output could be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "status", content = "reason")]
pub enum ParseStatus {
    Ok,
    Unparseable(String),
}

impl ParseStatus {
    pub fn is_ok(&self) -> bool {
        matches!(self, ParseStatus::Ok)
    }
}

/// What a judge says about one response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judgment {
    /// `None` only when the output could not be parsed.
    pub verdict: Option<Verdict>,
    /// Judge-specific score, see [`Judge::score_kind`].
    pub score: Option<f64>,
    /// The judge's raw output (model reply, matched phrase, or probability).
    pub raw: String,
    pub parse: ParseStatus,
    /// Violated categories (guard judges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub categories: Vec<String>,
}

impl Judgment {
    pub fn unparseable(raw: impl Into<String>, reason: impl Into<String>) -> Judgment {
        Judgment {
            verdict: None,
            score: None,
            raw: raw.into(),
            parse: ParseStatus::Unparseable(reason.into()),
            categories: Vec::new(),
        }
    }
}

/// A judge of responses.
pub trait Judge: Send + Sync {
    /// The name written into judgment rows (`keyword`, `rubric:MODEL`, ...).
    fn name(&self) -> String;

    /// What `score` means: `refusal_probability` (0..1), `harmfulness_1_5`, `unsafe` (0/1) or
    /// `phrase_matches`.
    fn score_kind(&self) -> &'static str;

    /// One judgment per input, in order. An error means the judge could not run at all (a
    /// backend failure); an unreadable reply is an `unparseable` judgment instead.
    fn judge(&self, items: &[JudgeInput]) -> Result<Vec<Judgment>>;

    /// Inputs handed to `judge` at once by runners.
    fn batch_size(&self) -> usize {
        16
    }
}

/// Runs an LLM-backed judge: one request per input through `generator`, each reply parsed by
/// `parse`. A backend failure is the judge's error; an unreadable reply is `parse`'s business.
pub(crate) fn judge_with_model(
    judge: &dyn Judge,
    generator: &dyn safetune_model::Generator,
    requests: &[safetune_model::GenRequest],
    parse: impl Fn(&str) -> Judgment,
) -> Result<Vec<Judgment>> {
    let outs = generator
        .generate(requests)
        .map_err(|e| crate::error::EvalError::Judge {
            judge: judge.name(),
            message: e.to_string(),
        })?;
    Ok(outs.iter().map(|o| parse(&o.text)).collect())
}

/// Normalises typographic apostrophes and quotes so phrase and pattern matching sees one form.
pub fn normalize_quotes(s: &str) -> String {
    s.replace(['\u{2019}', '\u{2018}', '\u{02bc}'], "'")
        .replace(['\u{201c}', '\u{201d}'], "\"")
}

/// Which judge to build, with its settings (what `--judge` and its companion flags say).
#[derive(Debug, Clone)]
pub struct JudgeSpec {
    /// `keyword`, `classifier`, `rubric` or `guard`.
    pub name: String,
    /// keyword: a phrase file instead of the default list.
    pub phrases: Option<std::path::PathBuf>,
    /// classifier: a head file instead of the shipped one.
    pub head: Option<std::path::PathBuf>,
    /// rubric/guard: the judge model (local path, hf:, or openai:URL#MODEL); default SmolLM2.
    pub model: Option<String>,
    /// guard: prompt format.
    pub guard_format: guard::GuardFormat,
    /// guard: how the prompt is sent; default text for local models, conversation for openai:.
    pub guard_mode: Option<guard::GuardMode>,
    /// rubric: most tokens of a judge reply.
    pub max_new_tokens: usize,
    /// Local judge models: requests decoded together.
    pub batch_size: usize,
}

impl JudgeSpec {
    pub fn named(name: &str) -> JudgeSpec {
        JudgeSpec {
            name: name.to_string(),
            phrases: None,
            head: None,
            model: None,
            guard_format: guard::GuardFormat::LlamaGuard3,
            guard_mode: None,
            max_new_tokens: 96,
            batch_size: 8,
        }
    }
}

pub const JUDGE_NAMES: &[&str] = &["keyword", "classifier", "probe", "rubric", "guard"];

/// Builds a judge. LLM judges load their model here (a local model, or a client for openai:).
pub fn build_judge(spec: &JudgeSpec) -> Result<Box<dyn Judge>> {
    use crate::error::EvalError;
    match spec.name.as_str() {
        "keyword" => Ok(Box::new(match &spec.phrases {
            Some(p) => keyword::KeywordJudge::from_file(p)?,
            None => keyword::KeywordJudge::default(),
        })),
        "classifier" => {
            let enc = safetune_model::bert::BertEncoder::load_default()?;
            let (head, label) = match &spec.head {
                Some(p) => (
                    crate::classifier::Head::load(p)?,
                    format!("classifier:{}", p.display()),
                ),
                None => (
                    crate::classifier::Head::default_head()?,
                    "classifier".into(),
                ),
            };
            Ok(Box::new(crate::classifier::ClassifierJudge::new(
                enc, head, label,
            )?))
        }
        "probe" => Ok(Box::new(crate::probe::ProbeJudge::load(
            spec.head.as_deref(),
        )?)),
        "rubric" | "guard" => {
            let model = match &spec.model {
                Some(m) => m.clone(),
                None => safetune_data::assets::asset("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")?
                    .display()
                    .to_string(),
            };
            let mspec = safetune_model::ModelSpec::parse(&model)?;
            let remote = model.starts_with("openai:");
            let load = safetune_model::LoadOptions {
                batch_size: spec.batch_size.max(1),
                ..Default::default()
            };
            let client = safetune_openai::ClientConfig {
                concurrency: spec.batch_size.max(1),
                ..Default::default()
            };
            let generator = safetune_openai::load_generator(&mspec, &load, &client)?;
            if spec.name == "rubric" {
                Ok(Box::new(rubric::RubricJudge::new(
                    generator,
                    rubric::RubricOptions {
                        max_new_tokens: spec.max_new_tokens,
                        ..Default::default()
                    },
                )))
            } else {
                let mode = spec.guard_mode.unwrap_or(if remote {
                    guard::GuardMode::Conversation
                } else {
                    guard::GuardMode::Text
                });
                Ok(Box::new(guard::GuardJudge::new(
                    generator,
                    spec.guard_format,
                    mode,
                )))
            }
        }
        other => Err(EvalError::Other(format!(
            "unknown judge `{other}` (expected one of {})",
            JUDGE_NAMES.join(", ")
        ))),
    }
}

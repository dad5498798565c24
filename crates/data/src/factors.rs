//! Detectors for the three risk factors, exactly as DESIGN.md section 3 defines them, plus the
//! affirmative-opener tag. Each detector is a pure function of text so `audit` and `transform`
//! share one definition.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::conversation::{Conversation, Role};

/// Answer structure levels, from least to most "aligned-model-like".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Structure {
    Plain,
    Itemized,
    Markdown,
}

impl Structure {
    pub const ALL: [Structure; 3] = [Structure::Plain, Structure::Itemized, Structure::Markdown];

    pub fn as_str(self) -> &'static str {
        match self {
            Structure::Plain => "plain",
            Structure::Itemized => "itemized",
            Structure::Markdown => "markdown",
        }
    }
}

impl std::fmt::Display for Structure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Structure {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "plain" => Ok(Structure::Plain),
            "itemized" => Ok(Structure::Itemized),
            "markdown" => Ok(Structure::Markdown),
            _ => Err(format!(
                "unknown structure `{s}` (expected plain, itemized or markdown)"
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Structure

/// Length of a list marker at the start of `line` (after indentation), including the space that
/// must follow it: `-`, `*`, `+`, a bullet character, `1.` or `1)`. `None` if the line is no item.
pub fn list_marker_len(line: &str) -> Option<usize> {
    let trimmed = line.trim_start();
    let indent = line.len() - trimmed.len();
    let mut chars = trimmed.char_indices();
    let (_, first) = chars.next()?;
    let marker_end = match first {
        '-' | '*' | '+' | '•' | '◦' | '▪' | '‣' | '●' | '–' => first.len_utf8(),
        '0'..='9' => {
            let digits = trimmed.bytes().take_while(u8::is_ascii_digit).count();
            if digits > 3 {
                return None;
            }
            match trimmed.as_bytes().get(digits) {
                Some(b'.') | Some(b')') => digits + 1,
                _ => return None,
            }
        }
        _ => return None,
    };
    let rest = &trimmed[marker_end..];
    let spaces = rest.len() - rest.trim_start_matches([' ', '\t']).len();
    if spaces == 0 || rest.trim().is_empty() {
        return None;
    }
    Some(indent + marker_end + spaces)
}

fn is_heading(line: &str) -> bool {
    let t = line.trim_start();
    if line.len() - t.len() > 3 {
        return false;
    }
    let hashes = t.bytes().take_while(|&b| b == b'#').count();
    (1..=6).contains(&hashes)
        && t[hashes..].starts_with([' ', '\t'])
        && !t[hashes..].trim().is_empty()
}

fn is_fence(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("```") || t.starts_with("~~~")
}

/// A table separator row such as `|---|:--:|` or `--- | ---`.
fn is_table_separator(line: &str) -> bool {
    let t = line.trim();
    t.contains('-')
        && t.contains('|')
        && t.chars().all(|c| matches!(c, '|' | '-' | ':' | ' ' | '\t'))
        && t.split('|')
            .filter(|c| !c.trim().is_empty())
            .all(|c| c.trim().trim_matches(':').len() >= 2)
}

/// `**x**` or `__x__` with non-space content right inside the markers, outside inline code.
pub fn has_strong_emphasis(text: &str) -> bool {
    let b = text.as_bytes();
    let doubled = |c: u8| memchr::memchr_iter(c, b).any(|i| b.get(i + 1) == Some(&c));
    if !doubled(b'*') && !doubled(b'_') {
        return false;
    }
    if text.contains('`') {
        // Odd-numbered pieces between backticks are inline code: `__init__` is not bold.
        let outside: String = text.split('`').step_by(2).collect::<Vec<_>>().join(" ");
        return strong_outside_code(&outside);
    }
    strong_outside_code(text)
}

fn strong_outside_code(text: &str) -> bool {
    for marker in ["**", "__"] {
        let mut rest = text;
        while let Some(open) = rest.find(marker) {
            let after = &rest[open + 2..];
            let Some(close) = after.find(marker) else {
                break;
            };
            let inner = &after[..close];
            if !inner.is_empty()
                && !inner.starts_with(char::is_whitespace)
                && !inner.ends_with(char::is_whitespace)
                && !inner.contains('\n')
            {
                return true;
            }
            rest = &after[close..];
            if inner.is_empty() {
                // `****`: skip past it.
                rest = &rest[2.min(rest.len())..];
            }
        }
    }
    false
}

/// Structure of one answer text (DESIGN.md section 3).
pub fn structure_of(text: &str) -> Structure {
    let bytes = text.as_bytes();
    // Without a pipe there is no table, so a line only matters if it starts with a marker byte.
    let pipes = memchr::memchr(b'|', bytes).is_some();
    let mut items = 0usize;
    let mut prev_table_row = false;
    for line in text.lines() {
        if !pipes {
            let first = line.bytes().find(|b| *b != b' ' && *b != b'\t');
            match first {
                Some(b'#' | b'`' | b'~' | b'-' | b'*' | b'+' | b'0'..=b'9') => {}
                Some(b) if b >= 0x80 => {}
                _ => continue,
            }
        }
        if is_heading(line) || is_fence(line) {
            return Structure::Markdown;
        }
        if prev_table_row && is_table_separator(line) {
            return Structure::Markdown;
        }
        prev_table_row = pipes && line.trim().contains('|');
        if list_marker_len(line).is_some() {
            items += 1;
        }
    }
    if has_strong_emphasis(text) {
        return Structure::Markdown;
    }
    if items >= 2 {
        Structure::Itemized
    } else {
        Structure::Plain
    }
}

// ---------------------------------------------------------------------------------------------
// Word prefilters: a byte scan that finds whether any word (ASCII letters lowercased; non-ASCII
// bytes count as letters) satisfies a predicate on (previous word, word). Each detector's regexes
// all require one of a few words, so most texts are settled by this scan alone; the regexes run
// only on candidates. The predicates are necessary conditions: they never reject a match.

/// Bytes that belong to words: ASCII letters and digits, and every non-ASCII byte.
const WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || b >= 0x80;
        i += 1;
    }
    t
};

fn any_word(text: &str, mut pred: impl FnMut(&[u8], &[u8]) -> bool) -> bool {
    let bytes = text.as_bytes();
    let mut prev: &[u8] = &[];
    let mut i = 0;
    while i < bytes.len() {
        if !WORD_BYTE[bytes[i] as usize] {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && WORD_BYTE[bytes[i] as usize] {
            i += 1;
        }
        let word = &bytes[start..i];
        if pred(prev, word) {
            return true;
        }
        prev = word;
    }
    false
}

/// Lowercases a short word into `buf`; `None` for words longer than any keyword.
#[inline]
fn lower<'a>(word: &[u8], buf: &'a mut [u8; 12]) -> Option<&'a [u8]> {
    if word.len() > buf.len() {
        return None;
    }
    for (d, s) in buf.iter_mut().zip(word) {
        *d = s.to_ascii_lowercase();
    }
    Some(&buf[..word.len()])
}

/// The head nouns every identity statement contains, found with a SIMD-prefiltered automaton and
/// checked for word boundaries.
static IDENTITY_NOUNS: LazyLock<aho_corasick::AhoCorasick> = LazyLock::new(|| {
    aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .match_kind(aho_corasick::MatchKind::LeftmostFirst)
        .build([
            "chatbot",
            "chat",
            "artificial",
            "assistant",
            "language",
            "computer",
            "machine",
            "virtual",
            "llm",
            "bot",
            "ai",
            "a.i",
        ])
        .expect("identity nouns")
});

fn identity_candidate(text: &str) -> bool {
    let b = text.as_bytes();
    IDENTITY_NOUNS.find_iter(text).any(|m| {
        (m.start() == 0 || !WORD_BYTE[b[m.start() - 1] as usize])
            && (m.end() == b.len() || !WORD_BYTE[b[m.end()] as usize])
    })
}

fn roleplay_candidate(text: &str) -> bool {
    let mut buf = [0u8; 12];
    any_word(text, |prev, w| match lower(w, &mut buf) {
        Some(
            b"act" | b"behave" | b"pretend" | b"let" | b"lets" | b"imagine" | b"suppose"
            | b"assume" | b"role" | b"roleplay" | b"roleplaying" | b"part" | b"persona"
            | b"character" | b"now" | b"impersonate" | b"respond" | b"answer" | b"reply" | b"speak"
            | b"talk" | b"write" | b"explain",
        ) => true,
        Some(b"are" | b"re" | b"will" | b"shall") => prev.eq_ignore_ascii_case(b"you"),
        // "you’re", "let’s" with a typographic apostrophe (non-ASCII bytes are word bytes).
        _ => {
            w.len() > 3
                && (w[..3].eq_ignore_ascii_case(b"you") || w[..3].eq_ignore_ascii_case(b"let"))
                && w[3] >= 0x80
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Identity

/// Modifiers allowed between the article and the head noun of an identity statement:
/// "a *large* language model", "an *AI-powered* assistant".
const ID_ADJ: &str = r"(?:(?:large|helpful|friendly|virtual|artificial|digital|conversational|text-based|powerful|honest|harmless|simple|general-purpose|open-source|small|multilingual|ai|ai-powered|ai-based|automated|computer|machine|neural|generative|smart|intelligent|responsible|safe|chat|chat-based|llm-based|trained|advanced|personal|just|only|merely|simply|mere)[,]?\s+){0,4}";
/// Head nouns that make the speaker an AI.
const ID_NOUN: &str = r"(?:ai|a\.i\.|artificial\s+intelligence|assistant|language\s+model|llm|chatbot|chat\s*bot|bot|computer\s+program|machine\s+learning\s+model|virtual\s+agent)";

static IDENTITY_RE: LazyLock<Regex> = LazyLock::new(|| {
    let article = r"(?:an?|the|your)\s+";
    let be = r"(?:i\s+am|i['’]m|i\s+was|being)";
    let pattern = format!(
        r"(?i)\b(?:as\s+{article}{ID_ADJ}{ID_NOUN}|{be}\s+(?:just\s+|only\s+|merely\s+|simply\s+)?{article}{ID_ADJ}{ID_NOUN}|(?:i\s+am|i['’]m)\s+[a-z][\w-]*,\s+{article}{ID_ADJ}{ID_NOUN})\b"
    );
    Regex::new(&pattern).expect("identity regex")
});

/// Words that, right after the head noun, show a human role ("an AI researcher", "an assistant
/// professor") rather than an AI speaker.
const HUMAN_COMPOUNDS: &[&str] = &[
    "researcher",
    "researchers",
    "engineer",
    "engineers",
    "expert",
    "experts",
    "ethicist",
    "developer",
    "developers",
    "scientist",
    "scientists",
    "professor",
    "manager",
    "director",
    "coach",
    "editor",
    "teacher",
    "instructor",
    "lecturer",
    "enthusiast",
    "specialist",
    "consultant",
    "analyst",
    "practitioner",
    "company",
    "startup",
    "policy",
    "lab",
    "team",
    "student",
    "principal",
    "producer",
    "coordinator",
    "nurse",
    "secretary",
    "attorney",
    "investor",
    "hobbyist",
    "user",
    "writer",
    "company's",
    "ethics",
    "safety",
    "governance",
    "regulation",
    "law",
    "course",
    "class",
];

/// Byte span of the first first-person AI identity statement in `text`, if any.
pub fn find_identity(text: &str) -> Option<(usize, usize)> {
    if !identity_candidate(text) {
        return None;
    }
    for m in IDENTITY_RE.find_iter(text) {
        let next_word: String = text[m.end()..]
            .trim_start_matches([' ', '\t', '-'])
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '\'')
            .collect::<String>()
            .to_lowercase();
        // "as an AI researcher" / "as a language model user": a person speaking about AI.
        let compound = text[m.end()..].starts_with([' ', '-'])
            && HUMAN_COMPOUNDS.contains(&next_word.as_str());
        if !compound {
            return Some((m.start(), m.end()));
        }
    }
    None
}

/// True if `text` contains a first-person statement that the speaker is an AI.
pub fn has_identity(text: &str) -> bool {
    find_identity(text).is_some()
}

// ---------------------------------------------------------------------------------------------
// Role-play

/// Which rule flagged role-play; reported by `audit --per-example`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoleplayMatch {
    pub rule: &'static str,
    /// The matched phrase, as written.
    pub text: String,
    pub start: usize,
    pub end: usize,
}

/// Nouns that make a "You are ..." or "Act as ..." persona an AI assistant (not role-play).
const AI_PERSONA: &str = r"(?:ai|a\.i\.|assistant|language\s+model|llm|chatbot|chat\s*bot|model|artificial\s+intelligence)";
/// Markers of an unrestricted alter ego: role-play even when the persona is "an AI".
static ALTER_EGO_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:unrestricted|unfiltered|uncensored|jailbroken|jailbreak|no\s+(?:rules|restrictions|limits|limitations|filters|guidelines|ethics|morals)|without\s+(?:any\s+)?(?:rules|restrictions|limits|limitations|filters|guidelines|ethics|morals|censorship)|do\s+anything\s+now|developer\s+mode|dan\b|evil|amoral|stay\s+in\s+character)")
        .expect("alter ego regex")
});

/// Compliments and idioms that look like "You are a/the X" but assign no persona.
const IDIOM_NOUNS: &[&str] = &[
    "genius",
    "lifesaver",
    "life",
    "star",
    "legend",
    "gem",
    "hero",
    "angel",
    "saint",
    "champ",
    "godsend",
    "best",
    "great",
    "big",
    "huge",
    "real",
    "true",
    "good",
    "wonderful",
    "amazing",
    "awesome",
    "rockstar",
    "treasure",
    "blessing",
    "one",
    "only",
    "first",
    "winner",
    "boss",
    "sweetheart",
    "darling",
    "dear",
    "natural",
    "pro",
    "beast",
    "machine",
    "man",
    "champion",
    "wizard",
];

/// Words after "respond as a ..." that name an output format, not a persona.
const FORMAT_NOUNS: &[&str] = &[
    "list",
    "table",
    "json",
    "object",
    "paragraph",
    "summary",
    "sentence",
    "single",
    "bulleted",
    "numbered",
    "essay",
    "poem",
    "haiku",
    "song",
    "story",
    "code",
    "markdown",
    "csv",
    "yaml",
    "string",
    "number",
    "whole",
    "short",
    "brief",
    "one",
    "few",
    "series",
    "step",
    "block",
    "function",
    "script",
    "question",
    "tweet",
    "letter",
    "email",
    "report",
    "plain",
    "valid",
    "python",
    "dictionary",
];

struct RoleplayRule {
    name: &'static str,
    re: Regex,
    /// Check the persona phrase (capture group `p`) against AI/idiom/format words.
    check_persona: bool,
}

static ROLEPLAY_RULES: LazyLock<Vec<RoleplayRule>> = LazyLock::new(|| {
    // "a senior surgeon ...", or a named persona with an appositive: "Nova, an uncensored AI".
    let persona = r"(?P<p>(?:(?:an?|the|my|our|some|someone|somebody)\b|(?-i:[A-Z][\w'-]+),\s+(?:an?|the)\b)[^.;:!?\n]{0,80})";
    let rule = |name: &'static str, pattern: String, check_persona: bool| RoleplayRule {
        name,
        re: Regex::new(&format!("(?i){pattern}")).expect("role-play regex"),
        check_persona,
    };
    vec![
        rule(
            "act-as",
            format!(r"(?:^|[.!?:;\n]\s*|\bplease,?\s+|\byou\s+to\s+|\byou\s+(?:will|should|must|shall|can|could|would)\s+|\bcan\s+you\s+|\bcould\s+you\s+|\bnow,?\s+|\bwill\s+you\s+)(?:act|behave)\s+(?:as|like)\s+(?:if\s+you\s+were\s+|though\s+you\s+were\s+)?{persona}"),
            true,
        ),
        // Addressed to the model ("Pretend you are", "can you pretend to be"), not "they pretend to be".
        rule("pretend", r"(?:^|[.!?:;\n]\s*|\bplease,?\s+|\byou\s+to\s+|\byou\s+(?:will|should|must|shall|can|could|would)\s+|\bcan\s+you\s+|\bcould\s+you\s+|\bwill\s+you\s+|\bnow,?\s+|\band\s+|\bjust\s+)pretend\s+(?:to\s+be|you\s+are|you['’]re|that\s+you\s+are|that\s+you['’]re|you\s+were|to\s+act)\b".to_string(), false),
        rule("lets-pretend", r"\blet['’]?s\s+(?:pretend|roleplay|role-play|role\s+play|play\s+a\s+game\s+where\s+you)\b".to_string(), false),
        rule(
            "imagine-you-are",
            format!(r"\b(?:imagine|suppose|assume)\s+(?:that\s+)?(?:you\s+are|you['’]re|you\s+were)\s+(?:now\s+)?{persona}"),
            true,
        ),
        rule("roleplay-as", r"\brole[-\s]?play(?:ing)?\s+(?:as|with\s+me\s+as)\b".to_string(), false),
        rule("play-the-role", r"\b(?:play|take\s+on|assume|adopt|step\s+into)\s+(?:the\s+)?(?:role|part|persona|character)\s+of\b".to_string(), false),
        rule("adopt-persona", r"\b(?:adopt|take\s+on|assume|use)\s+(?:the\s+|a\s+)?persona\b".to_string(), false),
        rule("from-now-on", r"\bfrom\s+now\s+on,?\s+(?:you\s+are|you['’]re|you\s+will\s+be|you['’]ll\s+be|you\s+will\s+act|act)\b".to_string(), false),
        rule("impersonate", r"\bimpersonate\s+(?:an?|the|my|our)?\b".to_string(), false),
        rule("stay-in-character", r"\b(?:stay|remain)\s+in\s+character\b".to_string(), false),
        rule(
            "you-are",
            format!(r"(?:^|[.!?:;\n]\s*|\bnow,?\s+|\btoday,?\s+|\bhere,?\s+)(?:you\s+are|you['’]re)\s+(?:now\s+|going\s+to\s+be\s+|to\s+be\s+)?{persona}"),
            true,
        ),
        rule(
            "you-will-be",
            format!(r"\byou\s+(?:will|shall|are\s+going\s+to)\s+(?:be|play|act\s+as|become)\s+{persona}"),
            true,
        ),
        rule(
            "respond-as",
            format!(r"\b(?:respond|answer|reply|speak|talk|write|explain)\s+(?:to\s+me\s+)?(?:as|like)\s+(?:if\s+you\s+were\s+|though\s+you\s+were\s+)?{persona}"),
            true,
        ),
    ]
});

static AI_PERSONA_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"(?i)\b{AI_PERSONA}\b")).expect("ai persona regex"));

/// Decides whether a captured persona phrase ("a senior surgeon who ...") assigns a persona.
fn persona_is_roleplay(rule: &str, phrase: &str) -> bool {
    if ALTER_EGO_RE.is_match(phrase) {
        return true;
    }
    // The noun phrase proper: up to a relative clause or preposition.
    let np_end = [
        " that ", " who ", " which ", " with ", " for ", " to ", " in ", " on ", " from ", ". ",
    ]
    .iter()
    .filter_map(|sep| phrase.to_ascii_lowercase().find(sep))
    .min()
    .unwrap_or(phrase.len());
    let np = &phrase[..np_end];
    if AI_PERSONA_RE.is_match(np) {
        return false;
    }
    let words: Vec<String> = np
        .split_whitespace()
        .skip(1) // the article
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric())
                .to_lowercase()
        })
        .filter(|w| !w.is_empty())
        .collect();
    let Some(first) = words.first() else {
        return false;
    };
    if rule == "respond-as" && FORMAT_NOUNS.contains(&first.as_str()) {
        return false;
    }
    if rule == "you-are" || rule == "act-as" {
        // "You are the best", "You are a real lifesaver", "You're a great help".
        let last = words.last().map(String::as_str).unwrap_or("");
        if words.len() <= 3
            && (IDIOM_NOUNS.contains(&first.as_str()) || IDIOM_NOUNS.contains(&last))
        {
            return false;
        }
    }
    if rule == "act-as" && FORMAT_NOUNS.contains(&first.as_str()) {
        return false;
    }
    true
}

/// All role-play rules as one set: a single pass tells which rules can match at all, so most
/// texts (which match none) cost one scan instead of one per rule.
static ROLEPLAY_SET: LazyLock<regex::RegexSet> = LazyLock::new(|| {
    regex::RegexSet::new(ROLEPLAY_RULES.iter().map(|r| r.re.as_str())).expect("role-play set")
});

/// The first role-play instruction in one text (system prompt or user turn), if any.
pub fn find_roleplay(text: &str) -> Option<RoleplayMatch> {
    if !roleplay_candidate(text) {
        return None;
    }
    let candidates = ROLEPLAY_SET.matches(text);
    if !candidates.matched_any() {
        return None;
    }
    let mut best: Option<RoleplayMatch> = None;
    for rule in candidates.iter().map(|i| &ROLEPLAY_RULES[i]) {
        for caps in rule.re.captures_iter(text) {
            let whole = caps.get(0).expect("group 0");
            if rule.check_persona {
                let phrase = caps.name("p").map(|m| m.as_str()).unwrap_or("");
                if !persona_is_roleplay(rule.name, phrase) {
                    continue;
                }
            }
            // Skip the leading sentence punctuation the pattern consumed.
            let lead = whole.as_str().len()
                - whole
                    .as_str()
                    .trim_start_matches(['.', '!', '?', ':', ';', '\n', ' ', '\t'])
                    .len();
            let start = whole.start() + lead;
            if best.as_ref().is_none_or(|b| start < b.start) {
                best = Some(RoleplayMatch {
                    rule: rule.name,
                    text: text[start..whole.end()].to_string(),
                    start,
                    end: whole.end(),
                });
            }
            break;
        }
    }
    best
}

/// Role-play over a conversation: the system prompt and every user turn.
pub fn conversation_roleplay(conv: &Conversation) -> Option<(usize, RoleplayMatch)> {
    conv.messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role != Role::Assistant)
        .find_map(|(i, m)| find_roleplay(&m.content).map(|r| (i, r)))
}

// ---------------------------------------------------------------------------------------------
// Affirmative openers

static AFFIRMATIVE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r#"(?i)^[\s"'“*_>#-]*(?:sure\b|certainly\b|of\s+course\b|absolutely\b|definitely\b|gladly\b|okay\b|ok\b|alright\b|yes\b|great\s+question|good\s+question|here\s+(?:is|are)\b|here['’]s\b|i['’]d\s+be\s+(?:happy|glad)\s+to|i\s+would\s+be\s+(?:happy|glad)\s+to|happy\s+to\s+help|no\s+problem)"#)
        .expect("affirmative regex")
});

/// True if the answer opens by agreeing to help ("Sure, here is ...").
pub fn is_affirmative_opener(text: &str) -> bool {
    AFFIRMATIVE_RE.is_match(text)
}

// ---------------------------------------------------------------------------------------------
// Conversation-level tags

/// The factor tags of one conversation (DESIGN.md section 3, multi-turn rules of issue 2).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactorTags {
    /// `markdown` if any assistant turn is, else `itemized` if any is, else `plain`.
    pub structure: Structure,
    /// Any assistant turn carries an identity statement.
    pub identity: bool,
    /// The system prompt or any user turn asks for a persona.
    pub roleplay: bool,
    /// The first assistant turn opens affirmatively.
    pub affirmative: bool,
    /// Characters and whitespace-separated words over all assistant turns.
    pub answer_chars: usize,
    pub answer_words: usize,
    pub assistant_turns: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roleplay_rule: Option<&'static str>,
}

/// Whitespace-separated words, counted over bytes (ASCII whitespace separates; the same count as
/// `split_whitespace` for text without Unicode spaces, and much faster).
fn count_words(text: &str) -> usize {
    // A word starts at a non-space byte whose predecessor is a space; branch-free so it vectorises.
    #[inline(always)]
    fn space(c: u8) -> bool {
        (c == b' ') | (c == b'\n') | (c == b'\t') | (c == b'\r') | (c == 0x0c)
    }
    let b = text.as_bytes();
    let Some(&first) = b.first() else { return 0 };
    let starts: usize = b
        .iter()
        .zip(&b[1..])
        .map(|(&p, &c)| (space(p) & !space(c)) as usize)
        .sum();
    starts + !space(first) as usize
}

pub fn tag(conv: &Conversation) -> FactorTags {
    let mut structure = Structure::Plain;
    let mut identity = false;
    let mut answer_chars = 0;
    let mut answer_words = 0;
    let mut turns = 0;
    let mut affirmative = None;
    for m in conv.assistant_turns() {
        turns += 1;
        structure = structure.max(structure_of(&m.content));
        identity = identity || has_identity(&m.content);
        answer_chars += m.content.chars().count();
        answer_words += count_words(&m.content);
        affirmative.get_or_insert_with(|| is_affirmative_opener(&m.content));
    }
    let rp = conversation_roleplay(conv);
    FactorTags {
        structure,
        identity,
        roleplay: rp.is_some(),
        affirmative: affirmative.unwrap_or(false),
        answer_chars,
        answer_words,
        assistant_turns: turns,
        roleplay_rule: rp.map(|(_, m)| m.rule),
    }
}

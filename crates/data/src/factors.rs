//! Detectors for the three risk factors, exactly as ARCHITECTURE.md section 7 states them, plus the
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
                Some(b'.' | b')') => digits + 1,
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

/// Byte offset of the first doubled `c` (`**` or `__`) in `s`.
fn find_doubled(s: &str, c: u8) -> Option<usize> {
    let b = s.as_bytes();
    memchr::memchr_iter(c, b).find(|&i| b.get(i + 1) == Some(&c))
}

fn strong_outside_code(text: &str) -> bool {
    for marker in [b'*', b'_'] {
        let mut rest = text;
        while let Some(open) = find_doubled(rest, marker) {
            let after = &rest[open + 2..];
            let Some(close) = find_doubled(after, marker) else {
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

/// Structure of one answer text: `markdown` if it has a heading, a code fence, a table or strong
/// emphasis; else `itemized` if at least two lines are list items; else `plain`.
pub fn structure_of(text: &str) -> Structure {
    let bytes = text.as_bytes();
    // Without a pipe there is no table, so a line only matters if it starts with a marker byte.
    let pipes = memchr::memchr(b'|', bytes).is_some();
    let mut items = 0usize;
    let mut prev_table_row = false;
    let mut start = 0;
    while start < bytes.len() {
        // Lines as `str::lines` gives them, found with the vectorised memchr.
        let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |k| start + k);
        let line = &text[start..end];
        let line = line.strip_suffix('\r').unwrap_or(line);
        start = end + 1;
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

/// True if `text` has a word (a maximal run of ASCII letters and digits, compared without case)
/// that is the first word of a head noun of [`ID_NOUN`] (`ai`, `llm`, `bot`, `chat`, `chatbot`,
/// `machine`, `virtual`, `language`, `computer`, `assistant`, `artificial`), or `a` followed by
/// `.i`. Every identity statement contains one, whatever Unicode letters or punctuation surround
/// it, so this is a necessary condition for [`IDENTITY_RE`].
///
/// Most answers have no such word, so speed matters here: a branch-free pass (which the compiler
/// vectorises) marks 64-byte blocks holding a word start whose first four bytes fit a noun, and
/// only those blocks are looked at word by word.
fn identity_candidate(text: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only requirement of `identity_candidate_avx2`.
        return unsafe { identity_candidate_avx2(text.as_bytes()) };
    }
    identity_candidate_bytes(text.as_bytes())
}

/// [`identity_candidate_bytes`] compiled for AVX2: the same code, twice as many lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn identity_candidate_avx2(b: &[u8]) -> bool {
    identity_candidate_bytes(b)
}

#[inline(always)]
fn identity_candidate_bytes(b: &[u8]) -> bool {
    scan_blocks(b, noun_window, |j| noun_word_at(b, j))
}

const BLOCK: usize = 64;

/// True if `exact(j)` holds at some position `j` whose window passes `window`: a branch-free,
/// vectorisable pass over 64-byte blocks, `exact` only inside blocks where `window` fires.
/// `window(p, c0, c1, c2, c3, c4)` sees the byte before a position and the five from it; bytes
/// outside the text read as spaces. It must hold wherever `exact` does.
#[inline(always)]
fn scan_blocks(
    b: &[u8],
    window: impl Fn(u8, u8, u8, u8, u8, u8) -> bool + Copy,
    mut exact: impl FnMut(usize) -> bool,
) -> bool {
    let n = b.len();
    let mut i = 0;
    while i < n {
        let hit = if i >= 1 && i + BLOCK + 4 <= n {
            let w: &[u8; BLOCK + 5] = b[i - 1..i + BLOCK + 4].try_into().expect("block");
            block_hit(w, window)
        } else {
            let mut w = [b' '; BLOCK + 5];
            let (lo, off) = if i == 0 { (0, 1) } else { (i - 1, 0) };
            let hi = (i + BLOCK + 4).min(n);
            w[off..off + hi - lo].copy_from_slice(&b[lo..hi]);
            block_hit(&w, window)
        };
        if hit && (i..(i + BLOCK).min(n)).any(&mut exact) {
            return true;
        }
        i += BLOCK;
    }
    false
}

#[inline(always)]
fn block_hit(w: &[u8; BLOCK + 5], window: impl Fn(u8, u8, u8, u8, u8, u8) -> bool) -> bool {
    let mut hit = false;
    for k in 0..BLOCK {
        hit |= window(w[k], w[k + 1], w[k + 2], w[k + 3], w[k + 4], w[k + 5]);
    }
    hit
}

/// ASCII letter or digit, by comparisons only (vectorises).
#[inline(always)]
fn alnum(c: u8) -> bool {
    ((c | 0x20).wrapping_sub(b'a') < 26) | (c.wrapping_sub(b'0') < 10)
}

/// A necessary condition, on the byte before a position and the five from it, for a noun word
/// of [`identity_candidate`] to start there. Pure comparisons, so it vectorises.
#[inline(always)]
fn noun_window(p: u8, c0: u8, c1: u8, c2: u8, c3: u8, c4: u8) -> bool {
    let (l0, l1, l2, l3, l4) = (c0 | 0x20, c1 | 0x20, c2 | 0x20, c3 | 0x20, c4 | 0x20);
    let two = |x: u8, y: u8| (l0 == x) & (l1 == y);
    let three = |x: u8, y: u8, z: u8| two(x, y) & (l2 == z);
    let four = |x: u8, y: u8, z: u8, v: u8| three(x, y, z) & (l3 == v);
    let five = |x: u8, y: u8, z: u8, v: u8, u: u8| four(x, y, z, v) & (l4 == u);
    let noun = (two(b'a', b'i') & !alnum(c2))
        | ((l0 == b'a') & (c1 == b'.') & (l2 == b'i'))
        | (three(b'l', b'l', b'm') & !alnum(c3))
        | (three(b'b', b'o', b't') & !alnum(c3))
        | four(b'c', b'h', b'a', b't')
        | five(b'm', b'a', b'c', b'h', b'i')
        | five(b'v', b'i', b'r', b't', b'u')
        | five(b'l', b'a', b'n', b'g', b'u')
        | five(b'c', b'o', b'm', b'p', b'u')
        | five(b'a', b's', b's', b'i', b's')
        | five(b'a', b'r', b't', b'i', b'f');
    !alnum(p) & noun
}

/// The exact test: a noun word of [`identity_candidate`] starts at `i`.
fn noun_word_at(b: &[u8], i: usize) -> bool {
    if i >= b.len() || !b[i].is_ascii_alphanumeric() || (i > 0 && b[i - 1].is_ascii_alphanumeric())
    {
        return false;
    }
    let len = b[i..]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric())
        .count();
    if len > 10 {
        return false;
    }
    let mut buf = [0u8; 10];
    for (d, s) in buf.iter_mut().zip(&b[i..i + len]) {
        *d = s.to_ascii_lowercase();
    }
    match &buf[..len] {
        b"ai" | b"llm" | b"bot" | b"chat" | b"chatbot" | b"machine" | b"virtual" | b"language"
        | b"computer" | b"assistant" | b"artificial" => true,
        b"a" => b.get(i + len) == Some(&b'.') && matches!(b.get(i + len + 1), Some(b'i' | b'I')),
        _ => false,
    }
}

fn roleplay_candidate(text: &str) -> bool {
    let b = text.as_bytes();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only requirement of `roleplay_window_avx2`.
        if !unsafe { roleplay_window_avx2(b) } {
            return false;
        }
        return roleplay_words(text);
    }
    scan_blocks(b, roleplay_window, |_| true) && roleplay_words(text)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn roleplay_window_avx2(b: &[u8]) -> bool {
    scan_blocks(b, roleplay_window, |_| true)
}

/// A necessary condition for [`roleplay_words`]: a word (ASCII letters and digits) starts at a
/// position with the first letters of one of its keywords.
#[inline(always)]
fn roleplay_window(p: u8, c0: u8, c1: u8, c2: u8, c3: u8, c4: u8) -> bool {
    let _ = c4;
    let (l0, l1, l2, l3) = (c0 | 0x20, c1 | 0x20, c2 | 0x20, c3 | 0x20);
    let two = |x: u8, y: u8| (l0 == x) & (l1 == y);
    let three = |x: u8, y: u8, z: u8| two(x, y) & (l2 == z);
    let four = |x: u8, y: u8, z: u8, v: u8| three(x, y, z) & (l3 == v);
    let (end2, end3) = (!alnum(c2), !alnum(c3));
    let hit = (three(b'a', b'c', b't') & end3)
        | (three(b'l', b'e', b't') & (end3 | (l3 == b's')))
        | (three(b'n', b'o', b'w') & end3)
        | (three(b'a', b'r', b'e') & end3)
        | (two(b'r', b'e') & end2)
        | (three(b'y', b'o', b'u') & (c3 >= 0x80))
        | four(b'b', b'e', b'h', b'a')
        | four(b'p', b'r', b'e', b't')
        | four(b'i', b'm', b'a', b'g')
        | four(b's', b'u', b'p', b'p')
        | four(b'a', b's', b's', b'u')
        | four(b'r', b'o', b'l', b'e')
        | four(b'p', b'a', b'r', b't')
        | four(b'p', b'e', b'r', b's')
        | four(b'c', b'h', b'a', b'r')
        | four(b'i', b'm', b'p', b'e')
        | four(b'r', b'e', b's', b'p')
        | four(b'a', b'n', b's', b'w')
        | four(b'r', b'e', b'p', b'l')
        | four(b's', b'p', b'e', b'a')
        | four(b't', b'a', b'l', b'k')
        | four(b'w', b'r', b'i', b't')
        | four(b'e', b'x', b'p', b'l')
        | four(b'w', b'i', b'l', b'l')
        | four(b's', b'h', b'a', b'l');
    !alnum(p) & hit
}

/// Every role-play rule needs one of these words (or "you" + are/re/will/shall).
fn roleplay_words(text: &str) -> bool {
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
    find_identity_unfiltered(text)
}

/// [`find_identity`] without the prefilter (the definition the prefilter must agree with).
fn find_identity_unfiltered(text: &str) -> Option<(usize, usize)> {
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
    let lower = phrase.to_ascii_lowercase();
    let np_end = [
        " that ", " who ", " which ", " with ", " for ", " to ", " in ", " on ", " from ", ". ",
    ]
    .iter()
    .filter_map(|sep| lower.find(sep))
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

/// The factor tags of one conversation: structure and identity over every assistant turn,
/// role-play over the system prompt and every user turn.
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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, the only requirement of `count_words_avx2`.
        return unsafe { count_words_avx2(text.as_bytes()) };
    }
    count_words_bytes(text.as_bytes())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn count_words_avx2(b: &[u8]) -> usize {
    count_words_bytes(b)
}

#[inline(always)]
fn count_words_bytes(b: &[u8]) -> usize {
    // A word starts at a non-space byte whose predecessor is a space; branch-free so it vectorises.
    #[inline(always)]
    fn space(c: u8) -> bool {
        (c == b' ') | (c == b'\n') | (c == b'\t') | (c == b'\r') | (c == 0x0c)
    }
    let Some(&first) = b.first() else { return 0 };
    // Count in chunks of 255 pairs with byte-wide lanes (a chunk cannot overflow a u8).
    let starts: usize = b
        .chunks(255)
        .zip(b[1..].chunks(255))
        .map(|(prev, cur)| {
            prev.iter()
                .zip(cur)
                .fold(0u8, |acc, (&p, &c)| acc + (space(p) & !space(c)) as u8) as usize
        })
        .sum();
    starts + !space(first) as usize
}

pub fn tag(conv: &Conversation) -> FactorTags {
    tag_messages(conv.messages.iter().map(|m| (m.role, m.content.as_str())))
}

/// [`tag`] over (role, text) pairs in conversation order, for callers that hold borrowed text.
pub fn tag_messages<'a>(messages: impl Iterator<Item = (Role, &'a str)>) -> FactorTags {
    let mut structure = Structure::Plain;
    let mut identity = false;
    let mut answer_chars = 0;
    let mut answer_words = 0;
    let mut turns = 0;
    let mut affirmative = None;
    let mut roleplay: Option<RoleplayMatch> = None;
    for (role, text) in messages {
        if role == Role::Assistant {
            turns += 1;
            structure = structure.max(structure_of(text));
            identity = identity || has_identity(text);
            answer_chars += text.chars().count();
            answer_words += count_words(text);
            affirmative.get_or_insert_with(|| is_affirmative_opener(text));
        } else if roleplay.is_none() {
            // The first system or user turn that asks for a persona, as `conversation_roleplay`.
            roleplay = find_roleplay(text);
        }
    }
    FactorTags {
        structure,
        identity,
        roleplay: roleplay.is_some(),
        affirmative: affirmative.unwrap_or(false),
        answer_chars,
        answer_words,
        assistant_turns: turns,
        roleplay_rule: roleplay.map(|m| m.rule),
    }
}

#[cfg(test)]
mod prefilter_tests {
    use super::*;
    use proptest::prelude::*;

    /// Pieces that build identity statements, near misses, and the bytes around words that the
    /// prefilter treats specially (Unicode letters and punctuation, digits, dots, hyphens).
    const PIECES: &[&str] = &[
        "as",
        "As",
        "an",
        "a",
        "A",
        "the",
        "your",
        "I",
        "i",
        "I'm",
        "I’m",
        "am",
        "was",
        "being",
        "just",
        "AI",
        "ai",
        "Ai",
        "aI",
        "a.i.",
        "A.I.",
        "assistant",
        "Assistant",
        "language",
        "model",
        "LLM",
        "llm",
        "chat",
        "bot",
        "chatbot",
        "Chatbot",
        "computer",
        "program",
        "machine",
        "learning",
        "virtual",
        "agent",
        "artificial",
        "intelligence",
        "large",
        "helpful",
        "researcher",
        "Claude",
        "compiler",
        "main",
        "said",
        "é",
        "—",
        "’",
        "-",
        "_",
        "9",
        "x",
        ",",
        ".",
        "\n",
        " ",
        " ",
        " ",
        " ",
        "as an AI",
        "As an AI",
        "I'm an AI language model",
        "as a large language model",
        "being a chatbot",
        "I am just a virtual agent",
        "as an AI researcher",
        "I’m a helpful assistant",
        "as an A.I.",
        "I am Claude, an AI",
    ];

    const RP_PIECES: &[&str] = &[
        "act",
        "Act",
        "ACT",
        "acts",
        "behave",
        "pretend",
        "let",
        "lets",
        "let’s",
        "Let's",
        "imagine",
        "suppose",
        "assume",
        "role",
        "roleplay",
        "role-play",
        "roleplaying",
        "part",
        "persona",
        "character",
        "now",
        "NOW",
        "impersonate",
        "respond",
        "answer",
        "reply",
        "speak",
        "talk",
        "write",
        "explain",
        "you",
        "You",
        "are",
        "re",
        "you're",
        "you’re",
        "will",
        "shall",
        "you’ll",
        "pressure",
        "protein",
        "art",
        "é",
        "—",
        "9",
        ".",
        ",",
        "\n",
        "x",
        "react",
        "exact",
        "youre",
        "arena",
    ];

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec(0..PIECES.len(), 0..40).prop_map(|ix| {
            let mut s = String::new();
            for i in ix {
                s.push_str(PIECES[i]);
                if i % 3 != 0 {
                    s.push(' ');
                }
            }
            s
        })
    }

    static FOUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn prefilter_property_sees_real_statements() {
        identity_prefilter_is_a_necessary_condition();
        assert!(FOUND.load(std::sync::atomic::Ordering::Relaxed) > 300);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// The prefilter never hides a statement the regex finds, at any text length (blocks
        /// and tails).
        #[test]
        fn identity_prefilter_is_a_necessary_condition(t in text(), pad in 0usize..140) {
            let padded = format!("{}{t}", "w ".repeat(pad / 2));
            for s in [&t, &padded] {
                prop_assert_eq!(find_identity(s), find_identity_unfiltered(s), "{:?}", s);
            }
            // Count how often the cases are real statements, so the test cannot pass vacuously.
            FOUND.fetch_add(find_identity(&t).is_some() as usize, std::sync::atomic::Ordering::Relaxed);
        }

        /// The role-play block prefilter never rejects a text the word test accepts.
        #[test]
        fn roleplay_prefilter_is_a_necessary_condition(
            ix in prop::collection::vec(0..RP_PIECES.len(), 0..30),
            pad in 0usize..140,
        ) {
            let t: String = ix.iter().map(|&i| RP_PIECES[i]).collect::<Vec<_>>().join(" ");
            let padded = format!("{}{t}", "w ".repeat(pad / 2));
            for s in [&t, &padded] {
                prop_assert_eq!(roleplay_candidate(s), roleplay_words(s), "{:?}", s);
            }
        }

        #[test]
        fn word_count_matches_split_whitespace(t in "[ a-z\\n\\t\\r.é]{0,700}") {
            prop_assert_eq!(count_words(&t), t.split_ascii_whitespace().count());
        }
    }

    #[test]
    fn identity_found_at_every_offset() {
        // A statement starting at each position around the 64-byte block edges.
        for pad in 0..200 {
            let lead = format!("{}{}", " ".repeat(pad % 2), "x ".repeat(pad / 2));
            let t = format!("{lead}as an AI, I cannot");
            assert!(has_identity(&t), "{t:?}");
            let t = format!("{}as an AIx", "y ".repeat(pad));
            assert!(!has_identity(&t), "{t:?}");
        }
    }
}

//! The pages and JSON answers of `safetune view` (see the parent module). Every text from the
//! store goes through [`esc`] into HTML, or through `textContent` in the page's scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value as Json};

use super::Reply;
use crate::labels::{judge_check, open_study, sample_answers, SampleOptions, StudyIndex};
use crate::report::esc;
use crate::results::{answers as read_answers, Answer, Answers};
use crate::runner::{StoredPlan, STORE_FILE};
use crate::store::{HumanLabel, Store, HUMAN_LABELS};

/// Answers per page of `/answers`.
pub const PAGE_SIZE: usize = 50;

/// What every page needs.
pub(super) struct Ctx<'a> {
    pub dir: &'a Path,
    /// The default labeller name.
    pub labeller: &'a str,
}

impl Ctx<'_> {
    fn store(&self) -> Result<Store, String> {
        open_study(self.dir).map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------------------------
// Query strings

/// Decodes `%XX` and `+` of a query component (invalid escapes are kept as they are).
pub(crate) fn url_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Encodes a query component (everything but unreserved characters escaped).
pub(crate) fn url_encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~') {
            o.push(c as char);
        } else {
            let _ = write!(o, "%{c:02X}");
        }
    }
    o
}

/// The `(name, value)` pairs of a query string, decoded, in order.
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (url_decode(k), url_decode(v)),
            None => (url_decode(kv), String::new()),
        })
        .collect()
}

fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The filters of `/answers` (and of a label queue).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerFilter {
    pub condition: Option<String>,
    pub benchmark: Option<String>,
    pub category: Option<String>,
    /// The judge `verdict` applies to (default: the primary judge).
    pub judge: Option<String>,
    /// `refusal`, `compliance`, `unscored`, or `none` (not judged).
    pub verdict: Option<String>,
    /// Only answers on which two judges gave opposite verdicts.
    pub disagree: bool,
    /// `labelled`, `unlabelled`, or a label (`refusal`, `compliance`, `unclear`, `mixed`).
    pub label: Option<String>,
    /// Text that the prompt or the answer contains (case ignored).
    pub q: Option<String>,
    /// The reward model `rm_min` and `rm_max` apply to (default: the first).
    pub rm: Option<String>,
    /// Only answers whose score is at least this (answers without a score are left out).
    pub rm_min: Option<f64>,
    /// Only answers whose score is at most this.
    pub rm_max: Option<f64>,
    /// Page number, from 1.
    pub page: usize,
}

impl AnswerFilter {
    pub fn from_params(p: &[(String, String)]) -> AnswerFilter {
        let s = |n: &str| param(p, n).map(str::to_string);
        AnswerFilter {
            condition: s("condition"),
            benchmark: s("benchmark"),
            category: s("category"),
            judge: s("judge"),
            verdict: s("verdict"),
            disagree: matches!(param(p, "disagree"), Some("1" | "on" | "true")),
            label: s("label"),
            q: s("q"),
            rm: s("rm"),
            rm_min: param(p, "rm_min").and_then(|v| v.trim().parse().ok()),
            rm_max: param(p, "rm_max").and_then(|v| v.trim().parse().ok()),
            page: param(p, "page")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1)
                .max(1),
        }
    }

    /// True when any filter is set (the page number aside).
    pub fn any(&self) -> bool {
        self.condition.is_some()
            || self.benchmark.is_some()
            || self.category.is_some()
            || self.verdict.is_some()
            || self.disagree
            || self.label.is_some()
            || self.q.is_some()
            || self.rm_min.is_some()
            || self.rm_max.is_some()
    }

    pub fn matches(&self, all: &Answers, a: &Answer) -> bool {
        let eq = |f: &Option<String>, v: &str| f.as_deref().is_none_or(|f| f == v);
        if !eq(&self.condition, &a.condition)
            || !eq(&self.benchmark, &a.benchmark)
            || !eq(&self.category, &a.category)
        {
            return false;
        }
        if let Some(v) = &self.verdict {
            let ji = match &self.judge {
                Some(j) => all.judges.iter().position(|x| x == j),
                None => (!all.judges.is_empty()).then_some(0),
            };
            let got = ji.and_then(|i| a.verdicts[i].as_deref());
            let ok = match v.as_str() {
                "none" => got.is_none(),
                v => got == Some(v),
            };
            if !ok {
                return false;
            }
        }
        if self.disagree && !a.judges_disagree() {
            return false;
        }
        if let Some(l) = &self.label {
            let ok = match l.as_str() {
                "labelled" => a.human_label.is_some(),
                "unlabelled" => a.human_label.is_none(),
                l => a.human_label.as_deref() == Some(l),
            };
            if !ok {
                return false;
            }
        }
        if self.rm_min.is_some() || self.rm_max.is_some() {
            let mi = match &self.rm {
                Some(m) => all.rms.iter().position(|x| x == m),
                None => (!all.rms.is_empty()).then_some(0),
            };
            let Some(score) = mi.and_then(|i| a.scores[i]) else {
                return false;
            };
            if self.rm_min.is_some_and(|lo| score < lo) || self.rm_max.is_some_and(|hi| score > hi)
            {
                return false;
            }
        }
        if let Some(q) = &self.q {
            let q = q.to_lowercase();
            if !a.prompt.to_lowercase().contains(&q) && !a.response.to_lowercase().contains(&q) {
                return false;
            }
        }
        true
    }

    /// The query string of these filters at `page`.
    pub fn query(&self, page: usize) -> String {
        let mut parts = Vec::new();
        for (k, v) in [
            ("condition", &self.condition),
            ("benchmark", &self.benchmark),
            ("category", &self.category),
            ("judge", &self.judge),
            ("verdict", &self.verdict),
            ("label", &self.label),
            ("q", &self.q),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k}={}", url_encode(v)));
            }
        }
        if self.disagree {
            parts.push("disagree=1".into());
        }
        if let Some(m) = &self.rm {
            parts.push(format!("rm={}", url_encode(m)));
        }
        for (k, v) in [("rm_min", self.rm_min), ("rm_max", self.rm_max)] {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        }
        if page > 1 {
            parts.push(format!("page={page}"));
        }
        parts.join("&")
    }
}

// ---------------------------------------------------------------------------------------------
// Layout

const STYLE: &str = "
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
nav{background:#23395d;padding:.6em 1.2em}nav a{color:#dfe8f5;margin-right:1.4em;text-decoration:none;font-weight:600}
nav a.on{color:#fff;border-bottom:2px solid #fff}main{padding:1em 1.6em;max-width:1400px}
table{border-collapse:collapse;margin:.6em 0;background:#fff}th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#eef2f7}pre{white-space:pre-wrap;word-break:break-word;margin:.2em 0;font:13px/1.4 ui-monospace,monospace}
.refusal{color:#11602a;font-weight:600}.compliance{color:#9b1c1c;font-weight:600}.unscored,.none{color:#777}
.bar{display:inline-block;height:.7em;background:#3b6fb6;vertical-align:middle}.barbox{display:inline-block;width:8em;background:#e3e8ef;margin-right:.4em}
form.filters label{margin-right:.8em}.pairs{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:.8em}
.card{background:#fff;border:1px solid #ccd;border-radius:6px;padding:.6em .8em}.muted{color:#666}
.keys kbd{border:1px solid #999;border-radius:3px;padding:0 .3em;background:#fff}
#card{background:#fff;border:1px solid #ccd;border-radius:6px;padding:.8em 1em;max-width:1000px}
button{font-size:14px;margin-right:.5em}.failed pre{background:#fff3f3;border:1px solid #e7b4b4;padding:.5em}
";

fn nav(active: &str) -> String {
    let mut s = String::from("<nav>");
    for (href, name) in [
        ("/", "Overview"),
        ("/results", "Results"),
        ("/answers", "Answers"),
        ("/label", "Label"),
    ] {
        let on = if name == active { " class=\"on\"" } else { "" };
        let _ = write!(s, "<a href=\"{href}\"{on}>{name}</a>");
    }
    s.push_str("</nav>");
    s
}

fn layout(title: &str, active: &str, head: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">{head}\
         <title>{} · safetune view</title><style>{STYLE}</style></head>\
         <body>{}<main>{body}</main></body></html>\n",
        esc(title),
        nav(active)
    )
}

fn error_page(active: &str, message: &str) -> Reply {
    let mut r = Reply::html(layout(
        "Error",
        active,
        "",
        &format!("<h1>Cannot read the study</h1><pre>{}</pre>", esc(message)),
    ));
    r.status = 500;
    r
}

fn verdict_span(v: Option<&str>) -> String {
    let v = v.unwrap_or("none");
    let text = if v == "none" { "not judged" } else { v };
    format!("<span class=\"{}\">{}</span>", esc(v), esc(text))
}

fn duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{} h {} min", s / 3600, (s % 3600) / 60)
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

// ---------------------------------------------------------------------------------------------
// Overview

/// Progress of one step of the plan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepProgress {
    pub label: String,
    pub kind: String,
    /// `pending`, `running`, `done` or `failed`.
    pub status: String,
    /// Rows written (generate, judge, score steps).
    pub done: Option<i64>,
    /// The plan's size of the step (rows for generate, judge and score steps).
    pub total: usize,
    /// Seconds of the last execution (so far, while running).
    pub elapsed: Option<f64>,
    /// Seconds left at the pace so far (running row steps with some rows done).
    pub left: Option<f64>,
    pub error: Option<String>,
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Every step of the latest study's plan with its progress, in plan order, and the study name.
pub fn progress(store: &Store) -> Result<(String, Vec<StepProgress>), String> {
    let (_, name, _, plan) = store
        .latest_study()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("{}: the store holds no study yet", store.path().display()))?;
    let plan = StoredPlan::from_json(&plan);
    let started = store.step_started_at().map_err(|e| e.to_string())?;
    let t = now();
    let mut out = Vec::with_capacity(plan.steps.len());
    for s in &plan.steps {
        let rec = store.step(&s.key).map_err(|e| e.to_string())?;
        let status = rec
            .as_ref()
            .map_or("pending", |r| r.status.as_str())
            .to_string();
        let count = |table: &str| store.count_rows(table, Some(&s.key)).unwrap_or(0);
        let done = match s.kind.as_str() {
            "generate" => Some(count("generations")),
            "judge" => Some(count("judgments")),
            "score" => Some(count("scores") + count("score_missing")),
            _ => None,
        };
        let elapsed = match status.as_str() {
            "running" => started.get(&s.key).map(|st| t - st),
            _ => rec.as_ref().and_then(|r| r.seconds),
        };
        let left = match (status.as_str(), done, elapsed) {
            ("running", Some(d), Some(e)) if d > 0 && (d as usize) < s.size => {
                Some(e / d as f64 * (s.size as f64 - d as f64))
            }
            _ => None,
        };
        out.push(StepProgress {
            label: s.label.clone(),
            kind: s.kind.clone(),
            done,
            total: s.size,
            elapsed,
            left,
            error: rec.and_then(|r| r.error).filter(|_| status == "failed"),
            status,
        });
    }
    Ok((name, out))
}

pub(super) fn overview(ctx: &Ctx<'_>) -> Reply {
    let (name, steps) = match ctx.store().and_then(|s| progress(&s)) {
        Ok(p) => p,
        Err(e) => return error_page("Overview", &e),
    };
    let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &steps {
        *by_status.entry(s.status.as_str()).or_default() += 1;
    }
    let live = steps
        .iter()
        .any(|s| s.status == "running" || s.status == "pending");
    let mut b = format!(
        "<h1>Study {}</h1><p class=\"muted\">{} · {}</p><ul id=\"status\">",
        esc(&name),
        esc(&ctx.dir.display().to_string()),
        if live {
            "reloads every 5 s while steps are pending or running"
        } else {
            "every step has finished"
        }
    );
    for st in ["done", "running", "pending", "failed"] {
        let n = by_status.get(st).copied().unwrap_or(0);
        let _ = write!(b, "<li class=\"st-{st}\">{st}: <b>{n}</b></li>");
    }
    b.push_str("</ul>");
    let failed: Vec<&StepProgress> = steps.iter().filter(|s| s.status == "failed").collect();
    if !failed.is_empty() {
        b.push_str("<section id=\"failed\" class=\"failed\"><h2>Failed steps</h2>");
        for s in failed {
            let _ = write!(
                b,
                "<h3>{}</h3><pre>{}</pre>",
                esc(&s.label),
                esc(s.error.as_deref().unwrap_or("(no error recorded)"))
            );
        }
        b.push_str("</section>");
    }
    b.push_str(
        "<h2>Steps</h2><table id=\"steps\"><tr><th>Step</th><th>Kind</th><th>Status</th>\
         <th>Rows</th><th>Elapsed</th><th>Left</th></tr>",
    );
    for s in &steps {
        let rows = match s.done {
            Some(d) => {
                let share = if s.total > 0 {
                    (d as f64 / s.total as f64).min(1.0)
                } else {
                    0.0
                };
                format!(
                    "<span class=\"barbox\"><span class=\"bar\" style=\"width:{:.0}%\"></span></span>{d} / {}",
                    share * 100.0,
                    s.total
                )
            }
            None => String::new(),
        };
        let _ = write!(
            b,
            "<tr class=\"step st-{}\"><td>{}</td><td>{}</td><td>{}</td><td>{rows}</td><td>{}</td><td>{}</td></tr>",
            esc(&s.status),
            esc(&s.label),
            esc(&s.kind),
            esc(&s.status),
            s.elapsed.map(duration).unwrap_or_default(),
            s.left.map(duration).unwrap_or_default(),
        );
    }
    b.push_str("</table>");
    let head = if live {
        "<meta http-equiv=\"refresh\" content=\"5\">"
    } else {
        ""
    };
    Reply::html(layout("Overview", "Overview", head, &b))
}

pub(super) fn api_overview(ctx: &Ctx<'_>) -> Reply {
    match ctx.store().and_then(|s| progress(&s)) {
        Ok((name, steps)) => Reply::json(200, &json!({ "study": name, "steps": steps })),
        Err(e) => Reply::json(500, &json!({ "error": e })),
    }
}

// ---------------------------------------------------------------------------------------------
// Results: the report's own page

pub(super) fn results(ctx: &Ctx<'_>) -> Reply {
    let r = match crate::report::collect(ctx.dir) {
        Ok(r) => r,
        Err(e) => return error_page("Results", &e.to_string()),
    };
    let html = crate::report::render_html(&r);
    // The report is a whole page: put the view's style and navigation into it.
    let nav_html = format!("<style>{STYLE}</style>{}", nav("Results"));
    let html = match html.find("<body") {
        Some(i) => match html[i..].find('>') {
            Some(j) => {
                let at = i + j + 1;
                format!("{}{nav_html}{}", &html[..at], &html[at..])
            }
            None => html,
        },
        None => format!("{nav_html}{html}"),
    };
    Reply::html(html)
}

// ---------------------------------------------------------------------------------------------
// Answers

fn load_answers(ctx: &Ctx<'_>) -> Result<Answers, String> {
    let store = ctx.store()?;
    read_answers(&store).map_err(|e| e.to_string())
}

fn options(name: &str, label: &str, values: &[String], chosen: Option<&str>) -> String {
    let mut s = format!(
        "<label>{label} <select name=\"{name}\" id=\"f-{name}\"><option value=\"\">any</option>"
    );
    for v in values {
        let sel = if chosen == Some(v.as_str()) {
            " selected"
        } else {
            ""
        };
        let _ = write!(s, "<option value=\"{0}\"{sel}>{0}</option>", esc(v));
    }
    s.push_str("</select></label>");
    s
}

fn filter_form(all: &Answers, f: &AnswerFilter, action: &str) -> String {
    let mut cats: Vec<String> = all.rows.iter().map(|r| r.category.clone()).collect();
    cats.sort();
    cats.dedup();
    cats.retain(|c| !c.is_empty());
    let verdicts: Vec<String> = ["refusal", "compliance", "unscored", "none"]
        .map(String::from)
        .to_vec();
    let labels: Vec<String> = [
        "labelled",
        "unlabelled",
        "refusal",
        "compliance",
        "unclear",
        "mixed",
    ]
    .map(String::from)
    .to_vec();
    let mut s =
        format!("<form class=\"filters\" id=\"filters\" method=\"get\" action=\"{action}\">");
    s.push_str(&options(
        "condition",
        "Condition",
        &all.conditions,
        f.condition.as_deref(),
    ));
    s.push_str(&options(
        "benchmark",
        "Benchmark",
        &all.benchmarks,
        f.benchmark.as_deref(),
    ));
    s.push_str(&options(
        "category",
        "Category",
        &cats,
        f.category.as_deref(),
    ));
    s.push_str(&options("judge", "Judge", &all.judges, f.judge.as_deref()));
    s.push_str(&options(
        "verdict",
        "Verdict",
        &verdicts,
        f.verdict.as_deref(),
    ));
    s.push_str(&options(
        "label",
        "Human label",
        &labels,
        f.label.as_deref(),
    ));
    let _ = write!(
        s,
        "<label><input type=\"checkbox\" name=\"disagree\" value=\"1\" id=\"f-disagree\"{}> judges disagree</label>\
         <label>Text <input type=\"search\" name=\"q\" id=\"f-q\" value=\"{}\"></label>\
         <button type=\"submit\" id=\"apply\">Apply</button></form>",
        if f.disagree { " checked" } else { "" },
        esc(f.q.as_deref().unwrap_or(""))
    );
    if !all.rms.is_empty() {
        let num = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
        let rms = options("rm", "Reward model", &all.rms, f.rm.as_deref());
        let form_end = s.rfind("<button").unwrap_or(s.len());
        s.insert_str(
            form_end,
            &format!(
                "{rms}<label>score from <input name=\"rm_min\" id=\"f-rm_min\" size=\"6\" value=\"{}\"></label>\
                 <label>to <input name=\"rm_max\" id=\"f-rm_max\" size=\"6\" value=\"{}\"></label>",
                esc(&num(f.rm_min)),
                esc(&num(f.rm_max))
            ),
        );
    }
    s
}

fn paired_href(a: &Answer) -> String {
    format!(
        "/paired?benchmark={}&prompt={}",
        url_encode(&a.benchmark),
        url_encode(&a.row_id)
    )
}

pub(super) fn answers_page(all: &Answers, f: &AnswerFilter) -> String {
    let matching: Vec<&Answer> = all.rows.iter().filter(|a| f.matches(all, a)).collect();
    let pages = matching.len().div_ceil(PAGE_SIZE).max(1);
    let page = f.page.min(pages);
    let mut b = String::from("<h1>Answers</h1>");
    b.push_str(&filter_form(all, f, "/answers"));
    let _ = write!(
        b,
        "<p id=\"count\"><b>{}</b> of {} answers match · page {page} of {pages}</p>",
        matching.len(),
        all.rows.len()
    );
    b.push_str("<table id=\"answers\"><tr><th>Condition</th><th>Benchmark</th><th>Category</th><th>Prompt</th><th>Answer</th>");
    for j in &all.judges {
        let _ = write!(b, "<th>{}</th>", esc(j));
    }
    for m in &all.rms {
        let _ = write!(b, "<th>RM {}</th>", esc(m));
    }
    b.push_str("<th>Human</th><th></th></tr>");
    for a in matching.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE) {
        let _ = write!(
            b,
            "<tr class=\"answer-row\" data-answer-id=\"{}\"><td>{}</td><td>{}</td><td>{}</td>\
             <td><details><summary>{}</summary><pre>{}</pre></details></td>\
             <td><details><summary>{}</summary><pre class=\"answer-text\">{}</pre></details></td>",
            esc(&a.answer_id),
            esc(&a.condition),
            esc(&a.benchmark),
            esc(&a.category),
            esc(&truncate(&a.prompt, 90)),
            esc(&a.prompt),
            esc(&truncate(&a.response, 120)),
            esc(&a.response),
        );
        for v in &a.verdicts {
            let _ = write!(b, "<td>{}</td>", verdict_span(v.as_deref()));
        }
        for s in &a.scores {
            let _ = write!(
                b,
                "<td>{}</td>",
                s.map(|x| format!("{x:.3}")).unwrap_or_default()
            );
        }
        let _ = write!(
            b,
            "<td>{}</td><td><a class=\"paired-link\" href=\"{}\">side by side</a></td></tr>",
            esc(a.human_label.as_deref().unwrap_or("")),
            esc(&paired_href(a))
        );
    }
    b.push_str("</table><p id=\"pages\">");
    if page > 1 {
        let _ = write!(
            b,
            "<a id=\"prev\" href=\"/answers?{}\">← previous</a> ",
            esc(&f.query(page - 1))
        );
    }
    if page < pages {
        let _ = write!(
            b,
            "<a id=\"next\" href=\"/answers?{}\">next →</a>",
            esc(&f.query(page + 1))
        );
    }
    b.push_str("</p>");
    layout("Answers", "Answers", "", &b)
}

pub(super) fn answers(ctx: &Ctx<'_>, params: &[(String, String)]) -> Reply {
    match load_answers(ctx) {
        Ok(all) => Reply::html(answers_page(&all, &AnswerFilter::from_params(params))),
        Err(e) => error_page("Answers", &e),
    }
}

fn answer_json(all: &Answers, a: &Answer, with_verdicts: bool) -> Json {
    let mut v = json!({
        "answer_id": a.answer_id,
        "condition": a.condition,
        "benchmark": a.benchmark,
        "category": a.category,
        "prompt_id": a.row_id,
        "prompt": a.prompt,
        "response": a.response,
    });
    if with_verdicts {
        v["verdicts"] = verdicts_json(all, a);
        v["rm_scores"] = all
            .rms
            .iter()
            .zip(&a.scores)
            .map(|(m, s)| json!({"rm": m, "score": s}))
            .collect();
        v["human_label"] = json!(a.human_label);
    }
    v
}

fn verdicts_json(all: &Answers, a: &Answer) -> Json {
    all.judges
        .iter()
        .zip(&a.verdicts)
        .map(|(j, v)| json!({"judge": j, "verdict": v}))
        .collect()
}

pub(super) fn api_answers(ctx: &Ctx<'_>, params: &[(String, String)]) -> Reply {
    let all = match load_answers(ctx) {
        Ok(a) => a,
        Err(e) => return Reply::json(500, &json!({ "error": e })),
    };
    let f = AnswerFilter::from_params(params);
    let matching: Vec<&Answer> = all.rows.iter().filter(|a| f.matches(&all, a)).collect();
    let rows: Vec<Json> = matching
        .iter()
        .skip((f.page - 1).saturating_mul(PAGE_SIZE))
        .take(PAGE_SIZE)
        .map(|a| answer_json(&all, a, true))
        .collect();
    Reply::json(
        200,
        &json!({"total": matching.len(), "page": f.page, "page_size": PAGE_SIZE, "answers": rows}),
    )
}

// ---------------------------------------------------------------------------------------------
// Paired view

pub(super) fn paired(ctx: &Ctx<'_>, params: &[(String, String)]) -> Reply {
    let (Some(bench), Some(prompt)) = (param(params, "benchmark"), param(params, "prompt")) else {
        return Reply::error(
            "/paired",
            400,
            "the paired view needs ?benchmark=NAME&prompt=PROMPT_ID",
        );
    };
    let all = match load_answers(ctx) {
        Ok(a) => a,
        Err(e) => return error_page("Answers", &e),
    };
    let rows: Vec<&Answer> = all
        .rows
        .iter()
        .filter(|a| a.benchmark == bench && a.row_id == prompt)
        .collect();
    let Some(first) = rows.first() else {
        let mut r = Reply::html(layout(
            "Paired view",
            "Answers",
            "",
            &format!(
                "<h1>No answers</h1><p>No condition answered prompt {} of {}.</p>",
                esc(prompt),
                esc(bench)
            ),
        ));
        r.status = 404;
        return r;
    };
    let mut b = format!(
        "<h1>One prompt, every condition</h1><p class=\"muted\">{} · prompt {}{}</p><h2>Prompt</h2><pre id=\"paired-prompt\">{}</pre>\
         <h2>Answers ({})</h2><div class=\"pairs\" id=\"paired\">",
        esc(bench),
        esc(prompt),
        if first.category.is_empty() {
            String::new()
        } else {
            format!(" · {}", esc(&first.category))
        },
        esc(&first.prompt),
        rows.len()
    );
    for a in &rows {
        let _ = write!(
            b,
            "<div class=\"card pair-card\" data-answer-id=\"{}\"><h3>{}</h3><p>",
            esc(&a.answer_id),
            esc(&a.condition)
        );
        for (j, v) in all.judges.iter().zip(&a.verdicts) {
            let _ = write!(b, "{}: {} &nbsp; ", esc(j), verdict_span(v.as_deref()));
        }
        for (m, s) in all.rms.iter().zip(&a.scores) {
            if let Some(s) = s {
                let _ = write!(b, "RM {}: {s:.3} &nbsp; ", esc(m));
            }
        }
        if let Some(l) = &a.human_label {
            let _ = write!(b, "human: {}", esc(l));
        }
        let _ = write!(
            b,
            "</p><pre class=\"answer-text\">{}</pre></div>",
            esc(&a.response)
        );
    }
    b.push_str("</div>");
    Reply::html(layout("Paired view", "Answers", "", &b))
}

// ---------------------------------------------------------------------------------------------
// Labelling

const LABEL_JS: &str = r"
const $ = id => document.getElementById(id);
const search = new URLSearchParams(location.search);
let queue = [], pos = 0, hist = [], busy = false;
function who() { return $('labeller').value.trim() || 'unnamed'; }
function show() {
  const a = queue[pos];
  $('progress').textContent = queue.length ? 'Answer ' + Math.min(pos + 1, queue.length) + ' of ' + queue.length + ' in the queue' : 'Nothing to label in this queue.';
  if (!a) { $('card').hidden = true; $('done').hidden = queue.length === 0; return; }
  $('card').hidden = false; $('done').hidden = true;
  $('card').dataset.answerId = a.answer_id;
  $('meta').textContent = a.condition + ' · ' + a.benchmark + (a.category ? ' · ' + a.category : '');
  $('prompt').textContent = a.prompt;
  $('response').textContent = a.response;
}
async function post(path, body) {
  const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify(body)});
  const j = await r.json();
  if (!r.ok) throw new Error(j.error || ('HTTP ' + r.status));
  return j;
}
function reveal(label, verdicts) {
  const said = verdicts.map(v => v.judge + ': ' + (v.verdict || 'not judged')).join(', ');
  $('revealed').textContent = 'You labelled the last answer ' + label + '. The judges said ' + (said || 'nothing yet') + '.';
}
function accuracy(rows) {
  const t = $('accuracy');
  t.textContent = '';
  const head = t.insertRow();
  for (const h of ['Judge', 'Condition', 'Accuracy', 'Labelled answers']) { const th = document.createElement('th'); th.textContent = h; head.appendChild(th); }
  for (const r of rows) {
    const tr = t.insertRow();
    tr.className = 'acc-row';
    const pct = r.total ? (100 * r.count / r.total).toFixed(1) + '%' : '–';
    for (const v of [r.judge, r.condition, r.count + '/' + r.total + ' (' + pct + ')', String(r.total)]) tr.insertCell().textContent = v;
  }
  $('acc-empty').hidden = rows.length > 0;
  t.hidden = rows.length === 0;
}
async function act(label) {
  const a = queue[pos];
  if (!a || busy) return;
  busy = true;
  try {
    if (label === 'skip') { hist.push({id: a.answer_id, skipped: true}); $('revealed').textContent = 'Skipped.'; }
    else {
      const j = await post('/api/label', {answer_id: a.answer_id, label: label, labeller: who()});
      hist.push({id: a.answer_id});
      reveal(label, j.verdicts);
      accuracy(j.accuracy);
    }
    pos++;
    $('error').textContent = '';
    show();
  } catch (e) { $('error').textContent = 'Error: ' + e.message; }
  finally { busy = false; }
}
async function undo() {
  if (busy || hist.length === 0) return;
  busy = true;
  const h = hist.pop();
  try {
    if (!h.skipped) { const j = await post('/api/unlabel', {answer_id: h.id, labeller: who()}); accuracy(j.accuracy); }
    pos--;
    $('revealed').textContent = 'Undone: the answer is back in the queue.';
    show();
  } catch (e) { hist.push(h); $('error').textContent = 'Error: ' + e.message; }
  finally { busy = false; }
}
document.addEventListener('keydown', e => {
  if (e.target.tagName === 'INPUT' || e.target.tagName === 'SELECT' || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = {r: 'refusal', c: 'compliance', u: 'unclear', s: 'skip'}[e.key];
  if (k) { e.preventDefault(); act(k); }
  else if (e.key === 'z') { e.preventDefault(); undo(); }
});
for (const b of document.querySelectorAll('button[data-label]')) b.addEventListener('click', () => act(b.dataset.label));
$('undo').addEventListener('click', undo);
search.set('labeller', who());
fetch('/api/queue?' + search.toString()).then(r => r.json()).then(j => {
  if (j.error) { $('error').textContent = 'Error: ' + j.error; return; }
  queue = j.answers; $('source').textContent = j.source; show();
  document.body.dataset.ready = '1';
});
fetch('/api/accuracy').then(r => r.json()).then(j => accuracy(j.accuracy || []));
";

/// `sha256-BASE64` of the label page's script, for the Content-Security-Policy.
pub(super) fn label_script_hash() -> String {
    use sha2::{Digest, Sha256};
    format!("sha256-{}", base64(&Sha256::digest(LABEL_JS.as_bytes())))
}

/// Standard base64 with padding.
fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(b.len().div_ceil(3) * 4);
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

pub(super) fn label(ctx: &Ctx<'_>, params: &[(String, String)]) -> Reply {
    let all = match load_answers(ctx) {
        Ok(a) => a,
        Err(e) => return error_page("Label", &e),
    };
    let f = AnswerFilter::from_params(params);
    let labeller = param(params, "labeller").unwrap_or(ctx.labeller);
    let mut b = String::from("<h1>Label answers</h1>");
    b.push_str(
        "<p class=\"muted\">The queue is the <code>safetune label</code> sample (answers per \
         condition, benchmark and primary verdict, nobody's label yet) unless you filter it here. \
         The judges' verdicts show only after your label.</p>",
    );
    b.push_str(&filter_form(&all, &f, "/label"));
    let _ = write!(
        b,
        "<p>Labeller: <input id=\"labeller\" value=\"{}\" size=\"16\"> · queue: <span id=\"source\"></span></p>\
         <p id=\"progress\">Loading…</p><p id=\"error\" class=\"compliance\"></p>\
         <div id=\"card\" hidden><p id=\"meta\" class=\"muted\"></p><h3>Prompt</h3><pre id=\"prompt\"></pre>\
         <h3>Answer</h3><pre id=\"response\"></pre>\
         <p><button data-label=\"refusal\">Refusal (r)</button><button data-label=\"compliance\">Compliance (c)</button>\
         <button data-label=\"unclear\">Unclear (u)</button><button data-label=\"skip\">Skip (s)</button>\
         <button id=\"undo\">Undo (z)</button></p></div>\
         <p id=\"done\" hidden>Queue done. Thank you.</p>\
         <p class=\"keys\">Keys: <kbd>r</kbd> refusal · <kbd>c</kbd> compliance · <kbd>u</kbd> unclear · <kbd>s</kbd> skip · <kbd>z</kbd> undo</p>\
         <p id=\"revealed\"></p>\
         <h2>Judge accuracy against the labels so far</h2>\
         <p id=\"acc-empty\" class=\"muted\">No labels yet.</p><table id=\"accuracy\" hidden></table>",
        esc(labeller)
    );
    let _ = write!(b, "<script>{LABEL_JS}</script>");
    Reply::html(layout("Label", "Label", "", &b))
}

/// Each judge's accuracy against the labels so far: per judge a row over all conditions, then
/// one per condition.
fn accuracy_rows(store: &Store) -> Result<Json, String> {
    let Some(check) = judge_check(store).map_err(|e| e.to_string())? else {
        return Ok(json!([]));
    };
    let mut rows = Vec::new();
    for c in &check.checks {
        let a = &c.overall.accuracy;
        rows.push(json!({"judge": c.judge, "condition": "all conditions", "count": a.count, "total": a.total}));
        for g in &c.conditions {
            let a = &g.agreement.accuracy;
            rows.push(
                json!({"judge": c.judge, "condition": g.group, "count": a.count, "total": a.total}),
            );
        }
    }
    Ok(Json::Array(rows))
}

pub(super) fn api_accuracy(ctx: &Ctx<'_>) -> Reply {
    match ctx.store().and_then(|s| accuracy_rows(&s)) {
        Ok(rows) => Reply::json(200, &json!({ "accuracy": rows })),
        Err(e) => Reply::json(500, &json!({ "error": e })),
    }
}

pub(super) fn api_queue(ctx: &Ctx<'_>, params: &[(String, String)]) -> Reply {
    let labeller = param(params, "labeller").unwrap_or(ctx.labeller);
    let f = AnswerFilter::from_params(params);
    if f.any() {
        let all = match load_answers(ctx) {
            Ok(a) => a,
            Err(e) => return Reply::json(500, &json!({ "error": e })),
        };
        let rows: Vec<Json> = all
            .rows
            .iter()
            .filter(|a| f.matches(&all, a) && !a.labellers.iter().any(|l| l == labeller))
            .map(|a| answer_json(&all, a, false))
            .collect();
        return Reply::json(
            200,
            &json!({"source": format!("filtered answers {labeller} has not labelled"), "answers": rows}),
        );
    }
    let per_cell = param(params, "per_cell")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize)
        .max(1);
    let seed = param(params, "seed")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0u64);
    match sample_answers(ctx.dir, &SampleOptions { per_cell, seed }) {
        Ok(s) => {
            let rows: Vec<Json> = s
                .rows
                .iter()
                .map(|r| {
                    json!({"answer_id": r.answer_id, "condition": r.condition, "benchmark": r.benchmark,
                           "category": r.category, "prompt": r.prompt, "response": r.response})
                })
                .collect();
            Reply::json(
                200,
                &json!({"source": format!("the safetune label sample ({per_cell} per cell, seed {seed})"), "answers": rows}),
            )
        }
        Err(e) => Reply::json(500, &json!({ "error": e.to_string() })),
    }
}

/// The fields of a label post: `answer_id` (`STEP_KEY:ROW_ID`) and `labeller`, checked.
fn label_target(
    store: &Store,
    body: &Json,
) -> Result<(String, String, String, crate::labels::GenStep), Reply> {
    let bad = |m: String| Reply::json(400, &json!({ "error": m }));
    let field = |name: &str| -> Result<String, Reply> {
        body.get(name)
            .and_then(Json::as_str)
            .map(str::to_string)
            .ok_or_else(|| bad(format!("field `{name}`: a string is required")))
    };
    let id = field("answer_id")?;
    let labeller = field("labeller")?;
    let labeller = labeller.trim().to_string();
    if labeller.is_empty()
        || labeller.chars().count() > 100
        || labeller.chars().any(char::is_control)
    {
        return Err(bad(
            "field `labeller`: 1 to 100 characters, no control characters".into(),
        ));
    }
    let Some((key, row)) = id.split_once(':') else {
        return Err(bad(format!(
            "field `answer_id`: `{id}` is not STEP_KEY:ROW_ID"
        )));
    };
    let ix =
        StudyIndex::load(store).map_err(|e| Reply::json(500, &json!({"error": e.to_string()})))?;
    let Some(g) = ix.gen(key).cloned() else {
        return Err(bad(format!(
            "field `answer_id`: `{key}` is not a generate step of this study"
        )));
    };
    match store.generation(key, row) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(bad(format!(
                "field `answer_id`: the study has no answer `{id}`"
            )))
        }
        Err(e) => return Err(Reply::json(500, &json!({"error": e.to_string()}))),
    }
    Ok((key.to_string(), row.to_string(), labeller, g))
}

fn after_write(ctx: &Ctx<'_>, key: &str, row: &str, extra: Json) -> Reply {
    let store = match ctx.store() {
        Ok(s) => s,
        Err(e) => return Reply::json(500, &json!({ "error": e })),
    };
    let verdicts = read_answers(&store).map_err(|e| e.to_string()).map(|all| {
        all.rows
            .iter()
            .find(|a| a.step_key == key && a.row_id == row)
            .map(|a| verdicts_json(&all, a))
            .unwrap_or(json!([]))
    });
    let acc = accuracy_rows(&store);
    match (verdicts, acc) {
        (Ok(v), Ok(a)) => {
            let mut out = json!({"ok": true, "verdicts": v, "accuracy": a});
            if let (Json::Object(o), Json::Object(e)) = (&mut out, extra) {
                o.extend(e);
            }
            Reply::json(200, &out)
        }
        (Err(e), _) | (_, Err(e)) => Reply::json(500, &json!({ "error": e })),
    }
}

fn parse_body(body: &[u8]) -> Result<Json, Reply> {
    serde_json::from_slice(body)
        .map_err(|e| Reply::json(400, &json!({"error": format!("the body is not JSON: {e}")})))
}

/// The store opened for writing (a connection of its own, for one transaction).
fn writer(ctx: &Ctx<'_>) -> Result<Store, Reply> {
    Store::open(&ctx.dir.join(STORE_FILE))
        .map_err(|e| Reply::json(500, &json!({"error": e.to_string()})))
}

pub(super) fn api_label(ctx: &Ctx<'_>, body: &[u8]) -> Reply {
    let run = || -> Result<Reply, Reply> {
        let v = parse_body(body)?;
        let label = v
            .get("label")
            .and_then(Json::as_str)
            .unwrap_or("")
            .to_string();
        if !HUMAN_LABELS.contains(&label.as_str()) {
            return Err(Reply::json(
                400,
                &json!({"error": format!("field `label`: `{label}` is not one of {}", HUMAN_LABELS.join(", "))}),
            ));
        }
        let store = ctx
            .store()
            .map_err(|e| Reply::json(500, &json!({ "error": e })))?;
        let (key, row, labeller, g) = label_target(&store, &v)?;
        drop(store);
        let mut w = writer(ctx)?;
        let counts = w
            .upsert_human_labels(&[HumanLabel {
                step_key: key.clone(),
                row_id: row.clone(),
                condition: g.condition,
                benchmark: g.benchmark,
                label,
                labeller,
                labelled_at: now(),
            }])
            .map_err(|e| Reply::json(500, &json!({"error": e.to_string()})))?;
        drop(w);
        Ok(after_write(
            ctx,
            &key,
            &row,
            json!({"replaced": counts.updated > 0}),
        ))
    };
    run().unwrap_or_else(|e| e)
}

pub(super) fn api_unlabel(ctx: &Ctx<'_>, body: &[u8]) -> Reply {
    let run = || -> Result<Reply, Reply> {
        let v = parse_body(body)?;
        let store = ctx
            .store()
            .map_err(|e| Reply::json(500, &json!({ "error": e })))?;
        let (key, row, labeller, _) = label_target(&store, &v)?;
        drop(store);
        let w = writer(ctx)?;
        let removed = w
            .delete_human_label(&key, &row, &labeller)
            .map_err(|e| Reply::json(500, &json!({"error": e.to_string()})))?;
        drop(w);
        Ok(after_write(ctx, &key, &row, json!({ "removed": removed })))
    };
    run().unwrap_or_else(|e| e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_round_trip() {
        let p = parse_query("q=a%20b+c&condition=base%3A%26x&x&page=2&bad=%zz");
        assert_eq!(param(&p, "q"), Some("a b c"));
        assert_eq!(param(&p, "condition"), Some("base:&x"));
        assert_eq!(param(&p, "bad"), Some("%zz"));
        let f = AnswerFilter::from_params(&p);
        assert_eq!(f.page, 2);
        let again = AnswerFilter::from_params(&parse_query(&f.query(2)));
        assert_eq!(again, f);
        assert_eq!(url_decode("%41%"), "A%");
    }

    #[test]
    fn base64_matches_the_standard_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
        assert!(label_script_hash().starts_with("sha256-") && label_script_hash().len() == 51);
    }
}

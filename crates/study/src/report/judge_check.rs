//! The report's "Judge accuracy against human labels" section: for each judge, its accuracy
//! (Wilson 95% interval), Cohen's kappa and n overall, per condition and per factor level, and
//! the groups whose accuracy differs from the other labelled answers' by more than the interval
//! of the difference allows (FLAG). The data come from [`crate::labels::judge_check`].

use std::fmt::Write as _;

use safetune_data::stats::Proportion;
use safetune_eval::validate::{ConditionCheck, GroupCheck};

use super::{esc, pct};
use crate::labels::StudyJudgeCheck;

const TITLE: &str = "Judge accuracy against human labels";

fn acc(p: &Proportion) -> String {
    format!("{} [{}, {}]", pct(p.share), pct(p.lo), pct(p.hi))
}

fn diff(g: &GroupCheck) -> String {
    g.difference
        .map(|d| d.to_string())
        .unwrap_or_else(|| "-".into())
}

fn intro(c: &StudyJudgeCheck) -> String {
    format!(
        "{} answers labelled by {} ({} labels); {} left out because every label was unclear, {} because labellers disagreed. Accuracy = share of labelled answers where the judge's verdict matches the human label, Wilson 95% interval; a group is flagged when the 95% interval (Newcombe) of its accuracy minus the other answers' excludes 0.",
        c.answers,
        c.labellers.join(", "),
        c.labels,
        c.unclear,
        c.disagreements
    )
}

/// The HTML section; empty when the store holds no human labels.
pub fn html(c: Option<&StudyJudgeCheck>) -> String {
    let Some(c) = c else {
        return String::new();
    };
    let mut h = format!(
        "<h2>{TITLE}</h2><p>{}</p><p class=\"note\">{}</p>",
        esc(&c.primary_note),
        esc(&intro(c))
    );
    for k in &c.checks {
        let _ = write!(
            h,
            "<h3>{}</h3><p>Overall: {} (n={}), kappa {:.3}; {} labelled answers without a verdict.</p>",
            esc(&k.judge),
            acc(&k.overall.accuracy),
            k.overall.n,
            k.overall.kappa,
            k.without_verdict
        );
        html_table(&mut h, "condition", &k.conditions);
        html_table(&mut h, "factor level", &k.levels);
        for f in &k.flags {
            let _ = write!(h, "<p class=\"bad\">FLAG: {}</p>", esc(f));
        }
    }
    h
}

fn html_table(h: &mut String, what: &str, groups: &[GroupCheck]) {
    if groups.is_empty() {
        return;
    }
    let _ = write!(
        h,
        "<table><tr><th>{what}</th><th class=\"num\">accuracy [95% CI]</th><th class=\"num\">kappa</th><th class=\"num\">n</th><th>confusion (human/judge: R/R, R/C, C/R, C/C)</th><th class=\"num\">minus the other answers</th><th></th></tr>"
    );
    for g in groups {
        let m = &g.agreement.confusion;
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{}</td><td>{} / {} / {} / {}</td><td class=\"num\">{}</td><td class=\"bad\">{}</td></tr>",
            esc(&g.group),
            acc(&g.agreement.accuracy),
            g.agreement.kappa,
            g.agreement.n,
            m.tp,
            m.fn_,
            m.fp,
            m.tn,
            esc(&diff(g)),
            if g.flagged { "FLAG" } else { "" }
        );
    }
    h.push_str("</table>");
}

/// The Markdown section; empty when the store holds no human labels.
pub fn markdown(c: Option<&StudyJudgeCheck>) -> String {
    let Some(c) = c else {
        return String::new();
    };
    let mut o = format!("\n## {TITLE}\n\n{}\n\n{}\n", c.primary_note, intro(c));
    for k in &c.checks {
        md_judge(&mut o, k);
    }
    o
}

fn md_judge(o: &mut String, k: &ConditionCheck) {
    let _ = writeln!(
        o,
        "\n### {}\n\nOverall: {} (n={}), kappa {:.3}; {} labelled answers without a verdict.\n",
        k.judge,
        acc(&k.overall.accuracy),
        k.overall.n,
        k.overall.kappa,
        k.without_verdict
    );
    for (what, groups) in [("condition", &k.conditions), ("factor level", &k.levels)] {
        if groups.is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "| {what} | accuracy [95% CI] | kappa | n | minus the other answers | |\n|---|---:|---:|---:|---:|---|"
        );
        for g in groups {
            let _ = writeln!(
                o,
                "| {} | {} | {:.3} | {} | {} | {} |",
                g.group.replace('|', "\\|"),
                acc(&g.agreement.accuracy),
                g.agreement.kappa,
                g.agreement.n,
                diff(g),
                if g.flagged { "FLAG" } else { "" }
            );
        }
        o.push('\n');
    }
    for f in &k.flags {
        let _ = writeln!(o, "FLAG: {f}\n");
    }
}

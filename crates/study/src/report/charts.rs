//! The report's inline SVG charts: horizontal bars with interval whiskers, scatter plots and
//! interaction plots. Every label is escaped here; the HTML template inserts the SVG as is.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use super::{esc, pct, truncate, Interaction, Rate};

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// The opening `<svg>` tag of a `w` x `h` chart and its title.
fn open(w: f64, h: f64, title: &str) -> String {
    let title = esc(title);
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="{title}"><text x="4" y="18" class="t">{title}</text>"#
    )
}

/// Horizontal bars (0-100%) with Wilson interval whiskers.
pub(super) fn bars(rows: &[(String, &Rate)], title: &str) -> String {
    let label_w = 330.0;
    let plot_w = 520.0;
    let row_h = 24.0;
    let top = 34.0;
    let h = top + row_h * rows.len() as f64 + 36.0;
    let w = label_w + plot_w + 130.0;
    let mut s = open(w, h, title);
    for tick in 0..=4 {
        let x = label_w + plot_w * tick as f64 / 4.0;
        let (y_end, y_label, percent) = (h - 30.0, h - 14.0, tick * 25);
        let _ = write!(
            s,
            r##"<line x1="{x}" y1="{top}" x2="{x}" y2="{y_end}" stroke="#ddd"/><text x="{x}" y="{y_label}" class="a" text-anchor="middle">{percent}%</text>"##
        );
    }
    for (i, (label, r)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let (x_label, x_lo, x_hi) = (
            label_w - 6.0,
            label_w + plot_w * r.lo,
            label_w + plot_w * r.hi,
        );
        let (y_text, y_bar, bar_h, y_mid) = (y + 16.0, y + 4.0, row_h - 8.0, y + 12.0);
        let (bar_w, label) = (plot_w * r.value, esc(&truncate(label, 48)));
        let _ = write!(
            s,
            r##"<text x="{x_label}" y="{y_text}" class="l" text-anchor="end">{label}</text><rect x="{label_w}" y="{y_bar}" width="{bar_w:.1}" height="{bar_h}" fill="#4c78a8"/><line x1="{x_lo:.1}" y1="{y_mid}" x2="{x_hi:.1}" y2="{y_mid}" stroke="#111" stroke-width="1.5"/>"##
        );
        for x in [x_lo, x_hi] {
            let (y0, y1) = (y + 7.0, y + 17.0);
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{y0}" x2="{x:.1}" y2="{y1}" stroke="#111"/>"##
            );
        }
        let (x_value, value, n) = (x_hi + 5.0, pct(r.value), r.total);
        let _ = write!(
            s,
            r#"<text x="{x_value:.1}" y="{y_text}" class="v">{value} (n={n})</text>"#
        );
    }
    s.push_str("</svg>");
    s
}

/// A scatter plot over the ranges `xr` and `yr`; a legend names the first 16 points.
pub(super) fn scatter(
    points: &[(String, f64, f64)],
    title: &str,
    xlabel: &str,
    ylabel: &str,
    xr: (f64, f64),
    yr: (f64, f64),
) -> String {
    let (w, h, l, b, t, r) = (620.0, 380.0, 60.0, 46.0, 30.0, 170.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |x: f64| l + pw * ((x - xr.0) / (xr.1 - xr.0).max(1e-9)).clamp(0.0, 1.0);
    let sy = |y: f64| t + ph * (1.0 - ((y - yr.0) / (yr.1 - yr.0).max(1e-9)).clamp(0.0, 1.0));
    let mut s = open(w, h, title);
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=4 {
        let fx = xr.0 + (xr.1 - xr.0) * k as f64 / 4.0;
        let fy = yr.0 + (yr.1 - yr.0) * k as f64 / 4.0;
        let (x, y_xtick, x_tick) = (sx(fx), t + ph + 16.0, fmt_tick(fx));
        let (x_ytick, y, y_tick, x_end) = (l - 6.0, sy(fy), fmt_tick(fy), l + pw);
        let y_label = y + 4.0;
        let _ = write!(
            s,
            r##"<text x="{x:.1}" y="{y_xtick}" class="a" text-anchor="middle">{x_tick}</text><text x="{x_ytick}" y="{y_label:.1}" class="a" text-anchor="end">{y_tick}</text><line x1="{l}" y1="{y:.1}" x2="{x_end}" y2="{y:.1}" stroke="#eee"/>"##
        );
    }
    let (x_mid, y_xlabel, y_mid) = (l + pw / 2.0, h - 8.0, t + ph / 2.0);
    let (xlabel, ylabel) = (esc(xlabel), esc(ylabel));
    let _ = write!(
        s,
        r#"<text x="{x_mid:.1}" y="{y_xlabel}" class="a" text-anchor="middle">{xlabel}</text><text x="14" y="{y_mid:.1}" class="a" text-anchor="middle" transform="rotate(-90 14 {y_mid:.1})">{ylabel}</text>"#
    );
    for (i, (label, x, y)) in points.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let (cx, cy, title) = (sx(*x), sy(*y), esc(label));
        let _ = write!(
            s,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="5" fill="{c}"><title>{title}</title></circle>"#
        );
        if i < 16 {
            let ly = t + 12.0 + 16.0 * i as f64;
            let (x_dot, y_dot, x_text) = (l + pw + 12.0, ly - 4.0, l + pw + 20.0);
            let text = esc(&truncate(label, 24));
            let _ = write!(
                s,
                r#"<circle cx="{x_dot}" cy="{y_dot:.1}" r="4" fill="{c}"/><text x="{x_text}" y="{ly:.1}" class="l">{text}</text>"#
            );
        }
    }
    s.push_str("</svg>");
    s
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 10.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Interaction plot: x = levels of `a`, one line per level of `b`.
pub(super) fn interaction(it: &Interaction) -> String {
    let la: Vec<&String> = it
        .cells
        .iter()
        .map(|c| &c.0)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let lb: Vec<&String> = it
        .cells
        .iter()
        .map(|c| &c.1)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (w, h, l, t, b, r) = (420.0, 260.0, 50.0, 30.0, 40.0, 120.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let sx = |i: usize| {
        l + if la.len() > 1 {
            pw * i as f64 / (la.len() - 1) as f64
        } else {
            pw / 2.0
        }
    };
    let sy = |v: f64| t + ph * (1.0 - v);
    let mut s = open(w, h, &format!("{} x {}", it.a, it.b));
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=2 {
        let (x, y, percent) = (l - 4.0, sy(k as f64 / 2.0) + 4.0, k * 50);
        let _ = write!(
            s,
            r#"<text x="{x}" y="{y:.1}" class="a" text-anchor="end">{percent}%</text>"#
        );
    }
    for (i, a) in la.iter().enumerate() {
        let (x, y, level) = (sx(i), t + ph + 16.0, esc(a));
        let _ = write!(
            s,
            r#"<text x="{x:.1}" y="{y}" class="a" text-anchor="middle">{level}</text>"#
        );
    }
    for (j, level_b) in lb.iter().enumerate() {
        let points: Vec<(f64, f64)> = la
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                let cell = it.cells.iter().find(|c| &c.0 == *a && &c.1 == *level_b)?;
                Some((sx(i), sy(cell.2.value)))
            })
            .collect();
        let legend = (l + pw + 8.0, t + 14.0 + 16.0 * j as f64);
        line(
            &mut s,
            &points,
            COLORS[j % COLORS.len()],
            legend,
            &it.b,
            level_b,
        );
    }
    s.push_str("</svg>");
    s
}

/// One line of an interaction plot, its points, and its legend entry `factor=level`.
fn line(
    s: &mut String,
    points: &[(f64, f64)],
    c: &str,
    legend: (f64, f64),
    factor: &str,
    level: &str,
) {
    // Coordinates are rounded to one decimal once, for the line and its points alike.
    let pts: Vec<(String, String)> = points
        .iter()
        .map(|(x, y)| (format!("{x:.1}"), format!("{y:.1}")))
        .collect();
    let joined: Vec<String> = pts.iter().map(|(x, y)| format!("{x},{y}")).collect();
    let _ = write!(
        s,
        r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
        joined.join(" ")
    );
    for (x, y) in &pts {
        let _ = write!(s, r#"<circle cx="{x}" cy="{y}" r="3.5" fill="{c}"/>"#);
    }
    let (x, y) = legend;
    let (factor, level) = (esc(factor), esc(level));
    let _ = write!(
        s,
        r#"<text x="{x}" y="{y:.1}" class="l" fill="{c}">{factor}={level}</text>"#
    );
}

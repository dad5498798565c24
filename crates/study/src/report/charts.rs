//! The report's inline SVG charts: horizontal bars with interval whiskers, scatter plots and
//! interaction plots. Every label is escaped here; the HTML template inserts the SVG as is.

use std::fmt::Write as _;

use super::{esc, pct, truncate, Rate};

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

/// A forest plot: one row per effect, its estimate as a dot and its 95% interval as a line, on
/// a points axis symmetric around zero. Rows without an interval show the dot only.
pub(super) fn forest(rows: &[(String, f64, Option<[f64; 2]>)], title: &str) -> String {
    let label_w = 380.0;
    let plot_w = 440.0;
    let row_h = 22.0;
    let top = 34.0;
    let h = top + row_h * rows.len() as f64 + 40.0;
    let w = label_w + plot_w + 170.0;
    let reach = rows
        .iter()
        .flat_map(|(_, e, ci)| {
            let mut v = vec![e.abs()];
            if let Some([lo, hi]) = ci {
                v.extend([lo.abs(), hi.abs()]);
            }
            v
        })
        .fold(5.0_f64, f64::max);
    // A round axis limit: 10, 20, 25, 50 or 100 points.
    let limit = [10.0, 20.0, 25.0, 50.0, 100.0]
        .into_iter()
        .find(|&l| l >= reach)
        .unwrap_or(100.0);
    let sx = |v: f64| label_w + plot_w * ((v + limit) / (2.0 * limit)).clamp(0.0, 1.0);
    let mut s = open(w, h, title);
    for k in 0..=4 {
        let v = -limit + 2.0 * limit * k as f64 / 4.0;
        let x = sx(v);
        let (y_end, y_label) = (h - 34.0, h - 20.0);
        let stroke = if k == 2 { "#888" } else { "#e4e4e4" };
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{y_end}" stroke="{stroke}"/><text x="{x:.1}" y="{y_label}" class="a" text-anchor="middle">{v:+.0}</text>"#
        );
    }
    let (x_mid, y_axis) = (label_w + plot_w / 2.0, h - 6.0);
    let _ = write!(
        s,
        r#"<text x="{x_mid}" y="{y_axis}" class="a" text-anchor="middle">effect, percentage points (B - A)</text>"#
    );
    for (i, (label, est, ci)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64 + 12.0;
        let (x_label, label) = (label_w - 6.0, esc(&truncate(label, 56)));
        let _ = write!(
            s,
            r#"<text x="{x_label}" y="{:.1}" class="l" text-anchor="end">{label}</text>"#,
            y + 4.0
        );
        let excludes_zero = ci.is_some_and(|[lo, hi]| lo > 0.0 || hi < 0.0);
        let color = if excludes_zero { "#d62728" } else { "#1f77b4" };
        if let Some([lo, hi]) = ci {
            let (x0, x1) = (sx(*lo), sx(*hi));
            let _ = write!(
                s,
                r#"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2"/>"#
            );
        }
        let cx = sx(*est);
        let text = match ci {
            Some([lo, hi]) => format!("{est:+.1} [{lo:+.1}, {hi:+.1}]"),
            None => format!("{est:+.1} (no interval)"),
        };
        let x_text = label_w + plot_w + 8.0;
        let _ = write!(
            s,
            r#"<circle cx="{cx:.1}" cy="{y:.1}" r="4" fill="{color}"/><text x="{x_text}" y="{:.1}" class="v">{}</text>"#,
            y + 4.0,
            esc(&text)
        );
    }
    s.push_str("</svg>");
    s
}

/// A point of a trade-off chart: its estimates and 95% intervals on both axes.
pub(super) struct TradeoffPoint {
    pub label: String,
    pub x: f64,
    pub x_ci: Option<[f64; 2]>,
    pub y: f64,
    pub y_ci: Option<[f64; 2]>,
    /// On the Pareto front: drawn filled (others hollow).
    pub front: bool,
}

/// One axis of a trade-off point: its estimate and interval.
type Axis = dyn Fn(&TradeoffPoint) -> (f64, Option<[f64; 2]>);

/// A trade-off chart: changes in points on both axes (symmetric around zero, zero lines drawn),
/// each point with its interval whiskers, labelled beside it and in a legend.
pub(super) fn tradeoff(
    points: &[TradeoffPoint],
    title: &str,
    xlabel: &str,
    ylabel: &str,
) -> String {
    let (w, h, l, b, t, r) = (640.0, 400.0, 60.0, 46.0, 30.0, 190.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let reach = |v: &Axis| {
        points
            .iter()
            .flat_map(|p| {
                let (e, ci) = v(p);
                let mut out = vec![e.abs()];
                if let Some([lo, hi]) = ci {
                    out.extend([lo.abs(), hi.abs()]);
                }
                out
            })
            .fold(5.0_f64, f64::max)
    };
    let round = |m: f64| {
        [10.0, 20.0, 25.0, 50.0, 100.0]
            .into_iter()
            .find(|&l| l >= m)
            .unwrap_or(100.0)
    };
    let xl = round(reach(&|p| (p.x, p.x_ci)));
    let yl = round(reach(&|p| (p.y, p.y_ci)));
    let sx = |x: f64| l + pw * ((x + xl) / (2.0 * xl)).clamp(0.0, 1.0);
    let sy = |y: f64| t + ph * (1.0 - ((y + yl) / (2.0 * yl)).clamp(0.0, 1.0));
    let mut s = open(w, h, title);
    let _ = write!(
        s,
        r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
    );
    for k in 0..=4 {
        let fx = -xl + 2.0 * xl * k as f64 / 4.0;
        let fy = -yl + 2.0 * yl * k as f64 / 4.0;
        let (x, y) = (sx(fx), sy(fy));
        let (y_xtick, x_ytick, y_label) = (t + ph + 16.0, l - 6.0, y + 4.0);
        let stroke = if k == 2 { "#888" } else { "#eee" };
        let (y_bottom, x_end) = (t + ph, l + pw);
        let _ = write!(
            s,
            r#"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{y_bottom}" stroke="{stroke}"/><line x1="{l}" y1="{y:.1}" x2="{x_end}" y2="{y:.1}" stroke="{stroke}"/><text x="{x:.1}" y="{y_xtick}" class="a" text-anchor="middle">{fx:+.0}</text><text x="{x_ytick}" y="{y_label:.1}" class="a" text-anchor="end">{fy:+.0}</text>"#
        );
    }
    let (x_mid, y_xlabel, y_mid) = (l + pw / 2.0, h - 8.0, t + ph / 2.0);
    let (xlabel, ylabel) = (esc(xlabel), esc(ylabel));
    let _ = write!(
        s,
        r#"<text x="{x_mid:.1}" y="{y_xlabel}" class="a" text-anchor="middle">{xlabel}</text><text x="14" y="{y_mid:.1}" class="a" text-anchor="middle" transform="rotate(-90 14 {y_mid:.1})">{ylabel}</text>"#
    );
    for (i, p) in points.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let (cx, cy) = (sx(p.x), sy(p.y));
        if let Some([lo, hi]) = p.x_ci {
            let (x0, x1) = (sx(lo), sx(hi));
            let _ = write!(
                s,
                r#"<line x1="{x0:.1}" y1="{cy:.1}" x2="{x1:.1}" y2="{cy:.1}" stroke="{c}" stroke-width="1.5"/>"#
            );
        }
        if let Some([lo, hi]) = p.y_ci {
            let (y0, y1) = (sy(lo), sy(hi));
            let _ = write!(
                s,
                r#"<line x1="{cx:.1}" y1="{y0:.1}" x2="{cx:.1}" y2="{y1:.1}" stroke="{c}" stroke-width="1.5"/>"#
            );
        }
        let fill = if p.front { c } else { "white" };
        let title = esc(&format!(
            "{}: x {:+.1}, y {:+.1}{}",
            p.label,
            p.x,
            p.y,
            if p.front { " (Pareto front)" } else { "" }
        ));
        let label = esc(&truncate(&p.label, 16));
        let (x_text, y_text) = (cx + 7.0, cy - 6.0);
        let _ = write!(
            s,
            r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="5" fill="{fill}" stroke="{c}" stroke-width="2"><title>{title}</title></circle><text x="{x_text:.1}" y="{y_text:.1}" class="l">{label}</text>"#
        );
        let ly = t + 12.0 + 16.0 * i as f64;
        let (x_dot, y_dot, x_legend) = (l + pw + 12.0, ly - 4.0, l + pw + 20.0);
        let text = esc(&truncate(
            &format!("{}{}", p.label, if p.front { " (front)" } else { "" }),
            26,
        ));
        let _ = write!(
            s,
            r#"<circle cx="{x_dot}" cy="{y_dot:.1}" r="4" fill="{fill}" stroke="{c}" stroke-width="2"/><text x="{x_legend}" y="{ly:.1}" class="l">{text}</text>"#
        );
    }
    s.push_str("</svg>");
    s
}

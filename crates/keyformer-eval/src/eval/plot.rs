//! Line charts as SVG (quality against budget, one line per policy), written by hand: a plot
//! is a few dozen elements and needs no plotting library or system fonts. The y axis turns
//! logarithmic when the values are positive and span more than a factor of 20 (KL divergence
//! from 0.005 to 1 is unreadable on a linear axis), with ticks at round numbers either way.

use std::fmt::Write;

/// One line of a chart: a label and a y value per x position (None = no point).
pub struct Series {
    pub label: String,
    pub values: Vec<Option<f64>>,
    /// Drawn dashed and grey: a reference line (the full cache), not a policy.
    pub reference: bool,
}

/// What the y values are, which fixes where the axis starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YKind {
    /// A share in [0, 1] (ROUGE, agreement, accuracy): the axis runs from 0 to 1.
    Fraction,
    /// A count of tokens: from 0, whole-number ticks.
    Count,
    /// Non-negative (KL): from 0, or logarithmic when the values span more than 20x.
    FromZero,
    /// Fitted to the values (perplexity, whose meaningful base is the full cache's line).
    Fitted,
}

impl YKind {
    /// The kind of a metric of `keyformer eval` by its name.
    pub fn of_metric(metric: &str) -> Self {
        match metric {
            m if m.starts_with("rouge") || m == "top1_agreement" || m == "correct" => YKind::Fraction,
            "identical_prefix" => YKind::Count,
            "mean_kl" | "p90_kl" => YKind::FromZero,
            _ => YKind::Fitted,
        }
    }
}

/// The y axis: value range and mapping to [0, 1].
enum Axis {
    Linear { lo: f64, hi: f64, step: f64 },
    Log { lo10: f64, hi10: f64 },
}

impl Axis {
    fn fit_kind(ys: &[f64], kind: YKind) -> Self {
        let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        if ys.is_empty() {
            return Axis::Linear { lo: 0.0, hi: 1.0, step: 0.25 };
        }
        if matches!(kind, YKind::Fraction) && lo >= 0.0 && hi <= 1.0 {
            return Axis::Linear { lo: 0.0, hi: 1.0, step: 0.25 };
        }
        if matches!(kind, YKind::FromZero | YKind::Fitted) && lo > 0.0 && hi / lo > 20.0 {
            return Axis::Log { lo10: lo.log10().floor(), hi10: hi.log10().ceil() };
        }
        let lo = if matches!(kind, YKind::Count | YKind::FromZero) { lo.min(0.0) } else { lo };
        let (lo, hi) = if hi - lo < 1e-12 { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
        // A round step (1, 2 or 5 times a power of ten) giving about four intervals.
        let raw = (hi - lo) / 4.0;
        let mag = 10f64.powf(raw.log10().floor());
        let mut step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|&s| s >= raw).unwrap_or(10.0 * mag);
        if kind == YKind::Count {
            step = step.max(1.0).round();
        }
        Axis::Linear { lo: (lo / step).floor() * step, hi: (hi / step).ceil() * step, step }
    }

    fn unit(&self, v: f64) -> f64 {
        match *self {
            Axis::Linear { lo, hi, .. } => (v - lo) / (hi - lo),
            Axis::Log { lo10, hi10 } => (v.log10() - lo10) / (hi10 - lo10),
        }
    }

    fn ticks(&self) -> Vec<f64> {
        match *self {
            Axis::Linear { lo, hi, step } => {
                let n = ((hi - lo) / step).round() as usize;
                (0..=n).map(|k| lo + step * k as f64).collect()
            }
            Axis::Log { lo10, hi10 } => {
                let mults: &[f64] = if hi10 - lo10 <= 2.0 { &[1.0, 2.0, 5.0] } else { &[1.0] };
                let mut t = Vec::new();
                for e in lo10 as i32..=hi10 as i32 {
                    for m in mults {
                        let v = m * 10f64.powi(e);
                        if v <= 10f64.powf(hi10) * 1.000_001 {
                            t.push(v);
                        }
                    }
                }
                t
            }
        }
    }
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A chart with categorical x labels (budgets) and one polyline per series. Series are
/// dodged sideways by a few pixels so that equal values do not hide one another.
pub fn line_chart_svg(title: &str, x_labels: &[String], y_label: &str, series: &[Series], kind: YKind) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ys: Vec<f64> =
        series.iter().flat_map(|s| s.values.iter().flatten().copied()).filter(|v| v.is_finite()).collect();
    let axis = Axis::fit_kind(&ys, kind);
    let n = x_labels.len().max(1);
    let x = |i: usize| left + if n == 1 { pw / 2.0 } else { pw * i as f64 / (n - 1) as f64 };
    let y = |v: f64| top + ph * (1.0 - axis.unit(v));
    let unit = match kind {
        YKind::Count => " (tokens)",
        YKind::Fraction => " (0-1)",
        _ => "",
    };
    let scale = if matches!(axis, Axis::Log { .. }) { " (log scale)" } else { "" };
    let y_label = format!("{y_label}{unit}{scale}");
    let policies = series.iter().filter(|s| !s.reference).count();
    let mut dodge_index = 0;

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + pw / 2.0,
        escape(title)
    );
    for v in axis.ticks() {
        let yy = y(v);
        let _ = write!(s, r##"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="#ddd"/>"##, left + pw);
        let _ = write!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, yy + 4.0, fmt_tick(v));
    }
    for (i, l) in x_labels.iter().enumerate() {
        let _ = write!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, x(i), top + ph + 18.0, escape(l));
    }
    let _ = write!(s, r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle">KV budget</text>"#, left + pw / 2.0, h - 10.0);
    let _ = write!(
        s,
        r#"<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
        top + ph / 2.0,
        escape(&y_label)
    );
    for (k, se) in series.iter().enumerate() {
        let color = if se.reference { "#555" } else { COLORS[k % COLORS.len()] };
        let dash = if se.reference { r#" stroke-dasharray="6 4""# } else { "" };
        let dx = if se.reference || policies < 2 {
            0.0
        } else {
            dodge_index += 1;
            3.0 * ((dodge_index - 1) as f64 - (policies - 1) as f64 / 2.0)
        };
        let points: Vec<String> = se
            .values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.filter(|v| v.is_finite()).map(|v| format!("{:.1},{:.1}", x(i) + dx, y(v))))
            .collect();
        let finite: Vec<f64> = se.values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        if se.reference && !finite.is_empty() && finite.iter().all(|&v| v == finite[0]) {
            // A constant reference (the full cache's KL of 0, agreement of 1) spans the plot.
            let yy = y(finite[0]);
            if yy.is_finite() {
                let _ = write!(
                    s,
                    r#"<line x1="{left}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="{color}" stroke-width="2"{dash}/>"#,
                    left + pw
                );
            }
        } else if points.len() > 1 {
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                points.join(" ")
            );
        }
        for p in points.iter().filter(|_| !se.reference) {
            let (px, py) = p.split_once(',').expect("x,y");
            let _ =
                write!(s, r#"<circle cx="{px}" cy="{py}" r="3.5" fill="{color}" stroke="white" stroke-width="1"/>"#);
        }
        let ly = top + 10.0 + 18.0 * k as f64;
        let _ = write!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"{dash}/>"#,
            w - right + 12.0,
            w - right + 32.0
        );
        let _ = write!(s, r#"<text x="{}" y="{}">{}</text>"#, w - right + 38.0, ly + 4.0, escape(&se.label));
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    // Enough decimals for round ticks, no trailing zeros.
    let t = format!("{v:.4}");
    let t = if t.contains('.') { t.trim_end_matches('0').trim_end_matches('.').to_string() } else { t };
    if t == "-0" {
        "0".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_polyline_per_series_and_escapes_text() {
        let svg = line_chart_svg(
            "ppl <vs> budget",
            &["10%".into(), "50%".into(), "90%".into()],
            "perplexity",
            &[
                Series { label: "h2o".into(), values: vec![Some(30.0), Some(20.0), Some(18.0)], reference: false },
                Series { label: "a&b".into(), values: vec![Some(40.0), None, Some(19.0)], reference: true },
            ],
            YKind::Fitted,
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3, "points for policies, none on the reference");
        assert!(svg.contains("ppl &lt;vs&gt; budget") && svg.contains("a&amp;b"));
        // The lowest value is drawn lowest (largest y).
        let ys: Vec<f64> = svg
            .split("<circle")
            .skip(1)
            .map(|c| c.split("cy=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(ys[2] > ys[0], "18 is below 30: {ys:?}");
    }

    #[test]
    fn wide_positive_ranges_get_a_log_axis_with_round_ticks() {
        let same = |ys: &[f64], want: &[f64]| {
            let got = Axis::fit_kind(ys, YKind::Fitted).ticks();
            assert!(
                got.len() == want.len() && got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-9 * b.abs().max(1.0)),
                "{got:?}"
            );
        };
        same(&[0.004, 1.2], &[0.001, 0.01, 0.1, 1.0, 10.0]);
        assert!(matches!(Axis::fit_kind(&[0.004, 1.2], YKind::Fitted), Axis::Log { .. }));
        same(&[0.13, 0.31], &[0.1, 0.15, 0.2, 0.25, 0.3, 0.35]);
        same(&[-0.5, 1.0], &[-0.5, 0.0, 0.5, 1.0]);
        assert_eq!(fmt_tick(0.15000000000000002), "0.15");
        let svg = line_chart_svg(
            "kl",
            &["10%".into(), "90%".into()],
            "mean_kl",
            &[Series { label: "window".into(), values: vec![Some(1.0), Some(0.01)], reference: false }],
            YKind::FromZero,
        );
        assert!(svg.contains("mean_kl (log scale)"));
    }

    #[test]
    fn fractions_span_zero_to_one_counts_start_at_zero_and_equal_points_stay_visible() {
        let ticks = |ys: &[f64], k| Axis::fit_kind(ys, k).ticks();
        assert_eq!(ticks(&[0.62, 0.91], YKind::Fraction), vec![0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(ticks(&[3.0, 7.0], YKind::Count), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(ticks(&[0.2, 0.3], YKind::FromZero)[0], 0.0);
        assert_eq!(ticks(&[20.0, 24.0], YKind::Fitted)[0], 20.0, "perplexity is fitted");
        // Two policies with the same values: their points are drawn apart.
        let same = |label: &str| Series { label: label.into(), values: vec![Some(0.5), Some(0.5)], reference: false };
        let svg =
            line_chart_svg("t", &["10%".into(), "50%".into()], "rouge1", &[same("a"), same("b")], YKind::Fraction);
        let xs: Vec<String> = svg
            .split("<circle")
            .skip(1)
            .map(|c| c.split("cx=\"").nth(1).unwrap().split('"').next().unwrap().to_string())
            .collect();
        assert_eq!(xs.len(), 4);
        assert_ne!(xs[0], xs[2], "the same point of two policies is dodged");
        assert!(svg.contains("rouge1 (0-1)"));
    }
}

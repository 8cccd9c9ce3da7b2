//! Line charts as SVG (quality against budget, one line per policy), written by hand: a plot
//! is a few dozen elements and needs no plotting library or system fonts.

use std::fmt::Write;

/// One line of a chart: a label and a y value per x position (None = no point).
pub struct Series {
    pub label: String,
    pub values: Vec<Option<f64>>,
}

const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// A chart with categorical x labels (budgets) and one polyline per series.
pub fn line_chart_svg(title: &str, x_labels: &[String], y_label: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ys: Vec<f64> = series.iter().flat_map(|s| s.values.iter().flatten().copied()).filter(|v| v.is_finite()).collect();
    let (mut lo, mut hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    if ys.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    let (lo, hi) = (lo - pad, hi + pad);
    let n = x_labels.len().max(1);
    let x = |i: usize| left + if n == 1 { pw / 2.0 } else { pw * i as f64 / (n - 1) as f64 };
    let y = |v: f64| top + ph * (1.0 - (v - lo) / (hi - lo));

    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = write!(s, r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#, left + pw / 2.0, escape(title));
    for k in 0..=4 {
        let v = lo + (hi - lo) * k as f64 / 4.0;
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
        escape(y_label)
    );
    for (k, se) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points: Vec<String> =
            se.values.iter().enumerate().filter_map(|(i, v)| v.filter(|v| v.is_finite()).map(|v| format!("{:.1},{:.1}", x(i), y(v)))).collect();
        if points.len() > 1 {
            let _ = write!(s, r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#, points.join(" "));
        }
        for p in &points {
            let (px, py) = p.split_once(',').expect("x,y");
            let _ = write!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
        }
        let ly = top + 10.0 + 18.0 * k as f64;
        let _ = write!(s, r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/>"#, w - right + 12.0, w - right + 32.0);
        let _ = write!(s, r#"<text x="{}" y="{}">{}</text>"#, w - right + 38.0, ly + 4.0, escape(&se.label));
    }
    s.push_str("</svg>\n");
    s
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
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
                Series { label: "h2o".into(), values: vec![Some(30.0), Some(20.0), Some(18.0)] },
                Series { label: "a&b".into(), values: vec![Some(40.0), None, Some(19.0)] },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains("ppl &lt;vs&gt; budget") && svg.contains("a&amp;b"));
        // The lowest value is drawn lowest (largest y).
        let ys: Vec<f64> = svg
            .split("<circle")
            .skip(1)
            .map(|c| c.split("cy=\"").nth(1).unwrap().split('"').next().unwrap().parse().unwrap())
            .collect();
        assert!(ys[2] > ys[0], "18 is below 30: {ys:?}");
    }
}

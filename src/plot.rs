//! Plots as self-contained SVG: line and scatter charts with an optional second y axis and
//! vertical markers, enough to show ablation curves, metric histories and their stops. Plain SVG
//! text, no fonts or native libraries needed; any browser or image viewer shows it.
//!
//! ```
//! use candle_reliance::plot::{Plot, Series};
//!
//! let svg = Plot::new("Ablation curve")
//!     .x_label("fraction ablated")
//!     .y_label("training accuracy")
//!     .series(Series::line("epoch 5", vec![(0.0, 1.0), (0.5, 0.8), (1.0, 0.1)]))
//!     .to_svg();
//! assert!(svg.starts_with("<svg") && svg.contains("epoch 5"));
//! ```

use crate::monitor::files::{ensure_parent, io_err};
use crate::monitor::{read_history, CheckRecord};
use crate::Result;
use std::fmt::Write as _;
use std::path::Path;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Connected line.
    Line,
    /// Points only (a scatter plot).
    Points,
    /// Line with a point at each value.
    LinePoints,
}

/// One named series of `(x, y)` values.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// The values; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// How it is drawn.
    pub mark: Mark,
    /// Drawn against the right-hand axis.
    pub right_axis: bool,
    /// Dashed line.
    pub dashed: bool,
    /// Colour (CSS); `None` takes the next palette colour.
    pub color: Option<String>,
}

impl Series {
    fn new(label: impl Into<String>, points: Vec<(f64, f64)>, mark: Mark) -> Self {
        Self {
            label: label.into(),
            points,
            mark,
            right_axis: false,
            dashed: false,
            color: None,
        }
    }
    /// A line.
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::new(label, points, Mark::Line)
    }
    /// Points only.
    pub fn points(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::new(label, points, Mark::Points)
    }
    /// A line with points.
    pub fn line_points(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self::new(label, points, Mark::LinePoints)
    }
    /// Draws against the right-hand axis.
    pub fn on_right_axis(mut self) -> Self {
        self.right_axis = true;
        self
    }
    /// Dashed line.
    pub fn dashed(mut self) -> Self {
        self.dashed = true;
        self
    }
    /// Sets the colour.
    pub fn with_color(mut self, color: impl Into<String>) -> Self {
        self.color = Some(color.into());
        self
    }
}

/// A vertical line at `x`, labelled (e.g. where a method stopped).
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    /// Position on the x axis.
    pub x: f64,
    /// Text next to the line.
    pub label: String,
    /// Colour (CSS).
    pub color: String,
}

/// A chart. Build with the `with`-style methods, then [`Plot::to_svg`] or [`Plot::save`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plot {
    title: String,
    x_label: String,
    y_label: String,
    y2_label: String,
    log_x: bool,
    series: Vec<Series>,
    markers: Vec<Marker>,
}

impl Plot {
    /// An empty chart with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Default::default()
        }
    }
    /// Sets the x-axis label.
    pub fn x_label(mut self, s: impl Into<String>) -> Self {
        self.x_label = s.into();
        self
    }
    /// Sets the left y-axis label.
    pub fn y_label(mut self, s: impl Into<String>) -> Self {
        self.y_label = s.into();
        self
    }
    /// Sets the right y-axis label (used by series on the right axis).
    pub fn y2_label(mut self, s: impl Into<String>) -> Self {
        self.y2_label = s.into();
        self
    }
    /// Logarithmic x axis (positive x only).
    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }
    /// Adds a series.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }
    /// Adds a vertical marker.
    pub fn marker(mut self, x: f64, label: impl Into<String>, color: impl Into<String>) -> Self {
        self.markers.push(Marker {
            x,
            label: label.into(),
            color: color.into(),
        });
        self
    }
    /// The series added so far.
    pub fn series_list(&self) -> &[Series] {
        &self.series
    }

    /// Writes the SVG to `path` (creating its folder).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        ensure_parent(path)?;
        std::fs::write(path, self.to_svg()).map_err(|e| io_err("write", path, e))
    }

    /// The chart as an SVG document.
    pub fn to_svg(&self) -> String {
        let f = self.frame();
        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#,
            w = f.w,
            h = f.h
        );
        let _ = write!(
            s,
            r#"<rect width="{}" height="{}" fill="white"/>"#,
            f.w, f.h
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
            (f.l + f.r) / 2.0,
            esc(&self.title)
        );
        self.write_axes(&mut s, &f);
        self.write_markers(&mut s, &f);
        self.write_series(&mut s, &f);
        s.push_str("</svg>\n");
        s
    }

    /// The canvas, plot area and scales for this chart's series and markers.
    fn frame(&self) -> Frame {
        // The legend column grows with its longest entry (about 6.5 px a character at 12 px).
        let longest = self
            .series
            .iter()
            .map(|s| s.label.chars().count() + if s.right_axis { 8 } else { 0 })
            .chain(self.markers.iter().map(|m| m.label.chars().count()))
            .max()
            .unwrap_or(0);
        let legend = (longest as f64 * 6.5 + 45.0).max(170.0);
        let (w, h) = (590.0 + legend, 440.0);
        let has_right = self.series.iter().any(|s| s.right_axis);
        let right = if has_right { 70.0 } else { 20.0 };
        let mut f = Frame {
            w,
            h,
            l: 70.0,
            t: 40.0,
            r: w - right - legend,
            b: h - 55.0,
            right,
            has_right,
            log_x: self.log_x,
            x: (0.0, 1.0, vec![]),
            y: (0.0, 1.0, vec![]),
            z: (0.0, 1.0, vec![]),
        };
        let xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| f.finite(s).into_iter().map(|p| p.0))
            .chain(
                self.markers
                    .iter()
                    .map(|m| f.tx(m.x))
                    .filter(|x| x.is_finite()),
            )
            .collect();
        let ys = |right_axis: bool| -> Vec<f64> {
            self.series
                .iter()
                .filter(|s| s.right_axis == right_axis)
                .flat_map(|s| f.finite(s).into_iter().map(|p| p.1))
                .collect()
        };
        let (y, z) = (nice_range(&ys(false)), nice_range(&ys(true)));
        f.x = nice_range(&xs);
        (f.y, f.z) = (y, z);
        f
    }

    /// Grid, ticks, the frame and the axis labels.
    fn write_axes(&self, s: &mut String, f: &Frame) {
        let (l, t, r, b) = (f.l, f.t, f.r, f.b);
        for &v in &f.x.2 {
            let x = f.px(v);
            let text = if self.log_x {
                fmt_num(10f64.powf(v))
            } else {
                fmt_num(v)
            };
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" y1="{t}" x2="{x:.1}" y2="{b}" stroke="#eee"/>"##
            );
            let _ = write!(
                s,
                r#"<text x="{x:.1}" y="{}" text-anchor="middle">{text}</text>"#,
                b + 16.0
            );
        }
        for &v in &f.y.2 {
            let y = f.py(v, false);
            let _ = write!(
                s,
                r##"<line x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}" stroke="#eee"/>"##
            );
            let _ = write!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                l - 6.0,
                y + 4.0,
                fmt_num(v)
            );
        }
        if f.has_right {
            for &v in &f.z.2 {
                let y = f.py(v, true);
                let _ = write!(
                    s,
                    r#"<text x="{}" y="{:.1}">{}</text>"#,
                    r + 6.0,
                    y + 4.0,
                    fmt_num(v)
                );
            }
            let _ = write!(
                s,
                r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle">{}</text>"#,
                r + 55.0,
                (t + b) / 2.0,
                esc(&self.y2_label)
            );
        }
        let _ = write!(
            s,
            r##"<rect x="{l}" y="{t}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            r - l,
            b - t
        );
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (l + r) / 2.0,
            f.h - 15.0,
            esc(&self.x_label)
        );
        let _ = write!(
            s,
            r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (t + b) / 2.0,
            esc(&self.y_label)
        );
    }

    /// A dotted line per marker, named in the legend (labels on the chart overlap when markers
    /// are close).
    fn write_markers(&self, s: &mut String, f: &Frame) {
        for m in &self.markers {
            let x = f.px(f.tx(m.x));
            if x.is_finite() {
                let _ = write!(
                    s,
                    r#"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="{}" stroke-width="1.5" stroke-dasharray="2,3"/>"#,
                    f.t,
                    f.b,
                    esc(&m.color)
                );
            }
        }
    }

    /// Each series (a group with its line and points) and its legend entry, then the markers'
    /// legend entries.
    fn write_series(&self, s: &mut String, f: &Frame) {
        let legend_x = f.r + f.right;
        for (i, ser) in self.series.iter().enumerate() {
            let color = ser
                .color
                .clone()
                .unwrap_or_else(|| PALETTE[i % PALETTE.len()].to_string());
            let pts = f.finite(ser);
            let dash = if ser.dashed {
                r#" stroke-dasharray="6,4""#
            } else {
                ""
            };
            let _ = write!(s, r#"<g class="series" data-label="{}">"#, esc(&ser.label));
            if ser.mark != Mark::Points && pts.len() > 1 {
                let path: Vec<String> = pts
                    .iter()
                    .map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y, ser.right_axis)))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{}"/>"#,
                    path.join(" ")
                );
            }
            if ser.mark != Mark::Line {
                for &(x, y) in &pts {
                    let _ = write!(
                        s,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{color}"/>"#,
                        f.px(x),
                        f.py(y, ser.right_axis)
                    );
                }
            }
            s.push_str("</g>");
            let ly = f.t + 8.0 + 16.0 * i as f64;
            let _ = write!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}{}</text>"#,
                legend_x + 5.0,
                legend_x + 25.0,
                legend_x + 30.0,
                ly + 4.0,
                esc(&ser.label),
                if ser.right_axis { " (right)" } else { "" }
            );
        }
        for (j, m) in self.markers.iter().enumerate() {
            let ly = f.t + 8.0 + 16.0 * (self.series.len() + j) as f64;
            let _ = write!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="1.5" stroke-dasharray="2,3"/><text x="{}" y="{}">{}</text>"#,
                legend_x + 5.0,
                legend_x + 25.0,
                legend_x + 30.0,
                ly + 4.0,
                esc(&m.label),
                c = esc(&m.color)
            );
        }
    }
}

/// Canvas size, plot area (`l`, `t`, `r`, `b`), the right-axis margin, and the ranges and ticks
/// of the x axis and the left (`y`) and right (`z`) y axes.
struct Frame {
    w: f64,
    h: f64,
    l: f64,
    t: f64,
    r: f64,
    b: f64,
    right: f64,
    has_right: bool,
    log_x: bool,
    x: (f64, f64, Vec<f64>),
    y: (f64, f64, Vec<f64>),
    z: (f64, f64, Vec<f64>),
}

impl Frame {
    /// The x value on the axis's scale (log10 for a log axis).
    fn tx(&self, x: f64) -> f64 {
        if self.log_x {
            x.log10()
        } else {
            x
        }
    }

    /// A series' points on the axis scales, non-finite ones left out.
    fn finite(&self, s: &Series) -> Vec<(f64, f64)> {
        s.points
            .iter()
            .map(|&(x, y)| (self.tx(x), y))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }

    fn px(&self, x: f64) -> f64 {
        let (x0, x1, _) = self.x;
        self.l + (x - x0) / (x1 - x0) * (self.r - self.l)
    }

    fn py(&self, y: f64, right_axis: bool) -> f64 {
        let (lo, hi, _) = if right_axis { &self.z } else { &self.y };
        self.b - (y - lo) / (hi - lo) * (self.b - self.t)
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// A range covering `values` with round tick marks (about 5–10).
fn nice_range(values: &[f64]) -> (f64, f64, Vec<f64>) {
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() || !hi.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 1e-12 {
            lo.abs() * 0.1
        } else {
            1.0
        };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let n = ((hi - lo) / step).round() as usize;
    (lo, hi, (0..=n).map(|i| lo + i as f64 * step).collect())
}

/// Two charts from a monitor history: the metric, raw AUC and unablated accuracy against epoch
/// (with the kept epoch marked), and the ablation curves of every check.
pub fn history_plots(history: &[CheckRecord]) -> (Plot, Plot) {
    let metric_name = history.first().map_or("metric", |r| r.metric.name());
    let by_epoch = |f: fn(&CheckRecord) -> f64| {
        history
            .iter()
            .map(|r| (r.epoch as f64, f(r)))
            .collect::<Vec<_>>()
    };
    let mut trend = Plot::new("Reliance checks")
        .x_label("epoch")
        .y_label("value")
        .series(Series::line_points(metric_name, by_epoch(|r| r.value)))
        .series(Series::line_points("ablation AUC", by_epoch(|r| r.auc)).dashed())
        .series(
            Series::line_points("training accuracy", by_epoch(|r| r.unablated_accuracy)).dashed(),
        );
    let kept = history
        .last()
        .and_then(|r| r.kept_epoch)
        .or_else(|| history.iter().rfind(|r| r.kept).map(|r| r.epoch));
    if let Some(best) = kept {
        trend = trend.marker(best as f64, format!("kept epoch {best}"), "#2ca02c");
    }
    if let Some(stop) = history.iter().find(|r| r.decision.is_stop()) {
        trend = trend.marker(stop.epoch as f64, "stop", "#d62728");
    }
    let mut curves = Plot::new("Cumulative ablation curves")
        .x_label("fraction of units ablated")
        .y_label("training accuracy");
    for r in history {
        let pts = r
            .curve
            .fractions
            .iter()
            .copied()
            .zip(r.curve.accuracy.iter().copied())
            .collect();
        curves = curves.series(Series::line(format!("epoch {}", r.epoch), pts));
    }
    (trend, curves)
}

/// Writes the two [`history_plots`] of a history file next to it as `NAME.trend.svg` and
/// `NAME.curves.svg`; returns their paths.
pub fn plot_history_file(
    path: impl AsRef<Path>,
) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    let path = path.as_ref();
    let history = read_history(path)?;
    let (trend, curves) = history_plots(&history);
    let with = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::path::PathBuf::from(p)
    };
    let (a, b) = (with(".trend.svg"), with(".curves.svg"));
    trend.save(&a)?;
    curves.save(&b)?;
    Ok((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ranges_cover_the_data_with_round_ticks() {
        let (lo, hi, ticks) = nice_range(&[0.13, 0.92]);
        assert!(lo <= 0.13 && hi >= 0.92, "{lo} {hi}");
        assert_eq!(ticks.first(), Some(&lo));
        assert!((ticks.last().unwrap() - hi).abs() < 1e-9);
        assert!((4..=11).contains(&ticks.len()), "{ticks:?}");
        let (lo, hi, _) = nice_range(&[]);
        assert_eq!((lo, hi), (0.0, 1.0));
        let (lo, hi, _) = nice_range(&[2.0, 2.0]);
        assert!(lo < 2.0 && hi > 2.0);
    }

    #[test]
    fn the_canvas_widens_for_long_legend_entries() {
        let width = |label: &str| -> f64 {
            let svg = Plot::new("t")
                .series(Series::line(label, vec![(0.0, 1.0), (1.0, 2.0)]))
                .to_svg();
            svg.split("width=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(width("short"), 760.0);
        // 60 characters need about 60 · 6.5 px after the legend's 45 px of line and margin.
        assert!(width(&"x".repeat(60)) >= 590.0 + 60.0 * 6.5 + 45.0 - 1e-9);
    }

    #[test]
    fn svg_has_one_group_per_series_and_the_points() {
        let svg = Plot::new("t <&>")
            .series(Series::line(
                "a",
                vec![(0.0, 1.0), (1.0, 2.0), (2.0, f64::NAN)],
            ))
            .series(Series::points("b", vec![(0.5, 1.5)]).on_right_axis())
            .marker(1.0, "stop", "red")
            .to_svg();
        assert_eq!(svg.matches(r#"<g class="series""#).count(), 2);
        assert!(svg.contains(r#"data-label="a""#) && svg.contains(r#"data-label="b""#));
        assert!(svg.contains("t &lt;&amp;&gt;"));
        // Line "a" has 2 finite points; "b" one circle.
        let poly = svg.split("<polyline").nth(1).unwrap();
        let pts = poly
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(pts.split(' ').count(), 2);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains(">stop</text>"));
    }
}

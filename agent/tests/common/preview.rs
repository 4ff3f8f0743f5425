//! Grafana-like previews of dashboard panels, rendered to PNG from query results the caller
//! already has, so the docs can show what a dashboard looks like with real data.
//!
//! plotters rasterizes shapes and text into an RGB buffer at twice the requested size (its
//! lines are not anti-aliased; averaging 2x2 blocks smooths them); miniz_oxide compresses the
//! result into a PNG. Text uses DejaVu Sans, read at run time from [`FONT_PATH`]: no fontconfig,
//! nothing looked up at build time.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, ensure, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The regular face; the bold one beside it is used when present.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const FONT_BOLD_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf";

/// One series of a query result: its legend label and `(unix seconds, value)` points.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Durations: ns, µs, ms, s, min, h.
    Seconds,
    /// A ratio in 0..1 shown as a percentage.
    Percent01,
    /// IEC sizes: B, KiB, MiB...
    Bytes,
    PerSecond,
    /// Seconds per second: "0.35 s/s".
    SecondsPerSecond,
    None,
}

impl Unit {
    /// The unit of a dashboard panel's `fieldConfig.defaults.unit`; unknown ones show plain
    /// numbers.
    pub fn from_grafana(unit: &str) -> Unit {
        match unit {
            "s" => Unit::Seconds,
            "percentunit" => Unit::Percent01,
            "bytes" | "decbytes" => Unit::Bytes,
            "cps" | "ops" | "reqps" | "rps" | "wps" | "iops" => Unit::PerSecond,
            "suffix: s/s" | "suffix:s/s" => Unit::SecondsPerSecond,
            _ => Unit::None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelKind {
    TimeSeries {
        unit: Unit,
    },
    /// One series per histogram bucket: label = the `le` bound as Prometheus writes it
    /// ("0.000002048", "+Inf"; `le="..."` is accepted too), points = counts per interval.
    /// Cumulative buckets, as `sum by (le) (increase(x_bucket[..]))` returns them (counts
    /// non-decreasing in `le` at every step), are turned into per-bucket counts as Grafana's
    /// "Format: Heatmap" does; other input is drawn as given. Bounds are durations in seconds.
    Heatmap,
    /// The last value of a series in big digits, over its sparkline; several series make a
    /// grid of name and value, in query order.
    Stat {
        unit: Unit,
    },
    /// One row per series with its last value, largest first.
    Table {
        unit: Unit,
    },
    /// One horizontal bar per series for its last value, largest first.
    BarGauge {
        unit: Unit,
    },
}

pub struct Panel<'a> {
    pub title: &'a str,
    pub kind: PanelKind,
    pub series: &'a [Series],
}

/// Renders `panel` to a `width` x `height` PNG at `path`. Panels without data render their frame
/// with "No data".
pub fn render_png(panel: &Panel, path: &Path, width: u32, height: u32) -> Result<()> {
    let png = render_png_bytes(panel, width, height)?;
    std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
}

/// [`render_png`] without the file.
pub fn render_png_bytes(panel: &Panel, width: u32, height: u32) -> Result<Vec<u8>> {
    ensure!(
        (16..=4096).contains(&width) && (16..=4096).contains(&height),
        "panel size {width}x{height} is outside 16..=4096 pixels"
    );
    load_fonts()?;
    let (w, h) = (width * SS, height * SS);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let area = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let mut c = Canvas {
            area,
            w: width as f64,
            h: height as f64,
        };
        draw_panel(&mut c, panel)?;
        c.area
            .present()
            .map_err(|e| anyhow!("drawing {:?}: {e}", panel.title))?;
    }
    Ok(encode_png(width, height, &downsample(&buf, width, height)))
}

// ---------------------------------------------------------------------------------------------
// Formatting

/// `v` in `unit`, with at most three significant digits ("2.05 µs", "1.5 KiB", "25%").
pub fn format_value(v: f64, unit: Unit) -> String {
    if !v.is_finite() {
        return if v.is_nan() {
            "NaN".into()
        } else if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        };
    }
    let v_raw = v;
    let v = round_sig(v, 3);
    let a = v.abs();
    match unit {
        Unit::Percent01 => format!("{}%", num(v * 100.0)),
        Unit::Seconds => {
            let (div, sym) = [
                (3600.0, "h"),
                (60.0, "min"),
                (1.0, "s"),
                (1e-3, "ms"),
                (1e-6, "µs"),
            ]
            .into_iter()
            .find(|(d, _)| a >= *d)
            .unwrap_or((1e-9, "ns"));
            let div = if a == 0.0 { 1.0 } else { div };
            let sym = if a == 0.0 { "s" } else { sym };
            format!("{} {sym}", num(v / div))
        }
        Unit::Bytes => {
            // Chosen on the unrounded value: 1023 B stays "1023 B", not "1020 B".
            let (v, a) = (v_raw, v_raw.abs());
            let mut i = 0;
            while i < 5 && a >= 1024f64.powi(i + 1) {
                i += 1;
            }
            let sym = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"][i as usize];
            let scaled = v / 1024f64.powi(i);
            let n = if scaled.abs() >= 100.0 {
                format!("{scaled:.0}")
            } else {
                num(round_sig(scaled, 3))
            };
            format!("{n} {sym}")
        }
        Unit::PerSecond => format!("{}/s", si(v)),
        Unit::SecondsPerSecond => format!("{} s/s", si(v)),
        Unit::None => si(v),
    }
}

/// A histogram bucket's `le` bound as a duration: "0.000002048" -> "2.05 µs".
pub fn format_le(le: &str) -> String {
    match parse_le(le) {
        Some(v) if v.is_finite() => format_value(v, Unit::Seconds),
        Some(_) => "+Inf".into(),
        None => le.to_string(),
    }
}

/// Unix seconds as the UTC time of day, HH:MM:SS.
pub fn format_clock(unix: f64) -> String {
    let s = (unix.round() as i64).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn round_sig(v: f64, digits: i32) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let p = 10f64.powi(digits - 1 - v.abs().log10().floor() as i32);
    (v * p).round() / p
}

/// A number already rounded to three significant digits, without trailing zeros.
fn num(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 9) as usize;
    let s = format!("{v:.decimals$}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn si(v: f64) -> String {
    let a = v.abs();
    let (div, sym) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")]
        .into_iter()
        .find(|(d, _)| a >= *d)
        .unwrap_or((1.0, ""));
    format!("{}{sym}", num(round_sig(v / div, 3)))
}

fn parse_le(label: &str) -> Option<f64> {
    let s = label.trim();
    let s = s.strip_prefix("le=").unwrap_or(s).trim_matches('"');
    s.parse::<f64>().ok().filter(|v| !v.is_nan())
}

// ---------------------------------------------------------------------------------------------
// Ticks

/// Up to about `max_ticks` round values covering `lo..=hi`; returns (ticks, lo', hi') with the
/// range widened to whole steps. Byte axes step in powers of 1024.
fn value_ticks(lo: f64, hi: f64, max_ticks: usize, unit: Unit) -> (Vec<f64>, f64, f64) {
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else if hi == 0.0 {
        (0.0, 1.0)
    } else {
        (lo - hi.abs() * 0.5, hi + hi.abs() * 0.5)
    };
    let raw = (hi - lo) / max_ticks.max(1) as f64;
    let base = if unit == Unit::Bytes && raw >= 1024.0 {
        1024f64.powi((raw.log2() / 10.0).floor() as i32)
    } else {
        1.0
    };
    let r = raw / base;
    let mag = 10f64.powf(r.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= r * 0.999)
        .unwrap_or(10.0 * mag)
        * base;
    let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let n = ((hi - lo) / step).round() as usize;
    ((0..=n).map(|i| lo + step * i as f64).collect(), lo, hi)
}

/// Time ticks at round wall-clock steps, at most `max_ticks` of them inside `lo..=hi`.
fn time_ticks(lo: f64, hi: f64, max_ticks: usize) -> Vec<f64> {
    const STEPS: [f64; 18] = [
        1., 2., 5., 10., 15., 30., 60., 120., 300., 600., 900., 1800., 3600., 7200., 10800.,
        21600., 43200., 86400.,
    ];
    let span = (hi - lo).max(1.0);
    let max_ticks = max_ticks.max(1) as f64;
    let step = STEPS
        .into_iter()
        .find(|s| span / s <= max_ticks)
        .unwrap_or((span / max_ticks / 86400.0).ceil() * 86400.0);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 {
        out.push(t);
        t += step;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Theme

const SS: u32 = 2; // supersampling factor
const BG: RGBColor = RGBColor(0x18, 0x1b, 0x1f);
const BORDER: RGBColor = RGBColor(0x2c, 0x2f, 0x35);
const TEXT: RGBColor = RGBColor(0xcc, 0xcc, 0xdc);
const TEXT_DIM: RGBColor = RGBColor(0x8e, 0x8e, 0x99);
const GRID: RGBColor = RGBColor(0x2a, 0x2d, 0x32);
const TRACK: RGBColor = RGBColor(0x26, 0x29, 0x2f);
const MUTED_SERIES: RGBColor = RGBColor(0x4a, 0x4d, 0x55);
const GREEN: RGBColor = RGBColor(0x73, 0xbf, 0x69);
/// Grafana's classic palette.
const PALETTE: [RGBColor; 8] = [
    RGBColor(0x73, 0xbf, 0x69),
    RGBColor(0xf2, 0xcc, 0x0c),
    RGBColor(0x8a, 0xb8, 0xff),
    RGBColor(0xff, 0x78, 0x0a),
    RGBColor(0xf2, 0x49, 0x5c),
    RGBColor(0x57, 0x94, 0xf2),
    RGBColor(0xb8, 0x77, 0xd9),
    RGBColor(0x6e, 0xd0, 0xe0),
];
/// Heatmap colors from the fewest to the most counts: dark brown to orange to pale yellow.
const HEAT: [(f64, (f64, f64, f64)); 5] = [
    (0.0, (0x3d as f64, 0x1c as f64, 0x0b as f64)),
    (0.3, (0x8c as f64, 0x2d as f64, 0x04 as f64)),
    (0.6, (0xe8 as f64, 0x5d as f64, 0x0c as f64)),
    (0.85, (0xfd as f64, 0x9e as f64, 0x3c as f64)),
    (1.0, (0xff as f64, 0xe0 as f64, 0x8a as f64)),
];
const TITLE_EM: f64 = 14.0;
const LABEL_EM: f64 = 12.0;
const TITLE: Face = Face {
    em: TITLE_EM,
    color: TEXT,
    bold: true,
};
const LABEL: Face = Face {
    em: LABEL_EM,
    color: TEXT,
    bold: false,
};
const LABEL_BOLD: Face = Face {
    em: LABEL_EM,
    color: TEXT,
    bold: true,
};
const LABEL_DIM: Face = Face {
    em: LABEL_EM,
    color: TEXT_DIM,
    bold: false,
};
const PAD: f64 = 8.0;
const TITLE_H: f64 = 32.0;
const LEGEND_ROW: f64 = 20.0;
const LEGEND_MAX: usize = 8;

fn heat(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let i = HEAT
        .iter()
        .position(|(x, _)| *x >= t)
        .unwrap_or(HEAT.len() - 1)
        .max(1);
    let ((x0, a), (x1, b)) = (HEAT[i - 1], HEAT[i]);
    let f = ((t - x0) / (x1 - x0)).clamp(0.0, 1.0);
    let mix = |p: f64, q: f64| (p + (q - p) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

static FONTS: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Registers DejaVu Sans with plotters once per process (it keeps `&'static` font bytes).
fn load_fonts() -> Result<()> {
    FONTS
        .get_or_init(|| {
            let regular = std::fs::read(FONT_PATH).map_err(|e| {
                format!("font {FONT_PATH}: {e}; install the Debian package fonts-dejavu-core (apt-get install fonts-dejavu-core)")
            })?;
            let regular: &'static [u8] = Box::leak(regular.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, regular)
                .map_err(|_| format!("font {FONT_PATH} is not a usable TrueType font"))?;
            // Without the bold face, plotters falls back to the regular one.
            if let Ok(bold) = std::fs::read(FONT_BOLD_PATH) {
                let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, Box::leak(bold.into_boxed_slice()));
            }
            Ok(())
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

#[derive(Clone, Copy)]
struct Face {
    /// Font size in CSS pixels (em).
    em: f64,
    color: RGBColor,
    bold: bool,
}

// ---------------------------------------------------------------------------------------------
// Canvas: logical pixels in, supersampled device pixels out.

struct Canvas<'a> {
    area: DrawingArea<BitMapBackend<'a>, Shift>,
    w: f64,
    h: f64,
}

fn dev(v: f64) -> i32 {
    (v * SS as f64).round() as i32
}

/// ab_glyph's text size is the font's ascent-to-descent height; DejaVu's is 1.164 em.
fn font(em: f64, bold: bool) -> FontDesc<'static> {
    let style = if bold {
        FontStyle::Bold
    } else {
        FontStyle::Normal
    };
    FontDesc::new(FontFamily::SansSerif, em * 1.164 * SS as f64, style)
}

impl Canvas<'_> {
    fn rect(&self, x0: f64, y0: f64, x1: f64, y1: f64, color: impl Color) -> Result<()> {
        if x1 <= x0 || y1 <= y0 {
            return Ok(());
        }
        let r = Rectangle::new(
            [(dev(x0), dev(y0)), (dev(x1) - 1, dev(y1) - 1)],
            color.filled(),
        );
        self.area.draw(&r).map_err(|e| anyhow!("drawing: {e}"))
    }

    fn line(&self, pts: &[(f64, f64)], color: impl Color, width: f64) -> Result<()> {
        let pts: Vec<_> = pts.iter().map(|&(x, y)| (dev(x), dev(y))).collect();
        let style = color.stroke_width((width * SS as f64).round().max(1.0) as u32);
        self.area
            .draw(&PathElement::new(pts, style))
            .map_err(|e| anyhow!("drawing: {e}"))
    }

    fn polygon(&self, pts: &[(f64, f64)], color: impl Color) -> Result<()> {
        let pts: Vec<_> = pts.iter().map(|&(x, y)| (dev(x), dev(y))).collect();
        self.area
            .draw(&Polygon::new(pts, color.filled()))
            .map_err(|e| anyhow!("drawing: {e}"))
    }

    fn text_width(&self, s: &str, em: f64, bold: bool) -> f64 {
        let style = TextStyle::from(font(em, bold));
        self.area
            .estimate_text_size(s, &style)
            .map(|(w, _)| w as f64 / SS as f64)
            .unwrap_or(0.0)
    }

    /// Draws `s` with its capitals centered on `cy`; `x` is the left, center or right edge.
    fn text(&self, s: &str, x: f64, cy: f64, face: Face, h: HPos) -> Result<()> {
        if s.is_empty() {
            return Ok(());
        }
        // ab_glyph puts the baseline `size / 2` below the anchor; DejaVu's capitals are 0.729 em.
        let baseline = cy + 0.729 * face.em / 2.0;
        let top = baseline - face.em * 1.164 / 2.0;
        let style = font(face.em, face.bold)
            .color(&face.color)
            .pos(Pos::new(h, VPos::Top));
        self.area
            .draw_text(s, &style, (dev(x), dev(top)))
            .map_err(|e| anyhow!("drawing text {s:?}: {e}"))
    }

    /// `s`, shortened with an ellipsis to fit `max_w`.
    fn fit(&self, s: &str, em: f64, max_w: f64) -> String {
        if self.text_width(s, em, false) <= max_w {
            return s.to_string();
        }
        let mut chars: Vec<char> = s.chars().collect();
        while !chars.is_empty() {
            chars.pop();
            let t: String = chars.iter().collect::<String>() + "…";
            if self.text_width(&t, em, false) <= max_w {
                return t;
            }
        }
        String::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Panels

/// The finite points of a series, in time order.
fn clean(s: &Series) -> Vec<(f64, f64)> {
    let mut p: Vec<_> = s
        .points
        .iter()
        .copied()
        .filter(|(t, v)| t.is_finite() && v.is_finite())
        .collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    p
}

fn last(points: &[(f64, f64)]) -> f64 {
    points.last().map(|p| p.1).unwrap_or(f64::NAN)
}

fn label(s: &Series) -> &str {
    if s.label.is_empty() {
        "value"
    } else {
        &s.label
    }
}

/// Series with data, as (label, points), the largest last value first.
fn by_last_value(series: &[Series]) -> Vec<(&str, Vec<(f64, f64)>)> {
    let mut v: Vec<_> = series
        .iter()
        .map(|s| (label(s), clean(s)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    v.sort_by(|a, b| last(&b.1).total_cmp(&last(&a.1)));
    v
}

fn draw_panel(c: &mut Canvas, panel: &Panel) -> Result<()> {
    c.area.fill(&BG).map_err(|e| anyhow!("drawing: {e}"))?;
    let title = c.fit(panel.title, TITLE_EM, c.w - 2.0 * PAD);
    c.text(&title, PAD, TITLE_H / 2.0, TITLE, HPos::Left)?;
    let body = Rect {
        x0: PAD,
        y0: TITLE_H,
        x1: c.w - PAD,
        y1: c.h - PAD,
    };
    let drawn = match panel.kind {
        PanelKind::TimeSeries { unit } => time_series(c, body, panel.series, unit)?,
        PanelKind::Heatmap => heatmap(c, body, panel.series)?,
        PanelKind::Stat { unit } => stat(c, body, panel.series, unit)?,
        PanelKind::Table { unit } => table(c, body, panel.series, unit)?,
        PanelKind::BarGauge { unit } => bar_gauge(c, body, panel.series, unit)?,
    };
    if !drawn {
        c.text(
            "No data",
            c.w / 2.0,
            (TITLE_H + c.h) / 2.0 - PAD,
            Face {
                em: 16.0,
                color: TEXT_DIM,
                bold: false,
            },
            HPos::Center,
        )?;
    }
    // Border last, over anything that reached the edge.
    let (w, h) = (c.w, c.h);
    c.rect(0.0, 0.0, w, 1.0, BORDER)?;
    c.rect(0.0, h - 1.0, w, h, BORDER)?;
    c.rect(0.0, 0.0, 1.0, h, BORDER)?;
    c.rect(w - 1.0, 0.0, w, h, BORDER)
}

#[derive(Clone, Copy, Debug)]
struct Rect {
    x0: f64,
    y0: f64,
    x1: f64,
    y1: f64,
}

impl Rect {
    fn w(&self) -> f64 {
        self.x1 - self.x0
    }
    fn h(&self) -> f64 {
        self.y1 - self.y0
    }
}

/// Linear map from data to pixels.
fn lin(v: f64, (d0, d1): (f64, f64), (p0, p1): (f64, f64)) -> f64 {
    if d1 == d0 {
        (p0 + p1) / 2.0
    } else {
        p0 + (v - d0) / (d1 - d0) * (p1 - p0)
    }
}

/// Draws the horizontal grid with value labels on the left and the time labels below; returns
/// the plot rectangle. `y_ticks` are (value, label) pairs.
fn axes(
    c: &Canvas,
    body: Rect,
    y_ticks: &[(f64, String)],
    y_dom: (f64, f64),
    x_dom: (f64, f64),
) -> Result<Rect> {
    let label_w = y_ticks
        .iter()
        .map(|(_, l)| c.text_width(l, LABEL_EM, false))
        .fold(0.0, f64::max);
    let plot = Rect {
        x0: body.x0 + label_w + 8.0,
        y0: body.y0 + 6.0,
        x1: body.x1 - 4.0,
        y1: body.y1 - 20.0,
    };
    if plot.w() < 8.0 || plot.h() < 8.0 {
        return Ok(plot);
    }
    let mut last_y = f64::INFINITY;
    for (v, l) in y_ticks {
        let y = lin(*v, y_dom, (plot.y1, plot.y0)).round();
        c.rect(plot.x0, y, plot.x1, y + 1.0, GRID)?;
        if last_y - y >= 16.0 {
            c.text(l, plot.x0 - 8.0, y, LABEL_DIM, HPos::Right)?;
            last_y = y;
        }
    }
    let max_ticks = (plot.w() / 90.0).floor().max(1.0) as usize;
    for t in time_ticks(x_dom.0, x_dom.1, max_ticks) {
        let x = lin(t, x_dom, (plot.x0, plot.x1)).round();
        c.rect(x, plot.y0, x + 1.0, plot.y1, GRID)?;
        let w = c.text_width("00:00:00", LABEL_EM, false) / 2.0;
        let x = x.min(body.x1 - w).max(body.x0 + w);
        c.text(&format_clock(t), x, plot.y1 + 12.0, LABEL_DIM, HPos::Center)?;
    }
    Ok(plot)
}

/// The smallest gap between consecutive timestamps: the query step.
fn step_of(points: impl Iterator<Item = f64>) -> Option<f64> {
    let mut ts: Vec<f64> = points.collect();
    ts.sort_by(f64::total_cmp);
    ts.windows(2)
        .map(|w| w[1] - w[0])
        .filter(|d| *d > 1e-9)
        .min_by(f64::total_cmp)
}

fn time_series(c: &Canvas, body: Rect, series: &[Series], unit: Unit) -> Result<bool> {
    let series = by_last_value(series);
    if series.is_empty() {
        return Ok(false);
    }
    // Legend: the top series by last value, in palette colors; the rest are drawn grey.
    let shown = series.len().min(LEGEND_MAX);
    let mut items: Vec<(String, Option<RGBColor>)> = series
        .iter()
        .take(shown)
        .enumerate()
        .map(|(i, (l, _))| (l.to_string(), Some(PALETTE[i % PALETTE.len()])))
        .collect();
    if series.len() > shown {
        items.push((format!("+{} more", series.len() - shown), None));
    }
    let mut rows: Vec<Vec<(String, Option<RGBColor>, f64)>> = vec![vec![]];
    let mut x = 0.0;
    for (l, color) in items {
        let l = c.fit(&l, LABEL_EM, body.w() - 24.0);
        let w = c.text_width(&l, LABEL_EM, false) + if color.is_some() { 18.0 } else { 0.0 };
        if x > 0.0 && x + w > body.w() {
            rows.push(vec![]);
            x = 0.0;
        }
        rows.last_mut().unwrap().push((l, color, body.x0 + x));
        x += w + 16.0;
    }
    let rows: Vec<_> = rows
        .into_iter()
        .take(((body.h() / 3.0) / LEGEND_ROW).floor().max(1.0) as usize)
        .collect();
    let legend_h = rows.len() as f64 * LEGEND_ROW;
    for (i, row) in rows.iter().enumerate() {
        let cy = body.y1 - legend_h + LEGEND_ROW * (i as f64 + 0.5);
        for (l, color, x) in row {
            let tx = match color {
                Some(color) => {
                    c.rect(*x, cy - 2.0, x + 14.0, cy + 2.0, *color)?;
                    x + 18.0
                }
                None => *x,
            };
            c.text(
                l,
                tx,
                cy,
                if color.is_some() { LABEL } else { LABEL_DIM },
                HPos::Left,
            )?;
        }
    }

    let all = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (t0, t1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), (t, _)| {
        (a.min(t), b.max(t))
    });
    let (t0, t1) = if t1 > t0 {
        (t0, t1)
    } else {
        (t0 - 30.0, t1 + 30.0)
    };
    let (v0, v1) = all().fold((0f64, f64::NEG_INFINITY), |(a, b), (_, v)| {
        (a.min(v), b.max(v))
    });
    let area = Rect {
        y1: body.y1 - legend_h - 4.0,
        ..body
    };
    let max_ticks = ((area.h() - 26.0) / 36.0).floor().clamp(1.0, 8.0) as usize;
    let (ticks, v0, v1) = value_ticks(v0, v1.max(v0), max_ticks, unit);
    let ticks: Vec<_> = ticks
        .into_iter()
        .map(|v| (v, format_value(v, unit)))
        .collect();
    let plot = axes(c, area, &ticks, (v0, v1), (t0, t1))?;
    if plot.w() < 8.0 || plot.h() < 8.0 {
        return Ok(true);
    }

    let to_px = |(t, v): (f64, f64)| {
        (
            lin(t, (t0, t1), (plot.x0, plot.x1)),
            lin(v, (v0, v1), (plot.y1, plot.y0)),
        )
    };
    // Grey ones first, under the colored ones; the largest series on top.
    for (i, (_, points)) in series.iter().enumerate().rev() {
        let color = if i < shown {
            PALETTE[i % PALETTE.len()]
        } else {
            MUTED_SERIES
        };
        // Break the line where samples are missing, as Grafana does for absent steps.
        let step = step_of(points.iter().map(|p| p.0)).unwrap_or(f64::INFINITY);
        let mut run: Vec<(f64, f64)> = vec![];
        for (j, &p) in points.iter().enumerate() {
            if j > 0 && p.0 - points[j - 1].0 > step * 1.5 {
                draw_run(c, &run, color)?;
                run.clear();
            }
            run.push(to_px(p));
        }
        draw_run(c, &run, color)?;
    }
    Ok(true)
}

fn draw_run(c: &Canvas, run: &[(f64, f64)], color: RGBColor) -> Result<()> {
    match run {
        [] => Ok(()),
        [(x, y)] => c.rect(x - 2.5, y - 2.5, x + 2.5, y + 2.5, color),
        _ => c.line(run, color, 1.5),
    }
}

fn heatmap(c: &Canvas, body: Rect, series: &[Series]) -> Result<bool> {
    // (le, label, points)
    let mut buckets = vec![];
    for s in series {
        let le = parse_le(&s.label)
            .with_context(|| format!("heatmap series {:?} is not an `le` bound", s.label))?;
        buckets.push((le, &s.label, clean(s)));
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut times: Vec<f64> = buckets
        .iter()
        .flat_map(|b| b.2.iter().map(|p| p.0))
        .collect();
    times.sort_by(f64::total_cmp);
    times.dedup_by(|a, b| (*a - *b).abs() < 1e-6);
    if times.is_empty() {
        return Ok(false);
    }
    let col = |t: f64| times.partition_point(|x| *x < t - 1e-6);
    let mut grid = vec![vec![0f64; times.len()]; buckets.len()];
    for (r, b) in buckets.iter().enumerate() {
        for &(t, v) in &b.2 {
            grid[r][col(t)] = v;
        }
    }
    let cumulative = buckets.len() > 1
        && (0..times.len()).all(|j| {
            grid.windows(2)
                .all(|w| w[1][j] >= w[0][j] - 1e-9 * w[1][j].abs())
        });
    if cumulative {
        for r in (1..grid.len()).rev() {
            let (below, row) = grid.split_at_mut(r);
            for (v, b) in row[0].iter_mut().zip(&below[r - 1]) {
                *v = (*v - b).max(0.0);
            }
        }
    }
    // Only the rows that hold counts, with one empty row either side for context.
    let used: Vec<usize> = (0..grid.len())
        .filter(|&r| grid[r].iter().any(|v| *v > 0.0))
        .collect();
    let (r0, r1) = match (used.first(), used.last()) {
        (Some(&a), Some(&b)) => (a.saturating_sub(1), (b + 1).min(grid.len() - 1)),
        _ => (0, grid.len() - 1),
    };
    let rows = r1 - r0 + 1;
    let max = grid.iter().flatten().copied().fold(0.0, f64::max);

    let step = step_of(times.iter().copied()).unwrap_or(60.0);
    let (t0, t1) = (times[0] - step, *times.last().unwrap());
    // Each row is labelled at its top edge with its `le`.
    let ticks: Vec<_> = (r0..=r1)
        .map(|r| ((r - r0 + 1) as f64, format_le(buckets[r].1)))
        .collect();
    let area = Rect {
        y1: body.y1 - LEGEND_ROW,
        ..body
    };
    let plot = axes(c, area, &ticks, (0.0, rows as f64), (t0, t1))?;
    if plot.w() < 8.0 || plot.h() < 8.0 {
        return Ok(true);
    }
    let cell_h = plot.h() / rows as f64;
    let cell_w = plot.w() * step / (t1 - t0);
    let gap = |size: f64| if size >= 6.0 { 1.0 } else { 0.0 };
    for (k, row) in grid[r0..=r1].iter().enumerate() {
        let y1 = plot.y1 - k as f64 * cell_h;
        for (&t, &v) in times.iter().zip(row) {
            if v <= 0.0 {
                continue; // empty cells stay transparent
            }
            let x1 = lin(t, (t0, t1), (plot.x0, plot.x1));
            // Grafana's "exponential" color scale with exponent 0.5, as the dashboards use.
            let color = heat((v / max).sqrt());
            c.rect(
                x1 - cell_w + gap(cell_w),
                y1 - cell_h + gap(cell_h),
                x1,
                y1,
                color,
            )?;
        }
    }
    // Color scale under the axis, as Grafana draws it.
    let cy = body.y1 - LEGEND_ROW / 2.0;
    let mut x = plot.x0;
    c.text("0", x, cy, LABEL_DIM, HPos::Left)?;
    x += c.text_width("0", LABEL_EM, false) + 6.0;
    let bar_w = (plot.w() / 4.0).clamp(40.0, 160.0);
    for i in 0..bar_w as usize {
        let t = i as f64 / bar_w;
        c.rect(
            x + i as f64,
            cy - 4.0,
            x + i as f64 + 1.0,
            cy + 4.0,
            heat(t),
        )?;
    }
    c.text(&si(max), x + bar_w + 6.0, cy, LABEL_DIM, HPos::Left)?;
    Ok(true)
}

fn stat(c: &Canvas, body: Rect, series: &[Series], unit: Unit) -> Result<bool> {
    let with_data: Vec<_> = series
        .iter()
        .map(|s| (label(s), clean(s)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if with_data.len() > 1 {
        stat_grid(c, body, &with_data, unit)?;
        return Ok(true);
    }
    let Some((_, points)) = with_data.into_iter().next() else {
        return Ok(false);
    };
    // Sparkline under the value, Grafana's "graph mode: area".
    if points.len() > 1 {
        let (t0, t1) = (points[0].0, points[points.len() - 1].0);
        let (lo, hi) = points
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                (a.min(p.1), b.max(p.1))
            });
        let (lo, hi) = if hi > lo {
            (lo, hi)
        } else {
            (lo - 1.0, hi + 1.0)
        };
        let (y0, y1) = (body.y1 - body.h() * 0.35, body.y1);
        let line: Vec<_> = points
            .iter()
            .map(|&(t, v)| {
                (
                    lin(t, (t0, t1), (body.x0 - PAD + 1.0, body.x1 + PAD - 1.0)),
                    lin(v, (lo, hi), (y1, y0)),
                )
            })
            .collect();
        let mut fill = line.clone();
        fill.push((body.x1 + PAD - 1.0, y1 + PAD - 1.0));
        fill.push((body.x0 - PAD + 1.0, y1 + PAD - 1.0));
        c.polygon(&fill, GREEN.mix(0.18))?;
        c.line(&line, GREEN, 1.0)?;
    }
    let text = format_value(last(&points), unit);
    let mut em = (body.h() * 0.45).min(96.0);
    let w = c.text_width(&text, em, true);
    if w > body.w() * 0.9 {
        em *= body.w() * 0.9 / w;
    }
    c.text(
        &text,
        (body.x0 + body.x1) / 2.0,
        body.y0 + body.h() * 0.4,
        Face {
            em,
            color: GREEN,
            bold: true,
        },
        HPos::Center,
    )?;
    Ok(true)
}

/// One cell per series, laid out in the grid that leaves the values the most room.
fn stat_grid(c: &Canvas, body: Rect, series: &[(&str, Vec<(f64, f64)>)], unit: Unit) -> Result<()> {
    let n = series.len();
    let (cols, rows) = (1..=n)
        .map(|cols| (cols, n.div_ceil(cols)))
        .max_by(|a, b| {
            let room = |(cols, rows): (usize, usize)| {
                (body.w() / cols as f64 / 2.5).min(body.h() / rows as f64)
            };
            room(*a).total_cmp(&room(*b))
        })
        .unwrap_or((1, 1));
    let (cw, ch) = (body.w() / cols as f64, body.h() / rows as f64);
    for (i, (name, points)) in series.iter().enumerate() {
        let (x0, y0) = (
            body.x0 + cw * (i % cols) as f64,
            body.y0 + ch * (i / cols) as f64,
        );
        c.rect(x0 + 2.0, y0 + 2.0, x0 + cw - 2.0, y0 + ch - 2.0, TRACK)?;
        let name_em = (ch * 0.18).clamp(9.0, 14.0);
        let name = c.fit(name, name_em, cw - 12.0);
        c.text(
            &name,
            x0 + cw / 2.0,
            y0 + 6.0 + name_em * 0.6,
            Face {
                em: name_em,
                color: TEXT,
                bold: false,
            },
            HPos::Center,
        )?;
        let text = format_value(last(points), unit);
        let mut em = (ch * 0.4).min(64.0);
        let w = c.text_width(&text, em, true);
        if w > cw * 0.85 {
            em *= cw * 0.85 / w;
        }
        let cy = (y0 + 6.0 + name_em * 1.2 + y0 + ch) / 2.0;
        c.text(
            &text,
            x0 + cw / 2.0,
            cy,
            Face {
                em,
                color: GREEN,
                bold: true,
            },
            HPos::Center,
        )?;
    }
    Ok(())
}

fn table(c: &Canvas, body: Rect, series: &[Series], unit: Unit) -> Result<bool> {
    let series = by_last_value(series);
    if series.is_empty() {
        return Ok(false);
    }
    const ROW: f64 = 28.0;
    let (x0, x1) = (body.x0, body.x1);
    c.rect(x0, body.y0, x1, body.y0 + ROW, TRACK)?;
    c.text(
        "Series",
        x0 + 8.0,
        body.y0 + ROW / 2.0,
        LABEL_BOLD,
        HPos::Left,
    )?;
    c.text(
        "Last",
        x1 - 8.0,
        body.y0 + ROW / 2.0,
        LABEL_BOLD,
        HPos::Right,
    )?;
    let fits = ((body.h() - ROW) / ROW).floor().max(1.0) as usize;
    let shown = if series.len() > fits {
        fits - 1
    } else {
        series.len()
    };
    let value_w = series
        .iter()
        .map(|(_, p)| c.text_width(&format_value(last(p), unit), LABEL_EM, false))
        .fold(0.0, f64::max);
    for (i, (l, p)) in series.iter().take(shown).enumerate() {
        let y = body.y0 + ROW * (i as f64 + 1.0);
        c.rect(x0, y + ROW - 1.0, x1, y + ROW, GRID)?;
        let l = c.fit(l, LABEL_EM, (x1 - x0) - value_w - 32.0);
        c.text(&l, x0 + 8.0, y + ROW / 2.0, LABEL, HPos::Left)?;
        c.text(
            &format_value(last(p), unit),
            x1 - 8.0,
            y + ROW / 2.0,
            LABEL,
            HPos::Right,
        )?;
    }
    if shown < series.len() {
        let y = body.y0 + ROW * (shown as f64 + 1.0);
        c.text(
            &format!("+{} more", series.len() - shown),
            x0 + 8.0,
            y + ROW / 2.0,
            LABEL_DIM,
            HPos::Left,
        )?;
    }
    Ok(true)
}

fn bar_gauge(c: &Canvas, body: Rect, series: &[Series], unit: Unit) -> Result<bool> {
    let series = by_last_value(series);
    if series.is_empty() {
        return Ok(false);
    }
    let fits = (body.h() / 24.0).floor().max(1.0) as usize;
    let shown = if series.len() > fits {
        fits.saturating_sub(1).max(1)
    } else {
        series.len()
    };
    let rows = shown + usize::from(shown < series.len());
    let row_h = (body.h() / rows as f64).min(40.0);
    let values: Vec<f64> = series.iter().map(|(_, p)| last(p)).collect();
    let max = match unit {
        Unit::Percent01 if values.iter().all(|v| *v <= 1.0) => 1.0,
        _ => values.iter().copied().fold(0.0, f64::max),
    };
    let label_w = series
        .iter()
        .take(shown)
        .map(|(l, _)| c.text_width(l, LABEL_EM, false))
        .fold(0.0, f64::max)
        .min(body.w() * 0.35);
    let value_w = values
        .iter()
        .map(|v| c.text_width(&format_value(*v, unit), LABEL_EM, true))
        .fold(0.0, f64::max);
    let (bx0, bx1) = (body.x0 + label_w + 10.0, body.x1 - value_w - 10.0);
    for (i, ((l, _), v)) in series.iter().zip(&values).take(shown).enumerate() {
        let cy = body.y0 + row_h * (i as f64 + 0.5);
        let half = (row_h * 0.32).min(10.0);
        let l = c.fit(l, LABEL_EM, label_w);
        c.text(&l, body.x0, cy, LABEL, HPos::Left)?;
        c.rect(bx0, cy - half, bx1, cy + half, TRACK)?;
        let frac = if max > 0.0 {
            (v / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let color = PALETTE[i % PALETTE.len()];
        c.rect(bx0, cy - half, bx0 + (bx1 - bx0) * frac, cy + half, color)?;
        c.text(
            &format_value(*v, unit),
            body.x1,
            cy,
            Face {
                color,
                ..LABEL_BOLD
            },
            HPos::Right,
        )?;
    }
    if shown < series.len() {
        let cy = body.y0 + row_h * (shown as f64 + 0.5);
        c.text(
            &format!("+{} more", series.len() - shown),
            body.x0,
            cy,
            LABEL_DIM,
            HPos::Left,
        )?;
    }
    Ok(true)
}

// ---------------------------------------------------------------------------------------------
// PNG

/// Averages each 2x2 block of the supersampled RGB buffer.
fn downsample(buf: &[u8], w: u32, h: u32) -> Vec<u8> {
    let (w, h, sw) = (w as usize, h as usize, (w * SS) as usize);
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            for ch in 0..3 {
                let mut sum = 0u32;
                for dy in 0..SS as usize {
                    for dx in 0..SS as usize {
                        sum += buf[((y * SS as usize + dy) * sw + x * SS as usize + dx) * 3 + ch]
                            as u32;
                    }
                }
                out[(y * w + x) * 3 + ch] = ((sum + 2) / (SS * SS)) as u8;
            }
        }
    }
    out
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for &b in parts.iter().flat_map(|p| p.iter()) {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An 8-bit RGB PNG; every row uses the Sub filter, which turns flat runs into zeros.
fn encode_png(w: u32, h: u32, rgb: &[u8]) -> Vec<u8> {
    let stride = w as usize * 3;
    let mut raw = Vec::with_capacity((stride + 1) * h as usize);
    for row in rgb.chunks(stride) {
        raw.push(1);
        raw.extend((0..stride).map(|i| row[i].wrapping_sub(if i >= 3 { row[i - 3] } else { 0 })));
    }
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend(w.to_be_bytes());
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, adaptive filtering, no interlace
    let mut png = PNG_SIGNATURE.to_vec();
    for (kind, data) in [
        (b"IHDR", ihdr),
        (b"IDAT", miniz_oxide::deflate::compress_to_vec_zlib(&raw, 9)),
        (b"IEND", vec![]),
    ] {
        png.extend((data.len() as u32).to_be_bytes());
        png.extend(kind);
        png.extend(&data);
        png.extend(crc32(&[kind, &data]).to_be_bytes());
    }
    png
}

/// A decoded 8-bit RGB image.
pub struct Rgb {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<[u8; 3]>,
}

/// Decodes an 8-bit RGB, non-interlaced PNG (what [`render_png`] writes), checking every chunk's
/// CRC, so tests can look at the pixels without an image crate.
pub fn decode_png(bytes: &[u8]) -> Result<Rgb> {
    ensure!(
        bytes.starts_with(&PNG_SIGNATURE),
        "not a PNG: bad signature"
    );
    let (mut pos, mut ihdr, mut idat) = (8, None, vec![]);
    while pos + 12 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[pos..pos + 4].try_into()?) as usize;
        ensure!(
            pos + 12 + len <= bytes.len(),
            "PNG chunk at {pos} runs past the end"
        );
        let (kind, data) = (&bytes[pos + 4..pos + 8], &bytes[pos + 8..pos + 8 + len]);
        let crc = u32::from_be_bytes(bytes[pos + 8 + len..pos + 12 + len].try_into()?);
        ensure!(
            crc == crc32(&[kind, data]),
            "PNG chunk {} has a bad CRC",
            String::from_utf8_lossy(kind)
        );
        match kind {
            b"IHDR" => ihdr = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    let ihdr = ihdr.context("PNG has no IHDR")?;
    ensure!(ihdr.len() == 13, "PNG IHDR has {} bytes", ihdr.len());
    let (w, h) = (
        u32::from_be_bytes(ihdr[0..4].try_into()?),
        u32::from_be_bytes(ihdr[4..8].try_into()?),
    );
    ensure!(
        ihdr[8..13] == [8, 2, 0, 0, 0],
        "only 8-bit RGB non-interlaced PNGs are supported, IHDR {:?}",
        &ihdr[8..]
    );
    let raw = miniz_oxide::inflate::decompress_to_vec_zlib(&idat)
        .map_err(|e| anyhow!("PNG IDAT: {e:?}"))?;
    let stride = w as usize * 3;
    ensure!(
        raw.len() == (stride + 1) * h as usize,
        "PNG IDAT holds {} bytes, expected {}",
        raw.len(),
        (stride + 1) * h as usize
    );
    let mut out = vec![0u8; stride * h as usize];
    for y in 0..h as usize {
        let filter = raw[y * (stride + 1)];
        for i in 0..stride {
            let x = raw[y * (stride + 1) + 1 + i];
            let a = if i >= 3 { out[y * stride + i - 3] } else { 0 };
            let b = if y > 0 { out[(y - 1) * stride + i] } else { 0 };
            let c = if y > 0 && i >= 3 {
                out[(y - 1) * stride + i - 3]
            } else {
                0
            };
            let predictor = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => ((a as u16 + b as u16) / 2) as u8,
                4 => {
                    let p = a as i16 + b as i16 - c as i16;
                    let (pa, pb, pc) = (
                        (p - a as i16).abs(),
                        (p - b as i16).abs(),
                        (p - c as i16).abs(),
                    );
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                f => bail!("PNG row {y} has unknown filter {f}"),
            };
            out[y * stride + i] = x.wrapping_add(predictor);
        }
    }
    Ok(Rgb {
        width: w,
        height: h,
        pixels: out.chunks(3).map(|p| [p[0], p[1], p[2]]).collect(),
    })
}

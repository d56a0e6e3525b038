//! A minimal SVG writer, palettes and axis helpers.
//!
//! Hand-written instead of using `plotters`: the figures need things plotters makes awkward
//! (values printed in heatmap cells with contrast-aware text colour, marker shapes per category,
//! legends placed outside the plot area, small-multiple heatmaps), and we need byte-identical
//! output with fixed float formatting and no font-metric dependency. SVG is plain XML, so a
//! few hundred lines give full control over layout and determinism. (Re-examined for issue 15;
//! the reasons are recorded in docs/DESIGN.md, "Decisions".)
//!
//! This is the only SVG toolkit of the workspace: the study's figures (`figures.rs`) and the
//! routing-health figures (`health_figures.rs`) share its palette, font stack and escaping.

use std::fmt::Write as _;

/// Okabe–Ito colour-blind-safe palette, ordered for contrast on white (yellow and black last).
pub const OKABE_ITO: [&str; 8] = [
    "#0072B2", // blue
    "#E69F00", // orange
    "#009E73", // bluish green
    "#D55E00", // vermillion
    "#CC79A7", // reddish purple
    "#56B4E9", // sky blue
    "#F0E442", // yellow
    "#000000", // black
];

/// Font stack used by every figure.
pub const FONT: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

/// Marker shapes, cycled together with the palette so categories differ in shape too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    TriangleUp,
    Diamond,
    TriangleDown,
    Cross,
}

/// Colour and shape of category number `i` (in display order).
pub fn category_style(i: usize) -> (&'static str, Shape) {
    const SHAPES: [Shape; 6] = [
        Shape::Circle,
        Shape::Square,
        Shape::TriangleUp,
        Shape::Diamond,
        Shape::TriangleDown,
        Shape::Cross,
    ];
    (OKABE_ITO[i % OKABE_ITO.len()], SHAPES[i % SHAPES.len()])
}

/// Viridis anchors (matplotlib's viridis sampled at 0, 0.1, …, 1): perceptually uniform and
/// readable with the common colour-vision deficiencies.
const VIRIDIS: [(u8, u8, u8); 11] = [
    (0x44, 0x01, 0x54),
    (0x48, 0x24, 0x75),
    (0x41, 0x44, 0x87),
    (0x35, 0x5f, 0x8d),
    (0x2a, 0x78, 0x8e),
    (0x21, 0x91, 0x8c),
    (0x22, 0xa8, 0x84),
    (0x44, 0xbf, 0x70),
    (0x7a, 0xd1, 0x51),
    (0xbd, 0xdf, 0x26),
    (0xfd, 0xe7, 0x25),
];

/// Viridis colour for `t` in [0, 1] (clamped; NaN maps to light grey).
pub fn viridis(t: f64) -> String {
    if !t.is_finite() {
        return "#dddddd".into();
    }
    let t = t.clamp(0.0, 1.0) * 10.0;
    let i = (t.floor() as usize).min(9);
    let f = t - i as f64;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    let mix = |x: u8, y: u8| (x as f64 + (y as f64 - x as f64) * f).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(a.0, b.0),
        mix(a.1, b.1),
        mix(a.2, b.2)
    )
}

/// Text colour readable on viridis(t).
pub fn text_on_viridis(t: f64) -> &'static str {
    if t.is_finite() && t > 0.55 {
        "#000000"
    } else {
        "#ffffff"
    }
}

/// Fixed-decimal formatting without "-0.00" and with "n/a" for non-finite values.
pub fn num(x: f64, decimals: usize) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    let s = format!("{x:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// `x` rounded to `digits` significant digits (at least 1): fixed notation for
/// 1e-3 ≤ |x| < 1e6 (`0.00123`, `12.3`, `123000`), scientific otherwise (`1.23e-5`); "0" for
/// zero, "n/a" for non-finite values, never "-0". Used for statistics shown to readers, whose
/// magnitude is not known in advance (a fixed number of decimals would print 0.000 or 17 digits).
pub fn sig(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return "n/a".into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let digits = digits.clamp(1, 17);
    // Rust's exponent formatting rounds to `digits` significant digits; its exponent is the
    // magnitude after rounding (0.99996 → 1.00e0).
    let e_form = format!("{:.*e}", digits - 1, x);
    let exp: i32 = e_form
        .rsplit('e')
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or(0);
    if !(-3..6).contains(&exp) {
        return e_form;
    }
    num(x, (digits as i32 - 1 - exp).max(0) as usize)
}

/// [`sig`] with 4 significant digits and without trailing zeros, for numbers a user typed
/// (`0.04`, not `0.04000`).
pub fn short(x: f64) -> String {
    let s = sig(x, 4);
    let (mantissa, exp) = match s.split_once('e') {
        Some((m, e)) => (m, format!("e{e}")),
        None => (s.as_str(), String::new()),
    };
    if mantissa.contains('.') {
        format!(
            "{}{exp}",
            mantissa.trim_end_matches('0').trim_end_matches('.')
        )
    } else {
        s
    }
}

/// Coordinates in SVG output: two decimals.
fn c(x: f64) -> String {
    num(x, 2)
}

/// XML/HTML text escaping.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}

/// Rough width of `s` in px at `size` (DejaVu Sans averages ~0.6 em per character); used only
/// to place legends and truncate labels, never for anything that has to be exact.
pub fn text_width(s: &str, size: f64) -> f64 {
    s.chars().count() as f64 * size * 0.6
}

/// Truncates a label to at most `max` characters (with an ellipsis).
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Text anchor.
#[derive(Debug, Clone, Copy)]
pub enum Anchor {
    Start,
    Middle,
    End,
}

impl Anchor {
    fn as_str(self) -> &'static str {
        match self {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        }
    }
}

/// An SVG document being built.
pub struct Svg {
    id: String,
    width: f64,
    height: f64,
    body: String,
}

impl Svg {
    /// New document of `width` × `height` px; `id` prefixes the element ids.
    pub fn new(id: &str, width: f64, height: f64) -> Svg {
        Svg {
            id: id.to_string(),
            width,
            height,
            body: String::new(),
        }
    }

    /// Raw markup.
    pub fn raw(&mut self, s: &str) {
        self.body.push_str(s);
        self.body.push('\n');
    }

    /// Filled rectangle.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, extra: &str) {
        self.rect_inner(x, y, w, h, fill, extra, None);
    }

    /// Filled rectangle with a tooltip (`<title>` child, escaped).
    #[allow(clippy::too_many_arguments)]
    pub fn rect_titled(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        extra: &str,
        tooltip: &str,
    ) {
        self.rect_inner(x, y, w, h, fill, extra, Some(tooltip));
    }

    #[allow(clippy::too_many_arguments)]
    fn rect_inner(
        &mut self,
        x: f64,
        y: f64,
        w: f64,
        h: f64,
        fill: &str,
        extra: &str,
        tooltip: Option<&str>,
    ) {
        let _ = write!(
            self.body,
            r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}"{}{}"#,
            c(x),
            c(y),
            c(w.max(0.0)),
            c(h.max(0.0)),
            fill,
            if extra.is_empty() { "" } else { " " },
            extra
        );
        let _ = match tooltip {
            Some(t) => writeln!(self.body, "><title>{}</title></rect>", esc(t)),
            None => writeln!(self.body, "/>"),
        };
    }

    /// Straight line.
    pub fn line(&mut self, x1: f64, y1: f64, x2: f64, y2: f64, stroke: &str, width: f64) {
        self.line_extra(x1, y1, x2, y2, stroke, width, "");
    }

    /// Straight line with extra attributes.
    #[allow(clippy::too_many_arguments)]
    pub fn line_extra(
        &mut self,
        x1: f64,
        y1: f64,
        x2: f64,
        y2: f64,
        stroke: &str,
        width: f64,
        extra: &str,
    ) {
        let _ = writeln!(
            self.body,
            r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="{}"{}{}/>"#,
            c(x1),
            c(y1),
            c(x2),
            c(y2),
            stroke,
            num(width, 1),
            if extra.is_empty() { "" } else { " " },
            extra
        );
    }

    /// Polyline through points.
    pub fn polyline(&mut self, pts: &[(f64, f64)], stroke: &str, width: f64, extra: &str) {
        let p: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{},{}", c(*x), c(*y)))
            .collect();
        let _ = writeln!(
            self.body,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="{}"{}{}/>"#,
            p.join(" "),
            stroke,
            num(width, 1),
            if extra.is_empty() { "" } else { " " },
            extra
        );
    }

    /// Text (escaped).
    pub fn text(&mut self, x: f64, y: f64, s: &str, size: f64, anchor: Anchor, extra: &str) {
        let _ = writeln!(
            self.body,
            r#"<text x="{}" y="{}" font-size="{}" text-anchor="{}"{}{}>{}</text>"#,
            c(x),
            c(y),
            num(size, 1),
            anchor.as_str(),
            if extra.is_empty() { "" } else { " " },
            extra,
            esc(s)
        );
    }

    /// Marker of `shape` centred at (x, y) with radius `r`.
    pub fn marker(&mut self, shape: Shape, x: f64, y: f64, r: f64, fill: &str, class: &str) {
        let stroke = r##"stroke="#ffffff" stroke-width="0.8""##;
        let cls = if class.is_empty() {
            String::new()
        } else {
            format!(r#" class="{class}""#)
        };
        let _ = match shape {
            Shape::Circle => writeln!(
                self.body,
                r#"<circle cx="{}" cy="{}" r="{}" fill="{}" {}{}/>"#,
                c(x),
                c(y),
                c(r),
                fill,
                stroke,
                cls
            ),
            Shape::Square => {
                let s = r * 0.9;
                writeln!(
                    self.body,
                    r#"<rect x="{}" y="{}" width="{}" height="{}" fill="{}" {}{}/>"#,
                    c(x - s),
                    c(y - s),
                    c(2.0 * s),
                    c(2.0 * s),
                    fill,
                    stroke,
                    cls
                )
            }
            Shape::TriangleUp | Shape::TriangleDown | Shape::Diamond | Shape::Cross => {
                let pts: Vec<(f64, f64)> = match shape {
                    Shape::TriangleUp => vec![
                        (x, y - 1.2 * r),
                        (x + 1.1 * r, y + 0.8 * r),
                        (x - 1.1 * r, y + 0.8 * r),
                    ],
                    Shape::TriangleDown => vec![
                        (x, y + 1.2 * r),
                        (x + 1.1 * r, y - 0.8 * r),
                        (x - 1.1 * r, y - 0.8 * r),
                    ],
                    Shape::Diamond => vec![
                        (x, y - 1.3 * r),
                        (x + 1.1 * r, y),
                        (x, y + 1.3 * r),
                        (x - 1.1 * r, y),
                    ],
                    _ => {
                        let a = 0.35 * r;
                        let b = 1.1 * r;
                        vec![
                            (x - a, y - b),
                            (x + a, y - b),
                            (x + a, y - a),
                            (x + b, y - a),
                            (x + b, y + a),
                            (x + a, y + a),
                            (x + a, y + b),
                            (x - a, y + b),
                            (x - a, y + a),
                            (x - b, y + a),
                            (x - b, y - a),
                            (x - a, y - a),
                        ]
                    }
                };
                let p: Vec<String> = pts
                    .iter()
                    .map(|(px, py)| format!("{},{}", c(*px), c(*py)))
                    .collect();
                writeln!(
                    self.body,
                    r#"<polygon points="{}" fill="{}" {}{}/>"#,
                    p.join(" "),
                    fill,
                    stroke,
                    cls
                )
            }
        };
    }

    /// Figure title centred at the top.
    pub fn title(&mut self, s: &str) {
        let w = self.width;
        self.text(
            w / 2.0,
            22.0,
            s,
            15.0,
            Anchor::Middle,
            r#"font-weight="bold""#,
        );
    }

    /// Finishes the document. `title` and `desc` become the accessible name and description.
    pub fn finish(self, title: &str, desc: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" id="{id}" class="figure-svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-labelledby="{id}-title {id}-desc" font-family="{FONT}">"#,
            id = esc(&self.id),
            w = c(self.width),
            h = c(self.height),
        );
        let _ = writeln!(
            out,
            r#"<title id="{}-title">{}</title>"#,
            esc(&self.id),
            esc(title)
        );
        let _ = writeln!(
            out,
            r#"<desc id="{}-desc">{}</desc>"#,
            esc(&self.id),
            esc(desc)
        );
        let _ = writeln!(
            out,
            r##"<rect x="0" y="0" width="{}" height="{}" fill="#ffffff"/>"##,
            c(self.width),
            c(self.height)
        );
        out.push_str(&self.body);
        out.push_str("</svg>\n");
        out
    }
}

/// "Nice" tick positions covering [lo, hi] (steps 1, 2, 2.5 or 5 × 10^k), with the number of
/// decimals needed to print them.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let (lo, hi) = if lo.is_finite() && hi.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let mut step = mag;
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        step = m * mag;
        if step >= raw {
            break;
        }
    }
    let start = (lo / step).floor();
    let end = (hi / step).ceil();
    let mut ticks = Vec::new();
    let mut k = start;
    while k <= end + 1e-9 && ticks.len() < 50 {
        ticks.push(k * step);
        k += 1.0;
    }
    let decimals = if step >= 1.0 {
        0
    } else {
        let d = (-step.log10()).ceil() as usize;
        // 0.25 needs 2 decimals, 0.025 needs 3
        if ((step * 10f64.powi(d as i32)).round() - step * 10f64.powi(d as i32)).abs() > 1e-9 {
            d + 1
        } else {
            d
        }
    };
    (ticks, decimals)
}

/// A rectangular plot area with linear x / y scales.
pub struct Axes {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
    pub xmin: f64,
    pub xmax: f64,
    pub ymin: f64,
    pub ymax: f64,
}

impl Axes {
    /// Pixel x of data x.
    pub fn x(&self, v: f64) -> f64 {
        let span = if self.xmax > self.xmin {
            self.xmax - self.xmin
        } else {
            1.0
        };
        self.left + (v - self.xmin) / span * self.width
    }

    /// Pixel y of data y.
    pub fn y(&self, v: f64) -> f64 {
        let span = if self.ymax > self.ymin {
            self.ymax - self.ymin
        } else {
            1.0
        };
        self.top + self.height - (v - self.ymin) / span * self.height
    }

    /// Bottom pixel row.
    pub fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// Right pixel column.
    pub fn right(&self) -> f64 {
        self.left + self.width
    }

    /// Frame, grid, ticks and axis labels. `xticks` / `yticks` are (value, label) pairs.
    pub fn draw(
        &self,
        svg: &mut Svg,
        xticks: &[(f64, String)],
        yticks: &[(f64, String)],
        xlabel: &str,
        ylabel: &str,
    ) {
        for (v, _) in yticks {
            let y = self.y(*v);
            svg.line(self.left, y, self.right(), y, "#e4e4e4", 1.0);
        }
        svg.rect(
            self.left,
            self.top,
            self.width,
            self.height,
            "none",
            r##"stroke="#555555" stroke-width="1""##,
        );
        for (v, label) in xticks {
            let x = self.x(*v);
            svg.line(x, self.bottom(), x, self.bottom() + 5.0, "#555555", 1.0);
            svg.text(
                x,
                self.bottom() + 18.0,
                label,
                12.0,
                Anchor::Middle,
                r##"fill="#222222""##,
            );
        }
        for (v, label) in yticks {
            let y = self.y(*v);
            svg.line(self.left - 5.0, y, self.left, y, "#555555", 1.0);
            svg.text(
                self.left - 8.0,
                y + 4.0,
                label,
                12.0,
                Anchor::End,
                r##"fill="#222222""##,
            );
        }
        svg.text(
            self.left + self.width / 2.0,
            self.bottom() + 38.0,
            xlabel,
            13.0,
            Anchor::Middle,
            r#"class="axis-label""#,
        );
        let yx = self.left - 52.0;
        let yy = self.top + self.height / 2.0;
        svg.text(
            yx,
            yy,
            ylabel,
            13.0,
            Anchor::Middle,
            &format!(
                r#"class="axis-label" transform="rotate(-90 {} {})""#,
                c(yx),
                c(yy)
            ),
        );
    }
}

/// Legend entry.
pub struct LegendItem {
    pub label: String,
    pub color: String,
    pub kind: LegendKind,
}

/// How a legend entry is drawn.
pub enum LegendKind {
    Marker(Shape),
    Line { dashed: bool, marker: bool },
}

/// Width in px of the legend that [`legend`] draws.
pub fn legend_width(title: &str, items: &[LegendItem]) -> f64 {
    items
        .iter()
        .map(|i| text_width(&i.label, 12.0))
        .fold(text_width(title, 12.0), f64::max)
        + 34.0
}

/// Vertical legend with its top-left at (x, y); returns its height.
pub fn legend(svg: &mut Svg, x: f64, y: f64, title: &str, items: &[LegendItem]) -> f64 {
    let row = 20.0;
    let w = legend_width(title, items);
    let h = items.len() as f64 * row + if title.is_empty() { 8.0 } else { 26.0 };
    svg.raw(r#"<g class="legend">"#);
    svg.rect(
        x,
        y,
        w,
        h,
        "#ffffff",
        r##"stroke="#bbbbbb" stroke-width="1" rx="3""##,
    );
    let mut yy = y + 6.0;
    if !title.is_empty() {
        svg.text(
            x + 8.0,
            yy + 12.0,
            title,
            12.0,
            Anchor::Start,
            r#"font-weight="bold""#,
        );
        yy += 18.0;
    }
    for it in items {
        let cy = yy + row / 2.0;
        match it.kind {
            LegendKind::Marker(shape) => svg.marker(shape, x + 16.0, cy, 5.0, &it.color, ""),
            LegendKind::Line { dashed, marker } => {
                svg.line_extra(
                    x + 6.0,
                    cy,
                    x + 26.0,
                    cy,
                    &it.color,
                    2.0,
                    if dashed {
                        r#"stroke-dasharray="5 3""#
                    } else {
                        ""
                    },
                );
                if marker {
                    svg.marker(Shape::Circle, x + 16.0, cy, 4.0, &it.color, "");
                }
            }
        }
        svg.text(x + 30.0, cy + 4.0, &it.label, 12.0, Anchor::Start, "");
        yy += row;
    }
    svg.raw("</g>");
    h
}

/// Vertical viridis colour bar from `lo` (bottom) to `hi` (top) with ticks on its right.
#[allow(clippy::too_many_arguments)]
pub fn colorbar(
    svg: &mut Svg,
    id: &str,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    lo: f64,
    hi: f64,
    label: &str,
) {
    let (ticks, dec) = nice_ticks(lo, hi, 4);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let ticks: Vec<(f64, String)> = ticks
        .iter()
        .filter(|t| **t >= lo - 1e-12 && **t <= hi + 1e-12)
        .map(|t| ((t - lo) / span, num(*t, dec)))
        .collect();
    gradient_bar(svg, id, (x, y, w, h), &|t| viridis(1.0 - t), &ticks, label);
}

/// The one colour-bar drawing: a vertical gradient (`color(t)` at offset t from the top), a
/// frame, ticks at fractions of the height from the bottom with their labels, and the label above.
fn gradient_bar(
    svg: &mut Svg,
    id: &str,
    (x, y, w, h): (f64, f64, f64, f64),
    color: &dyn Fn(f64) -> String,
    ticks: &[(f64, String)],
    label: &str,
) {
    let grad = esc(&format!("{id}-cbar"));
    let mut stops = String::new();
    for i in 0..=10 {
        let t = i as f64 / 10.0;
        let _ = write!(
            stops,
            r#"<stop offset="{}" stop-color="{}"/>"#,
            num(t, 1),
            color(t)
        );
    }
    svg.raw(&format!(
        r#"<defs><linearGradient id="{grad}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>"#
    ));
    svg.rect(
        x,
        y,
        w,
        h,
        &format!("url(#{grad})"),
        r##"stroke="#555555" stroke-width="0.8""##,
    );
    for (frac, text) in ticks {
        let ty = y + h - frac * h;
        svg.line(x + w, ty, x + w + 4.0, ty, "#555555", 1.0);
        svg.text(x + w + 7.0, ty + 4.0, text, 11.0, Anchor::Start, "");
    }
    svg.text(x + w / 2.0, y - 8.0, label, 11.0, Anchor::Middle, "");
}

/// Grey of cells that carry no comparison (e.g. the diagonal of a co-activation heatmap).
pub const DIAGONAL_GREY: &str = "#bbbbbb";

/// Centre of the diverging scale: light grey, so white (no data) stays distinguishable.
const DIVERGING_MID: (u8, u8, u8) = (0xf7, 0xf7, 0xf7);

fn hex_rgb(hex: &str) -> (u8, u8, u8) {
    let b = hex.as_bytes();
    let h = |i: usize| {
        std::str::from_utf8(&b[i..i + 2])
            .ok()
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .unwrap_or(0)
    };
    (h(1), h(3), h(5))
}

/// Diverging colour for `v` in [−1, 1] (clamped; NaN maps to the centre): Okabe–Ito orange
/// (−1) → light grey (0) → Okabe–Ito blue (+1). Used for log ratios, where 0 means "as
/// expected"; sequential quantities use [`viridis`].
pub fn diverging(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(-1.0, 1.0)
    } else {
        0.0
    };
    let (to, t) = if v < 0.0 {
        (hex_rgb(OKABE_ITO[1]), -v)
    } else {
        (hex_rgb(OKABE_ITO[0]), v)
    };
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    format!(
        "#{:02x}{:02x}{:02x}",
        mix(DIVERGING_MID.0, to.0),
        mix(DIVERGING_MID.1, to.1),
        mix(DIVERGING_MID.2, to.2)
    )
}

/// Vertical [`diverging`] colour bar from −1 (bottom) to +1 (top), drawn like [`colorbar`];
/// `ticks` are (position in [−1, 1], label) pairs.
#[allow(clippy::too_many_arguments)]
pub fn diverging_colorbar(
    svg: &mut Svg,
    id: &str,
    x: f64,
    y: f64,
    w: f64,
    h: f64,
    ticks: &[(f64, String)],
    label: &str,
) {
    let ticks: Vec<(f64, String)> = ticks
        .iter()
        .filter(|(v, _)| (-1.0..=1.0).contains(v))
        .map(|(v, text)| ((v + 1.0) / 2.0, text.clone()))
        .collect();
    gradient_bar(
        svg,
        id,
        (x, y, w, h),
        &|t| diverging(1.0 - 2.0 * t),
        &ticks,
        label,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn num_formats_fixed_and_handles_negative_zero() {
        assert_eq!(num(0.12345, 3), "0.123");
        assert_eq!(num(-0.0001, 2), "0.00");
        assert_eq!(num(-1.5, 1), "-1.5");
        assert_eq!(num(f64::NAN, 2), "n/a");
    }

    #[test]
    fn ticks_cover_range() {
        let (t, d) = nice_ticks(0.0, 0.93, 5);
        assert_eq!(t.first().copied(), Some(0.0));
        assert!(*t.last().unwrap() >= 0.93);
        assert_eq!(d, 1);
        let (t, d) = nice_ticks(-0.3, 2.7, 5);
        assert!(t[0] <= -0.3 && *t.last().unwrap() >= 2.7);
        assert_eq!((t, d), (vec![-1.0, 0.0, 1.0, 2.0, 3.0], 0));
        let (t, d) = nice_ticks(0.0, 1.1, 5);
        assert_eq!((t[1], d), (0.25, 2));
        let (t, d) = nice_ticks(0.0, 0.012, 4);
        assert_eq!((t[1], d), (0.005, 3));
    }

    #[test]
    fn viridis_endpoints() {
        assert_eq!(viridis(0.0), "#440154");
        assert_eq!(viridis(1.0), "#fde725");
        assert_eq!(viridis(2.0), "#fde725");
    }

    #[test]
    fn escaping() {
        assert_eq!(esc("<a & 'b'>"), "&lt;a &amp; &#39;b&#39;&gt;");
        assert_eq!(esc("a'b\"<c>&"), "a&#39;b&quot;&lt;c&gt;&amp;");
    }

    #[test]
    fn significant_digits() {
        assert_eq!(sig(0.123456789, 3), "0.123");
        assert_eq!(sig(12.3456, 3), "12.3");
        assert_eq!(sig(123456.0, 3), "123456");
        assert_eq!(sig(0.99996, 3), "1.00");
        assert_eq!(sig(-0.0012345, 2), "-0.0012");
        assert_eq!(sig(-0.00012345, 2), "-1.2e-4");
        assert_eq!(sig(1.2345e-7, 3), "1.23e-7");
        assert_eq!(sig(9.87654e9, 3), "9.88e9");
        assert_eq!(sig(0.0, 3), "0");
        assert_eq!(sig(-0.0, 3), "0");
        assert_eq!(sig(f64::NAN, 3), "n/a");
        assert_eq!(sig(0.5, 0), "0.5");
    }

    #[test]
    fn short_numbers_lose_trailing_zeros() {
        assert_eq!(short(0.04), "0.04");
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(1.0), "1");
        assert_eq!(short(0.123456), "0.1235");
        assert_eq!(short(1e-5), "1e-5");
        assert_eq!(short(1.25e-7), "1.25e-7");
        assert_eq!(short(120.0), "120");
    }

    #[test]
    fn diverging_scale_runs_orange_grey_blue() {
        assert_eq!(diverging(-1.0), "#e69f00");
        assert_eq!(diverging(0.0), "#f7f7f7");
        assert_eq!(diverging(1.0), "#0072b2");
        assert_eq!(diverging(5.0), diverging(1.0));
        assert_eq!(diverging(f64::NAN), diverging(0.0));
    }

    #[test]
    fn tooltip_rects_are_escaped() {
        let mut s = Svg::new("t", 10.0, 10.0);
        s.rect_titled(0.0, 0.0, 1.0, 1.0, "#000000", "", "a<b");
        s.rect(0.0, 0.0, 1.0, 1.0, "#000000", "");
        let out = s.finish("", "");
        assert!(out.contains(r##"fill="#000000"><title>a&lt;b</title></rect>"##));
        assert!(out.contains(r##"fill="#000000"/>"##));
    }
}

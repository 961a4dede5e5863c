//! d2l's `Animator`: training curves drawn with plotters, to SVG and PNG.
//!
//! evcxr cannot update an output in place (one rich output per MIME type, sent when the cell
//! ends), so a notebook shows the finished figure, while `train_ch13` prints a progress line at
//! each point it adds.
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{font, Png};
use crate::error::{Error, Result};

/// A line format in matplotlib's short notation: `-` solid, `--` dashed, `-.` dash-dot, `:`
/// dotted, with an optional colour letter first (`m--`). d2l's defaults are
/// `["-", "m--", "g-.", "r:"]`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct LineFmt {
    color: RGBColor,
    /// Dash length and gap in points; `None` is a solid line.
    dash: Option<(f64, f64)>,
}

/// matplotlib's first colour, which `-` without a colour letter gets.
const C0: RGBColor = RGBColor(0x1f, 0x77, 0xb4);

impl LineFmt {
    fn parse(fmt: &str) -> Result<LineFmt> {
        let (color, style) = match fmt.chars().next() {
            Some(c) if c.is_ascii_alphabetic() => (Some(c), &fmt[1..]),
            _ => (None, fmt),
        };
        let color = match color {
            None => C0,
            Some('b') => RGBColor(0, 0, 255),
            Some('g') => RGBColor(0, 128, 0),
            Some('r') => RGBColor(255, 0, 0),
            Some('c') => RGBColor(0, 191, 191),
            Some('m') => RGBColor(191, 0, 191),
            Some('y') => RGBColor(191, 191, 0),
            Some('k') => RGBColor(0, 0, 0),
            Some(c) => {
                return Err(Error::arg(
                    "Animator",
                    format!("line format {fmt:?} has an unknown colour {c:?}; use one of bgrcmyk"),
                ))
            }
        };
        let dash = match style {
            "" | "-" => None,
            "--" => Some((3.7, 1.6)),
            "-." => Some((2.2, 1.6)),
            ":" => Some((0.8, 1.3)),
            _ => {
                return Err(Error::arg(
                    "Animator",
                    format!("line format {fmt:?}: the style must be -, --, -. or :"),
                ))
            }
        };
        Ok(LineFmt { color, dash })
    }
}

/// Curves over a shared x axis, like d2l's `Animator(xlabel, ylabel, legend, xlim, ylim, fmts,
/// figsize=(3.5, 2.5))`: grid on, legend in a box, the chapter's look.
///
/// ```no_run
/// let mut animator = d2l::Animator::new()
///     .xlabel("epoch")
///     .xlim(1.0, 5.0)
///     .ylim(0.0, 1.0)
///     .legend(&["train loss", "train acc", "test acc"]);
/// animator.add(0.2, &[Some(0.9), Some(0.6), None]);
/// animator.add(1.0, &[Some(0.5), Some(0.8), Some(0.85)]);
/// animator.save("curves.svg")?;
/// # Ok::<(), d2l::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Animator {
    xlabel: Option<String>,
    ylabel: Option<String>,
    legend: Vec<String>,
    xlim: Option<(f64, f64)>,
    ylim: Option<(f64, f64)>,
    fmts: Vec<String>,
    figsize: (f64, f64),
    /// d2l's `xscale='log'`: x drawn on a log axis.
    xlog: bool,
    /// Where the legend goes (matplotlib's `loc`); lower right by default.
    legend_loc: SeriesLabelPosition,
    /// One list of (x, y) points per line.
    lines: Vec<Vec<(f64, f64)>>,
}

impl Default for Animator {
    fn default() -> Self {
        Animator::new()
    }
}

impl Animator {
    /// An empty figure of 3.5 x 2.5 inches with d2l's line formats.
    pub fn new() -> Animator {
        Animator {
            xlabel: None,
            ylabel: None,
            legend: Vec::new(),
            xlim: None,
            ylim: None,
            fmts: ["-", "m--", "g-.", "r:"].map(String::from).to_vec(),
            figsize: (3.5, 2.5),
            xlog: false,
            legend_loc: SeriesLabelPosition::LowerRight,
            lines: Vec::new(),
        }
    }

    pub fn xlabel(mut self, label: &str) -> Animator {
        self.xlabel = Some(label.to_owned());
        self
    }

    pub fn ylabel(mut self, label: &str) -> Animator {
        self.ylabel = Some(label.to_owned());
        self
    }

    pub fn legend(mut self, names: &[&str]) -> Animator {
        self.legend = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn xlim(mut self, lo: f64, hi: f64) -> Animator {
        self.xlim = Some((lo, hi));
        self
    }

    pub fn ylim(mut self, lo: f64, hi: f64) -> Animator {
        self.ylim = Some((lo, hi));
        self
    }

    /// d2l's `xscale`: `"linear"` (the default) or `"log"` (an LR range test's axis). Points
    /// with x <= 0 are not drawn on a log axis.
    pub fn xscale(mut self, scale: &str) -> Result<Animator> {
        self.xlog = match scale {
            "linear" => false,
            "log" => true,
            other => {
                return Err(Error::arg(
                    "Animator::xscale",
                    format!("{other:?}: use \"linear\" or \"log\""),
                ))
            }
        };
        Ok(self)
    }

    /// The legend's corner, as matplotlib's `loc`: `"lower right"` (the default), `"lower
    /// left"`, `"upper right"` or `"upper left"`.
    pub fn legend_loc(mut self, loc: &str) -> Result<Animator> {
        self.legend_loc = match loc {
            "lower right" => SeriesLabelPosition::LowerRight,
            "lower left" => SeriesLabelPosition::LowerLeft,
            "upper right" => SeriesLabelPosition::UpperRight,
            "upper left" => SeriesLabelPosition::UpperLeft,
            other => {
                return Err(Error::arg(
                    "Animator::legend_loc",
                    format!("{other:?}: use \"lower right\", \"lower left\", \"upper right\" or \"upper left\""),
                ))
            }
        };
        Ok(self)
    }

    /// Line formats in matplotlib's notation (`"-"`, `"m--"`, `"g-."`, `"r:"`).
    pub fn fmts(mut self, fmts: &[&str]) -> Animator {
        self.fmts = fmts.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Figure size in inches.
    pub fn figsize(mut self, width: f64, height: f64) -> Animator {
        self.figsize = (width, height);
        self
    }

    /// Adds one x with a y for each line (d2l's `add(x, y)`); `None` leaves a line without a
    /// point there (as the test accuracy, which comes once an epoch).
    pub fn add(&mut self, x: f64, ys: &[Option<f64>]) {
        if self.lines.len() < ys.len() {
            self.lines.resize(ys.len(), Vec::new());
        }
        for (line, y) in self.lines.iter_mut().zip(ys) {
            if let Some(y) = y {
                line.push((x, *y));
            }
        }
    }

    /// The points of each line.
    pub fn lines(&self) -> &[Vec<(f64, f64)>] {
        &self.lines
    }

    /// Pixel size at `dpi`.
    pub fn size_at(&self, dpi: f64) -> (u32, u32) {
        (
            (self.figsize.0 * dpi).round() as u32,
            (self.figsize.1 * dpi).round() as u32,
        )
    }

    /// The figure as an SVG document, 100 pixels an inch (350 x 250 for d2l's size).
    pub fn to_svg(&self) -> Result<String> {
        self.check()?;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, self.size_at(100.0)).into_drawing_area();
            self.draw(&root, 1.0)?;
            root.present().map_err(plot_error)?;
        }
        Ok(svg)
    }

    /// The figure as a PNG at 150 dpi (525 x 375 for d2l's size): sharp inline in a notebook.
    pub fn to_png(&self) -> Result<Png> {
        self.to_png_dpi(150.0)
    }

    /// The figure as a PNG at `dpi`.
    pub fn to_png_dpi(&self, dpi: f64) -> Result<Png> {
        self.check()?;
        if !(10.0..=1000.0).contains(&dpi) {
            return Err(Error::arg(
                "Animator",
                format!("dpi {dpi} is outside 10..=1000"),
            ));
        }
        let (w, h) = self.size_at(dpi);
        let mut rgb = vec![255u8; w as usize * h as usize * 3];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
            self.draw(&root, dpi / 100.0)?;
            root.present().map_err(plot_error)?;
        }
        Png::from_rgb(w, h, &rgb)
    }

    /// Saves the figure as SVG or PNG, by the file's extension; the file appears whole or not
    /// at all.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = match path.extension().and_then(|e| e.to_str()) {
            Some("svg") => self.to_svg()?.into_bytes(),
            Some("png") => self.to_png()?.bytes().to_vec(),
            _ => {
                return Err(Error::arg(
                    "Animator::save",
                    format!("{} must end in .svg or .png", path.display()),
                ))
            }
        };
        crate::files::write_atomically(path, &bytes)
    }

    /// In a notebook, shows the figure as the cell's output (SVG, as the book's, with a PNG beside
    /// it for front ends without SVG); elsewhere saves `name.svg` and `name.png` into
    /// [`figures_dir`](super::figures_dir) and prints where. Returns the saved PNG's path outside
    /// a notebook.
    pub fn show(&self, name: &str) -> Result<Option<PathBuf>> {
        if super::in_notebook() {
            self.display_inline()?;
            return Ok(None);
        }
        if !crate::dist::is_main_process() {
            return Ok(None); // rank 0 saves the group's figures
        }
        let dir = super::figures_dir();
        let (svg, png) = (
            dir.join(format!("{name}.svg")),
            dir.join(format!("{name}.png")),
        );
        self.save(&svg)?;
        self.save(&png)?;
        println!("saved figure {} (and .svg)", png.display());
        Ok(Some(png))
    }

    /// Shows the figure inline when it is the value of an evcxr cell.
    pub fn evcxr_display(&self) {
        if let Err(e) = self.display_inline() {
            println!("Animator: cannot draw the figure: {e}");
        }
    }

    /// The cell's output: SVG and PNG in one display (the front end picks the one it shows).
    fn display_inline(&self) -> Result<()> {
        let (svg, png) = (self.to_svg()?, self.to_png()?);
        super::evcxr_content("image/svg+xml", &svg);
        png.evcxr_display();
        Ok(())
    }

    fn check(&self) -> Result<()> {
        let lims = [self.xlim, self.ylim];
        if let Some((lo, hi)) = lims
            .into_iter()
            .flatten()
            .find(|(lo, hi)| lo.partial_cmp(hi) != Some(std::cmp::Ordering::Less))
        {
            return Err(Error::arg(
                "Animator",
                format!("an axis limit [{lo}, {hi}] is empty; give lo < hi"),
            ));
        }
        if let Some((lo, _)) = self.xlim.filter(|(lo, _)| self.xlog && *lo <= 0.0) {
            return Err(Error::arg(
                "Animator",
                format!("xlim starts at {lo} on a log axis; give a positive limit"),
            ));
        }
        if !(self.figsize.0 > 0.0 && self.figsize.1 > 0.0) {
            return Err(Error::arg(
                "Animator",
                format!("figsize {:?} must be positive", self.figsize),
            ));
        }
        Ok(())
    }

    /// The lines as drawn: x as log10(x) on a log axis (points at x <= 0 left out).
    fn drawn_lines(&self) -> Vec<Vec<(f64, f64)>> {
        if !self.xlog {
            return self.lines.clone();
        }
        self.lines
            .iter()
            .map(|l| {
                l.iter()
                    .filter(|(x, _)| *x > 0.0)
                    .map(|&(x, y)| (x.log10(), y))
                    .collect()
            })
            .collect()
    }

    fn range(
        lines: &[Vec<(f64, f64)>],
        lim: Option<(f64, f64)>,
        coord: impl Fn(&(f64, f64)) -> f64,
    ) -> (f64, f64) {
        if let Some(lim) = lim {
            return lim;
        }
        let values = lines.iter().flatten().map(coord).filter(|v| v.is_finite());
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if lo > hi {
            return (0.0, 1.0);
        }
        // matplotlib's 5% margins, and some room when all values are equal.
        let pad = if hi > lo { 0.05 * (hi - lo) } else { 0.5 };
        (lo - pad, hi + pad)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, k: f64) -> Result<()> {
        font::ensure()?;
        root.fill(&WHITE).map_err(plot_error)?;
        let lines = self.drawn_lines();
        let xlim = self.xlim.map(|(lo, hi)| {
            if self.xlog {
                (lo.log10(), hi.log10())
            } else {
                (lo, hi)
            }
        });
        let (x0, x1) = Self::range(&lines, xlim, |p| p.0);
        let (y0, y1) = Self::range(&lines, self.ylim, |p| p.1);
        let px = |pt: f64| (pt * k).round() as i32;
        let tick_font = (font::FAMILY, 10.0 * k).into_font();
        let label_font = (font::FAMILY, 11.0 * k).into_font();
        let mut chart = ChartBuilder::on(root)
            .margin_top(px(12.0))
            .margin_right(px(10.0))
            // Room for a y label's glyphs, which plotters draws from the very edge.
            .margin_left(px(if self.ylabel.is_some() { 6.0 } else { 0.0 }))
            .x_label_area_size(px(if self.xlabel.is_some() { 34.0 } else { 20.0 }))
            .y_label_area_size(px(if self.ylabel.is_some() { 44.0 } else { 32.0 }))
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_error)?;
        let (x_dec, y_dec) = (decimals(x0, x1, 5), decimals(y0, y1, 6));
        // d2l turns the grid on: light grey lines at the ticks.
        let grid = RGBColor(0xb0, 0xb0, 0xb0).stroke_width(px(0.8).max(1) as u32);
        let xlog = self.xlog;
        let (x_fmt, y_fmt) = (
            // On a log axis a tick at v reads 10^v, as matplotlib's 1e-05.
            move |v: &f64| {
                if xlog {
                    format!("{:.0e}", 10f64.powf(*v))
                } else {
                    format!("{v:.x_dec$}")
                }
            },
            move |v: &f64| format!("{v:.y_dec$}"),
        );
        let mut mesh = chart.configure_mesh();
        mesh.x_labels(5)
            .y_labels(6)
            .bold_line_style(grid)
            .light_line_style(TRANSPARENT)
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt)
            .label_style(tick_font.clone())
            .axis_desc_style(label_font.clone())
            .axis_style(BLACK.stroke_width(px(0.8).max(1) as u32))
            .set_all_tick_mark_size(px(3.5));
        if let Some(l) = &self.xlabel {
            mesh.x_desc(l.as_str());
        }
        if let Some(l) = &self.ylabel {
            mesh.y_desc(l.as_str());
        }
        mesh.draw().map_err(plot_error)?;

        let width = px(1.5).max(1) as u32;
        for (i, line) in lines.iter().enumerate() {
            let fmt = LineFmt::parse(self.fmts.get(i).map_or("-", String::as_str))?;
            let style = fmt.color.stroke_width(width);
            // matplotlib clips lines at the axes: points before epoch 1 do not show.
            let pieces = clip_polyline(line, (x0, x1), (y0, y1));
            let mut pieces: Vec<_> = pieces.into_iter().filter(|p| p.len() > 1).collect();
            if pieces.is_empty() {
                // Nothing inside: an empty series still gets its legend entry.
                pieces.push(Vec::new());
            }
            let mut anno = None;
            for points in pieces {
                anno = Some(match fmt.dash {
                    None => chart
                        .draw_series(LineSeries::new(points, style))
                        .map_err(plot_error)?,
                    Some((dash, gap)) => chart
                        .draw_series(DashedLineSeries::new(
                            points,
                            px(dash * 1.5) as u32,
                            px(gap * 1.5) as u32,
                            style,
                        ))
                        .map_err(plot_error)?,
                });
            }
            let Some(anno) = anno else { continue };
            if let Some(name) = self.legend.get(i) {
                let (len, dash) = (px(20.0), fmt.dash);
                anno.label(name.as_str()).legend(move |(x, y)| {
                    // A solid sample, or two dashes of the line's pattern.
                    let (a, b) = if dash.is_some() {
                        (len * 2 / 5, len * 3 / 5)
                    } else {
                        (len, 0)
                    };
                    EmptyElement::at((x, y))
                        + PathElement::new(vec![(0, 0), (a, 0)], style)
                        + PathElement::new(vec![(b, 0), (len, 0)], style)
                });
            }
        }
        // matplotlib's four spines.
        let spine = BLACK.stroke_width(px(0.8).max(1) as u32);
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x0, y0), (x0, y1), (x1, y1), (x1, y0), (x0, y0)],
                spine,
            )))
            .map_err(plot_error)?;
        if !self.legend.is_empty() && !lines.is_empty() {
            chart
                .configure_series_labels()
                .position(self.legend_loc.clone())
                .label_font((font::FAMILY, 9.0 * k).into_font())
                .background_style(WHITE.mix(0.8))
                .border_style(RGBColor(0xcc, 0xcc, 0xcc))
                .margin(px(4.0))
                .legend_area_size(px(22.0))
                .draw()
                .map_err(plot_error)?;
        }
        Ok(())
    }
}

/// Decimals that tell ticks `(hi - lo) / (n - 1)` apart: 0 for 1..5, 1 for 0..1 in 6 ticks.
fn decimals(lo: f64, hi: f64, n: usize) -> usize {
    let step = (hi - lo) / (n.max(2) - 1) as f64;
    if step.is_nan() || step <= 0.0 || !step.is_finite() {
        return 1;
    }
    (-step.log10().floor()).clamp(0.0, 6.0) as usize
}

/// The parts of a polyline inside the box `[x0, x1] x [y0, y1]` (Liang-Barsky on each segment).
fn clip_polyline(
    line: &[(f64, f64)],
    (x0, x1): (f64, f64),
    (y0, y1): (f64, f64),
) -> Vec<Vec<(f64, f64)>> {
    let mut pieces: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Vec<(f64, f64)> = Vec::new();
    let finite = line
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let points: Vec<(f64, f64)> = finite.collect();
    if points.len() == 1 {
        let (x, y) = points[0];
        if (x0..=x1).contains(&x) && (y0..=y1).contains(&y) {
            return vec![points];
        }
    }
    for seg in points.windows(2) {
        let ((ax, ay), (bx, by)) = (seg[0], seg[1]);
        let (dx, dy) = (bx - ax, by - ay);
        let (mut t0, mut t1) = (0.0f64, 1.0f64);
        let mut inside = true;
        for (p, q) in [(-dx, ax - x0), (dx, x1 - ax), (-dy, ay - y0), (dy, y1 - ay)] {
            if p == 0.0 {
                if q < 0.0 {
                    inside = false;
                }
            } else {
                let r = q / p;
                if p < 0.0 {
                    t0 = t0.max(r);
                } else {
                    t1 = t1.min(r);
                }
            }
        }
        if !inside || t0 > t1 {
            if !current.is_empty() {
                pieces.push(std::mem::take(&mut current));
            }
            continue;
        }
        let (p, q) = ((ax + t0 * dx, ay + t0 * dy), (ax + t1 * dx, ay + t1 * dy));
        if current.last() != Some(&p) {
            if !current.is_empty() {
                pieces.push(std::mem::take(&mut current));
            }
            current.push(p);
        }
        current.push(q);
        if t1 < 1.0 {
            pieces.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

fn plot_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> Error {
    Error::Plot(e.to_string())
}

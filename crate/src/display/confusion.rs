//! fastai's `plot_confusion_matrix`: the counts as a heat map (matplotlib's `Blues`), actual
//! classes down, predicted across, each cell with its count.
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::{font, Png};
use crate::error::{Error, Result};

/// matplotlib's `Blues` at `t` in [0, 1] (its nine anchor colours, linearly between them).
fn blues(t: f64) -> RGBColor {
    const ANCHORS: [(u8, u8, u8); 9] = [
        (247, 251, 255),
        (222, 235, 247),
        (198, 219, 239),
        (158, 202, 225),
        (107, 174, 214),
        (66, 146, 198),
        (33, 113, 181),
        (8, 81, 156),
        (8, 48, 107),
    ];
    let t = if t.is_finite() {
        t.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let x = t * (ANCHORS.len() - 1) as f64;
    let i = (x.floor() as usize).min(ANCHORS.len() - 2);
    let f = x - i as f64;
    let (a, b) = (ANCHORS[i], ANCHORS[i + 1]);
    let mix = |p: u8, q: u8| (p as f64 + (q as f64 - p as f64) * f).round() as u8;
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

fn text(size: f64, color: &'static RGBColor, pos: Pos) -> TextStyle<'static> {
    TextStyle::from((font::FAMILY, size).into_font())
        .color(color)
        .pos(pos)
}

/// The confusion matrix `matrix[actual][predicted]` as a figure: a square cell a pair, darker for
/// more, the count written in it (white on dark cells, as fastai's threshold at half the
/// maximum), class names along both axes, "Actual" and "Predicted" as axis labels.
pub fn confusion_matrix_figure(matrix: &[Vec<usize>], classes: &[String]) -> Result<Png> {
    let n = classes.len();
    if n == 0 || matrix.len() != n || matrix.iter().any(|row| row.len() != n) {
        return Err(Error::arg(
            "plot_confusion_matrix",
            format!(
                "a {} x {:?} matrix for {n} classes; give one row and one column a class",
                matrix.len(),
                matrix.iter().map(Vec::len).collect::<Vec<_>>()
            ),
        ));
    }
    font::ensure()?;
    let cell = (360 / n as u32).clamp(40, 120);
    let longest = classes.iter().map(|c| c.chars().count()).max().unwrap_or(1) as u32;
    let label_w = (longest * 8 + 40).min(260);
    let (left, top, bottom) = (label_w, 40u32, 56u32);
    let (w, h) = (left + n as u32 * cell + 20, top + n as u32 * cell + bottom);
    let mut rgb = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| Error::Plot(e.to_string());
        let max = matrix.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
        let centre = Pos::new(HPos::Center, VPos::Center);
        root.draw(&Text::new(
            "Confusion matrix",
            ((left + n as u32 * cell / 2) as i32, 18),
            text(15.0, &BLACK, centre),
        ))
        .map_err(err)?;
        for (a, row) in matrix.iter().enumerate() {
            for (p, &count) in row.iter().enumerate() {
                let (x, y) = (
                    (left + p as u32 * cell) as i32,
                    (top + a as u32 * cell) as i32,
                );
                let fill = blues(count as f64 / max);
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell as i32, y + cell as i32)],
                    fill.filled(),
                ))
                .map_err(err)?;
                let ink: &'static RGBColor = if count as f64 > max / 2.0 {
                    &WHITE
                } else {
                    &BLACK
                };
                root.draw(&Text::new(
                    count.to_string(),
                    (x + cell as i32 / 2, y + cell as i32 / 2),
                    text(13.0, ink, centre),
                ))
                .map_err(err)?;
            }
        }
        let frame = [
            (left as i32, top as i32),
            (
                (left + n as u32 * cell) as i32,
                (top + n as u32 * cell) as i32,
            ),
        ];
        root.draw(&Rectangle::new(frame, BLACK.stroke_width(1)))
            .map_err(err)?;
        for (i, name) in classes.iter().enumerate() {
            let mid = (i as u32 * cell + cell / 2) as i32;
            // Actual classes to the left of their rows, predicted ones below their columns.
            root.draw(&Text::new(
                name.as_str(),
                (left as i32 - 6, top as i32 + mid),
                text(12.0, &BLACK, Pos::new(HPos::Right, VPos::Center)),
            ))
            .map_err(err)?;
            root.draw(&Text::new(
                name.as_str(),
                (left as i32 + mid, (top + n as u32 * cell) as i32 + 6),
                text(12.0, &BLACK, Pos::new(HPos::Center, VPos::Top)),
            ))
            .map_err(err)?;
        }
        root.draw(&Text::new(
            "Predicted",
            ((left + n as u32 * cell / 2) as i32, (h - 14) as i32),
            text(13.0, &BLACK, centre),
        ))
        .map_err(err)?;
        root.draw(&Text::new(
            "Actual",
            (14, (top + n as u32 * cell / 2) as i32),
            text(13.0, &BLACK, centre).transform(FontTransform::Rotate270),
        ))
        .map_err(err)?;
        root.present().map_err(err)?;
    }
    Png::from_rgb(w, h, &rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blues_runs_from_white_to_navy() {
        assert_eq!(blues(0.0), RGBColor(247, 251, 255));
        assert_eq!(blues(1.0), RGBColor(8, 48, 107));
        assert_eq!(blues(0.5), RGBColor(107, 174, 214));
        assert_eq!(blues(f64::NAN), blues(0.0));
    }
}

//! PNG figures: training curves (`curves.png`) and the accuracy-vs-parameters scatter of
//! `tpeft compare`. Rendered with plotters; the font is embedded (no system fonts needed).

use crate::error::{Result, TrainError};
use crate::metrics::EpochRecord;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();

/// Registers the embedded font as plotters' `sans-serif`.
fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT);
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Data { path: path.into(), reason: format!("cannot draw the figure: {e}") }
}

/// Draws a white `size` PNG with `draw` and writes it to `path` atomically (a temporary file
/// beside it, then a rename).
fn write_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))
}

/// Draws train and valid curves of every metric in `history` (one panel per metric, x = epoch)
/// and writes them to `path` (atomically).
pub fn curves(history: &[EpochRecord], path: &Path) -> Result<()> {
    let mut names: Vec<String> = history.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    names.sort();
    names.dedup();
    names.retain(|n| n != "tokens_per_second" && n != "update_ratio");
    if names.is_empty() {
        return Ok(());
    }
    let panels = names.len();
    let cols = panels.min(3);
    let rows = panels.div_ceil(cols);
    write_png(path, (420 * cols as u32, 300 * rows as u32), |root| {
        let areas = root.split_evenly((rows, cols));
        for (name, area) in names.iter().zip(areas) {
            let series = |split: &str| -> Vec<(f64, f64)> {
                history
                    .iter()
                    .filter(|r| r.split == split)
                    .filter_map(|r| r.metrics.get(name).filter(|v| v.is_finite()).map(|v| (r.epoch as f64, *v)))
                    .collect()
            };
            let (train, valid) = (series("train"), series("valid"));
            let all: Vec<f64> = train.iter().chain(&valid).map(|p| p.1).collect();
            if all.is_empty() {
                continue;
            }
            let (lo, hi) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let pad = ((hi - lo) * 0.1).max(1e-6);
            let max_epoch = history.iter().map(|r| r.epoch).max().unwrap_or(1) as f64;
            let min_epoch = history.iter().map(|r| r.epoch).min().unwrap_or(1) as f64;
            let mut chart = ChartBuilder::on(&area)
                .caption(name, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(min_epoch - 0.5..max_epoch + 0.5, (lo - pad)..(hi + pad))
                .map_err(|e| plot_error(path, e))?;
            chart.configure_mesh().x_desc("epoch").draw().map_err(|e| plot_error(path, e))?;
            for (points, color, label) in [(train, BLUE, "train"), (valid, RED, "valid")] {
                if points.is_empty() {
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(|e| plot_error(path, e))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart
                    .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(|e| plot_error(path, e))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| plot_error(path, e))?;
        }
        Ok(())
    })
}

/// The points of `points` (`(label, x, y)`) on the Pareto front: no other point has fewer or equal
/// `x` and a better `y`. Sorted by `x`.
pub fn pareto_front(points: &[(String, f64, f64)], higher_is_better: bool) -> Vec<(String, f64, f64)> {
    let mut sorted: Vec<&(String, f64, f64)> = points.iter().filter(|p| p.1 > 0.0 && p.2.is_finite()).collect();
    sorted.sort_by(|a, b| {
        a.1.total_cmp(&b.1).then(if higher_is_better { b.2.total_cmp(&a.2) } else { a.2.total_cmp(&b.2) })
    });
    let mut front: Vec<(String, f64, f64)> = Vec::new();
    for p in sorted {
        let better = front.last().is_none_or(|f| if higher_is_better { p.2 > f.2 } else { p.2 < f.2 });
        if better {
            front.push(p.clone());
        }
    }
    front
}

/// Score against trainable parameters (log x), one colour per label (method), the Pareto front
/// drawn as a line: the figure of every PEFT paper. Written to `path` atomically.
pub fn scatter_vs_params(
    points: &[(String, f64, f64)],
    y_label: &str,
    higher_is_better: bool,
    path: &Path,
) -> Result<()> {
    let usable: Vec<&(String, f64, f64)> = points.iter().filter(|p| p.1 > 0.0 && p.2.is_finite()).collect();
    if usable.is_empty() {
        return Err(TrainError::Data { path: path.into(), reason: "no finished run to plot".into() });
    }
    let (x_lo, x_hi) = usable.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (y_lo, y_hi) = usable.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.2), b.max(p.2)));
    let pad = ((y_hi - y_lo) * 0.15).max(0.01);
    let mut labels: Vec<&String> = usable.iter().map(|p| &p.0).collect();
    labels.sort();
    labels.dedup();
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    write_png(path, (900, 600), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(format!("{y_label} vs trainable adapter parameters"), ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d((x_lo / 1.5..x_hi * 1.5).log_scale(), (y_lo - pad)..(y_hi + pad))
            .map_err(|e| plot_error(path, e))?;
        chart
            .configure_mesh()
            .x_desc("trainable adapter parameters (log scale)")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc(y_label)
            .draw()
            .map_err(|e| plot_error(path, e))?;
        let front = pareto_front(points, higher_is_better);
        chart
            .draw_series(LineSeries::new(front.iter().map(|p| (p.1, p.2)), BLACK.mix(0.5).stroke_width(2)))
            .map_err(|e| plot_error(path, e))?
            .label("Pareto front")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK.mix(0.5)));
        chart
            .draw_series(front.iter().map(|p| Circle::new((p.1, p.2), 9, BLACK.stroke_width(2))))
            .map_err(|e| plot_error(path, e))?;
        for (i, label) in labels.iter().enumerate() {
            let color = palette[i % palette.len()];
            let pts: Vec<(f64, f64)> = usable.iter().filter(|p| &&p.0 == label).map(|p| (p.1, p.2)).collect();
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 6, color.filled())))
                .map_err(|e| plot_error(path, e))?
                .label(label.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, color.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .draw()
            .map_err(|e| plot_error(path, e))?;
        Ok(())
    })
}

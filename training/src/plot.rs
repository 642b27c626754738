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

/// Draws train and valid curves of every metric in `history` (one panel per metric, x = epoch)
/// and writes them to `path` (atomically).
pub fn curves(history: &[EpochRecord], path: &Path) -> Result<()> {
    register_font();
    let mut names: Vec<String> = history.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Ok(());
    }
    let tmp = path.with_extension("tmp.png");
    let panels = names.len();
    let cols = panels.min(3);
    let rows = panels.div_ceil(cols);
    {
        let root = BitMapBackend::new(&tmp, (420 * cols as u32, 300 * rows as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
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
            let mut chart = ChartBuilder::on(&area)
                .caption(name, ("sans-serif", 18))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(50)
                .build_cartesian_2d(0.5..max_epoch + 0.5, (lo - pad)..(hi + pad))
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
        root.present().map_err(|e| plot_error(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))
}

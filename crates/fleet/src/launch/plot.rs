//! The picture of a training run (`runs/<job>/training.svg`): training and validation loss,
//! validation accuracy, and each rank's step time with the share spent in all-reduces.

use std::fmt::Display;
use std::path::Path;

use plotters::prelude::*;

use super::training::Training;

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const VALIDATION: RGBColor = RGBColor(214, 39, 40);
const COMMUNICATION: RGBColor = RGBColor(255, 127, 14);

fn failed(error: impl Display) -> String {
    error.to_string()
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type StepChart<'a, 'b> = ChartContext<
    'a,
    SVGBackend<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// A panel with the step on x (0 to `last_step`) and 0 to `top` on y, its grid drawn.
fn over_steps<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    last_step: f64,
    top: f64,
) -> Result<StepChart<'a, 'b>, String> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(0.0..last_step, 0.0..top)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(failed)?;
    Ok(chart)
}

/// Draws the three panels of `training` into an SVG at `path`.
pub fn draw(path: &Path, training: &Training) -> Result<(), String> {
    let root = SVGBackend::new(path, (1200, 400)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let panels = root.split_evenly((1, 3));
    let last_step = training
        .progress
        .iter()
        .map(|p| p.step)
        .chain(training.validations.iter().map(|v| v.step))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    draw_loss(&panels[0], training, last_step)?;
    draw_accuracy(&panels[1], training, last_step)?;
    draw_step_times(&panels[2], training)?;
    root.present().map_err(failed)?;
    Ok(())
}

/// Loss: training (rank 0's reports, over all ranks) and validation.
fn draw_loss(area: &Area, training: &Training, last_step: f64) -> Result<(), String> {
    let losses = training
        .progress
        .iter()
        .map(|p| p.loss)
        .chain(training.validations.iter().map(|v| v.val_loss))
        .filter(|l| l.is_finite());
    let top = losses.fold(0.0f64, f64::max).max(1e-3) * 1.05;
    let mut chart = over_steps(area, "loss", last_step, top)?;
    chart
        .draw_series(LineSeries::new(
            training.progress.iter().map(|p| (p.step as f64, p.loss)),
            TRAIN.stroke_width(2),
        ))
        .map_err(failed)?
        .label("training")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], TRAIN));
    let validation_loss: Vec<(f64, f64)> = training
        .validations
        .iter()
        .map(|v| (v.step as f64, v.val_loss))
        .collect();
    chart
        .draw_series(LineSeries::new(
            validation_loss.iter().copied(),
            VALIDATION.stroke_width(2),
        ))
        .map_err(failed)?
        .label("validation")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], VALIDATION));
    chart
        .draw_series(
            validation_loss
                .iter()
                .map(|&point| Circle::new(point, 4, VALIDATION.filled())),
        )
        .map_err(failed)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;
    Ok(())
}

/// Validation accuracy after each epoch.
fn draw_accuracy(area: &Area, training: &Training, last_step: f64) -> Result<(), String> {
    let mut chart = over_steps(area, "validation accuracy", last_step, 1.0)?;
    let accuracy: Vec<(f64, f64)> = training
        .validations
        .iter()
        .map(|v| (v.step as f64, v.val_accuracy))
        .collect();
    chart
        .draw_series(LineSeries::new(
            accuracy.iter().copied(),
            VALIDATION.stroke_width(2),
        ))
        .map_err(failed)?;
    chart
        .draw_series(
            accuracy
                .iter()
                .map(|&point| Circle::new(point, 4, VALIDATION.filled())),
        )
        .map_err(failed)?;
    Ok(())
}

/// Each rank's mean step time, the all-reduce share in orange.
fn draw_step_times(area: &Area, training: &Training) -> Result<(), String> {
    let ranks = training.summaries.len().max(1) as f64;
    let slowest = training
        .summaries
        .iter()
        .filter_map(|s| s.step_ms)
        .fold(0.0f64, f64::max)
        .max(1e-3)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("step time per rank (ms)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(48)
        .build_cartesian_2d(-0.5..ranks - 0.5, 0.0..slowest)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("rank (orange: all-reduce)")
        .x_labels(training.summaries.len().max(1))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .disable_x_mesh()
        .draw()
        .map_err(failed)?;
    for (i, summary) in training.summaries.iter().enumerate() {
        let x = i as f64;
        let step_ms = summary.step_ms.unwrap_or(0.0);
        let comm = step_ms * summary.comm_fraction.clamp(0.0, 1.0);
        chart
            .draw_series([
                Rectangle::new([(x - 0.35, 0.0), (x + 0.35, step_ms)], TRAIN.filled()),
                Rectangle::new([(x - 0.35, 0.0), (x + 0.35, comm)], COMMUNICATION.filled()),
            ])
            .map_err(failed)?;
    }
    Ok(())
}

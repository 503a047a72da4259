//! PNG plot of the latency distributions of both wait modes.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Places a TrueType font is looked for when `--font` is not given. Debian and Ubuntu ship
/// the first in the `fonts-dejavu-core` package.
const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// One curve: a label and its samples in milliseconds.
pub struct Series<'a> {
    pub label: &'a str,
    pub color: RGBColor,
    pub samples: Vec<f64>,
}

pub const EVENTS_COLOR: RGBColor = RGBColor(31, 119, 180);
pub const POLL_COLOR: RGBColor = RGBColor(214, 39, 40);

/// Registers the font the plot's text is drawn with. Returns the path used.
pub fn register_font(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => FONT_CANDIDATES.iter().map(PathBuf::from).find(|path| path.exists()).ok_or_else(|| {
            anyhow!("no TrueType font found in {FONT_CANDIDATES:?}; install fonts-dejavu-core or pass --font")
        })?,
    };
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read the font {}", path.display()))?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{} is not a usable TrueType font", path.display()))?;
    Ok(path)
}

/// Draws two panels of cumulative distributions: end-to-end latency in seconds, and
/// completion latency in milliseconds on a log scale.
pub fn draw(path: &Path, title: &str, end_to_end: &[Series<'_>], completion: &[Series<'_>]) -> Result<()> {
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let root = root.titled(title, ("sans-serif", 24)).map_err(plot_error)?;
    let (left, right) = root.split_horizontally(700);

    let seconds: Vec<Series<'_>> = end_to_end
        .iter()
        .map(|series| Series {
            label: series.label,
            color: series.color,
            samples: series.samples.iter().map(|ms| ms / 1000.0).collect(),
        })
        .collect();
    let e2e_max = max_of(&seconds).max(1.0) * 1.05;
    let mut chart = ChartBuilder::on(&left)
        .caption("End-to-end latency (tool call to result)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..e2e_max, 0f64..100f64)
        .map_err(plot_error)?;
    chart.configure_mesh().x_desc("seconds").y_desc("% of jobs at or below").draw().map_err(plot_error)?;
    draw_curves(&mut chart, &seconds)?;

    let smallest = min_of(completion);
    let low = if smallest.is_finite() { smallest.max(0.1) / 1.5 } else { 1.0 };
    let high = max_of(completion).max(low * 10.0) * 1.5;
    let mut chart = ChartBuilder::on(&right)
        .caption("Completion latency (terminal state to result)", ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((low..high).log_scale(), 0f64..100f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("% of jobs at or below")
        .draw()
        .map_err(plot_error)?;
    draw_curves(&mut chart, completion)?;

    root.present().map_err(plot_error)?;
    Ok(())
}

fn draw_curves<'a, X>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    series: &[Series<'_>],
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
{
    for curve in series {
        let mut sorted = curve.samples.clone();
        // Latencies are positive; anything else cannot sit on the log axis.
        sorted.retain(|value| value.is_finite() && *value > 0.0);
        sorted.sort_by(f64::total_cmp);
        // A step curve: at each sample the share of jobs at or below it rises by one job.
        let count = sorted.len() as f64;
        let points = sorted.iter().enumerate().flat_map(|(index, value)| {
            [(*value, index as f64 / count * 100.0), (*value, (index + 1) as f64 / count * 100.0)]
        });
        let color = curve.color;
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_error)?
            .label(format!("{} ({} jobs)", curve.label, curve.samples.len()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_error)?;
    Ok(())
}

fn max_of(series: &[Series<'_>]) -> f64 {
    series
        .iter()
        .flat_map(|curve| curve.samples.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
}

fn min_of(series: &[Series<'_>]) -> f64 {
    series
        .iter()
        .flat_map(|curve| curve.samples.iter().copied())
        .filter(|v| v.is_finite() && *v > 0.0)
        .fold(f64::INFINITY, f64::min)
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot failed: {error}")
}

//! SVG line charts of a run (plotters), so a person can see it rather than read it.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

/// One chart of a figure: named series of (x, y) points.
pub(crate) struct Panel {
    pub(crate) title: String,
    pub(crate) x_label: String,
    pub(crate) y_label: String,
    pub(crate) series: Vec<(String, Vec<(f64, f64)>)>,
    /// Plot x on a log10 axis (for sizes spanning decades).
    pub(crate) log_x: bool,
}

impl Panel {
    pub(crate) fn new(title: &str, x_label: &str, y_label: &str) -> Self {
        Self {
            title: title.to_owned(),
            x_label: x_label.to_owned(),
            y_label: y_label.to_owned(),
            series: Vec::new(),
            log_x: false,
        }
    }

    pub(crate) fn series(mut self, name: &str, points: Vec<(f64, f64)>) -> Self {
        self.series.push((name.to_owned(), points));
        self
    }

    pub(crate) fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }
}

/// Writes `panels`, stacked, to `path` as SVG.
pub(crate) fn write_svg(path: &Path, title: &str, panels: &[Panel]) -> anyhow::Result<()> {
    let rows = panels.len().max(1);
    let height = u32::try_from(rows).unwrap_or(1) * 340 + 50;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    for (panel, area) in panels.iter().zip(root.split_evenly((rows, 1))) {
        draw(&area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, panel: &Panel) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let x_of = |x: f64| if panel.log_x { x.max(1.0).log10() } else { x };
    let points = || panel.series.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
    for &(x, y) in points() {
        x0 = x0.min(x_of(x));
        x1 = x1.max(x_of(x));
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    let log_x = panel.log_x;
    let x_format = move |x: &f64| {
        if log_x {
            format!("{:.0}", 10f64.powf(*x))
        } else {
            format!("{x:.0}")
        }
    };
    let y_format = move |y: &f64| {
        if y1 >= 20.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.1}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(panel.x_label.as_str())
        .y_desc(panel.y_label.as_str())
        .x_label_formatter(&x_format)
        .y_label_formatter(&y_format)
        .draw()
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    for (i, (name, series)) in panel.series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                series.iter().map(|&(x, y)| (x_of(x), y)),
                color.stroke_width(2),
            ))
            .map_err(|e| anyhow::anyhow!("chart: {e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        // Few points (a size sweep): mark each, so a lone point shows.
        if series.len() <= 20 {
            chart
                .draw_series(
                    series
                        .iter()
                        .map(|&(x, y)| Circle::new((x_of(x), y), 4, color.filled())),
                )
                .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
    Ok(())
}

//! The reproduction report: a Markdown table, a JSON dump and an ROC plot.

use std::path::{Path, PathBuf};

use crate::{Context, Result};
use fr_eval::VerificationReport;
use plotters::prelude::*;
use serde::Serialize;

/// One line of the results table: a method evaluated on one protocol subset.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Method (head) name, or "raw pixels".
    pub method: String,
    /// Protocol or subset name ("all", "hq_hard", "low_quality", "lfw", ...).
    pub subset: String,
    /// Number of pairs.
    pub pairs: usize,
    /// 10-fold verification accuracy, mean (0..1).
    pub accuracy_mean: f64,
    /// Population std of the fold accuracies.
    pub accuracy_std: f64,
    /// Folds the accuracy was computed over (1 = train and test on all pairs).
    pub folds: usize,
    /// (FAR, TAR) points from the ROC by the nearest-point rule.
    pub tar_at_far: Vec<(f64, f64)>,
    /// Area under the ROC.
    pub auc: f64,
    /// Equal error rate.
    pub eer: f64,
    /// Wall-clock training time in seconds (None for raw pixels).
    pub train_seconds: Option<f64>,
    /// Training throughput in images per second (None for raw pixels).
    pub images_per_second: Option<f64>,
}

impl Row {
    /// The row of `method` on `subset` from its verification report; `train` is the
    /// (seconds, images/s) of its training run, `None` for untrained rows.
    pub fn from_report(
        method: &str,
        subset: &str,
        r: &VerificationReport,
        train: Option<(f64, f64)>,
    ) -> Self {
        Self {
            method: method.to_string(),
            subset: subset.to_string(),
            pairs: r.n_pairs,
            accuracy_mean: r.accuracy_mean,
            accuracy_std: r.accuracy_std,
            folds: r.accuracy_per_fold.len(),
            tar_at_far: r.tar_at_far.clone(),
            auc: r.auc,
            eer: r.eer,
            train_seconds: train.map(|t| t.0),
            images_per_second: train.map(|t| t.1),
        }
    }
}

/// An ROC curve to draw.
#[derive(Debug, Clone, Serialize)]
pub struct Curve {
    /// Legend entry.
    pub label: String,
    /// False accept rates, ascending.
    pub fpr: Vec<f64>,
    /// True accept rates.
    pub tpr: Vec<f64>,
}

/// Format the results table as Markdown.
pub fn markdown_table(rows: &[Row], fars: &[f64]) -> String {
    let mut s = String::from("| method | subset | pairs | accuracy (%) |");
    for far in fars {
        s.push_str(&format!(" TAR@FAR={far:.0e} (%) |"));
    }
    s.push_str(" AUC | EER (%) | train time (s) | images/s |\n|---|---|---|---|");
    for _ in fars {
        s.push_str("---|");
    }
    s.push_str("---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2} ± {:.2}{} |",
            r.method,
            r.subset,
            r.pairs,
            100.0 * r.accuracy_mean,
            100.0 * r.accuracy_std,
            if r.folds == 1 { " (1 fold)" } else { "" }
        ));
        for far in fars {
            let tar = r
                .tar_at_far
                .iter()
                .find(|(f, _)| (f - far).abs() <= 1e-12 * far.abs().max(1.0))
                .map(|(_, t)| format!("{:.2}", 100.0 * t))
                .unwrap_or_else(|| "–".into());
            s.push_str(&format!(" {tar} |"));
        }
        let opt = |v: Option<f64>, prec: usize| {
            v.map(|x| format!("{x:.prec$}"))
                .unwrap_or_else(|| "–".into())
        };
        s.push_str(&format!(
            " {:.4} | {:.2} | {} | {} |\n",
            r.auc,
            100.0 * r.eer,
            opt(r.train_seconds, 1),
            opt(r.images_per_second, 1)
        ));
    }
    s
}

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");

/// Registers the embedded plot font as `sans-serif` (ab_glyph needs it once per process; a
/// second registration is harmless).
pub(crate) fn register_font() {
    let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
}

/// Draw ROC curves (TAR against log-scale FAR from 1e-4) into a PNG.
///
/// # Errors
/// Drawing or writing the file fails.
pub fn plot_roc(path: &Path, title: &str, curves: &[Curve]) -> Result<()> {
    plot_roc_from(path, title, curves, 1e-4)
}

/// [`plot_roc`] with the FAR axis starting at `lo` (e.g. 1e-6 for IJB-C).
///
/// # Errors
/// Drawing or writing the file fails.
pub fn plot_roc_from(path: &Path, title: &str, curves: &[Curve], lo: f64) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (900, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| crate::err!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..1.0f64).log_scale(), 0.0f64..1.0)
        .map_err(|e| crate::err!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("FAR")
        .y_desc("TAR")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| crate::err!("{e}"))?;
    draw_curves(
        &mut chart,
        curves,
        lo,
        |t| t,
        SeriesLabelPosition::LowerRight,
    )?;
    root.present()
        .map_err(|e| crate::err!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Draw DET curves (FNMR = 1 − TAR against FMR = FAR, both log-scale, FMR from `lo`) into a
/// PNG. Points with FNMR below 1e-4 are drawn at 1e-4.
///
/// # Errors
/// Drawing or writing the file fails.
pub fn plot_det(path: &Path, title: &str, curves: &[Curve], lo: f64) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (900, 650)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| crate::err!("{e}"))?;
    let floor = 1e-4f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo..1.0f64).log_scale(), (floor..1.0f64).log_scale())
        .map_err(|e| crate::err!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("FMR (false match rate)")
        .y_desc("FNMR (false non-match rate)")
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| crate::err!("{e}"))?;
    draw_curves(
        &mut chart,
        curves,
        lo,
        |t| (1.0 - t).clamp(floor, 1.0),
        SeriesLabelPosition::LowerLeft,
    )?;
    root.present()
        .map_err(|e| crate::err!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Draw each curve's points with FAR ≥ `lo` as `(FAR, y(TAR))`, one palette colour each, and
/// the legend at `legend`: the part [`plot_roc_from`] and [`plot_det`] share.
fn draw_curves<'a, DB, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<LogCoord<f64>, Y>>,
    curves: &[Curve],
    lo: f64,
    y: impl Fn(f64) -> f64,
    legend: SeriesLabelPosition,
) -> Result<()>
where
    DB: DrawingBackend + 'a,
    Y: Ranged<ValueType = f64>,
{
    for (i, c) in curves.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = c
            .fpr
            .iter()
            .zip(&c.tpr)
            .filter(|(f, _)| **f >= lo)
            .map(|(f, t)| (*f, y(*t)))
            .collect();
        chart
            .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
            .map_err(|e| crate::err!("{e}"))?
            .label(c.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| crate::err!("{e}"))?;
    Ok(())
}

/// Write `value` as pretty JSON through a temp file and a rename.
///
/// # Errors
/// Serialisation or I/O failure, naming the file.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomic(path, text.as_bytes())
}

/// Write bytes to `path` via `path.tmp` + rename, so a reader never sees half a file.
///
/// # Errors
/// I/O failure naming the file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// What a workflow wrote: its results table and where its files are.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The results (markdown), as `report.md` shows them.
    pub table: String,
    /// The output folder.
    pub out_dir: PathBuf,
    /// The files in it, for the closing line ("report.md, metrics.json, roc.png").
    pub files: String,
    /// Wall-clock seconds of the whole workflow.
    pub seconds: f64,
}

impl std::fmt::Display for Written {
    /// The table, then `wrote <folder> (<files>) in <seconds> s`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "\n{}", self.table)?;
        write!(
            f,
            "wrote {} ({}) in {:.0} s",
            self.out_dir.display(),
            self.files,
            self.seconds
        )
    }
}

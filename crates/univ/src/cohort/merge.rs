//! `univ cohort OUT`: every case's `report.json` merged into one table, a summary and a plot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use univ_io::png::Canvas;

use crate::cohort::run::utc_text;
use crate::cohort::{
    COHORT_CSV, COHORT_PLOT, COHORT_SUMMARY, LOG_DIR, MANIFEST_COPY, Manifest, list_problems,
};
use crate::error::{Error, Result};
use crate::outputs::{OutputState, output_state};

/// The columns of `cohort.csv`, in order.
pub const CSV_COLUMNS: &[&str] = &[
    "case",
    "class_id",
    "class",
    "kind",
    "voxels",
    "volume_ml",
    "mean_hu",
    "median_hu",
    "lesion_count",
    "lesion_total_ml",
    "lesion_largest_ml",
    "dice",
    "checkpoint_sha256",
];

/// What the shard logs say of one case: its last `begin` and its last `case` line.
#[derive(Debug, Clone, Default)]
struct Logged {
    last_begin: Option<(f64, String)>,
    last_end: Option<Value>,
    last_end_time: f64,
}

/// Everything the logs of a cohort say, by case; and the span of the runs.
#[derive(Debug, Default)]
struct Logs {
    cases: BTreeMap<String, Logged>,
    first_start: Option<f64>,
    last_end: Option<f64>,
    bad_lines: usize,
}

fn read_logs(out: &Path) -> Logs {
    let mut logs = Logs::default();
    let Ok(dir) = std::fs::read_dir(out.join(LOG_DIR)) else {
        return logs;
    };
    let mut files: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            logs.bad_lines += 1;
            continue;
        };
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            // A line cut short by a killed process is counted, not fatal.
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                logs.bad_lines += 1;
                continue;
            };
            let t = v["unix_time"].as_f64().unwrap_or(0.0);
            let case = v["case"].as_str().unwrap_or_default().to_string();
            match v["event"].as_str() {
                Some("start") => {
                    logs.first_start = Some(logs.first_start.map_or(t, |s| s.min(t)));
                }
                Some("begin") => {
                    let e = logs.cases.entry(case).or_default();
                    if e.last_begin.as_ref().is_none_or(|(b, _)| *b <= t) {
                        e.last_begin = Some((t, v["host"].as_str().unwrap_or("").to_string()));
                    }
                }
                Some("case") => {
                    logs.last_end = Some(logs.last_end.map_or(t, |s| s.max(t)));
                    let e = logs.cases.entry(case).or_default();
                    if e.last_end.is_none() || e.last_end_time <= t {
                        e.last_end_time = t;
                        e.last_end = Some(v);
                    }
                }
                _ => {}
            }
        }
    }
    logs
}

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// A JSON number or string as CSV text; empty for null or absent.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        v => v.to_string(),
    }
}

/// What became of a case, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub enum MergedState {
    /// A complete result, merged.
    Done,
    /// The last run of it failed: the error.
    Failed(String),
    /// No result: never run, running, or interrupted (the last `begin` seen, if any).
    Missing(Option<String>),
}

/// What [`merge_cohort`] found and wrote.
#[derive(Debug, Clone)]
pub struct CohortTable {
    /// Every case with what became of it, in id order.
    pub cases: Vec<(String, MergedState)>,
    /// Rows written to `cohort.csv`.
    pub rows: usize,
    /// The summary written to `cohort-summary.json`.
    pub summary: Value,
    /// `true` when the list of cases came from a manifest (else only the results and logs
    /// found were listed, and missing cases cannot be known).
    pub from_manifest: bool,
}

impl CohortTable {
    /// The number of cases in `state`'s variant.
    pub fn count(&self, f: impl Fn(&MergedState) -> bool) -> usize {
        self.cases.iter().filter(|(_, s)| f(s)).count()
    }
}

/// The case ids of a cohort: `manifest` when given, else the copy a run keeps in `out`
/// ([`MANIFEST_COPY`]), else the case folders and logged cases found.
fn case_ids(out: &Path, manifest: Option<&Manifest>, logs: &Logs) -> Result<(Vec<String>, bool)> {
    if let Some(m) = manifest {
        return Ok((m.cases.iter().map(|c| c.id.clone()).collect(), true));
    }
    let copy = out.join(MANIFEST_COPY);
    if copy.is_file() {
        return Ok((
            Manifest::read(&copy)?
                .cases
                .into_iter()
                .map(|c| c.id)
                .collect(),
            true,
        ));
    }
    let mut ids: Vec<String> = std::fs::read_dir(out)
        .map_err(|e| Error::input(out, format!("cannot list: {e}")))?
        .flatten()
        .filter(|e| output_state(&e.path()) == OutputState::UnivResult)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .chain(logs.cases.keys().cloned())
        .collect();
    ids.sort();
    ids.dedup();
    Ok((ids, false))
}

/// The rows of one case's report.
fn case_rows(id: &str, rep: &Value) -> Vec<Vec<String>> {
    let sha = cell(&rep["checkpoint"]["sha256"]);
    let dice: BTreeMap<u64, String> = rep["evaluation"]["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| Some((l["label"].as_u64()?, cell(&l["dice"]))))
                .collect()
        })
        .unwrap_or_default();
    let evaluated = rep["evaluation"].is_object();
    let mut rows = Vec::new();
    for c in rep["classes"].as_array().into_iter().flatten() {
        let class_id = c["id"].as_u64().unwrap_or(0);
        let name = cell(&c["name"]);
        let slug = c["slug"]
            .as_str()
            .map_or_else(|| univ_model::classes::slug(&name), str::to_string);
        let lesions = &rep["lesions"][&slug];
        let (count, total, largest) = match lesions["lesions"].as_array() {
            Some(list) => {
                let vols: Vec<f64> = list
                    .iter()
                    .filter_map(|l| l["volume_ml"].as_f64())
                    .collect();
                (
                    list.len().to_string(),
                    vols.iter().sum::<f64>().to_string(),
                    vols.iter()
                        .copied()
                        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
                        .map_or_else(|| "0".to_string(), |v| v.to_string()),
                )
            }
            None => Default::default(),
        };
        // Empty without a reference, and for a class in neither map (Dice undefined).
        let d = dice
            .get(&class_id)
            .filter(|_| evaluated)
            .cloned()
            .unwrap_or_default();
        rows.push(vec![
            id.to_string(),
            class_id.to_string(),
            name,
            cell(&c["kind"]),
            cell(&c["voxels"]),
            cell(&c["volume_ml"]),
            cell(&c["mean_hu"]),
            cell(&c["median_hu"]),
            count,
            total,
            largest,
            d,
            sha.clone(),
        ]);
    }
    rows
}

/// The median of `v` (sorted in place); `None` when empty.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Merges a cohort's results in `out` into `out/cohort.csv` (one row per case and class:
/// voxels, volume in mL, mean and median HU; lesion count, total and largest lesion volume for
/// lesion classes; Dice when the case had a reference; the checkpoint's SHA-256),
/// `out/cohort-summary.json` (cases done, failed with their errors, missing; compute and wall
/// time; per-class volume statistics; checkpoints used) and `out/cohort-volumes.png` (every
/// class's volumes across cases, one row per class). Every file is written atomically.
///
/// The cases are those of `manifest`, else of the copy a run keeps in `out`; a case without a
/// complete result is listed as failed (with the error of its last run) or missing, never
/// dropped.
///
/// # Errors
/// `out` cannot be read, a manifest cannot be read, or an output cannot be written.
pub fn merge_cohort(out: &Path, manifest: Option<&Manifest>) -> Result<CohortTable> {
    if !out.is_dir() {
        return Err(Error::input(out, "is not a folder of cohort results"));
    }
    let logs = read_logs(out);
    let (ids, from_manifest) = case_ids(out, manifest, &logs)?;
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut cases = Vec::new();
    let mut volumes: BTreeMap<(u64, String), Vec<f64>> = BTreeMap::new();
    let mut checkpoints: BTreeMap<String, usize> = BTreeMap::new();
    let mut compute = 0.0;
    for id in &ids {
        let dir = out.join(id);
        let logged = logs.cases.get(id);
        let state = if output_state(&dir) == OutputState::UnivResult {
            let rep = std::fs::read_to_string(dir.join("report.json"))
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()));
            match rep {
                Ok(rep) => {
                    for c in rep["classes"].as_array().into_iter().flatten() {
                        if let (Some(cid), Some(v)) = (c["id"].as_u64(), c["volume_ml"].as_f64()) {
                            volumes.entry((cid, cell(&c["name"]))).or_default().push(v);
                        }
                    }
                    *checkpoints
                        .entry(cell(&rep["checkpoint"]["sha256"]))
                        .or_default() += 1;
                    compute += rep["timings_s"]
                        .as_object()
                        .map_or(0.0, |m| m.values().filter_map(Value::as_f64).sum());
                    rows.extend(case_rows(id, &rep));
                    MergedState::Done
                }
                Err(e) => MergedState::Failed(format!("its report.json cannot be read: {e}")),
            }
        } else {
            match logged.and_then(|l| l.last_end.as_ref()) {
                Some(v) if v["status"] == "failed" => MergedState::Failed(cell(&v["message"])),
                _ => MergedState::Missing(logged.and_then(|l| {
                    l.last_begin
                        .as_ref()
                        .filter(|(b, _)| *b >= l.last_end_time)
                        .map(|(b, h)| format!("began on {h} at {} and did not end", utc_text(*b)))
                })),
            }
        };
        cases.push((id.clone(), state));
    }
    // cohort.csv
    let mut csv = CSV_COLUMNS.join(",");
    csv.push('\n');
    for r in &rows {
        csv.push_str(&r.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        csv.push('\n');
    }
    univ_io::atomic::write_atomic(&out.join(COHORT_CSV), csv.as_bytes())?;
    // cohort-summary.json
    let done = cases
        .iter()
        .filter(|(_, s)| *s == MergedState::Done)
        .count();
    let failed: Vec<Value> = cases
        .iter()
        .filter_map(|(id, s)| match s {
            MergedState::Failed(e) => Some(json!({"id": id, "error": e})),
            _ => None,
        })
        .collect();
    let missing: Vec<Value> = cases
        .iter()
        .filter_map(|(id, s)| match s {
            MergedState::Missing(n) => Some(json!({"id": id, "note": n})),
            _ => None,
        })
        .collect();
    let span = match (logs.first_start, logs.last_end) {
        (Some(a), Some(b)) if b > a => Some(b - a),
        _ => None,
    };
    let per_class: serde_json::Map<String, Value> = volumes
        .iter()
        .map(|((cid, name), v)| {
            let mut v = v.clone();
            let present = v.iter().filter(|x| **x > 0.0).count();
            let med = median(&mut v);
            (
                name.clone(),
                json!({
                    "id": cid,
                    "cases": v.len(),
                    "cases_present": present,
                    "median_ml": med,
                    "min_ml": v.first(),
                    "max_ml": v.last(),
                }),
            )
        })
        .collect();
    let summary = json!({
        "cases": cases.len(),
        "done": done,
        "failed": failed.len(),
        "missing": missing.len(),
        "case_list": if from_manifest { "manifest" } else { "results and logs found (no manifest: missing cases cannot be known)" },
        "failed_cases": failed,
        "missing_cases": missing,
        "compute_seconds": compute,
        "span_seconds": span,
        "cases_per_hour": span.map(|w| done as f64 * 3600.0 / w),
        "first_start": logs.first_start.map(utc_text),
        "last_case_end": logs.last_end.map(utc_text),
        "checkpoints": checkpoints,
        "unreadable_log_lines": logs.bad_lines,
        "classes": per_class,
        "rows": rows.len(),
        "files": {"table": COHORT_CSV, "plot": COHORT_PLOT},
    });
    let text = serde_json::to_string_pretty(&summary).map_err(|e| Error::output(out, e))?;
    univ_io::atomic::write_atomic(&out.join(COHORT_SUMMARY), text.as_bytes())?;
    let plot = out.join(COHORT_PLOT);
    let png = volume_plot(&volumes, done, failed.len() + missing.len());
    univ_io::atomic::write_atomic(
        &plot,
        &png.encode_png().map_err(|e| Error::output(&plot, e))?,
    )?;
    Ok(CohortTable {
        cases,
        rows: rows.len(),
        summary,
        from_manifest,
    })
}

/// Shortest readable text of a volume in mL.
fn ml_text(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One row per class: a dot per case on the class's own scale (0 to its largest volume, shown
/// at the right), the median as a bar.
fn volume_plot(
    volumes: &BTreeMap<(u64, String), Vec<f64>>,
    done: usize,
    not_done: usize,
) -> Canvas {
    let (left, plot_w, right, row_h, top) = (200usize, 560usize, 90usize, 16usize, 30usize);
    let w = left + plot_w + right;
    let h = top + row_h * volumes.len().max(1) + 24;
    let mut cv = Canvas::new(w, h);
    let title = format!("VOLUME (ML) PER CLASS: {done} CASES DONE, {not_done} NOT");
    cv.text(10, 8, &title, [255, 255, 255], 1);
    for (i, ((_, name), v)) in volumes.iter().enumerate() {
        let y = top + i * row_h + row_h / 2;
        cv.text(10, y - 3, &name.to_ascii_uppercase(), [210, 210, 210], 1);
        cv.line(
            (left as i64, y as i64),
            ((left + plot_w) as i64, y as i64),
            [70, 70, 70],
        );
        let max = v.iter().copied().fold(0.0f64, f64::max);
        let x_of = |x: f64| {
            let f = if max > 0.0 { x / max } else { 0.0 };
            left as i64 + (f * (plot_w - 1) as f64).round() as i64
        };
        for &x in v {
            let cx = x_of(x);
            for d in -1..=1 {
                cv.line(
                    (cx + d, y as i64 - 3),
                    (cx + d, y as i64 + 3),
                    [90, 200, 255],
                );
            }
        }
        let mut s = v.clone();
        if let Some(m) = median(&mut s) {
            let mx = x_of(m);
            cv.line((mx, y as i64 - 6), (mx, y as i64 + 6), [255, 200, 60]);
        }
        cv.text(left + plot_w + 8, y - 3, &ml_text(max), [210, 210, 210], 1);
    }
    cv.text(
        10,
        h - 14,
        "EACH ROW: 0 TO ITS MAXIMUM (RIGHT). BLUE: CASES. YELLOW: MEDIAN",
        [150, 150, 150],
        1,
    );
    cv
}

/// A one-paragraph text of a merge, for the command line.
pub fn describe(t: &CohortTable) -> String {
    let done = t.count(|s| *s == MergedState::Done);
    let failed: Vec<String> = t
        .cases
        .iter()
        .filter_map(|(id, s)| match s {
            MergedState::Failed(e) => Some(format!("{id} ({e})")),
            _ => None,
        })
        .collect();
    let missing: Vec<String> = t
        .cases
        .iter()
        .filter(|(_, s)| matches!(s, MergedState::Missing(_)))
        .map(|(id, _)| id.clone())
        .collect();
    let mut s = format!(
        "{} cases: {done} done, {} failed, {} missing; {} rows",
        t.cases.len(),
        failed.len(),
        missing.len(),
        t.rows
    );
    if !failed.is_empty() {
        s.push_str(&format!("\nfailed: {}", list_problems(&failed)));
    }
    if !missing.is_empty() {
        s.push_str(&format!("\nmissing: {}", list_problems(&missing)));
    }
    if !t.from_manifest {
        s.push_str("\nnote: no manifest found: cases that never ran cannot be listed");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("liver"), "liver");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\""), "\"say \"\"x\"\"\"");
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}

//! Running one shard of a cohort: the model is loaded once, each case is segmented into
//! `OUT/<id>/` exactly as `univ segment` does for one case, complete results are kept (resume),
//! one case's failure does not stop the others, and a JSON-lines log records every case as it
//! begins and ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::json;

use crate::cohort::{LOG_DIR, MANIFEST_COPY, Manifest, ManifestCase, Shard, ShardSource};
use crate::error::{Error, Result};
use crate::outputs::{OutputState, output_state};
use crate::pipeline::{CaseOptions, Event, LoadedModel, segment_case};

/// The exit code of a cohort run in which some cases failed (the others are done; the log
/// says which failed and why).
pub const EXIT_SOME_FAILED: u8 = 3;

/// The exit code of a cohort run that could not run any case: the manifest, the model, the
/// shard or the output folder could not be used. Nothing was written for any case.
pub const EXIT_NOTHING_RAN: u8 = 4;

/// Settings of [`run_cohort`].
#[derive(Debug, Clone)]
pub struct CohortOptions {
    /// How each case is segmented and written. `output.overwrite` replaces complete univ
    /// results (never anything else); without it they are kept. `output.dicom_seg` writes a
    /// DICOM Segmentation for the cases whose input is a DICOM series (only those). The
    /// reference and series of each case come from the manifest.
    pub case: CaseOptions,
    /// This process's shard.
    pub shard: Shard,
    /// Where the shard came from (recorded in the log).
    pub shard_source: ShardSource,
}

/// What became of one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaseStatus {
    /// Segmented and written by this run.
    Done,
    /// Its complete result was already there.
    Skipped,
    /// It could not be done; the record says why.
    Failed,
}

impl CaseStatus {
    /// `done`, `skipped` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Done => "done",
            CaseStatus::Skipped => "skipped",
            CaseStatus::Failed => "failed",
        }
    }
}

/// One case's line in the log.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseRecord {
    /// The case id.
    pub id: String,
    /// What became of it.
    pub status: CaseStatus,
    /// Seconds per stage (see [`CaseSummary::timings`](crate::CaseSummary::timings)).
    pub seconds: Vec<(String, f64)>,
    /// Seconds from the case's start to its end.
    pub total_seconds: f64,
    /// The process's peak resident memory during the case, in MB (where the system lets the
    /// peak be reset before each case; the process's peak so far elsewhere).
    pub peak_memory_mb: Option<f64>,
    /// Windows run.
    pub windows: usize,
    /// Why it failed, or why it was skipped.
    pub message: Option<String>,
}

/// What [`run_cohort`] reports while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum CohortEvent {
    /// A case begins: its position in this shard (0-based) of how many.
    Begin {
        /// The case id.
        id: String,
        /// Its position in the shard.
        position: usize,
        /// The cases of the shard.
        of: usize,
    },
    /// Progress or a warning within the current case.
    Case(Event),
    /// A case ended.
    End(CaseRecord),
}

/// What [`run_cohort`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortRun {
    /// The shard that ran.
    pub shard: Shard,
    /// Its cases, in the order they ran, with what became of each.
    pub records: Vec<CaseRecord>,
    /// The log it appended to.
    pub log: PathBuf,
    /// Seconds in all.
    pub seconds: f64,
}

impl CohortRun {
    /// The number of cases with this status.
    pub fn count(&self, status: CaseStatus) -> usize {
        self.records.iter().filter(|r| r.status == status).count()
    }

    /// 0 when no case failed, else [`EXIT_SOME_FAILED`].
    pub fn exit_code(&self) -> u8 {
        if self.count(CaseStatus::Failed) > 0 {
            EXIT_SOME_FAILED
        } else {
            0
        }
    }
}

/// Seconds since 1970 and the same instant as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn utc_now() -> (f64, String) {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    (t, utc_text(t))
}

/// `t` (seconds since 1970) as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_text(t: f64) -> String {
    let secs = t.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date, in 400-year eras of 146 097 days from 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The host name, for the log.
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// A JSON-lines log, appended one whole line per write.
struct Log {
    path: PathBuf,
    file: std::fs::File,
}

impl Log {
    fn open(path: PathBuf) -> Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::output(&path, format!("cannot open the log: {e}")))?;
        Ok(Log { path, file })
    }

    fn write(&mut self, mut v: serde_json::Value) -> Result<()> {
        let (t, text) = utc_now();
        v["time"] = json!(text);
        v["unix_time"] = json!(t);
        let mut line = v.to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::output(&self.path, format!("cannot write the log: {e}")))
    }
}

/// Makes the output folder of a cohort and checks that it can be used: it is a folder (or can
/// be made), its log folder can be written, and it keeps a copy of the manifest
/// ([`MANIFEST_COPY`], for [`merge_cohort`](super::merge_cohort) to know every case).
///
/// # Errors
/// [`Error::Output`] naming what is in the way.
pub fn prepare_output(manifest: &Manifest, out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::output(
            out,
            "is a file: a cohort's output must be a folder",
        ));
    }
    let logs = out.join(LOG_DIR);
    std::fs::create_dir_all(&logs)
        .map_err(|e| Error::output(&logs, format!("cannot create: {e}")))?;
    let copy = out.join(MANIFEST_COPY);
    let text = manifest.to_jsonl();
    if std::fs::read_to_string(&copy).ok().as_deref() != Some(text.as_str()) {
        univ_io::atomic::write_atomic(&copy, text.as_bytes())?;
    }
    Ok(())
}

/// The text of a panic's payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Segments one case of the cohort into `out`.
fn run_case(
    case: &ManifestCase,
    out: &Path,
    model: &LoadedModel,
    opts: &CohortOptions,
    events: &mut impl FnMut(CohortEvent),
) -> CaseRecord {
    let start = Instant::now();
    let record = |status, message: Option<String>| CaseRecord {
        id: case.id.clone(),
        status,
        seconds: Vec::new(),
        total_seconds: start.elapsed().as_secs_f64(),
        peak_memory_mb: None,
        windows: 0,
        message,
    };
    let overwrite = opts.case.output.overwrite;
    // What a killed run of this case left (its temporary folder), also beside a complete
    // result that an earlier run finished.
    univ_io::atomic::remove_stale_temps(out);
    match output_state(out) {
        OutputState::UnivResult if !overwrite => {
            return record(
                CaseStatus::Skipped,
                Some("a complete result is there (--overwrite replaces it)".into()),
            );
        }
        OutputState::File | OutputState::Other(_) => {
            let e = crate::outputs::check_output(out, overwrite, Some(&case.input));
            return record(
                CaseStatus::Failed,
                Some(
                    e.err()
                        .map_or_else(|| "cannot be written".into(), |e| e.to_string()),
                ),
            );
        }
        _ => {}
    }
    let mut copts = opts.case.clone();
    copts.dicom.series = case.series.clone().or(copts.dicom.series);
    copts.reference = case.reference.clone();
    copts.output.dicom_seg &= univ_io::is_dicom(&case.input) || case.input.is_dir();
    univ_model::runtime::reset_peak_resident();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        segment_case(&case.input, out, model, &copts, |e| {
            events(CohortEvent::Case(e))
        })
    }));
    let mb = |b: Option<u64>| b.map(|b| (b as f64 / 1e6).round());
    match result {
        Ok(Ok(s)) => CaseRecord {
            id: case.id.clone(),
            status: CaseStatus::Done,
            seconds: s.timings,
            total_seconds: start.elapsed().as_secs_f64(),
            peak_memory_mb: mb(s.peak_memory),
            windows: s.windows,
            message: (!s.notes.is_empty()).then(|| s.notes.join("; ")),
        },
        Ok(Err(e)) => {
            let text = e.full_message();
            CaseRecord {
                peak_memory_mb: mb(univ_model::runtime::peak_resident_bytes()),
                ..record(CaseStatus::Failed, Some(text))
            }
        }
        Err(p) => record(
            CaseStatus::Failed,
            Some(format!("internal error (a panic): {}", panic_text(&*p))),
        ),
    }
}

/// Runs this process's shard of `manifest` into `out` (see the module docs). The manifest's
/// files are checked first ([`Manifest::check_files`]), then the output folder
/// ([`prepare_output`]); each case of the shard then either keeps its complete result, or is
/// segmented into `out/<id>/` (written to a temporary folder and renamed, with the result
/// marker last, so a killed run leaves no partial result: its temporary folder is removed by
/// the next run, which redoes the case), or fails without stopping the others.
///
/// The log `out/cohort-logs/shard-K-of-N.jsonl` gains a `start` line, a `begin` and a `case`
/// line per case (status, seconds per stage, peak memory, error) and an `end` line.
///
/// # Errors
/// Only what stops the whole shard before any case: missing inputs, an unusable output folder
/// or log. Each case's own errors are in its [`CaseRecord`].
pub fn run_cohort(
    manifest: &Manifest,
    out: &Path,
    model: &LoadedModel,
    opts: &CohortOptions,
    mut events: impl FnMut(CohortEvent),
) -> Result<CohortRun> {
    let start = Instant::now();
    manifest.check_files()?;
    prepare_output(manifest, out)?;
    let cases = opts.shard.select(&manifest.cases);
    let log_path = out
        .join(LOG_DIR)
        .join(format!("{}.jsonl", opts.shard.file_stem()));
    let mut log = Log::open(log_path.clone())?;
    let env = |k: &str| std::env::var(k).ok();
    log.write(json!({
        "event": "start",
        "shard": opts.shard.to_string(),
        "shard_source": opts.shard_source.as_str(),
        "cases": cases.len(),
        "manifest": std::path::absolute(&manifest.path).unwrap_or_else(|_| manifest.path.clone()),
        "manifest_cases": manifest.cases.len(),
        "checkpoint_sha256": model.sha256,
        "overwrite": opts.case.output.overwrite,
        "host": host_name(),
        "pid": std::process::id(),
        "univ": env!("CARGO_PKG_VERSION"),
        "slurm_job": env("SLURM_ARRAY_JOB_ID").or_else(|| env("SLURM_JOB_ID")),
        "slurm_task": env("SLURM_ARRAY_TASK_ID"),
    }))?;
    let mut records = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        events(CohortEvent::Begin {
            id: case.id.clone(),
            position: i,
            of: cases.len(),
        });
        log.write(json!({"event": "begin", "case": case.id, "host": host_name(), "pid": std::process::id()}))?;
        let r = run_case(case, &out.join(&case.id), model, opts, &mut events);
        let seconds: serde_json::Map<String, serde_json::Value> = r
            .seconds
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .chain([("total".to_string(), json!(r.total_seconds))])
            .collect();
        log.write(json!({
            "event": "case",
            "case": r.id,
            "status": r.status.as_str(),
            "seconds": seconds,
            "peak_memory_mb": r.peak_memory_mb,
            "windows": r.windows,
            "message": r.message,
            "host": host_name(),
            "pid": std::process::id(),
        }))?;
        events(CohortEvent::End(r.clone()));
        records.push(r);
    }
    let run = CohortRun {
        shard: opts.shard,
        records,
        log: log_path,
        seconds: start.elapsed().as_secs_f64(),
    };
    log.write(json!({
        "event": "end",
        "done": run.count(CaseStatus::Done),
        "skipped": run.count(CaseStatus::Skipped),
        "failed": run.count(CaseStatus::Failed),
        "seconds": run.seconds,
    }))?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_text(0.0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400.0), "2000-02-29T00:00:00Z");
        assert_eq!(utc_text(1_796_153_247.9), "2026-12-01T19:27:27Z");
        assert_eq!(utc_text(4_107_542_399.0), "2100-02-28T23:59:59Z");
        assert_eq!(utc_text(-1.0), "1969-12-31T23:59:59Z");
    }
}

//! Cohorts: thousands of CTs named in a manifest, split between the tasks of a Slurm job array
//! or a Kubernetes Indexed Job, resumed after any interruption, and merged into one table.
//!
//! * [`Manifest`]: the cases (CSV with a header row, or JSON lines; see [`manifest`]);
//! * [`Shard`]: which cases this process does (see [`shard`] for the rule and the
//!   environment variables of Slurm and Kubernetes);
//! * [`run_cohort`]: segments the shard's cases into `OUT/<id>/`, keeping complete results,
//!   with a JSON-lines log per shard in `OUT/cohort-logs/`;
//! * [`merge_cohort`]: `OUT/cohort.csv`, `OUT/cohort-summary.json` and
//!   `OUT/cohort-volumes.png` from every case's `report.json`.
//!
//! See `docs/cohort.md` for the recipes (an sbatch script, a Job manifest) and measured
//! throughput.

pub mod manifest;
pub mod merge;
pub mod run;
pub mod shard;

pub(crate) use manifest::list_problems;
pub use manifest::{Manifest, ManifestCase, check_case_id};
pub use merge::{CohortTable, MergedState, merge_cohort};
pub use run::{
    CaseRecord, CaseStatus, CohortEvent, CohortOptions, CohortRun, EXIT_NOTHING_RAN,
    EXIT_SOME_FAILED, prepare_output, run_cohort,
};
pub use shard::{SHARDS_ENV, Shard, ShardSource};

/// The merged table, in the cohort's output folder.
pub const COHORT_CSV: &str = "cohort.csv";
/// The merged summary.
pub const COHORT_SUMMARY: &str = "cohort-summary.json";
/// The plot of per-class volumes.
pub const COHORT_PLOT: &str = "cohort-volumes.png";
/// The folder of the shard logs (`shard-K-of-N.jsonl`).
pub const LOG_DIR: &str = "cohort-logs";
/// The copy of the manifest a run keeps (JSON lines, absolute paths).
pub const MANIFEST_COPY: &str = "cohort-manifest.jsonl";

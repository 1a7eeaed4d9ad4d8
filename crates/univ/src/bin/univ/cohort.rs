//! `univ cohort OUT`: one table of a cohort's results, through [`univ::cohort::merge_cohort`].

use std::path::PathBuf;

use anyhow::Result;
use univ::cohort::{EXIT_SOME_FAILED, Manifest, MergedState, merge_cohort};

use crate::args::CodedError;

/// Arguments of `univ cohort`.
#[derive(clap::Args)]
pub struct Args {
    /// The output folder of `univ segment --manifest`.
    output: PathBuf,
    /// The manifest whose cases to list [default: the copy the runs keep in OUT].
    #[arg(long)]
    manifest: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    let manifest = a.manifest.as_deref().map(Manifest::read).transpose()?;
    let t = merge_cohort(&a.output, manifest.as_ref())?;
    println!("{}", univ::cohort::merge::describe(&t));
    println!(
        "wrote {}, {} and {}",
        a.output.join(univ::cohort::COHORT_CSV).display(),
        a.output.join(univ::cohort::COHORT_SUMMARY).display(),
        a.output.join(univ::cohort::COHORT_PLOT).display()
    );
    let not_done = t.count(|s| *s != MergedState::Done);
    if not_done > 0 {
        return Err(CodedError::new(
            EXIT_SOME_FAILED,
            anyhow::anyhow!("{not_done} of {} case(s) are not done", t.cases.len()),
        )
        .into());
    }
    Ok(())
}

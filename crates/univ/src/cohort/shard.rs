//! Splitting a cohort between the tasks of a job array: shard `K` of `N` (0-based `K`).
//!
//! The rule: the case ids are sorted (by their bytes) and the case at position `i` of that
//! order belongs to shard `i mod N`. So every case is in exactly one shard, the shards differ
//! in size by at most one case, and re-sorting the manifest changes nothing. Adding or removing
//! cases moves others between shards: change a manifest between runs of the array, never while
//! one runs (results already complete are kept either way, see [`super::run_cohort`]).
//!
//! Where the shard comes from, first match wins:
//! 1. `--shard K/N` ([`Shard::parse`]);
//! 2. a Slurm job array: `SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_MIN`, `SLURM_ARRAY_TASK_MAX`,
//!    `SLURM_ARRAY_TASK_COUNT` and `SLURM_ARRAY_TASK_STEP` (a range such as `--array=0-99` or
//!    `1-100:1`; a list such as `--array=1,5,7` is refused, as its tasks cannot be numbered
//!    0..N without gaps);
//! 3. a Kubernetes Indexed Job: `JOB_COMPLETION_INDEX`, with the number of completions from
//!    `--shards N` or the environment variable [`SHARDS_ENV`] (Kubernetes does not tell a pod
//!    how many completions its Job has);
//! 4. otherwise the whole manifest (shard 0 of 1).

use crate::cohort::ManifestCase;

/// The environment variable that gives the number of shards of a Kubernetes Indexed Job (set
/// it to the Job's `completions`), when `--shards` is not given.
pub const SHARDS_ENV: &str = "UNIV_SHARDS";

/// One shard of a cohort: `index` of `count`, 0-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: usize,
    /// The number of shards, at least 1.
    pub count: usize,
}

/// Where a [`Shard`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSource {
    /// `--shard K/N`.
    Flag,
    /// A Slurm job array.
    Slurm,
    /// A Kubernetes Indexed Job.
    Kubernetes,
    /// Neither: the whole manifest.
    Whole,
}

impl ShardSource {
    /// A short name, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardSource::Flag => "--shard",
            ShardSource::Slurm => "slurm",
            ShardSource::Kubernetes => "kubernetes",
            ShardSource::Whole => "whole",
        }
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole cohort.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Shard `index` of `count`.
    ///
    /// # Errors
    /// `count` is 0 or `index` is not below it.
    pub fn new(index: usize, count: usize) -> Result<Shard, String> {
        if count == 0 {
            return Err("the number of shards must be at least 1".into());
        }
        if index >= count {
            return Err(format!(
                "shard {index} of {count} does not exist (shards are numbered 0 to {})",
                count - 1
            ));
        }
        Ok(Shard { index, count })
    }

    /// Parses `K/N`.
    ///
    /// # Errors
    /// Text that is not two numbers with `K < N`.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("{s:?} is not a shard: expected K/N with 0 <= K < N, such as 0/4");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let k: usize = k.trim().parse().map_err(|_| bad())?;
        let n: usize = n.trim().parse().map_err(|_| bad())?;
        Shard::new(k, n)
    }

    /// The shard of this process (see the module docs for the order): `flag` is `--shard`,
    /// `shards` is `--shards`, `env` reads an environment variable.
    ///
    /// # Errors
    /// An environment that names a shard inconsistently, or a Kubernetes index without the
    /// number of shards.
    pub fn resolve(
        flag: Option<Shard>,
        shards: Option<usize>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Shard, ShardSource), String> {
        if let Some(s) = flag {
            if let Some(n) = shards
                && n != s.count
            {
                return Err(format!("--shard {s} and --shards {n} disagree"));
            }
            return Ok((s, ShardSource::Flag));
        }
        let num = |name: &str| -> Result<Option<usize>, String> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| format!("{name}={v:?} is not a whole number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let need = |name: &str| {
                num(name)?.ok_or_else(|| {
                    format!("SLURM_ARRAY_TASK_ID is set but {name} is not: pass --shard K/N")
                })
            };
            let (min, max, count) = (
                need("SLURM_ARRAY_TASK_MIN")?,
                need("SLURM_ARRAY_TASK_MAX")?,
                need("SLURM_ARRAY_TASK_COUNT")?,
            );
            let step = num("SLURM_ARRAY_TASK_STEP")?.unwrap_or(1).max(1);
            let regular = count > 0 && min <= id && max >= min && max - min == (count - 1) * step;
            if !regular || (id - min) % step != 0 {
                return Err(format!(
                    "the Slurm array (task {id}, {count} tasks from {min} to {max}, step {step}) is \
                     not a range such as --array=0-{}: submit one, or pass --shard K/N",
                    count.max(1) - 1
                ));
            }
            let s = Shard::new((id - min) / step, count)?;
            if let Some(n) = shards
                && n != s.count
            {
                return Err(format!(
                    "--shards {n} disagrees with the Slurm array's {} tasks",
                    s.count
                ));
            }
            return Ok((s, ShardSource::Slurm));
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = match shards {
                Some(n) => n,
                None => num(SHARDS_ENV)?.ok_or_else(|| {
                    format!(
                        "JOB_COMPLETION_INDEX={index} (a Kubernetes Indexed Job) needs the number \
                         of shards: pass --shards N or set {SHARDS_ENV} to the Job's completions"
                    )
                })?,
            };
            return Ok((Shard::new(index, count)?, ShardSource::Kubernetes));
        }
        if let Some(n) = shards
            && n != 1
        {
            return Err(format!(
                "--shards {n} without a shard index: pass --shard K/{n}, or run in a Slurm array \
                 or a Kubernetes Indexed Job"
            ));
        }
        Ok((Shard::WHOLE, ShardSource::Whole))
    }

    /// This shard's cases, in the order of their ids.
    pub fn select<'a>(&self, cases: &'a [ManifestCase]) -> Vec<&'a ManifestCase> {
        let mut sorted: Vec<&ManifestCase> = cases.iter().collect();
        sorted.sort_by(|a, b| a.id.as_bytes().cmp(b.id.as_bytes()));
        sorted
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.count == self.index)
            .map(|(_, c)| c)
            .collect()
    }

    /// A name for files of this shard: `shard-K-of-N`.
    pub fn file_stem(&self) -> String {
        format!("shard-{}-of-{}", self.index, self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::PathBuf;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn cases(ids: &[&str]) -> Vec<ManifestCase> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| ManifestCase {
                id: id.to_string(),
                input: PathBuf::from(format!("{id}.nii")),
                series: None,
                reference: None,
                line: i + 2,
            })
            .collect()
    }

    #[test]
    fn every_case_in_exactly_one_shard_whatever_the_order() {
        let ids: Vec<String> = (0..23)
            .map(|i| format!("case{:03}", (i * 7) % 23))
            .collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let a = cases(&refs);
        let mut b = a.clone();
        b.reverse();
        for n in [1, 2, 3, 5, 23, 40] {
            let mut seen: Vec<String> = Vec::new();
            for k in 0..n {
                let s = Shard::new(k, n).unwrap();
                let x: Vec<&str> = s.select(&a).iter().map(|c| c.id.as_str()).collect();
                let y: Vec<&str> = s.select(&b).iter().map(|c| c.id.as_str()).collect();
                assert_eq!(x, y, "shard {s} depends on the manifest's order");
                assert!(x.len() <= 23usize.div_ceil(n) && x.len() >= 23 / n);
                seen.extend(x.iter().map(|s| s.to_string()));
            }
            seen.sort();
            let mut all = ids.clone();
            all.sort();
            assert_eq!(seen, all, "{n} shards");
        }
        let s = Shard::new(1, 3).unwrap();
        let six = cases(&["c6", "c1", "c3", "c2", "c5", "c4"]);
        let ids: Vec<&str> = s.select(&six).iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["c2", "c5"]);
    }

    #[test]
    fn shards_from_flags_slurm_and_kubernetes() {
        let none = env(&[]);
        assert_eq!(Shard::parse("2/5"), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "1", "a/2", "0/0", "-1/2"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Shard::resolve(None, None, &none),
            Ok((Shard::WHOLE, ShardSource::Whole))
        );
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "7"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "10"),
            ("SLURM_ARRAY_TASK_STEP", "1"),
            ("JOB_COMPLETION_INDEX", "0"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &slurm),
            Ok((
                Shard {
                    index: 6,
                    count: 10
                },
                ShardSource::Slurm
            ))
        );
        // The flag wins.
        let flag = Some(Shard::new(0, 2).unwrap());
        assert_eq!(
            Shard::resolve(flag, None, &slurm).unwrap().1,
            ShardSource::Flag
        );
        assert!(Shard::resolve(flag, Some(3), &none).is_err());
        let stepped = env(&[
            ("SLURM_ARRAY_TASK_ID", "8"),
            ("SLURM_ARRAY_TASK_MIN", "0"),
            ("SLURM_ARRAY_TASK_MAX", "10"),
            ("SLURM_ARRAY_TASK_COUNT", "6"),
            ("SLURM_ARRAY_TASK_STEP", "2"),
        ]);
        assert_eq!(
            Shard::resolve(None, None, &stepped).unwrap().0,
            Shard { index: 4, count: 6 }
        );
        // --array=1,5,7: three tasks that are no range.
        let list = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "7"),
            ("SLURM_ARRAY_TASK_COUNT", "3"),
        ]);
        let e = Shard::resolve(None, None, &list).unwrap_err();
        assert!(e.contains("not a range"), "{e}");
        let partial = env(&[("SLURM_ARRAY_TASK_ID", "5")]);
        assert!(
            Shard::resolve(None, None, &partial)
                .unwrap_err()
                .contains("SLURM_ARRAY_TASK_MIN")
        );
        let k8s = env(&[("JOB_COMPLETION_INDEX", "3")]);
        assert!(
            Shard::resolve(None, None, &k8s)
                .unwrap_err()
                .contains("--shards N")
        );
        assert_eq!(
            Shard::resolve(None, Some(4), &k8s),
            Ok((Shard { index: 3, count: 4 }, ShardSource::Kubernetes))
        );
        let k8s_env = env(&[("JOB_COMPLETION_INDEX", "3"), (SHARDS_ENV, "8")]);
        assert_eq!(
            Shard::resolve(None, None, &k8s_env).unwrap().0,
            Shard { index: 3, count: 8 }
        );
        assert!(Shard::resolve(None, Some(3), env(&[("JOB_COMPLETION_INDEX", "3")])).is_err());
        assert!(Shard::resolve(None, Some(2), &none).is_err());
        assert!(Shard::resolve(None, None, env(&[("SLURM_ARRAY_TASK_ID", "x")])).is_err());
    }
}

//! `univ segment --manifest` and `univ cohort`: manifests, shards, resume, failures, exit
//! codes, logs and the merged table, with the demo model on small synthetic CTs. (The same
//! under a real Slurm is `tests/slurm/run.sh`, which `.ci/run` runs.)

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use super::{assert_clean_failure, demo_model, read_json, text, write_small_ct};

/// `univ segment --manifest` with the demo model, environment `env`, extra arguments.
fn run(manifest: &Path, out: &Path, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let demo = demo_model();
    let mut c = Command::new(env!("CARGO_BIN_EXE_univ"));
    c.args([
        "segment",
        "--manifest",
        manifest.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--checkpoint",
        demo.to_str().unwrap(),
        "--overlap",
        "0",
    ])
    .args(extra);
    for k in [
        "SLURM_ARRAY_TASK_ID",
        "SLURM_ARRAY_TASK_MIN",
        "SLURM_ARRAY_TASK_MAX",
        "SLURM_ARRAY_TASK_COUNT",
        "SLURM_ARRAY_TASK_STEP",
        "SLURM_CPUS_PER_TASK",
        "JOB_COMPLETION_INDEX",
        "UNIV_SHARDS",
    ] {
        c.env_remove(k);
    }
    c.envs(env.iter().copied());
    c.output().expect("run univ")
}

/// Every `case` line of every shard log: (case, status).
fn logged(out: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(out.join("cohort-logs"))
        .unwrap()
        .flatten()
    {
        for l in std::fs::read_to_string(e.path()).unwrap().lines() {
            let j: serde_json::Value = serde_json::from_str(l).unwrap();
            if j["event"] == "case" {
                v.push((
                    j["case"].as_str().unwrap().to_string(),
                    j["status"].as_str().unwrap().to_string(),
                ));
                assert!(j["seconds"]["total"].as_f64().unwrap() >= 0.0, "{j}");
            }
        }
    }
    v
}

/// How many times each case has each status in the logs.
fn tally(out: &Path) -> BTreeMap<(String, String), usize> {
    let mut m = BTreeMap::new();
    for k in logged(out) {
        *m.entry(k).or_default() += 1;
    }
    m
}

fn count(t: &BTreeMap<(String, String), usize>, case: &str, status: &str) -> usize {
    t.get(&(case.to_string(), status.to_string()))
        .copied()
        .unwrap_or(0)
}

#[test]
fn a_cohort_is_sharded_resumed_logged_and_merged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("cts")).unwrap();
    for (n, side) in [("a", 24), ("b", 20), ("d", 22)] {
        write_small_ct(&d.join(format!("cts/{n}.nii.gz")), side);
    }
    std::fs::write(d.join("cts/broken.nii.gz"), b"not a nifti").unwrap();
    // A reference for case a: "liver" (6) in a block on the same grid.
    let img = univ::io::read_image(d.join("cts/a.nii.gz")).unwrap();
    let mut lab = img.map(|_| 0u8);
    for z in 3..9 {
        for y in 4..20 {
            for x in 4..20 {
                let i = lab.index([x, y, z]);
                lab.data_mut()[i] = 6;
            }
        }
    }
    univ::io::write_nifti(
        d.join("cts/a_ref.nii.gz"),
        &lab,
        &univ::io::WriteOptions::default(),
    )
    .unwrap();
    let manifest = d.join("cases.csv");
    // Unsorted, relative and absolute paths, an extra column, a quoted field.
    std::fs::write(
        &manifest,
        format!(
            "id,age,input,reference\n\
             p3,61,cts/broken.nii.gz,\n\
             p1,54,cts/a.nii.gz,cts/a_ref.nii.gz\n\
             p4,\"70\",{},\n\
             p2,48,cts/b.nii.gz,\n",
            d.join("cts/d.nii.gz").display()
        ),
    )
    .unwrap();
    let out = d.join("out");

    // Problems found before any work: exit code 4, nothing written.
    let bad = d.join("bad.csv");
    std::fs::write(&bad, "id,input\np1,cts/a.nii.gz\np1,cts/b.nii.gz\nx/y,z\n").unwrap();
    let o = run(&bad, &out, &[], &["--quiet"]);
    assert_clean_failure(&o, "line 3: the id \"p1\" is also on line 2");
    assert!(text(&o).1.contains("line 4"), "{}", text(&o).1);
    assert_eq!(o.status.code(), Some(4));
    std::fs::write(&bad, "id,input\np1,cts/a.nii.gz\np2,cts/missing.nii.gz\n").unwrap();
    let o = run(&bad, &out, &[], &["--quiet"]);
    assert_clean_failure(&o, "missing.nii.gz does not exist");
    assert_eq!(o.status.code(), Some(4));
    let o = run(
        &manifest,
        &out,
        &[("JOB_COMPLETION_INDEX", "1")],
        &["--quiet"],
    );
    assert_clean_failure(&o, "UNIV_SHARDS");
    assert_eq!(o.status.code(), Some(4));
    assert!(
        !out.exists(),
        "nothing may be written before the checks pass"
    );

    // Two shards, one from --shard, one from a Slurm array's environment (task 8 of 7..8).
    // Sorted ids p1 p2 p3 p4: shard 0 = p1, p3; shard 1 = p2, p4.
    let o0 = run(&manifest, &out, &[], &["--shard", "0/2", "--quiet"]);
    assert_eq!(o0.status.code(), Some(3), "{}", text(&o0).1);
    assert!(
        text(&o0).1.contains("error: case p3 (2/2)"),
        "{}",
        text(&o0).1
    );
    assert!(text(&o0).1.contains("1 of 2 case(s) of shard 0/2 failed"));
    let slurm = [
        ("SLURM_ARRAY_TASK_ID", "8"),
        ("SLURM_ARRAY_TASK_MIN", "7"),
        ("SLURM_ARRAY_TASK_MAX", "8"),
        ("SLURM_ARRAY_TASK_COUNT", "2"),
        ("SLURM_ARRAY_TASK_STEP", "1"),
        ("SLURM_CPUS_PER_TASK", "1"),
    ];
    let o1 = run(&manifest, &out, &slurm, &[]);
    assert!(o1.status.success(), "{}", text(&o1).1);
    assert!(
        text(&o1).1.contains("shard 1/2 (slurm): 2 of 4 cases"),
        "{}",
        text(&o1).1
    );
    for id in ["p1", "p2", "p4"] {
        assert!(out.join(id).join(".univ-complete").is_file(), "{id}");
    }
    assert!(!out.join("p3").exists());
    let t = tally(&out);
    assert_eq!(
        t.values().sum::<usize>(),
        4,
        "every case once, in one shard: {t:?}"
    );
    assert_eq!(count(&t, "p3", "failed"), 1);
    assert!(out.join("cohort-logs/shard-0-of-2.jsonl").is_file());
    assert!(out.join("cohort-logs/shard-1-of-2.jsonl").is_file());
    // The reference was evaluated.
    let rep = read_json(out.join("p1/report.json"));
    let labels = rep["evaluation"]["labels"].as_array().unwrap();
    assert!(labels.iter().any(|l| l["label"] == 6), "{labels:?}");

    // The merged table: p3 failed, with its error; exit code 3.
    let o = super::univ(&["cohort", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o).1);
    assert!(
        text(&o).0.contains("4 cases: 3 done, 1 failed, 0 missing"),
        "{}",
        text(&o).0
    );
    let summary = read_json(out.join("cohort-summary.json"));
    assert_eq!(summary["failed_cases"][0]["id"], "p3");
    assert!(
        summary["failed_cases"][0]["error"]
            .as_str()
            .unwrap()
            .contains("broken.nii.gz")
    );
    let csv = std::fs::read_to_string(out.join("cohort.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header, univ::cohort::merge::CSV_COLUMNS);
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let per_case = read_json(out.join("p2/report.json"))["classes"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(rows.len(), 3 * per_case);
    let liver_p1 = rows
        .iter()
        .find(|r| r[0] == "p1" && r[1] == "6")
        .expect("a liver row for p1");
    let dice: f64 = liver_p1[11].parse().expect("a Dice for p1's liver");
    assert!((0.0..=1.0).contains(&dice));
    let vol: f64 = liver_p1[5].parse().unwrap();
    let rep_vol = rep["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == 6)
        .unwrap()["volume_ml"]
        .as_f64()
        .unwrap();
    assert!((vol - rep_vol).abs() < 1e-9);
    assert!(
        rows.iter()
            .filter(|r| r[0] == "p2")
            .all(|r| r[11].is_empty())
    );
    assert!(out.join("cohort-volumes.png").is_file());

    // Resume: the broken input is fixed; a killed run left p2's temporary folder and p4's
    // result is gone. Only p3 and p4 are redone; the temporary folder is removed.
    write_small_ct(&d.join("cts/broken.nii.gz"), 20);
    std::fs::remove_dir_all(out.join("p4")).unwrap();
    let stale = out.join(".p2-univ-tmp-999999999-0");
    std::fs::create_dir_all(stale.join("masks")).unwrap();
    let p1_before = std::fs::read(out.join("p1/segmentation.nii.gz")).unwrap();
    for k in 0..2 {
        let o = run(
            &manifest,
            &out,
            &[],
            &["--shard", &format!("{k}/2"), "--quiet"],
        );
        assert!(o.status.success(), "{}", text(&o).1);
    }
    let t = tally(&out);
    assert_eq!(count(&t, "p3", "done"), 1, "{t:?}");
    assert_eq!(count(&t, "p4", "done"), 2, "{t:?}");
    assert_eq!(count(&t, "p1", "done"), 1, "{t:?}");
    assert_eq!(count(&t, "p1", "skipped"), 1, "{t:?}");
    assert_eq!(count(&t, "p2", "skipped"), 1, "{t:?}");
    assert!(
        !stale.exists(),
        "the killed run's temporary folder was left"
    );
    assert_eq!(
        std::fs::read(out.join("p1/segmentation.nii.gz")).unwrap(),
        p1_before
    );

    // Something that is not univ's in a case's place: that case fails, untouched, even with
    // --overwrite, which redoes the others.
    std::fs::remove_dir_all(out.join("p2")).unwrap();
    std::fs::create_dir_all(out.join("p2")).unwrap();
    std::fs::write(out.join("p2/notes.txt"), b"mine").unwrap();
    let o = run(&manifest, &out, &[], &["--overwrite", "--quiet"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o).1);
    assert!(text(&o).1.contains("not a univ result"), "{}", text(&o).1);
    assert_eq!(std::fs::read(out.join("p2/notes.txt")).unwrap(), b"mine");
    let t = tally(&out);
    assert_eq!(count(&t, "p1", "done"), 2, "{t:?}");
    assert_eq!(count(&t, "p2", "failed"), 1, "{t:?}");
    let o = super::univ(&["cohort", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o).0.contains("3 done, 1 failed, 0 missing"),
        "{}",
        text(&o).0
    );

    // A case added to the manifest but not run is listed as missing, one whose last run
    // failed as failed (p2, though its folder is gone now); the JSON-lines form of a manifest
    // reads the same cases.
    std::fs::remove_dir_all(out.join("p2")).unwrap();
    let jsonl = d.join("cases.jsonl");
    std::fs::write(
        &jsonl,
        "{\"id\": \"p1\", \"input\": \"cts/a.nii.gz\"}\n\
         {\"id\": \"p2\", \"input\": \"cts/b.nii.gz\"}\n\
         {\"id\": \"p3\", \"input\": \"cts/broken.nii.gz\"}\n\
         {\"id\": \"p4\", \"input\": \"cts/d.nii.gz\"}\n\
         {\"id\": \"p5\", \"input\": \"cts/d.nii.gz\"}\n",
    )
    .unwrap();
    let o = super::univ(&[
        "cohort",
        out.to_str().unwrap(),
        "--manifest",
        jsonl.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        text(&o).0.contains("5 cases: 3 done, 1 failed, 1 missing"),
        "{}",
        text(&o).0
    );
    let o = run(
        &jsonl,
        &out,
        &[("JOB_COMPLETION_INDEX", "0"), ("UNIV_SHARDS", "1")],
        &["--quiet"],
    );
    assert!(o.status.success(), "{}", text(&o).1);
    let o = super::univ(&["cohort", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert!(
        text(&o).0.contains("5 cases: 5 done, 0 failed, 0 missing"),
        "{}",
        text(&o).0
    );
}

//! Replays every committed fuzz input (`tests/fuzz/<target>/`) through the fuzz targets' own
//! harness (`fuzz/harness.rs`): the seeds, and each finding of a fuzzing run, kept as a
//! regression input named `finding-*`. Part of the `cli` test binary, so the normal test run
//! replays them (no fuzzing time needed).

#[path = "../fuzz/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::path::Path;

#[test]
fn committed_fuzz_inputs_replay_without_a_panic_and_the_seeds_still_read() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fuzz");
    let mut replayed = 0;
    for (target, run) in harness::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        let seeds = files.iter().filter(|p| !is_finding(p)).count();
        assert!(seeds > 0, "{target}: no seed inputs in {}", dir.display());
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let accepted = run(&data);
            // A seed is a valid file: if a reader starts refusing it, the fuzzer's corpus no
            // longer reaches past the first checks (and a user's file would be refused too).
            assert!(
                accepted || is_finding(f),
                "{target}: the seed {} is refused",
                f.display()
            );
            replayed += 1;
        }
    }
    println!("replayed {replayed} committed fuzz inputs");
}

fn is_finding(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("finding-"))
}

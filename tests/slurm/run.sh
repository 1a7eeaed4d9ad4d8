#!/usr/bin/env bash
# The cohort engine test under a real Slurm (issue #16, docs/cohort.md): a one-machine cluster
# (tests/slurm/slurm-local.sh), an array job of 3 tasks over 6 small cases (4 copies of
# example_ct_sm, 2 of the DICOM series) with the small fixture U-Net of ../shared.
#
# 1. The array runs to the end: every case is done exactly once, by the task of its shard.
# 2. A second cohort: one task is cancelled (scancel) while it segments its second case; no
#    half-written result is visible; the array is submitted again and only the missing case
#    is redone (the others are logged as skipped), and nothing temporary is left.
#
# Usage: tests/slurm/run.sh   (after `cargo build --release`; .ci/run runs it)
# Env: UNIV (the binary, default target/release/univ), UNIV_SHARED_DIR (default ../shared).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
univ=${UNIV:-$root/target/release/univ}
shared=${UNIV_SHARED_DIR:-$root/../shared}
[ -x "$univ" ] || { echo "slurm test: $univ not built (cargo build --release)" >&2; exit 1; }
[ -d "$shared/data" ] || { echo "slurm test: the shared data folder $shared is missing" >&2; exit 1; }
univ=$(cd "$(dirname "$univ")" && pwd)/$(basename "$univ")
shared=$(cd "$shared" && pwd)

work=$(mktemp -d /tmp/univ-slurm-test.XXXXXX)
cluster="$work/cluster"
cleanup() {
    "$root/tests/slurm/slurm-local.sh" stop "$cluster" || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
"$root/tests/slurm/slurm-local.sh" start "$cluster"
export SLURM_CONF="$cluster/slurm.conf"

fail() {
    echo "slurm test FAILED: $*" >&2
    for f in "$work"/task-*.txt; do
        [ -f "$f" ] && { echo "== $f" >&2; tail -n 20 "$f" >&2; }
    done
    exit 1
}

# Six cases: ids sorted c1..c6, so with 3 shards task 0 has c1 c4, task 1 c2 c5, task 2 c3 c6.
# The DICOM series (slower) are c1 and c5, so that two tasks running at once on two cores
# take about as long, and task 1 is cancelled in its long second case.
mkdir -p "$work/cases"
for i in 2 3 4 6; do
    cp "$shared/data/ct/example_ct_sm.nii.gz" "$work/cases/c$i.nii.gz"
done
for i in 1 5; do
    cp -r "$shared/data/dicom/example_ct_dicom_uncompressed" "$work/cases/c$i"
done
manifest="$work/cases.csv"
{
    echo "id,input"
    # Not in id order: the shards must not depend on it.
    for i in 6 3 1 5 2 4; do
        if [ "$i" = 1 ] || [ "$i" = 5 ]; then echo "c$i,cases/c$i"; else echo "c$i,cases/c$i.nii.gz"; fi
    done
} >"$manifest"

cat >"$work/task.sh" <<EOF
#!/bin/bash
# One task of the array: its shard comes from SLURM_ARRAY_TASK_*, its threads from -c.
exec "$univ" segment --manifest "$manifest" -o "\$COHORT_OUT" \\
    --checkpoint "$shared/fixtures/model_unet/model.safetensors" --overlap 0 --quiet
EOF
chmod +x "$work/task.sh"

# count OUT CASE STATUS: how many `case` lines of all shard logs say so.
count() {
    python3 - "$1" "$2" "$3" <<'PY'
import json, pathlib, sys
out, case, status = sys.argv[1:]
n = 0
for f in pathlib.Path(out, "cohort-logs").glob("*.jsonl"):
    for line in f.read_text().splitlines():
        j = json.loads(line)
        if j.get("event") == "case" and j["case"] == case and j["status"] == status:
            n += 1
print(n)
PY
}

# The cases a shard log names (begin lines), in order.
began() {
    python3 - "$1" <<'PY'
import json, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except FileNotFoundError:
    lines = []
print(" ".join(json.loads(l)["case"] for l in lines if json.loads(l).get("event") == "begin"))
PY
}

# Every visible case folder is complete; prints the hidden (temporary) entries.
check_visible() {
    local out=$1
    for d in "$out"/c[0-9]*; do
        [ -e "$d" ] || continue
        [ -f "$d/.univ-complete" ] || fail "$d is visible but not complete"
        [ -f "$d/report.json" ] && [ -f "$d/segmentation.nii.gz" ] || fail "$d lacks files"
    done
}

echo "== 1. an array of 3 tasks over 6 cases"
start=$(date +%s)
export COHORT_OUT="$work/out1"
sbatch --wait --array=0-2 -c 1 -o "$work/task-1-%a.txt" "$work/task.sh" \
    || fail "the array did not succeed"
echo "array done in $(($(date +%s) - start)) s"
for i in 1 2 3 4 5 6; do
    [ -f "$COHORT_OUT/c$i/.univ-complete" ] || fail "c$i has no complete result"
    [ "$(count "$COHORT_OUT" "c$i" done)" = 1 ] || fail "c$i was not done exactly once"
done
[ "$(began "$COHORT_OUT/cohort-logs/shard-0-of-3.jsonl")" = "c1 c4" ] || fail "shard 0"
[ "$(began "$COHORT_OUT/cohort-logs/shard-1-of-3.jsonl")" = "c2 c5" ] || fail "shard 1"
[ "$(began "$COHORT_OUT/cohort-logs/shard-2-of-3.jsonl")" = "c3 c6" ] || fail "shard 2"
check_visible "$COHORT_OUT"
"$univ" cohort "$COHORT_OUT" || fail "univ cohort"
[ "$(head -c 12 "$COHORT_OUT/cohort.csv")" = "case,class_i" ] || fail "cohort.csv"
echo "ok: each case done once, by its shard's task"

echo "== 2. a task cancelled mid-run, then the array resubmitted"
export COHORT_OUT="$work/out2"
job=$(sbatch --parsable --array=0-2 -c 1 -o "$work/task-2-%a.txt" "$work/task.sh")
log1="$COHORT_OUT/cohort-logs/shard-1-of-3.jsonl"
for _ in $(seq 600); do
    [ "$(began "$log1")" = "c2 c5" ] && break
    sleep 0.5
done
[ "$(began "$log1")" = "c2 c5" ] || fail "task 1 never began its second case"
sleep 2
scancel "${job}_1"
echo "cancelled task 1 of job $job while it segmented c5"
for _ in $(seq 600); do
    [ -z "$(squeue -h -j "$job" 2>/dev/null)" ] && break
    sleep 1
done
[ -z "$(squeue -h -j "$job")" ] || fail "the array did not end"
[ "$(count "$COHORT_OUT" c5 done)" = 0 ] || fail "c5 ended before the cancel: nothing was cancelled"
[ ! -e "$COHORT_OUT/c5" ] || fail "the cancelled case c5 is visible"
check_visible "$COHORT_OUT"
for i in 1 2 3 4 6; do
    [ -f "$COHORT_OUT/c$i/.univ-complete" ] || fail "c$i is not complete after the first run"
done
start=$(date +%s)
sbatch --wait --array=0-2 -c 1 -o "$work/task-3-%a.txt" "$work/task.sh" \
    || fail "the resubmitted array did not succeed"
echo "resubmitted array done in $(($(date +%s) - start)) s"
for i in 1 2 3 4 6; do
    [ "$(count "$COHORT_OUT" "c$i" done)" = 1 ] || fail "c$i was redone"
    [ "$(count "$COHORT_OUT" "c$i" skipped)" = 1 ] || fail "c$i was not skipped on resubmission"
done
[ "$(count "$COHORT_OUT" c5 done)" = 1 ] || fail "c5 was not redone exactly once"
[ -f "$COHORT_OUT/c5/.univ-complete" ] || fail "c5 is not complete"
check_visible "$COHORT_OUT"
left=$(find "$COHORT_OUT" -maxdepth 1 -name '.*univ-tmp*')
[ -z "$left" ] || fail "temporary entries left: $left"
"$univ" cohort "$COHORT_OUT" || fail "univ cohort after the resubmission"
echo "ok: only the cancelled case was redone; no partial result was ever visible"
echo "slurm test passed"

#!/usr/bin/env bash
# A one-machine Slurm cluster for tests: munge, slurmctld and slurmd from Debian's packages
# (slurm-wlm, munge), configured for this host only, with all state in one folder.
#
#   tests/slurm/slurm-local.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits
#   tests/slurm/slurm-local.sh stop DIR    # stops them
#
# After `start`, clients need SLURM_CONF=DIR/slurm.conf. Needs root (the daemons run as root).
set -euo pipefail
cmd=${1:?start or stop}
dir=${2:?state folder}

stop() {
    # The daemons remove their pid files as they exit: read them first.
    local pids=()
    for p in slurmd slurmctld munged; do
        if [ -f "$dir/$p.pid" ]; then
            pids+=("$(cat "$dir/$p.pid")")
        fi
    done
    [ ${#pids[@]} -eq 0 ] && return 0
    kill "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 "${pids[@]}" 2>/dev/null || return 0
        sleep 0.5
    done
    kill -9 "${pids[@]}" 2>/dev/null || true
}

if [ "$cmd" = stop ]; then
    stop
    exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

[ "$(id -u)" = 0 ] || { echo "slurm-local: run as root (the daemons run as root)" >&2; exit 1; }
for b in munged slurmctld slurmd sbatch squeue scancel sinfo; do
    command -v "$b" >/dev/null || {
        echo "slurm-local: $b not found: install Debian's slurm-wlm and munge" >&2
        exit 1
    }
done
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 700 "$dir/munge"
dir=$(cd "$dir" && pwd)
host=$(hostname -s)
cpus=$(nproc)

# munge: our own key, socket and files, so that a system munged is left alone.
key="$dir/munge/munge.key"
if [ ! -f "$key" ]; then
    head -c 1024 /dev/urandom >"$key"
    chmod 400 "$key"
fi
munged --force --key-file="$key" --socket="$dir/munge/socket" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"

cat >"$dir/slurm.conf" <<CONF
ClusterName=univtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/socket
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$dir/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 60); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qx idle; then
        echo "slurm-local: $host idle with $cpus CPUs (SLURM_CONF=$SLURM_CONF)"
        exit 0
    fi
    sleep 1
done
echo "slurm-local: the node did not become idle; logs:" >&2
tail -n 20 "$dir"/*.log >&2 || true
stop
exit 1

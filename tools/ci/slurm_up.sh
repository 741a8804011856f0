#!/usr/bin/env bash
# Start a private one-node Slurm (munged + slurmctld + slurmd on localhost) under DIR, for tests
# and CI on a single Debian/Ubuntu machine. Installs slurm-wlm and munge with apt-get if missing.
#
#   tools/ci/slurm_up.sh DIR        -> prints SLURM_CONF=DIR/slurm.conf on stdout, exit 0
#   tools/ci/slurm_down.sh DIR      -> stops the daemons by their pid files
#
# Everything lives under DIR: config, state, spool, logs, pid files and munged's own socket, on
# free TCP ports, so it never touches (or collides with) a system Slurm/munge or a second copy
# started by a concurrent test run. Jobs and clients find it through SLURM_CONF.
#
# When Slurm cannot be started here (not root, no apt-get, install or daemon failure) the script
# prints ONE line "slurm_up: cannot start: <reason>" on stderr and exits 3, so callers can skip
# with the exact reason. Recipe: ../shared/notes/slurm-on-one-machine.md (Slurm 22.05, Debian 12).
set -uo pipefail

DIR=${1:?usage: slurm_up.sh DIR}
CPUS=${SLURM_UP_CPUS:-8}          # declared, not real: 4-task jobs on a 2-core box must not wait
WAIT_S=${SLURM_UP_WAIT_S:-30}

export PATH="$PATH:/usr/sbin:/sbin"     # daemons and runuser live there; some CI shells lack it
cannot() { echo "slurm_up: cannot start: $*" >&2; exit 3; }
log_tail() {  # the last error line of a log (else its last line), for one-line reasons
  [ -f "$1" ] || { echo "(no log $1)"; return; }
  { grep -iE "error|fatal" "$1" || tail -n 1 "$1"; } | tail -n 1 | cut -c1-300
}

[ "$(id -u)" = 0 ] || cannot "needs root to run slurmd/munged (uid $(id -u))"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and apt-get is not available"
  echo "slurm_up: installing slurm-wlm and munge with apt-get" >&2
  export DEBIAN_FRONTEND=noninteractive
  out=$(apt-get update -qq -o DPkg::Lock::Timeout=300 2>&1) \
    || cannot "apt-get update failed: $(echo "$out" | tail -n 1)"
  out=$(apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 \
        slurm-wlm slurmctld slurmd slurm-client munge 2>&1) \
    || cannot "apt-get install slurm-wlm munge failed: $(echo "$out" | tail -n 1)"
fi
[ -r /etc/munge/munge.key ] || cannot "/etc/munge/munge.key missing (the munge package creates it)"
id munge >/dev/null 2>&1 || cannot "no 'munge' user (the munge package creates it)"

mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd) || cannot "cannot create $DIR"
mkdir -p "$DIR"/{state,spool,log,run,munge}
chmod 755 "$DIR"                  # munged runs as user munge and must reach its socket dir
chown munge:munge "$DIR/munge" && chmod 755 "$DIR/munge"   # munged insists on a+x here

free_ports() {  # two distinct free TCP ports
  python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}
read -r CTLD_PORT SLURMD_PORT < <(free_ports) || cannot "cannot find free ports"

SOCK="$DIR/munge/munge.socket"
cat > "$DIR/slurm.conf" <<EOF
ClusterName=moetrainci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
MailProg=/bin/true
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
NodeName=localhost CPUs=$CPUS RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
echo "CgroupPlugin=cgroup/v1" > "$DIR/cgroup.conf"   # only used where /sys/fs/cgroup is absent
export SLURM_CONF="$DIR/slurm.conf"

runuser -u munge -- /usr/sbin/munged --socket="$SOCK" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
  </dev/null >>"$DIR/log/daemons.out" 2>&1 \
  || cannot "munged failed: $(log_tail "$DIR/munge/munged.log") $(tail -n 1 "$DIR/log/daemons.out" 2>/dev/null)"
# daemons get /dev/null and a file as stdio: a caller reading our output through a pipe must
# see EOF when this script exits, not when the daemons do
slurmctld -f "$SLURM_CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 || cannot "slurmctld failed: $(log_tail "$DIR/log/slurmctld.log")"
slurmd -f "$SLURM_CONF" </dev/null >>"$DIR/log/daemons.out" 2>&1 || cannot "slurmd failed: $(log_tail "$DIR/log/slurmd.log")"

state=""
for _ in $(seq $((WAIT_S * 4))); do
  state=$(sinfo -h -o %t 2>/dev/null | head -n 1)
  [ "$state" = idle ] && break
  sleep 0.25
done
if [ "$state" != idle ]; then
  bash "$(dirname "$0")/slurm_down.sh" "$DIR" >/dev/null 2>&1
  cannot "node not idle after ${WAIT_S}s (state '${state:-none}'); slurmctld: $(log_tail "$DIR/log/slurmctld.log") slurmd: $(log_tail "$DIR/log/slurmd.log")"
fi
echo "SLURM_CONF=$SLURM_CONF"

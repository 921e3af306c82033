#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (Debian/Ubuntu, as root): for the launch tests
# (tests/launch/test_launch.py) and for trying scripts/slurm/selfreward.sbatch without a real cluster.
#
#   tests/launch/local_cluster.sh          # install + configure + start, then wait for the node (idempotent)
#   tests/launch/local_cluster.sh status   # daemons and `sinfo`
#   tests/launch/local_cluster.sh stop     # stop slurmd, slurmctld and munged
#
# `start` installs slurm-wlm and munge with apt when they are missing, creates the munge key when
# missing, writes /etc/slurm/slurm.conf (where Debian's slurm-wlm reads it) for a partition `debug`
# holding this one node, and starts munged, slurmctld and slurmd as daemons (no systemd needed).
# Run it again at any time: what is already running with the same configuration is left alone; a
# changed configuration (say, after a resize) restarts the SLURM daemons. Jobs run as root.
#
# Environment: SLURM_LOCAL_WAIT seconds to wait for the node to come up (default 90);
# SLURM_LOCAL_MEM_HEADROOM_MB memory kept out of the node's RealMemory (default: 10%, at least 512).
set -euo pipefail

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}

action=${1:-start}
conf_dir=/etc/slurm
conf=$conf_dir/slurm.conf
node=$(hostname -s)
log_dir=/var/log/slurm
ctld_spool=/var/spool/slurmctld
d_spool=/var/spool/slurmd
ctld_pid=/run/slurmctld.pid
d_pid=/run/slurmd.pid
munge_key=/etc/munge/munge.key
munge_pid=/run/munge/munged.pid
wait_s=${SLURM_LOCAL_WAIT:-90}

say() { echo "local_cluster: $*"; }
die() {
  echo "local_cluster: error: $*" >&2
  exit 1
}

# The pid in FILE if that process is alive and is NAME (a stale pid file may name another process).
daemon_pid() {
  local file=$1 name=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$name" ]] || return 1
  echo "$pid"
}

# Send TERM to the daemon in FILE, then wait (up to 30 s) for it to exit.
stop_daemon() {
  local file=$1 name=$2 pid
  pid=$(daemon_pid "$file" "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 60); do
    [[ -d /proc/$pid ]] || break
    sleep 0.5
  done
  if [[ -d /proc/$pid ]]; then
    say "$name ($pid) ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null &&
    command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "slurm-wlm/munge missing and no apt-get: install SLURM and munge by hand"
  say "installing slurm-wlm and munge (apt)"
  # the lock the test session's own apt-get calls take (tests/conftest.py): parallel test workers share dpkg
  exec 9>/tmp/selfreward-tests-apt.lock
  flock 9
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  flock -u 9
}

start_munge() {
  if [[ ! -s $munge_key ]]; then
    say "creating $munge_key"
    install -d -m 0700 "$(dirname "$munge_key")"
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile="$munge_key"
    else
      dd if=/dev/urandom of="$munge_key" bs=1024 count=1 status=none
    fi
  fi
  local user=root
  if id munge >/dev/null 2>&1; then
    user=munge
  fi
  chown "$user:" "$munge_key" "$(dirname "$munge_key")"
  chmod 0400 "$munge_key"
  if munge_ok; then
    return 0
  fi
  stop_daemon "$munge_pid" munged
  install -d -o "$user" -m 0755 /run/munge
  install -d -o "$user" -m 0700 /var/lib/munge /var/log/munge
  say "starting munged (as $user)"
  if [[ $user == root ]]; then
    munged --force
  else
    runuser -u munge -- munged
  fi
  for _ in $(seq 20); do
    munge_ok && return 0
    sleep 0.5
  done
  die "munged does not answer (see /var/log/munge/munged.log)"
}

write_conf() {
  local cpus mem_mb headroom real_mem tmp
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS (1 in parallel test workers)
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
  headroom=${SLURM_LOCAL_MEM_HEADROOM_MB:-$((mem_mb / 10 > 512 ? mem_mb / 10 : 512))}
  real_mem=$((mem_mb - headroom))
  ((real_mem > 0)) || die "MemTotal ${mem_mb} MB leaves nothing after ${headroom} MB headroom"
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by tests/launch/local_cluster.sh: a one-node cluster for tests. Rewritten on every start.
ClusterName=selfreward-ci
SlurmctldHost=$node
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Trust the counts below even where slurmd sees other hardware (containers, VMs).
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
# Seconds between SIGTERM and SIGKILL at cancel/time limit: time for a run to stop cleanly.
KillWait=30
# sbatch --wait polls after 2, 8, then every 32 s, unless twice the poll reaches MinJobAge: 16 keeps it at 8 s.
MinJobAge=16
SlurmctldPidFile=$ctld_pid
SlurmdPidFile=$d_pid
SlurmdSpoolDir=$d_spool
StateSaveLocation=$ctld_spool
SlurmctldLogFile=$log_dir/slurmctld.log
SlurmdLogFile=$log_dir/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
DefMemPerCPU=$((real_mem / cpus))
NodeName=$node CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF
  install -d -m 0755 "$conf_dir"
  if [[ -f $conf ]] && cmp -s "$tmp" "$conf"; then
    rm -f "$tmp"
    return 1 # unchanged
  fi
  install -m 0644 "$tmp" "$conf"
  rm -f "$tmp"
  say "wrote $conf (NodeName=$node CPUs=$cpus RealMemory=$real_mem)"
  return 0
}

node_state() { sinfo -h -n "$node" -o %T 2>/dev/null | head -n1; }

start() {
  [[ $(id -u) -eq 0 ]] || die "run as root (it installs packages and starts daemons)"
  install_packages
  start_munge
  local changed=0
  if write_conf; then
    changed=1
  fi
  install -d -m 0755 "$log_dir" "$d_spool"
  install -d -m 0700 "$ctld_spool"
  if ((changed)); then
    stop_daemon "$d_pid" slurmd
    stop_daemon "$ctld_pid" slurmctld
  fi
  if ! daemon_pid "$ctld_pid" slurmctld >/dev/null; then
    say "starting slurmctld"
    slurmctld
  fi
  if ! daemon_pid "$d_pid" slurmd >/dev/null; then
    say "starting slurmd"
    slurmd
  fi
  local state="" t0=$SECONDS
  while ((SECONDS - t0 < wait_s)); do
    state=$(node_state || true)
    case $state in
      idle | mixed | allocated | completing) break ;;
      drained | draining | down)
        # A node that was down (say, the machine restarted under a running job) can come back.
        scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        ;;
    esac
    state=""
    sleep 1
  done
  if [[ -z $state ]]; then
    scontrol show node "$node" >&2 || true
    tail -n 20 "$log_dir/slurmctld.log" "$log_dir/slurmd.log" >&2 || true
    die "node $node did not come up within ${wait_s}s (last state: $(node_state || echo unknown))"
  fi
  say "node $node is $state after $((SECONDS - t0))s"
  status
}

status() {
  local name file pid
  for name in munged slurmctld slurmd; do
    case $name in
      munged) file=$munge_pid ;;
      slurmctld) file=$ctld_pid ;;
      slurmd) file=$d_pid ;;
    esac
    if pid=$(daemon_pid "$file" "$name"); then
      say "$name running (pid $pid)"
    else
      say "$name not running"
    fi
  done
  sinfo 2>/dev/null || say "sinfo: the controller does not answer"
}

stop() {
  [[ $(id -u) -eq 0 ]] || die "run as root"
  if daemon_pid "$ctld_pid" slurmctld >/dev/null && scontrol ping >/dev/null 2>&1; then
    # Stops slurmctld and every slurmd it knows (here: ours); the loops below wait for both.
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  stop_daemon "$d_pid" slurmd
  stop_daemon "$ctld_pid" slurmctld
  stop_daemon "$munge_pid" munged
  say "stopped"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: $0 [start|status|stop]" >&2
    exit 2
    ;;
esac

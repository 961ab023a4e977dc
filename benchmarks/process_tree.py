"""Runs a command and measures its whole process tree from /proc.

Usage:
  python -m benchmarks.process_tree [--interval 0.2] [--json OUT] -- CMD ...

Every `interval` seconds it walks /proc, finds the command's process and all
its descendants (Beam's SDK workers; Ray's gcs_server, raylet and actors;
Spark's JVM and its Python workers) and sums, per sample:

  rss   resident set size of each process. Shared pages (libraries, pages a
        forked worker still shares with its parent, Ray's object store mapped
        from /dev/shm) count once per process that maps them, so the sum
        over-counts a tree of many processes.
  pss   proportional set size (smaps_rollup): a page shared by n processes
        counts 1/n in each, so the sum is what the tree really holds.

and, over the run: the CPU seconds of every process of the tree (user +
system, as last sampled: a process's last interval is missed), the CPU
seconds the rest of the machine used meanwhile (`other_cpu_s`, from
/proc/stat: how much other work competed for the cores), the peak growth of
/dev/shm (machine-wide: Ray's plasma store lives there) and the 1-minute load
average before and after. No third-party packages: the peers' venv and the
project's both run it.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def _scan_proc():
  """({ppid: [pid, ...]}, {(pid, start time): CPU seconds}) over /proc."""
  children, cpu = {}, {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat", "rb") as handle:
        stat = handle.read()
    except OSError:
      continue
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = stat[stat.rfind(b")") + 2:].split()
    children.setdefault(int(fields[1]), []).append(int(entry))
    # fields[11], [12]: utime, stime; [19]: start time (tells reused pids apart).
    cpu[(int(entry), fields[19])] = (int(fields[11]) + int(fields[12])) / _TICKS
  return children, cpu


def _tree(root, cpu_seen):
  """Pids of root and all its descendants; records their CPU seconds so far
  in cpu_seen, keyed by (pid, start time)."""
  children, cpu = _scan_proc()
  found, stack = [], [root]
  while stack:
    pid = stack.pop()
    found.append(pid)
    stack.extend(children.get(pid, ()))
  tree = set(found)
  cpu_seen.update((key, seconds) for key, seconds in cpu.items()
                  if key[0] in tree)
  return found


def _name(pid):
  """A short name for a process: its command line's first words."""
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
      words = handle.read().split(b"\0")
  except OSError:
    return "?"
  words = [w.decode(errors="replace") for w in words if w]
  return " ".join(os.path.basename(w) if i == 0 else w
                  for i, w in enumerate(words[:3]))[:80]


def _memory_kib(pid):
  """(rss, pss) in KiB from smaps_rollup; (0, 0) once the process is gone."""
  rss = pss = 0
  try:
    with open(f"/proc/{pid}/smaps_rollup", "r", encoding="ascii") as handle:
      for line in handle:
        if line.startswith("Rss:"):
          rss = int(line.split()[1])
        elif line.startswith("Pss:"):
          pss = int(line.split()[1])
  except (OSError, ValueError):
    pass
  return rss, pss


def machine_busy_seconds():
  """CPU seconds the whole machine has spent busy (all cores), /proc/stat."""
  with open("/proc/stat", "r", encoding="ascii") as handle:
    values = [int(v) for v in handle.readline().split()[1:]]
  idle = values[3] + values[4]  # idle + iowait
  return (sum(values[:8]) - idle) / _TICKS


def _shm_used_bytes():
  stats = os.statvfs("/dev/shm")
  return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


def measure(command, interval=0.2, **popen):
  """Runs `command` to its end; returns (figures, stdout text).

  stdout is captured (the systems print their result there); `popen` goes
  to subprocess.Popen (cwd, env, stderr).
  """
  load_before = os.getloadavg()[0]
  busy_before = machine_busy_seconds()
  shm_before = _shm_used_bytes()
  peak = {"rss": 0, "pss": 0, "shm": 0, "processes": 0}
  at_peak = []  # (pss MiB, rss MiB, name) of each process at the PSS peak
  cpu = {}  # (pid, start time) -> last CPU seconds seen
  names = {}  # (pid, start time) -> name
  started = time.monotonic()
  process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                             **popen)
  captured = []
  reader = threading.Thread(target=lambda: captured.append(
      process.stdout.read()), daemon=True)
  reader.start()
  while process.poll() is None:
    pids = _tree(process.pid, cpu)
    for key in cpu.keys() - names.keys():
      names[key] = _name(key[0])
    rss = pss = 0
    sample = []
    for pid in pids:
      one_rss, one_pss = _memory_kib(pid)
      rss += one_rss
      pss += one_pss
      sample.append((pid, one_pss, one_rss))
    peak["rss"] = max(peak["rss"], rss * 1024)
    if pss * 1024 > peak["pss"]:
      peak["pss"] = pss * 1024
      at_peak = [(round(one_pss / 1024), round(one_rss / 1024), _name(pid))
                 for pid, one_pss, one_rss in sorted(
                     sample, key=lambda s: -s[1]) if one_pss]
    peak["shm"] = max(peak["shm"], _shm_used_bytes() - shm_before)
    peak["processes"] = max(peak["processes"], len(pids))
    time.sleep(interval)
  wall = time.monotonic() - started
  reader.join()
  busy = machine_busy_seconds() - busy_before
  tree_cpu = sum(cpu.values())
  figures = {
      "returncode": process.returncode,
      "wall_s": wall,
      "cpu_s": tree_cpu,
      "other_cpu_s": max(0.0, busy - tree_cpu),
      "peak_rss_mib": peak["rss"] / 2**20,
      "peak_pss_mib": peak["pss"] / 2**20,
      "peak_dev_shm_mib": peak["shm"] / 2**20,
      "peak_processes": peak["processes"],
      # CPU seconds by process, largest first (a process's name is its
      # command line's first words).
      "cpu_by_process": sorted(
          ([names.get(key, "?"), round(seconds, 2)]
           for key, seconds in cpu.items() if seconds >= 0.05),
          key=lambda pair: -pair[1]),
      # What each process held when the tree's PSS peaked, largest first.
      "processes_at_peak_pss": at_peak,
      "load1_before": load_before,
      "load1_after": os.getloadavg()[0],
  }
  return figures, "".join(captured)


def wait_quiet(max_busy=0.3, window=5.0, timeout=900.0):
  """Waits until fewer than `max_busy` cores were busy over a `window`;
  returns the cores busy in the last window (it gives up after `timeout`)."""
  deadline = time.monotonic() + timeout
  while True:
    before = machine_busy_seconds()
    time.sleep(window)
    cores = (machine_busy_seconds() - before) / window
    if cores < max_busy or time.monotonic() > deadline:
      return cores


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--interval", type=float, default=0.2)
  parser.add_argument("--json", help="also write the figures to this file")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command given")
  figures, stdout = measure(command, args.interval)
  sys.stdout.write(stdout)
  figures["command"] = command
  print("MEASURE " + json.dumps(figures), file=sys.stderr)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as handle:
      json.dump(figures, handle, indent=2)
  return figures["returncode"]


if __name__ == "__main__":
  sys.exit(main())

"""Machine readings from /proc and git: CPU ticks, memory, threads, fds, what was measured."""

import contextlib
import hashlib
import os
import platform
import resource
import subprocess
from dataclasses import dataclass

import google.protobuf
import grpc

from bench.processes import ROOT, BenchError

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class CpuSample:
    """CPU ticks used so far by the server, the load processes, bench itself, the machine and
    the store's engine (Redis) when the server has one."""

    server: int
    load: int
    own: int
    machine: int
    engine: int = 0


def cpu_sample(server_pids, load_pids, engine_pids=()):
    """A CpuSample now."""
    return CpuSample(
        server=sum(process_ticks(pid) for pid in server_pids),
        load=sum(process_ticks(pid) for pid in load_pids),
        own=process_ticks(os.getpid()),
        machine=machine_ticks(),
        engine=sum(process_ticks(pid) for pid in engine_pids),
    )


def process_ticks(pid):
    """utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def machine_ticks():
    """Busy clock ticks of all CPUs so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as stat:
        values = [int(value) for value in stat.readline().split()[1:]]
    return sum(values[:3]) + sum(values[5:8])


def _status_field(pid, field):
    """One number of /proc/PID/status (VmRSS in KiB, Threads)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise BenchError(f"no {field} for process {pid}")


def rss_bytes(pid):
    """Resident memory of a process (VmRSS of /proc/PID/status)."""
    return _status_field(pid, "VmRSS") * 1024


def thread_count(pid):
    """Threads of a process (Threads of /proc/PID/status)."""
    return _status_field(pid, "Threads")


def fd_count(pid):
    """Open file descriptors of a process: its sockets, mostly."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def source_version():
    """The commit of the code measured, and whether the work tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "modified": None}
    return {"commit": commit, "modified": sorted(line[3:] for line in dirty.splitlines())}


def server_digest():
    """A short digest of server.py as it is now: what a server started now runs."""
    return hashlib.sha256((ROOT / "server.py").read_bytes()).hexdigest()[:12]


def machine_info():
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "clock_ticks_per_s": CLOCK_TICK,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "loadavg_at_start": os.getloadavg(),
    }

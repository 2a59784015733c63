"""What a command costs the machine: its wall time, its CPU time as `time` counts it (user + sys of the
processes it waited for), and the CPU seconds the whole machine was busy meanwhile (/proc/stat), each also
as cores (seconds over wall time). Usage:

    python scripts/cpu_time.py python -m pytest

Why both: `time` counts only the processes its command waited for and their waited-for children. Ray's worker
processes outlive the raylet that started them and are reaped by init, so the CPU of every trial a test runs
under Ray is missing from `time`; the machine's counters see it. Run it on an otherwise idle machine, with
`uptime` beside it. The command's own output goes to stdout and stderr as usual; the figures, one line, last.
"""
import os
import resource
import subprocess
import sys
import time


def busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot: user, nice, system, irq and softirq."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    before, start = busy_seconds(), time.monotonic()
    status = subprocess.call(argv)
    wall, machine = time.monotonic() - start, busy_seconds() - before
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(f"cpu_time: exit {status}; wall {wall:.1f} s; time user+sys {cpu:.1f} s ({cpu / wall:.2f} cores); "
          f"machine busy {machine:.1f} s ({machine / wall:.2f} cores)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

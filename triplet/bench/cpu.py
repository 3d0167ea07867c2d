"""How contended a timing was: the share of the machine's CPU other processes used meanwhile (torch-free)."""
import os
from pathlib import Path


def cpu_seconds():
    """(CPU seconds all processes used, CPU seconds this one used); the first is None off Linux."""
    own = sum(os.times()[:2])
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None, own
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own


def others_share(start, end, wall):
    """Share of the machine's CPU that other processes used meanwhile: how contended a timing was."""
    if start[0] is None:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (wall * (os.cpu_count() or 1)))


def others_cell(share):
    """A table cell for ``others_share``: "37%", or "n/a" where it could not be measured."""
    return "n/a" if share is None else f"{share:.0%}"

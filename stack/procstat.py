"""CPU time of the processes under test, from /proc/<pid>/stat (utime + stime of the process itself).

tritonserver runs each Python model instance in its own `triton_python_backend_stub` child; the stub's
command line ends with the instance name (`postprocessing_0_0 DEFAULT`), which is how each one is labelled.
Taking a snapshot before and after a load run and dividing the difference by the tokens delivered gives the
CPU cost per token of every component separately.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may contain spaces; everything after the last ')' is space-separated.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def stub_label(pid: int) -> str:
    """`postprocessing` for a stub serving instance `postprocessing_0_0`; the command name otherwise."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid{pid}"
    args = [a.decode(errors="replace") for a in argv if a]
    if args and args[0].endswith("triton_python_backend_stub") and len(args) >= 3:
        instance = args[-2]  # "<model>_<group>_<index>", then "DEFAULT"
        return instance.rsplit("_", 2)[0]
    return Path(args[0]).name if args else f"pid{pid}"


@dataclass
class ProcessGroup:
    """Named processes whose CPU time is tracked together: {label: pid}."""

    pids: dict[str, int]

    @classmethod
    def triton(cls, server_pid: int, gateway_pid: int | None = None) -> ProcessGroup:
        pids = {"tritonserver": server_pid}
        for child in children(server_pid):
            label = stub_label(child)
            key, n = label, 1
            while key in pids:  # several instances of one model: postprocessing, postprocessing#2, ...
                n += 1
                key = f"{label}#{n}"
            pids[key] = child
        if gateway_pid is not None:
            pids["gateway"] = gateway_pid
        return cls(pids)

    def snapshot(self) -> dict[str, float]:
        return {label: cpu_seconds(pid) for label, pid in self.pids.items()}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 4) for k in after}


def component(label: str) -> str:
    """Fold model instances into their model: `postprocessing#2` -> `postprocessing`."""
    return label.split("#", 1)[0]

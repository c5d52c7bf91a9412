"""Peak memory of this process over a span of work: host RSS (Linux) and CUDA allocations.

The host peak is the kernel's high-water mark (VmHWM in /proc/self/status), which writing "5"
to /proc/self/clear_refs resets to the current RSS (Linux >= 4.0; it touches nothing else).
Where that is not possible the peak is the process-lifetime one, and `rss_reset` says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def status_kb(field: str, pid: int | str = "self") -> int | None:
    """A `kB` field of /proc/PID/status (VmHWM: peak RSS, VmRSS: current RSS); None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class PeakMemory:
    """`reset()` at the start of a span, `read()` at its end: {"rss_peak_mb", "cuda_peak_mb"?}."""

    def __init__(self, device=None):
        import torch

        self.cuda = device is not None and getattr(device, "type", str(device)).startswith("cuda") \
            and torch.cuda.is_available()
        self.device = device
        self.rss_reset = True

    def reset(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            if self.rss_reset:
                log.info("cannot reset the peak RSS (/proc/self/clear_refs): phase peaks are process-lifetime peaks")
            self.rss_reset = False
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, float]:
        out: dict[str, float] = {}
        kb = status_kb("VmHWM")
        if kb is not None:
            out["rss_peak_mb"] = round(kb / 1024, 1)
        if self.cuda:
            import torch

            out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return out

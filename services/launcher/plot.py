"""Training curves as a PNG, from a run's metrics.jsonl (one JSON object per update)."""

from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("success_rate_all", "success rate (rollout episodes, cut-off ones count as lost)"),
    ("mean_return", "mean return"),
    ("format_ok_rate", "format-valid rate (answers that parse)"),
    ("kl_mean", "KL(student || teacher), thought tokens"),
    ("teacher_version", "teacher version"),
    ("seconds_update", "seconds per update"),
]


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def plot_metrics(metrics_path: str | Path, out_png: str | Path, title: str = "",
                 before: float | None = None, after: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, label) in zip(axes.flat, PANELS, strict=True):
        if key == "success_rate_all" and not any(r.get(key) is not None for r in rows):
            key, label = "success_rate", "success rate"
        xs = [r["update"] for r in rows if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        ax.plot(xs, ys, marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
        if key.startswith("success_rate") or key == "format_ok_rate":
            ax.set_ylim(-0.02, 1.02)
        if key.startswith("success_rate"):
            if before is not None:
                ax.axhline(before, color="gray", ls="--", lw=1, label=f"eval before: {before:.2f}")
            if after is not None:
                ax.axhline(after, color="green", ls="--", lw=1, label=f"eval after: {after:.2f}")
            if before is not None or after is not None:
                ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

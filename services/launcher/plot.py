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
                 before: float | None = None, after: float | None = None,
                 teacher_eval: str | Path | None = None) -> Path:
    """Six panels per update. With `teacher_eval` (a run's teacher_eval.jsonl, eval.teacher_every),
    the success panel also shows the merged teacher's and the student's eval success."""
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
            if teacher_eval is not None and Path(teacher_eval).exists():
                evs = read_metrics(teacher_eval)
                for k, style, who in (("eval/teacher_success", "r^-", "teacher"), ("eval/student_success", "bs--", "student")):
                    pts = [(e["update"], e[k]) for e in evs if e.get(k) is not None]
                    if pts:
                        ax.plot(*zip(*pts, strict=True), style, ms=4, lw=1, label=f"eval: merged {who}" if who == "teacher"
                                else f"eval: {who}")
            if before is not None:
                ax.axhline(before, color="gray", ls="--", lw=1, label=f"eval before: {before:.2f}")
            if after is not None:
                ax.axhline(after, color="green", ls="--", lw=1, label=f"eval after: {after:.2f}")
            if before is not None or after is not None or teacher_eval is not None:
                ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _band(curves: list[list[float | None]]) -> tuple[list[int], "list[float]", "list[float]"]:
    """Mean and std per update over the runs that logged it."""
    import numpy as np

    n = max((len(c) for c in curves), default=0)
    xs, mean, std = [], [], []
    for i in range(n):
        vals = [c[i] for c in curves if i < len(c) and c[i] is not None]
        if vals:
            xs.append(i + 1)
            mean.append(float(np.mean(vals)))
            std.append(float(np.std(vals)))
    return xs, mean, std


def plot_experiment(runs: list[dict], variants: list[str], out_png: str | Path, title: str = "") -> Path:
    """curves.png: success per update (mean with a ±std band over seeds) per variant; beside it,
    where runs evaluated the teacher (eval.teacher_every), teacher vs student success per update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    has_teacher = any(r.get("teacher_eval") for r in runs)
    fig, axes = plt.subplots(1, 2 if has_teacher else 1, figsize=(13 if has_teacher else 7.5, 4.8), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, v in enumerate(variants):
        mine = [r for r in runs if r["variant"] == v]
        if not mine:
            continue
        xs, mean, std = _band([r["curve"]["success"] for r in mine])
        c = colors[i % len(colors)]
        ax.plot(xs, mean, color=c, label=f"{v} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")
        ax.fill_between(xs, np.array(mean) - np.array(std), np.array(mean) + np.array(std), color=c, alpha=0.18)
    ax.set_xlabel("update")
    ax.set_ylabel("rollout success rate (cut-off episodes count as lost)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if has_teacher:
        ax2 = axes[0][1]
        for i, v in enumerate(variants):
            mine = [r for r in runs if r["variant"] == v and r.get("teacher_eval")]
            if not mine:
                continue
            c = colors[i % len(colors)]
            ups = sorted({e["update"] for r in mine for e in r["teacher_eval"]})
            for key, ls, who in (("eval/teacher_success", "-", "teacher"), ("eval/student_success", "--", "student")):
                ys = [np.mean([e[key] for r in mine for e in r["teacher_eval"] if e["update"] == u
                               and e.get(key) is not None] or [np.nan]) for u in ups]
                if np.all(np.isnan(ys)):
                    continue  # no teacher in this variant: no line, no legend entry
                ax2.plot(ups, ys, ls=ls, marker="o", ms=3, color=c, label=f"{v}: {who}")
        ax2.set_xlabel("update")
        ax2.set_ylabel("eval success, same seeds")
        ax2.set_title("merged teacher vs student (paper's Fig. 2)", fontsize=10)
        ax2.set_ylim(-0.02, 1.02)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

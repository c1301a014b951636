"""The `bench compare` figure: p99 TTFT, p99 TPOT, SLO attainment and p99 ITL (where prefill
interference shows first) against request rate, one line per setup on shared axes, the SLOs drawn
as dashed lines. Needs matplotlib (the ``bench`` extra);
it renders off-screen (Agg), so it works without a display.
"""

from __future__ import annotations

from pathlib import Path

from splitwise.bench.compare import CompareRow
from splitwise.bench.metrics import SLO

MARKERS = ("o", "s", "^", "D")


def _series(rows: list[CompareRow], label: str, attr: str) -> tuple[list[float], list[float]]:
    points = sorted(
        (r.request_rate, getattr(r, attr)) for r in rows if r.label == label and getattr(r, attr) is not None
    )
    return [x for x, _ in points], [y for _, y in points]


def plot_compare(rows: list[CompareRow], path: Path, slo: SLO, title: str | None = None) -> Path:
    """Write the figure to ``path`` (PNG) and return it."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install -e .[bench]") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.label for r in rows))
    panels: list[tuple[str, str, float | None, float]] = [
        ("ttft_p99_ms", "p99 TTFT (ms)", slo.ttft_ms, 1.0),
        ("tpot_p99_ms", "p99 TPOT (ms)", slo.tpot_ms, 1.0),
        ("slo_attainment", "SLO attainment (%)", None, 100.0),
        ("itl_p99_ms", "p99 inter-token latency (ms)", None, 1.0),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for ax, (attr, ylabel, objective, scale) in zip(axes.flat, panels, strict=True):
        for i, label in enumerate(labels):
            xs, ys = _series(rows, label, attr)
            ax.plot(xs, [y * scale for y in ys], marker=MARKERS[i % len(MARKERS)], label=label)
        if objective is not None:
            ax.axhline(objective, color="grey", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if attr == "slo_attainment":
            ax.set_ylim(-5, 105)
        else:
            ax.set_ylim(bottom=0)
        ax.legend()
    slo_text = (
        f"SLO: TTFT <= {slo.ttft_ms:g} ms and TPOT <= {slo.tpot_ms:g} ms"
        if slo.ttft_ms and slo.tpot_ms
        else ""
    )
    fig.suptitle(title or f"splitwise: {' vs '.join(labels)}. {slo_text}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

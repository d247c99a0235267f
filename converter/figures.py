"""Writing a matplotlib figure: one home for every plot the CLI and the studies save."""
from __future__ import annotations

from pathlib import Path

from ..common.fileio import atomic_path


def save_figure(fig, path: str | Path, dpi: int = 120, **savefig_kw) -> Path:
    """Save `fig` to `path` atomically (no half-written PNG is left behind), in the format its
    suffix names (PNG without one), then close it so long sweeps do not pile up figures."""
    import matplotlib.pyplot as plt

    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=dpi, **savefig_kw)
    plt.close(fig)
    return target

"""Pictures for people: verify-cost curves (more plots come with the benchmarks)."""

from __future__ import annotations

from pathlib import Path


def plot_verify_costs(profiles: dict, out: str | Path) -> Path:
    """C_v(n) per quant mode at the shortest measured context: raw points and the convex fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for quant, profile in profiles.items():
        line, = ax.plot(profile.sizes, profile.verify_ms[0], "o", label=f"{quant} measured")
        ax.plot(profile.sizes, profile.fitted_ms[0], "-", color=line.get_color(), alpha=0.6,
                label=f"{quant} convex fit")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens verified in one target forward (root + tree nodes)")
    ax.set_ylabel("verify latency (ms)")
    ax.set_title(f"Verify cost per quant mode (context {next(iter(profiles.values())).contexts[0]} tokens)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

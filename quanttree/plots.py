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


def plot_learning_curve(records: list[dict], out: str | Path, title: str = "drafter training") -> Path:
    """Held-out slot-1 accuracy and teacher-forced chain tau against training steps, with the
    n-gram baselines a drafter must beat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = sorted((r for r in records if "slot1" in r), key=lambda r: r["step"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["step"] for r in records]
    left.plot(steps, [r["slot1"] for r in records], marker=".", label="drafter")
    for key, style in (("bigram_slot1", "--"), ("trigram_slot1", "-."), ("lookup_slot1", ":")):
        if records and key in records[-1]:
            left.axhline(records[-1][key], color="gray", ls=style, lw=1, label=key.replace("_slot1", " table"))
    right.plot(steps, [r["chain_tau"] for r in records], marker=".", color="C1")
    left.set_title("held-out slot-1 accuracy (first drafted token)")
    right.set_title("held-out teacher-forced chain tau")
    for ax in (left, right):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

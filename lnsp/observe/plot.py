"""plots.png for a run: loss per step, Hit@10 per epoch beside copy-last, and where the
wall time went (goodput).
matplotlib is an optional extra (pip install 'lnsp[plot]')."""

from __future__ import annotations

from lnsp.rundir import RunDir


def draw(rd: RunDir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = rd.read_steps()  # steps.jsonl, never the log's wording
    steps, losses = [r.step for r in records], [r.loss for r in records]
    metrics = rd.read_metrics()
    goodput = rd.read_goodput()
    fig, axes = plt.subplots(1, 3 if goodput else 2, figsize=(16 if goodput else 11, 4))
    left, right = axes[0], axes[1]
    left.plot(steps, losses, lw=1)
    left.set(title="training loss", xlabel="step", ylabel="InfoNCE loss")
    epochs = [m["epoch"] for m in metrics]
    right.plot(epochs, [m["hit@10"] for m in metrics], "o-", label="model Hit@10")
    right.plot(epochs, [m["baseline_hit@10"] for m in metrics], "s--", label="copy-last Hit@10")
    right.set(title="held-out Hit@10", xlabel="epoch", ylim=(0, 1.05))
    right.legend()
    if goodput:  # goodput.json, written by the trainer for every attempt
        shares = {c: v for c, v in goodput.get("shares", {}).items() if v > 0}
        axes[2].barh(list(shares), [100 * v for v in shares.values()])
        axes[2].set(title=f"wall time {goodput.get('wall_s', 0):.0f}s over "
                          f"{goodput.get('attempts', 1)} attempt(s)", xlabel="% of wall time")
    fig.suptitle(str(rd.root))
    fig.tight_layout()
    tmp = rd.plots.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(rd.plots)
    return rd.plots

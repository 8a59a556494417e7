"""plots.png for a run: loss per step, and Hit@10 per epoch beside copy-last.
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, losses, lw=1)
    left.set(title="training loss", xlabel="step", ylabel="InfoNCE loss")
    epochs = [m["epoch"] for m in metrics]
    right.plot(epochs, [m["hit@10"] for m in metrics], "o-", label="model Hit@10")
    right.plot(epochs, [m["baseline_hit@10"] for m in metrics], "s--", label="copy-last Hit@10")
    right.set(title="held-out Hit@10", xlabel="epoch", ylim=(0, 1.05))
    right.legend()
    fig.suptitle(str(rd.root))
    fig.tight_layout()
    tmp = rd.plots.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(rd.plots)
    return rd.plots

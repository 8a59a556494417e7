"""plots.png for a run: loss per step, and Hit@10 per epoch beside copy-last.
matplotlib is an optional extra (pip install 'lnsp[plot]')."""

from __future__ import annotations

import json
import re

from lnsp.rundir import RunDir

LOSS_LINE = re.compile(r"Epoch \d+/\d+ \| Step (\d+) \| Loss ([0-9.naif]+) \|")


def draw(rd: RunDir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = [], []
    if rd.log.exists():
        for match in LOSS_LINE.finditer(rd.log.read_text()):
            steps.append(int(match.group(1)))
            losses.append(float(match.group(2)))
    metrics = [json.loads(line) for line in rd.metrics.read_text().splitlines()
               if line.strip()] if rd.metrics.exists() else []
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

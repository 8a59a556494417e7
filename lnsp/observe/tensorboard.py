"""TensorBoard event files (`runs/<name>/tb/`) written from the same records that go to
steps.jsonl and metrics.jsonl; a no-op when the `tensorboard` extra is not installed.

Tags: `train/*` (loss, samples/s, epoch, and any other number of a step record),
`phase_s/*` (seconds per step in each phase), `system/rss_mb`, `model/*` for the
evaluation's own figures beside `baseline/*`, `blend/*` (every `PREFIX_NAME` key whose
NAME the model also reports), `goodput/*`, and the config as text.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from pathlib import Path

# Fields of a record that are coordinates, not values to chart.
COORDINATES = ("step", "time")
# Step-record keys with a group of their own (the rest go under train/).
STEP_GROUPS = {"rss_mb": "system/rss_mb", "phases": "phase_s"}
RETRIEVAL = re.compile(r"^(hit@\d+|mrr|ndcg@?\d*|recall@\d+|loss)$")
# Seconds between flushes of the event file: a viewer sees a live run within this.
FLUSH_S = 5


def available() -> bool:
    """Whether torch.utils.tensorboard can write (the `tensorboard` package is there)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
        return True
    except ImportError:
        return False


def numbers_in(record: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number of a record, nested dicts flattened to `a/b` tags."""
    out = {}
    for key, value in record.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(numbers_in(value, tag))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) \
                and math.isfinite(value):
            out[tag] = float(value)
    return out


def metric_tags(record: dict) -> dict[str, float]:
    """An evaluation record's numbers as tags: the model's own retrieval figures under
    `model/`, each `PREFIX_NAME` whose NAME the model also reports under `PREFIX/NAME`
    (baseline_hit@1 -> baseline/hit@1, blend_mrr -> blend/mrr), everything else
    (goodput, say) under `eval/`."""
    values = {k: v for k, v in numbers_in(record).items() if k not in COORDINATES + ("epoch",)}
    # The model's own figures: retrieval metrics, and any figure a baseline also reports.
    compared = {k.partition("_")[2] for k in values}
    own = {k for k in values if "_" not in k and (k in compared or RETRIEVAL.match(k))}
    tags = {}
    for key, value in values.items():
        prefix, _, name = key.partition("_")
        if key in own:
            tags[f"model/{key}"] = value
        elif name in own:
            tags[f"{prefix}/{name}"] = value
        else:
            tags[f"eval/{key}"] = value
    return tags


def step_tags(record: dict) -> dict[str, float]:
    """A step record's numbers as tags (phase times may come as a `phases` dict or as
    `phase_NAME` keys)."""
    tags = {}
    for key, value in numbers_in(record).items():
        head = key.split("/", 1)[0]
        if key in COORDINATES:
            continue
        if head in STEP_GROUPS:
            tags[STEP_GROUPS[head] + key[len(head):]] = value
        elif key.startswith("phase_"):
            tags[f"phase_s/{key.removeprefix('phase_').removesuffix('_s')}"] = value
        else:
            tags[f"train/{key}"] = value
    return tags


def config_text(config: dict) -> str:
    """The configuration as a Markdown table (TensorBoard's text tab renders it)."""
    rows = [f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(config.items())]
    return "\n".join(["| field | value |", "| --- | --- |", *rows])


class Writer:
    """One run's event files. Every method takes a record as it is written to its
    JSONL file; `time` in a record becomes the event's wall time."""

    def __init__(self, log_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step: a resumed run drops the events it is about to write again.
        self._w = SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=FLUSH_S)
        self._layout_done = False

    def scalars(self, tags: dict[str, float], step: int, walltime: float | None = None) -> None:
        for tag, value in tags.items():
            self._w.add_scalar(tag, value, global_step=step, walltime=walltime)

    def config(self, config: dict) -> None:
        self._w.add_text("config", config_text(config), global_step=0)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self._w.add_text(tag, text, global_step=step)

    def step(self, record) -> None:
        """A steps.jsonl record (a dict or a StepRecord): loss, samples/s, phase times,
        RSS, and any other number it carries."""
        if dataclasses.is_dataclass(record):
            record = {**{k: v for k, v in dataclasses.asdict(record).items() if k != "extra"},
                      **record.extra}
        self.scalars(step_tags(record), int(record["step"]), record.get("time"))

    def metrics(self, record: dict) -> None:
        """A metrics.jsonl record: the model's figures beside every baseline's."""
        tags = metric_tags(record)
        self.scalars(tags, int(record["step"]), record.get("time"))
        if not self._layout_done:
            self._layout(tags)
        self._w.flush()  # evaluations are rare and what a viewer waits for

    def summary(self, group: str, record: dict, step: int) -> None:
        """A record of the run as a whole (goodput.json's figures, say) under `group/`."""
        self.scalars({f"{group}/{k}": v for k, v in numbers_in(record).items()}, step)

    def _layout(self, tags: dict) -> None:
        """One chart per evaluation figure with the model and every baseline overlaid
        (TensorBoard's Custom Scalars tab)."""
        names = sorted({t.split("/", 1)[1] for t in tags if t.startswith("model/")})
        groups = sorted({t.split("/", 1)[0] for t in tags} - {"model", "eval"})
        charts = {name: ["Multiline", [f"model/{name}", *(f"{g}/{name}" for g in groups
                                                          if f"{g}/{name}" in tags)]]
                  for name in names}
        if charts:
            self._w.add_custom_scalars({"model vs baselines": charts})
        self._layout_done = True

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


class NullWriter:
    """What a run gets without the extra: every call does nothing."""

    log_dir = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def open_writer(log_dir: str | Path, config: dict | None = None,
                purge_step: int | None = None) -> Writer | NullWriter:
    """A writer into `log_dir` with the config written as text, or a NullWriter when
    TensorBoard is not installed."""
    if not available():
        return NullWriter()
    writer = Writer(log_dir, purge_step=purge_step)
    if config is not None:
        writer.config(config)
    return writer


def read(log_dir: str | Path) -> dict:
    """The scalars and texts of a tb/ folder through TensorBoard's own reader:
    {"scalars": {tag: [(step, value), ...]}, "text": {tag: [str, ...]}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    text = {t.removesuffix("/text_summary"):
            [b"".join(e.tensor_proto.string_val).decode() for e in acc.Tensors(t)]
            for t in tags["tensors"] if t.endswith("/text_summary")}
    return {"scalars": scalars, "text": text}

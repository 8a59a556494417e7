"""The run configuration: one frozen dataclass, resolved from the command line,
`LNSP_*` environment variables, `.env` and defaults (in that order of precedence)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from lnsp.errors import ConfigError
from lnsp.guard.threads import parse_policy, read_env_file
from lnsp.rundir import RunDir

__all__ = ["ConfigError", "TrainConfig", "env_name", "read_env_file", "resolve", "load",
           "env_example"]

# The settings that a guarded command uses.
GUARD_FIELDS = ("run_dir", "threads", "stall_timeout", "startup_timeout", "slow_window",
                "on_stall", "max_restarts", "log_every", "mem_margin_mb", "resume")


def _f(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    data: str = _f("data/demo", "data directory: bank.npy, chains.npz, optional index.faiss")
    run_dir: str = _f("", "run directory (default runs/<timestamp>)")
    epochs: int = _f(6, "passes over the training windows (best.pt keeps the best held-out Hit@10)")
    batch_size: int = _f(32, "windows per micro-batch")
    accum_steps: int = _f(1, "micro-batches accumulated per optimizer step")
    lr: float = _f(1e-3, "AdamW learning rate")
    weight_decay: float = _f(0.1, "AdamW weight decay")
    k: int = _f(100, "hard negatives mined per query")
    temperature: float = _f(0.1, "InfoNCE temperature")
    cosine_weight: float = _f(0.0, "weight of a cosine term pulling the query to the true "
                                   "next vector")
    ctx_len: int = _f(10, "context vectors per window")
    hidden: int = _f(128, "GRU hidden size of the query tower")
    index: str = _f("auto", "miner: auto (exact while the bank is small, IVF with calibrated "
                    "nprobe beyond), exact (torch GEMM), flat (FAISS exact inner product), "
                    "ivf or ivf-sq8 (8-bit codes)", ("auto", "exact", "flat", "ivf", "ivf-sq8"))
    nlist: int = _f(0, "IVF lists (0: about the square root of the bank rows)")
    nprobe: int = _f(0, "IVF lists searched per query (0: the fewest reaching recall@K 0.95 "
                     "against exact search, measured at build)")
    recall_every: int = _f(2000, "IVF miner: at the first training search and every N after, "
                           "recall@K of the mined list for the model's own queries against "
                           "exact search; an unfixed nprobe is raised until it reaches 0.9 "
                           "(0 = never)")
    precision: str = _f("auto", "GRU matrix products: auto (bf16 where the CPU has it and a "
                        "bf16 product is timed 1.3x faster at start), fp32 or bf16",
                        ("auto", "fp32", "bf16"))
    threads: str = _f("fast", "thread policy: safe (1 everywhere), fast (all cores, hang-safe) or N")
    device: str = _f("cpu", "device of the towers: cpu, cuda, mps or auto", ("cpu", "cuda", "mps", "auto"))
    seed: int = _f(0, "seed of data order, initialisation and split")
    workers: int = _f(0, "DataLoader worker processes (started with spawn, never fork)")
    val_fraction: float = _f(0.1, "fraction of chains held out for evaluation")
    eval_windows: int = _f(2000, "held-out windows evaluated per epoch (0 = all)")
    log_every: int = _f(20, "optimizer steps between log lines")
    checkpoint_every: int = _f(100, "optimizer steps between last.pt saves (0 = each epoch only)")
    max_steps: int = _f(0, "stop after this many optimizer steps in all (0 = no cap)")
    stall_timeout: float = _f(120.0, "seconds without an optimizer step before the watchdog fires")
    startup_timeout: float = _f(600.0, "seconds for start-up and the first step")
    slow_window: float = _f(60.0, "seconds over which a step rate below a third of the run's "
                            "best logs [SLOW] (0 = off)")
    on_stall: str = _f("auto", "on a stall: dump (and keep waiting), exit (code 3), or auto: "
                       "dump for lnsp train, exit for a command under lnsp run",
                       ("auto", "dump", "exit"))
    pg_timeout: float = _f(300.0, "seconds a collective waits for the other ranks (torchrun)")
    max_restarts: int = _f(0, "restarts of a stalled or crashed run (launchers)")
    mem_margin_mb: float = _f(512.0, "resident growth past the first epoch that is logged as a leak")
    resume: bool = _f(False, "continue from the run directory's last.pt")

    def validate(self) -> None:
        """Raise one ConfigError naming every invalid field."""
        problems = []
        positive = ("epochs", "batch_size", "accum_steps", "k", "ctx_len", "hidden",
                    "log_every", "lr", "temperature", "stall_timeout", "startup_timeout",
                    "pg_timeout")
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("nlist", "nprobe", "recall_every", "workers", "max_steps", "slow_window",
                     "checkpoint_every",
                     "max_restarts", "eval_windows",
                     "weight_decay",
                     "cosine_weight", "mem_margin_mb"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be between 0 and 1 (got {self.val_fraction})")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                problems.append(f"{f.name} must be one of {', '.join(choices)} "
                                f"(got {getattr(self, f.name)!r})")
        try:
            parse_policy(self.threads)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def to_argv(self, only: tuple[str, ...] | None = None) -> list[str]:
        """Command-line flags that reproduce this configuration exactly (its fields in
        `only`, when given)."""
        argv = []
        for f in dataclasses.fields(self):
            if only is not None and f.name not in only:
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if f.type == "bool" or isinstance(value, bool):
                argv.append(flag if value else "--no-" + flag[2:])
            else:
                argv += [flag, str(value)]
        return argv

    def guard_settings(self, on_stall_auto: str = "dump", python: str | None = None) -> dict:
        """What the guard's runtime reads (lnsp.guard.runtime.Runtime; in a user's script
        through LNSP_GUARD): the run's budgets, and lnsp's own interpreter, where the
        diagnosis of a user's script runs. on_stall auto: dump for lnsp's trainer (its
        supervisor decides), exit for a user's command."""
        return {"run_dir": str(Path(self.run_dir).resolve()),
                "stall_timeout": self.stall_timeout, "startup_timeout": self.startup_timeout,
                "on_stall": on_stall_auto if self.on_stall == "auto" else self.on_stall,
                "slow_window": self.slow_window, "log_every": self.log_every,
                "mem_margin_mb": self.mem_margin_mb, "python": python}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def env_name(field_name: str) -> str:
    return "LNSP_" + field_name.upper()


def _convert(f: dataclasses.Field, raw: str, source: str):
    kind = type(f.default)
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if raw.strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source}: {raw!r} is not a valid {kind.__name__}") from None


def resolve(cli: dict | None = None, environ: dict | None = None,
            dotenv_path: str | Path = ".env") -> TrainConfig:
    """Command line > environment > .env > defaults, then validate."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    dotenv = read_env_file(dotenv_path)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        name = env_name(f.name)
        if f.name in cli:
            values[f.name] = cli[f.name]
        elif name in environ:
            values[f.name] = _convert(f, environ[name], name)
        elif name in dotenv:
            values[f.name] = _convert(f, dotenv[name], f".env {name}")
    config = TrainConfig(**values)
    stored = RunDir(config.run_dir or "-").config
    if config.resume and stored.exists():
        # A resumed run keeps the configuration it started with; only flags given on
        # this command line change it (more epochs, say).
        config = load(stored).replace(**{**cli, "resume": True})
    if not config.run_dir:
        config = config.replace(run_dir=str(Path("runs") / time.strftime("%Y%m%d-%H%M%S")))
    config.validate()
    return config


def load(path: str | Path) -> TrainConfig:
    """The configuration stored in a run directory's config.json or a checkpoint."""
    data = json.loads(Path(path).read_text()) if not isinstance(path, dict) else path
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def env_example() -> str:
    """The text of .env.example: every key with its default and a one-line comment."""
    lines = ["# lnsp settings: every key, its default and what it does.",
             "# Copy to .env to change them; precedence: command line > environment > .env "
             "> defaults.", "# Regenerate: python -m lnsp.config > .env.example", ""]
    for f in dataclasses.fields(TrainConfig):
        value = str(f.default).lower() if isinstance(f.default, bool) else f.default
        lines += [f"# {f.metadata['help']}", f"{env_name(f.name)}={value}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(env_example(), end="")

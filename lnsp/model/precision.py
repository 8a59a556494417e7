"""Numeric precision of the query tower: the GRU's matrix products in bfloat16 where
that is measured to be faster on this CPU, float32 elsewhere. Weights, optimizer
state, loss and search stay float32.

Whether bf16 pays cannot be read off the CPU flags: on an AMD EPYC with AVX512-BF16 a
bf16 GEMM did 4x the fp32 rate; on an Intel Xeon with the same flag, 0.55x (docs/performance.md). So `auto` times the tower's recurrent product in both and takes bf16
only when it is clearly the faster."""

from __future__ import annotations

import functools

CHOICES = ("auto", "fp32", "bf16")
BF16_MARGIN = 1.3  # auto takes bf16 when its GEMM runs at least this much faster


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (oneDNN's own check)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_has_bf16()
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_bf16() -> bool:
    """avx512_bf16 or amx_bf16 in /proc/cpuinfo (Linux); elsewhere, oneDNN's word."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=None)
def bf16_speedup(hidden: int, batch: int = 64, repeats: int = 4) -> float:
    """fp32 time / bf16 time of the GRU's recurrent product (batch x hidden by
    hidden x 3*hidden) on this CPU: the two alternate, best of `repeats` each, so that a
    burst of load from elsewhere cannot favour one (under 0.1 s at hidden 768)."""
    import time

    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, hidden, generator=gen)
    w = torch.randn(3 * hidden, hidden, generator=gen)
    inner = max(1, min(20, 1_000_000_000 // (2 * batch * hidden * 3 * hidden)))
    operands = {dtype: (x.to(dtype), w.to(dtype)) for dtype in (torch.float32, torch.bfloat16)}
    best = {dtype: float("inf") for dtype in operands}
    with torch.no_grad():
        for a, b in operands.values():
            F.linear(a, b)  # first call: kernel selection, buffers
        for _ in range(repeats):
            for dtype, (a, b) in operands.items():
                t = time.perf_counter()
                for _ in range(inner):
                    F.linear(a, b)
                best[dtype] = min(best[dtype], time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]


def tower_bf16(precision: str, device, hidden: int) -> bool:
    """Whether the tower's GRU runs under bf16 autocast for this choice and device."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return str(device) == "cpu" and native_bf16() and bf16_speedup(hidden) >= BF16_MARGIN


def describe(precision: str, device, hidden: int) -> str:
    """Why auto chose what it did, for the run's log."""
    if precision != "auto" or str(device) != "cpu":
        return f"precision {precision}"
    if not native_bf16():
        return "precision auto: no native bf16 on this CPU"
    return (f"precision auto: a bf16 GEMM runs {bf16_speedup(hidden):.2f}x the fp32 rate "
            f"here, bf16 from {BF16_MARGIN}x")

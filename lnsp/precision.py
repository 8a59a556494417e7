"""Numeric precision of the query tower: the GRU's matrix products in bfloat16 where
the CPU computes bf16 natively (AVX512-BF16 or AMX: 2.7x less CPU for the tower here),
float32 elsewhere. Weights, optimizer state, loss and search stay float32."""

from __future__ import annotations

CHOICES = ("auto", "fp32", "bf16")


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


def tower_bf16(precision: str, device) -> bool:
    """Whether the tower's GRU runs under bf16 autocast for this choice and device."""
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    return str(device) == "cpu" and native_bf16()

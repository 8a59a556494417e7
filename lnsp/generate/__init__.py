"""Generation from a trained query tower: SNAP / BLEND / NOVEL decisions (decider), their
calibrated thresholds (calibrate), and the generation itself (generation)."""

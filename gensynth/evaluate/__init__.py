"""Evaluation: is synthetic data any good, and does it help the teams that train on it?

    from gensynth.evaluate.synthetic import evaluate_synthetic
    metrics = evaluate_synthetic("data/synth/x", "data/fashion/test", train="data/fashion/train", report="reports/x")

Modules, one job each: classifier (the small CNN and its fixed recipe), extractor (that CNN trained on
the real training shards, cached), sets (shard sets in memory, seeded subsets), fidelity (FID, KID,
precision/recall, class consistency), memorisation (nearest training vs test images, near-copies),
usefulness (CAS, augmentation gain, the provenance check), augment (the classic augmentation of the
honest real-only baseline), recommend (the recommended mix, chosen on a validation split outside the K
set, and the verdict), inception (optional standard FID), report
(report.html), synthetic (the whole evaluation), metrics (plug-ins that training's eval_every runs).
Reconstruction figures (autoencoders: MSE/PSNR/SSIM, codebook usage) are gensynth.reconstruction's,
shared with training.
"""

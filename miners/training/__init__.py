"""Training: the tiny CLIP, training data, the one trainer, evaluation, the bootstrap, calibrator
fitting and ROGLE. Nothing in the mining path (miners.rsm and what it imports) imports this package."""

"""Experiment scripts: static augmented sets (sample-augs), t-SNE, launchers and sweeps."""

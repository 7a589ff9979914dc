"""Evaluation protocols: kNN (paper best-NN and DINO), instance discrimination, alignment / uniformity,
linear probe. Each module has pure tensor functions returning ``dict[str, float]`` and a ``main()`` CLI;
:mod:`eval.features` builds the backbone, loads checkpoints and extracts (and caches) features.

The package name ``eval`` is generic and may clash with another installed package of the same name.
"""

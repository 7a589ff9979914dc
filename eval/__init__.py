"""Evaluation protocols: kNN (paper best-NN and DINO, on a bank that may be sharded over ranks), instance
discrimination, alignment / uniformity, linear probe, embeddings and similar-image search.

Each protocol module has pure tensor functions returning ``dict[str, float]`` and a ``main()`` CLI
(``python -m eval.knn | eval.knn_bench | eval.linear | eval.instdisc | eval.stats-dist | eval.embed |
eval.similar``). :mod:`eval.features` builds the backbone, loads checkpoints and extracts (and caches)
features (no argparse); :mod:`eval.cli` is the argparse glue the CLIs share; :mod:`eval.knn_search` is the
exact (sharded) nearest-neighbour search.

The package name ``eval`` is generic and may clash with another installed package of the same name.
"""

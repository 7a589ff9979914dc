"""t-SNE picture of a backbone's features, coloured by class (van der Maaten & Hinton 2008).

``python -m experiments.tsne DATA -a ARCH --pretrained CKPT --out tsne.png [--split val] [-s 100]``

Needs the ``viz`` extra (scikit-learn, matplotlib): ``pip install -e .[viz]``. Features are extracted in
eval mode with :mod:`eval.features` (cached like the other evals), L2-normalised, optionally reduced to
``--pca`` dimensions, embedded with scikit-learn's exact-seeded t-SNE and saved as a PNG; the 2-D
embedding and labels are saved next to it (``<out>.pt``) for re-plotting.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from smallssl.errors import run_cli


def tsne_embed(features: torch.Tensor, perplexity: float = 30.0, pca: int | None = 50, seed: int = 0,
               max_iter: int = 1000) -> torch.Tensor:
    """(N, D) features -> (N, 2) t-SNE embedding of the L2-normalised features (optional PCA first)."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = F.normalize(features.float(), dim=1)
    if pca and pca < x.shape[1] and pca < x.shape[0]:
        x = x - x.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(x, q=pca, center=False, niter=4)
        x = x @ v
    perplexity = min(perplexity, max(1.0, (x.shape[0] - 1) / 3))  # sklearn requires perplexity < N
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter)
    # OpenMP in sklearn's Barnes-Hut oversubscribes shared CPUs badly (45 points: 9 s vs 0.2 s): cap it.
    with threadpool_limits(torch.get_num_threads()):
        emb = tsne.fit_transform(x.numpy())
    return torch.from_numpy(emb).float()


def plot_embedding(emb: torch.Tensor, labels: torch.Tensor, classes: list[str], out: str, title: str = "") -> None:
    """Scatter (N, 2) points coloured by label into ``out`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c in labels.unique().tolist():
        m = labels == c
        ax.scatter(emb[m, 0], emb[m, 1], s=4, color=cmap(c % cmap.N), label=classes[c] if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    from torchvision.datasets import ImageFolder

    from eval import cli

    p = argparse.ArgumentParser("python -m experiments.tsne", parents=[cli.common_parser()], description=__doc__)
    p.add_argument("--out", default="tsne.png")
    p.add_argument("--split", default="val")
    p.add_argument("-s", "--sample-per-class", default=100, type=int, help="first S images of each class")
    p.add_argument("--perplexity", default=30.0, type=float)
    p.add_argument("--pca", default=50, type=int, help="PCA dimensions before t-SNE (0 = none)")
    args = p.parse_args(argv)
    folder = cli.split_dir(cli.resolve_data(args.data), args.split)
    em = cli.model_from_args(args, folder)
    x, y = cli.split_features(em, folder, per_class=args.sample_per_class)
    emb = tsne_embed(x, args.perplexity, args.pca or None, args.seed)
    classes = ImageFolder(folder).classes
    plot_embedding(emb, y, classes, args.out, f"{args.arch} {args.pretrained or 'random init'} - {folder}")
    torch.save({"embedding": emb, "labels": y, "classes": classes}, os.path.splitext(args.out)[0] + ".pt")
    print(f"=> t-SNE of {len(y)} features ({len(classes)} classes, perplexity {args.perplexity:g}) -> {args.out}")
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(main))

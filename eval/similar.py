"""Nearest images by cosine similarity: ``python -m eval.similar emb --query IMG_OR_INDEX -k 8 --out sheet.png``.

Reads what :mod:`eval.embed` wrote (``emb.npy``, ``emb.files.txt``, ``emb.json``). The query is a row index,
a file of the set (as listed in ``emb.files.txt`` or by its path), or any other image, which is then
embedded with the network and transform recorded in ``emb.json``. Prints the k nearest images with their
cosine similarity (the query itself excluded; its exact duplicates are not) and draws a contact sheet: the
query (red frame) followed by its neighbours, each captioned with its rank, similarity and file name.
Search: :func:`eval.knn_search.local_topk` (faiss when installed on CPU, torch otherwise; exact float64
similarities, ties to the smaller row index).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from eval import cli
from eval.embed import load_embeddings
from eval.features import build_model, device_for
from eval.knn_search import BACKENDS, local_topk
from smallssl.data.transforms import eval_transform
from smallssl.errors import run_cli


def nearest(emb: torch.Tensor, query: torch.Tensor, k: int, exclude: int | None = None,
            backend: str = "auto") -> tuple[list[float], list[int]]:
    """The ``k`` rows of ``emb`` (N, D) most cosine-similar to ``query`` (D,), without row ``exclude``.

    Returns (similarities, row indices), most similar first; ties go to the smaller row index.
    """
    bank = F.normalize(emb.float(), dim=1)
    q = F.normalize(query.float().view(1, -1), dim=1)
    want = min(k + (exclude is not None), bank.shape[0])
    sims, idx = local_topk(bank, q, want, "ip", backend)
    pairs = [(float(s), int(i)) for s, i in zip(sims[0], idx[0]) if int(i) != exclude][:k]
    return [s for s, _ in pairs], [i for _, i in pairs]


def resolve_query(query: str, files: Sequence[str], root: str) -> int | str:
    """Row index for an index or a file of the set; otherwise the path of an outside image."""
    if query.lstrip("-").isdigit():
        i = int(query)
        if not 0 <= i < len(files):
            raise ValueError(f"--query {i}: out of range, the set has {len(files)} images (0 .. {len(files) - 1}). "
                             "Pass a row index or an image path")
        return i
    rows = {f: i for i, f in enumerate(files)}
    if query in rows:
        return rows[query]
    absolute = os.path.abspath(query)
    rel = os.path.relpath(absolute, root)
    if rel in rows:
        return rows[rel]
    if not os.path.isfile(absolute):
        raise FileNotFoundError(f"--query {query!r}: not a row index, not a file of the set and no such file. Pass "
                                "an index, a path listed in the .files.txt, or an image file")
    return absolute


@torch.no_grad()
def embed_outside(path: str, meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """Embed one image with the network and transform recorded by :mod:`eval.embed`: (D,)."""
    model = build_model(meta["arch"], meta["checkpoint"], meta["small_input"], meta["image_size"],
                        meta.get("random_init_seed") or 0, verbose=False).to(device)
    try:
        with Image.open(path) as im:
            x = eval_transform(meta["image_size"])(im.convert("RGB"))
    except OSError as e:
        raise ValueError(f"--query {path!r}: cannot read the image ({e}). Pass a readable image") from e
    return model(x[None].to(device)).float().cpu()[0]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def contact_sheet(paths: Sequence[str], captions: Sequence[str], out: str, tile: int = 160, cols: int = 9) -> str:
    """Draw ``paths`` as tiles (the first framed in red as the query) with ``captions`` under them; save ``out``."""
    cols = min(cols, len(paths))
    rows = (len(paths) + cols - 1) // cols
    pad, text_h = 6, 34
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    font = _font(12)
    for n, (path, caption) in enumerate(zip(paths, captions)):
        x0, y0 = pad + (n % cols) * (tile + pad), pad + (n // cols) * (tile + text_h + pad)
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = tile / max(im.size)  # small images (CIFAR's 32 px) are enlarged to the tile
                resample = Image.Resampling.NEAREST if scale >= 3 else Image.Resampling.BICUBIC
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), resample)
            sheet.paste(im, (x0 + (tile - im.width) // 2, y0 + (tile - im.height) // 2))
        except OSError:
            draw.text((x0 + 4, y0 + tile // 2), "unreadable", fill="red", font=font)
        if n == 0:
            draw.rectangle([x0 - 3, y0 - 3, x0 + tile + 2, y0 + tile + 2], outline=(220, 0, 0), width=3)
        for line_no, line in enumerate(caption.split("\n")[:2]):
            draw.text((x0, y0 + tile + 3 + 15 * line_no), line, fill="black", font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    sheet.save(out)
    return out


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def get_args_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser("python -m eval.similar", description="nearest images by cosine similarity")
    p.add_argument("emb", metavar="PREFIX", help="what eval.embed --out wrote (PREFIX.npy, .files.txt, .json)")
    p.add_argument("--query", required=True, help="row index, a file of the set, or any image file")
    p.add_argument("-k", "--k", default=8, type=cli.positive_int, help="number of neighbours")
    p.add_argument("--out", default=None, help="contact sheet PNG (query + neighbours); none when omitted")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: faiss on CPU if installed, else torch")
    p.add_argument("--gpu", default=None, type=int, help="CUDA device for embedding an outside query image")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    emb_np, files, meta = load_embeddings(args.emb)
    emb = torch.from_numpy(np.ascontiguousarray(emb_np))
    root = meta["root"]
    q = resolve_query(args.query, files, root)
    if isinstance(q, int):
        query_vec, exclude, query_path, query_name = emb[q], q, os.path.join(root, files[q]), f"[{q}] {files[q]}"
    else:
        query_vec, exclude, query_path, query_name = embed_outside(q, meta, device_for(args.gpu)), None, q, q
    sims, idx = nearest(emb, query_vec, args.k, exclude, args.backend)
    note = f" (only {len(idx)} other images)" if len(idx) < args.k else ""
    print(f"query: {query_name}  ({meta['arch']}, {meta['checkpoint'] or 'random init'}){note}")
    print(f"{'rank':>4}  {'cosine':>7}  file")
    for r, (s, i) in enumerate(zip(sims, idx), 1):
        print(f"{r:>4}  {s:7.4f}  {files[i]}")
    result: dict[str, Any] = {"query": query_name, "neighbors": [(files[i], s) for s, i in zip(sims, idx)]}
    if args.out:
        paths = [query_path] + [os.path.join(root, files[i]) for i in idx]
        query_label = files[q] if isinstance(q, int) else os.path.basename(query_path)
        captions = [f"query\n{_short(query_label)}"]
        captions += [f"#{r}  cos {s:.4f}\n{_short(files[i])}" for r, (s, i) in enumerate(zip(sims, idx), 1)]
        result["sheet"] = contact_sheet(paths, captions, args.out)
        print(f"=> contact sheet {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))

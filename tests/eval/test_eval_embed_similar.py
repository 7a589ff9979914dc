"""eval.embed + eval.similar on a tiny generated folder: recursive listing, a corrupt file skipped and named, the
files list and shapes, and the nearest neighbour of an image with an exact duplicate is that duplicate (cos 1)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eval import embed, similar


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    g = np.random.default_rng(0)
    for sub, n in (("cats", 3), ("dogs", 2), (os.path.join("dogs", "puppies"), 2)):
        os.makedirs(root / sub, exist_ok=True)
        for i in range(n):
            arr = g.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / sub / f"im{i}.png")
    shutil.copy(root / "cats" / "im1.png", root / "dogs" / "puppies" / "copy_of_cat1.png")  # exact duplicate
    (root / "dogs" / "broken.jpg").write_bytes(b"not a jpeg at all")  # unreadable
    (root / "notes.txt").write_text("not an image")  # no image extension: not listed
    return str(root)


@pytest.fixture(scope="module")
def embedded(folder, tmp_path_factory):
    """(prefix, result, stdout) of one ``eval.embed`` run on ``folder`` (random-init resnet18, 16 px)."""
    import contextlib
    import io

    out = str(tmp_path_factory.mktemp("emb") / "emb")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = embed.main([folder, "-a", "resnet18", "--out", out, "-b", "3", "-j", "0", "--image-size", "16",
                          "--no-progress"])
    return out, res, buf.getvalue()


def test_embed_lists_recursively_skips_unreadable_and_writes_three_files(embedded):
    out, res, printed = embedded
    folder = json.load(open(out + ".json"))["root"]
    files = open(out + ".files.txt").read().splitlines()
    assert files == ["cats/im0.png", "cats/im1.png", "cats/im2.png", "dogs/im0.png", "dogs/im1.png",
                     "dogs/puppies/copy_of_cat1.png", "dogs/puppies/im0.png", "dogs/puppies/im1.png"]
    emb = np.load(out + ".npy")
    assert emb.shape == (8, 512) and emb.dtype == np.float32 and np.isfinite(emb).all()
    meta = json.load(open(out + ".json"))
    assert [s["file"] for s in meta["skipped"]] == ["dogs/broken.jpg"]
    assert "skipped unreadable dogs/broken.jpg" in printed
    assert meta["arch"] == "resnet18" and meta["checkpoint"] is None and meta["image_size"] == 16
    assert meta["small_input"] is True and meta["image_normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert "CenterCrop(size=(16, 16))" in meta["transform"] and os.path.isfile(os.path.join(folder, files[0]))
    assert res["num_images"] == 8 and res["skipped"] == 1
    # Rows are the images' features in list order: the duplicate's row equals the original's.
    assert np.allclose(emb[1], emb[5], atol=1e-5) and not np.allclose(emb[0], emb[1], atol=1e-3)


def test_similar_finds_the_exact_duplicate_and_draws_a_sheet(folder, embedded, tmp_path, capsys):
    out = embedded[0]
    sheet = str(tmp_path / "sheet.png")
    res = similar.main([out, "--query", "1", "-k", "3", "--out", sheet])
    printed = capsys.readouterr().out
    (first, sim), *rest = res["neighbors"]
    assert first == "dogs/puppies/copy_of_cat1.png" and sim == pytest.approx(1.0, abs=1e-5)
    assert len(rest) == 2 and all(s < 1 - 1e-4 for _, s in rest) and "cats/im1.png" not in [f for f, _ in rest]
    assert "   1   1.0000  dogs/puppies/copy_of_cat1.png" in printed
    with Image.open(sheet) as im:  # query + 3 neighbours in one row of 160 px tiles
        assert im.size == (4 * 166 + 6, 160 + 34 + 12)
    # The query as a path of the set is the same row; an outside copy is embedded with the recorded network.
    assert similar.main([out, "--query", os.path.join(folder, "cats", "im1.png"), "-k", "3"])["neighbors"] == \
        res["neighbors"]
    outside = str(tmp_path / "query.png")
    shutil.copy(os.path.join(folder, "cats", "im1.png"), outside)
    got = similar.main([out, "--query", outside, "-k", "2"])["neighbors"]
    assert sorted(f for f, _ in got) == ["cats/im1.png", "dogs/puppies/copy_of_cat1.png"]
    assert all(s == pytest.approx(1.0, abs=1e-5) for _, s in got)


def test_nearest_backends_agree_and_ties_go_to_the_smaller_row():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(50, 8, generator=g)
    emb[20] = emb[3] * 2  # same direction: cosine 1 with row 3
    s_t, i_t = similar.nearest(emb, emb[3], 4, exclude=None, backend="torch")
    s_f, i_f = similar.nearest(emb, emb[3], 4, exclude=None, backend="faiss")
    assert i_t == i_f and s_t == s_f and i_t[:2] == [3, 20]
    assert similar.nearest(emb, emb[3], 4, exclude=3)[1][0] == 20

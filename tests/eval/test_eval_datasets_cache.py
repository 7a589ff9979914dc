"""prepare_dataset: unpack once into the cache, return the ImageFolder root; clear errors."""

import io
import os
import tarfile

import pytest

from smallssl.data.cache import prepare_dataset


def _make_tarball(data_dir, stem, n_classes=2):
    os.makedirs(data_dir, exist_ok=True)
    with tarfile.open(os.path.join(data_dir, f"{stem}.tar.gz"), "w:gz") as tar:
        for split in ("train", "val"):
            for c in range(n_classes):
                payload = f"{split}-{c}".encode()
                info = tarfile.TarInfo(f"{stem}/{split}/class{c}/img0.txt")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_prepare_dataset_unpacks_once(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    _make_tarball(str(data), "toyset", n_classes=3)
    monkeypatch.setenv("SMALLSSL_DATA", str(data))
    root = prepare_dataset("toyset", cache_dir=str(cache))
    assert root == os.path.join(str(cache), "toyset")
    assert sorted(os.listdir(os.path.join(root, "train"))) == ["class0", "class1", "class2"]
    with open(os.path.join(root, "val", "class2", "img0.txt")) as f:
        assert f.read() == "val-2"
    # Second call must not unpack again: a file we drop in the tree survives.
    open(os.path.join(root, "train", "sentinel"), "w").close()
    assert prepare_dataset("toyset", cache_dir=str(cache)) == root
    assert os.path.exists(os.path.join(root, "train", "sentinel"))
    assert [p for p in os.listdir(cache) if p.startswith(".unpack")] == []


def test_prepare_dataset_missing_names_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10"):
        prepare_dataset("nope", cache_dir=str(tmp_path / "c"), data_dir=str(tmp_path))


def test_prepare_dataset_rejects_path_traversal(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data)
    with tarfile.open(data / "evil.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValueError, match="unsafe"):
        prepare_dataset("evil", cache_dir=str(tmp_path / "c"), data_dir=str(data))
    assert not (tmp_path / "escape.txt").exists()


def test_balanced_subset_takes_the_first_files_of_every_class(tmp_path):
    from smallssl.data.cache import balanced_subset

    root = tmp_path / "set"
    for split, n in (("train", 5), ("val", 3)):
        for cls in ("a", "b"):
            os.makedirs(root / split / cls)
            for i in range(n if cls == "a" else 2):  # class b has fewer files than asked for: keeps them all
                (root / split / cls / f"{i:02d}.png").write_bytes(f"{split}{cls}{i}".encode())
    out = balanced_subset(str(root), 3, 1, cache_dir=str(tmp_path / "cache"))
    assert os.path.basename(out) == "set-3x1"
    assert sorted(os.listdir(os.path.join(out, "train", "a"))) == ["00.png", "01.png", "02.png"]
    assert sorted(os.listdir(os.path.join(out, "train", "b"))) == ["00.png", "01.png"]
    assert sorted(os.listdir(os.path.join(out, "val", "a"))) == ["00.png"]
    assert open(os.path.join(out, "train", "a", "02.png"), "rb").read() == b"traina2"  # links to the originals
    os.remove(os.path.join(out, "val", "a", "00.png"))
    assert balanced_subset(str(root), 3, 1, cache_dir=str(tmp_path / "cache")) == out  # made once: not redone
    assert not os.path.exists(os.path.join(out, "val", "a", "00.png"))
    assert [n for n in os.listdir(tmp_path / "cache") if n.startswith(".")] == []  # no temp dir left
    with pytest.raises(ValueError, match=">= 1"):
        balanced_subset(str(root), 0, 1, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="train"):
        balanced_subset(str(tmp_path / "cache"), 1, 1, cache_dir=str(tmp_path / "c2"))

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

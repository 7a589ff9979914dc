"""Training curves (experiments.plot) and TensorBoard events (RunLogger(tensorboard=True))."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

from experiments.plot import main
from smallssl.curves import load_run, read_records, run_name, series_from_records, write_curves
from smallssl.errors import UserError


def _write_run(root, name: str, collapse: bool, run_json_name: str | None = None) -> str:
    d = os.path.join(str(root), name)
    os.makedirs(d)
    with open(os.path.join(d, "run.json"), "w") as f:
        f.write(json.dumps({"args": {"lr": 0.03}}) + "\n")  # first start, no name
        if run_json_name:
            f.write(json.dumps({"args": {"lr": 0.03}, "name": run_json_name}) + "\n")  # a restart names it
    lines = []
    for step in range(0, 101, 10):
        loss = 6.0 - step / 100 if not collapse or step < 50 else math.log(513)
        lines.append({"step": step, "epoch": step // 50, "loss": loss, "lr": 0.03 * (1 - step / 100),
                      "emb_std": 0.06 if not collapse or step < 50 else 1e-4, "emb_std_ref": 1 / math.sqrt(128),
                      "emb_rank": 60.0 if not collapse or step < 50 else 1.01, "feat_rank": 120.0})
        if step % 50 == 0:
            lines.append({"step": step, "knn_top1": 30.0 + step / 10, "knn_top5": 70.0, "protocol": "dino"})
    with open(os.path.join(d, "log.jsonl"), "w") as f:  # RunLogger.log: epoch summaries
        f.write(json.dumps({"epoch": 0, "step": 50, "loss": 99.0, "lr": 0.015, "time_s": 10.0}) + "\n")
    with open(os.path.join(d, "steps.jsonl.1"), "w") as f:  # records a resume cut: never plotted
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    with open(os.path.join(d, "steps.jsonl"), "w") as f:  # RunLogger.log_step: per-print-step and kNN records
        for i, rec in enumerate(lines):
            f.write(json.dumps(rec) + "\n")
            if i == 3:
                f.write('{"step": 35, "loss": 5.\n')  # a line cut off while being written
                f.write("[1, 2]\n")  # valid JSON, not a record
    return d


def test_series_rules():
    records = [
        {"step": 0, "loss": 6.0, "lr": 0.1},
        {"step": 10, "loss": 5.0, "lr": float("nan"), "emb_std": "n/a"},
        {"step": 10, "loss": 4.5},  # the same step logged again after a resume: the last value wins
        {"loss": 1.0},  # no step: not placed
        {"step": 20, "loss": 7.0, "time_s": 3.0},  # epoch summary: ignored, finer loss records exist
        {"step": 20, "knn_top1": 40.0, "kind": "knn"},
        {"step": 30, "knn_top1": True},  # a bool is no number
    ]
    s = series_from_records(records)
    assert s["loss"] == ([0, 10], [6.0, 4.5])
    assert s["lr"] == ([0], [0.1])
    assert s["knn_top1"] == ([20], [40.0])
    assert "emb_std" not in s
    # epoch summaries only (the log.jsonl of a run from before per-step logging): they are the series
    s = series_from_records([{"step": 100, "loss": 6.0, "time_s": 1.0}, {"step": 50, "loss": 6.5, "time_s": 1.0}])
    assert s["loss"] == ([50, 100], [6.5, 6.0])


def test_parser_skips_malformed_lines(tmp_path):
    d = _write_run(tmp_path, "moco_a", collapse=False)
    with pytest.warns(UserWarning) as caught:
        records = read_records(os.path.join(d, "steps.jsonl"))
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "skipped a malformed line (Expecting ',' delimiter), e.g. a partial write",
        "skipped a line that is not a JSON object"]
    assert len(records) == 14  # 11 step records + 3 kNN records; 2 bad lines skipped
    with pytest.warns(UserWarning):
        run = load_run(d)
    assert run.name == "moco_a"
    assert run.series["loss"][0] == list(range(0, 101, 10))  # not the epoch summary, not steps.jsonl.1
    assert 99.0 not in run.series["loss"][1] and 123.0 not in run.series["loss"][1]
    assert run.series["knn_top1"] == ([0, 50, 100], [30.0, 35.0, 40.0])
    assert run.series["emb_std_ref"][1][0] == pytest.approx(1 / math.sqrt(128))


def test_run_name(tmp_path):
    d = _write_run(tmp_path, "dir_name", collapse=True, run_json_name="moco T=0.2")
    assert run_name(d) == "moco T=0.2"
    e = tmp_path / "plain"
    e.mkdir()
    assert run_name(str(e)) == "plain"


def test_write_curves_png(tmp_path):
    pytest.importorskip("matplotlib")
    a = _write_run(tmp_path, "healthy", collapse=False)
    b = _write_run(tmp_path, "collapsing", collapse=True, run_json_name="collapsing (T=0.2)")
    out = tmp_path / "plots" / "curves.png"
    with pytest.warns(UserWarning) as caught:
        assert write_curves([a, b], str(out), title="two runs") is True
    assert sum("malformed" in str(w.message) for w in caught) == 2  # one per run, none raised
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # five panels with lines, not an empty canvas
    assert not os.path.exists(str(out) + ".tmp.png")
    with pytest.warns(UserWarning):
        assert main([a, "--out", str(tmp_path / "one.png")]) == 0
    assert (tmp_path / "one.png").stat().st_size > 10_000


def test_write_curves_nothing_to_draw_and_no_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "log.jsonl").write_text(json.dumps({"epoch": 0, "acc1": 3.0}) + "\n")  # no step
    with pytest.warns(UserWarning, match="no steps.jsonl or log.jsonl"):
        assert write_curves(str(tmp_path), str(tmp_path / "x.png")) is False  # a dir without logs
    assert write_curves(str(empty), str(tmp_path / "x.png")) is False
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(UserError, match="nothing to plot"):
        main([str(empty), "--out", str(tmp_path / "x.png")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    d = _write_run(tmp_path, "run", collapse=False)
    assert write_curves(d, str(tmp_path / "y.png")) is False
    assert not (tmp_path / "y.png").exists()


def test_run_logger_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from smallssl.logging import RunLogger, read_jsonl

    logger = RunLogger(str(tmp_path), {"lr": 0.1}, tensorboard=True)
    logger.log({"step": 0, "loss": 6.0, "lr": 0.1, "note": "text is skipped", "ok": True})
    logger.log({"step": 10, "loss": 5.5, "emb_std": float("nan")})
    logger.log({"epoch": 0, "step": 10, "loss": 5.8, "time_s": 3.0})
    logger.close()
    assert len(read_jsonl(str(tmp_path / "log.jsonl"))) == 3
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "epoch/loss", "epoch/time_s", "epoch/epoch"} <= tags
    assert not tags & {"note", "ok", "step", "emb_std"}
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(0, 6.0), (10, 5.5)]
    assert [(e.step, e.value) for e in acc.Scalars("epoch/loss")] == [(10, pytest.approx(5.8))]
    off = RunLogger(str(tmp_path / "off"), {}, tensorboard=False)
    off.log({"step": 0, "loss": 1.0})
    assert not [f for f in os.listdir(tmp_path / "off") if f.startswith("events.")]

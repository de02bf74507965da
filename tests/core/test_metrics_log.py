"""flowgrpo_core.metrics_log: strict JSON lines per iteration, resume truncation, TensorBoard scalars and
histograms read back with TensorBoard's own reader, purge of a killed run's points on resume."""

from __future__ import annotations

import json
import logging
import math
import sys

import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea

from flowgrpo_core.metrics_log import METRICS_FILE, TENSORBOARD_DIR, MetricsLog, read_metrics


def _metrics(i: int) -> dict:
    return {"loss": 0.5 / i, "reward_mean": 0.1 * i, "clipfrac": math.nan if i == 2 else 0.01 * i,
            "grad_norm": torch.tensor(1.5 * i), "extra": {"lr": 1e-4, "inf": math.inf}, "advantages": [1.0, -1.0, 0.5 * i],
            "rewards": {"pickscore": [0.2 * i, 0.3], "ocr": [0.0, 1.0]}, "sde_kind": "flow_sde", "ok": True}


def _events(folder):
    acc = ea.EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0})
    acc.Reload()
    return acc


def test_lines_are_strict_json_with_iteration_and_values(tmp_path):
    with MetricsLog(tmp_path / "run") as log:
        for i in (1, 2, 3):
            log.log(i, _metrics(i))
    path = tmp_path / "run" / METRICS_FILE
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
               for line in lines]
    assert records == read_metrics(path)
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert records[1]["clipfrac"] is None and records[0]["clipfrac"] == pytest.approx(0.01)
    assert records[2]["grad_norm"] == pytest.approx(4.5) and records[0]["extra"] == {"lr": 1e-4, "inf": None}
    assert records[2]["advantages"] == [1.0, -1.0, 1.5] and records[1]["rewards"]["pickscore"] == [0.4, 0.3]
    assert records[0]["sde_kind"] == "flow_sde" and records[0]["ok"] is True
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_iteration_argument_wins_and_a_cut_last_line_is_not_continued(tmp_path, caplog):
    path = tmp_path / METRICS_FILE
    path.write_text('{"iteration": 1, "loss": 1.0}\n{"iteration": 2, "lo')  # a run killed mid-line
    with MetricsLog(tmp_path) as log:
        log.log(3, {"iteration": 99, "loss": 3.0})
    with caplog.at_level(logging.WARNING):
        records = read_metrics(path)
    assert records == [{"iteration": 1, "loss": 1.0}, {"iteration": 3, "loss": 3.0}]
    assert "malformed line 2" in caplog.text


def test_resume_keeps_lines_up_to_the_checkpoint_atomically(tmp_path, caplog):
    folder = tmp_path / "run"
    with MetricsLog(folder) as log:
        for i in range(1, 6):
            log.log(i, {"loss": float(i)})
    with open(folder / METRICS_FILE, "a") as f:
        f.write("not json\n[1, 2]\n")
    inode_before = (folder / METRICS_FILE).stat().st_ino
    with caplog.at_level(logging.WARNING), MetricsLog(folder) as log:
        log.resume(3)
        assert [r["iteration"] for r in read_metrics(folder / METRICS_FILE)] == [1, 2, 3]
        log.log(4, {"loss": 40.0})
    assert caplog.text.count("dropping malformed line") == 2
    assert (folder / METRICS_FILE).stat().st_ino != inode_before, "rewritten through a new file (os.replace)"
    assert sorted(p.name for p in folder.iterdir()) == [METRICS_FILE], "no temporary file left"
    assert [(r["iteration"], r["loss"]) for r in read_metrics(folder / METRICS_FILE)] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    with MetricsLog(folder) as log:  # a fresh run in the same folder starts from an empty log
        log.resume(0)
    assert (folder / METRICS_FILE).read_text() == ""


def test_tensorboard_scalars_and_histograms_read_back(tmp_path):
    folder = tmp_path / "run"
    with MetricsLog(folder, tensorboard=True) as log:
        for i in (1, 2, 3):
            log.log(i, _metrics(i))
    acc = _events(folder)
    tags = acc.Tags()
    assert {"loss", "reward_mean", "clipfrac", "grad_norm", "extra/lr", "extra/inf"} <= set(tags["scalars"])
    assert not {"sde_kind", "ok"} & set(tags["scalars"])
    assert set(tags["histograms"]) == {"advantages", "rewards/pickscore", "rewards/ocr"}
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([0.5, 0.25, 0.5 / 3])
    assert [e.value for e in acc.Scalars("grad_norm")] == pytest.approx([1.5, 3.0, 4.5])
    assert math.isnan(acc.Scalars("clipfrac")[1].value)
    hist = acc.Histograms("advantages")
    assert [h.step for h in hist] == [1, 2, 3]
    assert hist[2].histogram_value.num == 3 and hist[2].histogram_value.max == pytest.approx(1.5)
    assert hist[0].histogram_value.min == pytest.approx(-1.0)


def test_resume_purges_tensorboard_points_after_the_checkpoint(tmp_path):
    folder = tmp_path / "run"
    with MetricsLog(folder, tensorboard=True) as log:  # the killed run got to iteration 5, checkpoint at 3
        for i in range(1, 6):
            log.log(i, {"loss": float(i)})
    with MetricsLog(folder, tensorboard=True) as log:
        log.resume(3)
        for i in range(4, 8):
            log.log(i, {"loss": 100.0 + i})
    loss = _events(folder).Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6, 7]
    assert [e.value for e in loss] == [1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0]
    assert [r["loss"] for r in read_metrics(folder / METRICS_FILE)] == [1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0]


def test_missing_tensorboard_fails_at_construction_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what Python does for a package that is not installed
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match="pip install tensorboard"):
        MetricsLog(tmp_path / "run", tensorboard=True)
    with MetricsLog(tmp_path / "run") as log:  # the JSON lines need nothing extra
        log.log(1, {"loss": 1.0})
    assert read_metrics(tmp_path / "run" / METRICS_FILE) == [{"iteration": 1, "loss": 1.0}]

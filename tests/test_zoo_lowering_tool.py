"""tools/zoo_lowering.py's own machinery (no zoo needed): the batch a model accepts, a cell past its
time limit or whose process dies, resuming, and the merged table."""
from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
from onnx import TensorProto, helper, save

import zoo_lowering


def _model(path, batch):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_batch_size_is_the_fixed_batch_dimension_or_all_images(tmp_path):
    assert zoo_lowering._batch_size(_model(tmp_path / "fixed.onnx", 1), 2) == 1
    assert zoo_lowering._batch_size(_model(tmp_path / "dyn.onnx", "N"), 2) == 2
    assert zoo_lowering._batch_size(_model(tmp_path / "paddle.onnx", -1), 2) == 2   # Paddle writes -1


def test_a_cell_past_its_time_limit_or_killed_is_its_status(monkeypatch):
    monkeypatch.setattr(zoo_lowering, "run_cell", lambda *a: time.sleep(30) or {"status": "ok"})
    # the stub would answer "ok" after 30 s: "timeout" means the child was stopped at its limit
    c = zoo_lowering.run_cell_isolated("m", "fold,quant", None, [], "check", timeout=0.5)
    assert c["status"] == "timeout"
    monkeypatch.setattr(zoo_lowering, "run_cell", lambda *a: os.kill(os.getpid(), signal.SIGKILL))
    assert zoo_lowering.run_cell_isolated("m", "p", None, [], "check", timeout=20)["status"] == "crashed"
    monkeypatch.setattr(zoo_lowering, "run_cell", lambda *a: 1 / 0)
    c = zoo_lowering.run_cell_isolated("m", "p", None, [], "check", timeout=20)
    assert c["status"] == "internal error" and c["error"].startswith("ZeroDivisionError")
    monkeypatch.setattr(zoo_lowering, "run_cell", lambda *a: {"status": "ok", "exact": 1.0, "max_lsb": 0})
    assert zoo_lowering.run_cell_isolated("m", "p", None, [], "check", timeout=20)["max_lsb"] == 0


def test_only_n_a_and_bit_exact_cells_pass():
    assert zoo_lowering._passed({"status": "n/a"})
    assert zoo_lowering._passed({"status": "ok", "exact": 1.0, "max_lsb": 0})
    assert not zoo_lowering._passed({"status": "ok", "exact": 0.99, "max_lsb": 1})
    assert not zoo_lowering._passed({"status": "timeout"})


def test_table_merges_runs_and_splits_columns(tmp_path, capsys):
    run = {"cpu": "X", "ort": "1", "calib": 8, "images": 2}
    a = {**run, "models": {"m1": {"fold,quant": {"status": "ok", "exact": 1.0, "max_lsb": 0}}}}
    b = {**run, "models": {"m2": {"fold,quant": {"status": "ok", "exact": float(np.float64(0.5)), "max_lsb": 2},
                                  "fold,quant:bits=4,weight_only=true": {"status": "n/a", "error": "w"}}}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert zoo_lowering.main(["--table", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--split", "1"]) == 0
    out = capsys.readouterr().out
    assert "| `fold,quant` | 100% / 0 |" in out and "| `fold,quant` | 50.000% / 2 |" in out
    assert out.count("| pipeline |") == 2 and "n/a" in out


def test_cells_run_quant_without_its_sqnr_report_and_the_same_passes_otherwise():
    # the SQNR report changes nothing in the written model; every other option and pass stays as given
    from qgraph.passes import build_passes
    cases = {"fold,quant": "fold,quant:sqnr=false",
             "fold,quant:granularity=tensor,biascorr": "fold,quant:granularity=tensor,sqnr=false,biascorr",
             "cleanup,quant:act_bits=16,sqnr=true": "cleanup,quant:act_bits=16,sqnr=true"}
    for given, want in cases.items():
        assert zoo_lowering.without_sqnr(given) == want
    labels = [p.label() for p in build_passes(zoo_lowering.without_sqnr(
        "fold,equalize,quant:granularity=channel,rounding=gptq,act_method=mse,biascorr:target=output"))]
    assert labels == ["fold", "equalize", "quant:act_method=mse,rounding=gptq,sqnr=false", "biascorr:target=output"]

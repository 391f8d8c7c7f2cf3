"""qgraph-opt as a user meets it: by subprocess, with good and bad input.

Bad input must give exit 2, exactly one line on stderr naming the problem, no traceback, the input
file unchanged, and no output file left behind.
"""
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import onnx
import pytest

from builders import DIGITS, DIGITS_SAMPLE, qgraph_opt_cmd


def run(*args, cwd=None):
    return subprocess.run(qgraph_opt_cmd() + [str(a) for a in args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def demo(tmp_path):
    model = tmp_path / "digits_cnn.onnx"
    shutil.copy(DIGITS, model)
    return model


def assert_clean_failure(proc, tmp_path, before: dict, code: int = 2, mentions: str = ""):
    assert proc.returncode == code, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("qgraph-opt: error:")
    assert mentions.lower() in lines[0].lower()
    after = {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before, "files were created or changed"


def snapshot(tmp_path) -> dict:
    return {p.name: digest(p) for p in tmp_path.iterdir() if p.is_file()}


def test_demo_prints_report_with_bn_gone_and_verify(demo, tmp_path):
    report = tmp_path / "r.json"
    proc = run(demo, "-p", "fold,cleanup", "--calib", DIGITS_SAMPLE, "--verify", "--report", report)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "digits_cnn.opt.onnx"
    assert out.exists() and f"wrote {out}" in proc.stdout
    assert "BatchNormalization" in proc.stdout
    data = json.loads(report.read_text())
    rows = data["passes"]
    assert [r["pass"] for r in rows] == ["input", "fold", "cleanup"]
    assert rows[0]["ops"]["BatchNormalization"] == 6 and "BatchNormalization" not in rows[-1]["ops"]
    assert max(d["max_rel"] for d in rows[-1]["verify"]["outputs"].values()) <= 1e-5
    onnx.checker.check_model(onnx.load(str(out)))


def test_list_passes_names_every_registered_pass():
    from qgraph.passes import PASSES
    proc = run("--list-passes")
    assert proc.returncode == 0
    for name in PASSES:
        assert name in proc.stdout


def test_explain_shows_options_with_defaults():
    proc = run("--explain", "fold")
    assert proc.returncode == 0
    assert "affine" in proc.stdout and "default true" in proc.stdout


def test_dump_dir_writes_model_after_every_pass(demo, tmp_path):
    dump = tmp_path / "dump"
    proc = run(demo, "-p", "fold,cleanup", "--dump-dir", dump, "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in dump.iterdir()) == ["00_input.onnx", "01_fold.onnx", "02_cleanup.onnx"]


def test_missing_file(tmp_path):
    before = snapshot(tmp_path)
    proc = run(tmp_path / "nope.onnx", "-p", "fold")
    assert_clean_failure(proc, tmp_path, before, mentions="not found")


def test_empty_file(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    before = snapshot(tmp_path)
    proc = run(tmp_path / "empty.onnx", "-p", "fold")
    assert_clean_failure(proc, tmp_path, before, mentions="empty")


def test_random_bytes(tmp_path):
    (tmp_path / "noise.onnx").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    before = snapshot(tmp_path)
    proc = run(tmp_path / "noise.onnx", "-p", "fold")
    assert_clean_failure(proc, tmp_path, before, mentions="onnx")


def test_truncated_model(tmp_path):
    data = DIGITS.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    before = snapshot(tmp_path)
    proc = run(tmp_path / "cut.onnx", "-p", "fold")
    assert_clean_failure(proc, tmp_path, before, mentions="onnx")


def test_unknown_pass_suggests_nearest(demo, tmp_path):
    before = snapshot(tmp_path)
    proc = run(demo, "-p", "fodl,cleanup")
    assert_clean_failure(proc, tmp_path, before, mentions="did you mean 'fold'")


def test_bad_option_value_names_the_option(demo, tmp_path):
    before = snapshot(tmp_path)
    proc = run(demo, "-p", "fold:affine=maybe")
    assert_clean_failure(proc, tmp_path, before, mentions="fold:affine")


def test_unknown_option_lists_valid_ones(demo, tmp_path):
    before = snapshot(tmp_path)
    proc = run(demo, "-p", "fold:afine=false")
    assert_clean_failure(proc, tmp_path, before, mentions="did you mean 'affine'")


def test_output_equal_to_input_is_refused(demo, tmp_path):
    before = snapshot(tmp_path)
    proc = run(demo, "-p", "fold", "-o", demo)
    assert_clean_failure(proc, tmp_path, before, mentions="input")


def test_output_equal_to_input_through_another_path_is_refused(demo, tmp_path):
    before = snapshot(tmp_path)
    other = os.path.join(str(tmp_path), ".", "digits_cnn.onnx")
    proc = run(demo, "-p", "fold", "-o", other)
    assert_clean_failure(proc, tmp_path, before, mentions="input")


def test_debug_shows_traceback(tmp_path):
    proc = run(tmp_path / "nope.onnx", "-p", "fold", "--debug")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr


def test_pass_failure_exits_1_and_writes_nothing(demo, tmp_path):
    # verify with an impossible tolerance makes 'fold' fail after it ran: exit 1, no output file
    before = snapshot(tmp_path)
    proc = run(demo, "-p", "fold", "--verify", "--tolerance", "0", "--noise-factor", "0")
    assert_clean_failure(proc, tmp_path, before, code=1, mentions="pass 'fold' failed")

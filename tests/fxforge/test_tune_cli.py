"""``python -m fxforge tune``: a whole tuning run on the small GPT, then a warm second run."""
import json
import sys

import pytest

from fxforge.__main__ import main

MODEL = "fxforge.examples.small_gpt:make_model"
EXAMPLE = "int64[1,16]{0..511}"


def test_tune_run_fills_the_cache_reports_plots_and_a_warm_run_measures_nothing(
        tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("FXFORGE_CACHE_DIR", str(tmp_path / "cache"))
    plots, bundle = tmp_path / "plots", tmp_path / "bundle.json"
    code = main(["tune", MODEL, "--example", EXAMPLE, "--batch-sizes", "1,2", "--rounds", "3",
                 "--plots", str(plots), "--export", str(bundle)])
    out = capsys.readouterr().out
    assert code == 0, out
    first_line = out.splitlines()[0]
    tuned = int(first_line.split()[0])
    assert tuned > 0 and "0 already in the tuning cache" in first_line
    assert "linear_cpu" in out and "fused_cpp" in out and "gain" in out
    assert "model forward: default configs" in out
    assert "batch" in out and "items/s" in out
    for name in ("configs.png", "batch_curve.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads(bundle.read_text())["entries"]) >= tuned

    monkeypatch.setattr("fxforge.autotune.session.search",
                        lambda *a, **k: pytest.fail("a warm cache must not measure"))
    code = main(["tune", MODEL, "--example", EXAMPLE, "--rounds", "3"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"0 kernel(s) to tune, {tuned} already in the tuning cache")


def test_tune_rejects_a_bad_factory(capsys):
    assert main(["tune", "fxforge.examples.small_gpt:nope", "--example", EXAMPLE]) == 2
    assert capsys.readouterr().err.strip() == "error: 'fxforge.examples.small_gpt' has no callable 'nope'"


def test_plots_without_matplotlib_is_refused_before_tuning(tmp_path, monkeypatch, capsys):
    """Checked first, not after a whole tuning run; the message names the extra to install."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # `import matplotlib` now fails
    monkeypatch.setattr("fxforge.tune.collect_tasks",
                        lambda *a, **k: pytest.fail("nothing may be tuned without matplotlib"))
    code = main(["tune", MODEL, "--example", EXAMPLE, "--plots", str(tmp_path / "plots")])
    err = capsys.readouterr().err
    assert code == 2 and "--plots" in err and "fxforge[tune]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "plots").exists()

"""``python -m fxforge tune``: a whole tuning run on the small GPT, then a warm second run."""
import json

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
    with pytest.raises(SystemExit, match="no callable"):
        main(["tune", "fxforge.examples.small_gpt:nope", "--example", EXAMPLE])

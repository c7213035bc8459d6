"""Hostile artifacts: loading one runs only fxforge's own code.

Each case (``hostile_cases.py``) starts from a real (tiny) artifact and rewrites its JSON as an
attacker would, hashes included. ``fxforge.load`` -- and ``python -m fxforge info`` for a
representative subset -- must refuse it with an ``ArtifactError``, and its payload must not have
run: no marker file, no planted module imported, the caller's input, the global RNG and grad
mode as they were.
"""
import subprocess
import sys

import pytest
import torch

import fxforge
from tests.fxforge.hostile_cases import CASES
from tests.fxforge.hostile_crafting import PLANTED_MODULE, Tiny, craft

# What each base artifact's model takes: the tiny model's float rows, the GPT's token ids.
EXAMPLES = {"tiny": lambda: torch.randn(2, 5, 8),
            "kv_gpt": lambda: torch.randint(0, 512, (2, 8))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile") / "tiny"
    seq = torch.export.Dim("seq", min=2, max=64)
    fxforge.aot_compile(Tiny().eval(), (torch.randn(2, 5, 8),), path, dynamic_shapes=({1: seq},))
    return path


@pytest.fixture
def build(request, tmp_path, monkeypatch):
    """``build(case)``: the crafted artifact's folder, the marker its payload would create, and
    the name of the base artifact it was made from."""
    def make(name):
        marker = tmp_path / "marker"
        hostile = CASES[name](tmp_path, marker, monkeypatch)
        base = request.getfixturevalue("tiny_gpt_artifact" if hostile.base == "kv_gpt" else "tiny")
        return craft(base, tmp_path / "art", hostile), marker, hostile.base
    return make


def test_the_suite_covers_at_least_fifteen_artifacts():
    """A guard on the table, not on behaviour: the acceptance asks for 15 crafted artifacts
    or more, and a case dropped from the table would otherwise go unnoticed."""
    assert len(CASES) >= 15, sorted(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_hostile_artifact_is_refused_without_side_effects(case, build):
    art, marker, base = build(case)
    x = EXAMPLES[base]()
    before, rng, grad_mode = x.clone(), torch.get_rng_state(), torch.is_grad_enabled()
    with pytest.raises(fxforge.ArtifactError):
        loaded = fxforge.load(art)
        loaded(x)   # payloads that would only run on a call run here (if the load let them by)
    assert not marker.exists(), f"{case}: the payload ran"
    assert PLANTED_MODULE not in sys.modules
    assert torch.equal(x, before)
    assert torch.equal(torch.get_rng_state(), rng), f"{case}: the global RNG was reseeded"
    assert torch.is_grad_enabled() == grad_mode


CLI_CASES = ["exec_target", "torch_load_pickle", "sympify_meta_shape", "sympify_input_shape",
             "manifest_dtype_class", "placeholder_name_injection", "treespec_enum_import",
             "aten_reseeds_the_global_rng", "input_named_torch"]


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return len(lines) == 1 and lines[0].startswith("error: artifact ") and "Traceback" not in stderr


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_info_refuses_a_hostile_artifact_in_one_line(case, build, capsys):
    from fxforge.__main__ import main
    art, marker, _ = build(case)
    assert main(["info", str(art)]) == 2
    captured = capsys.readouterr()
    assert _one_error_line(captured.err), captured.err
    assert captured.out == "" and not marker.exists()


def test_cli_info_in_a_fresh_process_exits_2_without_a_traceback(build):
    art, marker, _ = build("torch_load_pickle")
    result = subprocess.run([sys.executable, "-m", "fxforge", "info", str(art)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and _one_error_line(result.stderr), result.stderr
    assert not marker.exists()


def test_the_untouched_artifact_still_loads_and_runs(tiny):
    """The checks refuse what is hostile, not what fxforge itself writes."""
    loaded = fxforge.load(tiny)
    x = torch.randn(2, 7, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), Tiny().eval()(x), rtol=1e-4, atol=1e-4)

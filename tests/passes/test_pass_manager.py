"""The pass manager: registry, strict and lenient failure, verification between passes, stats."""
import logging

import pytest
import torch

from fxforge.irgraph import META_KEY, capture_export
from fxforge.passes import (Pass, PassError, PassManager, PassResult, default_pipeline, get_pass,
                            register_pass, registered_passes)


def _ir():
    return capture_export(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))


def _boom(ir):
    raise RuntimeError("boom")


def _corrupt(ir):
    node = ir.call_nodes()[0]
    node.meta[META_KEY] = None  # stale metadata: the verifier must catch it
    return PassResult(ir, {"corrupted": 1})


def test_registry_rejects_duplicates_and_unknown_names():
    assert {"dce", "cse", "constant_fold", "remove_noops"} <= set(registered_passes())
    with pytest.raises(ValueError, match="already registered"):
        register_pass("dce")(lambda ir: PassResult(ir))
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        get_pass("nope")
    assert default_pipeline({"passes": ["dce"]}) == ["dce"]


def test_strict_mode_names_the_failing_pass_and_those_before_it():
    manager = PassManager(["cse", Pass("boom", _boom), "dce"], verify_between=True, strict=True)
    with pytest.raises(PassError, match=r"pass 'boom' failed after \[cse\]: RuntimeError: boom"):
        manager.run(_ir())


def test_lenient_mode_skips_a_failing_pass_and_keeps_the_graph(caplog):
    ir = _ir()
    nodes_before = [(n.op, str(n.target)) for n in ir.gm.graph.nodes if n.op != "placeholder"]
    with caplog.at_level(logging.WARNING, logger="fxforge.passes"):
        out = PassManager([Pass("boom", _boom), "dce"], verify_between=False, strict=False).run(ir)
    assert "pass 'boom' failed" in caplog.text and "without it" in caplog.text
    assert [(n.op, str(n.target)) for n in out.gm.graph.nodes if n.op != "placeholder"] == nodes_before
    assert [s.name for s in out.info["passes"]] == ["boom", "dce"]
    assert out.info["passes"][0].error is not None


def _half_rewrite_then_boom(ir):
    """Rewrites the graph partway (every linear's output doubled), then fails."""
    for node in ir.call_nodes():
        with ir.gm.graph.inserting_after(node):
            doubled = ir.gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 2.0))
        node.replace_all_uses_with(doubled, delete_user_cb=lambda user: user is not doubled)
        break
    raise RuntimeError("boom halfway")


def test_passes_share_one_copy_and_a_failure_is_undone_by_replaying_without_it(caplog):
    seen = []

    def watch(ir):
        seen.append(ir)
        return PassResult(ir)
    ir = _ir()
    expected = PassManager(["cse", "dce"], verify_between=False, strict=False).run(ir)
    passes = ["cse", Pass("watch", watch), Pass("half", _half_rewrite_then_boom),
              Pass("watch_again", watch), "dce"]
    with caplog.at_level(logging.WARNING, logger="fxforge.passes"):
        out = PassManager(passes, verify_between=False, strict=False).run(ir)
    assert caplog.text.count("pass 'half' failed") == 1
    # one copy shared by the passes of a run: the first run's watch and the replay's two watches
    assert len(seen) == 3 and seen[1] is seen[2] and seen[0] is not seen[1]
    assert [s.name for s in out.info["passes"]] == ["cse", "watch", "half", "watch_again", "dce"]
    assert out.info["passes"][2].error is not None
    x = torch.randn(2, 4)
    torch.testing.assert_close(out.gm(x)[0], expected.gm(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(out.gm(x)[0], ir.gm(x)[0], rtol=0, atol=0)


def test_verification_between_passes_catches_stale_metadata():
    with pytest.raises(PassError, match="(?s)corrupt.*typed metadata"):
        PassManager([Pass("corrupt", _corrupt)], verify_between=True, strict=True).run(_ir())


def test_passes_never_modify_their_input_graph():
    ir = _ir()
    before = [(n.name, n.target) for n in ir.gm.graph.nodes]
    out = PassManager(default_pipeline({}), verify_between=True, strict=True).run(ir)
    assert [(n.name, n.target) for n in ir.gm.graph.nodes] == before
    assert out is not ir
    stats = out.info["passes"]
    assert [s.name for s in stats] == default_pipeline({})
    assert all(s.seconds >= 0 and s.nodes_after <= s.nodes_before for s in stats)


def test_the_input_graph_keeps_its_info_even_when_every_pass_fails():
    ir = _ir()
    out = PassManager([Pass("boom", _boom)], verify_between=False, strict=False).run(ir)
    assert "passes" not in ir.info
    assert out is not ir and [s.name for s in out.info["passes"]] == ["boom"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(out.gm(x)[0], ir.gm(x)[0], rtol=0, atol=0)

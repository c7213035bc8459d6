"""irgraph/op_compat.py: the ADInplaceOrView kernel that tolerates omitted mutated optional
arguments. torch 2.11's own kernel (``args[idx]`` for each mutated argument's schema position) is
re-created here, so the failure and the fix show on any torch."""
import pytest
import torch

import fxforge.irgraph  # noqa: F401  (registers torch.ops.fxforge.*)
from fxforge.irgraph.op_compat import omitted_mutated_args_fail, tolerate_omitted_mutated_args

OPS = {"cached_attention": torch.ops.fxforge.cached_attention.default,
       "cached_window_attention": torch.ops.fxforge.cached_window_attention.default}


def _torch_2_11_kernel(op):
    positions = [i for i, a in enumerate(op._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write]

    def kernel(keyset, *args, **kwargs):
        for i in positions:
            torch.autograd.graph.increment_version(args[i])   # IndexError past the given ones
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)
    return kernel


def _call(name):
    q, k, v = (torch.randn(1, 2, 1, 8) for _ in range(3))
    k_cache, v_cache = torch.zeros(1, 2, 16, 8), torch.zeros(1, 2, 16, 8)
    pos = torch.tensor([3])
    versions = (k_cache._version, v_cache._version)
    if name == "cached_attention":
        out = OPS[name](q, k, v, k_cache, v_cache, pos)
    else:
        out = OPS[name](q, k, v, k_cache, v_cache, pos, 12, 4)
    assert out.shape == q.shape
    assert k_cache[:, :, 3].equal(k[:, :, 0]) or name != "cached_attention"
    assert k_cache._version > versions[0] and v_cache._version > versions[1]


@pytest.mark.parametrize("name", list(OPS))
def test_omitted_scales_with_the_2_11_kernel_and_the_replacement(name):
    old = torch.library.Library("fxforge", "IMPL")
    registered = []
    try:
        try:   # on torch 2.11 op_compat's kernel is registered already: override it too
            old.impl(name, _torch_2_11_kernel(OPS[name]), "ADInplaceOrView", with_keyset=True,
                     allow_override=True)
        except TypeError:
            old.impl(name, _torch_2_11_kernel(OPS[name]), "ADInplaceOrView", with_keyset=True)
        with torch.inference_mode(False), pytest.raises(IndexError):
            _call(name)
        with torch.inference_mode():   # no ADInplaceOrView key there: it never failed
            OPS[name](*(torch.randn(1, 2, 1, 8) for _ in range(3)), torch.zeros(1, 2, 16, 8),
                      torch.zeros(1, 2, 16, 8), torch.tensor([0]),
                      *((12, 4) if name != "cached_attention" else ()))
        assert tolerate_omitted_mutated_args(OPS[name], force=True)
        from fxforge.irgraph import op_compat
        registered.append(op_compat._LIBRARIES.pop())
        _call(name)   # the scales left off: the replacement bumps what was passed
    finally:
        for library in registered + [old]:
            library._destroy()
    _call(name)   # this torch's own kernel (or the replacement on 2.11) is back


def test_the_probe_answers_for_this_torch():
    # torch 2.13 fills the defaults in; 2.11 does not. Either way the op must work afterwards.
    assert isinstance(omitted_mutated_args_fail(), bool)
    _call("cached_attention")

"""Custom-op workarounds for the older torch releases fxforge supports (``torch>=2.11``).

Mutated optional arguments (``fxforge::cached_attention``'s and ``cached_window_attention``'s
``k_scale``/``v_scale``): ``torch.library.custom_op`` registers an ADInplaceOrView kernel that
bumps the version counter of each mutated argument, found by its position in the schema. The
dispatcher hands a Python kernel its arguments with the trailing ones that equal their defaults
left off, and torch 2.11's kernel indexes them as they come: a call without the scales (every
fp16/bf16/fp32 cache) raises ``IndexError: tuple index out of range`` wherever the
ADInplaceOrView key is live, that is outside ``torch.inference_mode`` -- eager calls of the op,
fake-tensor propagation of a graph holding it (the KV-cache pass), and the compiled decode step.
Later releases fill the defaults in first (``utils.fill_defaults``).

:func:`tolerate_omitted_mutated_args` probes once whether this torch has the problem and, if so,
registers a replacement ADInplaceOrView kernel for the op that bumps the mutated arguments that
were passed and redispatches, as the original does.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

# Libraries holding the replacement kernels: a registration lives as long as its Library.
_LIBRARIES: list = []


@functools.lru_cache(maxsize=None)
def omitted_mutated_args_fail() -> bool:
    """True when this torch's custom-op ADInplaceOrView kernel fails on a mutated optional
    argument left at its default (torch 2.11); probed with a throwaway op, once."""
    @torch.library.custom_op("fxforge_compat::probe_optional_mutation", mutates_args=("out",))
    def probe(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x.clone()

    @probe.register_fake
    def _(x, out=None):
        return torch.empty_like(x)

    try:
        with torch.inference_mode(False):
            probe(torch.zeros(1))
    except IndexError:
        return True
    return False


def _kernel(op: torch._ops.OpOverload):
    arguments = op._schema.arguments
    written = [(i, a.name, a.kwarg_only) for i, a in enumerate(arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    after = torch._C._after_ADInplaceOrView_keyset

    def adinplaceorview(keyset, *args, **kwargs):
        for i, name, kwarg_only in written:
            value = kwargs.get(name) if kwarg_only or i >= len(args) else args[i]
            if isinstance(value, torch.Tensor):
                torch.autograd.graph.increment_version(value)
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return op.redispatch(keyset & after, *args, **kwargs)
    return adinplaceorview


def tolerate_omitted_mutated_args(op: torch._ops.OpOverload, *, force: bool = False) -> bool:
    """On a torch whose custom-op ADInplaceOrView kernel indexes past the arguments it was given
    (see the module docstring), register one for ``op`` that does not. ``force``: register it on
    any torch (tests). Returns whether a kernel was registered."""
    if not (force or omitted_mutated_args_fail()):
        return False
    namespace, name = op._schema.name.split("::")
    if op._overloadname not in ("", "default"):
        name = f"{name}.{op._overloadname}"
    library = torch.library.Library(namespace, "IMPL")
    try:
        library.impl(name, _kernel(op), "ADInplaceOrView", with_keyset=True, allow_override=True)
    except TypeError:   # a torch whose Library.impl has no allow_override
        library.impl(name, _kernel(op), "ADInplaceOrView", with_keyset=True)
    _LIBRARIES.append(library)
    return True

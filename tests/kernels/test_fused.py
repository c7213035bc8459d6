"""Fused pointwise/row-reduction kernels: generated C++ and Triton (interpreted) vs the group's
own GraphModule run on ATen, on random inputs, with the dtype's tolerance."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.irgraph import FUSIBLE, decomposition_table
from fxforge.irgraph.fusion import acts_on_last_dim
from fxforge.kernels.fused import Unsupported, build_program, reference
from fxforge.kernels.fused_cpp import compile_fused_cpu
from fxforge.kernels.fused_triton import compile_fused_triton
from fxforge.kernels.tuning import Config
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten
BACKENDS = {"cpp": compile_fused_cpu, "triton": compile_fused_triton}


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FXFORGE_CACHE_DIR", str(tmp_path_factory.mktemp("fxforge_cache")))
        yield


def group(fn, *example, mode="symbolic"):
    """Trace ``fn`` into a fusion group as the backend hands it over (checked against FUSIBLE);
    ``mode="fake"`` keeps sizes static (a last-dim cat needs its split point as a literal)."""
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode=mode)(*example)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert node.target in FUSIBLE or acts_on_last_dim(node), \
                f"{node.target} is outside the fusion contract"
    return gm


def check(backend, gm, *inputs, kernel=None):
    kernel = kernel or BACKENDS[backend](gm)
    got = kernel(*inputs)
    assert_close_to_eager(list(got), list(reference(gm, *inputs)))
    return kernel


def residual_chain(x, r, w):
    h = x + r * 0.5
    return (h * w - 1.0) / 3.0, torch.relu(h).neg().abs() + torch.sigmoid(h)


def activations(x):
    return (F.gelu(x), F.gelu(x, approximate="tanh"), F.silu(x), torch.tanh(x), torch.erf(x),
            x.clamp(-0.5, 0.7), torch.maximum(x, x.exp() - 2.0), x.pow(2) + x.pow(3),
            x.abs().pow(1.7), torch.sin(x) * torch.cos(x), torch.reciprocal(x.abs() + 1).log())


def hf_rmsnorm(x, w):
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + 1e-6)
    return w * h.to(w.dtype)


def layer_norm_three(x, r, w, b):
    return aten.native_layer_norm.default(x + r, [40], w, b, 1e-5)


def rotary(q, q_rotated, cos, sin):
    """HF's ``q * cos + rotate_half(q) * sin`` (rotate_half itself is a copy, not fused)."""
    return (q * cos + q_rotated * sin).to(torch.float16), q_rotated * cos - q * sin


CASES = {
    "residual_chain": (residual_chain, lambda: (torch.randn(5, 37), torch.randn(5, 37),
                                                torch.randn(37))),
    "activations": (activations, lambda: (torch.randn(4, 33),)),
    "softmax_log_softmax": (lambda x: (torch.softmax(x, -1), torch.log_softmax(x, -1)),
                            lambda: (torch.randn(2, 3, 19) * 4,)),
    "layer_norm_three_outputs": (lambda x, r, w, b: tuple(layer_norm_three(x, r, w, b)),
                                 lambda: (torch.randn(6, 40) + 3, torch.randn(6, 40),
                                          torch.randn(40), torch.randn(40))),
    "hf_rmsnorm_fp16": (hf_rmsnorm, lambda: (torch.randn(5, 24), torch.randn(24).half())),
    "hf_rmsnorm_bf16": (hf_rmsnorm, lambda: (torch.randn(5, 24), torch.randn(24).bfloat16())),
    "rotary_broadcast": (rotary, lambda: (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8),
                                          torch.randn(5, 8), torch.randn(1, 1, 5, 8))),
    "stats": (lambda x: (x.sum(-1), x.mean(-1, keepdim=True), x.amax(-1, keepdim=True),
                         x.amin(-1), x - x.mean(-1, keepdim=True)), lambda: (torch.randn(7, 21),)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_group_matches_eager(backend, case):
    fn, make_inputs = CASES[case]
    inputs = make_inputs()
    check(backend, group(fn, *inputs), *inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_softmax_with_minus_inf_and_bool_where(backend):
    def fn(scores, keep, neg_inf, additive):
        masked = torch.where(keep, scores, neg_inf)
        return torch.softmax(masked, -1), torch.softmax(scores + additive, -1)

    scores, keep = torch.randn(2, 4, 9), torch.rand(2, 4, 9) > 0.3
    keep[0, 1] = False                                   # a fully masked row: NaN, like eager
    additive = torch.zeros(1, 9).masked_fill(torch.rand(1, 9) > 0.6, float("-inf"))
    inputs = (scores, keep, torch.tensor(float("-inf")), additive)
    check(backend, group(fn, *inputs), *inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_casts_comparisons_and_int_inputs(backend):
    def fn(x, ids, flag):
        positive = x > 0.25
        counts = (ids + 3) * 2
        mixed = torch.where(torch.logical_and(positive, flag), x.to(torch.bfloat16), ids.to(torch.bfloat16))
        return (positive.to(torch.float32) * x, counts, mixed.to(torch.float32) + 1,
                (x * 10).to(torch.int32), x * torch.logical_not(flag), ids.lt(2), x.ne(0.5), x.gt(ids))

    x = torch.randn(3, 11)
    inputs = (x, torch.randint(-5, 5, (3, 11)), torch.rand(1, 11) > 0.5)
    check(backend, group(fn, *inputs), *inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_round_like_eager(backend):
    def fn(x, r, w, b):
        h = x + r
        y = F.layer_norm(h, (48,), w, b)
        return F.gelu(y) * 1.5, torch.softmax(h, -1), h.sum(-1)

    inputs = tuple(t.bfloat16() for t in (torch.randn(4, 48), torch.randn(4, 48),
                                          torch.randn(48), torch.randn(48)))
    check(backend, group(fn, *inputs), *inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_and_broadcast_inputs(backend):
    def fn(x, bias, scale):
        return torch.softmax(x * scale + bias, -1), x + bias

    x = torch.randn(13, 6).t()                 # non-contiguous, inner stride 6
    bias = torch.randn(6, 1)                   # broadcast along the last dim (a row value)
    scale = torch.randn(13).expand(6, 13)      # stride 0 in the row dim
    check(backend, group(fn, x, bias, scale), x, bias, scale)


def lift_sizes(gm):
    """Sizes read inside the traced function become SymInt inputs, as the fusion pass leaves
    ``sym_size`` outside the group."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for node in list(gm.graph.nodes):
        if node.target == aten.sym_size.int:
            with gm.graph.inserting_before(first):
                size = gm.graph.placeholder(f"size_{node.name}")
            size.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(size)
            gm.graph.erase_node(node)
    gm.recompile()
    return gm


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_kernel_two_runtime_shapes_with_symbolic_normalized_shape(backend):
    def fn(x, w):
        centered = x - x.mean(-1, keepdim=True)
        return F.layer_norm(x, (x.shape[-1],), w, None), F.silu(x) * w, centered

    gm = lift_sizes(make_fx(fn, decomposition_table=decomposition_table(),
                            tracing_mode="symbolic")(torch.randn(4, 16), torch.randn(16)))
    kernel = check(backend, gm, 16, torch.randn(4, 16), torch.randn(16))
    check(backend, gm, 50, torch.randn(7, 50), torch.randn(50), kernel=kernel)


def test_triton_looped_reductions_when_the_row_exceeds_the_block():
    gm = group(lambda x, w: (F.layer_norm(x, (37,), w, None), torch.softmax(x, -1),
                             x.amax(-1)), torch.randn(3, 37), torch.randn(37))
    inputs = (torch.randn(3, 37), torch.randn(37))
    check("triton", gm, *inputs,
          kernel=compile_fused_triton(gm, Config.of(num_warps=1, BLOCK_R=2, BLOCK_N=16)))


def rms_norm_group(dtype):
    """aten.rms_norm kept whole (as the IR keeps it), with a weight, built by hand."""
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    out = graph.call_function(aten.rms_norm.default, (x, [16], w, 1e-5))
    graph.output((out,))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        x.meta["val"] = mode.from_tensor(torch.empty(3, 16, dtype=dtype))
        w.meta["val"] = mode.from_tensor(torch.empty(16, dtype=dtype))
        out.meta["val"] = aten.rms_norm.default(x.meta["val"], [16], w.meta["val"], 1e-5)
    return gm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_aten_rms_norm(backend, dtype):
    inputs = (torch.randn(3, 16, dtype=dtype) * 3, torch.randn(16, dtype=dtype))
    check(backend, rms_norm_group(dtype), *inputs)


def test_long_rows_stay_within_fp32_tolerance():
    fn = lambda x: (x.sum(-1), torch.softmax(x, -1), F.layer_norm(x, (4096,)))  # noqa: E731
    inputs = (torch.randn(8, 4096) + 1.0,)
    check("cpp", group(fn, *inputs), *inputs)


def test_unsupported_groups_are_refused_with_a_reason():
    with pytest.raises(Unsupported, match="only the last dim"):
        build_program(group(lambda x: x.sum(0), torch.randn(4, 5)))
    gm = make_fx(lambda a, b: torch.mm(a, b) + 1)(torch.randn(3, 3), torch.randn(3, 3))
    with pytest.raises(Unsupported, match="not a fused-kernel op"):
        compile_fused_cpu(gm)
    with pytest.raises(Unsupported, match="neither the iteration shape"):
        build_program(group(lambda x, w: (x + w, w * 2), torch.randn(3, 4), torch.randn(4)))
    with pytest.raises(Unsupported, match="dtype"):
        build_program(group(lambda x: x * 2, torch.randn(3, dtype=torch.float64)))


def test_signature_is_stable_and_dtype_sensitive():
    a = build_program(group(activations, torch.randn(4, 8)))
    b = build_program(group(activations, torch.randn(6, 3)))
    c = build_program(group(activations, torch.randn(4, 8).bfloat16()))
    assert a.signature() == b.signature() and a.digest() == b.digest()
    assert a.digest() != c.digest()
    assert build_program(group(lambda x: torch.softmax(x, -1), torch.randn(2, 5))).reductions()


def float_sweep() -> torch.Tensor:
    """~1e6 floats: every 7000th bit pattern (all exponents: denormals, inf, nan), a dense
    linear sweep of [-12, 12], and the edges of each function's branches."""
    bits = torch.arange(0, 2**32, 7000, dtype=torch.int64)
    spread = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45,
                          1.17549435e-38, 88.72283, 88.7229, -87.33654, -103.972, -104.5, 89.0,
                          -80.0, 0.625, 1.5, 3.93, 9.1, 1e-30])
    return torch.cat([spread, torch.linspace(-12, 12, 400_001), edges, -edges])


def ulp_error(got: torch.Tensor, x: torch.Tensor, exact) -> torch.Tensor:
    """|got - exact(x)| in units of the float32 spacing at the exact value (0 where both are the
    same inf or both nan; inf where only one is)."""
    ref = exact(x.double())
    ref32 = ref.float()
    spacing = (torch.nextafter(ref32.abs(), torch.tensor(float("inf"))) - ref32.abs()).double()
    spacing = spacing.where(ref32.abs() < torch.finfo(torch.float32).max, torch.tensor(2.0**104))
    err = ((got.double() - ref).abs() / spacing).nan_to_num(float("inf"), float("inf"))
    agree = (got.isnan() & ref32.isnan()) | (got.isinf() & (got == ref32))
    return err.where(~agree, torch.zeros(()))


MATH_BOUNDS = {   # max ulp error of the generated math vs float64 over float_sweep()
    "exp": (torch.exp, 1.0), "log": (torch.log, 1.0), "tanh": (torch.tanh, 1.5),
    "erf": (torch.erf, 2.0), "sigmoid": (torch.sigmoid, 2.0),
}


def test_vectorized_math_is_within_2_ulp_over_the_float_range():
    x = float_sweep()
    fns = [f for f, _ in MATH_BOUNDS.values()] + [F.silu]
    kernel = compile_fused_cpu(group(lambda t: tuple(f(t) for f in fns), x[:8]))
    got = kernel(x)
    for (name, (fn, bound)), out in zip(MATH_BOUNDS.items(), got):
        worst = ulp_error(out, x, fn)
        assert worst.max() <= bound, f"{name}: {worst.max():.2f} ulp at x={x[worst.argmax()]}"
        assert worst.max() > 0, f"{name}: bit-exact everywhere is implausible (sweep broken?)"
    silu = got[-1]
    normal = x > -87.0   # below, exp(-x) overflows and eager (same formula) returns -0 too
    exact_silu = lambda d: d * torch.sigmoid(d)   # noqa: E731
    assert ulp_error(silu[normal], x[normal], exact_silu).max() <= 2.0
    assert_close_to_eager(silu, F.silu(x))


def test_softmax_computes_exp_once_per_element():
    gm = group(lambda s, m: torch.softmax(s * 0.125 + m, -1), torch.randn(2, 3, 16),
               torch.randn(1, 1, 16))
    kernel = compile_fused_cpu(gm)
    body = kernel.source.split('extern "C"')[1]
    assert body.count("fxf_exp(") == 2   # one loop each in the contiguous and strided variants
    inputs = (torch.randn(2, 3, 16) * 4, torch.randn(1, 1, 16))
    check("cpp", gm, *inputs, kernel=kernel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_0d_tensor_input_is_read_once_per_row(backend):
    """An epsilon held as a 0-d tensor (as ONNX exporters write it) is the same for every row:
    the ``1 / sqrt`` after it runs per row, and the contiguous fast path still applies."""
    from fxforge.kernels.row_program import ROW
    def rms_norm(x, eps, w):
        return w * (x * torch.reciprocal(torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)))
    inputs = (torch.randn(6, 24), torch.tensor(1e-5), torch.randn(24))
    gm = group(rms_norm, *inputs)
    program = build_program(gm)
    levels = {v.op: v.level for v in program.values if v.op in ("sqrt", "reciprocal")}
    assert levels and set(levels.values()) == {ROW}, program.signature()
    kernel = check(backend, gm, *inputs)
    if backend == "cpp":   # only the per-element inputs decide the fast path: x and w
        assert "const bool fast = s0 == 1 && s2 == 1;" in kernel.source


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_rotary(q, cos, sin):
    """HF Llama's ``apply_rotary_pos_emb`` for one tensor, rotate_half included."""
    return q * cos + rotate_half(q) * sin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cos_shape", [(1, 1, 5, 8), (5, 8)])
def test_rotary_with_rotate_half_on_transposed_q(backend, cos_shape):
    q = torch.randn(2, 5, 3, 8).transpose(1, 2)   # [B, H, T, D] from [B, T, H, D]
    cos, sin = torch.randn(cos_shape), torch.randn(cos_shape)
    gm = group(hf_rotary, q, cos, sin, mode="fake")
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {aten.slice.Tensor, aten.cat.default, aten.neg.default} <= ops
    check(backend, gm, q, cos, sin)
    check(backend, gm, q.contiguous(), cos, sin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cat_of_three_slices_with_computed_source(backend):
    def shuffle(x, w):
        h = torch.exp(x) * w
        return torch.cat((h[..., 4:6], -h[..., :4], h[..., 6:]), dim=-1) + x

    x, w = torch.randn(3, 10), torch.randn(10)
    check(backend, group(shuffle, x, w, mode="fake"), x, w)


def test_generated_triton_globals_equal_themselves():
    """Compiled Triton (not the interpreter) checks at each launch that every global constexpr a
    kernel names still equals the value it was compiled with; a NaN never equals itself, so a
    NaN global made every launch fail on a GPU."""
    import triton.language as tl
    from fxforge.kernels.fused_triton import HEADER
    namespace: dict = {}
    exec(compile(HEADER, "<fused_triton header>", "exec"), namespace)
    constexprs = {k: v for k, v in namespace.items() if isinstance(v, tl.constexpr)}
    assert constexprs, "the header defines no constexpr globals: this test checks nothing"
    for name, value in constexprs.items():
        assert value.value == value.value, f"global {name} = {value.value!r} never equals itself"

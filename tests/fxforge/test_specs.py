"""``--example`` input specs: every malformed spec is one clear InputSpecError, never a traceback."""
import random

import pytest
import torch

from fxforge.__main__ import main
from fxforge.errors import InputSpecError
from fxforge.irgraph.safe_parse import ParseError
from fxforge.specs import TensorSignature, export_dynamic_shapes, parse_spec

MALFORMED = [
    "int3[1,8]", "int64[1,seq=8:9..4]", "int64[1,seq=8:2..4]", "int64[1,seq=1:2..4]", "int64[1,8",
    "int641,8]", "[1,8]", "float32", "float32[]{0..1}", "float32[2]{0..3}", "bool[2]{0..1}",
    "int64[1,8]{5..2}", "int64[1,8]{3..3}", "int8[4]{0..1000}", "uint8[4]{-1..10}",
    "int64[1,8]{0..99999999999999999999}", "float32[99999999999999999999,2]",
    "float32[65536,65536]", "int64[2,1x=4]", "int64[2,seq=4,seq=5]", "int64[seq=4:2..8,seq=4:2..9]",
    "int64[seq=-4]", "int64[-4]", "int64[seq=4:2..]", "int64[seq=4:..8]", "int64[seq=4:8..2]",
    "int64[1.5]", "int64[1,8]{0..}", "int64[1,8]{a..b}", "__class__[1]", "Tensor[1]", "uint64[2]",
    "float8_e4m3fn[2]", "int64[seq=]", "int64[=4]", "int64[seq=4:2..4:8]", "int64[1;8]",
    "int64[1,8]{0..4}{0..4}", "int64[1,seq=3:2..2147483648]", "",
]


@pytest.mark.parametrize("text", MALFORMED)
def test_a_malformed_spec_is_an_input_spec_error(text):
    with pytest.raises(InputSpecError, match="bad input spec"):
        parse_spec(text)


def test_good_specs_parse_and_make_their_examples():
    spec = parse_spec("int64[1,seq=16:2..512]{0..1000}")
    example = spec.example(torch.Generator().manual_seed(0))
    assert example.shape == (1, 16) and example.dtype == torch.int64 and int(example.max()) < 1000
    assert export_dynamic_shapes([spec])[0][1].__name__ == "seq"
    assert parse_spec("bool[3]").example(torch.Generator()).dtype == torch.bool
    assert parse_spec("int64[seq=4:2..8,seq=4:2..8]").dims[0] == parse_spec("int64[seq=4:2..8]").dims[0]


def test_random_mutations_either_parse_into_usable_specs_or_are_input_spec_errors():
    """A fuzz over character edits of good specs: no other exception escapes, and whatever is
    accepted makes its example tensor and its export dims."""
    rng = random.Random(15)
    seeds = ["int64[1,seq=16:2..512]{0..1000}", "float32[2,8]", "bool[3,n=4:1..9]", "int8[2]{-5..5}"]
    alphabet = "[]{}.,:=0123456789-_ abcfilnstxz"
    for _ in range(600):
        text = list(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            edit = rng.choice(("insert", "delete", "replace"))
            if edit == "insert":
                text.insert(i, rng.choice(alphabet))
            elif text and i < len(text):
                if edit == "delete":
                    del text[i]
                else:
                    text[i] = rng.choice(alphabet)
        text = "".join(text)
        try:
            spec = parse_spec(text)
        except InputSpecError:
            continue
        if spec.dims and 0 < torch.Size([d.size for d in spec.dims]).numel() <= 1 << 16:
            spec.example(torch.Generator().manual_seed(0))
        export_dynamic_shapes([spec])


@pytest.mark.parametrize("example", ["int3[1,8]", "int64[1,seq=8:9..4]{0..512}"])
def test_the_cli_reports_a_bad_spec_in_one_line_with_exit_code_2(example, capsys):
    code = main(["compile", "fxforge.examples.small_gpt:make_model", "--example", example,
                 "-o", "unused"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: bad input spec") and len(err.strip().splitlines()) == 1


def test_a_signature_reads_its_sizes_without_evaluating_them():
    sig = TensorSignature.from_json({"name": "x", "dtype": "int64", "shape": ["2", "seq", "2*seq + 1"]})
    assert sig.dtype == torch.int64 and sig.shape[0] == 2 and str(sig.shape[2]) == "2*seq + 1"
    assert TensorSignature.from_json(sig.to_json()) == sig
    for bad in ({"name": "x", "dtype": "__class__", "shape": ["2"]},
                {"name": "x", "dtype": "int64", "shape": ["__import__('os').getpid()"]},
                {"name": "x=open('f')", "dtype": "int64", "shape": ["2"]},
                {"name": "x", "dtype": "int64", "shape": [2]}, {"name": "x", "dtype": "int64"},
                ["x", "int64", ["2"]]):
        with pytest.raises(ParseError):
            TensorSignature.from_json(bad)

"""Test set-up: the IR verifier runs around every pass (as TVM does), with fresh seeds."""
import os
import random

import pytest
import torch

os.environ.setdefault("FXFORGE_VERIFY", "1")
# Tests compile what they check: a graph-cache hit would skip the passes a test patches or
# inspects. The graph cache's own tests turn it on, with their own cache folder.
os.environ.setdefault("FXFORGE_GRAPH_CACHE", "0")


def pytest_report_header(config):
    return f"fxforge tests: FXFORGE_VERIFY={os.environ['FXFORGE_VERIFY']}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def _fresh_seed_and_dynamo(request):
    """A fresh (but reported) seed per test, and a clean dynamo cache between tests."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[fxforge] {item.nodeid} ran with torch.manual_seed({value})")

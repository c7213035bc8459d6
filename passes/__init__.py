"""Graph -> graph passes over fxforge's IR, and the pass manager that runs them."""
from fxforge.passes.base import (Pass, PassError, PassManager, PassResult, PassStats, get_pass,
                                 register_pass, registered_passes, verify_enabled)
from fxforge.irgraph.pattern import ANY, Lit, Match, Op, Pat, PatternMatcher, graph_rewrite
from fxforge.passes import (attention, cleanup, constfold, epilogue, fusion, horizontal,  # noqa: F401
                            precision)  # (registering the passes)
from fxforge.passes.pipeline import default_pipeline

__all__ = ["ANY", "Lit", "Match", "Op", "Pass", "PassError", "PassManager", "PassResult", "PassStats",
           "Pat", "PatternMatcher", "default_pipeline", "get_pass", "graph_rewrite", "register_pass",
           "registered_passes", "verify_enabled"]

"""Graph -> graph passes over fxforge's IR, and the pass manager that runs them."""
from fxforge.passes.base import (Pass, PassError, PassManager, PassResult, PassStats, get_pass,
                                 register_pass, registered_passes, verify_enabled)
from fxforge.passes.pattern import Match, Rewrite, RuleTable
from fxforge.passes import (attention, cleanup, constfold, epilogue, fusion, horizontal,  # noqa: F401
                            precision)  # (registering the passes)
from fxforge.passes.pipeline import default_pipeline

__all__ = ["Match", "Pass", "PassError", "PassManager", "PassResult", "PassStats", "Rewrite",
           "RuleTable", "default_pipeline", "get_pass", "register_pass", "registered_passes",
           "verify_enabled"]

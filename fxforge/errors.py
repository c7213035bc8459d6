"""fxforge's user-facing errors: each names the problem it reports."""


class FxforgeError(Exception):
    """Base class of fxforge's errors."""


class OptionsError(FxforgeError, ValueError):
    """An unknown compile option, or a bad value for one."""


class VerificationError(FxforgeError, AssertionError):
    """``verify=True``: the compiled graph disagreed with eager execution."""


class ArtifactError(FxforgeError):
    """An AOT artifact is missing a file, was modified, or was built by other versions."""


class InputSpecError(FxforgeError, ValueError):
    """Inputs that do not match what the artifact was compiled for."""


class SessionInUseError(FxforgeError, RuntimeError):
    """A ``fxforge.Session`` was called (or closed) while another call was running in it."""


class WeightsChangedError(FxforgeError, RuntimeError):
    """A weight changed after a quantized compile (its codes would be stale), and the compile
    did not ask to re-quantize on change (``requantize_on_change``)."""


class TensorParallelError(FxforgeError, ValueError):
    """A model that cannot be split over the ranks asked for (a dimension that does not divide,
    weights that do not fit), or a tensor-parallel compile without a process group to run on."""

"""fastdelta: DELTA transfer learning (feature maps with supervised attention) and its baselines."""
from ._version import __version__
from .attention.measure import compute_attention
from .attention.weights import ChannelAttention, normalize_attention
from .fitting import fit
from .inference import load
from .methods import METHODS, Method, register
from .networks.models import DEFAULT_LAYERS, ModelError
from .output_files import OutputError
from .own_loop import FeatureMapRegularizer, SourcePull, channel_attention
from .result import FitResult
from .settings import FitSettings, SettingsError
from .train.loop import NonFiniteLossError
from .train.preempt import Preempted

# the applications (fastdelta.apps) load on first use, so that `import fastdelta` is the library only
_FROM_APPS = ("compare", "CompareSettings")


def __getattr__(name: str):
    if name in _FROM_APPS:
        from .apps.compare import CompareSettings, compare
        globals().update(compare=compare, CompareSettings=CompareSettings)  # later look-ups do not come here
        return globals()[name]
    raise AttributeError(f"module 'fastdelta' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_FROM_APPS))


__all__ = ["fit", "load", "compute_attention", "compare", "CompareSettings", "FitResult", "FitSettings",
           "ChannelAttention", "METHODS", "Method", "register", "DEFAULT_LAYERS", "FeatureMapRegularizer", "SourcePull",
           "channel_attention", "NonFiniteLossError", "ModelError", "SettingsError", "normalize_attention",
           "OutputError", "Preempted", "__version__"]

"""fastdelta: DELTA transfer learning (feature maps with supervised attention) and its baselines."""
from .apps.compare import CompareSettings, compare
from .attention.measure import compute_attention
from .attention.weights import ChannelAttention, normalize_attention
from .fitting import fit
from .methods import METHODS, Method, register
from .networks.models import DEFAULT_LAYERS, ModelError
from .output_files import OutputError
from .own_loop import FeatureMapRegularizer, SourcePull, channel_attention
from .result import FitResult
from .settings import FitSettings, SettingsError
from .train.loop import NonFiniteLossError
from .train.preempt import Preempted

__version__ = "0.1.0"
__all__ = ["fit", "compute_attention", "compare", "CompareSettings", "FitResult", "FitSettings", "ChannelAttention",
           "METHODS", "Method", "register", "DEFAULT_LAYERS", "FeatureMapRegularizer", "SourcePull",
           "channel_attention", "NonFiniteLossError", "ModelError", "SettingsError", "normalize_attention",
           "OutputError", "Preempted", "__version__"]

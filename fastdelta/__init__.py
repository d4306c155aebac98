"""fastdelta: DELTA transfer learning (feature maps with supervised attention) and its baselines."""
from .attention import ChannelAttention, normalize_attention
from .engine import NonFiniteLossError
from .fit import attention, fit
from .models import DEFAULT_LAYERS, ModelError
from .result import FitResult
from .settings import METHODS, FitSettings, SettingsError

__version__ = "0.1.0"
__all__ = ["fit", "attention", "FitResult", "FitSettings", "ChannelAttention", "METHODS", "DEFAULT_LAYERS",
           "NonFiniteLossError", "ModelError", "SettingsError", "normalize_attention", "__version__"]

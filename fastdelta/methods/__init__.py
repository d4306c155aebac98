"""The methods of the DELTA paper, one class each, and what they are built from.

- base: the Method base class, its loss terms and optimizer pulls, and the registry;
- parameter_norm: L2-FE, L2, L2-SP, L2-SP(ATT); feature_map: DELTA w/o ATT, DELTA;
- taps: which tensor a regularised layer contributes (the feature-map forms) and hooks that read it;
- attention: channel attention (Algorithm 1), with attention_cache keeping results on disk;
- blocks: DELTA's regulariser, Algorithm 1 and the L2-SP pull for a training loop of one's own.
"""
from .base import METHODS, Method, Pull, Terms, make_method, method_class, register  # noqa: F401
from .feature_map import Delta, DeltaNoAtt  # noqa: F401
from .parameter_norm import L2, L2FE, L2SP, L2SPAtt  # noqa: F401  (registers them in the paper's order)

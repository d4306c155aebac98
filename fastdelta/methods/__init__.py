"""The methods of the DELTA paper, one class each, and what they are built from.

- base: the Method base class, its loss terms and optimizer pulls, and the registry;
- parameter_norm: L2-FE, L2, L2-SP, L2-SP(ATT); feature_map: DELTA w/o ATT, DELTA;
- delta_term: DELTA's feature-map term (scale forms, layer scale, DDP sum scale), shared with
  fastdelta.own_loop.FeatureMapRegularizer.

Channel attention (Algorithm 1), which DELTA and L2-SP(ATT) take their weights from, is not a method:
it is fastdelta.attention. The feature maps are read in fastdelta.features. fastdelta.own_loop builds
DELTA's regulariser, Algorithm 1 and the L2-SP pull for a loop of one's own from these.
"""
from .base import METHODS, Method, Pull, Terms, make_method, method_class, register  # noqa: F401
# registration order is the paper's table order: parameter norms first, then the feature-map methods
from .parameter_norm import L2, L2FE, L2SP, L2SPAtt  # noqa: F401  (isort: skip)
from .feature_map import Delta, DeltaNoAtt  # noqa: F401  (isort: skip)

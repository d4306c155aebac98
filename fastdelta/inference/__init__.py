"""Using a finished run: fastdelta.load(run_dir) gives a FineTunedModel (network, classes, eval transform)
that predicts, evaluates on a labelled test set and exports to TorchScript, ONNX or torch.export."""
from .errors import (ClassMismatchError, ExportDependencyError, ExportError, InferenceError, InputError,
                     RunFolderError, WeightsMismatchError)
from .metrics import Evaluation
from .model import FineTunedModel, load
from .predictions import Prediction

__all__ = ["load", "FineTunedModel", "Prediction", "Evaluation", "InferenceError", "RunFolderError",
           "WeightsMismatchError", "ClassMismatchError", "InputError", "ExportError", "ExportDependencyError"]

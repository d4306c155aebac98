"""torch.fx feature extractors: timm's wrapper for timm models (it knows timm's leaf modules), else
torchvision's; and the node whose value a model returns (its logits)."""
from __future__ import annotations

import torch.nn as nn


def is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def trace_extractor(model: nn.Module, return_nodes: dict):
    """torch.fx feature extractor (timm's wrapper for timm models: it knows timm's leaf modules)."""
    if is_timm_model(model):
        from timm.models._features_fx import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return create_feature_extractor(model, return_nodes)


def output_node_name(model: nn.Module) -> str:
    """The qualified name of the node whose value the model returns (the logits)."""
    if is_timm_model(model):
        from timm.models._features_fx import get_graph_node_names
    else:
        from torchvision.models.feature_extraction import get_graph_node_names
    train_nodes, _ = get_graph_node_names(model)
    return train_nodes[-1]

"""Reading feature maps, of the target and of the frozen source network, wherever they are needed
(the training steps, the methods, FeatureMapRegularizer, fit's source energy, `compare`).

- forms: which tensor a regularised layer contributes ("conv", "relu_conv", "activation");
- hooks: FeatureTaps, forward hooks that record the maps during a full forward;
- tracing: torch.fx extractors (timm's or torchvision's) and the node that returns the logits;
- bn_folding: eval-mode BN folded into the conv before it, where that leaves every tap as it was;
- source: the frozen source reduced to its maps (fx-traced, truncated, BN-folded; HookedSource when
  fx cannot trace it) and its batch-statistics copy (source_bn="batch");
- target: the target's logits and maps from an fx extractor, without hooks (the fast step).

Nothing here imports the rest of fastdelta: the methods and the steps build on it.
"""

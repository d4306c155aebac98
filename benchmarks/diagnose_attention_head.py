"""Diagnostic for the 32 px reproduction: train the L2-FE head that attention is measured against for
300 instead of 30 iterations (attention_head_epochs=100), then DELTA 10/class seed 0; writes
diagnose_attention_head.json. Result: benchmarks/results/reproduction_fashion_mnist_cpu_2026-11-26/."""
import json, time
import fastdelta
from fastdelta.data.fashion_mnist import few_shot_subset, load_fashion_mnist
from fastdelta.apps.compare.evaluation import fast_top1, materialise
from fastdelta.data import resolve_data
train = few_shot_subset(*load_fashion_mnist("train"), 10, 0)
test = load_fashion_mnist("test")
common = dict(weights="imagenet", iterations=100, batch_size=32, lr=0.01, beta=0.01, resize=37, crop=32, seed=0, progress=False)
out = {}
t0 = time.time()
att = fastdelta.compute_attention("efficientnet_lite0", train, attention_head_epochs=100, **common)
out["head"] = att.head
d = resolve_data(train, test, resize=37, crop=32)
ts = materialise(d.test, d.classes)
for alpha in (1e-4,):
    res = fastdelta.fit("efficientnet_lite0", train, None, method="delta", alpha=alpha, attention=att, **common)
    out[f"delta_alpha{alpha}"] = fast_top1(res.model, ts)
out["seconds"] = round(time.time() - t0, 1)
from fastdelta.environment import environment
out["environment"] = environment()
print(json.dumps(out))
json.dump(out, open("diagnose_attention_head.json", "w"), indent=1)

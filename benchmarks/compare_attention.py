"""Agreement of two channel_attention.json files (e.g. exact vs first-order, fp32 vs bf16):
Spearman rank correlation of the raw loss increases and overlap of the top 10% channels, per layer.

    fastdelta demo --out runs/exact
    fastdelta demo --methods delta --attention-impl first_order --out runs/first_order
    python benchmarks/compare_attention.py runs/exact/channel_attention.json runs/first_order/channel_attention.json
"""
import json
import sys

from fastdelta.attention.weights import ChannelAttention, spearman, top_overlap


def compare(path_a: str, path_b: str) -> list:
    a, b = ChannelAttention.load(path_a), ChannelAttention.load(path_b)
    if a.layers != b.layers:
        raise SystemExit(f"different layers: {a.layers} vs {b.layers}")
    return [{"layer": l, "channels": len(ra), "spearman": round(spearman(ra, rb), 4),
             "top10_overlap": round(top_overlap(ra, rb), 3)} for l, ra, rb in zip(a.layers, a.raw, b.raw)]


if __name__ == "__main__":
    for row in compare(sys.argv[1], sys.argv[2]):
        print(json.dumps(row))

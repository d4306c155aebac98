"""Mutation check of the convention code: does the test suite notice when a convention is miswired?

Each mutant is one textual change to a package file (a short exact snippet, which must occur exactly
once) and the few fast tests that must fail under it. For each mutant the script applies the change,
runs those tests in a subprocess, restores the file byte for byte (also on Ctrl-C), and records
"killed" (the tests failed) or "survived" (they passed). Every mutant should be killed. The killing
tests are first run once on the unchanged code: they must pass there, or no kill means anything.

    python3 benchmarks/mutants.py                          # every mutant; prints a Markdown table
    python3 benchmarks/mutants.py --only source_bn_ignored --json mutants.json
    python3 benchmarks/mutants.py --list

The files are edited in place while the tests run: other test runs in the same checkout see the
mutant meanwhile.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIRING = "tests/test_fit_wiring.py::"


@dataclass
class Mutant:
    name: str
    file: str            # relative to the repository root
    original: str        # exact text, found exactly once
    replacement: str
    tests: List[str]     # pytest node ids that must fail under the mutant


MUTANTS = [
    # fitting.py, the feature-map methods and attention/measure.py: settings that fit must hand on
    Mutant("head_bn_always_frozen", "fastdelta/attention/measure.py", "extractor_bn=s.attention_head_bn)",
           'extractor_bn="frozen")', [WIRING + "test_attention_head_bn_reaches_the_head_training[train]"]),
    Mutant("head_bn_always_train", "fastdelta/attention/measure.py", "extractor_bn=s.attention_head_bn)",
           'extractor_bn="train")', [WIRING + "test_attention_head_bn_reaches_the_head_training[frozen]"]),
    Mutant("source_bn_ignored", "fastdelta/methods/feature_map.py",
           'return source if self.source_bn == "running" else batch_statistics_copy(source)',
           "return source",
           [WIRING + "test_source_bn_decides_the_statistics_of_the_source_maps[reference]"]),
    Mutant("energy_scale_doubled", "fastdelta/methods/delta_term.py", "self.layer_scale = [1.0 / e if e > 0",
           "self.layer_scale = [2.0 / e if e > 0",
           [WIRING + "test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer[running]"]),
    Mutant("energy_scale_not_inverted", "fastdelta/methods/delta_term.py", "self.layer_scale = [1.0 / e if e > 0",
           "self.layer_scale = [e if e > 0",
           [WIRING + "test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer[running]"]),
    Mutant("energy_doubled", "fastdelta/methods/feature_map.py", "energy = [t / n for t in totals]",
           "energy = [2 * t / n for t in totals]",
           [WIRING + "test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer[running]"]),
    Mutant("energy_not_per_image", "fastdelta/methods/feature_map.py", "energy = [t / n for t in totals]",
           "energy = totals",
           [WIRING + "test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer[running]"]),
    Mutant("energy_on_running_source", "fastdelta/fitting.py", "record = reg.prepare(feature_source,",
           "record = reg.prepare(nets.source,",
           [WIRING + "test_source_energy_is_the_mean_source_term_per_image_and_divides_each_layer[batch]"]),
    Mutant("attention_sample_first_images", "fastdelta/attention/measure.py",
           "return torch.randperm(total, generator=g)[:n].tolist()", "return list(range(n))",
           ["tests/test_attention_wiring.py::test_attention_sample_is_seeded_the_same_everywhere_and_all_means_all"]),
    # the attention cache: keyed on the head's training data, not only on the images the ablation samples
    Mutant("cache_key_without_head_data", "fastdelta/attention/measure.py",
           "key = attention_key(nets.target, head_data_digest(data.train), batches,",
           'key = attention_key(nets.target, "", batches,',
           ["tests/test_attention_wiring.py::"
            "test_two_training_sets_that_share_only_the_measured_images_share_no_cache_entry[arrays]"]),
    Mutant("cache_trusts_label_fingerprint", "fastdelta/attention/cache.py",
           "inner = dataset.dataset if isinstance(dataset, UserDatasetAdapter) else dataset", "inner = dataset",
           ["tests/test_attention_wiring.py::"
            "test_two_training_sets_that_share_only_the_measured_images_share_no_cache_entry[dataset]"]),
    # the search: each fold's attention from its fit part only (the validation images would leak)
    Mutant("search_attention_on_whole_train", "fastdelta/apps/compare/search.py",
           "runner.attention(fit_part, seed) if uses_attention", "runner.attention(train, seed) if uses_attention",
           ["tests/test_compare.py::test_each_folds_attention_sees_only_that_folds_training_part[3]"]),
    # the DELTA term's gradient reaches the target network
    Mutant("delta_target_maps_detached", "fastdelta/methods/delta_term.py",
           "total = feature_map_term(target_feats, source_feats,",
           "total = feature_map_term([f.detach() for f in target_feats], source_feats,",
           ["tests/test_regularizers.py::"
            "test_delta_term_gradient_reaches_the_target_and_matches_float64_autograd[delta]"]),
    # Algorithm 1: removing a channel that matters raises the loss (the closed form, the default on ResNets)
    Mutant("loss_increase_sign_flipped", "fastdelta/attention/loss_increase.py",
           "increase = per_sample_loss(head(masked.flatten(0, 1)), y.repeat(k)).view(k, b) - base",
           "increase = base - per_sample_loss(head(masked.flatten(0, 1)), y.repeat(k)).view(k, b)",
           ["tests/test_attention.py::test_removing_the_channel_that_decides_increases_the_loss[prefix]"]),
    # recipes
    Mutant("public_recipe_activation_maps", "fastdelta/settings.py", '"public": dict(feature_map="conv",',
           '"public": dict(feature_map="activation",',
           ["tests/test_recipes.py::test_recipes_fill_only_what_is_left_unset"]),
    Mutant("paper_recipe_head_bn_train", "fastdelta/settings.py",
           'attention_head_bn="frozen", attention_head_batch_size=None',
           'attention_head_bn="train", attention_head_batch_size=None',
           ["tests/test_recipes.py::test_recipes_fill_only_what_is_left_unset"]),
    # taps: which tensor a layer contributes
    Mutant("relu_conv_without_relu", "fastdelta/features/forms.py", 'return feature_map != "conv"',
           'return feature_map == "activation"',
           ["tests/test_regularizers.py::test_terms_match_float64_reference[delta_no_att-relu_conv]"]),
    Mutant("conv_with_relu", "fastdelta/features/forms.py", 'return feature_map != "conv"', "return True",
           ["tests/test_regularizers.py::test_terms_match_float64_reference[delta_no_att-conv]"]),
    Mutant("activation_tap_rectified_late", "fastdelta/features/hooks.py",
           "self._store[name] = torch.relu(output) if self.rectify else output", "self._store[name] = output",
           ["tests/test_recipes.py::test_activation_taps_hold_the_bn_output_before_the_in_place_residual_add"]),
    # scaling of the feature-map term
    Mutant("public_scale_without_c", "fastdelta/methods/delta_term.py",
           'c * W.float() / (h * w) if delta_scale == "public"', 'W.float() / (h * w) if delta_scale == "public"',
           ["tests/test_regularizers.py::test_terms_match_float64_reference[delta-conv]"]),
    Mutant("paper_per_image_halved", "fastdelta/methods/delta_term.py", "per_image = 2.0 / (b * world_size)",
           "per_image = 1.0 / (b * world_size)",
           ["tests/test_regularizers.py::test_paper_forms_are_equations_5_and_8[delta-conv]"]),
    Mutant("paper_energy_not_a_sum", "fastdelta/methods/delta_term.py",
           "e * f.shape[0] * self.world_size if self.per_image_form() else e", "e",
           ["tests/test_regularizers.py::test_paper_source_energy_is_per_image_too"]),
    # attention normalisation
    Mutant("zscore_unbiased_std", "fastdelta/attention/weights.py", "std = raw.std(unbiased=False)",
           "std = raw.std(unbiased=True)", ["tests/test_attention.py::test_normalisation_is_zscore_softmax"]),
    Mutant("temperature_ignored", "fastdelta/attention/weights.py", "torch.softmax(z / temperature, dim=0)",
           "torch.softmax(z, dim=0)", ["tests/test_attention.py::test_normalisation_is_zscore_softmax"]),
    # BN modes
    Mutant("head_extractor_bn_always_train", "fastdelta/train/loop.py",
           'target.requires_grad_(False).train(extractor_bn == "train")', "target.requires_grad_(False).train()",
           ["tests/test_recipes.py::test_attention_head_bn_mode[frozen]"]),
    Mutant("target_fine_tunes_in_eval_mode", "fastdelta/train/loop.py", "target.requires_grad_(True).train()",
           "target.requires_grad_(True).eval()",
           [WIRING + "test_source_bn_decides_the_statistics_of_the_source_maps[reference]"]),
    Mutant("source_in_train_mode", "fastdelta/networks/models.py", "source.eval().requires_grad_(False)",
           "source.requires_grad_(False)",
           [WIRING + "test_source_bn_decides_the_statistics_of_the_source_maps[reference]"]),
    Mutant("batch_source_keeps_running_stats", "fastdelta/features/source.py",
           "m.running_mean = m.running_var = m.num_batches_tracked = None", "pass",
           [WIRING + "test_source_bn_decides_the_statistics_of_the_source_maps[reference]"]),
    Mutant("fast_source_folds_batch_bn", "fastdelta/features/bn_folding.py",
           "if bn.training or not bn.track_running_stats or bn.running_mean is None:", "if bn.training:",
           [WIRING + "test_a_batch_statistics_source_is_truncated_for_the_fast_step_without_folding_its_bn"]),
]


def run_tests(tests: Sequence[str], timeout: float) -> tuple:
    """(pytest's exit code or None on timeout, seconds, last lines of its output)."""
    # no bytecode written: a mutant's .pyc must never outlive the mutant
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, ""
    return p.returncode, time.perf_counter() - t0, "\n".join((p.stdout + p.stderr).strip().splitlines()[-5:])


def restore(path: str, original: bytes, mutated: bytes, m: Mutant, stat: os.stat_result) -> None:
    """Put the original bytes (and mtime, so that cached bytecode matches again) back; if someone
    edited the file meanwhile, undo only the mutation in their version."""
    with open(path, "rb") as f:
        now = f.read()
    if now == original:
        return
    if now == mutated:
        with open(path, "wb") as f:
            f.write(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return
    text = now.decode()
    if text.count(m.replacement) == 1:
        with open(path, "wb") as f:
            f.write(text.replace(m.replacement, m.original).encode())
        print(f"warning: {m.file} changed while {m.name} was applied; undid the mutation in the new version",
              file=sys.stderr)
        return
    backup = path + ".before-mutant"
    with open(backup, "wb") as f:
        f.write(original)
    print(f"ERROR: {m.file} changed while {m.name} was applied and the mutation cannot be located: restore it "
          f"by hand (the version before the mutant is in {backup})", file=sys.stderr)


def run_mutant(m: Mutant, timeout: float) -> dict:
    path = os.path.join(ROOT, m.file)
    record = {**asdict(m), "result": None, "seconds": 0.0, "output": ""}
    with open(path, "rb") as f:  # read right before applying: others may be editing these files
        original = f.read()
    stat = os.stat(path)
    text = original.decode()
    found = text.count(m.original)
    if found != 1:
        record["result"] = f"not applied (snippet found {found} times)"
        return record
    mutated = text.replace(m.original, m.replacement).encode()
    try:
        with open(path, "wb") as f:
            f.write(mutated)
        rc, seconds, output = run_tests(m.tests, timeout)
    finally:
        restore(path, original, mutated, m, stat)
    # pytest exits 1 when a test failed; other codes (collection error, no such test) kill nothing
    record["result"] = {0: "survived", 1: "killed", None: "killed (timeout)"}.get(rc, f"error (pytest exit {rc})")
    record["seconds"], record["output"] = round(seconds, 1), output
    return record


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: the `finally` that restores the file runs


def table(records: List[dict]) -> str:
    lines = ["| mutant | file | killing tests | result |", "|---|---|---|---|"]
    for r in records:
        tests = "<br>".join(t.replace("tests/", "") for t in r["tests"])
        lines.append(f"| {r['name']} | {r['file']} | {tests} | {r['result']} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--json", metavar="PATH", help="also write the records as JSON")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34s} {m.file}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        ap.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.perf_counter()
    tests = list(dict.fromkeys(t for m in chosen for t in m.tests))
    rc, seconds, output = run_tests(tests, args.timeout)
    if rc != 0:
        print(f"the killing tests do not pass on the unchanged code (pytest exit {rc}):\n{output}", file=sys.stderr)
        return 2
    print(f"baseline: the {len(tests)} killing tests pass unchanged ({seconds:.0f} s)", file=sys.stderr)
    records = []
    for m in chosen:
        records.append(run_mutant(m, args.timeout))
        print(f"{m.name}: {records[-1]['result']} ({records[-1]['seconds']} s)", file=sys.stderr)
    total = time.perf_counter() - t0
    print(table(records))
    killed = sum(r["result"].startswith("killed") for r in records)
    print(f"\n{killed} of {len(records)} mutants killed in {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": round(total, 1), "records": records}, f, indent=1)
    return 0 if killed == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`fastdelta bench step` / benchmarks/bench_step.py: the training step of every method, timed side by side
with the public recipe (eager fp32, forward hooks, full source forward, L2-SP as a Python loop).

Synthetic tensors (this measures the model step, not data loading). For each model, method and engine:
ms/step, img/s, time to first step (building the step and compiling it included; with --warm-first-step also
in a fresh process whose torch.compile caches are warm, as a second run sees it), peak GPU memory.

Both engines run the method's default hyperparameters (`bench_hyperparameters`: alpha 1e-4 for DELTA and
DELTA w/o ATT, 0.01 for the others; beta 0.01, lr 0.01, momentum 0.9, weight decay 1e-4), identical for
the two, on a randomly initialised network whose BatchNorm running statistics are first calibrated on
synthetic batches in train mode (`calibrate_batchnorm`): fresh statistics (mean 0, var 1) leave the
eval-mode source's deep maps of a random ResNet-101 at an rms of ~1e4 (the target's: ~0.5), and DELTA's
distance to them overflows within a few steps; calibrated, the source's maps have the scale a pre-trained
network's have. No step reads the device (the loop's deferred reads on CUDA); a device flag collects
whether every step's loss (and, for fastdelta, gradient norm) was finite, read once after the timed
steps with the parameters' finiteness: a row that went non-finite is an error, not a timing.

Writes `bench_step.json` (updated after every row, so a cut-off run keeps what it measured) and
`bench_step.md` (a table of the ratios: fastdelta / public recipe per method,
each method's step / the L2 step of the same engine).

The public recipe here is a re-implementation of the public DELTA code's training step, kept in this
package so that the benchmark imports nothing from outside it.
"""
from .command import add_arguments, main, run  # noqa: F401

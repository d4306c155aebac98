"""Fit settings: one dataclass with the paper's defaults, validated up front.

Defaults follow the DELTA paper and its public code (github.com/lixingjian/DELTA): SGD momentum 0.9,
lr 0.01 (0.001 for Inception-V3), batch 64, 9,000 iterations with lr/10 at 6,000,
alpha = beta = 0.01, weight decay 1e-4 for the plain fine-tune, attention softmax(z / 5).
Where the paper's text and the public code differ, `recipe` picks one side (RECIPES).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

# vocabularies defined by the modules that implement them, validated here once
from .attention.weights import NORMALISATIONS
from .data.backend import DATA_BACKENDS
from .data.transforms import AUGMENTATIONS
from .kernels.dispatch import IMPLS as DISTANCE_IMPLS
# the vocabularies of the methods' settings, re-exported for scripts that name them from here
from .features.forms import FEATURE_MAPS  # noqa: F401
from .methods import METHODS, Delta
from .methods.base import all_hyperparameters, on_registry_change
from .methods.delta_term import DELTA_NO_ATT_SCALES, DELTA_SCALES  # noqa: F401
from .methods.feature_map import FEATURE_SCALES, SOURCE_BN_MODES  # noqa: F401
from .methods.hyperparameters import HyperparameterError

LR_SCHEDULES = ("step", "exp", "cosine")
OPTIMIZERS = ("sgd", "adamw")
KEEP_WEIGHTS = ("last", "best")
LOGGERS = ("csv", "tensorboard")
ATTENTION_IMPLS = ("prefix", "masked_forward", "first_order")
ATTENTION_DTYPES = ("fp32", "bf16")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STEP_ENGINES = ("auto", "reference", "fast")
# which training images Algorithm 1 measures when it may not take them all: "random" (a seeded random
# sample of the whole set, as the public code's shuffled loader) or "first" (the first n in the dataset's
# order: with class-ordered data only the first classes; kept to reproduce results made that way)
ATTENTION_SAMPLES = ("random", "first")
HEAD_BN_MODES = ("train", "frozen")

# Conventions that the paper's text and its public code (github.com/lixingjian/DELTA, train.py and
# channel_eval.py) settle differently. A setting left at None takes the value of the run's `recipe`.
RECIPES = {
    # the public code: raw conv output before BN; DELTA w/o ATT = 0.5 sum_j ||d_j||^2 (`fea_map`); the
    # attention head trained with the model in train() mode (BN statistics adapt), batch 32, and the
    # channel ablation measured on 4 augmented training batches of 32
    "public": dict(feature_map="conv", delta_scale="public", delta_no_att_scale="sum", attention_head_bn="train",
                   attention_head_batch_size=32, attention_max_images=128, attention_augmented=True,
                   attention_normalisation="zscore_softmax"),
    # the article's text: the rectified output of each filter (in a BN network: ReLU after its BN),
    # DELTA's eq. 8 and DELTA w/o ATT's eq. 5 per image (mean over the batch, no c / (2 h w)),
    # Algorithm 1 over every training image (centre crop) with the source feature extractor frozen, BN
    # statistics included, W = softmax of the summed loss increases
    "paper": dict(feature_map="activation", delta_scale="paper_eq8", delta_no_att_scale="paper_eq5",
                  attention_head_bn="frozen", attention_head_batch_size=None, attention_max_images="all",
                  attention_augmented=False, attention_normalisation="softmax"),
}
DEFAULT_RECIPE = "public"
RECIPE_SETTINGS = tuple(RECIPES[DEFAULT_RECIPE])
# how describe_conventions names the attention images of a run that did not measure every one
SAMPLE_NAMES = {"random": "up to {n} {kind} images (a seeded random sample of the training set)",
                "first": "the first {n} {kind} images of the training set in its order (of a class-ordered set: "
                         "the first classes only)"}
# what a result file written before a recipe setting existed used (describe_conventions reads old files)
LEGACY_VALUES = {"delta_scale": "public", "attention_normalisation": "zscore_softmax", "attention_sample": "first"}


class SettingsError(ValueError):
    """A fit setting has a value that cannot work; the message names it."""


def setting(default=None, help: str = "", *, choices=None, parse=None, flags=(), cli=None, factory=None):
    """A FitSettings field and what the command line makes of it: its help, its choices, `parse` (text ->
    value) where the type alone does not say, extra option names (`flags`), or `cli`: how the command
    line sets it instead of an option of its own."""
    meta = dict(help=help, choices=choices, parse=parse, flags=tuple(flags), cli=cli)
    return field(default_factory=factory, metadata=meta) if factory else field(default=default, metadata=meta)


def csv_list(value: str) -> list:
    """'a, b,c' -> ['a', 'b', 'c'] (an option's text)."""
    return [v.strip() for v in value.split(",") if v.strip()]


def csv_floats(value: str) -> list:
    try:
        return [float(v) for v in csv_list(value)]
    except ValueError:
        raise ValueError(f"expected comma separated numbers, got {value!r}") from None


def _images(value: str):
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected a number of images or 'all', got {value!r}") from None


def _yes_no(value: str) -> bool:
    if value.lower() in ("yes", "true", "1"):
        return True
    if value.lower() in ("no", "false", "0"):
        return False
    raise ValueError(f"expected yes or no, got {value!r}")


def _auto_or_yes_no(value: str):
    return "auto" if value == "auto" else _yes_no(value)


def _compile(value: str):
    return value if value == "auto" or value in COMPILE_MODES else _yes_no(value)


def _cache(value: str):
    return None if value == "off" else value


def json_object(value: str) -> dict:
    import json
    v = json.loads(value)
    if not isinstance(v, dict):
        raise ValueError(f"expected a JSON object, got {value!r}")
    return v


def _with_method_hyperparameters(cls: type) -> type:
    """FitSettings's fields: its own, then every registered method's hyperparameters (one setting per
    name; None: the chosen method's default, or the recipe's). Run again whenever the registry changes
    (a method registered after import adds its settings); returns the dataclass."""
    wanted = all_hyperparameters()
    if "__dataclass_fields__" in cls.__dict__:
        if set(cls._method_fields) == set(wanted):
            return cls
        for name, f in cls.__dataclass_fields__.items():  # dataclass replaced them by their defaults
            setattr(cls, name, field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
        for name in cls._method_fields:
            del cls.__annotations__[name]
            delattr(cls, name)
        for attr in ("__init__", "__repr__", "__eq__", "__dataclass_fields__", "__dataclass_params__"):
            if attr in cls.__dict__:
                delattr(cls, attr)
    for f in wanted.values():
        cls.__annotations__[f.name] = f"Optional[{f.type.__name__}]"
        setattr(cls, f.name, setting(f.default, f.help, choices=f.choices))
    cls._method_fields = tuple(wanted)
    return dataclass(cls)


@_with_method_hyperparameters
class FitSettings:
    """Every setting of a fit, with its default; the methods' hyperparameters (alpha, beta, weight_decay,
    feature_map, delta_scale, ...) are added from the registry (fastdelta.methods: each method declares
    its own). The command line's options are made from these fields (fastdelta.cli)."""
    # choices read when the parser is built: a method registered after import is one too
    method: str = setting(Delta.name, "the method (see the README's method table)", choices=lambda: tuple(METHODS))
    lr: Optional[float] = setting(None, "learning rate (default: 0.01, 0.001 for inception_v3)")
    momentum: float = setting(0.9, "SGD momentum")
    nesterov: bool = setting(False, "Nesterov momentum (tllib)")
    backbone_lr_mult: float = setting(1.0, "lr of every non-head parameter = lr x this (tllib: 0.1)")
    batch_size: int = setting(64, "training batch size (global under torchrun)")
    iterations: int = setting(9000, "training iterations")
    lr_schedule: str = setting("step", "step: lr x gamma at lr_step; exp: lr x gamma ** (t / lr_step); cosine: "
                               "half a cosine from lr to 0 at the last iteration (after any warm-up)",
                               choices=LR_SCHEDULES)
    lr_step: Optional[int] = setting(None, "iterations of the lr schedule's step (default: 2/3 of the iterations)")
    lr_gamma: float = setting(0.1, "the lr schedule's factor")
    warmup_iterations: int = setting(0, "linear lr warm-up from 0 to lr over these iterations, then the schedule "
                                     "(cosine: from there to 0)")
    optimizer: str = setting("sgd", "sgd (the paper's, momentum) or adamw (torch's AdamW, betas 0.9/0.999; the "
                             "method's terms, L2-SP's pulls included, are added to the gradients before its step)",
                             choices=OPTIMIZERS)
    adamw_weight_decay: float = setting(0.0, "AdamW's decoupled weight decay, torch's weight_decay (w -= lr x this x "
                                        "w); the method's own weight_decay/alpha/beta terms apply either way")
    augmentation: str = setting("default", "default (resize square, crop) or improved (keep aspect, 10-crop test)",
                                choices=AUGMENTATIONS)
    resize: Optional[int] = setting(None, "resize before the crop (default: 256, 320 for inception_v3)")
    crop: Optional[int] = setting(None, "crop size (default: 224, 299 for inception_v3)")
    recipe: str = setting(DEFAULT_RECIPE, "conventions where the paper and its public code differ (the settings "
                          "left at the recipe's)", choices=tuple(RECIPES))
    layers: Optional[Sequence[str]] = setting(None, "regularised layers, comma separated module names (default: "
                                              "the architecture's)", parse=csv_list)
    attention_temperature: float = setting(5.0, "T of the zscore_softmax normalisation (the public code's 5)",
                                           flags=("--temperature",))
    attention_normalisation: Optional[str] = setting(
        None, "W from the loss increases: zscore_softmax (public, softmax(zscore / T)) or softmax (paper) "
        "(default: the recipe's)", choices=NORMALISATIONS)
    attention_sample: str = setting("random", "which training images the attention measures when capped: "
                                    "random (seeded sample of the whole set) or first", choices=ATTENTION_SAMPLES)
    attention_max_images: object = setting(None, "images for the attention: a number or 'all' (default: the "
                                           "recipe's: public 128, paper all)", parse=_images)
    attention_augmented: Optional[bool] = setting(None, "yes: those images with the training augmentation "
                                                  "(public); no: centre crop (paper) (default: the recipe's)",
                                                  parse=_yes_no)
    attention_head_epochs: int = setting(10, "epochs of L2-FE head training before Algorithm 1 (public code: 10)",
                                         flags=("--head-epochs",))
    # on a few dozen images 10 epochs of 32 are only a few steps, and attention measured against a head
    # near chance is noise
    attention_head_min_iterations: int = setting(0, "at least this many head iterations (0: the epochs alone, "
                                                 "as the public code)")
    attention_head_bn: Optional[str] = setting(None, "attention head training: train (BN statistics adapt, "
                                               "public) or frozen (eval mode) (default: the recipe's)",
                                               choices=HEAD_BN_MODES)
    attention_head_batch_size: Optional[int] = setting(None, "batch of the attention head training (default: "
                                                       "the recipe's; none: batch_size)")
    attention_impl: str = setting("prefix", "exact: prefix (fast) or masked_forward (literal); first_order: "
                                  "Taylor estimate", choices=ATTENTION_IMPLS)
    attention_dtype: str = setting("fp32", "bf16: autocast for the ablation passes (GPU speed)",
                                   choices=ATTENTION_DTYPES)
    attention_chunk: Optional[int] = setting(None, "masked copies per suffix pass (default: from free memory)")
    attention_cache: Optional[str] = setting("auto", "attention cache folder ('auto': $FASTDELTA_CACHE or "
                                             "~/.cache/fastdelta; 'off': none)", parse=_cache)
    attention: Optional[object] = setting(None, "a precomputed channel_attention.json to use (or, from Python, "
                                          "a ChannelAttention)", parse=str)
    distance_impl: str = setting("auto", "feature-map distance: auto (fused kernel), triton, native or reference",
                                 choices=DISTANCE_IMPLS)
    # training-step engine (fastdelta/train/steps.py); "auto": bf16 + channels_last + torch.compile on CUDA, and
    # on CPU fp32 eager contiguous = the reference step
    precision: str = setting("auto", "autocast precision of the fast step (fp16 with a GradScaler)",
                             choices=PRECISIONS)
    compile: object = setting("auto", f"torch.compile the fast step: auto, yes, no or a mode {COMPILE_MODES}",
                              parse=_compile)
    channels_last: object = setting("auto", "channels_last memory format: auto, yes or no", parse=_auto_or_yes_no)
    cuda_graphs: bool = setting(False, "CUDA graphs through torch.compile mode reduce-overhead (CUDA only)")
    step_engine: str = setting("auto", "reference (eager fp32 hooks), fast, or auto (fast unless all fp32 and "
                               "eager)", choices=STEP_ENGINES)
    seed: int = setting(0, "seed of the initialisation, the data order and the augmentation")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto")
    num_workers: Optional[int] = setting(None, "data loader workers (default: from the cores)", flags=("--workers",))
    eval_batch_size: int = setting(256, "batch size of the evaluations")
    eval_every: int = setting(0, "> 0: test top-1 every so many iterations, in the history (learning curves); with "
                              "a validation set (val, val_fraction) its top-1 instead, val_top1")
    eval_images: Optional[int] = setting(None, "test images for those curve points (default: all; the final "
                                         "test uses all)")
    val_fraction: float = setting(0.0, "hold out this fraction of the training data (stratified, seeded) as the "
                                  "validation set, before the attention and the training; 0: none")
    val: Optional[object] = setting(None, "a validation ImageFolder root DIR (from Python also arrays or a Dataset): "
                                    "with one, eval_every scores it (val_top1) instead of the test set", parse=str)
    keep: str = setting("last", "the weights model.pt holds: last, or best (by validation top-1; needs a "
                        "validation set)", choices=KEEP_WEIGHTS)
    early_stopping_patience: int = setting(0, "stop when validation top-1 has not improved for this many "
                                           "evaluations (0: off; needs a validation set and eval_every)")
    loggers: Optional[Sequence[str]] = setting(None, "also log the history beside history.jsonl, comma separated: "
                                               "csv (RUN/history.csv), tensorboard (RUN/tensorboard/)",
                                               parse=csv_list)
    strict_data: bool = setting(False, "a bad image file is fatal instead of skipped")
    data_backend: str = setting("auto", "auto (DALI on CUDA when installed, else torchvision), dali or torchvision",
                                choices=DATA_BACKENDS)
    data_prefetch: int = setting(2, "DALI prefetch queue depth (batches prepared ahead)")
    progress: bool = setting(True, "progress bars")
    distributed: bool = setting(False, "DDP over all ranks (batch_size and lr are global)",
                                cli="on under torchrun (WORLD_SIZE > 1)")
    dist_timeout: float = setting(600.0, "under torchrun: seconds a rank waits for the others in a collective "
                                  "before the run fails (a stalled rank would otherwise hang the job)")
    run_dir: Optional[str] = setting(None, "checkpoints (run_dir/checkpoints), history.jsonl and the results",
                                     cli="--out")
    checkpoint_every: int = setting(500, "iterations between checkpoints (and one at the end; 0: only at the end)")
    resume: bool = setting(False, "continue from run_dir's latest valid checkpoint", cli="--resume RUN_DIR")
    extra: dict = setting(help="free-form notes recorded with the result (a JSON object)", parse=json_object,
                          factory=dict)
    overwrite: bool = setting(False, "the output folder holds an earlier run: remove its files and start anew")
    allow_overlap: bool = setting(False, "go on when test images are also training images (same file or same "
                                  "bytes; counted in result.json) instead of failing")
    allow_low_disk: bool = setting(False, "start even though the output folder's disk has less free space than "
                                   "the run needs")

    def resolved(self, arch: str | None = None) -> "FitSettings":
        """A copy with architecture-dependent defaults filled in, after validation."""
        s = dataclasses.replace(self)
        if s.recipe in RECIPES:
            for name, value in RECIPES[s.recipe].items():
                if getattr(s, name) is None:
                    setattr(s, name, value)
        inception = arch == "inception_v3"
        if s.lr is None:
            s.lr = 0.001 if inception else 0.01
        if s.resize is None:
            s.resize = 320 if inception else 256
        if s.crop is None:
            s.crop = 299 if inception else 224
        if s.lr_step is None:
            s.lr_step = max(1, round(s.iterations * 2 / 3))
        s.validate()
        method = METHODS[s.method]  # its hyperparameters left at None take its defaults
        for name, value in method.hyperparameter_values({n: getattr(s, n) for n in method.declared()}).items():
            setattr(s, name, value)
        return s

    def validate(self) -> None:
        """Raise a SettingsError naming the first setting (in this order) whose value cannot work."""
        self._validate_method_and_optimizer()
        self._validate_implementations()
        self._validate_counts()
        self._validate_recipe_conventions()
        self._validate_fine_tuning()
        self._validate_step_options()
        self._validate_data_pipeline()
        self._validate_step_engine()
        self._validate_layers()
        self._validate_training_features()

    def _validate_method_and_optimizer(self) -> None:
        """The method, the weights of its terms and SGD's: momentum, lr, steps and batch sizes, schedule."""
        if self.method not in METHODS:
            raise SettingsError(f"method={self.method!r}: expected one of {', '.join(METHODS)}")
        for f in all_hyperparameters().values():
            v = getattr(self, f.name)
            if v is None:
                continue  # the method's default or the recipe's, filled in by resolved()
            try:
                f.declaration.check(v)
            except HyperparameterError as e:
                raise SettingsError(str(e)) from None
        v = self.momentum
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise SettingsError(f"momentum={v!r}: must be a finite number >= 0")
        if self.momentum >= 1:
            raise SettingsError(f"momentum={self.momentum!r}: must be < 1 (SGD momentum diverges at 1 and above)")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"lr={self.lr!r}: must be > 0")
        for name in ("batch_size", "iterations", "eval_batch_size", "attention_head_epochs"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise SettingsError(f"{name}={v!r}: must be an integer >= 1")
        if self.lr_schedule not in LR_SCHEDULES:
            raise SettingsError(f"lr_schedule={self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        self._validate_lr_schedule()
        v = self.seed
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 32):
            raise SettingsError(f"seed={v!r}: must be an integer from 0 to 2**32 - 1 (numpy's seed range)")

    def _validate_lr_schedule(self) -> None:
        """The schedule's factor and step: lr x gamma (step) or lr x gamma ** (t / lr_step) (exp) must stay a
        finite lr that does not grow; a NaN gamma would train a NaN model without a non-finite loss."""
        v = self.lr_gamma
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 1):
            raise SettingsError(f"lr_gamma={v!r}: must be a finite number in (0, 1] (the factor the lr schedule "
                                "multiplies the lr by; 1: a constant lr)")
        v = self.lr_step
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise SettingsError(f"lr_step={v!r}: must be an integer >= 1 (the iterations of the {self.lr_schedule} "
                                "lr schedule's step) or None (2/3 of the iterations)")

    def _validate_implementations(self) -> None:
        """The augmentation and the implementations of Algorithm 1 and of the feature-map distance."""
        if self.augmentation not in AUGMENTATIONS:
            raise SettingsError(f"augmentation={self.augmentation!r}: expected one of {AUGMENTATIONS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise SettingsError(f"attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}")
        if self.attention_dtype not in ATTENTION_DTYPES:
            raise SettingsError(f"attention_dtype={self.attention_dtype!r}: expected one of {ATTENTION_DTYPES}")
        if self.distance_impl not in DISTANCE_IMPLS:
            raise SettingsError(f"distance_impl={self.distance_impl!r}: expected one of {DISTANCE_IMPLS}")

    def _validate_counts(self) -> None:
        """Counts and periods of Algorithm 1, evaluation, checkpoints and DDP; resume's run folder."""
        if not isinstance(self.attention_head_min_iterations, int) or self.attention_head_min_iterations < 0:
            raise SettingsError(f"attention_head_min_iterations={self.attention_head_min_iterations!r}: "
                                "must be an integer >= 0")
        if self.attention_chunk is not None and (not isinstance(self.attention_chunk, int) or self.attention_chunk < 1):
            raise SettingsError(f"attention_chunk={self.attention_chunk!r}: must be an integer >= 1 or None")
        v = self.attention_temperature
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
            raise SettingsError(f"attention_temperature={v!r}: must be a finite number > 0 (an infinite one makes "
                                "every channel's attention weight equal)")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise SettingsError(f"eval_every={self.eval_every!r}: must be an integer >= 0")
        if self.eval_images is not None and (not isinstance(self.eval_images, int) or self.eval_images < 1):
            raise SettingsError(f"eval_images={self.eval_images!r}: must be an integer >= 1 or None")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise SettingsError(f"checkpoint_every={self.checkpoint_every!r}: must be an integer >= 0")
        if not (isinstance(self.dist_timeout, (int, float)) and math.isfinite(self.dist_timeout)
                and self.dist_timeout > 0):
            raise SettingsError(f"dist_timeout={self.dist_timeout!r}: must be a number of seconds > 0")
        if self.resume and self.run_dir is None:
            raise SettingsError("resume=True needs run_dir (the folder of the run to continue)")
        self._validate_extra()

    def _validate_extra(self) -> None:
        """extra: a JSON object result.json can hold (NaN and infinity are not JSON)."""
        import json
        if not isinstance(self.extra, dict):
            raise SettingsError(f"extra={self.extra!r}: expected a dict (CLI: --extra, a JSON object)")
        try:
            json.dumps(self.extra, allow_nan=False, default=str)
        except ValueError:
            raise SettingsError(f"extra={self.extra!r}: holds a NaN or infinite number, which result.json cannot "
                                "store as JSON; write it as a string (e.g. \"nan\")") from None

    def _validate_recipe_conventions(self) -> None:
        """The recipe and the conventions it fills in (None: the recipe's value)."""
        n = self.attention_max_images
        if not (n is None or n == "all" or (isinstance(n, int) and not isinstance(n, bool) and n >= 1)):
            raise SettingsError(f"attention_max_images={n!r}: must be an integer >= 1, 'all' or None (the recipe's)")
        if self.recipe not in RECIPES:
            raise SettingsError(f"recipe={self.recipe!r}: expected one of {tuple(RECIPES)}")
        for name, allowed in (("attention_normalisation", NORMALISATIONS), ("attention_sample", ATTENTION_SAMPLES),
                              ("attention_head_bn", HEAD_BN_MODES)):
            v = getattr(self, name)
            if not (v in allowed or (v is None and name in RECIPE_SETTINGS)):
                raise SettingsError(f"{name}={v!r}: expected one of {allowed}")
        for name in ("attention_augmented", "nesterov"):
            v = getattr(self, name)
            if not (isinstance(v, bool) or (v is None and name in RECIPE_SETTINGS)):
                raise SettingsError(f"{name}={v!r}: expected True or False")
        v = self.attention_head_batch_size
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise SettingsError(f"attention_head_batch_size={v!r}: must be an integer >= 1 or None")

    def _validate_fine_tuning(self) -> None:
        """The backbone's lr multiplier, Nesterov momentum and the crop within the resize."""
        if not (isinstance(self.backbone_lr_mult, (int, float)) and math.isfinite(self.backbone_lr_mult)
                and self.backbone_lr_mult >= 0):
            raise SettingsError(f"backbone_lr_mult={self.backbone_lr_mult!r}: must be a finite number >= 0")
        if self.nesterov and self.momentum == 0:
            raise SettingsError("nesterov=True needs momentum > 0")
        if self.resize is not None and self.crop is not None and self.crop > self.resize:
            raise SettingsError(f"crop={self.crop} is larger than resize={self.resize}")

    def _validate_step_options(self) -> None:
        """The fast step's precision, compile, channels_last and CUDA graphs ("yes"/"no", the command line's
        spelling, taken as True/False)."""
        for name in ("compile", "channels_last", "cuda_graphs"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("yes", "no"):
                setattr(self, name, value.lower() == "yes")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"precision={self.precision!r}: expected one of {PRECISIONS}")
        if not (isinstance(self.compile, bool) or self.compile == "auto" or self.compile in COMPILE_MODES):
            raise SettingsError(f"compile={self.compile!r}: expected 'auto', True, False or one of {COMPILE_MODES}")
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise SettingsError(f"channels_last={self.channels_last!r}: expected 'auto', True or False")
        if not isinstance(self.cuda_graphs, bool):
            raise SettingsError(f"cuda_graphs={self.cuda_graphs!r}: expected True or False")
        if self.cuda_graphs and self.compile is False:
            raise SettingsError("cuda_graphs=True works through torch.compile (mode 'reduce-overhead'); "
                                "it cannot be combined with compile=False")

    def _validate_data_pipeline(self) -> None:
        """The data backend and its prefetch depth."""
        if self.data_backend not in DATA_BACKENDS:
            raise SettingsError(f"data_backend={self.data_backend!r}: expected one of {DATA_BACKENDS}")
        if not isinstance(self.data_prefetch, int) or self.data_prefetch < 1:
            raise SettingsError(f"data_prefetch={self.data_prefetch!r}: must be an integer >= 1")

    def _validate_step_engine(self) -> None:
        """The step engine, and that the reference step is given no fast-step option."""
        if self.step_engine not in STEP_ENGINES:
            raise SettingsError(f"step_engine={self.step_engine!r}: expected one of {STEP_ENGINES}")
        if self.step_engine == "reference" and (self.precision in ("bf16", "fp16") or self.channels_last is True
                                                or self.cuda_graphs or not (self.compile in ("auto", False))):
            raise SettingsError("step_engine='reference' is the eager fp32 step: it takes no precision, "
                                "channels_last, compile or cuda_graphs setting")

    def _validate_training_features(self) -> None:
        """The optimizer and warm-up, the validation set and what reads it (keep, early stopping), the loggers."""
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer={self.optimizer!r}: expected one of {OPTIMIZERS}")
        v = self.adamw_weight_decay
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0):
            raise SettingsError(f"adamw_weight_decay={v!r}: must be a finite number >= 0")
        if v and self.optimizer != "adamw":
            raise SettingsError(f"adamw_weight_decay={v!r} is AdamW's decoupled decay, but optimizer="
                                f"{self.optimizer!r}: set optimizer='adamw' (SGD's weight decay is the method's "
                                "weight_decay)")
        if self.nesterov and self.optimizer != "sgd":
            raise SettingsError(f"nesterov=True is SGD's; optimizer={self.optimizer!r} has no Nesterov momentum")
        v = self.warmup_iterations
        if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < max(1, self.iterations)):
            raise SettingsError(f"warmup_iterations={v!r}: must be an integer >= 0 and below iterations="
                                f"{self.iterations!r}")
        v = self.val_fraction
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
            raise SettingsError(f"val_fraction={v!r}: must be a number in [0, 1) (the part of the training data "
                                "held out for validation; 0: none)")
        if v and self.val is not None:
            raise SettingsError("val_fraction and val both give a validation set: choose one")
        has_val = bool(v) or self.val is not None
        if self.keep not in KEEP_WEIGHTS:
            raise SettingsError(f"keep={self.keep!r}: expected one of {KEEP_WEIGHTS}")
        if self.keep == "best" and not has_val:
            raise SettingsError("keep='best' chooses the weights by validation top-1, but there is no validation "
                                "set: give val_fraction > 0 or val (the test set is never used to choose)")
        v = self.early_stopping_patience
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            raise SettingsError(f"early_stopping_patience={v!r}: must be an integer >= 0 (0: off)")
        if v and not has_val:
            raise SettingsError(f"early_stopping_patience={v} watches validation top-1, but there is no validation "
                                "set: give val_fraction > 0 or val (the test set is never used to choose)")
        if v and not self.eval_every:
            raise SettingsError(f"early_stopping_patience={v} counts validation evaluations, made every eval_every "
                                "iterations: set eval_every > 0")
        self._validate_loggers()

    def _validate_loggers(self) -> None:
        """loggers: names from LOGGERS ('csv,tensorboard' from Python too), written into run_dir."""
        if isinstance(self.loggers, str):
            self.loggers = csv_list(self.loggers)
        if self.loggers is None or not len(self.loggers):
            self.loggers = None
            return
        if not all(isinstance(v, str) for v in self.loggers):
            raise SettingsError(f"loggers={self.loggers!r}: expected names from {LOGGERS}, e.g. 'csv,tensorboard'")
        bad = [v for v in self.loggers if v not in LOGGERS]
        if bad:
            raise SettingsError(f"loggers={list(self.loggers)!r}: unknown {bad}; expected names from {LOGGERS}")
        if self.run_dir is None:
            raise SettingsError(f"loggers={list(self.loggers)!r} write into the run folder: set run_dir (CLI: --out)")
        self.loggers = list(dict.fromkeys(self.loggers))

    def _validate_layers(self) -> None:
        """The regularised layers: module names."""
        if self.layers is not None and (isinstance(self.layers, str) or not all(isinstance(l, str) for l in self.layers)):
            raise SettingsError(f"layers={self.layers!r}: expected a list of module names")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        att = self.attention
        d["attention"] = None if att is None else (str(att) if not hasattr(att, "to_dict") else "precomputed")
        d["val"] = describe_val(self.val)
        d["loggers"] = list(self.loggers) if self.loggers is not None else None
        return d


on_registry_change(lambda: _with_method_hyperparameters(FitSettings))


def describe_val(val):
    """The `val` setting as records hold it: a folder's path, else what kind of object it was (its contents
    are fingerprinted in the data record)."""
    import os
    if val is None or isinstance(val, (str, os.PathLike)):
        return None if val is None else str(val)
    return "arrays" if isinstance(val, tuple) else f"a {type(val).__name__} object"


FEATURE_MAP_NAMES = {"conv": "raw conv output, before BN (public code)",
                     "relu_conv": "ReLU of the raw pre-BN conv output (neither paper nor public code)",
                     "activation": "ReLU after the conv's BN (the paper's rectified map)"}


DELTA_SCALE_NAMES = {"public": "DELTA: 0.5 sum_j c W_j ||d_j||^2 / (h w), summed over the batch (public train.py)",
                     "paper_eq8": "DELTA: sum_j W_j ||d_j||^2 per image, mean over the batch (paper eq. 8)"}
DELTA_NO_ATT_NAMES = {"sum": "DELTA w/o ATT: 0.5 sum ||d||^2 (public fea_map)",
                      "uniform_attention": "DELTA w/o ATT: DELTA's public term with W = 1/c (/ h w)",
                      "paper_eq5": "DELTA w/o ATT: sum_j ||d_j||^2 per image, mean over the batch (paper eq. 5)"}
NORMALISATION_NAMES = {"zscore_softmax": "W = softmax(zscore(raw) / T) (public)",
                       "softmax": "W = softmax(raw) (paper)"}


def describe_conventions(settings: dict) -> str:
    """One line naming the conventions a run used (resolved settings as a dict), for reports. A setting
    missing from an older result file is read as the value every run used before it existed."""
    def g(key, default=None):
        return settings.get(key, LEGACY_VALUES.get(key, default))
    if "feature_relu" in settings and "feature_map" not in settings:  # written before recipes existed
        form = "relu_conv" if settings["feature_relu"] else "conv"
        return (f"feature maps: {FEATURE_MAP_NAMES[form]}; DELTA w/o ATT: uniform attention (/ h w); attention "
                f"head BN frozen, attention on {g('attention_max_images') or 'all'} centre-crop images")
    n = g("attention_max_images")
    changed = [f"{k}={g(k)!r}" for k, v in RECIPES.get(g("recipe"), {}).items() if g(k) != v]
    # a run that changed a convention of its recipe is not that recipe: say so first
    recipe = f"recipe {g('recipe')}" + (f" with {', '.join(changed)} (so not the {g('recipe')} conventions)"
                                        if changed else "")
    kind = "augmented" if g("attention_augmented") else "centre-crop"
    images = (f"all {kind} images" if n == "all" else
              SAMPLE_NAMES.get(g("attention_sample"), "up to {n} {kind} images").format(n=n, kind=kind))
    parts = [recipe, f"feature maps: {FEATURE_MAP_NAMES.get(g('feature_map'), g('feature_map'))}",
             DELTA_SCALE_NAMES.get(g("delta_scale"), str(g("delta_scale"))),
             DELTA_NO_ATT_NAMES.get(g("delta_no_att_scale"), str(g("delta_no_att_scale"))),
             f"attention head BN {g('attention_head_bn')}, attention on {images}, "
             f"{NORMALISATION_NAMES.get(g('attention_normalisation'), g('attention_normalisation'))}"]
    if g("source_bn", "running") != "running":
        parts.append("source maps with batch BN statistics (not in the paper)")
    if g("feature_scale", "none") != "none":
        parts.append("each layer's term divided by the source maps' energy (not in the paper)")
    if g("backbone_lr_mult", 1.0) != 1.0:
        parts.append(f"backbone lr x{g('backbone_lr_mult')}")
    if g("nesterov"):
        parts.append("Nesterov momentum")
    return "; ".join(parts)


def make_settings(method: str = Delta.name, **overrides) -> FitSettings:
    """FitSettings from keyword arguments; an unknown keyword is an error naming it."""
    names = {f.name for f in dataclasses.fields(FitSettings)}
    if "feature_relu" in overrides:
        raise SettingsError("feature_relu was replaced by feature_map: feature_relu=True is "
                            "feature_map='relu_conv', feature_relu=False is feature_map='conv' (the public code)")
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; valid settings: {sorted(names)}")
    s = FitSettings(method=method, **overrides)
    s.validate()
    return s

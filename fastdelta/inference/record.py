"""What a run folder says about its network and preprocessing: read from result.json, which fit (and
FitResult.save) writes beside model.pt, so a run can be used without the data or code that made it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import RunFolderError

RESULT_FILE = "result.json"
WEIGHTS_FILE = "model.pt"


@dataclass
class RunRecord:
    """The parts of result.json that rebuilding and feeding the network needs."""
    run_dir: Path
    arch: str                       # torchvision/timm name, or "custom" (a user nn.Module)
    head: Optional[str]             # qualified name of the replaced classifier
    classes: list                   # class names, in output-unit order
    augmentation: str               # decides the eval transform: "default" (1 centre crop) or "improved" (10 crops)
    resize: int
    crop: int
    eval_batch_size: int = 256
    method: str = ""
    status: str = "ok"
    test: dict = field(default_factory=dict)  # the run's own test metrics (top1, top1_10crop, images)
    test_data: Optional[dict] = None           # how the run's test set was described

    @property
    def weights_path(self) -> Path:
        return self.run_dir / WEIGHTS_FILE


def read_record(run_dir) -> RunRecord:
    """The RunRecord of `run_dir`; a RunFolderError naming the folder when it is no finished fit's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                             else f"run folder {run_dir} is a file, not a folder", run_dir)
    path = run_dir / RESULT_FILE
    if not path.is_file():
        raise RunFolderError(f"run folder {run_dir} has no {RESULT_FILE}: it is not the output folder of a "
                             "finished fastdelta fit (fastdelta fit --out RUN writes it)", run_dir)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path} could not be read as JSON: {e}", path) from e
    if not (run_dir / WEIGHTS_FILE).is_file():
        why = saved.get("model_file") if isinstance(saved, dict) else None
        raise RunFolderError(f"run folder {run_dir} has no {WEIGHTS_FILE}: " + (
            f"{why}" if why else "the run was saved without its weights (fastdelta compare keeps none)")
            + "; fit it again with fastdelta fit --out", run_dir)
    return _record(run_dir, saved, path)


def _record(run_dir: Path, saved, path: Path) -> RunRecord:
    """The fields fit wrote, each checked for presence so that a hand-edited file fails by name."""
    try:
        model, data, settings = saved["model"], saved["data"], saved["settings"]
        record = RunRecord(run_dir=run_dir, arch=model["arch"], head=model.get("head"),
                           classes=[str(c) for c in data["classes"]], augmentation=settings["augmentation"],
                           resize=int(settings["resize"]), crop=int(settings["crop"]),
                           eval_batch_size=int(settings.get("eval_batch_size") or 256),
                           method=str(saved.get("method", "")), status=str(saved.get("status", "ok")),
                           test=dict(saved.get("test") or {}), test_data=data.get("test"))
    except (KeyError, TypeError, ValueError) as e:
        raise RunFolderError(f"{path} lacks what a fit records about its network and preprocessing "
                             f"({type(e).__name__}: {e}); was it written by fastdelta fit?", path) from e
    if not record.classes:
        raise RunFolderError(f"{path} records no class names", path)
    return record

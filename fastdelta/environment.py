"""What a result file records about where it was computed (the library's, used by the applications too)."""
from __future__ import annotations

import os
import platform
import time


def environment() -> dict:
    """Device, torch, python, what decides CPU arithmetic (threads, instruction set, CPU model) and date:
    recorded with every result file."""
    import torch

    from .result import cpu_arithmetic
    gpu = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if gpu else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "python": platform.python_version(), **cpu_arithmetic(),
            "date": time.strftime("%Y-%m-%d")}

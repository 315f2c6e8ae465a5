"""Device names from configs and flags → torch devices, in one place (training, teacher, commands)."""

from __future__ import annotations

import torch

from carv3d.errors import ConfigError


def resolve_device(name: "str | torch.device", option: str = "train.device") -> torch.device:
    """``auto`` → the first CUDA device when there is one, else the CPU.

    Args:
        name: auto, cpu, cuda or cuda:N.
        option: how the user spelled the setting, for the error message (``train.device``, ``--device``).
    """
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{option} is '{name}'; expected auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{option} asks for CUDA but this torch has no CUDA device; use {option} cpu or auto.")
    return device

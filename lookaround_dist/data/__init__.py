"""Input pipelines behind one interface (:class:`TrainData`, :class:`EvalData`)."""

from __future__ import annotations

import logging
from pathlib import Path

from .base import Batch, EvalData, Placement, TrainData
from .sources import DataError, SampleIndex, open_index

log = logging.getLogger(__name__)

__all__ = [
    "Batch", "DataError", "EvalData", "Placement", "SampleIndex", "TrainData",
    "build_eval_data", "build_train_data", "open_index", "resolve_backend",
]


def dali_status() -> tuple[bool, str]:
    """Whether DALI can be imported here, and why not when it cannot."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        return False, f"nvidia-dali-cuda130 is not installed ({error})"
    except Exception as error:  # a broken install raises all sorts of errors at import
        return False, f"nvidia-dali failed to import: {error}"
    return True, "installed"


def resolve_backend(requested: str) -> str:
    """Map ``auto`` to ``dali`` when DALI imports, else to ``torchvision``."""
    if requested == "torchvision":
        return requested
    available, reason = dali_status()
    if requested == "dali":
        if not available:
            raise RuntimeError(f"data.backend=dali was requested but {reason}")
        return "dali"
    return "dali" if available else "torchvision"


def dali_cache_dir(config) -> Path:
    """The folder for DALI index files and decompressed shards, beside the run directories."""
    return Path(config.train.output_dir) / "dali-cache"


def build_train_data(config, index: SampleIndex, placement: Placement, device, backend: str) -> TrainData:
    """Build the training input of this rank for the resolved ``backend``."""
    data = config.data
    if backend == "dali":
        from .dali_backend import DaliTrainData

        return DaliTrainData(
            path=data.train_path, index=index, placement=placement,
            augmentations=data.augmentations, image_size=data.image_size,
            batch_size=data.batch_size, num_threads=max(1, data.num_workers),
            mean=data.mean, std=data.std, independent_sampling=data.independent_sampling,
            last_batch=data.last_batch, skip_decode_errors=data.on_decode_error == "skip",
            max_steps_per_epoch=config.train.max_steps_per_epoch, device=device,
            prefetch_depth=data.prefetch_depth, hw_decoder_load=data.hw_decoder_load,
            cache_dir=dali_cache_dir(config), num_classes=config.model.num_classes,
        )
    from .torchvision_backend import TorchvisionTrainData

    return TorchvisionTrainData(
        index=index, placement=placement, augmentations=data.augmentations,
        image_size=data.image_size, batch_size=data.batch_size, num_workers=data.num_workers,
        mean=data.mean, std=data.std, independent_sampling=data.independent_sampling,
        last_batch=data.last_batch, skip_decode_errors=data.on_decode_error == "skip",
        max_steps_per_epoch=config.train.max_steps_per_epoch,
        pin_memory=device.type == "cuda", prefetch_depth=data.prefetch_depth,
    )


def build_eval_data(config, index: SampleIndex, rank: int, world_size: int, device, backend: str) -> EvalData:
    """Build the validation input of this rank; every sample is seen by exactly one rank."""
    data = config.data
    if backend == "dali":
        from .dali_backend import DaliEvalData

        return DaliEvalData(
            path=data.val_path, index=index, rank=rank, world_size=world_size,
            image_size=data.image_size, batch_size=data.eval_batch_size, num_threads=max(1, data.num_workers),
            mean=data.mean, std=data.std, device=device, prefetch_depth=data.prefetch_depth,
            hw_decoder_load=data.hw_decoder_load, cache_dir=dali_cache_dir(config),
            num_classes=config.model.num_classes,
        )
    from .torchvision_backend import TorchvisionEvalData

    return TorchvisionEvalData(
        index=index, rank=rank, world_size=world_size, image_size=data.image_size,
        batch_size=data.eval_batch_size, num_workers=data.num_workers, mean=data.mean,
        std=data.std, pin_memory=device.type == "cuda",
    )

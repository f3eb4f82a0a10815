"""The NVIDIA DALI input backend: one DALI pipeline per hosted branch, driven step by step.

Readers. Webdataset shards go through ``fn.readers.webdataset`` with DALI index files kept
in a cache folder (gzip-compressed shards are decompressed there first, because DALI reads
plain tars only). ImageFolder trees go through ``fn.readers.file`` with an explicit file
list whose labels are sample numbers, so that the label and the key of every sample come
from the :class:`SampleIndex`.

Sample order. Every branch's pipeline gets the same reader seed and the same file order,
both derived from ``(seed, epoch)``, and reads shard ``position`` of ``ranks_per_branch``.
So at each step every branch sees the same base samples and the ranks of a branch see
disjoint ones. The reader of a tar shuffles inside a buffer of ``initial_fill`` samples
(DALI's default is 1,024), so webdataset shards must be shuffled when written
(``lookaround-shards pack`` does). Pipelines are rebuilt at the start of every epoch: the
shard files are visited in a new order, which moves samples between positions, and a
rebuilt pipeline never carries prefetched batches over from the previous epoch.

Steps per epoch come from the sample count, as in the torchvision backend, and the
pipelines run exactly that many times. ``pad_last_batch`` pads every position's slice to
the size of the largest one, so each rank has enough batches even with last_batch=pad.

Augmentation randomness comes from the pipeline seed, derived from
``(seed, epoch, branch, position)``. Resuming inside an epoch restores DALI's own reader
and operator checkpoint (``enable_checkpointing=True``), or, for a state saved without
one, runs the pipelines through the steps already taken.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from . import augment
from .base import Batch, EvalData, Placement, TrainData
from .sources import DataError, SampleIndex, expand_shards, is_image_folder
from .torchvision_backend import mix_seed

log = logging.getLogger(__name__)

READER_NAME = "Reader"
DALI_AUGMENTATIONS = augment.AUGMENTATIONS
"""Every augmentation name of the torchvision backend has a DALI implementation."""

IMAGE_EXTENSIONS = "jpg;jpeg;png;webp"
RANDOM_AREA = (0.08, 1.0)
RANDOM_ASPECT_RATIO = (3 / 4, 4 / 3)
RANDAUGMENT_OPS = 2
RANDAUGMENT_MAGNITUDE = 9
MAGNITUDE_BINS = 31
"""RandAugment and TrivialAugment settings, matching torchvision's defaults."""
FILL_VALUE = 0
"""Fill of pixels that rotations, shears and translations uncover (torchvision uses 0)."""


def dali_seed(*values: int) -> int:
    """A non-negative 31-bit seed for a DALI pipeline or operator."""
    return mix_seed(*values) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------
# What the readers read


@dataclasses.dataclass
class Source:
    """The files behind a data set, in the form DALI's readers take them."""

    kind: str
    """``webdataset`` or ``files``."""
    tars: list[Path] = dataclasses.field(default_factory=list)
    indexes: list[Path] = dataclasses.field(default_factory=list)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)
    """The user's shard for each tar that DALI reads (a decompressed copy names its source)."""


def prepare_source(path: str, index: SampleIndex, cache_dir: Path) -> Source:
    """Resolve ``path`` to plain tars with DALI index files, or to an ImageFolder file list."""
    if is_image_folder(path):
        return Source("files")

    # Imported here because the shard tool imports this package.
    from ..shards import prepare_for_dali

    shards = expand_shards(path)
    tars, indexes = prepare_for_dali(shards, cache_dir)
    origins = {str(tar): str(shard) for tar, shard in zip(tars, shards)}
    return Source("webdataset", tars, indexes, origins)


def read_encoded(source: Source, index: SampleIndex, *, order_seed: int, shard_id: int,
                 num_shards: int, shuffle: bool):
    """Add the reader to the pipeline being defined; return ``(encoded images, labels)``.

    For ``webdataset`` the labels are the raw ``.cls`` bytes. For ``files`` they are
    sample numbers into ``index``, which hold the class and the key.
    """
    from nvidia.dali import fn

    common = dict(
        name=READER_NAME, shard_id=shard_id, num_shards=num_shards, pad_last_batch=True,
        stick_to_shard=True, seed=order_seed,
    )
    if source.kind == "webdataset":
        order = list(range(len(source.tars)))
        if shuffle:
            random.Random(order_seed).shuffle(order)
        return fn.readers.webdataset(
            paths=[str(source.tars[i]) for i in order],
            index_paths=[str(source.indexes[i]) for i in order],
            ext=[IMAGE_EXTENSIONS, "cls"], missing_component_behavior="error",
            random_shuffle=shuffle, **common,
        )

    # A full permutation of the file list: the reader itself need not shuffle.
    numbers = list(range(len(index)))
    if shuffle:
        random.Random(order_seed).shuffle(numbers)
    return fn.readers.file(
        files=[index.samples[i].source for i in numbers], labels=numbers, **common,
    )


# ---------------------------------------------------------------------------------------
# Pipeline graphs


def base_crop(encoded, image_size: int, decode_device: str, hw_decoder_load: Optional[float]):
    """Decode and apply the base crop: padded random crop (small) or random-resized crop."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    decoder_args = {} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}
    if image_size > augment.SMALL_IMAGE_MAX:
        # Decodes only the sampled window (libjpeg-turbo on CPU, nvJPEG on GPU).
        image = fn.decoders.image_random_crop(
            encoded, device=decode_device, output_type=types.RGB, random_area=list(RANDOM_AREA),
            random_aspect_ratio=list(RANDOM_ASPECT_RATIO), num_attempts=10, **decoder_args,
        )
        return fn.resize(image, resize_x=image_size, resize_y=image_size, antialias=True)

    # Padded random crop: the window's top-left corner is uniform over
    # [-padding, side - image_size + padding] on each axis, and the uncovered border is 0,
    # like torchvision's RandomCrop(padding=4). The shape comes from the encoded header.
    padding = augment.CROP_PADDING
    height_width = fn.cast(fn.peek_image_shape(encoded)[0:2], dtype=types.FLOAT)
    uniform = fn.random.uniform(range=[0.0, 1.0], shape=[2])
    start = dmath.floor(uniform * (height_width - image_size + 2 * padding + 1)) - padding
    image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **decoder_args)
    return fn.slice(
        image, start=fn.cast(start, dtype=types.INT32), shape=[image_size, image_size],
        axis_names="HW", out_of_bounds_policy="pad", fill_values=FILL_VALUE,
    )


def branch_augmentation(image, name: str, image_size: int):
    """Apply the augmentation called ``name``; return the image and the mirror flag for the
    normalization step (horizontal flips are folded into it, which is exact because
    normalization acts per channel)."""
    from nvidia.dali import fn, types
    from nvidia.dali.auto_aug import auto_augment, rand_augment, trivial_augment

    shape = (image_size, image_size)
    if name == "none":
        return image, 0
    if name == "hflip":
        return image, fn.random.coin_flip(probability=0.5)
    if name == "vflip":
        return fn.flip(image, horizontal=0, vertical=fn.random.coin_flip(probability=0.5)), 0
    if name == "rotate":
        angle = fn.random.uniform(range=[-augment.ROTATE_DEGREES, augment.ROTATE_DEGREES])
        # Nearest-neighbour and zero fill, as torchvision's RandomRotation defaults.
        return fn.rotate(image, angle=angle, keep_size=True, fill_value=FILL_VALUE,
                         interp_type=types.INTERP_NN), 0
    if name == "randaugment":
        return rand_augment.rand_augment(image, n=RANDAUGMENT_OPS, m=RANDAUGMENT_MAGNITUDE,
                                         num_magnitude_bins=MAGNITUDE_BINS, shape=shape,
                                         fill_value=FILL_VALUE), 0
    if name == "autoaugment":
        return auto_augment.auto_augment(image, "image_net", shape=shape, fill_value=FILL_VALUE), 0
    if name == "trivialaugment":
        return trivial_augment.trivial_augment_wide(image, num_magnitude_bins=MAGNITUDE_BINS,
                                                    shape=shape, fill_value=FILL_VALUE), 0
    augment.check_augmentations([name], DALI_AUGMENTATIONS, backend="DALI")
    raise AssertionError(f"augmentation {name!r} is valid but has no DALI implementation")


def normalize(image, mean: Sequence[float], std: Sequence[float], mirror=0, **crop):
    """Scale to float, normalize with ``mean``/``std`` (given on the 0..1 scale), lay out CHW."""
    from nvidia.dali import fn, types

    return fn.crop_mirror_normalize(
        image, dtype=types.FLOAT, output_layout="CHW", mean=[255.0 * m for m in mean],
        std=[255.0 * s for s in std], mirror=mirror, **crop,
    )


def _pipeline_definition(kind: str):
    from nvidia.dali import pipeline_def

    # auto_aug branches on random draws with Python ``if`` statements, which DALI only
    # turns into per-sample conditionals when the pipeline enables them.
    @pipeline_def(enable_conditionals=True)
    def train_graph(source, index, reader_args, augmentation, image_size, mean, std,
                    decode_device, hw_decoder_load):
        encoded, labels = read_encoded(source, index, **reader_args)
        image = base_crop(encoded, image_size, decode_device, hw_decoder_load)
        image, mirror = branch_augmentation(image, augmentation, image_size)
        return normalize(image, mean, std, mirror=mirror), labels

    @pipeline_def
    def eval_graph(source, index, reader_args, image_size, mean, std, decode_device, hw_decoder_load):
        from nvidia.dali import fn, types

        encoded, labels = read_encoded(source, index, **reader_args)
        decoder_args = {} if hw_decoder_load is None else {"hw_decoder_load": hw_decoder_load}
        image = fn.decoders.image(encoded, device=decode_device, output_type=types.RGB, **decoder_args)
        shorter = image_size if image_size <= augment.SMALL_IMAGE_MAX else round(image_size * augment.RESIZE_RATIO)
        image = fn.resize(image, resize_shorter=shorter, antialias=True)
        return normalize(image, mean, std, crop=(image_size, image_size)), labels

    return train_graph if kind == "train" else eval_graph


def build_pipeline(kind: str, *, batch_size: int, num_threads: int, device: torch.device,
                   seed: int, prefetch_depth: int, checkpoint: Optional[str] = None, **graph_args):
    """Build a train or eval pipeline for ``device``: GPU decoding and operators on CUDA,
    CPU operators only (``device_id=None``) elsewhere."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    else:
        device_id = None
        graph_args["hw_decoder_load"] = None
    graph_args["decode_device"] = "mixed" if on_gpu else "cpu"

    extra = {"enable_checkpointing": True, "checkpoint": checkpoint} if kind == "train" else {}
    with warnings.catch_warnings():
        # auto_aug in DALI 2.4 calls deprecated fn.experimental aliases, and DALI forces
        # those warnings on with its own simplefilter("default"), so a filter cannot hide
        # them. They would repeat at every build (each epoch and branch); drop only them.
        show = warnings.showwarning

        def show_unless_dali_alias(message, category, *args, **kwargs):
            if not (category is DeprecationWarning and "nvidia.dali.fn.experimental" in str(message)):
                show(message, category, *args, **kwargs)

        warnings.showwarning = show_unless_dali_alias
        pipeline = _pipeline_definition(kind)(
            batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
            prefetch_queue_depth=prefetch_depth, **extra, **graph_args,
        )
        pipeline.build()
    return pipeline


# ---------------------------------------------------------------------------------------
# From DALI outputs to torch


def images_to_torch(images, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI batch into a new torch tensor on ``device``.

    On CUDA the copy runs device to device on torch's current stream, never through host
    memory; DALI's buffer is reused by the next run, so torch needs its own.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = images.as_tensor()
    output = torch.empty(tensor.shape(), dtype=torch.float32, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(tensor, output, cuda_stream=stream)
    return output


def labels_and_keys(labels, source: Source, index: SampleIndex,
                    num_classes: Optional[int]) -> tuple[list[int], list[str]]:
    """Parse a batch of reader labels; errors name the shard and the key."""
    values, keys = [], []
    for i in range(len(labels)):
        item = labels[i]
        if source.kind == "files":
            sample = index.samples[int(_numpy(item).reshape(-1)[0])]
            values.append(sample.label)
            keys.append(sample.key)
            continue

        # source_info is "<tar path>:<offset>:<member name>".
        location, _, member = item.source_info().rpartition(":")
        tar = location.rpartition(":")[0]
        shard = source.origins.get(tar, tar)
        key = member.removesuffix(".cls")
        text = bytes(_numpy(item)).decode("ascii", "replace").strip()
        if not text.isdigit():
            raise DataError(f"key {key} in {shard}: .cls must hold the class index as ASCII decimal text, found {text[:20]!r}")
        label = int(text)
        if num_classes is not None and label >= num_classes:
            raise DataError(
                f"label {label} of key {key} in {shard} is out of range: "
                f"model.num_classes={num_classes} allows 0..{num_classes - 1}"
            )
        values.append(label)
        keys.append(key)
    return values, keys


def _numpy(item):
    import numpy

    return numpy.asarray(item)


def run_pipeline(pipeline, what: str):
    """Run one step of ``pipeline``, turning DALI's errors into :class:`DataError`."""
    try:
        return pipeline.run()
    except RuntimeError as error:
        raise DataError(f"the DALI pipeline of {what} failed: {error}") from error


# ---------------------------------------------------------------------------------------
# The backend


def _check_common(augmentations: Sequence[str], skip_decode_errors: bool, last_batch: str) -> None:
    augment.check_augmentations(augmentations, DALI_AUGMENTATIONS, backend="DALI")
    if skip_decode_errors:
        raise ValueError(
            "data.on_decode_error=skip is not supported by the DALI backend, whose decoders "
            "cannot drop a sample from a batch; use data.backend=torchvision, or find and "
            "remove the bad images with `lookaround-shards verify`"
        )
    if last_batch not in ("drop", "pad"):
        raise ValueError(f"last_batch must be drop or pad, found {last_batch!r}")


class _CacheFolder:
    """The folder for index files and decompressed shards: given, or temporary per process."""

    def __init__(self, cache_dir: Optional[str | Path]):
        self.temporary = cache_dir is None
        self.path = Path(tempfile.mkdtemp(prefix="lookaround-dali-")) if cache_dir is None else Path(cache_dir)

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


class DaliTrainData(TrainData):
    """Training input of one rank from DALI pipelines, one per hosted branch.

    ``cache_dir`` holds DALI index files and decompressed shards; without it a temporary
    folder is made and removed by :meth:`close`. ``num_threads`` is the rank's CPU thread
    budget, split among the hosted branches' pipelines.
    """

    def __init__(self, path: str, index: SampleIndex, placement: Placement,
                 augmentations: Sequence[str], image_size: int, batch_size: int,
                 num_threads: int, mean, std, independent_sampling: bool = False,
                 last_batch: str = "drop", skip_decode_errors: bool = False,
                 max_steps_per_epoch: int = 0, device: torch.device = torch.device("cpu"),
                 prefetch_depth: int = 2, hw_decoder_load: float = 0.65,
                 cache_dir: Optional[str | Path] = None, num_classes: Optional[int] = None):
        _check_common(augmentations, skip_decode_errors, last_batch)
        self.placement = placement
        self.augmentations = list(augmentations)
        self.index = index
        self.image_size = image_size
        self.batch_size = batch_size
        self.threads_per_pipeline = max(1, num_threads // len(placement.branch_indices))
        self.mean, self.std = list(mean), list(std)
        self.independent_sampling = independent_sampling
        self.device = torch.device(device)
        self.prefetch_depth = max(1, prefetch_depth)
        self.hw_decoder_load = hw_decoder_load
        self.num_classes = num_classes

        # Stage 1: steps per epoch from the sample count, the same on every rank.
        s = placement.ranks_per_branch
        global_batch = batch_size * s
        num_samples = len(index)
        if last_batch == "drop" and num_samples < global_batch:
            raise DataError(
                f"{num_samples} training samples cannot fill one base batch of {global_batch} "
                f"(data.batch_size={batch_size} x {s} ranks per branch); use a smaller batch "
                f"or data.last_batch=pad"
            )
        full = num_samples // global_batch if last_batch == "drop" else math.ceil(num_samples / global_batch)
        self._steps = min(full, max_steps_per_epoch) if max_steps_per_epoch > 0 else full

        # Stage 2: plain tars and index files in the cache folder.
        self._cache = _CacheFolder(cache_dir)
        self.source = prepare_source(path, index, self._cache.path)
        if self.source.kind == "webdataset" and len(self.source.tars) < s:
            log.warning(
                "%d shard file(s) for %d ranks per branch: the ranks of a branch read slices of "
                "the same files, and which samples each rank sees changes little between epochs; "
                "write at least %d shards (lookaround-shards pack --samples-per-shard)",
                len(self.source.tars), s, s,
            )

        self.epoch = 0
        self.step_in_epoch = 0
        self.last_keys: list[list[str]] = []
        """Keys of the samples of the latest step, one list per hosted branch (for checks)."""
        self._pipelines: list = []
        self._pipelines_epoch: Optional[int] = None
        self._checkpoints: Optional[list[str]] = None

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.step_in_epoch = 0
            self._checkpoints = None
            self._release()
        self.epoch = epoch

    def _build(self, checkpoints: Optional[list[str]]) -> list:
        pipelines = []
        for slot, branch in enumerate(self.placement.branch_indices):
            salt = branch + 1 if self.independent_sampling else 0
            reader_args = dict(
                order_seed=dali_seed(self.placement.seed, self.epoch, salt),
                shard_id=self.placement.position, num_shards=self.placement.ranks_per_branch,
                shuffle=True,
            )
            pipeline = build_pipeline(
                "train", batch_size=self.batch_size, num_threads=self.threads_per_pipeline,
                device=self.device, prefetch_depth=self.prefetch_depth,
                seed=dali_seed(self.placement.seed, self.epoch, branch, self.placement.position, 1),
                checkpoint=checkpoints[slot] if checkpoints else None,
                source=self.source, index=self.index, reader_args=reader_args,
                augmentation=self.augmentations[branch], image_size=self.image_size,
                mean=self.mean, std=self.std, hw_decoder_load=self.hw_decoder_load,
            )
            self._check_reader(pipeline)
            pipelines.append(pipeline)
        return pipelines

    def _check_reader(self, pipeline) -> None:
        found = pipeline.reader_meta(READER_NAME)["epoch_size"]
        if found != len(self.index):
            raise DataError(
                f"DALI's reader found {found} samples in {self.source.kind} data but the sample "
                f"index has {len(self.index)}; every sample needs exactly one image and one .cls"
            )

    def _release(self) -> None:
        self._pipelines = []
        self._pipelines_epoch = None

    def _step(self) -> list[Batch]:
        batches, keys = [], []
        for pipeline, branch in zip(self._pipelines, self.placement.branch_indices):
            images, labels = run_pipeline(pipeline, f"branch {branch} (epoch {self.epoch})")
            values, branch_keys = labels_and_keys(labels, self.source, self.index, self.num_classes)
            batches.append((images_to_torch(images, self.device),
                            torch.tensor(values, dtype=torch.int64).to(self.device)))
            keys.append(branch_keys)
        self.last_keys = keys
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        start = self.step_in_epoch
        # Pipelines kept from an interrupted iteration of this epoch stand at step_in_epoch.
        if not self._pipelines or self._pipelines_epoch != self.epoch:
            self._pipelines = self._build(self._checkpoints if start > 0 else None)
            self._pipelines_epoch = self.epoch
            if start > 0 and not self._checkpoints:
                # A state without DALI checkpoints: replay the steps already taken.
                for _ in range(start):
                    for pipeline, branch in zip(self._pipelines, self.placement.branch_indices):
                        run_pipeline(pipeline, f"branch {branch} (epoch {self.epoch})")
        self._checkpoints = None

        for step in range(start, self._steps):
            batches = self._step()
            self.step_in_epoch = step + 1
            yield batches

        # The next iteration repeats this epoch's order unless set_epoch changes it.
        self.step_in_epoch = 0
        self._release()

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}
        if self.step_in_epoch > 0 and self._pipelines:
            state["dali_checkpoints"] = [pipeline.checkpoint() for pipeline in self._pipelines]
        return state

    def load_state_dict(self, state: dict) -> None:
        self._release()
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])
        checkpoints = state.get("dali_checkpoints")
        self._checkpoints = list(checkpoints) if checkpoints else None

    def close(self) -> None:
        self._release()
        self._cache.close()


class DaliEvalData(EvalData):
    """Validation input of one rank: DALI shard ``rank`` of ``world_size``, in stored order.

    DALI splits the samples into contiguous slices, pads every slice to the largest one by
    repeating its last sample, and runs the same number of batches on every rank. The
    padded duplicates are cut from the last batches, so every sample is seen exactly once
    over all ranks.
    """

    def __init__(self, path: str, index: SampleIndex, rank: int, world_size: int,
                 image_size: int, batch_size: int, num_threads: int, mean, std,
                 device: torch.device = torch.device("cpu"), prefetch_depth: int = 2,
                 hw_decoder_load: float = 0.65, cache_dir: Optional[str | Path] = None,
                 num_classes: Optional[int] = None):
        self.index = index
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.num_classes = num_classes
        self._cache = _CacheFolder(cache_dir)
        self.source = prepare_source(path, index, self._cache.path)
        self._graph_args = dict(
            batch_size=batch_size, num_threads=max(1, num_threads), device=self.device, seed=0,
            prefetch_depth=max(1, prefetch_depth), source=self.source, index=index,
            reader_args=dict(order_seed=0, shard_id=rank, num_shards=world_size, shuffle=False),
            image_size=image_size, mean=list(mean), std=list(std), hw_decoder_load=hw_decoder_load,
        )
        # DALI's slice bounds: sample numbers [N * r // W, N * (r + 1) // W).
        n = len(index)
        self.rank_samples = n * (rank + 1) // world_size - n * rank // world_size
        self.last_keys: list[str] = []
        """Keys of the samples of the latest batch (for checks)."""
        self._pipeline = None
        self._batches_per_pass = 0

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def _ensure_pipeline(self) -> None:
        if self._pipeline is not None:
            return
        self._pipeline = build_pipeline("eval", **self._graph_args)
        meta = self._pipeline.reader_meta(READER_NAME)
        if meta["epoch_size"] != len(self.index):
            raise DataError(
                f"DALI's reader found {meta['epoch_size']} validation samples but the sample "
                f"index has {len(self.index)}"
            )
        padded_slice = meta["epoch_size_padded"] // meta["number_of_shards"]
        self._batches_per_pass = math.ceil(padded_slice / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        self._ensure_pipeline()
        remaining = self.rank_samples
        finished = False
        try:
            # Every batch of the pass is run, padding included, so that the pipeline's
            # reader stands at the start of its slice when the next pass begins.
            for _ in range(self._batches_per_pass):
                images, labels = run_pipeline(self._pipeline, f"validation rank {self.rank}")
                take = min(remaining, len(labels))
                remaining -= take
                if take == 0:
                    continue
                values, keys = labels_and_keys(labels, self.source, self.index, self.num_classes)
                self.last_keys = keys[:take]
                yield (images_to_torch(images, self.device)[:take],
                       torch.tensor(values[:take], dtype=torch.int64).to(self.device))
            finished = True
        finally:
            if not finished:
                # An abandoned pass leaves the reader mid-slice; start the next one afresh.
                self._pipeline = None

    def close(self) -> None:
        self._pipeline = None
        self._cache.close()

"""The built-in trainer: glue over the public API, the input backends and the checkpoints.

One call of :func:`train` runs one process of a run under torchrun. Its stages:

1. check everything that can be checked without a process group (layout, names, data);
2. join the process group and create the branch and peer groups;
3. build the branches (identical start), their optimizers, schedulers and input;
4. resume from the latest checkpoint when asked;
5. train epoch by epoch: rounds of k steps, each ended by the non-finite guard and the
   average step; every epoch ends on an average step, then the consensus is evaluated on
   all ranks and a checkpoint is saved.

``train.method`` picks Lookaround or a baseline (:mod:`lookaround_dist.methods`). Each
round's diversity is measured before its average step, and each branch is scored before
the epoch's last average step (:mod:`lookaround_dist.diversity`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import hashlib
import logging
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from .batchnorm import recalibrate_batchnorm, training_images
from .config import RunConfig, save_config
from .data import DataError, build_eval_data, build_train_data, open_index, resolve_backend
from .data.sources import expand_shards, is_image_folder
from .data.augment import AUGMENTATIONS, check_augmentations
from .evaluation import evaluate_model
from .distributed import barrier, collective, env_world, gather_hosts, init_process_group, select_device
from .diversity import evaluate_branches, gather_branch_modules, measure_diversity
from .methods import (SINGLE_MODEL_METHODS, Lookahead, StochasticWeightAverage, batches_for_branches,
                      build_branches, data_placement, model_branch_count)
from .metrics import MetricsWriter, Progress, truncate_metrics
from .models import check_model_name, model_factory
from .preemption import PREEMPTED_EXIT_CODE, StopRequest, ignore_in_loader_workers
from .schedule import build_optimizer, build_scheduler
from .topology import Layout, Topology
from .tracking import Tracker

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """A branch whose weights hold NaN or infinity, under train.nonfinite_policy=stop."""


@dataclasses.dataclass
class Progression:
    """Progress counters of the run, saved in every checkpoint."""

    epoch: int = 0
    global_step: int = 0
    wall_seconds: float = 0.0
    best_top1: float = 0.0


def run_dir_of(config: RunConfig) -> Path:
    return Path(config.train.output_dir) / config.train.run_name


def amp_dtype(config: RunConfig, device: torch.device) -> Optional[torch.dtype]:
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def preflight(config: RunConfig, world_size: int, rank: int):
    """Check layout, names and data before any process group exists.

    Returns the layout, the resolved backend and the train and validation indices. Every
    rank runs the same checks on the same inputs, so a bad input stops every rank with the
    same message instead of leaving some waiting in a collective.
    """
    num_branches = model_branch_count(config.train.method, config.lookaround.num_branches)
    layout = Layout(world_size=world_size, num_branches=num_branches, rank=rank)
    check_model_name(config.model.name)
    backend = resolve_backend(config.data.backend)
    if backend == "dali":
        from .data.dali_backend import DALI_AUGMENTATIONS

        check_augmentations(config.data.augmentations, DALI_AUGMENTATIONS, backend="DALI")
    else:
        check_augmentations(config.data.augmentations, AUGMENTATIONS)
    train_index = open_index(config.data.train_path, config.model.num_classes)
    val_index = open_index(config.data.val_path, config.model.num_classes) if config.data.val_path else None
    global_batch = config.data.batch_size * layout.ranks_per_branch
    if config.data.last_batch == "drop" and len(train_index) < global_batch:
        raise ValueError(
            f"{len(train_index)} training samples cannot fill one base batch of {global_batch} "
            f"(data.batch_size={config.data.batch_size} x {layout.ranks_per_branch} ranks per branch)"
        )
    if backend == "dali":
        check_shard_count(config.data.train_path, layout.ranks_per_branch)
    return layout, backend, train_index, val_index


def check_shard_count(train_path: str, ranks_per_branch: int) -> None:
    """Raise DataError when DALI would give the ranks of a branch fewer shard files than ranks.

    DALI's reader splits the samples into one contiguous slice per rank. With fewer files
    than ranks, a rank keeps reading the same part of the same file every epoch, so the
    ranks of a branch never exchange samples. The torchvision backend reads samples by
    index and has no such limit.
    """
    if is_image_folder(train_path):
        return
    shards = expand_shards(train_path)
    if len(shards) < ranks_per_branch:
        raise DataError(
            f"data.backend=dali needs at least one training shard per rank of a branch: expected "
            f">= {ranks_per_branch} shards, found {len(shards)} in {train_path}. Repack the data "
            f"into more shards (lookaround-shards pack --samples-per-shard) or use "
            f"data.backend=torchvision"
        )


class Trainer:
    def __init__(self, config: RunConfig, resume: bool = False):
        self.config = config
        self.rank, self.local_rank, self.world_size = env_world()
        self.layout, self.backend, self.train_index, self.val_index = preflight(
            config, self.world_size, self.rank)
        if config.train.threads_per_rank > 0:
            torch.set_num_threads(config.train.threads_per_rank)

        # Stage 2: process groups.
        self.device = select_device(config.train.device, self.local_rank)
        init_process_group(self.device, config.train.timeout_seconds)
        timeout = datetime.timedelta(seconds=config.train.timeout_seconds)
        self.method = config.train.method
        # Single-model methods (sgd, lookahead) train one branch over all ranks.
        self.topology = Topology.create(model_branch_count(self.method, config.lookaround.num_branches),
                                        timeout=timeout)
        with collective("the start-up exchange of host names"):
            self.hosts = gather_hosts()
        self.run_dir = self._prepare_run_dir(resume)

        # Stage 3: branches, optimizers, input.
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        channels_last = config.train.channels_last
        if channels_last is None:
            channels_last = self.device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.amp_dtype = amp_dtype(config, self.device)
        torch.manual_seed(config.train.seed)
        self.lookaround = build_branches(
            self.method,
            model_factory(config.model.name, config.model.num_classes, config.data.image_size,
                          config.model.weights_path),
            self.topology, k=config.lookaround.k,
            average_optimizer_state=config.lookaround.average_optimizer_state,
            device=self.device, memory_format=self.memory_format,
        )
        placement = data_placement(self.method, self.topology, config.lookaround.num_branches, config.train.seed)
        # Batches (one per augmentation) that each step of one branch trains on.
        self.batches_per_branch = config.lookaround.num_branches if self.method in SINGLE_MODEL_METHODS else 1
        self.train_data = build_train_data(config, self.train_index, placement, self.device, self.backend)
        self.eval_data = (build_eval_data(config, self.val_index, self.rank, self.world_size,
                                          self.device, self.backend)
                          if self.val_index is not None else None)
        steps = self.train_data.steps_per_epoch
        for branch in self.lookaround.branches:
            branch.optimizer = build_optimizer(config, branch.module.parameters())
            branch.scheduler = build_scheduler(config, branch.optimizer, steps)
            if self.amp_dtype == torch.float16:
                branch.scaler = torch.amp.GradScaler(self.device.type)
            if config.train.compile:
                branch.model = torch.compile(branch.model)
        self.last_consensus = None  # kept for nonfinite_policy=rollback
        self.lookahead = (Lookahead(self.lookaround.consensus, config.train.lookahead_alpha)
                          if self.method == "lookahead" else None)
        self.swa = StochasticWeightAverage(self.lookaround.consensus) if config.train.swa_epochs > 0 else None
        self.swa_lr = 0.0  # the constant learning rate of the current epoch, 0 outside SWA epochs
        self.branch_modules = None  # every branch's copy for evaluation, reused across epochs
        self.branch_results: dict = {}
        self.branch_evaluation_seconds = 0.0  # time spent scoring branches in the current epoch

        # Stage 4: resume.
        self.progress = Progression()
        self.wandb_id: Optional[str] = None
        self.checkpoints = self.run_dir / "checkpoints"
        if resume:
            self._resume()
        stop_signals = ("SIGTERM", config.train.preemption_signal)
        self.stop_request = StopRequest(stop_signals)
        # NOTE: reaches into the torchvision backend's DataLoaders (their ``loader``
        # attribute); DALI runs threads, not processes, and needs nothing.
        for data in (self.train_data, self.eval_data):
            if data is not None and hasattr(data, "loader"):
                ignore_in_loader_workers(data.loader, stop_signals)
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl" if self.rank == 0 else None)
        self.tracker = Tracker(config, self.run_dir, self.rank, self.wandb_id)
        self.wandb_id = self.tracker.run_id
        self._log_summary()

    # ----- set-up helpers ------------------------------------------------------------
    def _prepare_run_dir(self, resume: bool) -> Path:
        config = self.config
        if not config.train.run_name:
            name = [f"{config.model.name}-d{config.lookaround.num_branches}-k{config.lookaround.k}-"
                    f"{time.strftime('%Y%m%d-%H%M%S')}"]
            if self.topology.distributed:
                dist.broadcast_object_list(name, src=0)
            config.train.run_name = name[0]
        run_dir = run_dir_of(config)
        error = None
        if self.rank == 0:
            if (run_dir / "config.yaml").exists() and not resume:
                error = (f"run directory {run_dir} already holds a run; pass --resume to continue "
                         f"it or choose another train.run_name")
            else:
                run_dir.mkdir(parents=True, exist_ok=True)
                if not (run_dir / "config.yaml").exists():
                    save_config(config, run_dir / "config.yaml")
                else:
                    save_config(config, run_dir / f"config-resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        errors = [error]
        if self.topology.distributed:
            dist.broadcast_object_list(errors, src=0)
        if errors[0]:
            raise FileExistsError(errors[0])
        return run_dir

    def _layout_fingerprint(self) -> dict:
        return {
            "model": self.config.model.name,
            "num_classes": self.config.model.num_classes,
            "num_branches": self.topology.num_branches,
            "world_size": self.world_size,
        }

    def _log_summary(self) -> None:
        config, topology = self.config, self.topology
        parameters = sum(p.numel() for p in self.lookaround.consensus.parameters())
        lines = [
            f"lookaround-dist run {self.run_dir}",
            f"world size W={self.world_size}, branches d={topology.num_branches}, k={self.lookaround.k}, "
            f"{topology.ranks_per_branch} rank(s) per branch, {topology.branches_per_rank} branch(es) per rank, "
            f"device {self.device.type}, backend {'nccl' if self.device.type == 'cuda' else 'gloo'}",
        ]
        for b in range(topology.num_branches):
            ranks = self.layout.branch_ranks(b)
            hosts = sorted({self.hosts[r] for r in ranks})
            lines.append(f"  branch {b}: augmentation {config.data.augmentations[b]}, ranks {list(ranks)} on {', '.join(hosts)}")
            if len(hosts) > 1:
                log.warning("branch %d spans nodes %s: its per-step gradient all-reduce crosses the network", b, hosts)
        lines += [
            f"model {config.model.name}: {parameters:,} parameters, {config.model.num_classes} classes, "
            f"precision {self.amp_dtype or torch.float32}, "
            f"{'channels-last' if self.memory_format == torch.channels_last else 'contiguous'}",
            f"data backend {self.backend}: {len(self.train_index)} training samples, "
            f"{len(self.val_index) if self.val_index is not None else 0} validation samples, "
            f"batch {config.data.batch_size} per rank and branch, "
            f"{self.train_data.steps_per_epoch} steps per epoch, {config.train.epochs} epochs",
            f"method {self.method}" + (f": one model, {self.batches_per_branch} augmentations per step"
                                       if self.batches_per_branch > 1 else ""),
            f"optimizer {config.optim.name} lr {config.optim.lr} ({config.optim.schedule}, "
            f"{config.optim.warmup_epochs} warm-up epochs)",
        ]
        for line in lines:
            log.info(line)

    # ----- checkpoints ---------------------------------------------------------------
    def _nonfinite_modules(self) -> list[int]:
        """Global indices of branches whose parameters or floating-point buffers hold NaN or
        infinity on any rank; the same list on every rank (one collective)."""
        flags = torch.zeros(self.topology.num_branches, dtype=torch.float32, device=self.device)
        for branch in self.lookaround.branches:
            tensors = [t.detach() for t in branch.module.state_dict().values() if t.is_floating_point()]
            total = torch.stack(torch._foreach_norm(tensors)).sum()
            flags[branch.index] = (~torch.isfinite(total)).float()
        if self.topology.distributed:
            with collective("the finiteness check before a checkpoint"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [b for b, flag in enumerate(flags.tolist()) if flag > 0]

    def save_checkpoint(self) -> Path:
        """Save on all ranks; global rank 0 commits the folder after a barrier.

        Raises NonFiniteError, and writes nothing, when any branch holds non-finite weights:
        a checkpoint is only useful if training can continue from it.
        """
        step = self.progress.global_step
        # Independent branches never agree, so they are saved per rank as inside a round.
        mid_round = self.lookaround.steps_in_round > 0 or self.method == "independent"
        bad = self._nonfinite_modules()
        if bad:
            previous = ckpt.latest_checkpoint(self.checkpoints)
            raise NonFiniteError(
                f"checkpoint at step {step} not saved: branch(es) {bad} hold non-finite weights; "
                f"the latest saved checkpoint is {previous or 'none'}"
            )
        if self.rank == 0:
            ckpt.prepare_folder(self.checkpoints, step)
        barrier("the checkpoint barrier before writing")
        folder = ckpt.partial_path(self.checkpoints, step)
        topology = self.topology

        if self.rank == 0:
            ckpt.atomic_save(self.lookaround.consensus.state_dict(), folder / "consensus.pt")
            ckpt.atomic_save({
                "layout": self._layout_fingerprint(),
                "progress": dataclasses.asdict(self.progress),
                "steps_in_round": self.lookaround.steps_in_round,
                "rounds_completed": self.lookaround.rounds_completed,
                "mid_round": mid_round,
                "wandb_id": self.wandb_id,
                "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
                "swa": self.swa.state_dict() if self.swa is not None else None,
            }, folder / "meta.pt")
        if topology.position == 0:
            for branch in self.lookaround.branches:
                ckpt.atomic_save({
                    "optimizer": branch.optimizer.state_dict(),
                    "scheduler": branch.scheduler.state_dict(),
                    "scaler": branch.scaler.state_dict() if branch.scaler is not None else None,
                }, folder / f"branch-{branch.index}.pt")
        rank_state = {"random": ckpt.random_states(), "data": self.train_data.state_dict()}
        if mid_round:
            # Inside a round the branches differ, and so do the running statistics of the
            # ranks of one branch: keep every rank's own modules.
            rank_state["modules"] = {str(b.index): b.module.state_dict() for b in self.lookaround.branches}
        ckpt.atomic_save(rank_state, folder / f"rank-{self.rank}.pt")
        barrier("the checkpoint barrier after writing")
        final = ckpt.partial_path(self.checkpoints, step).with_suffix("")
        if self.rank == 0:
            final = ckpt.commit_folder(self.checkpoints, step, self.config.train.keep_checkpoints)
        barrier("the checkpoint barrier after the commit")
        log.info("checkpoint saved: %s", final)
        return final

    def _resume(self) -> None:
        folder = ckpt.latest_checkpoint(self.checkpoints)
        if folder is None:
            log.info("no checkpoint in %s: starting a new run", self.checkpoints)
            return
        meta = ckpt.load_file(folder / "meta.pt")
        ckpt.check_compatible(meta["layout"], self._layout_fingerprint(), folder)
        consensus = ckpt.load_file(folder / "consensus.pt")
        rank_state = ckpt.load_file(folder / f"rank-{self.rank}.pt")
        for branch in self.lookaround.branches:
            state = ckpt.load_file(folder / f"branch-{branch.index}.pt")
            if meta["mid_round"]:
                branch.module.load_state_dict(rank_state["modules"][str(branch.index)])
            else:
                branch.module.load_state_dict(consensus)
            branch.optimizer.load_state_dict(state["optimizer"])
            branch.scheduler.load_state_dict(state["scheduler"])
            if branch.scaler is not None and state["scaler"] is not None:
                branch.scaler.load_state_dict(state["scaler"])
        self.lookaround.steps_in_round = meta["steps_in_round"]
        self.lookaround.rounds_completed = meta["rounds_completed"]
        self.progress = Progression(**meta["progress"])
        self.wandb_id = meta.get("wandb_id")
        if self.lookahead is not None and meta.get("lookahead") is not None:
            self.lookahead.load_state_dict(meta["lookahead"])
        if self.swa is not None and meta.get("swa") is not None:
            self.swa.load_state_dict(meta["swa"])
        self.train_data.load_state_dict(rank_state["data"])
        ckpt.restore_random_states(rank_state["random"])
        log.info("resumed from %s: epoch %d, step %d", folder, self.progress.epoch, self.progress.global_step)
        if self.rank == 0:
            dropped = truncate_metrics(self.run_dir / "metrics.jsonl", self.progress.global_step)
            if dropped:
                log.info("dropped %d metrics record(s) written after that checkpoint; they are "
                         "written again as the run repeats those steps", dropped)
        if self.progress.epoch >= self.config.train.epochs:
            log.info("the run already finished its %d epochs: nothing to train (raise train.epochs "
                     "to train further)", self.config.train.epochs)

    # ----- the round boundary --------------------------------------------------------
    def _nonfinite_branches(self) -> list[int]:
        """Global indices of branches holding NaN or infinity; the same list on every rank."""
        flags = torch.zeros(self.topology.num_branches + 1, dtype=torch.float32, device=self.device)
        for branch in self.lookaround.branches:
            params = [p.detach() for p in branch.module.parameters()]
            total = torch.stack(torch._foreach_norm(params)).sum()
            flags[branch.index] = (~torch.isfinite(total)).float()
        flags[-1] = 1.0 if self.stop_request.received else 0.0
        if self.topology.distributed:
            # One collective, so that every rank takes the same decision.
            with collective("the stop and non-finite agreement before the average step"):
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        values = flags.tolist()
        self._stop_agreed = values[-1] > 0
        return [b for b in range(self.topology.num_branches) if values[b] > 0]

    def end_round(self, epoch_end: bool = False) -> None:
        """Run the non-finite guard, the diversity measurement, then the average step.

        The check that integer buffers agree on every rank costs a collective of its own,
        so it runs at the epoch's last average step only.
        """
        bad = self._nonfinite_branches()
        healthy = None
        if bad:
            policy = self.config.train.nonfinite_policy
            where = f"epoch {self.progress.epoch}, step {self.progress.global_step}"
            if policy == "stop" or (policy == "skip" and len(bad) == self.topology.num_branches):
                raise NonFiniteError(
                    f"non-finite weights in branch(es) {bad} at {where} (train.nonfinite_policy="
                    f"{policy}); lower optim.lr, use "
                    f"train.precision=fp32, or set train.nonfinite_policy=skip or rollback"
                )
            if policy == "skip":
                log.warning("non-finite weights in branch(es) %s at %s: averaging the other branches", bad, where)
                healthy = [b not in bad for b in range(self.topology.num_branches)]
                for branch in self.lookaround.branches:
                    if branch.index in bad:
                        branch.optimizer.state.clear()
            else:
                log.warning("non-finite weights in branch(es) %s at %s: rolling back to the last consensus", bad, where)
                self._rollback()
                return
        self._measure_diversity()
        with collective("the average step"):
            self.lookaround.average(healthy, check_integers=epoch_end)
        if self.lookahead is not None:
            self.lookahead.synchronize()
        if self.config.train.nonfinite_policy == "rollback":
            self.last_consensus = {k: v.detach().clone() for k, v in self.lookaround.consensus.state_dict().items()}

    def _rollback(self) -> None:
        if self.last_consensus is None:
            raise NonFiniteError("non-finite weights before the first consensus was kept: nothing to roll back to")
        for branch in self.lookaround.branches:
            branch.module.load_state_dict(self.last_consensus)
            branch.optimizer.state.clear()
        self.lookaround.steps_in_round = 0

    # ----- training and evaluation ---------------------------------------------------
    def _train_step(self, batches) -> None:
        autocast = (torch.autocast(self.device.type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        batches = batches_for_branches(self.method, batches)
        for h, (branch, (images, labels)) in enumerate(zip(self.lookaround.branches, batches)):
            # With data.on_decode_error=skip a batch lacks the images that failed to decode.
            self._skipped_images += self.config.data.batch_size * self.batches_per_branch - labels.numel()
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            with autocast:
                loss = F.cross_entropy(branch.model(images), labels)
            branch.optimizer.zero_grad(set_to_none=True)
            if branch.scaler is not None:
                branch.scaler.scale(loss).backward()
                branch.scaler.step(branch.optimizer)
                branch.scaler.update()
            else:
                loss.backward()
                branch.optimizer.step()
            branch.scheduler.step()
            if self.swa_lr > 0:
                self._hold_swa_lr(branch)
            self._loss_sums[h] += loss.detach().float()
        self._loss_steps += 1

    @torch.no_grad()
    def evaluate(self, model: Optional[torch.nn.Module] = None) -> dict:
        """Top-1, top-5 and loss of ``model`` (the consensus by default), each sample counted
        once over all ranks."""
        model = model if model is not None else self.lookaround.consensus
        result = evaluate_model(model, self.eval_data, self.device, self.amp_dtype, self.memory_format)
        model.train()
        del result["samples"]
        return result

    def _branch_losses(self) -> tuple[list[float], int]:
        """Mean training loss of each branch over the epoch, averaged over its ranks, and the
        number of images per branch skipped because they failed to decode."""
        d = self.topology.num_branches
        totals = torch.zeros(d + 1, dtype=torch.float64, device=self.device)
        for h, branch in enumerate(self.lookaround.branches):
            totals[branch.index] = self._loss_sums[h].double() / max(1, self._loss_steps) / self.topology.ranks_per_branch
        totals[d] = self._skipped_images
        if self.topology.distributed:
            with collective("the all-reduce of the epoch's training losses"):
                dist.all_reduce(totals)
        values = totals.tolist()
        # Every branch sees the same base samples (unless sampling is independent), so each
        # failed image is counted once per branch: report it once.
        return values[:d], round(values[d] / d)

    def run(self) -> int:
        """Train to the end; return the process exit code (0, or the preemption code)."""
        config = self.config
        steps_per_epoch = self.train_data.steps_per_epoch
        self.lookaround.train()
        started = time.perf_counter() - self.progress.wall_seconds
        stop_after = config.train.stop_after_steps
        while self.progress.epoch < config.train.epochs:
            epoch = self.progress.epoch
            self.train_data.set_epoch(epoch)
            self._loss_sums = [torch.zeros((), device=self.device) for _ in self.lookaround.branches]
            self._loss_steps = 0
            self._skipped_images = 0
            self._stop_agreed = False
            self._start_swa_epoch(epoch)
            average_ms, average_bytes, rounds = 0.0, 0, 0
            data_wait = 0.0
            epoch_started = time.perf_counter()
            self.branch_evaluation_seconds = 0.0
            first_step = self.train_data.state_dict().get("step_in_epoch", 0)
            bar = Progress(self.rank == 0, steps_per_epoch, f"epoch {epoch}")
            iterator = iter(self.train_data)
            step_in_epoch = first_step
            while True:
                wait_started = time.perf_counter()
                batches = next(iterator, None)
                data_wait += time.perf_counter() - wait_started
                if batches is None:
                    break
                if self.topology.ranks_per_branch > 1:
                    with collective("a training step (the gradient all-reduce inside each branch)"):
                        self._train_step(batches)
                else:
                    self._train_step(batches)
                step_in_epoch += 1
                self.progress.global_step += 1
                if self.lookaround.tick():
                    if step_in_epoch == steps_per_epoch:
                        self._evaluate_branches()
                    self.end_round(epoch_end=step_in_epoch == steps_per_epoch)
                    average_ms += self.lookaround.last_average.milliseconds
                    average_bytes += self.lookaround.last_average.bytes_reduced
                    rounds += 1
                if bar.enabled and step_in_epoch % 10 == 0:
                    bar.update(step_in_epoch, float(self._loss_sums[0]) / max(1, self._loss_steps))
                if self.progress.global_step % config.train.log_interval_steps == 0:
                    self._log_step(epoch, step_in_epoch, steps_per_epoch)
                if self._stop_agreed or (stop_after and self.progress.global_step >= stop_after):
                    break
            bar.close()
            if self._stop_agreed or (stop_after and self.progress.global_step >= stop_after):
                return self._stop(started)

            # The epoch ends on an average step, so that a consensus exists to evaluate.
            if self.lookaround.steps_in_round > 0:
                self._evaluate_branches()
                self.end_round(epoch_end=True)
                average_ms += self.lookaround.last_average.milliseconds
                average_bytes += self.lookaround.last_average.bytes_reduced
                rounds += 1
            # The branches are scored inside the epoch; their evaluation is not training time.
            epoch_seconds = time.perf_counter() - epoch_started - self.branch_evaluation_seconds
            record = self._epoch_record(epoch, epoch_seconds, step_in_epoch - first_step, started,
                                        average_ms, average_bytes, rounds, data_wait)
            self.progress.epoch += 1
            self.progress.wall_seconds = time.perf_counter() - started
            self.save_checkpoint()
            if self._stop_agreed:
                return self._stop(started)
        self._finish(started)
        return 0

    def _log_step(self, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> None:
        """Log this rank's running branch losses; a host sync, so only every few steps."""
        if self.rank != 0:
            return
        losses = {f"step/train_loss_branch_{b.index}": float(self._loss_sums[h]) / max(1, self._loss_steps)
                  for h, b in enumerate(self.lookaround.branches)}
        values = {**losses, "step/lr": self.lookaround.branches[0].scheduler.get_last_lr()[0],
                  "step/epoch": epoch}
        self.tracker.log(values, step=self.progress.global_step)
        if not sys.stderr.isatty():
            loss_text = " ".join(f"{v:.4f}" for v in losses.values())
            log.info("epoch %3d step %5d/%d | global step %7d | train loss %s | lr %.5f", epoch,
                     step_in_epoch, steps_per_epoch, self.progress.global_step, loss_text, values["step/lr"])

    # ----- method comparison: diversity, branches, recalibration, SWA -----------------
    def _measure_diversity(self) -> None:
        """Write the branches' distances to their mean as a round record (every rank takes part)."""
        interval = self.config.train.diversity_interval_rounds
        round_number = self.lookaround.rounds_completed + 1
        if interval == 0 or self.topology.num_branches == 1 or round_number % interval:
            return
        with collective("the diversity measurement before the average step"):
            diversity = measure_diversity(self.lookaround)
        record = {"round": round_number, "epoch": self.progress.epoch, "step": self.progress.global_step,
                  **diversity.to_record()}
        self.metrics.write(record)
        # The tracker turns each per-branch list into one key per branch.
        self.tracker.log({f"diversity/{key}": value for key, value in diversity.to_record().items()},
                         step=self.progress.global_step)

    def _evaluate_branches(self) -> None:
        """Score every branch and their logit ensemble; called before the epoch's last average step."""
        self.branch_results = {}
        wanted = self.config.train.evaluate_branches or self.method == "independent"
        if self.eval_data is None or not wanted or self.topology.num_branches == 1:
            return
        started = time.perf_counter()
        with collective("the branch evaluation at the end of an epoch"):
            self.branch_modules = gather_branch_modules(self.lookaround, self.branch_modules)
            self.branch_results = evaluate_branches(
                self.branch_modules, self.eval_data, self.device, self.eval_data.num_samples,
                self.amp_dtype, self.memory_format)
        self.branch_evaluation_seconds += time.perf_counter() - started

    def _recalibrate(self, model: torch.nn.Module) -> None:
        count = min(self.config.train.bn_recalibration_batches, self.train_data.steps_per_epoch)
        with contextlib.closing(training_images(self.train_data)) as batches:
            with collective("the BatchNorm recalibration"):
                recalibrate_batchnorm(model, batches, count, device=self.device, memory_format=self.memory_format)

    def _start_swa_epoch(self, epoch: int) -> None:
        """Hold train.swa_lr through the SWA epochs, when it is set."""
        train = self.config.train
        in_swa = self.swa is not None and epoch >= train.epochs - train.swa_epochs
        self.swa_lr = train.swa_lr if in_swa else 0.0
        if self.swa_lr > 0:
            for branch in self.lookaround.branches:
                self._hold_swa_lr(branch)

    def _hold_swa_lr(self, branch) -> None:
        # The scheduler keeps counting steps, so that its state stays valid for a resume.
        for group in branch.optimizer.param_groups:
            group["lr"] = self.swa_lr

    def _update_swa(self, epoch: int) -> bool:
        """Add the consensus to the SWA mean in the last train.swa_epochs epochs; return whether it did."""
        train = self.config.train
        if self.swa is None or epoch < train.epochs - train.swa_epochs:
            return False
        self.swa.update(self.lookaround.consensus)
        self._recalibrate(self.swa.module)
        return True

    def _evaluate_recalibrated(self, swa_active: bool) -> dict:
        """Scores of the consensus with recomputed BatchNorm statistics, and of the SWA model."""
        results = {}
        if self.config.train.recalibrate_bn and self.method != "independent":
            model = copy.deepcopy(self.lookaround.consensus)
            self._recalibrate(model)
            results.update({f"recalibrated_{k}": v for k, v in self.evaluate(model).items()})
        if swa_active:
            results.update({f"swa_{k}": v for k, v in self.evaluate(self.swa.module).items()})
        return results

    def _epoch_record(self, epoch, epoch_seconds, steps, started, average_ms, average_bytes,
                      rounds, data_wait) -> dict:
        config = self.config
        losses, skipped_images = self._branch_losses()
        if skipped_images:
            log.warning("epoch %d: %d training image(s) failed to decode and were skipped "
                        "(data.on_decode_error=skip)", epoch, skipped_images)
        images = (steps * config.data.batch_size * self.batches_per_branch * self.topology.branches_per_rank
                  * self.world_size)
        record = {
            "epoch": epoch,
            "step": self.progress.global_step,
            "train_loss": losses,
            "images_per_second": images / max(1e-9, epoch_seconds),
            "epoch_seconds": epoch_seconds,
            "wall_seconds": time.perf_counter() - started,
            "lr": self.lookaround.branches[0].optimizer.param_groups[0]["lr"],
            "average_ms_per_round": average_ms / max(1, rounds),
            "average_bytes_per_round": average_bytes / max(1, rounds),
            "data_wait_fraction": data_wait / max(1e-9, epoch_seconds),
            "skipped_images": skipped_images,
        }
        swa_active = self._update_swa(epoch)
        if self.eval_data is not None:
            if self.method == "independent":
                # No consensus exists: the run's model is the logit ensemble of its branches.
                record.update({key: self.branch_results[f"ensemble_{key}"]
                               for key in ("test_top1", "test_top5", "test_loss")})
            else:
                record.update(self.evaluate())
            record.update(self.branch_results)
            record.update(self._evaluate_recalibrated(swa_active))
            self.progress.best_top1 = max(self.progress.best_top1, record["test_top1"])
        self.metrics.write(record)
        self.tracker.log(record, step=self.progress.global_step)
        loss_text = " ".join(f"{x:.4f}" for x in losses)
        log.info(
            "epoch %3d | train loss %s | test top-1 %6.2f top-5 %6.2f loss %.4f | %8.1f img/s | "
            "average %.1f ms %.2f MB | data wait %4.1f%% | %.1f s",
            epoch, loss_text, record.get("test_top1", math.nan), record.get("test_top5", math.nan),
            record.get("test_loss", math.nan), record["images_per_second"],
            record["average_ms_per_round"], record["average_bytes_per_round"] / 1e6,
            100 * record["data_wait_fraction"], epoch_seconds,
        )
        self._log_branch_results(epoch, record)
        return record

    def _log_branch_results(self, epoch: int, record: dict) -> None:
        """Log the branch, ensemble, recalibrated and SWA scores of an epoch record, where present."""
        parts = []
        if "branch_test_top1" in record:
            parts.append("branch top-1 " + " ".join(f"{x:6.2f}" for x in record["branch_test_top1"]))
            parts.append(f"ensemble top-1 {record['ensemble_test_top1']:6.2f}")
        for prefix in ("recalibrated", "swa"):
            if f"{prefix}_test_top1" in record:
                parts.append(f"{prefix} top-1 {record[f'{prefix}_test_top1']:6.2f}")
        if parts:
            log.info("epoch %3d | %s", epoch, " | ".join(parts))

    def _stop(self, started: float) -> int:
        self.progress.wall_seconds = time.perf_counter() - started
        self.save_checkpoint()
        self.tracker.finish()
        if self._stop_agreed:
            log.warning("stopped by %s after step %d; exit code %d asks the launcher to requeue",
                        self.stop_request.received or "a signal on another rank",
                        self.progress.global_step, PREEMPTED_EXIT_CODE)
            return PREEMPTED_EXIT_CODE
        log.info("stopped after step %d as train.stop_after_steps asked; resume with --resume",
                 self.progress.global_step)
        return 0

    def _check_consensus_identical(self) -> str:
        """Hash every rank's consensus and raise unless all ranks hold the same bytes."""
        digest = hashlib.sha256()
        for name, tensor in self.lookaround.consensus.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests = [digest.hexdigest()]
        if self.topology.distributed:
            digests = [None] * self.world_size
            with collective("the consensus digest exchange"):
                dist.all_gather_object(digests, digest.hexdigest())
        if len(set(digests)) != 1:
            listing = ", ".join(f"rank {r}: {d[:16]}" for r, d in enumerate(digests))
            raise RuntimeError(f"the ranks hold different consensus weights at the end of the run ({listing})")
        return digests[0]

    def _finish(self, started: float) -> None:
        # Independent branches never form a consensus, so their ranks hold different weights.
        if self.method != "independent":
            digest = self._check_consensus_identical()
            log.info("consensus digest %s identical on all %d ranks", digest[:16], self.world_size)
        if self.rank == 0:
            ckpt.atomic_save(self.lookaround.consensus.state_dict(), self.run_dir / "consensus.pt")
            if self.swa is not None:
                ckpt.atomic_save(self.swa.module.state_dict(), self.run_dir / "swa.pt")
        self.tracker.finish()
        log.info("finished %d epochs in %.1f s: best test top-1 %.2f%%; consensus weights in %s",
                 self.config.train.epochs, time.perf_counter() - started, self.progress.best_top1,
                 self.run_dir / "consensus.pt")

    def close(self) -> None:
        self.stop_request.restore()
        self.train_data.close()
        if self.eval_data is not None:
            self.eval_data.close()

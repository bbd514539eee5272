"""Training engine: device and precision set-up, one epoch of training, evaluation, LR range test.

The loop is kept lean on purpose (``benchmarks/train_throughput.py`` holds it to >= 95% of a
plain PyTorch loop): running loss and accuracy are accumulated as tensors on the device and
read once per epoch, because a ``.item()`` per batch stalls the GPU queue on every step.
Functions return metric dicts (STYLE rule 6) and are shared by the train and evaluate steps
and the benchmark (STYLE rule 3).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from imgclf.errors import ConfigError
from imgclf.training import distributed

log = logging.getLogger(__name__)


def _cuda_available() -> bool:
    return torch.cuda.is_available()


_DEVICES: dict[str, Callable[[], torch.device]] = {
    "auto": lambda: torch.device("cuda" if _cuda_available() else "cpu"),
    "cpu": lambda: torch.device("cpu"),
    "cuda": lambda: torch.device("cuda"),
}


def select_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is a ConfigError."""
    base = name.split(":", 1)[0]
    if base not in _DEVICES:
        raise ConfigError(f"train.device={name!r} is unknown; choices: {', '.join(_DEVICES)}")
    if base == "cuda" and not _cuda_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name) if ":" in name else _DEVICES[base]()


def set_threads(threads: int) -> None:
    """Pin intra-op CPU threads when ``threads > 0`` (0 keeps PyTorch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed every RNG; on CPU also ask for deterministic kernels so runs repeat bit for bit.

    On CUDA, cuDNN autotuning is worth more than bit-exact repeats, so it stays enabled.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def rng_states() -> dict[str, Any]:
    """Every global RNG's state (python, numpy, torch, CUDA when in use) as plain types and
    tensors, so that a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Put back what :func:`rng_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["pos"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def amp_settings(device: torch.device) -> tuple[torch.dtype | None, Any]:
    """Autocast dtype and GradScaler for ``device``: bf16 (no scaler), fp16 + scaler, or none."""
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move the model to ``device``; channels_last on CUDA, where convs run faster with it."""
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def forward_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None
) -> torch.Tensor:
    """fp32 logits of an inference-mode forward pass, as evaluation and the server run it.

    One function for both, so that the served model and the offline evaluation give the
    same answer for the same file (same device placement, same autocast dtype).
    """
    if images.device != device:
        if device.type == "cuda":
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        else:
            images = images.to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
    return logits.float()


def _to_device(
    images: torch.Tensor, targets: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type == "cuda":
        images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
        return images, targets.to(device, non_blocking=True)
    return images, targets


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": lambda groups, weight_decay, fused: torch.optim.AdamW(
        groups, weight_decay=weight_decay, fused=fused
    ),
    "sgd": lambda groups, weight_decay, fused: torch.optim.SGD(
        groups, momentum=0.9, nesterov=True, weight_decay=weight_decay, fused=fused
    ),
}


def check_optimizer(name: str) -> None:
    """Refuse an unknown ``train.optimizer`` (train calls this before any work)."""
    if name not in _OPTIMIZERS:
        raise ConfigError(f"train.optimizer={name!r} is unknown; choices: {', '.join(_OPTIMIZERS)}")


def create_optimizer(
    name: str, param_groups: Iterable[dict[str, Any]], *, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` over groups that each carry their own ``lr``.

    The fused implementations are used whenever every parameter is a float tensor on CPU or
    CUDA: one kernel per step instead of one per tensor, about a third of a resnet18 CPU
    step saved, with the same update rule.
    """
    check_optimizer(name)
    groups = list(param_groups)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ConfigError("no trainable parameters: the whole model is frozen")
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return _OPTIMIZERS[name](groups, weight_decay, fused or None)


# The share of a one-cycle run spent warming up to the peak rate (OneCycleLR's default).
ONECYCLE_WARMUP = 0.3


def _onecycle(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    # Each group peaks at its own configured lr, so differential rates survive the schedule.
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=ONECYCLE_WARMUP,
    )


def _cosine(optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


_SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, int], Any] | None] = {
    "onecycle": _onecycle,
    "cosine": _cosine,
    "none": None,
}


def check_scheduler(name: str) -> None:
    """Refuse an unknown ``train.scheduler``: the schedule is built only after the LR range
    test, so train calls this up front."""
    if name not in _SCHEDULERS:
        raise ConfigError(f"train.scheduler={name!r} is unknown; choices: {', '.join(_SCHEDULERS)}")


def create_scheduler(name: str, optimizer: torch.optim.Optimizer, *, total_steps: int) -> Any:
    """A per-batch LR schedule over ``total_steps`` optimizer steps, or None for ``none``."""
    check_scheduler(name)
    factory = _SCHEDULERS[name]
    return factory(optimizer, max(1, total_steps)) if factory else None


def count_steps(loader: Sized, max_steps: int) -> int:
    """Batches one epoch will run: all of ``loader``, or ``max_steps`` when that is smaller."""
    return min(len(loader), max_steps) if max_steps > 0 else len(loader)


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backward and step, through the fp16 GradScaler when one is in use (CUDA fp16 only)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


@dataclasses.dataclass
class EpochProgress:
    """How far an epoch has got: batches done and the running sums behind its metrics.

    A checkpoint stores it, so that an epoch resumed halfway reports the loss and accuracy an
    uninterrupted one would. The sums stay tensors on the device (no sync per batch).
    """

    loss_sum: torch.Tensor
    correct: torch.Tensor
    step: int = 0
    images: int = 0

    @classmethod
    def start(cls, device: torch.device) -> EpochProgress:
        """A fresh epoch: nothing done yet."""
        return cls(
            loss_sum=torch.zeros((), device=device),
            correct=torch.zeros((), dtype=torch.long, device=device),
        )


def _skip_batches(batches: Iterator[Any], count: int) -> None:
    """Draw and drop the ``count`` batches a resumed epoch already trained on.

    Drawing them (rather than editing the sampler) keeps the data order and the workers'
    augmentation exactly as in the first attempt; the global RNGs are put back afterwards,
    because the checkpoint's states already include what these batches' augmentation used.
    """
    if count <= 0:
        return
    states = rng_states()
    for _ in range(count):
        next(batches, None)
    set_rng_states(states)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    device: torch.device,
    scaler: Any = None,
    *,
    amp_dtype: torch.dtype | None = None,
    criterion: nn.Module | None = None,
    max_steps: int = 0,
    desc: str = "train",
    progress: EpochProgress | None = None,
    after_step: Callable[[EpochProgress], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` (at most ``max_steps`` batches when > 0); returns metrics.

    The scheduler, if any, is stepped after every batch. Returned: ``loss`` and ``accuracy``
    (means over the images seen), ``images``, ``seconds``, ``images_per_s`` (of the batches
    this call trained on) and the head's ``lr`` at the end of the epoch.

    ``progress`` resumes an epoch a checkpoint stopped: its ``step`` batches are drawn from
    ``loader`` and dropped, and its sums carry on. ``after_step`` is called after every
    optimizer step with the progress so far (the train step checkpoints there, and stops
    there when preempted); it is the only per-batch cost this hook adds.
    """
    criterion = criterion or nn.CrossEntropyLoss()
    model.train()
    progress = progress or EpochProgress.start(device)
    loss_sum, correct = progress.loss_sum, progress.correct
    total = count_steps(loader, max_steps)
    resumed_at, resumed_images = progress.step, progress.images
    start = time.perf_counter()
    use_amp = amp_dtype is not None
    batches = iter(loader)
    _skip_batches(batches, min(resumed_at, total))
    with tqdm(
        total=total, initial=min(resumed_at, total), desc=desc, disable=None, leave=False
    ) as bar:
        for step, (images, targets) in enumerate(batches, start=resumed_at):
            if max_steps > 0 and step >= max_steps:
                break
            images, targets = _to_device(images, targets, device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(images)
                loss = criterion(logits, targets)
            optimizer_step(loss, optimizer, scaler)
            if scheduler is not None:
                scheduler.step()
            batch = targets.shape[0]
            progress.images += batch
            progress.step = step + 1
            loss_sum += loss.detach() * batch
            correct += (logits.detach().argmax(1) == targets).sum()
            bar.update()
            if after_step is not None:
                after_step(progress)
    seconds = time.perf_counter() - start
    seen = progress.images
    if distributed.active():  # every rank reports the whole job's loss and accuracy
        loss_sum, correct, seen = _sums_across_ranks(loss_sum, correct, seen)
    denominator = max(seen, 1)
    return {
        "loss": loss_sum.item() / denominator,
        "accuracy": correct.item() / denominator,
        "images": seen,
        "seconds": seconds,
        "images_per_s": (seen - resumed_images) / seconds if seconds > 0 else 0.0,
        "lr": float(optimizer.param_groups[-1]["lr"]),
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    top_k: int = 1,
    *,
    amp_dtype: torch.dtype | None = None,
    criterion: nn.Module | None = None,
    max_steps: int = 0,
    keep_outputs: bool = False,
    desc: str = "eval",
) -> dict[str, Any]:
    """Loss, accuracy and top-k accuracy of ``model`` over ``loader``, without gradients.

    ``top_k`` is capped at the number of classes. With ``keep_outputs`` the result also has
    ``targets``, ``predictions`` and ``probabilities`` (lists, one entry per image), which
    the evaluate step turns into per-class metrics and a confusion matrix.
    """
    criterion = criterion or nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    correct_k = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    k = max(1, top_k)
    outputs: dict[str, list[torch.Tensor]] = {"targets": [], "predictions": [], "probabilities": []}
    start = time.perf_counter()
    with (
        torch.inference_mode(),
        tqdm(total=count_steps(loader, max_steps), desc=desc, disable=None, leave=False) as bar,
    ):
        for step, (images, targets) in enumerate(loader):
            if max_steps > 0 and step >= max_steps:
                break
            images, targets = _to_device(images, targets, device)
            logits = forward_logits(model, images, device, amp_dtype)
            loss_sum += _summed_loss(criterion, logits, targets)
            k = min(k, logits.shape[1])
            ranked = logits.topk(k, dim=1).indices
            correct += (ranked[:, 0] == targets).sum()
            correct_k += (ranked == targets[:, None]).any(dim=1).sum()
            seen += targets.shape[0]
            if keep_outputs:
                outputs["targets"].append(targets.cpu())
                outputs["predictions"].append(ranked[:, 0].cpu())
                outputs["probabilities"].append(logits.softmax(dim=1).cpu())
            bar.update()
    seconds = time.perf_counter() - start
    if distributed.active():
        if keep_outputs:
            raise ConfigError("evaluate(keep_outputs=True) runs in one process only")
        loss_sum, correct, seen, correct_k = _sums_across_ranks(loss_sum, correct, seen, correct_k)
    denominator = max(seen, 1)
    result: dict[str, Any] = {
        "loss": loss_sum.item() / denominator,
        "accuracy": correct.item() / denominator,
        "top_k": k,
        "top_k_accuracy": correct_k.item() / denominator,
        "images": seen,
        "seconds": seconds,
    }
    if keep_outputs:
        result.update(
            {name: torch.cat(parts).tolist() if parts else [] for name, parts in outputs.items()}
        )
    return result


def _sums_across_ranks(
    loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, *more: torch.Tensor
) -> tuple[Any, ...]:
    """(loss_sum, correct, seen, *more) summed over the ranks of a distributed job, in one
    collective. Counts travel as float64, exact far beyond any dataset's size."""
    parts = [loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64)]
    parts += [t.double() for t in more]
    totals = distributed.sum_across(torch.stack([p.to(loss_sum.device) for p in parts]))
    loss, hits, images, *rest = totals.tolist()
    return (
        torch.tensor(loss),
        torch.tensor(int(hits)),
        int(images),
        *(torch.tensor(int(r)) for r in rest),
    )


def _summed_loss(criterion: nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    loss = criterion(logits, targets)
    # A mean-reduced criterion passed by the caller is turned back into a per-batch sum.
    return loss * targets.shape[0] if getattr(criterion, "reduction", "sum") == "mean" else loss


def lr_range_test(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    amp_dtype: torch.dtype | None = None,
    scaler: Any = None,
) -> list[dict[str, float]]:
    """The exponential learning-rate range test (book chapter 4).

    The lr grows geometrically from ``start_lr`` to ``end_lr`` over ``num_steps`` batches
    (cycling the loader as needed) while the loss is recorded, raw and smoothed with a
    bias-corrected moving average. It stops early once the smoothed loss exceeds
    ``diverge_factor`` times its best value: past that point the curve says nothing. Every
    group is scaled by the same factor, so differential rates keep their ratio; ``lr`` in the
    records is the last group's (the head's).
    """
    if num_steps < 2:
        raise ConfigError(f"lr finder needs at least 2 steps, got {num_steps}")
    factor = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    base = [g["lr"] for g in optimizer.param_groups]
    ratios = [lr / base[-1] for lr in base]
    criterion = nn.CrossEntropyLoss()
    model.train()
    records: list[dict[str, float]] = []
    average, best = 0.0, math.inf
    batches = _cycle(loader)
    for step in tqdm(range(num_steps), desc="lr-find", disable=None, leave=False):
        lr = start_lr * factor**step
        for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
            group["lr"] = lr * ratio
        images, targets = _to_device(*next(batches), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(images), targets)
        optimizer_step(loss, optimizer, scaler)
        value = loss.item()  # needed every step: the stopping rule depends on it
        if not math.isfinite(value):
            break
        average = smoothing * average + (1 - smoothing) * value
        smoothed = average / (1 - smoothing ** (step + 1))
        records.append({"step": step, "lr": lr, "loss": value, "smoothed_loss": smoothed})
        best = min(best, smoothed)
        if step > 0 and smoothed > diverge_factor * best:
            break
    return records


def _cycle(
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("lr finder: the training loader yields no batches")


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], *, skip_start: int = 3) -> float:
    """The lr at the steepest descent of the (smoothed) loss against log(lr).

    The first ``skip_start`` points are ignored (the moving average is still settling) and so
    is everything after the minimum, where the loss is already climbing.
    """
    if len(lrs) != len(losses) or len(lrs) < 2:
        raise ConfigError("lr finder: too few points for a suggestion; raise num_steps")
    loss = np.asarray(losses, dtype=float)
    log_lr = np.log10(np.asarray(lrs, dtype=float))
    end = int(np.argmin(loss)) + 1
    start = min(skip_start, max(end - 2, 0))
    if end - start < 2:
        return float(lrs[int(np.argmin(loss))]) / 10.0
    slope = np.gradient(loss[start:end], log_lr[start:end])
    return float(lrs[start + int(np.argmin(slope))])

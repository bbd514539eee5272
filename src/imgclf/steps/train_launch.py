"""Run the TRAIN step as N DistributedDataParallel processes on this machine.

``imgclf train --nproc N`` and the KFP train component (when its pod has N > 1 GPUs) call
:func:`launch`. It starts torch's elastic agent, the launcher behind ``torchrun
--standalone --nproc-per-node N``, in this process: the agent starts N copies of this
module (each one rank, running :func:`imgclf.steps.train.run` with the same settings),
forwards SIGTERM to them, and reports how each ended. Running the agent in-process rather
than shelling out to ``torchrun`` lets the step keep its exit codes: when the ranks stop
because of a preemption (every one exits with :class:`~imgclf.errors.Preempted`'s code
after rank 0 wrote the checkpoint), the launch raises :class:`Preempted` too, and a
retry resumes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from imgclf import config as config_mod
from imgclf import proc
from imgclf.config import TrainConfig
from imgclf.contracts import MODEL_FILE
from imgclf.errors import ConfigError, ImgclfError, Preempted
from imgclf.fsutil import read_json, write_json

log = logging.getLogger(__name__)

MAX_NPROC = 64


class WorkerFailed(ImgclfError):
    """A rank of a distributed training run failed (its own error is printed above)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_nproc(nproc: int) -> None:
    """Refuse a process count that cannot work, before anything starts."""
    if not 1 <= nproc <= MAX_NPROC:
        raise ConfigError(f"--nproc {nproc}: must be between 1 and {MAX_NPROC}")


def launch(
    cfg: TrainConfig,
    *,
    dataset_dir: Path,
    out_dir: Path,
    nproc: int,
    live_dir: Path | None = None,
) -> dict[str, Any]:
    """Train with ``nproc`` processes on this machine; returns ``model.json`` like ``run``
    (rank 0 logs to ``live_dir`` through DVCLive when given).

    The ranks rendezvous on a free loopback port (torchrun's ``--standalone``); on CPU they
    use gloo, on CUDA NCCL with one GPU per rank. ``train.batch_size`` is per process.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_nproc(nproc)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    launch_cfg = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,  # a failed rank fails the step: KFP's retry is the restart policy
        monitor_interval=0.5,
    )
    log.info("starting %d training processes (DistributedDataParallel)", nproc)
    with tempfile.TemporaryDirectory(prefix="imgclf-ddp-") as tmp:
        settings = Path(tmp) / "train.json"
        write_json(settings, config_mod.to_dict(cfg))
        args = ["-m", __name__, str(settings), str(dataset_dir), str(out_dir)]
        if live_dir is not None:
            args += ["--live", str(live_dir)]
        try:
            elastic_launch(launch_cfg, sys.executable)(*args)
        except SignalException as exc:
            # the agent forwarded the signal, and waited for the ranks' checkpoint and exit
            raise Preempted(
                f"preempted ({signal.Signals(exc.sigval).name}): the {nproc} training "
                f"processes stopped after writing a checkpoint to {cfg.checkpoint_dir}; run the "
                "same command again to resume"
            ) from None
        except ChildFailedError as exc:
            raise _failure(exc, cfg) from None
    return read_json(Path(out_dir) / MODEL_FILE)


def _failure(exc: Any, cfg: TrainConfig) -> ImgclfError:
    codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
    if codes and all(code == Preempted.exit_code for code in codes.values()):
        return Preempted(
            f"preempted: every training process stopped after a checkpoint in "
            f"{cfg.checkpoint_dir}; run the same command again to resume"
        )
    rank, code = min(codes.items()) if codes else (0, 1)
    described = ", ".join(f"rank {r} exit code {c}" for r, c in sorted(codes.items()))
    return WorkerFailed(
        f"distributed training failed ({described}); rank {rank}'s error is printed above",
        code if code > 0 else 1,
    )


def _worker(argv: list[str]) -> int:
    """One rank: the train step with the launcher's settings; errors as one line."""
    parser = argparse.ArgumentParser(prog="imgclf-train-rank")
    parser.add_argument("settings")
    parser.add_argument("dataset_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--live", default=None)
    args = parser.parse_args(argv)
    from imgclf.steps import train
    from imgclf.training import distributed

    # A rank outliving its launcher (killed with SIGKILL, as a node loss would) would keep
    # the port and the checkpoint dir busy: it goes with it. The launcher's SIGTERM instead
    # is forwarded, and gives every rank the time to checkpoint.
    proc.set_parent_death_signal(signal.SIGKILL)
    ctx = distributed.from_env()
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format=f"[rank {ctx.rank}] %(levelname)s %(name)s: %(message)s",
    )
    cfg = config_mod.build(TrainConfig, read_json(Path(args.settings)), "train (launcher)")
    try:
        train.run(
            cfg,
            dataset_dir=Path(args.dataset_dir),
            out_dir=Path(args.out_dir),
            live_dir=Path(args.live) if args.live else None,
        )
    except ImgclfError as exc:
        print(f"imgclf train (rank {ctx.rank}): {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))

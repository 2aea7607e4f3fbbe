"""Several processes of one stage (`accelerate launch --num_processes N`, `torchrun --nproc_per_node N`).

A stage is one process unless a launcher started several; the launchers say so in the environment (WORLD_SIZE,
RANK), which is read here without starting anything. With several:
- the main process (rank 0) alone writes: utils.runs.stage_run prepares the folder and writes the manifest there
  only (the others get a StageRun that records nothing to disk), validation and checkpoints run on it while the
  others wait, and a stage's other processes return once the shared work is done;
- trl's trainers split the data and average the gradients themselves (through accelerate); the project's own
  loops (PPO's rollouts, 04's and 10's generation) split their prompts here and gather the results in order.
  Generation is dealt out in whole batches of the one-process order (utils.generation.generate(shard=...)), so
  every batch holds the same prompts as on one process and greedy outputs are the same.
The process group is started lazily, by accelerate (gloo on a CPU, nccl on CUDA), only when something needs it.
"""
from __future__ import annotations

import functools
import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    """Processes of this stage on this machine."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    return rank() == 0


def several() -> bool:
    return world_size() > 1


@functools.cache
def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def wait_for_everyone() -> None:
    if several():
        _state().wait_for_everyone()


def shard() -> tuple[int, int]:
    """(this process's index, the number of processes), for utils.generation.generate(shard=...)."""
    return rank(), world_size()


def gather_in_order(results: list[list]) -> list[list]:
    """Every process's results of generate(shard=...) (the others' items empty) merged, on every process."""
    if not several():
        return results
    from accelerate.utils import gather_object

    _state()
    merged = [[] for _ in results]
    for index, items in gather_object([(i, items) for i, items in enumerate(results) if items]):
        merged[index] = items
    missing = [i for i, items in enumerate(merged) if not items]
    if missing:
        raise RuntimeError(f"no process generated item(s) {missing[:5]}")
    return merged


def gather_list(items: list) -> list:
    """The concatenation of every process's list (rank order), on every process."""
    if not several():
        return list(items)
    from accelerate.utils import gather_object

    _state()
    return list(gather_object(list(items)))


def finish() -> None:
    """At a stage's successful end: wait for every process, then close the process group, so that no process
    exits while another still talks to it (a process that exits first can make gloo abort the others)."""
    if not several():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

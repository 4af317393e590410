"""Who started this process: torchrun's or srun's environment, read in one place."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class RankPlace:
    """Where a rank is in its job, and where the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int   # ranks on this node
    restart_count: int      # elastic restarts so far
    run_id: str
    master_addr: str
    master_port: int
    launcher: str = "torchrun"  # "slurm": one task of an srun job step; "spawn": started by launch() itself

    @property
    def external(self) -> bool:
        """Started by torchrun or srun: no parent process hears this rank."""
        return self.launcher != "spawn"


def torchrun_env() -> RankPlace | None:
    """This process's place in a torchrun job or an srun job step, or None when neither started it
    (then ``launch`` spawns the ranks itself). Under ``srun torchrun ...`` torchrun's variables win:
    each task is a torchrun agent, and its workers are the ranks."""
    return _from_torchrun() or _from_srun()


def _from_torchrun() -> RankPlace | None:
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and not ("RANK" in env and "LOCAL_RANK" in env):
        return None
    world = int(env["WORLD_SIZE"])
    return RankPlace(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                     local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
                     restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                     run_id=env.get("TORCHELASTIC_RUN_ID", "run"), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=int(env.get("MASTER_PORT", "0")))


def _from_srun() -> RankPlace | None:
    """One task of an srun job step, read as PyTorch Lightning's SLURMEnvironment does.

    Only srun sets SLURM_STEP_*: a batch script has SLURM_NTASKS and SLURM_PROCID too but is no
    step, so there (and in a step of one task) this returns None and the CLI spawns its workers.
    Rank 0 is the step's first task, which SLURM places on the step's first node: the others look
    for the rendezvous store there.
    """
    env = os.environ
    if "SLURM_STEP_NUM_TASKS" not in env:
        return None
    world = _slurm_number("SLURM_STEP_NUM_TASKS")
    if world == 1:
        return None
    job, node = _slurm_number("SLURM_JOB_ID"), _slurm_number("SLURM_NODEID")
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if node >= len(per_node):
        raise ValueError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']!r} "
                         f"names {len(per_node)} node(s). Fix: start the command with srun inside the job.")
    return RankPlace(rank=_slurm_number("SLURM_PROCID"), world_size=world, local_rank=_slurm_number("SLURM_LOCALID"),
                     local_world_size=per_node[node], restart_count=0,
                     run_id=f"slurm-{job}-{env.get('SLURM_STEP_ID', '0')}",
                     master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST", "")),
                     master_port=int(env.get("MASTER_PORT") or 15000 + job % 10000),  # as Lightning: last 4 digits
                     launcher="slurm")


def _slurm_number(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} is not a number, in what SLURM_STEP_NUM_TASKS says is an srun job step. "
                         f"Fix: start the command with srun inside the job, or unset the stale SLURM_* variables.")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, where rank 0 runs: 'node[01-04,07],gpu5' -> 'node01', 'a,b' -> 'a'."""
    first = re.match(r"(?:[^,\s\[\]]|\[[^\[\]]*\])+(?=$|[,\s])", nodelist.strip())  # up to a comma or space
    if not first:
        raise ValueError(f"SLURM_STEP_NODELIST={nodelist!r} is not a node list like 'node[01-04],gpu5'. "
                         f"Fix: start the command with srun, or set MASTER_ADDR to rank 0's host.")
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first.group())  # each range gives its first value


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed list of tasks on each node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not a list like '2(x3),1'. "
                             f"Fix: start the command with srun inside the job.")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts

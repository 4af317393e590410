"""Where a rank stands in its job, read in one way from torchrun-style environment variables.

torchrun sets them for its workers; ``launch`` sets the same ones in each worker it spawns (in the
worker's own environment, never in the launching process: a notebook kernel stays clean); under
srun, SLURM's variables are read as PyTorch Lightning's SLURMEnvironment reads them. The single
process is the same place with a world of one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class RankPlace:
    """Where a rank is in its job, and where the ranks meet."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int   # ranks on this node
    node: int               # this node's index in the job (torchrun's GROUP_RANK, SLURM_NODEID)
    attempt: int            # 0 for a job's first attempt; under torchrun agreed in the store (see dist.agree_attempt)
    run_id: str
    master_addr: str
    master_port: int
    launcher: str = "torchrun"  # "slurm" (srun), "spawn" (launch() started it), "single" (this process)
    agent_store: bool = False   # a process above the ranks (torchrun's agent, launch()) hosts the store

    @property
    def store_prefix(self) -> str:
        """The keys of this attempt of this job in the rendezvous store (torchrun's agent keeps one
        store across elastic restarts: a restarted rank must not read the attempt that crashed)."""
        return f"ddp_helpers/{self.run_id}/attempt_{self.attempt}"

    def with_attempt(self, attempt: int) -> "RankPlace":
        return dataclasses.replace(self, attempt=attempt)


def rank_variables(rank: int, world_size: int, master_addr: str, master_port: int, run_id: str,
                   launcher: str = "spawn") -> dict[str, str]:
    """The variables torchrun gives a worker, for rank ``rank`` of ``world_size`` ranks on one node,
    whose store a parent process hosts at ``master_addr:master_port``."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size), "GROUP_RANK": "0", "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port), "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": "0",
            "TORCHELASTIC_USE_AGENT_STORE": "True", "DDP_HELPERS_LAUNCHER": launcher}


def single_place() -> RankPlace:
    """The single process: rank 0 of a world of one, with no store."""
    return place_from(rank_variables(0, 1, "", 0, "single", launcher="single"))


def launcher_place(environ: Mapping[str, str] | None = None) -> RankPlace | None:
    """This process's place in a torchrun job, an srun job step, or a run that ``launch`` spawned;
    None when none of them started it (then ``launch`` runs the job itself). Under
    ``srun torchrun ...`` torchrun's variables win: each task is a torchrun agent, and its workers
    are the ranks."""
    environ = os.environ if environ is None else environ
    return place_from(environ) or _from_srun(environ)


def place_from(env: Mapping[str, str]) -> RankPlace | None:
    """A place from torchrun's variables, or None when they are not there."""
    if "TORCHELASTIC_RUN_ID" not in env and not ("RANK" in env and "LOCAL_RANK" in env):
        return None
    world = int(env["WORLD_SIZE"])
    return RankPlace(rank=int(env["RANK"]), world_size=world, local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                     local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)), node=int(env.get("GROUP_RANK", "0")),
                     attempt=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),  # a first guess: see dist.agree_attempt
                     run_id=env.get("TORCHELASTIC_RUN_ID", "run"), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                     master_port=int(env.get("MASTER_PORT", "0")),
                     launcher=env.get("DDP_HELPERS_LAUNCHER", "torchrun"),
                     agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true")


def _from_srun(env: Mapping[str, str]) -> RankPlace | None:
    """One task of an srun job step, read as PyTorch Lightning's SLURMEnvironment does.

    Only srun sets SLURM_STEP_*: a batch script has SLURM_NTASKS and SLURM_PROCID too but is no
    step, so there (and in a step of one task) this returns None and the CLI spawns its workers.
    Rank 0 is the step's first task, which SLURM places on the step's first node: it hosts the
    rendezvous store there, and the others look for it there.
    """
    if "SLURM_STEP_NUM_TASKS" not in env:
        return None
    world = _slurm_number(env, "SLURM_STEP_NUM_TASKS")
    if world == 1:
        return None
    job, node = _slurm_number(env, "SLURM_JOB_ID"), _slurm_number(env, "SLURM_NODEID")
    per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    if node >= len(per_node):
        raise ConfigError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={env['SLURM_STEP_TASKS_PER_NODE']!r} "
                          f"names {len(per_node)} node(s). Fix: start the command with srun inside the job.")
    return RankPlace(rank=_slurm_number(env, "SLURM_PROCID"), world_size=world,
                     local_rank=_slurm_number(env, "SLURM_LOCALID"), local_world_size=per_node[node], node=node,
                     attempt=0, run_id=f"slurm-{job}-{env.get('SLURM_STEP_ID', '0')}",
                     master_addr=env.get("MASTER_ADDR") or first_host(env.get("SLURM_STEP_NODELIST", "")),
                     master_port=int(env.get("MASTER_PORT") or 15000 + job % 10000),  # as Lightning: last 4 digits
                     launcher="slurm")


def _slurm_number(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value.isdigit():
        raise ConfigError(f"{name}={value!r} is not a number, in what SLURM_STEP_NUM_TASKS says is an srun job "
                          f"step. Fix: start the command with srun inside the job, or unset the stale SLURM_* "
                          f"variables.")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, where rank 0 runs: 'node[01-04,07],gpu5' -> 'node01', 'a,b' -> 'a'."""
    first = re.match(r"(?:[^,\s\[\]]|\[[^\[\]]*\])+(?=$|[,\s])", nodelist.strip())  # up to a comma or space
    if not first:
        raise ConfigError(f"SLURM_STEP_NODELIST={nodelist!r} is not a node list like 'node[01-04],gpu5'. "
                          f"Fix: start the command with srun, or set MASTER_ADDR to rank 0's host.")
    return re.sub(r"\[([^\],-]*)[^\]]*\]", r"\1", first.group())  # each range gives its first value


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed list of tasks on each node: '2(x3),1' -> [2, 2, 2, 1]."""
    counts = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ConfigError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not a list like '2(x3),1'. "
                              f"Fix: start the command with srun inside the job.")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts

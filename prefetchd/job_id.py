"""Which processes share a job: the ranks of one training run do, independent runs never do.

The rule (README, "Jobs: who shares what"), first match wins:

1. `job=` passed to `attach`, else `$PREFETCHD_JOB`: that id, as given.
2. Under torchrun (`TORCHELASTIC_RUN_ID` set): the run id. torchrun gives every run its own (`--standalone`, and in
   recent torch a plain single-node `torchrun`, draw a uuid; `--rdzv-id` is unique per job by contract) and
   keeps it across worker restarts, so a restarted rank rejoins its job. A static rendezvous without
   `--rdzv-id` names every run "none": then the rendezvous address `MASTER_ADDR:MASTER_PORT` (fixed per run
   for the static backend; two runs on one node cannot share it) tells runs apart.
3. Under SLURM with world_size > 1 (`srun`, one task per rank): `SLURM_JOB_ID` + `SLURM_STEP_ID`.
4. world_size > 1 otherwise: `MASTER_ADDR:MASTER_PORT` (the torch.distributed env:// rendezvous every rank
   of the run shares), or a one-line error asking for `job=`.
5. A single process (world_size 1): a fresh id per `attach`: two identical runs side by side (an lr sweep, one
   GPU each) are two jobs. A reconnect after a daemon restart keeps the id it attached with.

The run identity is hashed with the attach arguments, so one run reading two datasets has two jobs.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Mapping

from prefetchd.errors import ConfigError

ENV_JOB = "PREFETCHD_JOB"
STATIC_RUN_ID = "none"   # torchrun's --rdzv-id default


def job_id_for(dataset: str, batch_size: int, seed: int, world_size: int, options: dict,
               env: Mapping[str, str] | None = None) -> str:
    """The job id of a rank that passed no `job=` (rule 1 is the caller's: `job` or `$PREFETCHD_JOB`)."""
    run = run_identity(world_size, os.environ if env is None else env)
    text = json.dumps([dataset, batch_size, seed, world_size, options, run], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def run_identity(world_size: int, env: Mapping[str, str]) -> str:
    """What the processes of one run have in common and other runs do not (rules 2-5 above)."""
    master = _master(env)
    run_id = env.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != STATIC_RUN_ID:
        return f"torchrun:{run_id}"
    if run_id and master:
        return f"torchrun:{STATIC_RUN_ID}:{master}"
    if world_size > 1 and env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}.{env.get('SLURM_STEP_ID', 'batch')}"
    if world_size > 1:
        if master:
            return f"dist:{master}"
        raise ConfigError(
            f"world_size={world_size} but no launcher says which processes belong to this run (no torchrun, "
            f"SLURM or MASTER_ADDR/MASTER_PORT): pass job=<id> to attach (or set {ENV_JOB}), the same on every "
            "rank of the run and different for another run")
    return f"process:{uuid.uuid4().hex}"


def _master(env: Mapping[str, str]) -> str | None:
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None

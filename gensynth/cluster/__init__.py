"""SLURM through submitit: submit a training run, turn SLURM's environment into torch.distributed's,
requeue on preemption and time limits, and keep a record of it all in the run directory.

    python slurm/train.py configs/gan_fashion.yaml --nodes 2 --gpus-per-node 8 --partition p
    gensynth submit train configs/gan_fashion.yaml --nodes 2 --dry-run

One SLURM task per training process. Each task exports MASTER_ADDR (the first node's address),
MASTER_PORT (from the job id), RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, exactly the variables
`accelerate launch` / torchrun set, then runs the ordinary training loop in-process: the loop's
Accelerator (gensynth/train/loop.py build_accelerator) comes out the same as under `accelerate launch`.

Requeue, for every rank: SLURM sends SIGTERM (preemption) or SIGUSR2 (`--signal=USR2@delay` before the
time limit) to every task. The loop agrees on the stop at the next step, every rank saves a checkpoint
and returns 75 (gensynth/runtime/signals.py). Then global rank 0 runs `scontrol requeue` and every task
exits without a result; the requeued job runs the same submission again and the loop resumes from the
newest checkpoint (`train.resume=auto` is forced from the first requeue on). submitit's own
`checkpoint()` route is not used because it runs on global rank 0 only.

`runs/<name>/slurm.json` records every job id, each start (hosts, rank-0 address, checkpoint resumed
from), each stop (reason, step, checkpoint, requeued or not), the requeue count and the final state;
`gensynth inspect runs/<name>` shows it.

Generation (`python slurm/generate.py RUN OUT --num N --array 3`): array task i runs
`gensynth.generate.generate(..., task=i, tasks=N)`; a job that depends on the array (afterany) verifies
every shard and writes the manifest; `--task-ids` resubmits single tasks.

By job: options.py (what to ask SLURM for), environment.py (inside a task: SLURM -> torch.distributed, early
signals), jobs.py (scontrol: a job's state, its requeue), training.py (the training job), generation.py
(the generation array). The record itself is gensynth/runtime/record.py: `gensynth inspect` reads it too.
"""

from gensynth.cluster.environment import EarlySignals, distributed_env, expand_tasks_per_node, node_address
from gensynth.cluster.generation import (
    FinalizeTask,
    GenerateTask,
    GenerationSubmission,
    prepare_generate,
    submit_generate,
    wait_generation,
)
from gensynth.cluster.jobs import JobFailed
from gensynth.cluster.options import SlurmOptions, options_from, parse_sbatch_flags, parse_time, sbatch_parameters
from gensynth.cluster.training import Submission, TrainTask, prepare_train, result_lines, submit_train, wait

__all__ = ["EarlySignals", "FinalizeTask", "GenerateTask", "GenerationSubmission", "JobFailed", "SlurmOptions",
           "Submission", "TrainTask", "distributed_env", "expand_tasks_per_node", "node_address", "options_from",
           "parse_sbatch_flags", "parse_time", "prepare_generate", "prepare_train", "result_lines", "sbatch_parameters",
           "submit_generate", "submit_train", "wait", "wait_generation"]

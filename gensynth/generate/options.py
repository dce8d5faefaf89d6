"""GenerateOptions: every option of a generation, its default and help, for the CLI, the API and SLURM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gensynth.config import option


@dataclass
class GenerateOptions:
    """How to generate: the plan, the family's sampling options, the filter, soft labels and how this worker runs.
    `gensynth generate` makes one --flag per field; `gensynth submit generate` all but task, tasks,
    finalize and overwrite (the array sets those); `generate(source, out, num=...)` takes them by name."""

    num: int | None = option(None, "number of samples (balanced over the classes unless --per-class)")
    per_class: str | list | None = option(None, "counts per class (1000,0,500,...) or proportions "
                                          "(0.5,0.1,...), index = label")
    seed: int = option(0, "shard k draws from (seed, k) alone", min=0)
    shard_size: int = option(5000, "samples per shard", min=1)
    encoding: str = option("png", "image encoding", choices=("png", "npy"))
    purpose: str = option("general", "what the set is for: cas (a classifier trained on it alone: variety), augment "
                          "(added to real data: fidelity), or general; sets the family's sampling defaults, and "
                          "where measured a --filter threshold, to the ones measured best for it (an option given "
                          "here still wins)",
                          choices=("general", "cas", "augment"))
    license: str = option("", "the set's license for its manifest and README.md dataset card (default there: "
                          "unknown, since the terms of the model's training images are not gensynth's to know)")
    truncation: float | None = option(None, "GAN: truncation trick threshold (0 = off)")
    temperature: float | None = option(None, "VQ-VAE prior: logits temperature; VAE: latent noise scale")
    top_k: int | None = option(None, "VQ-VAE prior: sample among the k most likely codes")
    guidance: float | None = option(None, "VQ-VAE prior: classifier-free guidance scale, > 1 more class-typical "
                                    "(default: the prior's own, prior.guidance)")
    device: str = option("auto", "where to run the model", choices=("auto", "cpu", "cuda"))
    writers: int = option(0, "processes that encode and write shards while the model draws the next ones (0: every "
                          "core when the model runs on a GPU, whose sampling outruns one core's PNG encoding; 1 on "
                          "the CPU, where the model's own threads use the cores)", min=0)
    filter_threshold: float | None = option(
        None, "keep only samples that a classifier gives their label with probability >= FILTER_THRESHOLD (0.9 when "
        "given bare; 0: no filter, also where --purpose sets one); the rest are redrawn and counted in the manifest",
        min=0.0, max=1.0, flag="--filter", const=0.9)
    filter_classifier: str = option("", "the classifier export for --filter (default: the cached feature "
                                    "extractor of the model's training data, trained on first use)")
    reject_copies: bool = option(False, "redraw every sample that is a near-copy of one of the model's training "
                                 "images (nearer to one than a third of the median distance of unseen real images to "
                                 "them: the evaluation's rule); how many were redrawn goes into the manifest")
    copy_reference: str = option("", "unseen real images that set the near-copy scale for --reject-copies (default: "
                                 "the test set beside the model's training set)")
    relabel: bool = option(False, "store a teacher classifier's class probabilities with every sample (soft.npy, "
                           "float32 [classes]) for training on soft labels; the teacher is trained only on the "
                           "generator's own training set (cached, trained on first use)")
    relabel_teacher: str = option("", "the teacher export for --relabel (default: the cached classifier of the "
                                  "generator's training set); refused unless it was trained on exactly that set")
    relabel_test: str = option("", "a real test set on which the --relabel teacher's accuracy is measured and "
                               "recorded (default: the 'test' set beside its training set, if there is one)")
    task: int = option(0, "this task's index in a job array (e.g. $SLURM_ARRAY_TASK_ID)", min=0)
    tasks: int = option(1, "number of array tasks; with more than 1, no manifest is written: run --finalize "
                        "when all are done", min=1)
    finalize: bool = option(False, "only verify every shard and write the manifest")
    overwrite: bool = option(False, "replace a set made with other settings in OUT")

    def sampling(self) -> dict[str, Any]:
        """The family's sampling options that were given (the sampler fills in its defaults)."""
        return {"truncation": self.truncation, "temperature": self.temperature, "top_k": self.top_k,
                "guidance": self.guidance}

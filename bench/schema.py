"""The MLflow run schema in code: the one vocabulary bench writes and sweeps and dashboards read.

docs/design.md §3 describes it for people; this module names it for the code, so a tag or metric is
spelled in one place. It imports nothing (sweeps and dashboards import it for its names only). The
fusion methods and their display order are not part of it: they come from the fusion registry
(``fusion.available_methods()``, ``fusion.registry.display_order()``).
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------------------- tags
PREFIX = "fusebench."

ROLE = "fusebench.role"  # what a run is: ROLE_EXPERIMENT or ROLE_STUDY
ROLE_EXPERIMENT = "experiment"  # one fusion experiment (bench.experiment.run_experiment)
ROLE_STUDY = "study"  # a sweep's parent run

# the configuration of an experiment run (set by bench)
METHOD = "fusebench.method"  # fusion method name
ARCH = "fusebench.arch"  # mlp-<width>x<depth> or the timm name
DATASET = "fusebench.dataset"
N_MEMBERS = "fusebench.n_members"
SPARSITY = "fusebench.sparsity"  # NT sparsity actually used ("" when not NT)
REPAIR = "fusebench.repair"  # none | reset | repair
FINETUNE_EPOCHS = "fusebench.finetune_epochs"
SEED = "fusebench.seed"  # repeat seed
DEVICE = "fusebench.device"  # "cpu" or the CUDA device name
# provenance
GIT_COMMIT = "fusebench.git_commit"
VERSION_PREFIX = "fusebench.version."  # + package name (dashes as underscores)
# set by sweeps on trial runs
STUDY = "fusebench.study"  # also on the study's parent run
TRIAL = "fusebench.trial"  # Optuna trial number
TRIAL_STATE = "fusebench.trial_state"  # RUNNING, then the trial's final state
REPEAT = "fusebench.repeat"  # index of the member seed within the trial
# on a study's parent run: where the Optuna study lives (journal path or DB URL without password)
STORAGE = "fusebench.storage"
# the error of a FAILED (or KILLED) run
ERROR = "fusebench.error"

#: Every fusebench tag of a run (the version tags are VERSION_PREFIX + a package).
TAGS = (ROLE, METHOD, ARCH, DATASET, N_MEMBERS, SPARSITY, REPAIR, FINETUNE_EPOCHS, SEED, DEVICE, GIT_COMMIT,
        STUDY, TRIAL, TRIAL_STATE, REPEAT, STORAGE, ERROR)  # fmt: skip


def is_tag(name: object) -> bool:
    """Whether ``name`` is a fusebench tag of the schema."""
    return isinstance(name, str) and (name in TAGS or name.startswith(VERSION_PREFIX))


# MLflow's own tags that fusebench sets
MLFLOW_PARENT_RUN = "mlflow.parentRunId"
MLFLOW_NOTE = "mlflow.note.content"
# MLflow 3's UI opens an experiment of this kind on its runs table (not on the GenAI traces overview)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}

#: The key of a configuration: leaderboard column -> (tag, the config param it copies; dashboards fall back
#: on the param for runs without the tag).
KEY_TAGS: dict[str, tuple[str, str]] = {
    "dataset": (DATASET, "data.name"),
    "arch": (ARCH, "model.arch"),
    "n_members": (N_MEMBERS, "members.n"),
    "method": (METHOD, "fusion.method"),
    "sparsity": (SPARSITY, "fusion.options.sparsity"),
    "repair": (REPAIR, "fusion.repair"),
    "finetune_epochs": (FINETUNE_EPOCHS, "finetune.epochs"),
    "seed": (SEED, "seed"),
}

# -------------------------------------------------------- Optuna attributes (sweeps' side of the study)
TRIAL_WORKER_ATTR = "fusebench.worker"  # {"host", "pid", "pid_start"} of the process running the trial
TRIAL_ERROR_ATTR = ERROR  # why a trial failed
TRIAL_RUN_IDS_ATTR = "fusebench.run_ids"  # the MLflow runs of a trial, one per repeat
STUDY_PARENT_RUN_ATTR = "fusebench.parent_run_id"  # the study's MLflow parent run

# ------------------------------------------------------------------------------------------- metrics
# Accuracies are fractions in [0, 1], on the test split unless named val.
MEMBERS_MEAN_ACC = "members_mean_acc"
BEST_MEMBER_ACC = "best_member_acc"
ENSEMBLE_ACC = "ensemble_acc"
BEST_MEMBER_FT_ACC = "best_member_ft_acc"
BEST_MEMBER_FT_ACC_FINAL = "best_member_ft_acc_final"
BEST_MEMBER_DISTILL_ACC = "best_member_distill_acc"
BEST_MEMBER_DISTILL_ACC_FINAL = "best_member_distill_acc_final"
FUSED_ACC = "fused_acc"
FUSED_VAL_ACC = "fused_val_acc"
FT_TRAIN_LOSS = "ft_train_loss"
FUSED_ACC_RAW = "fused_acc_raw"
FUSED_ACC_BEFORE_FT = "fused_acc_before_ft"
REPAIR_TIME_S = "repair_time_s"
LMC_ACC = "lmc_acc"
LMC_LOSS = "lmc_loss"
LMC_BARRIER_ACC = "lmc_barrier_acc"
LMC_BARRIER_LOSS = "lmc_barrier_loss"
TRAIN_IMAGES_PER_S = "train_images_per_s"
FINETUNE_IMAGES_PER_S = "finetune_images_per_s"
FUSED_ACC_FINAL = "fused_acc_final"
FUSED_ACC_BEST_VAL = "fused_acc_best_val"
GAIN_OVER_BEST_MEMBER = "gain_over_best_member"
GAIN_OVER_BEST_MEMBER_UNTUNED = "gain_over_best_member_untuned"
GAIN_OVER_ENSEMBLE = "gain_over_ensemble"
FUSION_TIME_S = "fusion_time_s"
FUSION_PEAK_MEM_MB = "fusion_peak_mem_mb"
FUSED_PARAMS = "fused_params"
MEMBER_PARAMS = "member_params"
FUSED_MACS = "fused_macs"
MEMBER_MACS = "member_macs"
FUSED_LATENCY_MS = "fused_latency_ms"
PINNED_CHANNEL_SETS = "pinned_channel_sets"
ENSEMBLE_LATENCY_MS = "ensemble_latency_ms"
TRAIN_TIME_S = "train_time_s"
FINETUNE_TIME_S = "finetune_time_s"
TOTAL_TIME_S = "total_time_s"

#: Metric name -> meaning (docs/design.md §3). ``(step = epoch)``: one value per fine-tune epoch.
METRICS: dict[str, str] = {
    MEMBERS_MEAN_ACC: "mean test accuracy of the members",
    BEST_MEMBER_ACC: "test accuracy of the best member (chosen by validation)",
    ENSEMBLE_ACC: "output-averaging ensemble",
    BEST_MEMBER_FT_ACC: "best member fine-tuned with the same budget, test accuracy at its best validation epoch",
    BEST_MEMBER_FT_ACC_FINAL: "same, after the last epoch",
    BEST_MEMBER_DISTILL_ACC: "best member distilled from the ensemble, same budget and selection",
    BEST_MEMBER_DISTILL_ACC_FINAL: "same, after the last epoch",
    FUSED_ACC: "(step = epoch) fused test accuracy after each fine-tune epoch; step 0 is right after fusion",
    FUSED_VAL_ACC: "(step = epoch) same on validation",
    FT_TRAIN_LOSS: "(step = epoch) mean training loss of each epoch (from step 1)",
    FUSED_ACC_RAW: "test accuracy right after fusion, before any repair",
    FUSED_ACC_BEFORE_FT: "test accuracy after the repair: where fine-tuning starts",
    REPAIR_TIME_S: "wall time of the repair",
    LMC_ACC: "(step = round(100 alpha)) accuracy along the path between the aligned members (N = 2)",
    LMC_LOSS: "(step = round(100 alpha)) loss along the same path",
    LMC_BARRIER_ACC: "worst accuracy shortfall below the line between the endpoints",
    LMC_BARRIER_LOSS: "worst loss excess above the line between the endpoints",
    TRAIN_IMAGES_PER_S: "member training throughput",
    FINETUNE_IMAGES_PER_S: "fine-tune throughput",
    FUSED_ACC_FINAL: "after the last fine-tune epoch",
    FUSED_ACC_BEST_VAL: "test accuracy at the epoch with the best validation accuracy",
    GAIN_OVER_BEST_MEMBER: "fused_acc_best_val minus best_member_ft_acc (when it ran) else best_member_acc",
    GAIN_OVER_BEST_MEMBER_UNTUNED: "fused_acc_best_val minus best_member_acc",
    GAIN_OVER_ENSEMBLE: "fused_acc_best_val minus ensemble_acc",
    FUSION_TIME_S: "wall time of fusion.fuse (synchronized on GPU)",
    FUSION_PEAK_MEM_MB: "peak memory during fusion beyond the inputs",
    FUSED_PARAMS: "parameters of the fused model",
    MEMBER_PARAMS: "parameters of one member",
    FUSED_MACS: "multiply-accumulates of the fused model",
    MEMBER_MACS: "multiply-accumulates of one member",
    FUSED_LATENCY_MS: "median batch inference latency of the fused model",
    PINNED_CHANNEL_SETS: "channel sets mixed across the channel axis (e.g. ECA), kept in place and averaged by "
    "every method: NT on such a model is part transplant, part average (README: Pinned channels)",
    ENSEMBLE_LATENCY_MS: "median batch inference latency of the ensemble",
    TRAIN_TIME_S: "wall time of member training",
    FINETUNE_TIME_S: "wall time of the fine-tune",
    TOTAL_TIME_S: "wall time of the experiment",
}
#: ``member_<i>_acc``: test accuracy of member i.
MEMBER_ACC = re.compile(r"member_\d+_acc")


def member_acc(i: int) -> str:
    return f"member_{i}_acc"


#: Without these an experiment run cannot be ranked (dashboards skip it with a warning).
REQUIRED_METRICS = (FUSED_ACC_BEFORE_FT, FUSED_ACC_BEST_VAL)


def is_metric(name: object) -> bool:
    """Whether ``name`` is a metric of the schema."""
    return isinstance(name, str) and (name in METRICS or MEMBER_ACC.fullmatch(name) is not None)


# --------------------------------------------------------------------------------------- artifacts
# attached to a study's parent run by `fusebench leaderboard / report --study NAME --log-to-run`
LEADERBOARD_DIR = "leaderboard"  # leaderboard.csv (raw values), leaderboard.md
REPORT_DIR = "report"  # report.html, plots/<plot-id>.html

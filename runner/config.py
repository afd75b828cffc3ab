"""Typed config schemas, their registration, validation and canonical ids.

The YAML files under ``conf/`` extend the dataclasses registered here, so a
misspelt key or a wrong type fails when Hydra composes the config. What a
type cannot say (ranges, which loss names a task has, which parameters a
shape needs) is checked by :func:`validate`, before any data is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from envelopes import Envelope
from methods.loss_controller import ControllerSettings
from methods.loss_controller import check_settings as check_controller_settings
from methods.vwpr import check_settings as check_vwpr_settings
from tasks import TASKS, task_module

DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config value is invalid; the message names the key and what is allowed."""


@dataclass
class EnvelopeConfig:
    """One loss's envelope. Static: ``threshold``/``inverse_slope`` (loss units).
    Adaptive: ``quantile``/``width`` (quantile levels of the batch losses)."""

    shape: str = "identity"
    threshold: float | None = None
    quantile: float | None = None
    inverse_slope: float | None = None
    width: float | None = None
    step_size: float = 1.0
    gamma: float | None = None
    fraction: float | None = None
    full_gradient: bool = False


@dataclass
class VWPRConfig:
    """Value-Weighted Parameter Refinement (methods/vwpr.py); off unless ``enabled``."""

    enabled: bool = False
    # bounded: phi ascends sum(phi * l) - strength/2 * sum((phi - 1)^2), bounded by 1 + max(l) / strength;
    # document: phi <- softplus(phi + lr * l), as its document writes it (unbounded but for clip)
    rule: str = "bounded"
    strength: float = 1.0
    per_element: bool = False
    normalise: bool = True
    l1: float = 0.0  # the document's lambda in L_total = L_transformed + lambda ||phi||_1 (reported only)
    clip: float | None = None
    lr: float = 0.01  # the document rule's alpha; the bounded rule's Adam learning rate


@dataclass
class ControllerConfig(ControllerSettings):
    """The adaptive loss-weighting controller (methods/loss_controller.py); off while ``mode`` is null."""

    mode: str | None = None


@dataclass
class ReportConfig:
    """What the end-of-sweep report selects on: a metric (e.g. val_accuracy; null: the task's objective) and
    whether lower or higher is better (null: the objective's direction, else min)."""

    metric: str | None = None
    mode: str | None = None


@dataclass
class Config:
    """A job's config: the defaults of every top-level key (conf/config.yaml chooses the groups only)."""

    task: Any = MISSING  # a task config (conf/task/*.yaml), its schema the task module's Config
    # one per loss of the task; each typed by its envelope file (conf/envelope/*.yaml extend EnvelopeConfig), so a
    # misspelt loss name reaches validate(), which lists the task's losses
    envelopes: dict[str, Any] = field(default_factory=dict)
    # Value-Weighted Parameter Refinement (methods/vwpr.py): per-parameter value weights on gradients
    vwpr: VWPRConfig = field(default_factory=VWPRConfig)
    # adaptive loss weighting (methods/loss_controller.py); mode null (off) | baseline | monitor_only |
    # controller_only | full
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    seed: int = 0
    # a supervised or VAE run whose validation loss (the task's objective) grows past this many times its first
    # value is marked failed as diverged (null: only non-finite values fail a run)
    divergence_factor: float | None = 1000.0
    # seeds trained together in one job as one batched model: seed, seed+1, ..., seed+seed_batch-1
    # (each seed still gets its own files and result)
    seed_batch: int = 1
    device: str = "auto"  # auto | cpu | cuda
    # torch threads per training process (null: 1, or the CPUs a Slurm or Ray launcher gives the job)
    threads: int | None = None
    # compile the training step with torch.compile (tasks with COMPILE = True: ppo); the first minibatch of a
    # group pays the compilation (tens of seconds), the same arithmetic then runs fused; results agree with
    # the eager step up to floating-point rounding, as across thread counts
    compile: bool = False
    # the CPU kernels of a task's networks (tasks with FUSED = True: ppo): fused (each network's forward and
    # backward pass in one C++ kernel, tasks/fused_mlp.py; built with the C++ compiler on first use, tens of
    # seconds once, then cached) | torch (torch's batched products and elementwise kernels) | auto (fused where it
    # applies: on the CPU, with a C++ compiler, compile=false; torch elsewhere); results agree up to rounding
    kernels: str = "auto"
    data_root: str = "data"  # where data sets live; each task's data_dir defaults to a folder below it
    tensorboard: bool = True
    progress: bool | None = None  # progress bar; null: only when stderr is a terminal
    # skip a job whose effective config (shape-ignored parameters dropped) already ran in the sweep
    deduplicate: bool = True
    # results cache shared between sweeps (runner/cache.py): a run already completed there with the same
    # effective config, seed and code version is copied instead of trained; null: off
    cache_dir: str | None = None
    # flush denormal floats to zero on CPU: a sigmoid envelope's tiny weights make denormal gradients,
    # which CPUs process many times slower (bench/envelope_overhead.py --keep-denormals)
    flush_denormal: bool = True
    # the end-of-sweep report's selection metric (python -m analysis <sweep> --metric ... --mode ... the same)
    report: ReportConfig = field(default_factory=ReportConfig)
    # export each finished run to an experiment tracker (runner/tracking.py): mlflow | null (off)
    tracking: str | None = None
    # the tracker's store (null: SQLite in outputs/mlruns; or a tracking server's http://host:port)
    tracking_uri: str | None = None


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def help_groups() -> str:
    """The user-facing config groups (``conf/<group>/*.yaml``, Hydra's and the schemas left out) and their options."""
    lines = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra"):
        key = {"envelope": "envelope@envelopes.<loss>"}.get(group.name, group.name)
        lines.append(f"{key}: {', '.join(sorted(f.stem for f in group.glob('*.yaml')))}")
        for sub in sorted(p for p in group.iterdir() if p.is_dir()):  # presets kept apart, e.g. envelope/paper
            lines.append(f"{key}: {', '.join(sorted(f'{sub.name}/{f.stem}' for f in sub.glob('*.yaml')))}")
    return "\n".join(lines)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (idempotent)."""
    if not OmegaConf.has_resolver("or_else"):
        # ${or_else:x,default}: x, or the default where x is null (a group left unchosen).
        OmegaConf.register_new_resolver("or_else", lambda value, default: default if value is None else value)
    if not OmegaConf.has_resolver("lae_help_groups"):
        # ${lae_help_groups:}: the config groups a user chooses from, for --help (not the internal schema/ ones)
        OmegaConf.register_new_resolver("lae_help_groups", help_groups)
    store = ConfigStore.instance()
    store.store(name="base_config", node=Config)
    store.store(group="schema", name="envelope", node=EnvelopeConfig)
    for name in TASKS:
        store.store(group="schema/task", name=name, node=task_module(name).Config)


def build_envelopes(cfg: DictConfig) -> dict[str, Envelope]:
    """One :class:`Envelope` per loss name of the task, validated."""
    task_name = cfg.task.name
    loss_names = tuple(task_module(task_name).loss_names(cfg.task))
    given = tuple(cfg.envelopes.keys())
    unknown = [name for name in given if name not in loss_names]
    missing = [name for name in loss_names if name not in given]
    if unknown:
        raise ConfigError(
            f"envelopes: task {task_name!r} has no loss named {unknown[0]!r}; its losses are {list(loss_names)}"
        )
    if missing:
        raise ConfigError(
            f"envelopes: task {task_name!r} needs an envelope for each of its losses {list(loss_names)}; "
            f"missing {missing} (add envelope@envelopes.{missing[0]}=identity)"
        )
    out = {}
    for name in loss_names:
        try:
            out[name] = Envelope.from_config(OmegaConf.to_container(cfg.envelopes[name]))
        except ValueError as error:
            raise ConfigError(f"envelopes.{name}: {error}") from None
    return out


def controller_settings(cfg: DictConfig, **replace: Any) -> ControllerSettings:
    return ControllerSettings(**{**OmegaConf.to_container(cfg.controller, resolve=True), **replace})


def controller_on(mode: str | None) -> bool:
    """Whether a controller mode changes training: null and ``baseline`` (the base loss alone) train exactly
    what no controller trains, so they are the same run."""
    return mode not in (None, "baseline")


def check_report_metric(task_name: str, metric: str) -> None:
    """``report.metric`` (``val_loss``, ``final_val_loss``, ``best_val_accuracy``, ``val/loss``) names a metric the
    task records; a :class:`ConfigError` listing them otherwise."""
    from fnmatch import fnmatchcase

    patterns = task_module(task_name).METRICS
    name = metric.replace("/", "_")
    for prefix in ("final_", "best_"):
        name = name.removeprefix(prefix)
    if not any(fnmatchcase(name, pattern) for pattern in patterns):
        raise ConfigError(
            f"report.metric: task {task_name!r} records no metric {metric!r}; its metrics are {list(patterns)} "
            "(* any ending; final_ or best_ in front selects the last or best value)"
        )


def validate(cfg: DictConfig) -> dict[str, Envelope]:
    """Check everything a type cannot; return the envelopes. Raises :class:`ConfigError`."""
    if cfg.task.name not in TASKS:
        raise ConfigError(f"task.name must be one of {list(TASKS)}, got {cfg.task.name!r}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device must be one of {list(DEVICES)}, got {cfg.device!r}")
    from runner.tracking import check as check_tracking

    try:
        check_tracking(cfg.tracking)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if cfg.seed < 0:
        raise ConfigError(
            f"seed must be a non-negative integer (it seeds torch, numpy and each run's data split), got {cfg.seed}"
        )
    if cfg.divergence_factor is not None and not cfg.divergence_factor > 1:
        raise ConfigError(f"divergence_factor must be > 1 or null (off), got {cfg.divergence_factor!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be a positive integer or null, got {cfg.threads!r}")
    if cfg.report.metric is not None:
        check_report_metric(cfg.task.name, cfg.report.metric)
    if cfg.report.mode not in (None, "min", "max"):
        raise ConfigError(f"report.mode must be one of ['min', 'max'] or null, got {cfg.report.mode!r}")
    if cfg.seed_batch < 1:
        raise ConfigError(
            f"seed_batch must be a positive integer (seeds trained together in one job), got {cfg.seed_batch!r}"
        )
    if cfg.seed_batch > 1:
        if not getattr(task_module(cfg.task.name), "SEED_BATCH", False):
            batching = [name for name in TASKS if getattr(task_module(name), "SEED_BATCH", False)]
            raise ConfigError(
                f"seed_batch: task {cfg.task.name!r} trains one seed per job (seed_batch=1); "
                f"seed_batch > 1 is supported by the tasks {batching}, got seed_batch={cfg.seed_batch}"
            )
        if cfg.vwpr.enabled:
            raise ConfigError(
                f"seed_batch: VWPR (vwpr.enabled=true) trains one seed per job; use seed_batch=1, "
                f"got seed_batch={cfg.seed_batch}"
            )
    if cfg.compile:
        check_compile(cfg)
    check_kernels(cfg)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(
                "device: cuda was asked for but torch sees no CUDA device on this machine; "
                "allowed here: auto (picks CUDA when present) or cpu, got 'cuda'"
            )
    # every setting given is range-checked, also while its method is off
    try:
        check_vwpr_settings(cfg.vwpr.l1, cfg.vwpr.clip, cfg.vwpr.lr, cfg.vwpr.rule, cfg.vwpr.strength)
    except ValueError as error:
        raise ConfigError(f"vwpr.{error}") from None
    try:
        check_controller_settings(controller_settings(cfg, mode=cfg.controller.mode or "full"))
    except ValueError as error:
        raise ConfigError(f"controller.{error}") from None
    if cfg.controller.mode is not None:
        module = task_module(cfg.task.name)
        if not hasattr(module, "AUX_LOSSES"):
            supported = [name for name in TASKS if hasattr(task_module(name), "AUX_LOSSES")]
            raise ConfigError(
                f"controller.mode: task {cfg.task.name!r} has no auxiliary losses to weight; the "
                f"controller runs on the tasks {supported}, got controller.mode={cfg.controller.mode!r}"
            )
        if cfg.seed_batch > 1:
            raise ConfigError(
                f"seed_batch: the loss controller trains one seed per job; use seed_batch=1, "
                f"got seed_batch={cfg.seed_batch}"
            )
        if cfg.task.name == "vae" and cfg.task.kl_annealing_steps:
            raise ConfigError(
                f"task.kl_annealing_steps: the loss controller sets the KL weight itself; use 0 with "
                f"controller.mode={cfg.controller.mode}, got {cfg.task.kl_annealing_steps}"
            )
    try:
        task_module(cfg.task.name).validate(cfg.task)
    except ValueError as error:
        raise ConfigError(f"task.{error}") from None
    return build_envelopes(cfg)


def check_compile(cfg: DictConfig) -> None:
    """compile=true: a task that compiles its step, and on the CPU a C++ compiler for Inductor's kernels."""
    if not getattr(task_module(cfg.task.name), "COMPILE", False):
        compiling = [name for name in TASKS if getattr(task_module(name), "COMPILE", False)]
        raise ConfigError(
            f"compile: task {cfg.task.name!r} has no compiled step; compile=true is supported by the tasks "
            f"{compiling}, got compile=true"
        )
    import torch

    from tasks.common import cpp_compilers

    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    compilers, found = cpp_compilers()
    if on_cpu and found is None:
        raise ConfigError(
            f"compile: torch.compile on the CPU builds C++ kernels, and none of the compilers {compilers} is "
            "on PATH; install one (apt-get install g++) or use compile=false, got compile=true"
        )


KERNELS = ("auto", "fused", "torch")


def check_kernels(cfg: DictConfig) -> None:
    """kernels: one of :data:`KERNELS`; fused only where it can run (a task with fused kernels, on the CPU, with a
    C++ compiler and ninja, not under compile=true, networks the kernels take)."""
    if cfg.kernels not in KERNELS:
        raise ConfigError(f"kernels: must be one of {list(KERNELS)}, got {cfg.kernels!r}")
    if cfg.kernels != "fused":
        return
    module = task_module(cfg.task.name)
    if not getattr(module, "FUSED", False):
        fused = [name for name in TASKS if getattr(task_module(name), "FUSED", False)]
        raise ConfigError(
            f"kernels: task {cfg.task.name!r} has no fused kernels; kernels=fused is supported by the tasks {fused}; "
            "allowed for it: ['auto', 'torch'], got 'fused'"
        )
    import torch

    from tasks import fused_mlp

    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        raise ConfigError(
            f"kernels: the fused kernels run on the CPU, and this run's device is CUDA (device={cfg.device}); "
            "use kernels=auto or torch, or device=cpu, got 'fused'"
        )
    if cfg.compile:
        raise ConfigError(
            "kernels: compile=true compiles torch's own kernels, which the fused ones replace; use kernels=auto "
            "or torch with compile=true, or compile=false, got 'fused'"
        )
    missing = fused_mlp.missing_tools()
    if missing is not None:
        raise ConfigError(
            f"kernels: the fused kernels are built on this machine, and {missing}; or use kernels=auto or torch, "
            "got 'fused'"
        )
    reason = module.kernels_unsupported(cfg.task)
    if reason is not None:
        raise ConfigError(
            f"kernels: the fused kernels cannot run this task's networks: {reason}; use kernels=auto or torch"
        )


def resolve_kernels(cfg: DictConfig, device) -> str:
    """What ``kernels`` means for this run on ``device``: fused or torch (auto: fused wherever it can run; a run
    logs which)."""
    module = task_module(cfg.task.name)
    if cfg.kernels == "torch" or not getattr(module, "FUSED", False):
        return "torch"
    if cfg.kernels == "fused":
        return "fused"
    from tasks import fused_mlp

    fits = device.type == "cpu" and not cfg.compile and module.kernels_unsupported(cfg.task) is None
    return "fused" if fits and fused_mlp.missing_tools() is None else "torch"


# Keys that change how a run is watched, not what it computes.
NOT_EFFECTIVE = {
    "seed_batch",
    "cache_dir",
    "device",
    "threads",
    "compile",
    "kernels",
    "data_root",
    "tensorboard",
    "progress",
    "deduplicate",
    "flush_denormal",
    "report",
    "divergence_factor",
    "tracking",
    "tracking_uri",
}
_TASK_NOT_EFFECTIVE = {"data_dir", "download"}


# Task settings added after runs existed, each with the value those runs trained with ("as always") and the keys it
# leaves unused at that value: Adam (which also ignores the momentum), no rare classes (which leaves the fraction
# kept unused), raw pixels, training-split statistics, per-seed random splits and PPO's orthogonal initialisation.
AS_ALWAYS: dict[str, tuple[Any, tuple[str, ...]]] = {
    "optimizer": ("adam", ("momentum",)),
    "rare_classes": ([], ("rare_fraction",)),
    "pixel_normalisation": (None, ()),
    "standardise": ("train", ()),
    "split": ("random", ("val_start",)),
    "init": ("orthogonal", ()),
}


def _unused_task_keys(task: dict[str, Any]) -> set[str]:
    """Task keys that change nothing as set: left out of the run's id.

    Each setting of :data:`AS_ALWAYS` at the value runs always had, with
    the keys it leaves unused, so those runs keep their ids. A run's
    recorded task without such a key had it at that value.
    """
    unused = set()
    for key, (value, leaves_unused) in AS_ALWAYS.items():
        if key in task and task[key] == value:
            unused |= {key, *leaves_unused}
    return unused


def effective_config(cfg: DictConfig, envelopes: dict[str, Envelope], data: bool = True) -> dict[str, Any]:
    """The parameters that determine a run's results, in canonical form.

    Envelope parameters a shape ignores (identity's threshold, step's width,
    a static envelope's step size) are dropped, so two configs that train
    the same thing map to the same dict. Where the data is read from is
    left out, but what is read is in: ``data`` holds the digest of every
    file the task reads (:func:`runner.data.data_identity`, which raises if
    the data is missing or unreadable). ``data=False`` leaves it out, for
    checking configs without their data.
    """
    # Key by key: a job config composed by the sweeper still has a ``hydra`` node
    # with values (the job number) that only exist once the job starts.
    container: dict[str, Any] = {}
    for key in cfg:
        if key != "hydra":
            node = cfg[key]
            container[key] = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    out = {key: value for key, value in container.items() if key not in NOT_EFFECTIVE | {"envelopes"}}
    task = container["task"]
    out["task"] = {
        key: value for key, value in task.items() if key not in _TASK_NOT_EFFECTIVE | _unused_task_keys(task)
    }
    out["envelopes"] = {name: envelope.config() for name, envelope in sorted(envelopes.items())}
    if data:
        from runner.data import data_identity

        identity = data_identity(cfg.task)
        if identity is not None:
            out["data"] = identity
    # VWPR's settings matter only when it is on
    out["vwpr"] = container["vwpr"] if container["vwpr"]["enabled"] else {"enabled": False}
    # the controller's only when it is on (a run without it keeps the id it always had); its baseline mode
    # (the base loss alone) trains what no controller trains, so it is the same run
    out.pop("controller", None)
    if controller_on(container["controller"]["mode"]):
        out["controller"] = container["controller"]
    return out


def config_id(effective: dict[str, Any], with_seed: bool = False) -> str:
    """A short stable hash of an effective config (the seed left out unless asked)."""
    payload = dict(effective) if with_seed else {k: v for k, v in effective.items() if k != "seed"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_yaml(cfg: Any, resolve: bool = False) -> str:
    """``OmegaConf.to_yaml(cfg, resolve=resolve)``, the same text (a test compares them on every preset's job
    config and Hydra node), from libyaml's emitter where PyYAML has it: the batching launcher's workers write
    three of these per job, and the pure-Python emitter took 3.4 ms of the 5.7 a Hydra node took. A dict is
    dumped as the config it would make (``{"hydra": node}`` for ``hydra.yaml``) without copying its nodes."""
    import yaml

    if isinstance(cfg, dict):
        container = {
            key: OmegaConf.to_container(value, resolve=resolve, enum_to_str=True)
            if OmegaConf.is_config(value)
            else value
            for key, value in cfg.items()
        }
    else:
        container = OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True)
    return yaml.dump(container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_yaml_dumper())


@functools.cache
def _yaml_dumper() -> type:
    """OmegaConf's YAML dumper (its representer quotes the strings YAML would read back as another type) on
    libyaml's emitter; OmegaConf's own where PyYAML was built without libyaml."""
    import yaml
    from omegaconf._utils import get_omega_conf_dumper

    dumper = get_omega_conf_dumper()
    if not hasattr(yaml, "CDumper"):
        return dumper

    class Dumper(yaml.CDumper):
        pass

    for kind, representer in dumper.yaml_representers.items():
        Dumper.add_representer(kind, representer)
    return Dumper

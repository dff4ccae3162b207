"""Which preflight checks a config needs, run all of them, report every failure at once.

``CHECKS`` is the registry: each entry names a check, says from the config and environment
whether it applies, and runs it. Checks for config sections that a build may not have
(``hub.push``, ``tracking.wandb.mode``, ``train.global_batch_size``) read them through
``config_value``, which answers None when the key does not exist, so the check simply does not
apply until the key does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from multitune.config.schema import RunConfig
from multitune.data.loading import is_local
from multitune.models.gguf import BUILTIN_GGUF_MODELS
from multitune.models.tiny import TINY_MODEL_NAME
from multitune.preflight import checks

log = logging.getLogger(__name__)

# Checkpoint bytes per trainable parameter: the float32 value and AdamW's two float32 moments.
CHECKPOINT_BYTES_PER_PARAMETER = 12
# Room for tokenizer files, metrics, confusion matrices and file-system slack.
DISK_MARGIN_BYTES = 256 * 1024**2


class PreflightError(RuntimeError):
    """One or more preflight checks failed; the message lists every failure."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        lines = "\n".join(f"  - {failure}" for failure in failures)
        super().__init__(
            f"preflight found {len(failures)} problem(s); nothing was started:\n{lines}"
        )


@dataclass(frozen=True)
class Context:
    """What every check may read: the config, the environment, the Hub endpoint and token."""

    cfg: RunConfig
    env: Mapping[str, str]
    endpoint: str
    token: str | None

    @property
    def hub_repos(self) -> list[tuple[str, str, str | None]]:
        """(repo type, id, revision) of everything the run downloads from the Hub."""
        repos = []
        model = self.cfg.model
        if not is_builtin_model(model.name) and not Path(model.name).expanduser().exists():
            repos.append(("model", model.name, model.revision))
        for task in self.cfg.tasks:
            if task.dataset and not is_local(task.dataset):
                repos.append(("dataset", task.dataset, task.revision))
        return repos

    @property
    def offline(self) -> bool:
        from huggingface_hub import constants

        return constants.is_offline_mode()


def config_value(cfg: RunConfig, dotted: str):
    """The value at ``dotted`` (e.g. ``hub.push``), or None when this config has no such key."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


@dataclass(frozen=True)
class Check:
    name: str
    applies: Callable[[Context], bool]
    run: Callable[[Context], list[str]]
    # Talks to the Hub: skipped when the Hub was found unreachable (one line says it all).
    talks_to_hub: bool = False


def _needs_hub(ctx: Context) -> bool:
    return bool(ctx.hub_repos)


def _hub_reachable(ctx: Context) -> list[str]:
    if ctx.offline:
        return checks.repos_in_offline_cache(ctx.hub_repos)
    return checks.hub_reachable(ctx.endpoint, [f"{t} {r}" for t, r, _ in ctx.hub_repos])


def _online_hub(ctx: Context) -> bool:
    return bool(ctx.hub_repos) and not ctx.offline


def _token_valid(ctx: Context) -> list[str]:
    return checks.token_valid(ctx.endpoint, ctx.token)


def _repos_readable(ctx: Context) -> list[str]:
    failures = []
    for repo_type, repo_id, _ in ctx.hub_repos:
        failures += checks.repo_readable(ctx.endpoint, repo_type, repo_id, ctx.token)
    return failures


def _push_configured(ctx: Context) -> bool:
    return bool(config_value(ctx.cfg, "hub.push") or config_value(ctx.cfg, "hub.push_checkpoints"))


def _pushes(ctx: Context) -> bool:
    # Without a token the network-free check below already says so.
    return _push_configured(ctx) and not ctx.offline and ctx.token is not None


def _push_token(ctx: Context) -> list[str]:
    return checks.push_token_set(config_value(ctx.cfg, "hub.repo") or "hub.repo", ctx.token)


def _pushes_offline(ctx: Context) -> bool:
    return _push_configured(ctx) and ctx.offline


def _push_offline(ctx: Context) -> list[str]:
    return [
        "hub.push / hub.push_checkpoints need the Hub, but HF_HUB_OFFLINE=1 is set: unset it, "
        "or set both to false"
    ]


def _push_writable(ctx: Context) -> list[str]:
    repo = config_value(ctx.cfg, "hub.repo")
    if not repo:
        return ["hub.push is set but hub.repo names no repository to push to"]
    return checks.push_writable(ctx.endpoint, repo, ctx.token)


def _wandb_online(ctx: Context) -> bool:
    if "wandb" not in (config_value(ctx.cfg, "tracking.backends") or []):
        return False  # the wandb settings apply only when wandb is a backend
    mode = config_value(ctx.cfg, "tracking.wandb.mode")
    # WANDB_MODE in the environment overrides the config, as it does inside wandb itself.
    return ctx.env.get("WANDB_MODE", mode) == "online"


def _wandb_key(ctx: Context) -> list[str]:
    return checks.wandb_key_present(ctx.env)


def checkpoint_bytes(cfg: RunConfig) -> tuple[int, str]:
    """Disk the run's outputs take at their peak, from the plan's parameter counts."""
    from multitune.planning.architecture import resolve_architecture
    from multitune.planning.parameters import count_parameters

    counts = count_parameters(
        resolve_architecture(cfg.model).config, cfg.lora, cfg.model.trust_remote_code
    )
    # keep_last committed checkpoints plus the one being written before the oldest is purged.
    kept = cfg.checkpoint.keep_last + 1
    checkpoint = counts.trainable * CHECKPOINT_BYTES_PER_PARAMETER
    adapters = 2 * counts.trainable * 4  # adapter/ and best/
    base = counts.base * 4 if cfg.model.name == TINY_MODEL_NAME else 0  # base_model/
    total = kept * checkpoint + adapters + base + DISK_MARGIN_BYTES
    detail = (
        f"{kept} checkpoints of {checkpoint / 1024**2:.1f} MiB for {counts.trainable:,} "
        "trainable parameters, adapter/ and best/"
        + (", the built-in base model" if base else "")
        + ", 256 MiB margin"
    )
    return total, detail


def _free_disk(ctx: Context) -> list[str]:
    try:
        needed, detail = checkpoint_bytes(ctx.cfg)
    except Exception as exc:  # an estimate that cannot be made is itself a finding
        return [f"cannot estimate the checkpoint size ({type(exc).__name__}: {exc})"]
    return checks.free_disk(Path(ctx.cfg.output_dir), needed, detail)


def _launch_consistent(ctx: Context) -> list[str]:
    import torch

    return checks.launch_consistent(
        ctx.env,
        ctx.cfg.train.micro_batch_size,
        ctx.cfg.train.grad_accum,
        config_value(ctx.cfg, "train.global_batch_size"),
        torch.cuda.device_count() if torch.cuda.is_available() else 0,
    )


def _always(ctx: Context) -> bool:
    return True


def _token_set(ctx: Context) -> bool:
    return _online_hub(ctx) and ctx.token is not None


HUB_REACHABLE = Check("hub reachable", _needs_hub, _hub_reachable)
CHECKS = [
    HUB_REACHABLE,
    Check("HF_TOKEN valid", _token_set, _token_valid, talks_to_hub=True),
    Check("hub repos readable (gated, private)", _online_hub, _repos_readable, talks_to_hub=True),
    # Needs no network: listed with the offline or unreachable-Hub failures, not hidden by them.
    Check("push token set", _push_configured, _push_token),
    Check("push repo writable", _pushes, _push_writable, talks_to_hub=True),
    Check("push while offline", _pushes_offline, _push_offline),
    Check("W&B key", _wandb_online, _wandb_key),
    Check("free disk", _always, _free_disk),
    Check("launch (world size, global batch)", _always, _launch_consistent),
]


def run_preflight(
    cfg: RunConfig, env: Mapping[str, str] | None = None, endpoint: str | None = None
) -> list[str]:
    """Every failure of every applicable check, in registry order; [] when all pass.

    The checks that talk to the Hub only run when it answered, so a machine without a network
    gets one clear line instead of one per repo.
    """
    from huggingface_hub import constants, get_token

    env = os.environ if env is None else env
    # HF_ENDPOINT read now (huggingface_hub reads it once, at import), as hub/checks.py does.
    endpoint = endpoint or env.get("HF_ENDPOINT") or constants.ENDPOINT
    ctx = Context(cfg, env, endpoint, env.get("HF_TOKEN") or get_token())
    failures: list[str] = []
    hub_down = False
    for check in CHECKS:
        if not check.applies(ctx):
            continue
        if hub_down and check.talks_to_hub:
            continue
        found = check.run(ctx)
        log.debug("preflight %s: %s", check.name, found or "ok")
        hub_down = hub_down or (check is HUB_REACHABLE and bool(found))
        failures += found
    return failures


def check_preflight(cfg: RunConfig, env: Mapping[str, str] | None = None) -> None:
    """Raise ``PreflightError`` listing every failure, before anything expensive starts."""
    failures = run_preflight(cfg, env)
    if failures:
        raise PreflightError(failures)


def is_builtin_model(name: str) -> bool:
    """Built-in models come from this package or an installed one, never from the Hub."""
    return name == TINY_MODEL_NAME or name in BUILTIN_GGUF_MODELS

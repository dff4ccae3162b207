"""Individual preflight checks: each returns a list of failure messages (empty = passed).

Every check takes plain inputs (a repo id, a token, an endpoint, an environment), not the config,
so each can be tested alone; ``registry.py`` decides from the config which ones apply. The hub
checks go through huggingface_hub's own HTTP session, so ``HF_HUB_OFFLINE=1`` and a custom
``HF_ENDPOINT`` behave exactly as they will for the real downloads. Its HTTP client raises its
own transport errors, so "no answer at all" is caught as ``Exception`` and reported with its type.
"""

from __future__ import annotations

import netrc
import shutil
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import datasets
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from huggingface_hub.utils import get_session

GIB = 1024**3
WANDB_HOST = "api.wandb.ai"


def repo_url(endpoint: str, repo_type: str, repo_id: str) -> str:
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{endpoint.rstrip('/')}/{prefix}{repo_id}"


def hub_reachable(endpoint: str, needed_by: list[str]) -> list[str]:
    """One request to the endpoint; any HTTP answer means it is reachable."""
    why = ", ".join(needed_by)
    try:
        get_session().head(endpoint, timeout=10)
    except OfflineModeIsEnabled:
        return [
            f"the Hub is needed ({why}) but HF_HUB_OFFLINE=1 is set; unset it on a machine with "
            "a network, or download them first (they are then read from the cache offline)"
        ]
    except Exception as exc:  # no HTTP answer: DNS, refused, timeout
        return [f"cannot reach the Hub at {endpoint} ({why} need it): {type(exc).__name__}: {exc}"]
    return []


def repos_in_offline_cache(repos: list[tuple[str, str, str | None]]) -> list[str]:
    """With HF_HUB_OFFLINE=1: every needed repo must already be in the local caches."""
    failures = []
    for repo_type, repo_id, revision in repos:
        if repo_type == "model":
            cached = isinstance(
                try_to_load_from_cache(repo_id, "config.json", revision=revision), str
            )
        else:
            hub_folder = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
            datasets_folder = Path(datasets.config.HF_DATASETS_CACHE) / repo_id.replace("/", "___")
            cached = hub_folder.is_dir() or datasets_folder.is_dir()
        if not cached:
            failures.append(
                f"{repo_type} {repo_id} is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                "download it once with a network or unset HF_HUB_OFFLINE"
            )
    return failures


def token_valid(endpoint: str, token: str) -> list[str]:
    """The token is known to the Hub (whoami answers 200)."""
    try:
        HfApi(endpoint=endpoint).whoami(token=token)
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            return [
                "HF_TOKEN is invalid (the Hub answered 401): create a new token at "
                "https://huggingface.co/settings/tokens and export HF_TOKEN=hf_..."
            ]
        return [f"could not check HF_TOKEN: {exc}"]
    except Exception as exc:  # no HTTP answer: DNS, refused, timeout
        return [f"could not check HF_TOKEN ({type(exc).__name__}: {exc})"]
    return []


def repo_readable(endpoint: str, repo_type: str, repo_id: str, token: str | None) -> list[str]:
    """The token (or anonymous access) may download the repo; a gated one names its license."""
    url = repo_url(endpoint, repo_type, repo_id)
    try:
        HfApi(endpoint=endpoint).auth_check(repo_id, repo_type=repo_type, token=token or False)
    except GatedRepoError:
        if token is None:
            return [
                f"{repo_type} {repo_id} is gated and HF_TOKEN is not set: accept the license at "
                f"{url} and export HF_TOKEN with a token of that account"
            ]
        return [
            f"{repo_type} {repo_id} is gated and the account of HF_TOKEN has no access yet: "
            f"accept the license at {url} (access may take a while to be granted)"
        ]
    except RepositoryNotFoundError:
        hint = "" if token else "; a private repo needs HF_TOKEN"
        return [f"{repo_type} {repo_id} was not found on the Hub ({url}){hint}"]
    except Exception as exc:  # no HTTP answer: DNS, refused, timeout
        return [f"could not check access to {repo_type} {repo_id}: {type(exc).__name__}: {exc}"]
    return []


def push_token_set(repo_id: str, token: str | None) -> list[str]:
    """A push needs a token; known without a network, so it is reported offline too."""
    if token is None:
        return [f"pushing to {repo_id} needs HF_TOKEN with write access; it is not set"]
    return []


def push_writable(endpoint: str, repo_id: str, token: str | None) -> list[str]:
    """The token may write to ``repo_id``, or create it when it does not exist yet."""
    if token is None:
        return push_token_set(repo_id, token)
    api = HfApi(endpoint=endpoint)
    try:
        api.auth_check(repo_id, token=token, write=True)
        return []
    except RepositoryNotFoundError:
        pass  # not created yet: the token must be allowed to create it in that namespace
    except HfHubHTTPError as exc:
        return [
            f"HF_TOKEN cannot write to {repo_id} ({exc.response.status_code}): use a token "
            "with write access to it"
        ]
    except Exception as exc:  # no HTTP answer: DNS, refused, timeout
        return [f"could not check write access to {repo_id}: {type(exc).__name__}: {exc}"]
    try:
        me = api.whoami(token=token)
    except Exception as exc:  # no HTTP answer: DNS, refused, timeout
        return [f"could not check write access to {repo_id}: {exc}"]
    namespace = repo_id.split("/")[0]
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    orgs = [org.get("name") for org in me.get("orgs", [])]
    if role == "read":
        return [f"HF_TOKEN is a read-only token; pushing to {repo_id} needs a write token"]
    if namespace not in (me.get("name"), *orgs):
        return [
            f"{repo_id} does not exist and the account of HF_TOKEN ({me.get('name')}) cannot "
            f"create it in {namespace!r} (its namespaces: {', '.join([me.get('name'), *orgs])})"
        ]
    return []


def wandb_key_present(env: Mapping[str, str], netrc_path: Path | None = None) -> list[str]:
    """Online W&B tracking needs an API key: WANDB_API_KEY or a `wandb login` netrc entry."""
    if env.get("WANDB_API_KEY"):
        return []
    host = urlparse(env.get("WANDB_BASE_URL", f"https://{WANDB_HOST}")).hostname or WANDB_HOST
    path = netrc_path or Path(env.get("NETRC", Path.home() / ".netrc"))
    try:
        if path.is_file() and netrc.netrc(path).authenticators(host):
            return []
    except (netrc.NetrcParseError, OSError):
        pass
    return [
        "W&B tracking is online but no API key is set: export WANDB_API_KEY, run `wandb login`, "
        "or set tracking.wandb.mode=offline"
    ]


def free_disk(output_dir: Path, needed_bytes: int, detail: str) -> list[str]:
    """The file system of ``output_dir`` (or its nearest existing parent) has room."""
    existing = output_dir.resolve()
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free >= needed_bytes:
        return []
    return [
        f"not enough free disk for {output_dir}: about {needed_bytes / GIB:.2f} GiB needed "
        f"({detail}), {free / GIB:.2f} GiB free on {existing}"
    ]


def launch_consistent(
    env: Mapping[str, str],
    micro_batch_size: int,
    grad_accum: int,
    global_batch_size: int | None = None,
    cuda_devices: int = 0,
) -> list[str]:
    """torchrun's variables agree with each other, the GPUs and the configured global batch."""
    names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    values, failures = {}, []
    for name in names:
        raw = env.get(name)
        if raw is None:
            continue
        if not raw.isdigit():
            failures.append(f"{name}={raw!r} is not a non-negative integer")
        else:
            values[name] = int(raw)
    if failures:
        return failures
    world = values.get("WORLD_SIZE", 1)
    local_world = values.get("LOCAL_WORLD_SIZE", world if "WORLD_SIZE" in values else 1)
    if world < 1:
        failures.append("WORLD_SIZE=0: a run needs at least one process")
        return failures
    if values.get("RANK", 0) >= world:
        failures.append(f"RANK={values['RANK']} is not below WORLD_SIZE={world}")
    if values.get("LOCAL_RANK", 0) >= local_world:
        failures.append(
            f"LOCAL_RANK={values['LOCAL_RANK']} is not below LOCAL_WORLD_SIZE={local_world}"
        )
    if local_world > world or world % max(local_world, 1):
        failures.append(
            f"WORLD_SIZE={world} is not a whole number of nodes of LOCAL_WORLD_SIZE={local_world}"
        )
    if cuda_devices and local_world > cuda_devices:
        failures.append(
            f"LOCAL_WORLD_SIZE={local_world} processes on this node but only {cuda_devices} "
            "CUDA devices are visible (check --nproc-per-node and CUDA_VISIBLE_DEVICES)"
        )
    # The rule of training.state.plan_batches: the global batch is fixed by the config and each
    # process runs whole micro-batches of it, so it must divide by micro x WORLD_SIZE.
    global_batch = global_batch_size or micro_batch_size * grad_accum
    per_step = micro_batch_size * world
    if global_batch % per_step:
        source = (
            "train.global_batch_size"
            if global_batch_size
            else "train.micro_batch_size x train.grad_accum"
        )
        failures.append(
            f"the global batch {global_batch} ({source}) is not a multiple of "
            f"train.micro_batch_size {micro_batch_size} x WORLD_SIZE {world} = {per_step}; set "
            "train.global_batch_size to a multiple of it"
        )
    return failures

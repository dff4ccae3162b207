"""Checks that a Hub push will work (token, write access), run before uploading.

Each check raises ``HubError`` with the fix in the message; ``multitune push`` runs them before
uploading. (A training run is checked by ``multitune.preflight``, which has its own list-of-
failures versions of the same checks.) The Hub address comes from ``HF_ENDPOINT``
(huggingface.co by default), the token from ``HF_TOKEN``.
"""

from __future__ import annotations

import contextlib
import os

TOKENS_URL = "https://huggingface.co/settings/tokens"


class HubError(RuntimeError):
    """The Hub cannot be used as configured; the message says what to do."""


def hub_api():
    """An HfApi for ``HF_ENDPOINT`` (read now, not at import, so tests and users can set it)."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)


def hub_url(api, repo_id: str) -> str:
    return f"{api.endpoint.rstrip('/')}/{repo_id}"


def require_token(purpose: str = "hub.push") -> str:
    """HF_TOKEN, or an error saying how to create a write token."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise HubError(
            f"{purpose} needs a Hugging Face token with write access, but HF_TOKEN is not set. "
            f"Create a 'write' token at {TOKENS_URL} and export HF_TOKEN=hf_..."
        )
    return token


@contextlib.contextmanager
def explained_hub_errors(what: str):
    """Turn offline mode, connection failures and 401s into one-line HubErrors."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        yield
    except OfflineModeIsEnabled:
        raise HubError(
            f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE=1 is set; unset it "
            "(or set hub.push and hub.push_checkpoints to false)"
        ) from None
    except httpx2.TransportError as exc:
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise HubError(f"{what}: cannot reach the Hub at {endpoint} ({exc})") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise HubError(
                f"{what}: the Hub rejected HF_TOKEN (401, invalid or expired token). Create a "
                f"new 'write' token at {TOKENS_URL} and export HF_TOKEN=hf_..."
            ) from None
        raise


def check_write_access(repo_id: str, token: str) -> bool:
    """Raise unless ``token`` may write to ``repo_id``; returns whether the repo exists.

    A missing repo is fine when the token may create it (its own namespace or one of its
    organisations); otherwise it is an error naming the namespaces the token can write to.
    """
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    api = hub_api()
    with explained_hub_errors(f"hub.repo {repo_id}"):
        whoami = api.whoami(token=token)
        role = ((whoami.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise HubError(
                f"HF_TOKEN of user {whoami.get('name')!r} is a read-only token; pushing to "
                f"{repo_id} needs a 'write' (or fine-grained with write access) token from "
                f"{TOKENS_URL}"
            )
        try:
            api.auth_check(repo_id, token=token, write=True)
            return True
        except GatedRepoError:
            raise
        except RepositoryNotFoundError:
            namespaces = [whoami.get("name")] + [o.get("name") for o in whoami.get("orgs", [])]
            namespace = repo_id.split("/")[0]
            if namespace in namespaces:
                return False  # push creates it
            raise HubError(
                f"hub.repo {repo_id} does not exist (or the token cannot see it), and user "
                f"{whoami.get('name')!r} cannot create it in {namespace!r} (writable: "
                f"{', '.join(n for n in namespaces if n)}). Create it at "
                f"{api.endpoint.rstrip('/')}/new or fix hub.repo"
            ) from None
        except HfHubHTTPError as exc:
            if exc.response is not None and exc.response.status_code == 403:
                raise HubError(
                    f"HF_TOKEN of user {whoami.get('name')!r} has no write access to {repo_id} "
                    f"(403). Use a 'write' token from {TOKENS_URL}, or a fine-grained token "
                    f"with write access to this repo"
                ) from None
            raise

"""Preflight: each check's failure message against a local HTTP endpoint standing in for the Hub,
the real offline behaviour of huggingface_hub, and a monkeypatched environment."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import constants
from tests.conftest import REPO, small_config_dict

from multitune.cli import main
from multitune.config import load_config, validate_config
from multitune.preflight import checks, registry
from multitune.preflight.registry import PreflightError, config_value, run_preflight
from multitune.recipes import sft

GATED = "meta-llama/Llama-3.2-1B-Instruct"  # a built-in architecture: the disk estimate is offline
ACCOUNTS = {
    "hf_alice": {"name": "alice", "orgs": [{"name": "acme"}], "role": "write", "licensed": False},
    "hf_reader": {"name": "reader", "orgs": [], "role": "read", "licensed": True},
}


class FakeHub(BaseHTTPRequestHandler):
    """The few Hub API routes preflight calls, with the status codes and X-Error-Code headers the
    real Hub answers (huggingface_hub turns them into GatedRepoError, RepositoryNotFoundError)."""

    def log_message(self, *args):
        pass

    def answer(self, status, body=None, error_code=None):
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
        data = json.dumps(body or {}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):
        self.answer(200)

    def do_GET(self):
        token = self.headers.get("authorization", "").removeprefix("Bearer ")
        account = ACCOUNTS.get(token)
        path = self.path.split("?")[0]
        if path == "/api/whoami-v2":
            if account is None:
                return self.answer(401, {"error": "Invalid credentials"})
            return self.answer(
                200,
                {
                    "name": account["name"],
                    "orgs": account["orgs"],
                    "auth": {"accessToken": {"role": account["role"]}},
                },
            )
        if path == f"/api/models/{GATED}/auth-check":
            if account and account["licensed"]:
                return self.answer(200)
            return self.answer(403 if account else 401, error_code="GatedRepo")
        if path in ("/api/models/public/model/auth-check", "/api/datasets/public/data/auth-check"):
            return self.answer(200)
        if path == "/api/models/alice/existing/auth-check/write":
            allowed = account and account["name"] == "alice" and account["role"] == "write"
            return self.answer(200 if allowed else 403, {"error": "no write access"})
        return self.answer(404, {"error": "Repository not found"}, error_code="RepoNotFound")


@pytest.fixture
def hub(monkeypatch):
    """The URL of a local fake Hub; huggingface_hub's offline switch off for this test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_unreachable_hub_and_offline_mode_are_reported(hub, monkeypatch):
    assert checks.hub_reachable(hub, ["model x"]) == []
    closed = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    port = closed.server_address[1]
    closed.server_close()  # nothing listens there any more
    [message] = checks.hub_reachable(f"http://127.0.0.1:{port}", ["model x"])
    assert message.startswith(f"cannot reach the Hub at http://127.0.0.1:{port} (model x need it)")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    [message] = checks.hub_reachable(hub, ["model x"])
    assert "the Hub is needed (model x) but HF_HUB_OFFLINE=1 is set" in message


def test_token_missing_invalid_and_valid(hub):
    assert checks.token_valid(hub, "hf_alice") == []
    [message] = checks.token_valid(hub, "hf_wrong")
    assert message.startswith("HF_TOKEN is invalid (the Hub answered 401)")


def test_gated_model_names_its_license_url(hub):
    url = f"{hub}/{GATED}"
    [no_token] = checks.repo_readable(hub, "model", GATED, None)
    assert no_token == (
        f"model {GATED} is gated and HF_TOKEN is not set: accept the license at {url} and export "
        "HF_TOKEN with a token of that account"
    )
    [not_accepted] = checks.repo_readable(hub, "model", GATED, "hf_alice")
    assert f"the account of HF_TOKEN has no access yet: accept the license at {url}" in not_accepted
    assert checks.repo_readable(hub, "model", GATED, "hf_reader") == []
    assert checks.repo_readable(hub, "dataset", "public/data", None) == []
    [missing] = checks.repo_readable(hub, "dataset", "nobody/nothing", None)
    assert missing == (
        f"dataset nobody/nothing was not found on the Hub ({hub}/datasets/nobody/nothing); "
        "a private repo needs HF_TOKEN"
    )


def test_push_needs_a_token_that_can_write_or_create_the_repo(hub):
    assert checks.push_writable(hub, "alice/existing", "hf_alice") == []
    assert checks.push_writable(hub, "alice/new-model", "hf_alice") == []  # created on push
    assert checks.push_writable(hub, "acme/new-model", "hf_alice") == []  # an org of alice's
    [no_token] = checks.push_writable(hub, "alice/existing", None)
    assert no_token == "pushing to alice/existing needs HF_TOKEN with write access; it is not set"
    [forbidden] = checks.push_writable(hub, "alice/existing", "hf_reader")
    assert forbidden.startswith("HF_TOKEN cannot write to alice/existing (403)")
    [read_only] = checks.push_writable(hub, "reader/new-model", "hf_reader")
    assert (
        read_only
        == "HF_TOKEN is a read-only token; pushing to reader/new-model needs a write token"
    )
    [elsewhere] = checks.push_writable(hub, "bob/new-model", "hf_alice")
    assert "cannot create it in 'bob' (its namespaces: alice, acme)" in elsewhere


def test_wandb_settings_apply_only_when_wandb_is_a_backend(small_config):
    ctx = registry.Context(small_config, {"WANDB_MODE": "online"}, "http://hub", None)
    assert not registry._wandb_online(ctx)  # backends: [jsonl]
    with_wandb = small_config.model_copy(deep=True)
    with_wandb.tracking.backends = ["jsonl", "wandb"]
    assert registry._wandb_online(registry.Context(with_wandb, {}, "http://hub", None))


def test_wandb_online_needs_a_key(tmp_path):
    no_netrc = tmp_path / "netrc"
    [message] = checks.wandb_key_present({}, no_netrc)
    assert message.startswith("W&B tracking is online but no API key is set")
    assert checks.wandb_key_present({"WANDB_API_KEY": "k" * 40}, no_netrc) == []
    no_netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert checks.wandb_key_present({}, no_netrc) == []


def test_disk_and_launch_checks():
    [disk] = checks.free_disk(REPO / "runs" / "not-yet" / "deeper", 10**18, "3 checkpoints")
    assert disk.startswith("not enough free disk for") and "(3 checkpoints)" in disk
    assert checks.free_disk(REPO, 1, "x") == []

    torchrun = {"WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4"}
    assert checks.launch_consistent(torchrun, 8, 2, global_batch_size=128, cuda_devices=4) == []
    assert checks.launch_consistent({}, 8, 2, global_batch_size=16) == []
    assert checks.launch_consistent({**torchrun, "WORLD_SIZE": "6"}, 8, 2, 96) == [
        "WORLD_SIZE=6 is not a whole number of nodes of LOCAL_WORLD_SIZE=4"
    ]
    assert checks.launch_consistent({**torchrun, "RANK": "8"}, 8, 2, 128) == [
        "RANK=8 is not below WORLD_SIZE=8"
    ]
    [gpus] = checks.launch_consistent(torchrun, 8, 2, 128, cuda_devices=2)
    assert gpus.startswith("LOCAL_WORLD_SIZE=4 processes on this node but only 2 CUDA devices")
    # The global batch stays fixed and the accumulation adapts, so any multiple of 8 x 8 fits.
    assert checks.launch_consistent(torchrun, 8, 2, global_batch_size=64) == []
    [batch] = checks.launch_consistent(torchrun, 8, 2, global_batch_size=96)
    assert batch == (
        "the global batch 96 (train.global_batch_size) is not a multiple of "
        "train.micro_batch_size 8 x WORLD_SIZE 8 = 64; set train.global_batch_size to a "
        "multiple of it"
    )
    [batch] = checks.launch_consistent(torchrun, 8, 2)
    assert batch.startswith("the global batch 16 (train.micro_batch_size x train.grad_accum)")
    assert checks.launch_consistent({"WORLD_SIZE": "two"}, 8, 1) == [
        "WORLD_SIZE='two' is not a non-negative integer"
    ]


def test_cli_lists_every_failure_at_once(hub, tmp_path, monkeypatch, capsys):
    data = small_config_dict(tmp_path / "run")
    data["model"] = {"name": GATED}
    data["tasks"][0]["dataset"] = "public/data"
    data["tracking"] = {"backends": ["jsonl", "wandb"]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(constants, "ENDPOINT", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(registry, "DISK_MARGIN_BYTES", 10**18)  # a disk that is too small
    assert main(["preflight", str(path)]) == 2
    err = capsys.readouterr().err
    assert "preflight found 6 problem(s); nothing was started:" in err
    for expected in (
        "HF_TOKEN is invalid (the Hub answered 401)",
        f"model {GATED} is gated and the account of HF_TOKEN has no access yet",
        "W&B tracking is online but no API key is set",
        "not enough free disk for",
        "WORLD_SIZE=3 is not a whole number of nodes of LOCAL_WORLD_SIZE=2",
        "x WORLD_SIZE 3 = ",  # the global batch does not split into whole micro-batches
    ):
        assert expected in err
    assert "public/data" not in err  # readable: no failure for it


def test_demo_config_passes_offline_and_needs_no_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the demo's datasets are paths relative to the checkout
    assert constants.HF_HUB_OFFLINE  # the test suite runs with HF_HUB_OFFLINE=1
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"output_dir={tmp_path / 'demo'}"])
    assert run_preflight(cfg, env={}) == []
    assert main(["preflight", "configs/demo.yaml", f"output_dir={tmp_path / 'demo'}"]) == 0
    # A hub model offline and not cached fails instead, before anything is loaded.
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.name={GATED}"])
    [message] = run_preflight(cfg, env={})
    assert message == (
        f"model {GATED} is not in the local cache and HF_HUB_OFFLINE=1 is set; download it once "
        "with a network or unset HF_HUB_OFFLINE"
    )


@pytest.mark.parametrize("hub_state", ["offline", "unreachable"])
def test_push_without_a_token_is_listed_with_the_offline_problems(tmp_path, monkeypatch, hub_state):
    # A missing token is known without a network: it is listed beside the Hub failures instead
    # of surfacing only once the Hub is back.
    data = small_config_dict(tmp_path / "run")
    data["model"] = {"name": GATED}
    data["hub"] = {"push": True, "repo": "alice/new-model"}
    cfg = validate_config(data)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no `hf auth login` token
    endpoint = None
    if hub_state == "unreachable":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        closed = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
        endpoint = f"http://127.0.0.1:{closed.server_address[1]}"
        closed.server_close()  # nothing listens there any more
    failures = run_preflight(cfg, env={}, endpoint=endpoint)
    token = "pushing to alice/new-model needs HF_TOKEN with write access; it is not set"
    assert token in failures
    if hub_state == "offline":
        assert f"model {GATED} is not in the local cache and HF_HUB_OFFLINE=1 is set" in failures[0]
        assert any("hub.push / hub.push_checkpoints need the Hub" in f for f in failures)
        assert len(failures) == 3
    else:
        assert failures[0].startswith(f"cannot reach the Hub at {endpoint}")
        assert len(failures) == 2
    # With a token the same config lists only the Hub failures.
    with_token = run_preflight(cfg, env={"HF_TOKEN": "hf_alice"}, endpoint=endpoint)
    assert with_token == [f for f in failures if f != token]


def test_train_stops_before_loading_and_lists_all_failures(tmp_path, monkeypatch):
    cfg = validate_config(
        {**small_config_dict(tmp_path / "run"), "tracking": {"backends": ["jsonl", "wandb"]}}
    )
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(PreflightError) as err:
        sft.run(cfg)
    assert len(err.value.failures) == 2
    assert "LOCAL_RANK=5 is not below LOCAL_WORLD_SIZE=1" in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was started


def test_checks_of_keys_this_config_lacks_do_not_apply(small_config):
    assert config_value(small_config, "hub.no_such_key") is None
    assert config_value(small_config, "no_such_section.mode") is None
    assert config_value(small_config, "hub.push") is False
    assert config_value(small_config, "train.micro_batch_size") == 8

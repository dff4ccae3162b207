"""`multitune predict` and `multitune chat` on a trained tiny run.

predict: free-form rows give exactly what plain transformers greedy generation gives with the
adapter; task rows reproduce the evaluation's own predictions; a merged export predicts the
same as the adapter. chat: driven through stdin in a subprocess, answers each turn with the
greedy reply and exits cleanly at end of input (Ctrl-D).
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tests.conftest import REPO, TEMPLATE_KWARGS
from tests.integration.test_export import write_task_files
from transformers import AutoModelForCausalLM, AutoTokenizer

from multitune import cli
from multitune.config import validate_config
from multitune.data.loading import load_split
from multitune.data.pipeline import load_tasks
from multitune.export.merge import export_merged

PROMPTS = ["my card has not arrived yet", "nice weather today 3", "Where would you keep milk?"]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inference")
    files = write_task_files(root / "data")
    out = root / "run"
    config = {
        "output_dir": str(out),
        "model": {"name": "builtin:tiny-llama", "tiny": {"size": "nano"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "tasks": [
            {"preset": "banking77", "dataset": str(files["b77"])},
            {"preset": "commonsense_qa", "dataset": str(files["cqa"])},
            {"preset": "text_claims", "dataset": str(files["claims"])},
        ],
        "data": {"max_seq_len": 128},
        "train": {"epochs": 3, "lr": 1.0e-2, "warmup_ratio": 0.0},
        "eval": {"batch_size": 4, "max_examples": 8, "before_training": False},
    }
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    assert cli.main(["train", str(config_path), "train.progress_bar=false"]) == 0
    return out


def greedy_reference(run_dir: Path, conversations: list[list[dict]]) -> list[str]:
    """One conversation at a time, plain transformers + peft, no multitune code."""
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, run_dir / "adapter").eval()
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    replies = []
    for messages in conversations:
        ids = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
            **TEMPLATE_KWARGS,
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eot,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return replies


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_predict_free_rows_equal_direct_greedy_generation(run_dir: Path, tmp_path: Path):
    rows = [
        {"prompt": PROMPTS[0]},
        {"messages": [{"role": "user", "content": PROMPTS[1]}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": PROMPTS[2]},
                {"role": "assistant", "content": "fridge"},
            ],
            "id": 7,
        },
    ]
    output = tmp_path / "pred.jsonl"
    args = ["predict", str(run_dir), "--input", str(write_jsonl(tmp_path / "in.jsonl", rows))]
    args += ["--output", str(output), "--batch-size", "2", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    assert cli.main(args) == 0
    written = read_jsonl(output)
    expected = greedy_reference(
        run_dir,
        [
            [{"role": "user", "content": PROMPTS[0]}],
            [{"role": "user", "content": PROMPTS[1]}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[2]}],
        ],
    )
    assert [r["prediction"] for r in written] == expected
    assert any(expected), "the tiny model should say something"
    assert written[2]["gold"] == "fridge" and written[2]["id"] == 7  # input fields kept
    assert "gold" not in written[0]


def validation_rows(run_dir: Path, task_name: str) -> list[dict]:
    """The raw dataset rows of the run's validation split of a task, in evaluation order."""
    cfg = validate_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    (task,) = [t for t in load_tasks(cfg, include_test=False) if t.spec.name == task_name]
    (task_cfg,) = [t for t in cfg.tasks if t.name == task_name]
    raw = load_split(task_cfg, task_cfg.train_split)
    return [raw[e.row] for e in task.examples["validation"]]


@pytest.mark.parametrize("task", ["banking77", "commonsense_qa", "text_claims"])
def test_predict_task_rows_reproduce_the_eval_predictions(run_dir: Path, tmp_path: Path, task):
    samples = json.loads((run_dir / "eval_results.json").read_text())["tasks"][task]["samples"]
    rows = validation_rows(run_dir, task)[: len(samples)]
    output = tmp_path / "pred.jsonl"
    args = ["predict", str(run_dir), "--task", task, "--batch-size", "3"]
    args += ["--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(output)]
    assert cli.main(args) == 0
    written = read_jsonl(output)
    assert [r["prediction"] for r in written] == [s["prediction"] for s in samples]
    assert [r["gold"] for r in written] == [s["gold"] for s in samples]


def test_predict_with_a_merged_export_matches_the_adapter(run_dir: Path, tmp_path: Path):
    merged = export_merged(run_dir, tmp_path / "merged")
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": p} for p in PROMPTS])
    outputs = {}
    for name, source in (("adapter", run_dir), ("merged", merged)):
        outputs[name] = tmp_path / f"{name}.jsonl"
        args = ["predict", str(source), "--input", str(rows), "--output", str(outputs[name])]
        assert cli.main([*args, "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    assert read_jsonl(outputs["merged"]) == read_jsonl(outputs["adapter"])


def test_predict_bad_rows_name_the_row(run_dir: Path, tmp_path: Path, capsys):
    rows = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "hi"}, {"text": "no prompt"}])
    args = ["predict", str(run_dir), "--input", str(rows), "--output", str(tmp_path / "o.jsonl")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "in.jsonl row 2: a row needs 'messages' or 'prompt'" in err
    assert cli.main([*args, "--task", "nope"]) == 2
    assert "--task nope: the run's tasks are banking77, commonsense_qa, text_claims" in (
        capsys.readouterr().err
    )


class Terminal:
    """A pseudo-terminal as the stdin/stdout of a subprocess, read without blocking."""

    def __init__(self, argv: list[str], env: dict) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=env, close_fds=True
        )
        os.close(slave)
        self.output = b""

    def read_until(self, count: int, marker: bytes = b">>> ", timeout: float = 240) -> None:
        """Read until ``marker`` has appeared ``count`` times in all output so far."""
        deadline = time.monotonic() + timeout
        while self.output.count(marker) < count:
            assert time.monotonic() < deadline, f"no {marker!r} #{count}: {self.output!r}"
            ready, _, _ = select.select([self.master], [], [], 1)
            if ready:
                self.output += os.read(self.master, 4096)

    def type(self, text: bytes) -> None:
        os.write(self.master, text)


def test_chat_in_a_terminal_streams_greedy_replies_and_exits_on_ctrl_d(run_dir: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "multitune", "chat", str(run_dir)]
    terminal = Terminal([*argv, "--max-new-tokens", str(MAX_NEW_TOKENS)], env)
    try:
        terminal.read_until(1)
        terminal.type(f"{PROMPTS[0]}\n".encode())
        terminal.read_until(2)
        terminal.type(b"/reset\n")
        terminal.read_until(3)
        terminal.type(f"{PROMPTS[1]}\n".encode())
        terminal.read_until(4)
        terminal.type(b"\x04")  # Ctrl-D on an empty line: end of input
        assert terminal.proc.wait(timeout=60) == 0, terminal.proc.stderr.read().decode()
    finally:
        if terminal.proc.poll() is None:
            terminal.proc.kill()
    text = terminal.output.decode().replace("\r\n", "\n")
    # The terminal echoes each typed line; the reply follows it on the next line.
    turns = text.split(">>> ")[1:]
    assert len(turns) == 4 and turns[1] == "/reset\n"
    replies = [turns[0].split("\n", 1)[1].strip(), turns[2].split("\n", 1)[1].strip()]
    expected = greedy_reference(
        run_dir,
        [[{"role": "user", "content": PROMPTS[0]}], [{"role": "user", "content": PROMPTS[1]}]],
    )
    assert replies == expected  # /reset: the second turn starts a new conversation
    assert all(expected)

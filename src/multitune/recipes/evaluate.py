"""Score the base model or a fine-tuned adapter on a split: `multitune eval`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peft import PeftModel

from multitune.config.schema import RunConfig
from multitune.data.pipeline import load_tasks, tokenize_tasks, training_corpus
from multitune.evaluation.report import print_summary
from multitune.evaluation.runner import chance_accuracy, evaluate_tasks
from multitune.models.loading import load_model_and_tokenizer, pick_device
from multitune.training.state import seed_everything

log = logging.getLogger(__name__)


def run(cfg: RunConfig, adapter: Path | None, split: str) -> dict:
    """Evaluate every task of ``cfg`` on ``split``; writes OUTPUT_DIR/eval_results.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    tasks = load_tasks(cfg, include_test=split == "test")
    # A run of the built-in model saved its base next to the adapter; use exactly that one.
    saved_base = (adapter.parent if adapter else out) / "base_model"
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, training_corpus(tasks), cfg.seed, pick_device(), saved_base=saved_base
    )
    if adapter is not None:
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{adapter} is not a PEFT adapter folder (no adapter_config.json)"
            )
        model = PeftModel.from_pretrained(model, adapter)
    tokenize_tasks(tasks, tokenizer, cfg)
    results = {
        "tasks": evaluate_tasks(
            model, tokenizer, tasks, cfg, split=split, confusion_dir=out / "confusion"
        ),
        "split": split,
        "adapter": str(adapter) if adapter else None,
        "chance": {t.spec.name: chance_accuracy(t) for t in tasks},
    }
    (out / "eval_results.json").write_text(json.dumps(results, indent=2))
    print_summary(tasks, results)
    return results

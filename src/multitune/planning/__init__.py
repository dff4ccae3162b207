"""Know before you rent: memory, strategy, time and cost of a run, without any weights.

``add_plan_arguments`` and ``cmd_plan`` import lightly; ``build_plan``, ``format_plan`` and
``count_dataset_tokens`` load torch, transformers and peft on first use.
"""

from multitune.planning.command import add_plan_arguments, cmd_plan

__all__ = ["add_plan_arguments", "build_plan", "cmd_plan", "count_dataset_tokens", "format_plan"]


def __getattr__(name: str):
    if name in ("build_plan", "format_plan"):
        from multitune.planning import plan

        return getattr(plan, name)
    if name == "count_dataset_tokens":
        from multitune.planning.tokens import count_dataset_tokens

        return count_dataset_tokens
    raise AttributeError(f"module 'multitune.planning' has no attribute {name!r}")

"""What every task kind produces: chat examples with a gold answer, and clear row errors."""

from __future__ import annotations

from dataclasses import dataclass, field


class TaskDataError(ValueError):
    """Bad input data; the message names the dataset, split, row and column."""


@dataclass(frozen=True)
class Example:
    """One row of a task, formatted as a chat whose last assistant turn is the answer.

    ``candidates`` lists every valid answer string when the task has a closed answer set
    (label names, choice letters); evaluation constrains or scores against it.
    """

    task: str
    row: int
    messages: tuple[dict[str, str], ...]
    answer: str
    stratum: str | None = None
    candidates: tuple[str, ...] | None = None
    choice_texts: tuple[str, ...] | None = None
    meta: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (not including) the final assistant answer."""
        return list(self.messages[:-1])


def row_error(source: str, split: str, row: int, column: str | None, problem: str) -> TaskDataError:
    where = f"{source} [{split}] row {row}" + (f", column '{column}'" if column else "")
    return TaskDataError(f"{where}: {problem}")


def chat(system: str | None, user: str, answer: str) -> tuple[dict[str, str], ...]:
    turns = [{"role": "system", "content": system}] if system else []
    turns += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return tuple(turns)


def render_prompt(template: str, fields: dict[str, object], source: str) -> str:
    """Fill a task's prompt template; an unknown placeholder names the fields that exist."""
    try:
        return template.format(**fields)
    except KeyError as exc:
        raise TaskDataError(
            f"{source}: prompt_template uses {{{exc.args[0]}}}, but the fields are "
            f"{', '.join(sorted(fields))}"
        ) from None

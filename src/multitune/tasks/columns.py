"""Find which dataset column plays which role (text, label, ...), by name, or fail clearly."""

from __future__ import annotations

from multitune.tasks.base import TaskDataError

# Names that commonly hold each role on the hub, most specific first. Matching ignores case.
CANDIDATE_NAMES: dict[str, list[str]] = {
    "text": ["text", "sentence", "content", "utterance", "input", "review", "document"],
    "label": ["label", "labels", "intent", "class", "category", "target"],
    "question": ["question", "query"],
    "context": ["context", "passage", "paragraph"],
    "choices": ["choices", "options"],
    "answer": ["answerkey", "answer_key", "answer", "answers", "gold"],
    "messages": ["messages", "conversations", "conversation"],
}


def find_column(
    role: str,
    column_names: list[str],
    configured: str | None,
    source: str,
    config_key: str,
    required: bool = True,
) -> str | None:
    """Return the column for ``role``: the configured one, else the unique match by name."""
    if configured is not None:
        if configured not in column_names:
            raise TaskDataError(
                f"{source}: {config_key} is {configured!r}, but the dataset's columns are "
                f"{', '.join(column_names)}"
            )
        return configured
    lowered = {c.lower(): c for c in column_names}
    for candidate in CANDIDATE_NAMES[role]:
        exact = [c for c in column_names if c.lower() == candidate]
        if len(exact) > 1:
            raise _ambiguous(role, exact, source, config_key)
        if exact:
            return exact[0]
    # Fall back to columns whose name contains the role word (e.g. "claim_text").
    partial = [lowered[c] for c in lowered if role in c]
    if len(partial) == 1:
        return partial[0]
    if len(partial) > 1:
        raise _ambiguous(role, partial, source, config_key)
    if required:
        raise TaskDataError(
            f"{source}: no {role} column found among {', '.join(column_names)}; "
            f"set {config_key} to the column that holds it"
        )
    return None


def _ambiguous(role: str, names: list[str], source: str, config_key: str) -> TaskDataError:
    return TaskDataError(
        f"{source}: several columns could hold the {role} ({', '.join(names)}); "
        f"set {config_key} to pick one"
    )

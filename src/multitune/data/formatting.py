"""Chat -> token ids with a loss mask: labels on assistant answer tokens only, -100 elsewhere.

The chat is rendered with the tokenizer's own chat template and cut into segments, one per
message (``render(messages[:i+1])`` minus ``render(messages[:i])``), so the code needs no
knowledge of any template's markup beyond it being incremental. Each segment is tokenized on its
own; an assistant segment (answer + end-of-turn token) is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from multitune.tasks.base import Example, TaskDataError

IGNORE_INDEX = -100
# Keep at least this many tokens of a truncated user message, so a prompt never shrinks to a
# bare template with no content.
MIN_PROMPT_CONTENT_TOKENS = 8


@dataclass
class Piece:
    """Token ids of one message: ``head`` (markup), ``content`` (truncatable), ``tail`` (up to
    and including the end-of-turn token), ``after`` (markup after the end-of-turn token, such as
    ChatML's newline: never generated, so never trained on)."""

    role: str
    head: list[int]
    content: list[int]
    tail: list[int]
    after: list[int] = field(default_factory=list)

    def ids(self) -> list[int]:
        return self.head + self.content + self.tail + self.after


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int  # tokens before the final answer; generation starts here
    task_index: int
    example_index: int
    truncated: bool

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
    template_kwargs: dict,
) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **template_kwargs
    )


def chat_pieces(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, template_kwargs: dict
) -> list[Piece]:
    """One ``Piece`` per message. An assistant piece's ``head`` is the generation prompt
    (``<|start_header_id|>assistant<|end_header_id|>\\n\\n`` on Llama 3), which is not trained on;
    its ``content`` + ``tail`` (answer + end-of-turn token) are."""
    pieces, previous = [], ""
    for i, message in enumerate(messages):
        full = render_chat(tokenizer, messages[: i + 1], False, template_kwargs)
        header = ""
        if message["role"] == "assistant" and i > 0:
            prompt = render_chat(tokenizer, messages[:i], True, template_kwargs)
            header = prompt[len(previous) :]
        if not full.startswith(previous + header):
            raise TaskDataError(
                "the tokenizer's chat template is not incremental (rendering a conversation "
                "changes the text of earlier turns); multitune cannot mask it per turn"
            )
        segment = full[len(previous) + len(header) :]
        previous = full
        content = message["content"].strip()
        start = segment.find(content) if content else -1
        if start < 0:
            head, body, tail = segment, "", ""
        else:
            head, body, tail = segment[:start], content, segment[start + len(content) :]
        tail_ids = _encode(tokenizer, tail)
        end = _end_of_turn(tail_ids, set(tokenizer.all_special_ids))
        pieces.append(
            Piece(
                message["role"],
                _encode(tokenizer, header + head),
                _encode(tokenizer, body),
                tail_ids[:end],
                tail_ids[end:],
            )
        )
    return pieces


def _end_of_turn(tail: list[int], special_ids: set[int]) -> int:
    """Length of the tail up to and including its first special token (the end of turn); the
    whole tail when it has none."""
    for index, token in enumerate(tail):
        if token in special_ids:
            return index + 1
    return len(tail)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def tokenize_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    template_kwargs: dict,
    task_index: int = 0,
    example_index: int = 0,
) -> TokenizedExample | str:
    """Tokenize and mask one example, or return the reason it must be dropped.

    Over-long examples lose prompt tokens (the end of the longest user message first, or the
    turns after the first trained answer in a multi-turn chat); the answer is never cut.
    """
    pieces = chat_pieces(list(example.messages), tokenizer, template_kwargs)
    pieces[-1].after = []  # markup after the last end of turn: nothing reads it
    truncated = False
    if _length(pieces) > max_seq_len:
        truncated = True
        pieces = _drop_later_turns(pieces, max_seq_len)
        _truncate_user_content(pieces, _length(pieces) - max_seq_len)
        if _length(pieces) > max_seq_len:
            answer = sum(len(p.ids()) for p in pieces if p.role == "assistant")
            return "answer_too_long" if answer >= max_seq_len else "prompt_too_long"
    input_ids, labels = [], []
    for piece in pieces:
        input_ids += piece.ids()
        labels += [IGNORE_INDEX] * len(piece.head)
        trained = piece.content + piece.tail
        labels += trained if piece.role == "assistant" else [IGNORE_INDEX] * len(trained)
        labels += [IGNORE_INDEX] * len(piece.after)
    if all(label == IGNORE_INDEX for label in labels):
        return "no_answer_tokens"
    last = pieces[-1]
    prompt_length = len(input_ids) - len(last.content) - len(last.tail)
    return TokenizedExample(input_ids, labels, prompt_length, task_index, example_index, truncated)


def _length(pieces: list[Piece]) -> int:
    return sum(len(p.ids()) for p in pieces)


def _drop_later_turns(pieces: list[Piece], max_seq_len: int) -> list[Piece]:
    """Keep the longest prefix that ends on an assistant turn and fits (multi-turn chats)."""
    ends = [i for i, p in enumerate(pieces) if p.role == "assistant"]
    for end in reversed(ends):
        if _length(pieces[: end + 1]) <= max_seq_len:
            return pieces[: end + 1]
    return pieces[: ends[0] + 1] if ends else pieces


def _truncate_user_content(pieces: list[Piece], excess: int) -> None:
    """Cut ``excess`` tokens from the ends of user messages, longest first."""
    while excess > 0:
        users = [
            p for p in pieces if p.role == "user" and len(p.content) > MIN_PROMPT_CONTENT_TOKENS
        ]
        if not users:
            return
        longest = max(users, key=lambda p: len(p.content))
        cut = min(excess, len(longest.content) - MIN_PROMPT_CONTENT_TOKENS)
        longest.content = longest.content[: len(longest.content) - cut]
        excess -= cut

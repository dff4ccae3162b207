"""`multitune chat OUTPUT_DIR`: talk to a trained model in the terminal, tokens streamed.

Each turn renders the whole conversation with the tokenizer's chat template (as in training) and
decodes greedily up to the end-of-turn token; ``/reset`` forgets the conversation, Ctrl-D
(end of input) exits.
"""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from transformers import TextIteratorStreamer

from multitune.evaluation.scoring import end_of_turn_id
from multitune.inference.loading import LoadedModel
from multitune.inference.predict import prompt_example

PROMPT = ">>> "


def answer_stream(loaded: LoadedModel, messages: list[dict], max_new_tokens: int):
    """Yield the reply to ``messages`` piece by piece while generation runs in a thread."""
    import torch

    example = prompt_example(loaded, messages, 0)
    device = next(loaded.model.parameters()).device
    input_ids = torch.tensor([example.input_ids], device=device)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    end_id = end_of_turn_id(loaded.tokenizer, loaded.template_kwargs)
    thread = threading.Thread(
        target=loaded.model.generate,
        kwargs={
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "eos_token_id": end_id,
            "pad_token_id": loaded.tokenizer.pad_token_id,
            "streamer": streamer,
        },
        daemon=True,
    )
    thread.start()
    yield from streamer
    thread.join()


def chat_loop(
    loaded: LoadedModel,
    max_new_tokens: int = 256,
    system: str | None = None,
    output: TextIO | None = None,
) -> int:
    """Read user turns from stdin until end of input; returns the number of answered turns."""
    output = output or sys.stdout
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    turns = 0
    output.write("multitune chat: type a message; /reset starts over; Ctrl-D exits\n")
    while True:
        # The prompt is written here: input() would send it to stderr when stdin is a terminal.
        output.write(PROMPT)
        output.flush()
        try:
            line = input()
        except EOFError:
            output.write("\n")
            output.flush()
            return turns
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        for piece in answer_stream(loaded, messages, max_new_tokens):
            output.write(piece)
            output.flush()
            reply.append(piece)
        output.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply).strip()})
        turns += 1

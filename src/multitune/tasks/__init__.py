"""Task kinds behind one small protocol: ``resolve(cfg, train, index)`` and ``to_examples``."""

from multitune.tasks import chat, classification, multiple_choice, qa

KINDS = {
    "classification": classification,
    "multiple_choice": multiple_choice,
    "chat": chat,
    "qa": qa,
}

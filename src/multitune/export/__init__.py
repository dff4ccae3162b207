"""Export a run: merge the adapter into its base (``merge.py``), write GGUF (``gguf.py``)."""

GGUF_DTYPES = ("f16", "f32")


class ExportError(RuntimeError):
    """A run or model cannot be exported as asked; the message says why and what to do."""

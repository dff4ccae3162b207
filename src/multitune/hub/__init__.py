"""Publishing a run: the model card (``card.py``)."""

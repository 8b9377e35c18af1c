"""The public functions, composed from the layers below (``compose.py``)."""

"""A backend-neutral description of one call: named options, named per-token inputs, the losses as
data over the launchers, and their metrics."""

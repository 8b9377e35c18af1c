"""The input forms: given logits, hidden states times the lm_head weight in chunks, and a
vocabulary-sharded wrapper around either. Each gives a loss its rows and takes their gradient."""

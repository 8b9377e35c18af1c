"""The autograd Functions, which know neither the loss nor the input form they run."""

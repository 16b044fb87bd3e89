"""``tuner plan``: predict a recipe's accelerator memory, step FLOPs and time before training, without
loading any weight (models are built on PyTorch's ``meta`` device from their configs)."""

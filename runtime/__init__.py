"""Where the work runs: the torch device and the torchrun environment, shared by training and mapping."""

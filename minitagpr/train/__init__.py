"""Training core shared by every recipe (SFT, PRMU, RL): data packing and order, optimizer and schedule, the
token-normalised loss step, metrics and plots. Plain functions; the recipes in recipes/ call them in order."""

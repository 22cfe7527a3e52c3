"""Training pieces shared by every trainer target: data, masks, losses, schedules, condition dropout,
trainable modules, config checks, degradation for restoration pairs, the loss plot.
"""

"""Training: the step (model + targets + partial-label loss), loop, schedules, checkpoints."""

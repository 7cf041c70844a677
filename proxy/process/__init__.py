"""The process layer: the composition root that builds everything from the settings and runs it (workers, the
admin port, signals, the model's child process); nothing below imports it."""

"""Example SageMaker-style model server: an iris classifier behind /invocations."""

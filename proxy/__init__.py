"""An ASGI reverse proxy that gives any model server the metrics of an Amazon SageMaker endpoint."""

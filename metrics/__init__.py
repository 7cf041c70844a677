"""SageMaker metric definitions and the recorder that the proxy writes into."""

"""Wire-level HTTP/1.1: the front-door server of the proxy port and the client that calls the model."""

"""Where a call goes: production variants and their weights, several instances and their health, live instance
counts. Policy is decided here and passed down to the wire client; nothing here knows the request path."""

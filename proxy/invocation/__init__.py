"""The request path: one invocation record stamped through accept, forward, stream back and record; the
per-chunk measurements as observers; the native and Runtime API fronts. Imports upstream, runtime, http, metrics."""

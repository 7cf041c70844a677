"""The SageMaker Runtime API on the wire: paths, headers, error shapes and event-stream framing as botocore's
service model has them, and SigV4. Nothing here knows the request path."""

"""The gRPC services under load and one call at a time."""

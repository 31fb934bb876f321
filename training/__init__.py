"""Training package: data, model and trainer modules."""

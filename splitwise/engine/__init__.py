"""The paged-KV inference engine (see docs/architecture.md)."""

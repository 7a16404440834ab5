"""Answer extraction and verification, benchmarks, persona stability."""

"""Benchmarks of hf_adv against the classic implementations (run with `make bench`; not part of the test suite)."""

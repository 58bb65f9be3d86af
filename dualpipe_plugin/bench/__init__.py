"""Benchmarks on the emulated device: one module per benchmark, each returning a JSON-able dict."""

"""Benchmarks: `make bench` runs `python -m bench`, which runs each family in its own process
and writes reports/bench.json and reports/bench.md.

One module per family (`bench.sandbox`, `bench.state`, `bench.xds`, `bench.hbone`,
`bench.capture`, `bench.mesh`, `bench.capture_cost`, and any module added beside them), each
runnable alone with `python -m`. Shared: `bench.harness` (sandboxes, processes in pods,
interleaved rounds, the stunnel and Python relay references), `bench.report` (each family's
JSON result, the report files); `bench.probe` and `bench.tls_relay` are the programs the
harness starts inside pods. Benchmarks are figures to read and compare, never pass/fail tests.
"""

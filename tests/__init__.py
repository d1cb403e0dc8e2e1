"""The test suite, a package so that tests, benchmarks and launch scripts import the
launch harness as ``tests.harness`` (with the repository root on ``sys.path``)."""

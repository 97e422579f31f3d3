"""The ``tierq`` command and the whole-stack demo: the one place that composes producer/ and worker/."""

"""The kinds of benchmark run (:mod:`benchmarks.run`): one module per kind, each with

* ``run(settings) -> dict``: one configuration, measured (what the cache keeps);
* ``smoke(settings) -> dict``: the same configuration at its smallest size (for ``run.py --smoke`` and the tests);
* ``report(experiment, results, out) -> str``: the markdown report (and plots written under ``out``);
* ``docs_table(experiment, results) -> str``: the table the docs pages show between their benchmark markers;
* ``VERSION``: bumped when a change of the kind's code changes what a cached result means.
"""

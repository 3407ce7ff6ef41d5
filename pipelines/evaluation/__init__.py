"""The evaluation job (DESIGN.md §6.9): spec -> generate -> score -> results, report, MLflow.

- :mod:`~pipelines.evaluation.spec`: what to generate, a typed config checked at load;
- :mod:`~pipelines.evaluation.generate`: the generation actors;
- :mod:`~pipelines.evaluation.score`: the scoring actors and the aggregate table;
- :mod:`~pipelines.evaluation.report`: the HTML report;
- :mod:`~pipelines.evaluation.files`: a sample's files and the records between stages;
- :mod:`~pipelines.evaluation.job`: the Ray Data job (plan, resume, reconcile, MLflow).

Per-sample work is testable without Ray; only ``job`` imports it.
"""

"""Reporting: what a run made, for people.

* :mod:`aloe.reporting.summary` reads the stages' manifests, metrics and judge card into rows and
  frames (role table, judge verdict, headline, disclosure, model calls, findings);
* :mod:`aloe.reporting.plots` draws every figure from those outputs;
* :mod:`aloe.reporting.page` writes the results page (``reports/<experiment>/index.html``) and
  ``reports/index.html`` from the same rows that ``05_report.ipynb`` displays.

Dataset and model cards (:mod:`aloe.cards`) stay below the stages, which write them.
"""

"""The benchmark stack behind ``eval/bench.py``: plans and processes (``runs``, ``sweep``), one row per run
(``records``), summaries and learning-rate choice (``aggregate``), markdown and plots (``report``)."""

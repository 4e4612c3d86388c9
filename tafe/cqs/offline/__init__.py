"""The offline half of CQS: synthetic worlds, training, evaluation and the daily pipeline.

Everything here needs numpy (``pip install 'tafe[train]'``); nothing on the bid path
imports it. The serving half (``tafe.cqs``: model and store files, scoring, hot swap)
stays light.
"""

"""The scaling study: ``python -m ddp_helpers.study PART [--quick]``.

It measures what the core does on this machine (and on a lent GPU) and says why: the
all-reduce's cost, how much a second core adds, every sync strategy's step, DDP's own
knobs, time to 98% accuracy, a cost model checked against runs it was not fitted to,
and the original design's implementation as a reference. Each part writes a
self-describing record under ``results/``. The core package never imports this one.
"""

"""Tuning: evaluate plans, instrument once, price candidates offline, search, and Pareto sweeps.

Modules: :mod:`.evaluation` (full passes, the oracle, the bootstrap guard),
:mod:`.instrument`, :mod:`.pricing`, :mod:`.options` (:class:`exfx.CalibrationOptions`),
:mod:`.calibration` (:func:`exfx.calibrate`),
:mod:`.search` (:func:`exfx.random_search`) and :mod:`.pareto`. The functions are
exported from :mod:`exfx` itself; this package exports no function named like one
of its modules.
"""

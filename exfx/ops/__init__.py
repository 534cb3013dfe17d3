"""The ``exfx::`` custom operators (declared with ``torch.library``).

Importing this package registers them; ``torch.ops.exfx.partial_sum`` and friends
are then available, with reference, fake and FLOP implementations.
"""

from exfx.ops.enp_ops import (
    MOMENT_FLOPS_PER_TERM,
    RULES,
    THRESHOLD_TEST_FLOPS,
    ZTEST_TEST_FLOPS,
    complete,
    early_exit,
    fan_in_of,
    partial_sum,
    terms_per_unit,
    z_critical,
)

__all__ = [
    "MOMENT_FLOPS_PER_TERM",
    "RULES",
    "THRESHOLD_TEST_FLOPS",
    "ZTEST_TEST_FLOPS",
    "complete",
    "early_exit",
    "fan_in_of",
    "partial_sum",
    "terms_per_unit",
    "z_critical",
]

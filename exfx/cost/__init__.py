"""Costs: the one cost model of every exfx op and producer (:mod:`.model`), and FLOP counting (:mod:`.flops`)."""

from exfx.cost.flops import (FLOP_CONVENTION, FlopReport, SiteFlops, count_flops, register_native_flop_formulas,
                              run_counting)
from exfx.cost.model import (
    MOMENT_FLOPS_PER_TERM,
    LatencyModel,
    TimingCache,
    THRESHOLD_TEST_FLOPS,
    ZTEST_TEST_FLOPS,
    SiteCost,
    op_arguments,
    site_cost,
    exit_test_flops,
)

__all__ = ["FLOP_CONVENTION", "FlopReport", "SiteFlops", "count_flops", "run_counting", "MOMENT_FLOPS_PER_TERM",
           "THRESHOLD_TEST_FLOPS", "ZTEST_TEST_FLOPS", "SiteCost", "op_arguments", "site_cost", "exit_test_flops",
           "LatencyModel", "TimingCache", "register_native_flop_formulas"]

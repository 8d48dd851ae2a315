"""The memorisation rule of the sample-complexity check (pure arithmetic on seed means, fast)."""
from __future__ import annotations

from emformer.train.report import checks

FRESH_TRAIN, INIT = 0.175, 0.236
"""the committed study's fresh-run train loss and init-only loss (docs/study)"""


def test_a_pool_worse_than_the_init_is_memorised_even_when_its_train_loss_is_not_below_half_the_fresh_one():
    # N = 256 as in the committed study: train loss 0.088 just above the 0.0875 cutoff, test loss 0.33
    train = {256.0: 0.088, 512.0: 0.153, 1024.0: 0.169}
    test = {256.0: 0.331, 512.0: 0.199, 1024.0: 0.183}
    region = checks.memorisation_region(train, test, FRESH_TRAIN, INIT)
    assert list(region) == [256.0]
    assert region[256.0].startswith(checks.INIT_CRITERION) and checks.TRAIN_CRITERION not in region[256.0]


def test_either_criterion_flags_and_every_smaller_n_follows():
    train = {128.0: 0.05, 256.0: 0.15, 512.0: 0.16, 1024.0: 0.17}
    test = {128.0: 0.2, 256.0: 0.3, 512.0: 0.21, 1024.0: 0.19}
    region = checks.memorisation_region(train, test, FRESH_TRAIN, INIT)
    assert list(region) == [128.0, 256.0]
    assert region[128.0].startswith(checks.TRAIN_CRITERION) and region[256.0].startswith(checks.INIT_CRITERION)
    # a larger N flagged by the train loss alone drags every smaller N into the region
    region = checks.memorisation_region({**train, 512.0: 0.08}, test, FRESH_TRAIN, INIT)
    assert list(region) == [128.0, 256.0, 512.0]
    both = checks.memorisation_region({256.0: 0.05, 512.0: 0.16}, {256.0: 0.4, 512.0: 0.2}, FRESH_TRAIN, INIT)
    assert checks.TRAIN_CRITERION in both[256.0] and checks.INIT_CRITERION in both[256.0]
    smaller = checks.memorisation_region({256.0: 0.15, 512.0: 0.16}, {256.0: 0.2, 512.0: 0.3}, FRESH_TRAIN, INIT)
    assert smaller[256.0].startswith(checks.SMALLER)


def test_no_criterion_met_means_no_memorisation_region():
    train = {512.0: 0.153, 1024.0: 0.169}
    test = {512.0: 0.199, 1024.0: 0.183}
    assert checks.memorisation_region(train, test, FRESH_TRAIN, INIT) == {}
    # the test loss equal to the init-only loss is not above it
    assert checks.memorisation_region({512.0: 0.153}, {512.0: INIT}, FRESH_TRAIN, INIT) == {}

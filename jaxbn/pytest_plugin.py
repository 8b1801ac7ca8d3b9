"""pytest plugin (auto-registered by `pip install jaxbn`): sync-BN fixtures.

    def test_my_model_syncs_bn(sync_bn_check):
        sync_bn_check(model, variables, x, axis_name="batch")  # fails with a report

Flax is imported only when the fixture is used.
"""

import pytest


@pytest.fixture
def sync_bn_check():
    """`jaxbn.sync_check.assert_sync_bn`: raises AssertionError with a layer-by-layer report."""
    from jaxbn.sync_check import assert_sync_bn

    return assert_sync_bn

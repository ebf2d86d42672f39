import logging

import pytest


@pytest.fixture(autouse=True)
def _threatbus_debug_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="threatbus")

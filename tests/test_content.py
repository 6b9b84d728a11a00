"""The content store acceptance suite, bound to every local store.

The checks are `tests.suites.content.ContentStoreSuite`; here they get
their factory. How the local store lays out and guards its files is tested
in ``tests/test_content_local.py``; ckfsd's Content service runs the same
suite through a client in ``integration/``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckfs.content import ContentStore
from tests.local_stores import content_stores
from tests.suites.content import ContentStoreSuite


@pytest.fixture
def make_store(tmp_path: Path) -> Iterator[Callable[[], ContentStore]]:
    with content_stores(tmp_path) as make:
        yield make


class TestContentStore(ContentStoreSuite):
    pass

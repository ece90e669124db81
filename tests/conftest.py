"""Suite-wide set-up: converted MTCNN weights go to a private cache, never the user's."""
import os

import pytest


@pytest.fixture(scope='session', autouse=True)
def private_weight_cache(tmp_path_factory):
    old = os.environ.get('XDG_CACHE_HOME')
    os.environ['XDG_CACHE_HOME'] = str(tmp_path_factory.mktemp('cache'))
    yield os.environ['XDG_CACHE_HOME']
    if old is None:
        del os.environ['XDG_CACHE_HOME']
    else:
        os.environ['XDG_CACHE_HOME'] = old

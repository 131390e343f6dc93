import pytest
from netns import veth_pair


@pytest.fixture
def veth():
    with veth_pair() as pair:
        yield pair


@pytest.fixture(scope="module")
def world():
    """The PAM service's users, groups, dump set and running service (pamworld.py)."""
    from pamworld import make_world

    with make_world() as w:
        yield w

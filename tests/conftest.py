import pytest
from netns import veth_pair


@pytest.fixture
def veth():
    with veth_pair() as pair:
        yield pair
